"""Typed, frozen config sections (sections.py), built and checked once at the edge (validate.py); the measured recipes as data."""
