"""Faithful re-statements of reference implementations, used as benchmark baselines."""
