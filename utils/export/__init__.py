"""Exporters: a trained model written at its real size, and read back (registry.py)."""
