"""Evaluation: per-domain accuracy on held-out splits, regression monitors, run reports."""
