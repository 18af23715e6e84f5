"""The benchmarks run on tiny inputs and report their figures (no speed is asserted here)."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
run_all = importlib.import_module("run_all")


def test_run_all_collects_figures_and_skips_missing_scripts(tmp_path):
    results = run_all.main(
        ["--tiny", "--only", "loader", "not_written_yet", "--out", str(tmp_path), "--logs", str(tmp_path)]
    )  # fmt: skip
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    loader = saved["benchmarks"]["loader"]
    assert loader["status"] == "ok", loader.get("output_tail")
    figures = loader["figures"]
    assert figures["loader_speedup_vs_naive"] > 0 and figures["loader_patches_per_s"] > 0
    assert figures["setup"]["workers"] == 1 and figures["setup"]["patches_per_epoch"] == 6 * 16
    assert figures["loader_cache_mib_per_worker"] == pytest.approx(8 * 7 * 128**2 / 2**20, abs=0.1)
    assert saved["benchmarks"]["not_written_yet"]["status"] == "skipped"
    table = (tmp_path / "results.md").read_text()
    assert "| loader | `loader_speedup_vs_naive` |" in table
    assert "| not_written_yet | *skipped* |" in table
    assert f"{saved['machine']['cores']} cores" in table and "python benchmarks/run_all.py" in table
    assert (tmp_path / "loader.log").read_text().strip().endswith("}")


def test_last_json_takes_the_last_line_only():
    assert run_all.last_json('progress\n{"a": 1}\n{"b": 2.5}\n\n') == {"b": 2.5}
    with pytest.raises(ValueError):
        run_all.last_json('{"a": 1}\nnot json at the end')
    with pytest.raises(ValueError, match="nothing"):
        run_all.last_json("\n")


def test_targets_are_judged_by_direction():
    assert run_all.verdict("loader_speedup_vs_naive", 5.2).endswith("✓")
    assert run_all.verdict("loader_speedup_vs_naive", 4.9).endswith("✗")
    assert run_all.verdict("fit_vs_plain_loop", 1.2).endswith("✗")
    assert run_all.verdict("fit_vs_plain_loop", 1.05).endswith("✓")
    assert run_all.verdict("no_target_here", 3.0) == ""


def test_paired_verdict_is_the_sign_tests_interval_for_the_median_ratio():
    common = importlib.import_module("common")
    # 5 rounds: [min, max] misses the median only when every round falls on one side of
    # it, 2 / 2**5; 4 rounds cover it with 1 - 2 / 2**4 = 0.875 at best
    faster = common.paired_verdict([1.04, 1.01, 1.2, 1.03, 1.05])
    assert faster == {
        "verdict": "faster",
        "median": 1.04,
        "interval": [1.01, 1.2],
        "coverage": 0.9375,
    }
    assert common.paired_verdict([0.97, 0.99, 0.9, 0.95, 0.98])["verdict"] == "slower"
    even = common.paired_verdict([0.94, 1.1, 1.02, 0.99, 1.01])
    assert (even["verdict"], even["interval"]) == ("even within noise", [0.94, 1.1])
    # a round exactly even is no evidence of either
    assert common.paired_verdict([1.0, 1.0, 1.01, 1.02, 1.03])["verdict"] == "even within noise"
    assert common.paired_verdict([1.1, 1.2, 1.3, 1.4])["verdict"] == "too few rounds"
    assert common.paired_verdict([]) == {
        "verdict": "too few rounds",
        "median": None,
        "interval": None,
        "coverage": None,
    }
    # a coverage met exactly is met
    assert common.paired_verdict([1.1] * 5, coverage=0.9375)["coverage"] == 0.9375
    # 8 rounds: the second smallest to the second largest, 1 - 2 * (1 + 8) / 2**8
    eight = common.paired_verdict([0.9, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.2])
    assert (eight["interval"], eight["coverage"]) == ([1.01, 1.06], 0.9297)
    # 9 rounds: the same, 1 - 2 * (1 + 9) / 2**9 (the third would cover 0.8203)
    nine = common.paired_verdict([0.98, 1.01, 1.02, 1.03, 1.04, 1.05, 1.06, 1.07, 1.3])
    assert nine["interval"] == [1.01, 1.07] and nine["coverage"] == 0.9609
    assert nine["verdict"] == "faster"
    with pytest.raises(ValueError, match="coverage"):
        common.paired_verdict([1.1] * 5, coverage=1.0)


def test_scene_verdicts_judges_each_recorded_side_by_side(tmp_path, capsys):
    scene_verdicts = importlib.import_module("scene_verdicts")
    rounds = {
        "default_threads": {
            "torch_threads": 2,
            "geotiff_vs_png_speed_per_round": [0.9, 0.95, 0.97, 0.92, 0.99],
            "geotiff_rasters_only_vs_png_speed_per_round": [0.9, 1.05, 1.1, 1.0, 1.02],
        },
        # an older record: the rasters-only rounds rebuilt from the wall seconds
        "one_thread": {
            "torch_threads": 1,
            "geotiff_vs_png_speed_per_round": [1.02, 1.01, 1.1],
            "wall_seconds": {"png": [2.2, 2.4, 2.2], "geotiff_rasters_only": [2.0, 2.0, 2.0]},
        },
    }
    record = tmp_path / "scene_x.json"
    record.write_text(json.dumps({"network": "quickstart, trained: x", "side_by_side": rounds}))
    (tmp_path / "scene_memory.json").write_text(json.dumps({"peak": 1}))  # no side by side
    table = scene_verdicts.main([str(record), str(tmp_path / "scene_memory.json")])
    assert set(table) == {"scene_x.json"}
    two, one = table["scene_x.json"]["default_threads"], table["scene_x.json"]["one_thread"]
    assert two["every output"]["verdict"] == "slower"
    assert two["rasters only"]["verdict"] == "even within noise"
    assert "from_wall_seconds" not in two["rasters only"]
    assert one["every output"]["verdict"] == "too few rounds"  # 3 rounds
    assert one["rasters only"] == {
        "verdict": "too few rounds",
        "median": 1.1,
        "interval": None,
        "coverage": None,
        "from_wall_seconds": True,
    }
    out = capsys.readouterr().out
    assert "| scene_x.json | trained | 2 | slower (median 0.95, 0.9–0.99) |" in out
    assert "| scene_x.json | trained | 1 | too few rounds (median 1.02) | ≈ too few rounds" in out
    # it reads records and times nothing: `make bench` leaves it out
    assert "scene_verdicts" not in run_all.benchmark_names()


def test_loop_fit_and_plain_loop_compute_the_same_epoch():
    loop = importlib.import_module("loop")
    figures = loop.main(["--tiny"])
    assert figures["errors"] == {}
    assert figures["same_computation"], figures["max_weight_difference"]
    assert figures["fit_vs_plain_loop"] > 0 and figures["fit_defaults_vs_plain_loop"] > 0
    assert figures["setup"]["train_steps_per_epoch"] == 4  # 4 images x 4 tiles / batch 4


@pytest.mark.slow
def test_memory_reports_peak_rss_of_training_and_prediction():
    memory = importlib.import_module("memory")
    figures = memory.main(["--tiny"])
    assert 100 < figures["train_peak_rss_mib"] < 4096
    assert 100 < figures["predict_1024_peak_rss_mib"] < 4096
    assert figures["predict_1024_within_2gib"] is True


@pytest.mark.slow
def test_scene_benchmark_reports_memory_and_side_by_side_speed():
    import scene

    figures = scene.main(["--tiny"])
    run, larger = figures["scenes"]
    assert (run["side"], larger["side"]) == (256, 512)
    for scene_run in (run, larger):
        assert scene_run["peak_rss_mib"] > 100 and scene_run["megapixels_per_s"] > 0
        assert scene_run["within_1_5_gib"] is True
    assert figures["peak_rss_growth"] == pytest.approx(
        larger["peak_rss_mib"] / run["peak_rss_mib"], abs=1e-3
    )
    assert 0.8 < figures["peak_rss_growth"] < 1.5, "bounded memory: the peak hardly grows"
    assert set(figures["side_by_side"]) == {"one_thread", "default_threads"}
    for compare in figures["side_by_side"].values():
        geotiff_rows = {"geotiff", "geotiff_explained", "geotiff_one_gdal_thread"}
        like_for_like = "geotiff_rasters_only"  # no polygons, no overviews
        assert set(compare["megapixels_per_s"]) == {"png", like_for_like} | geotiff_rows
        assert compare["geotiff_rasters_only_vs_png_speed"] > 0
        assert compare["geotiff_rasters_only_vs_png_speed_median_round"] > 0
        assert compare["gdal_every_cpu_vs_one_thread_speed_median_round"] > 0
        assert compare["explanation_extra_s_per_megapixel"] > 0
        assert len(compare["geotiff_vs_png_speed_per_round"]) == compare["repeats"]
        for name, phases in compare["geotiff_phase_seconds_median"].items():
            assert set(phases) == {"setup", "compute", "finish"}
            assert phases["setup"] > 0 and phases["compute"] > 0
            # rasters only, the finish is a rename: it may round to 0.000 s
            assert phases["finish"] >= 0 if name == like_for_like else phases["finish"] > 0
        assert compare["geotiff_blocks_vs_png_speed_median_round"] > 0
        assert set(compare["geotiff_polygons"]) == geotiff_rows
        assert len(set(compare["geotiff_polygons"].values())) == 1  # GDAL threads change no output
        for path, seconds in compare["network_cpu_seconds"].items():  # a part of its CPU time
            assert 0 < seconds <= compare["cpu_seconds_best"][path] + 0.01
    assert set(figures["windowed_at_least_as_fast"]["one_thread"]) == {
        "throughput",
        "cpu_seconds",
        "rasters_only_throughput",
    }
    # one round (--tiny) is no ground for a verdict
    assert figures["windowed_at_least_as_fast"]["one_thread"]["throughput"]["verdict"] == (
        "too few rounds"
    )
    assert run["window_cache"]["peak_on_disk"] == 0  # one block: nothing waits for a later row


@pytest.mark.slow
def test_scene_benchmark_runs_a_trained_checkpoint_of_its_own_width(tmp_path, tiny_synthetic):
    import scene

    from test_checkpoint import make_lightning_checkpoint

    ckpt = make_lightning_checkpoint(tmp_path / "best.ckpt", tiny_synthetic)  # width 4, depth 2
    figures = scene.main(["--tiny", "--weights", str(ckpt)])
    assert figures["network"].endswith(f"trained: {ckpt}")
    assert all(s["megapixels_per_s"] > 0 for s in figures["scenes"])  # predict.py built it


@pytest.mark.slow
def test_scene_benchmark_stand_in_times_the_paths_without_the_network():
    import scene

    figures = scene.main(["--tiny", "--stand-in"])
    assert figures["network"].startswith("stand-in") and figures["scenes"] == []
    # which codecs the record was measured with
    assert figures["compression"] == {
        "change": "deflate",
        "probability": "deflate",
        "explanation": "deflate_predictor",
    }
    for compare in figures["side_by_side"].values():
        # no explanation: the stand-in has no per-date layers
        assert set(compare["megapixels_per_s"]) == {
            "png",
            "geotiff",
            "geotiff_rasters_only",
            "geotiff_one_gdal_thread",
        }
        assert compare["explanation_extra_s_per_megapixel"] is None
        assert min(compare["geotiff_polygons"].values()) >= 1  # it finds changed regions
    with pytest.raises(SystemExit):
        scene.main(["--tiny", "--stand-in", "--weights", "best.ckpt"])
    with pytest.raises(SystemExit):  # no scenes: only the side by side
        scene.main(["--tiny", "--stand-in", "--size", "1024"])


@pytest.mark.slow
def test_scene_timeline_runs_the_stand_in():
    import scene_timeline

    figures = scene_timeline.main(["--tiny", "--stand-in"])
    assert figures["network"].startswith("stand-in")
    assert figures["steps"]["geotiff"]["trace"]["calls"] == 1  # one block


def test_stand_in_network_marks_where_the_dates_differ_over_its_neighbourhood():
    import scene
    import torch

    net = scene.stand_in_network()
    pre = torch.zeros(1, 3, 16, 16)
    post = pre.clone()
    post[..., 4:12, 4:12] = 1.0  # a difference of 255 over 8x8 pixels
    logits = net(pre, post)
    assert logits.shape == (1, 1, 16, 16)
    change = logits[0, 0] > 0
    assert change[8, 8] and change[4, 4] and not change[0, 0] and not change[15, 15]
    # the centre: |diff| 255 over the whole 5x5 neighbourhood
    assert logits[0, 0, 8, 8].item() == pytest.approx((255 - scene.STAND_IN_THRESHOLD) / 8)


@pytest.mark.slow
def test_scene_timeline_times_each_step_in_its_own_thread():
    import scene_timeline

    figures = scene_timeline.main(["--tiny", "--switch-interval", "0.001"])
    assert figures["switch_interval_s"] == 0.001 and sys.getswitchinterval() == 0.005  # restored
    steps = figures["steps"]
    assert set(steps["png"]) == {"decode", "network", "encode"}
    assert steps["png"]["decode"]["calls"] == 2  # pre and post
    threads = {step: row["thread"] for step, row in steps["geotiff"].items()}
    assert threads == {
        "read": "changecam-scene-reader",
        "network": "MainThread",
        "hand_over": "MainThread",
        "write": "changecam-scene-writer",
        "trace": "changecam-scene-tracer",
        "polygons": "MainThread",
        "geojson": "MainThread",
        "overviews": "MainThread",
        "publish": "MainThread",
    }
    for path, spans in figures["spans_last_round"].items():
        wall = figures["wall_ms_median"][path]  # one round: its wall
        assert all(0 <= start and start + length <= wall + 1 for _, _, start, length in spans)
    # one block: read, network, write, trace, then the finish, each after the one before
    order = [
        step for _, step, _, _ in sorted(figures["spans_last_round"]["geotiff"], key=lambda s: s[2])
    ]
    assert order.index("read") < order.index("network") < order.index("write")
    assert order.index("write") < order.index("trace") < order.index("polygons")
    assert 0 <= figures["network_thread_idle_ms_last_round"] < figures["wall_ms_median"]["geotiff"]
    assert figures["writer_and_tracer_ms"] > 0 and figures["tail_ms_last_round"] > 0
    assert figures["network_ms_geotiff_minus_png"] == pytest.approx(
        steps["geotiff"]["network"]["ms"] - steps["png"]["network"]["ms"], abs=0.2
    )


@pytest.mark.slow
def test_scene_memory_reports_the_peak_per_phase():
    import scene_memory

    figures = scene_memory.main(["--tiny"])
    (run,) = figures["scenes"]
    assert run["side"] == 256
    assert set(run["phases_mib"]) == {"scene_polygons", "build_overviews"}
    # one window of 3 float32 bands of 256², in memory: a one-block scene spills nothing
    assert run["window_cache"] == {
        "peak_in_memory": 1,
        "peak_on_disk": 0,
        "peak_in_memory_mib": 0.8,
        "peak_on_disk_mib": 0.0,
    }
    assert run["phases_mib"]["scene_polygons"]["rss_before"] > 100


@pytest.mark.slow
def test_causal_margin_reports_near_ties_stability_and_disagreements(tmp_path, tiny_synthetic):
    import causal_margin

    from test_checkpoint import make_lightning_checkpoint

    ckpt = make_lightning_checkpoint(tmp_path / "best.ckpt", tiny_synthetic, steps=2)
    figures = causal_margin.main(
        ["--ckpt", str(ckpt), "--data", str(tiny_synthetic), "--window", "16"]
    )
    assert figures["objects"] > 0 and 0 <= figures["near_tie_share"] <= 1
    method = figures["method"]
    assert method["disagreements_that_are_near_ties"] <= method["disagreements"]
    assert len(method["disagreement_margins"]) == method["disagreements"]
    assert method["agreed_on_decisive"] <= method["decisive_objects"]
    assert len(figures["causal_date_stability"]) == 5


def test_memory_format_compares_both_formats_with_equal_values():
    import memory_format

    figures = memory_format.main(["--tiny"])
    row = figures["models"]["siamese_unet"]
    assert row["predict_speedup"] > 0 and row["explain_speedup"] > 0
    assert row["logits_max_relative_difference"] < 1e-4
    assert row["map_max_relative_difference"] < 1e-3
    # two formats compared: the same network twice passed every check above (helper-153);
    # a fresh network's maps are about zero at its deepest layer, so they test little here
    # (test_inference_network compares maps that are not)
    assert row["channels_last_weights"] == {"default": False, "channels_last": True}


def test_scene_sample_memory_reports_the_growth_per_side():
    import scene_sample_memory

    figures = scene_sample_memory.main(["--tiny"])
    assert [run["side"] for run in figures["scenes"]] == [256, 512]
    assert [run["date_mib"] for run in figures["scenes"]] == [0.4, 1.5]
    assert all(run["rss_before_mib"] > 50 for run in figures["scenes"])  # numpy, rasterio, torch
    assert figures["growth_ratio"] > 0


def test_polygon_memory_reports_the_growth_per_side():
    import polygon_memory

    figures = polygon_memory.main(["--tiny"])
    assert [run["side"] for run in figures["scenes"]] == [256, 512]
    small, large = (run["regions"] for run in figures["scenes"])
    assert 100 < small < large  # about 5 000 regions per Mpx
    assert figures["growth_ratio"] > 0


def test_scene_codecs_rewrites_both_rasters_with_every_codec():
    import scene_codecs

    figures = scene_codecs.main(["--tiny"])
    probability, explanation = figures["rasters"]["probability"], figures["rasters"]["explanation"]
    assert probability["predict_uses"] == "deflate"
    assert explanation["predict_uses"] == "deflate_predictor"
    for raster in (probability, explanation):
        assert set(raster["cpu_ms_per_megapixel"]) == set(scene_codecs.CODECS)
        assert raster["cpu_vs_predict_uses"][raster["predict_uses"]] == 1.0
        # each codec really applied: the files differ in size
        assert len(set(raster["bits_per_pixel"].values())) == len(scene_codecs.CODECS)
