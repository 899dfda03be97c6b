"""Data-free recovery: training text sampled from the dense model itself (`--train-source generated:N`).

    spec = GenerationSpec.parse("generated:2M", temperature=1.0, top_p=0.95, length=512, batch_size=32, seed=0)
    text = generated_text(spec, load_dense, tokenizer, model_key, device)   # TokenizedText, cached on disk

A user without training data can still distill: the dense model writes `N` tokens (batched
sampling with a KV cache through `generate`, rows of `length` tokens, each started from BOS), the
pruned model then learns to match the dense model's next-token distributions on them (`--loss
kd`).  The tokens are cached under the cache folder, keyed by the model's fingerprint, the
tokenizer and every sampling setting, so a second run (or a resume, or the other processes of a
launch) reads them back instead of sampling again.  Sampling is seeded per batch, so the same
settings give the same tokens.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from utils.data.sources import DataError, TokenizedText, read_cached_tokens, tokenizer_key, write_cached_tokens
from utils.models.hub import default_cache_dir

PREFIX = "generated:"
_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([kKmM]?)$")
VERSION = 1  # bump when the sampling procedure changes: old cache entries are then never read


@dataclass(frozen=True)
class GenerationSpec:
    tokens: int  # how many tokens to sample in all
    temperature: float
    top_p: float
    length: int  # tokens per sampled row
    batch_size: int  # rows per generate call
    seed: int

    @classmethod
    def parse(cls, part: str, **settings) -> "GenerationSpec":
        """`generated:N` and the sampling settings."""
        return cls(tokens=token_count(part), **settings)

    @property
    def rows(self) -> int:
        return math.ceil(self.tokens / self.length)


def token_count(part: str) -> int:
    """N of `generated:N` (a count, with an optional k or M: 500k, 2M); DataError when it names none."""
    match = _COUNT.match(part[len(PREFIX):].strip())
    exact = float(match[1]) * {"": 1, "k": 1e3, "m": 1e6}[match[2].lower()] if match else 0.0
    if exact < 1:
        raise DataError(f"'{part}': give how many tokens to sample, e.g. generated:2M or generated:500000")
    if exact != int(exact):  # 1.5 tokens is no count; 1.5k is 1500
        raise DataError(f"'{part}' is {exact:g} tokens, not a whole number; e.g. generated:2 or generated:1.5k")
    return int(exact)


def split_sources(train_source: str) -> tuple[str, str | None]:
    """(the other sources, comma-joined, or "";  the one `generated:N` part, or None)."""
    parts = [p for p in train_source.split(",") if p.strip()]
    generated = [p for p in parts if p.strip().startswith(PREFIX)]
    if len(generated) > 1:
        raise DataError(f"--train-source names {len(generated)} generated parts; give one (generated:N)")
    rest = ",".join(p for p in parts if not p.strip().startswith(PREFIX))
    return rest, generated[0].strip() if generated else None


@torch.no_grad()
def sample_rows(model: torch.nn.Module, spec: GenerationSpec, start_id: int, device: torch.device,
                progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(spec.rows, 1 + spec.length) token ids: each row `start_id` then `length` sampled tokens
    (end-of-text suppressed, so every row is full).  Batch b is sampled from seed (seed, b)."""
    from transformers import GenerationConfig
    config = GenerationConfig(do_sample=True, temperature=spec.temperature, top_p=spec.top_p, top_k=0,
                              max_new_tokens=spec.length, min_new_tokens=spec.length,
                              pad_token_id=start_id, use_cache=True)
    was_training = model.training
    model.eval()
    rows = []
    for index, first in enumerate(range(0, spec.rows, spec.batch_size)):
        count = min(spec.batch_size, spec.rows - first)
        prompt = torch.full((count, 1), start_id, dtype=torch.long, device=device)
        # generate() samples from the global generators: seeded inside a fork, so a batch's text is its
        # own and the caller's generators are as they were
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(spec.seed * 1_000_003 + index)
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), generation_config=config)
        rows.append(out[:, : 1 + spec.length].cpu())
        if progress is not None:
            progress(count)
    model.train(was_training)
    return torch.cat(rows)


def _cache_path(spec: GenerationSpec, model_key: str, tokenizer) -> Path:
    key = json.dumps({"version": VERSION, "model": model_key, "tokenizer": tokenizer_key(tokenizer), **asdict(spec)},
                     sort_keys=True)
    return default_cache_dir() / "generated" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"


def generated_text(spec: GenerationSpec, load_dense: Callable[[], torch.nn.Module], tokenizer, model_key: str,
                   device: torch.device, logger=None) -> TokenizedText:
    """The sampled tokens of `spec` as one stream (rows back to back, each starting with BOS),
    read from the cache when these settings were sampled before, else sampled with
    `load_dense()` and cached."""
    path, source = _cache_path(spec, model_key, tokenizer), f"{PREFIX}{spec.tokens}"
    cached = read_cached_tokens(path, source)
    if cached is not None:
        if logger is not None:
            logger.info(f"Generated text: {spec.tokens:,} tokens read back from {path}")
        return cached
    start_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start_id is None:
        raise DataError("--train-source generated:N needs a BOS or end-of-text token to start each sample from; "
                        "this tokenizer has neither")
    model = load_dense()
    bar = logger.progress(spec.rows, "Sampling training text", unit="rows") if logger is not None else None
    if logger is not None:
        logger.info(f"Generated text: sampling {spec.rows:,} rows of {spec.length} tokens from the dense model "
                    f"(temperature {spec.temperature:g}, top-p {spec.top_p:g}, seed {spec.seed}, "
                    f"batches of {spec.batch_size})")
    rows = sample_rows(model, spec, start_id, device, progress=bar.update if bar is not None else None)
    if bar is not None:
        bar.close()
    ids = rows.reshape(-1)
    text = TokenizedText(ids, len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")), source)
    write_cached_tokens(path, text)
    return text
