import numpy as np
import pytest

from changecam.data.synthetic import SyntheticSpec, generate
from changecam.evaluation.baselines import f1_per_threshold, naive_baseline


def test_f1_per_threshold_hand_computed():
    hist = np.zeros((2, 256), np.int64)
    hist[0, 10] = 6  # unchanged pixels with difference 10
    hist[1, 50] = 3  # changed pixels with difference 50
    hist[0, 60] = 1  # one unchanged pixel with a big difference
    f1 = f1_per_threshold(hist)
    assert f1[0] == pytest.approx(2 * 3 / (2 * 3 + 7))  # everything predicted as change
    assert f1[11] == pytest.approx(2 * 3 / (2 * 3 + 1))  # the best threshold
    assert f1[61] == 0.0


def test_naive_difference_fails_on_synthetic(tmp_path):
    root = generate(tmp_path / "syn", SyntheticSpec(image_size=128, train=1, val=6, test=6, seed=0))
    result = naive_baseline(root, "levir")
    assert result["val_f1"] <= 0.5 and result["test_f1"] <= 0.5
