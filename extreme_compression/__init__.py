"""extreme-compression as a library: what a script needs from the tool, importable from anywhere
once the repository is installed (`pip install .`).

    from extreme_compression import load_compressed, evaluate_perplexity, EvalProtocol
    model = load_compressed("runs/x/compressed")            # a plain transformers model, bit for bit
    model = load_compressed("runs/x/compressed", device="cuda", kernels="sparse")  # sparse decode kernels:
                                                            # load_sparse (utils/export/sparse_model.py)
    main(["--model", "smollm2-135m", "--eval-only", ...])   # the command line, in-process: its exit status
                                                            # (bad arguments raise SystemExit(2), as argparse does)

The command is `extreme-compression` (the same as `python extreme_compression_experiment.py`).
"""
from __future__ import annotations

from extreme_compression_experiment import main
from utils.config.sections import EvalProtocol
from utils.eval_utils import evaluate_perplexity
from utils.export import compressed
from utils.export.sparse_model import load_sparse

__all__ = ["EvalProtocol", "evaluate_perplexity", "load_compressed", "load_sparse", "main"]


def load_compressed(folder, dtype=None, device="cpu", kernels: str = "dense"):
    """A compressed export as a transformers model on `device` (eval mode): kernels "dense" decompresses
    it, weights bit for bit those exported; "sparse" holds the decoder linears as SparseLinear (only the
    kept weights, never a dense matrix: load_sparse with its measured rule). `dtype` None keeps the export's."""
    if kernels == "sparse":
        return load_sparse(folder, device=device, dtype=dtype)
    if kernels != "dense":
        raise ValueError(f"kernels is 'dense' or 'sparse', not {kernels!r}")
    return compressed.load_compressed(folder, dtype=dtype).to(device)
