"""Evaluation on real benchmark data (see harness.py)."""
