"""The resume logs' reader and settings diff (changecam.run_log)."""

from __future__ import annotations

import logging

from changecam.atomic import append_json_line
from changecam.run_log import as_logged, read_json_lines, settings_changes


def test_settings_changes_name_each_changed_leaf_with_both_values():
    before = {
        "scene": {"threshold": 0.5, "layer": None, "bands": [1, 2, 3]},
        "post": {"sources": [{"size": 10}, {"size": 20}]},
        "window": 256,
    }
    after = {
        "scene": {"threshold": 0.9, "bands": [1, 2, 4]},
        "post": {"sources": [{"size": 10}, {"size": 21}]},
        "window": 256,
        "new": "x",
    }
    assert settings_changes(before, after) == [
        'new: (absent) -> "x"',
        "post.sources[1].size: 20 -> 21",
        "scene.bands[2]: 3 -> 4",
        "scene.layer: null -> (absent)",
        "scene.threshold: 0.5 -> 0.9",
    ]
    assert settings_changes(before, before) == []


def test_settings_changes_take_lists_of_other_lengths_and_long_values_whole():
    assert settings_changes({"bands": [1, 2]}, {"bands": [1, 2, 3]}) == [
        "bands: [1, 2] -> [1, 2, 3]"
    ]
    long = {"path": "/" + "a" * 100}
    (change,) = settings_changes(long, {"path": "/b"})
    assert change.startswith('path: "/aaa') and change.endswith('… -> "/b"')
    assert len(change) == len("path: ") + 60 + len(' -> "/b"')
    assert settings_changes(None, {"a": 1}) == ['(settings): null -> {"a": 1}']


def test_read_json_lines_skips_a_killed_append_and_says_so(tmp_path, caplog):
    log = tmp_path / "log.jsonl"
    assert read_json_lines(log) == []
    append_json_line(log, {"status": "started"})
    append_json_line(log, {"block": 0})
    with log.open("a") as f:
        f.write('{"block": 1, "va')  # what a kill during the append leaves
    with caplog.at_level(logging.WARNING, logger="changecam.run_log"):
        assert read_json_lines(log) == [{"status": "started"}, {"block": 0}]
        # read again by another reader of the same run (a refusal's clean-up): no second warning
        assert read_json_lines(log) == [{"status": "started"}, {"block": 0}]
    assert caplog.text.count(f"{log} line 3 is incomplete") == 1
    log.write_text('{"status": "started"}\n{"block"\n')  # another partial line: said again
    with caplog.at_level(logging.WARNING, logger="changecam.run_log"):
        assert read_json_lines(log) == [{"status": "started"}]
    assert f"{log} line 2 is incomplete" in caplog.text


def test_as_logged_drops_only_keys_recorded_since_that_the_log_lacks():
    now = {
        "network": {"fusion": "diff"},
        "threshold": 0.5,
        "post": {"size": 3, "sample_sha256": "ab", "sources": [{"size": 1, "sample_sha256": "c"}]},
    }
    old = {"threshold": 0.4, "post": {"size": 3, "sources": [{"size": 1}]}}
    assert as_logged(now, old) == {
        "threshold": 0.5,  # not a recorded-since key: still compared, and still differs
        "post": {"size": 3, "sources": [{"size": 1}]},
    }
    assert as_logged(now, now) == now  # a log that has them compares them
    assert as_logged(now, {}) == {"threshold": 0.5, "post": now["post"]}
