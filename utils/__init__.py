"""Library code of extreme-compression: evaluation, data, models, pruning, masks, checkpoints.

Nothing in here imports the CLI (`extreme_compression_experiment.py`) or the training loop
(`fsdp_finetune.py`); arrows point one way.
"""
