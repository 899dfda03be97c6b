"""Pruned models on disk: the cache of `pruned_models/` and the seed lineage's `.pt` files, read
back and checked (the cache key is utils/pipeline/identity.PruneSpec; writing is io/files.py's).

    model, tokenizer, info = load_pruned_model(source, folder, dtype=torch.float32)
    check_pruned_info(info, folder, model_identity)      # pruned from this very model
    check_density(measured, 0.1, None, str(folder))      # holds the density it is named for
    import_lineage_checkpoint(model, "pruned_models/opt-125m-0.1.pt")

Only safetensors and `torch.load(weights_only=True)` are read: no arbitrary unpickling.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from utils.io.files import CheckpointError
from utils.models.loading import ModelSource, load_model


def check_pruned_info(info: dict, folder: Path, identity: dict) -> None:
    """Refuse a cached pruned model made from another model than the one being run."""
    saved = (info.get("model_identity") or {}).get("fingerprint")
    if saved != identity["fingerprint"]:
        raise CheckpointError(f"{folder} was pruned from another model (fingerprint {saved}, this model "
                              f"{identity['fingerprint']}); delete it to prune again: rm -r {folder}")


def check_density(measured: float, density: float, pattern: tuple[int, int] | None, where: str,
                  tolerance: float = 1e-3) -> None:
    """Refuse a loaded model whose measured density is not the requested one beyond rounding
    (`tolerance`: Wanda keeps a whole number of weights per row, so 1 / the narrowest input width)."""
    wanted = pattern[0] / pattern[1] if pattern else density
    if abs(measured - wanted) > tolerance:
        raise CheckpointError(f"{where} holds density {measured:.4f}, not the requested {wanted:g}; "
                              f"run with --sparsity {measured:.4g}, or delete it to prune again")


def read_info(folder: str | os.PathLike) -> dict:
    path = Path(folder) / "pruning.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise CheckpointError(f"{path} is missing: {folder} is not a finished pruned checkpoint "
                              f"(delete the folder to prune again)") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); delete {folder} to prune again") from error


def load_pruned_model(source: ModelSource, folder: str | os.PathLike, dtype: torch.dtype | None = None):
    """(model, tokenizer, info) from a pruned checkpoint folder, with clear errors."""
    folder = Path(folder)
    info = read_info(folder)
    try:
        model, tokenizer = load_model(source, dtype=dtype, weights_from=folder)
    except Exception as error:  # noqa: BLE001 - safetensors, torch and transformers each raise their own
        raise CheckpointError(f"cannot load the pruned checkpoint {folder}: {error}. "
                              f"Delete it to prune again: rm -r {folder}") from error
    return model, tokenizer, info


def _lineage_state_dict(raw: dict) -> dict[str, torch.Tensor]:
    """Fold torch.nn.utils.prune's `weight_orig`/`weight_mask` pairs back into plain weights."""
    state = {}
    for key, value in raw.items():
        if key.endswith("_mask") and key[:-5] + "_orig" in raw:
            continue
        if key.endswith("_orig"):
            base = key[:-5]
            mask = raw.get(base + "_mask")
            state[base] = value * mask if mask is not None else value
        else:
            state[key] = value
    return state


def import_lineage_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a seed-lineage `pruned_models/{model}-{sparsity}.pt` state dict into `model`."""
    path = Path(path)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for one bad file
        raise CheckpointError(f"{path} is not a readable state dict ({type(error).__name__}: {error}); "
                              "only tensors are read (weights_only=True). Delete it to prune again") from error
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state = _lineage_state_dict(raw)
    expected = model.state_dict()
    if not any(key in expected for key in state):  # saved from the inner model (no 'model.' prefix)?
        for prefix in ("model.", "transformer."):
            if any(prefix + key in expected for key in state):
                state = {prefix + key: value for key, value in state.items()}
                break
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(k for k in set(expected) - set(state) if not _is_tied(model, k))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if unexpected or missing or wrong:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            details.append(f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} "
                           f"vs {tuple(expected[wrong[0]].shape)})")
        raise CheckpointError(f"{path} does not match {type(model).__name__}: " + "; ".join(details))
    _check_origin(model, state, expected, path)
    model.load_state_dict(state, strict=False)


def _check_origin(model: nn.Module, state: dict, expected: dict, path: Path) -> None:
    """A lineage file is found by the model's folder name, so another model's with the same shapes
    could match: pruning never touches the input embeddings, so a pruned copy of --model has
    --model's own (compared at the lower of the two precisions)."""
    embeddings = model.get_input_embeddings().weight
    name = next((key for key, tensor in expected.items() if tensor.data_ptr() == embeddings.data_ptr()), None)
    if name is None or name not in state:
        return
    saved, own = state[name], expected[name]
    low = saved.dtype if saved.element_size() <= own.element_size() else own.dtype
    if not torch.equal(saved.to(low), own.to(low)):
        raise CheckpointError(f"{path} was saved from another model: its input embeddings ({name}) differ from "
                              "--model's; move it out of --pruned-dir, or give the model it was pruned from")


def _is_tied(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


