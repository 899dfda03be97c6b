"""Models: resolving and loading --model, its identity, its decoder structure and measured density, per-family quirks."""
