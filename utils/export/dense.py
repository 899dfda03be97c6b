"""The plain exporter: a Hugging Face folder (config, tokenizer, safetensors) with every weight
dense, the zeros included, for tools that read only dense checkpoints (vLLM, llama.cpp's
converter, lm-eval's own loader).  As large as the dense model; `--export compressed` is the small one.

    report = export_dense(model, tokenizer, Path("runs/x/dense"), torch.bfloat16, info)
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from utils.export.compressed import ExportReport
from utils.io.files import save_pretrained_atomic


def export_dense(model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype = torch.bfloat16,
                 info: dict | None = None) -> ExportReport:
    """Write `model` in `dtype` as a plain save_pretrained folder (atomically)."""
    cast, state = {}, {}
    for name, tensor in model.state_dict().items():  # tied tensors stay one (save_pretrained then writes it once)
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor.dtype)
        if key not in cast:
            cast[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        state[name] = cast[key]
    folder = save_pretrained_atomic(model, tokenizer, Path(folder), info=info, state_dict=state)
    size = sum(path.stat().st_size for path in folder.glob("*.safetensors"))
    dense = sum(tensor.numel() * tensor.element_size() for tensor in cast.values())
    return ExportReport(folder=str(folder), format="dense", dtype=str(dtype).removeprefix("torch."), file_bytes=size,
                        dense_bytes=dense, dense_tensor_bytes=dense)


def is_never(folder: Path) -> bool:
    """A plain folder needs no reader of its own: transformers reads it as any --model folder."""
    return False
