"""Evaluation: per-image scores on the shared test loop, and the naive baseline."""
