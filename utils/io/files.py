"""Files written whole or not at all, and the error for a file that cannot be used.

    write_json(path, data)                                   # atomic: a crash leaves the old file
    save_pretrained_atomic(model, tokenizer, folder, info)   # a model folder, swapped in when complete
    tmp = fresh_tmp(folder); ...; swap_in(tmp, folder)        # any folder, the same way

Only safetensors and JSON are written: nothing that a reader would have to unpickle.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or does not match the model; names the file."""


def jsonable(value: Any) -> Any:
    """`value` with what JSON cannot hold made readable: NaN and infinities as text, paths as strings, tensors as numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep it readable instead of invalid
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


def read_json_object(path: str | os.PathLike) -> dict | None:
    """The JSON object in `path`, or None where the file is missing, unreadable, not JSON or not an
    object (a run folder's run.json or results.json, read where a damaged one means "nothing")."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON atomically: a crash mid-write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(data), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
