"""Pruned models on disk: the cache of `pruned_models/`, the seed lineage's `.pt` files, atomic saves.

    folder = pruned_model_dir("pruned_models", "opt-125m", density=0.1, method="sparsegpt", pattern=None)
    save_pretrained_atomic(model, tokenizer, folder, info={"method": "sparsegpt", ...})
    model = load_pruned_model(source, folder, dtype=torch.float32)

Only safetensors and `torch.load(weights_only=True)` are read: no arbitrary unpickling.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .logging_utils import write_json
from .model_utils import ModelSource, load_model


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the model; names the file."""


def pruned_model_dir(root: str | os.PathLike, model_name: str, density: float, method: str,
                     pattern: tuple[int, int] | None, fingerprint: str, variant: str = "") -> Path:
    """The cache folder of one pruning: readable name, then the dense model's fingerprint (two
    models whose folders share a base name never share an entry) and `variant`, a digest of any
    other setting that changes the result (e.g. a per-layer density profile)."""
    suffix = f"-{pattern[0]}of{pattern[1]}" if pattern else ""
    return Path(root) / f"{model_name}-{density:g}-{method}{suffix}{variant}-{fingerprint[:10]}"


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


def lineage_checkpoint(root: str | os.PathLike, model_name: str, density: float) -> Path:
    """Where the seed lineage kept its pruned state dicts: pruned_models/{model}-{sparsity}.pt."""
    return Path(root) / f"{model_name}-{density:g}.pt"


def save_pretrained_atomic(model: nn.Module, tokenizer, folder: str | os.PathLike, info: dict | None = None,
                           state_dict: dict | None = None, keep_existing: bool = False) -> Path:
    """save_pretrained (safetensors) into a temporary folder of this process, then swap it in: a
    crash mid-write leaves the previous folder intact.  `keep_existing` (a cache entry, whose
    content its name fixes): when another process finished the same folder first, keep that one."""
    folder = Path(folder)
    tmp = fresh_tmp(folder, private=True)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if info is not None:
        write_json(tmp / "pruning.json", info)
    if keep_existing and (folder / "pruning.json").exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return folder
    return swap_in(tmp, folder)


def fresh_tmp(folder: Path, private: bool = False) -> Path:
    """An empty sibling folder to write `folder`'s next version into.  `private`: named for this
    process, so two processes writing the same folder at once do not share it (the training
    state's is shared: every rank writes its part into one)."""
    tmp = folder.with_name(folder.name + (f".{os.getpid()}.tmp" if private else ".tmp"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def swap_in(tmp: Path, folder: Path) -> Path:
    """Replace `folder` by the finished `tmp`: a crash at any point leaves one whole version
    (the previous one, as `folder` or `folder.old`, until the new one is in place)."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


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
    model.load_state_dict(state, strict=False)


def _is_tied(model: nn.Module, key: str) -> bool:
    return key == "lm_head.weight" and bool(getattr(model.config, "tie_word_embeddings", False))


def make_pruned_model(model: nn.Module, tokenizer, folder: Path, *, method: str, density: float,
                      pattern: tuple[int, int] | None, calibration: torch.Tensor | None, device: torch.device,
                      calibration_info: dict, extra_info: dict | None = None, progress: bool = True,
                      profile: list[float] | None = None) -> dict:
    """Prune `model` in place, save it to `folder` with a pruning.json saying how; return the info.
    `profile`: one density per decoder layer (OWL) instead of `density` everywhere."""
    import platform

    import transformers

    from .mask_utils import sparsity_report
    from .prune_utils import prune_model
    report = prune_model(model, method, profile or density, pattern, calibration=calibration, device=device,
                         progress=progress)
    measured = sparsity_report(model)
    info = {"method": method, "density": density, "pattern": f"{pattern[0]}:{pattern[1]}" if pattern else None,
            "calibration": calibration_info, "seconds": report.seconds, "measured_density": measured.density,
            "layer_density": report.layer_density, "layer_density_profile": profile,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            **(extra_info or {})}
    save_pretrained_atomic(model, tokenizer, folder, info=info, keep_existing=True)  # two runs may prune it at once
    return info
