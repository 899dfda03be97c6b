"""The exporters: `--export NAME` writes a run's model with the entry's writer into the entry's
folder of the run; `--model FOLDER` reads an export back with the reader its manifest names.

    report = export_model("compressed", model, tokenizer, Path("runs/x"), torch.bfloat16, info)
    source = resolve_source("runs/x/compressed")          # ModelSource(kind="compressed", ...)
    model, tokenizer = load_source(source, torch.float32)  # any --model: hub, folder, GGUF or export

A new format is one entry here (and its module): the CLI's `--export` choices come from this table.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from utils.export.compressed import ExportReport, export_compressed, is_compressed_folder, load_compressed
from utils.export.dense import export_dense, is_never
from utils.models.loading import ModelSource, load_model, load_tokenizer, resolve_model


@dataclass(frozen=True)
class Exporter:
    name: str
    folder: str  # the subfolder of the run folder it writes
    write: Callable[..., ExportReport]  # (model, tokenizer, folder, dtype, info) → ExportReport
    recognizes: Callable[[Path], bool]  # whether a folder holds this format (its manifest)
    read: Callable[..., nn.Module]  # (folder, dtype) → the model, eval mode, on the CPU
    summary: str


EXPORTERS: dict[str, Exporter] = {exporter.name: exporter for exporter in (
    Exporter("compressed", "compressed", export_compressed, is_compressed_folder, load_compressed,
             "non-zeros + bitmasks: the size the pruned model really has; --model reads it back"),
    Exporter("dense", "dense", export_dense, is_never, lambda folder, dtype: load_model(resolve_model(str(folder)),
                                                                                       dtype=dtype)[0],
             "a plain Hugging Face folder, zeros included, for tools that read only dense checkpoints"),
)}


def export_model(name: str, model: nn.Module, tokenizer, run_folder: Path, dtype: torch.dtype,
                 info: dict | None = None) -> ExportReport:
    """Write `model` with exporter `name` into its folder of `run_folder`."""
    exporter = EXPORTERS[name]
    return exporter.write(model, tokenizer, Path(run_folder) / exporter.folder, dtype, info)


def reader_for(folder: str | Path) -> Exporter | None:
    """The exporter whose manifest `folder` holds, or None (a plain save_pretrained folder)."""
    return next((exporter for exporter in EXPORTERS.values() if exporter.recognizes(Path(folder))), None)


def resolve_source(spec: str) -> ModelSource:
    """`--model` → where to load it from; an export folder is named by its exporter."""
    source = resolve_model(spec)
    exporter = reader_for(source.location) if source.kind == "folder" else None
    return dataclasses.replace(source, kind=exporter.name) if exporter is not None else source


def load_source(source: ModelSource, dtype: torch.dtype | None = None):
    """(model, tokenizer) of any --model, in eval mode on the CPU: an export through its reader."""
    exporter = EXPORTERS.get(source.kind)
    if exporter is not None:
        return exporter.read(source.location, dtype), load_tokenizer(source)
    return load_model(source, dtype=dtype)
