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
        if self.format == "dense":
            return [f"Dense export: {self.folder} | {format_bytes(self.file_bytes)} on disk, every weight "
                    f"{self.dtype}, the zeros included (a plain Hugging Face folder)"]
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


EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PARTS = ("compressed", "bitmask", "shape")
# safetensors' dtype names → torch's (what a header may say)
STORED_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool}


def read_manifest(folder: Path) -> dict:
    """compression.json, its structure checked: the format, a dtype it can be, the compressed names
    as a list of strings, the tied names as an object of strings."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{path} cannot be read ({error}); export the model again (--export-only)") from error
    problem = None
    if not isinstance(manifest, dict):
        problem = f"it holds a {type(manifest).__name__}, not an object"
    elif manifest.get("format") != FORMAT:
        problem = f"it describes format {manifest.get('format')!r}, not {FORMAT!r}"
    elif manifest.get("dtype") not in EXPORT_DTYPES:
        problem = f"its dtype {manifest.get('dtype')!r} is none of {', '.join(EXPORT_DTYPES)}"
    elif not isinstance(manifest.get("compressed"), list) or not all(isinstance(n, str) for n in manifest["compressed"]) \
            or len(set(manifest["compressed"])) != len(manifest["compressed"]):
        problem = "its 'compressed' is not a list of distinct parameter names"
    elif not isinstance(manifest.get("tied", {}), dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in manifest.get("tied", {}).items()):
        problem = "its 'tied' is not an object of parameter names"
    if problem:
        raise ModelError(f"{path} is not a manifest this tool wrote ({problem}); export the model again (--export-only)")
    return manifest


def _expected_shapes(config) -> tuple[type, dict[str, tuple[int, ...]]]:
    """The causal-LM class of `config` and the shape of every tensor its state dict holds (built on
    the meta device: no memory)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise ModelError(f"{type(config).__name__} is not a causal language model transformers knows") from None
    with torch.device("meta"):
        skeleton = model_class(config)
    return model_class, {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}


def _check_layout(handle, manifest: dict, expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor of the architecture accounted for exactly once (stored dense, compressed, or
    tied), every stored tensor and manifest entry used, shapes and dtypes as the manifest says:
    checked on the file's header, before anything is read or allocated."""
    names = set(handle.keys())
    compressed, tied = manifest["compressed"], manifest.get("tied", {})
    dtype = EXPORT_DTYPES[manifest["dtype"]]
    parts = {f"{name}.{part}" for name in compressed for part in PARTS}
    missing_parts = sorted(parts - names)
    if missing_parts:
        raise ModelError(f"the manifest compresses {missing_parts[0].rsplit('.', 1)[0]}, whose {missing_parts[0]} "
                         f"is not in {WEIGHTS}")
    stored = (names - parts) | set(compressed)
    unknown = sorted((stored | set(tied)) - set(expected))
    if unknown:
        raise ModelError(f"{WEIGHTS} or the manifest names {unknown[0]}, which this architecture has no tensor of "
                         f"({len(unknown)} such names; config.json may describe another model)")
    bad_ties = sorted(name for name, kept in tied.items() if kept not in stored or name in stored)
    missing = sorted(set(expected) - stored - set(tied))
    if bad_ties or missing:
        raise ModelError(f"no weights for {(bad_ties or missing)[0]} ({len(bad_ties) + len(missing)} tensors of the "
                         f"architecture unaccounted for); the export is incomplete")
    for name in sorted(stored):
        shape = _stored_shape(handle, name, compressed, dtype)
        if shape != expected[name]:
            raise ModelError(f"{name} is stored as {shape}, but the architecture's is {expected[name]}")


def _stored_shape(handle, name: str, compressed: list, dtype: torch.dtype) -> tuple[int, ...]:
    """The shape a stored tensor declares (for a compressed one, its NAME.shape and the bitmask's
    fitting it), its dtype checked against the manifest's (never cast)."""
    if name not in compressed:
        piece = handle.get_slice(name)
        kind = STORED_DTYPES.get(piece.get_dtype())
        if kind is not None and kind.is_floating_point and kind != dtype:
            raise ModelError(f"{name} is stored in {str(kind).removeprefix('torch.')}, but the manifest says "
                             f"{str(dtype).removeprefix('torch.')}; export the model again")
        return tuple(piece.get_shape())
    shape_piece, values, bitmask = (handle.get_slice(f"{name}.{part}") for part in ("shape", "compressed", "bitmask"))
    if tuple(shape_piece.get_shape()) != (2,) or shape_piece.get_dtype() != "I64":
        raise ModelError(f"{name}.shape is not two int64 sizes")
    rows, cols = (int(size) for size in handle.get_tensor(f"{name}.shape").tolist())
    if tuple(bitmask.get_shape()) != (rows, -(-cols // 8)) or bitmask.get_dtype() != "U8":
        raise ModelError(f"{name}.bitmask is {tuple(bitmask.get_shape())} {bitmask.get_dtype()}, not the "
                         f"({rows}, {-(-cols // 8)}) bytes of a ({rows}, {cols}) matrix")
    kind = STORED_DTYPES.get(values.get_dtype())
    if kind != dtype or len(values.get_shape()) != 1:
        raise ModelError(f"{name}.compressed holds {values.get_dtype()} {tuple(values.get_shape())}, not the manifest's "
                         f"{str(dtype).removeprefix('torch.')} values")
    return rows, cols


def decompressed_state(folder: Path, manifest: dict, expected: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """The dense state dict of an export (tied names included), in the dtype it was exported in,
    after `_check_layout` against the architecture's `expected` shapes."""
    from safetensors import safe_open
    folder = Path(folder)
    state = {}
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
            _check_layout(handle, manifest, expected)
            compressed = set(manifest["compressed"])
            parts = {f"{name}.{part}" for name in compressed for part in PARTS}
            for name in compressed:
                state[name] = decompress_matrix(*(handle.get_tensor(f"{name}.{part}") for part in PARTS))
            for name in set(handle.keys()) - parts:
                state[name] = handle.get_tensor(name)
    except ModelError:
        raise
    except Exception as error:  # noqa: BLE001 - safetensors, a missing part or a bad bitmask each raise their own
        raise ModelError(f"cannot read the compressed weights in {folder / WEIGHTS} ({type(error).__name__}: "
                         f"{error}); the file may be truncated; export the model again") from error
    for name, kept in manifest.get("tied", {}).items():
        state[name] = state[kept]
    return state


def load_compressed(folder: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """A compressed export as a plain transformers model (eval mode, on the CPU), weights equal to
    those exported; `dtype` None keeps the export's.  Refused, naming what is wrong, unless it
    accounts for every tensor of the architecture its config.json names."""
    from transformers import AutoConfig
    folder = Path(folder)
    manifest = read_manifest(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:  # noqa: BLE001 - a missing or broken config.json raises many kinds
        raise ModelError(f"{folder}/config.json cannot be read ({type(error).__name__}); export the model again") from None
    model_class, expected = _expected_shapes(config)
    try:
        state = decompressed_state(folder, manifest, expected)
    except ModelError as error:
        raise ModelError(f"{folder}: {error}") from None
    if dtype is not None:
        state = {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}
    # The concrete class (the Auto class needs a path): weights from the state dict, nothing initialized twice.
    model = model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype or EXPORT_DTYPES[manifest["dtype"]])
    return model.eval()
