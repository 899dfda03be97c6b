"""A pruned model on disk at its real size: every sparse matrix as its non-zeros and a bitmask.

    report = export_compressed(model, tokenizer, Path("runs/x/compressed"), torch.bfloat16, info)
    print(report.lines())          # on-disk size against the dense checkpoint, and what fills it
    model = load_compressed(Path("runs/x/compressed"))     # a plain transformers model again

The layout per compressed tensor is the one compressed-tensors' `sparse-bitmask` used
(`NAME.compressed` values, `NAME.bitmask`, `NAME.shape`): compressed-tensors itself dropped sparse
compression in 0.15 (its PR #610), and transformers 5 requires 0.15 or later, so no installed library
reads or writes it any more. The folder therefore carries no `sparsity_config` that transformers
would try to resolve; `load_compressed` (and `--model FOLDER`) reads it back, bit for bit.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from utils.export.bitmask import compress_matrix, decompress_matrix, pays_to_compress
from utils.io.files import fresh_tmp, swap_in
from utils.models.hub import ModelError

MANIFEST = "compression.json"
FORMAT = "extreme-compression/sparse-bitmask"
WEIGHTS = "model.safetensors"


# --------------------------------------------------------------------------- the exporter

def format_bytes(size: int) -> str:
    """1023 B, 4.9 KiB, 3.0 MiB, 2.63 GiB."""
    if size < 1 << 10:
        return f"{size} B"
    if size < 1 << 20:
        return f"{size / (1 << 10):.1f} KiB"
    if size < 1 << 30:
        return f"{size / (1 << 20):.1f} MiB"
    return f"{size / (1 << 30):.2f} GiB"


@dataclass
class ExportReport:
    folder: str
    format: str
    dtype: str
    file_bytes: int  # the weights file on disk, header included
    dense_bytes: int  # the same tensors dense, in the same dtype
    value_bytes: int = 0
    bitmask_bytes: int = 0
    dense_tensor_bytes: int = 0  # tensors kept dense (embeddings, norms, the LM head)
    compressed_tensors: int = 0
    largest_dense: list = field(default_factory=list)  # [(name, bytes)] of the biggest dense tensors

    @property
    def ratio(self) -> float:
        return self.file_bytes / self.dense_bytes

    def lines(self) -> list[str]:
        biggest = ", ".join(f"{name} {format_bytes(size)}" for name, size in self.largest_dense)
        return [f"Compressed export: {self.folder} | {format_bytes(self.file_bytes)} on disk = {self.ratio:.1%} of "
                f"the dense {self.dtype} checkpoint ({format_bytes(self.dense_bytes)})",
                f"  {self.compressed_tensors} sparse matrices: values {format_bytes(self.value_bytes)} + bitmasks "
                f"{format_bytes(self.bitmask_bytes)}; kept dense: {format_bytes(self.dense_tensor_bytes)} "
                f"(largest: {biggest})"]

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


def _unique_state(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict in `dtype`, each tied tensor once (the first name keeps it), and the map of
    the names dropped for a tie → the name kept."""
    seen: dict[tuple, str] = {}
    state, tied = {}, {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else (name,)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        if tensor.is_floating_point():
            if dtype == torch.float16 and tensor.numel() and tensor.abs().max() > torch.finfo(torch.float16).max:
                raise ModelError(f"{name} holds values beyond float16's range; export with --export-dtype bfloat16")
            tensor = tensor.to(dtype)
        state[name] = tensor.detach().cpu().contiguous()
    return state, tied


def export_compressed(model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype = torch.bfloat16,
                      info: dict | None = None) -> ExportReport:
    """Write `model` to `folder` (atomically): config, tokenizer, `model.safetensors` with every matrix
    that is smaller as values + bitmask stored so, the rest dense, and a manifest."""
    from safetensors.torch import save_file

    state, tied = _unique_state(model, dtype)
    tensors: dict[str, torch.Tensor] = {}
    compressed = []
    values = bitmasks = kept = 0
    dense_sizes = []
    for name, tensor in state.items():
        if pays_to_compress(tensor):
            parts = compress_matrix(tensor)
            tensors.update({f"{name}.{part}": value for part, value in parts.items()})
            compressed.append(name)
            values += parts["compressed"].numel() * parts["compressed"].element_size()
            bitmasks += parts["bitmask"].numel()
        else:
            tensors[name] = tensor
            kept += tensor.numel() * tensor.element_size()
            dense_sizes.append((name, tensor.numel() * tensor.element_size()))
    dense_bytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    folder = Path(folder)
    tmp = fresh_tmp(folder)
    model.config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
    report = ExportReport(folder=str(folder), format=FORMAT, dtype=str(dtype).removeprefix("torch."),
                          file_bytes=(tmp / WEIGHTS).stat().st_size, dense_bytes=dense_bytes, value_bytes=values,
                          bitmask_bytes=bitmasks, dense_tensor_bytes=kept, compressed_tensors=len(compressed),
                          largest_dense=sorted(dense_sizes, key=lambda item: -item[1])[:3])
    manifest = {"format": FORMAT, "version": 1, "dtype": report.dtype, "compressed": compressed, "tied": tied,
                "layout": {"NAME.compressed": "the non-zeros, row-major", "NAME.shape": "int64 (rows, cols)",
                           "NAME.bitmask": "uint8 (rows, ceil(cols/8)); bit i of byte j is column 8j+i"},
                "report": report.to_dict(), "source": info or {}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    swap_in(tmp, folder)
    return report


# --------------------------------------------------------------------------- reading it back

def is_compressed_folder(folder: str | os.PathLike) -> bool:
    return (Path(folder) / MANIFEST).is_file()


def read_manifest(folder: Path) -> dict:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"{path} cannot be read ({error}); export the model again (--export-only)") from error
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{path} describes format {manifest.get('format')!r}, not {FORMAT!r}")
    return manifest


def decompressed_state(folder: Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The dense state dict of an export (tied names included), in the dtype it was exported in;
    `manifest` is its read_manifest."""
    from safetensors import safe_open
    folder = Path(folder)
    state = {}
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
            names = set(handle.keys())
            compressed = set(manifest["compressed"])
            for name in compressed:
                state[name] = decompress_matrix(*(handle.get_tensor(f"{name}.{part}")
                                                  for part in ("compressed", "bitmask", "shape")))
            suffixes = tuple(f".{part}" for part in ("compressed", "bitmask", "shape"))
            for name in names:
                if not (name.endswith(suffixes) and name.rsplit(".", 1)[0] in compressed):
                    state[name] = handle.get_tensor(name)
    except Exception as error:  # noqa: BLE001 - safetensors, a missing part or a bad bitmask each raise their own
        raise ModelError(f"cannot read the compressed weights in {folder / WEIGHTS} ({type(error).__name__}: "
                         f"{error}); the file may be truncated; export the model again") from error
    for name, kept in manifest.get("tied", {}).items():
        state[name] = state[kept]
    return state


def load_compressed(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A compressed export as a plain transformers model (eval mode, on the CPU), weights equal to
    those exported; `dtype` None keeps the export's."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    folder = Path(folder)
    manifest = read_manifest(folder)
    state = decompressed_state(folder, manifest)
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    stored = getattr(torch, manifest["dtype"])
    config = AutoConfig.from_pretrained(folder)
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelError(f"{folder}: {type(config).__name__} is not a causal language model transformers knows") from None
    # The concrete class (the Auto class needs a path): weights from the state dict, nothing initialized twice.
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype or stored)
    return model.eval()
