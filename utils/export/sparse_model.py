"""A compressed export straight onto the GPU as a model of SparseLinear layers, no dense matrix on the way.

    model = load_sparse("runs/x/compressed")                       # cuda, SparseRule() decides per layer
    model = load_sparse(folder, device="cpu")                      # the pure-torch reference path
    model.generate(**tokenizer("text", return_tensors="pt").to("cuda"), max_new_tokens=20)

The folder is the bitmask export (utils/export/bitmask.py): `compression.json` names the matrices
stored as `NAME.compressed` (the non-zeros, row-major), `NAME.bitmask` and `NAME.shape` in
`model.safetensors`; every other tensor is stored dense under its own name, and `tied` maps each
dropped name to the one kept. The model's skeleton is built with its parameters on the meta device;
each compressed linear weight is unpacked to a bool mask and repacked on the CPU (utils/export/
sparse_linear.py), and only the packed layout goes to the device. A matrix denser than
`rule.max_density`, or one that is not a linear weight, is decompressed on the CPU and loaded dense.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from utils.export.bitmask import decompress_matrix, unpack_bitmask
from utils.export.compressed import read_manifest
from utils.export.sparse_layout import SparseRule, pack_parts
from utils.export.siblings import stack_siblings
from utils.export.sparse_linear import SparseLinear

WEIGHTS = "model.safetensors"
PARTS = ("compressed", "bitmask", "shape")


@contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no init work);
    buffers stay real, so the ones a model computes at init (rotary frequencies) need no reload."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            kept = module._parameters[name]
            module._parameters[name] = type(kept)(kept.to("meta"), requires_grad=kept.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = tensor
    else:
        raise ValueError(f"the export holds {name}, which the model built from its config.json does not have")


def _skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    config = AutoConfig.from_pretrained(folder)
    config.dtype = dtype
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ValueError(f"{folder}: {type(config).__name__} is not a causal language model transformers knows") from None
    with parameters_on_meta():
        model = model_class(config)
    try:
        from transformers import GenerationConfig
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError):
        pass  # an export without generation_config.json keeps the one the config implies
    return model.eval()


@torch.no_grad()
def load_sparse(folder: str | os.PathLike, device: str | torch.device = "cuda", rule: SparseRule = SparseRule(),
                dtype: torch.dtype | None = None) -> nn.Module:
    """The exported causal LM on `device`: each compressed linear weight at or below `rule.max_density`
    as a SparseLinear (siblings stacked where `rule.stack_siblings`), everything else dense; `dtype`
    None keeps the export's."""
    from safetensors import safe_open
    folder = Path(folder)
    manifest = read_manifest(folder)
    dtype = dtype or getattr(torch, manifest["dtype"])
    model = _skeleton(folder, dtype)
    compressed = set(manifest["compressed"])
    cast = lambda t: t.to(dtype) if t.is_floating_point() else t  # noqa: E731
    done = set()
    with safe_open(str(folder / WEIGHTS), framework="pt", device="cpu") as handle:
        stored = set(handle.keys())
        missing = [f"{n}.{p}" for n in compressed for p in PARTS if f"{n}.{p}" not in stored]
        if missing:
            raise ValueError(f"{folder / WEIGHTS} lacks {missing[:3]}: the export is incomplete")
        for name in sorted(compressed):
            values, bitmask, shape = (handle.get_tensor(f"{name}.{part}") for part in PARTS)
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            density = values.numel() / max(1, int(shape.prod()))
            if type(owner) is nn.Linear and leaf == "weight" and density <= rule.max_density:
                mask = unpack_bitmask(bitmask, int(shape[1]))
                packed = pack_parts(cast(values), mask, rule.encoding_for(density), rule.rows_per_block)
                bias_name = f"{owner_name}.bias"
                bias = cast(handle.get_tensor(bias_name)).to(device) if bias_name in stored else None
                done.add(bias_name)
                parent, _, child = owner_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child,
                        SparseLinear(packed.to(device), bias, rule.max_rows))
            else:  # the rule keeps it dense, or it is no linear weight: decompressed here, dense there
                _set_tensor(model, name, cast(decompress_matrix(values, bitmask, shape)).to(device))
        for name in sorted(stored - {f"{n}.{p}" for n in compressed for p in PARTS} - done):
            _set_tensor(model, name, cast(handle.get_tensor(name)).to(device))
    for dropped, kept in manifest.get("tied", {}).items():
        owner_name, _, leaf = dropped.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        owner._parameters[leaf] = model.get_parameter(kept)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"the export has no values for {left[:5]}{' …' if len(left) > 5 else ''}")
    model = model.to(device)
    if rule.stack_siblings:
        stack_siblings(model)
    return model
