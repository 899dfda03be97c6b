"""extreme-compression as a library: what a script needs from the tool, importable from anywhere
once the repository is installed (`pip install .`).

    from extreme_compression import load_compressed, evaluate_perplexity, EvalProtocol
    model = load_compressed("runs/x/compressed")            # a plain transformers model, bit for bit
    model = load_sparse("runs/x/compressed", device="cuda") # sparse decode kernels (utils/export/sparse_model.py)
    main(["--model", "smollm2-135m", "--eval-only", ...])   # the command line, in-process: its exit status
                                                            # (bad arguments raise SystemExit(2), as argparse does)

The command is `extreme-compression` (the same as `python extreme_compression_experiment.py`).
"""
from __future__ import annotations

from extreme_compression_experiment import main
from utils.config.sections import EvalProtocol
from utils.eval_utils import evaluate_perplexity
from utils.export.compressed import load_compressed
from utils.export.sparse_model import load_sparse

__all__ = ["EvalProtocol", "evaluate_perplexity", "load_compressed", "load_sparse", "main"]
