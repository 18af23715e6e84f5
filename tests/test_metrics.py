import math

import pytest
import torch

from changecam.metrics import (
    ChangeScores,
    confusion_counts,
    is_threshold,
    mean_of,
    scores_from_counts,
)


def test_hand_computed_scores():
    probs = torch.tensor([[0.9, 0.8, 0.2, 0.1, 0.7, 0.3]])
    mask = torch.tensor([[1.0, 0.0, 1.0, 0.0, 1.0, 0.0]])
    counts = confusion_counts(probs, mask)
    assert counts.tolist() == [[2, 1, 1, 2]]  # TP FP FN TN
    s = scores_from_counts(*counts[0])
    assert s["precision"].item() == pytest.approx(2 / 3)
    assert s["recall"].item() == pytest.approx(2 / 3)
    assert s["f1"].item() == pytest.approx(2 / 3)
    assert s["iou"].item() == pytest.approx(0.5)
    assert s["accuracy"].item() == pytest.approx(4 / 6)


def test_empty_prediction_and_target_score_zero_not_nan():
    s = scores_from_counts(0, 0, 0, 10)
    assert s["f1"].item() == 0 and s["iou"].item() == 0 and s["accuracy"].item() == 1


def test_pooled_over_batches_equals_one_confusion_matrix():
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(6, 1, 8, 8, generator=gen)
    mask = (torch.rand(6, 1, 8, 8, generator=gen) > 0.7).float()
    metric = ChangeScores()
    for i in range(0, 6, 2):  # three batches of very different change content
        metric.update(probs[i : i + 2], mask[i : i + 2])
    pooled = metric.compute()
    tp, fp, fn, tn = confusion_counts(probs.reshape(1, -1), mask.reshape(1, -1))[0]
    whole = scores_from_counts(tp, fp, fn, tn)
    for k, v in whole.items():
        assert pooled[k].item() == pytest.approx(v.item(), abs=1e-6)
    per_batch_mean = (
        sum(
            scores_from_counts(
                *confusion_counts(probs[i : i + 2].reshape(1, -1), mask[i : i + 2].reshape(1, -1))[
                    0
                ]
            )["f1"]
            for i in range(0, 6, 2)
        )
        / 3
    )
    assert pooled["f1"].item() != pytest.approx(
        per_batch_mean.item(), abs=1e-4
    )  # not a mean of ratios


def test_a_nan_probability_is_no_change_as_in_the_per_image_counts():
    probs = torch.tensor([[float("nan"), 0.2, 0.9, 0.1]])
    mask = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    metric = ChangeScores()
    metric.update(probs, mask)
    tp, fp, fn, tn = confusion_counts(probs, mask)[0]
    assert [int(v) for v in metric._final_state()] == [1, 0, 3, 0] == [tp, fp, tn, fn]


def test_logits_are_refused():
    with pytest.raises(ValueError, match="probabilities"):
        ChangeScores().update(torch.tensor([[-2.0, 3.0]]), torch.tensor([[0.0, 1.0]]))


def test_mean_of_skips_undefined_values():
    """A pair with nothing predicted has no post share (None in JSON, NaN in a tensor): the mean
    over pairs leaves it out instead of counting it as 0 or turning the mean into NaN."""
    assert mean_of([0.25, None, math.nan, 0.75]) == 0.5
    assert mean_of([None, math.nan]) is None
    assert mean_of([]) is None


def test_a_threshold_given_as_an_integer_is_read_as_a_probability():
    """Hydra reads `module.threshold=0` as the int 0, which torchmetrics alone refuses."""
    metric = ChangeScores(threshold=0)
    metric.update(torch.tensor([[0.0, 0.2]]), torch.tensor([[0.0, 1.0]]))
    assert [int(v) for v in metric._final_state()] == [1, 0, 1, 0]


def test_a_threshold_float32_rounds_to_one_is_refused_everywhere():
    """0.99999999 passed the [0, 1) checks but is 1.0 in float32, where the probabilities are
    compared with it: no pixel, even p = 1, counted as change (helper-94)."""
    from changecam.cli.common import checked_threshold
    from changecam.explain.targets import Target
    from changecam.models import SiameseUNet
    from changecam.training.module import ChangeDetectionModule

    sure = torch.ones(1, 1, 2, 2)
    highest = 0.99999994  # the largest float32 below 1
    assert is_threshold(highest) and confusion_counts(sure, sure, highest)[0, 0] == 4
    assert not is_threshold(0.99999999) and confusion_counts(sure, sure, 0.99999999)[0, 0] == 0
    with pytest.raises(
        ValueError, match=r"threshold=0.99999999 must be a probability in \[0, 1\) that float32"
    ):
        checked_threshold(0.99999999)
    with pytest.raises(ValueError, match="target threshold 0.99999999 must be"):
        Target(threshold=0.99999999)
    with pytest.raises(ValueError, match="module.threshold=0.99999999 must be"):
        ChangeDetectionModule(SiameseUNet(3, 4, 2), threshold=0.99999999)
