"""Pruning: the math (criteria.py), ONE method table (methods.py), the layer-wise driver, per-layer profiles, schedules, the cache."""
