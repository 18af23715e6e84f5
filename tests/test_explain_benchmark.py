"""benchmarks/explain_cost.py on tiny inputs: it runs, checks itself against captum, reports."""

from __future__ import annotations

import importlib
import sys

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_explain_cost_reports_ratios_and_agrees_with_captum():
    explain_cost = importlib.import_module("explain_cost")
    figures = explain_cost.main(["--tiny", "--device", "cpu"])
    assert figures["ratio_vs_forward_backward"] > 0 and figures["speedup_vs_naive"] > 0
    assert figures["max_abs_diff_vs_captum"] < 1e-5  # the naive way computes the same maps
    assert figures["setup"]["taps"] == 10 and figures["setup"]["naive_captum_calls"] == 20
