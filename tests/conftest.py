import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Tests never touch the network: the hub is offline for transformers, datasets and our probes.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import SAMPLE_TEXT, tiny_model, train_tokenizer  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Token and GGUF caches of the tool go to a session folder, not the user's home."""
    if "EXTREME_COMPRESSION_CACHE" not in os.environ:
        os.environ["EXTREME_COMPRESSION_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield


@pytest.fixture(scope="session")
def tokenizer():
    return train_tokenizer(SAMPLE_TEXT * 4)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(SAMPLE_TEXT * 40, encoding="utf-8")
    return path


def save_tiny(folder: Path, family: str, tokenizer, layers: int = 2, hidden: int = 64) -> Path:
    model = tiny_model(family, len(tokenizer), layers=layers, hidden=hidden)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny(tmp_path_factory.mktemp("tiny-opt"), "opt-350m", tokenizer)
