"""The pipeline: one function per mode (modes.py, train.py) over a shared Context, the run and prune identities, the pruning step."""
