"""On-disk size of the compressed export against the dense checkpoint (no GPU needed).

    python benchmarks/bench_export.py                       # opt-1.3b and SmolLM2 shapes, density 0.1 and 2:4
    python benchmarks/bench_export.py --models opt-1.3b --smollm2 path/to/SmolLM2-135M-Instruct.Q4_1.gguf

Random-weight models of the published shapes (or the real SmolLM2 with --smollm2), magnitude-pruned
(the size depends on how many weights are kept, not on which), exported in bf16 to a temporary folder.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import bench_model
from utils.export.compressed import export_compressed
from utils.pruning.driver import prune_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="opt-1.3b,smollm2-shape", help="comma-separated shapes")
    parser.add_argument("--smollm2", default=None, help="the real SmolLM2 GGUF instead of its shape")
    parser.add_argument("--settings", default="0.1,2:4", help="densities and N:M patterns")
    args = parser.parse_args()
    for name in args.models.split(","):
        for setting in args.settings.split(","):
            pattern = tuple(int(v) for v in setting.split(":")) if ":" in setting else None
            density = pattern[0] / pattern[1] if pattern else float(setting)
            label = "smollm2-135m" if name == "smollm2-shape" and args.smollm2 else name
            if label == "smollm2-135m":
                from utils.models.loading import load_model, resolve_model
                model, _ = load_model(resolve_model(args.smollm2), dtype=torch.float32)
            else:
                model = bench_model(name, torch.float32, device="cpu")
            start = time.perf_counter()
            prune_model(model, "magnitude", density, pattern, progress=False)
            pruned = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as folder:
                start = time.perf_counter()
                report = export_compressed(model, None, Path(folder) / "export", torch.bfloat16)
                seconds = time.perf_counter() - start
            print(f"{label} @ {setting}: {report.file_bytes / 2**20:,.1f} MiB = {report.ratio:.1%} of dense bf16 "
                  f"{report.dense_bytes / 2**20:,.1f} MiB | values {report.value_bytes / 2**20:,.1f}, bitmasks "
                  f"{report.bitmask_bytes / 2**20:,.1f}, dense tensors {report.dense_tensor_bytes / 2**20:,.1f} MiB "
                  f"(largest {report.largest_dense[0][0]}) | prune {pruned:.1f} s, export {seconds:.1f} s", flush=True)
            del model


if __name__ == "__main__":
    main()
