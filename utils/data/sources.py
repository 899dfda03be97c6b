"""Text sources → token ids (cached on disk) → evaluation windows, training blocks, calibration.

A *source* is one string:

    wikitext2                       the hub dataset `wikitext`/`wikitext-2-raw-v1` (needs `datasets`)
    path/to/wikitext-2-raw          a folder holding wiki.{train,valid,test}.raw (official zip layout)
    path/to/wiki.valid.raw          one file (WikiText files keep the papers' row joining)
    path/a.txt,path/b.txt           several files, or a folder of *.txt files
    hf:NAME[:CONFIG[:SPLIT[:COLUMN]]]   any Hugging Face dataset

The split (`test` for evaluation, `train` for training and calibration) is chosen by the caller;
a single file ignores it.  The SparseGPT/Wanda evaluation string is the test rows joined by
"\\n\\n"; `wikitext_rows_to_text` rebuilds it exactly from the raw file.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from utils.models.hub import ModelError, check_hub_reachable, default_cache_dir

WIKITEXT_SPLIT_FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "valid": "wiki.valid.raw",
                        "test": "wiki.test.raw"}
TEXT_SUFFIXES = {".txt", ".raw", ".text", ".md"}
WIKITEXT_HUB = ("wikitext", "wikitext-2-raw-v1")  # what `wikitext2` loads from the hub: dataset, config


class DataError(ValueError):
    """A text source that cannot be read or is too short; the message says how to fix it."""


@dataclass(frozen=True)
class TokenizedText:
    ids: torch.Tensor  # (num_tokens,) int64
    num_bytes: int  # UTF-8 bytes of the text, for bits per byte
    source: str


def wikitext_rows_to_text(lines: Sequence[str]) -> str:
    """HF rows are the file's lines with blank ones turned into ""; papers join rows with "\\n\\n"."""
    return "\n\n".join(line if line.strip() else "" for line in lines)


def read_text_file(path: Path) -> str:
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("cp1252", errors="replace")  # NLTK-era corpora carry Latin-1 bytes
    text = text.replace("\r\n", "\n")
    if path.name.startswith("wiki.") and path.suffix == ".raw":
        return wikitext_rows_to_text(text.splitlines(keepends=True))
    return text


def _files_of(spec: str, split: str) -> list[Path] | None:
    """Local files named by `spec`, or None when `spec` is not a local path."""
    parts = [p for p in spec.split(",") if p]
    paths = [Path(p).expanduser() for p in parts]
    if not all(p.exists() for p in paths):
        missing = [str(p) for p in paths if not p.exists()]
        if len(parts) > 1 or any(sep in spec for sep in ("/", "\\")) or Path(spec).suffix in TEXT_SUFFIXES:
            raise DataError(f"text source not found: {', '.join(missing)} "
                            "(give an existing file or folder, 'wikitext2', or hf:NAME:CONFIG:SPLIT:COLUMN)")
        return None
    files: list[Path] = []
    for path in paths:
        if path.is_file():
            files.append(path)
            continue
        wiki = path / WIKITEXT_SPLIT_FILES.get(split, f"wiki.{split}.raw")
        if wiki.exists():
            files.append(wiki)
            continue
        if any(path.glob("wiki.*.raw")):
            have = sorted(p.name for p in path.glob("wiki.*.raw"))
            usable = [name for name in have if name != WIKITEXT_SPLIT_FILES["test"]]
            hint = (f"name a file instead, e.g. {path / usable[0]}" if usable else "name another text file")
            if split == "train":  # training on the evaluation text would make every perplexity meaningless
                hint += f" (never {WIKITEXT_SPLIT_FILES['test']}: it is the evaluation text)"
            raise DataError(f"{path} has no {wiki.name} for the '{split}' split (it has {', '.join(have)}); {hint}")
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not found:
            raise DataError(f"no text files (*.txt, *.raw) under {path}")
        files.extend(found)
    return files


def test_text_in(spec: str, split: str = "train") -> list[str]:
    """What `spec` reads for `split` that is WikiText-2's test text (what the papers' perplexity is
    measured on): wiki.test.raw files (links by their target too) and the hub's test split.  Missing
    files give none (the loader reports those).  Other overlaps are allowed: a one-file smoke run
    trains and evaluates on its file."""
    if spec.startswith("hf:"):  # read as load_text reads it
        name, config, hf_split, _ = _hf_fields(spec, split)
        wikitext = _dataset(name) == WIKITEXT_HUB[0] and (config or "").startswith("wikitext-2")
        return [spec] if wikitext and hf_split == "test" else []
    try:
        files = _files_of(spec, split) or []
    except DataError:
        return []
    return [str(path) for path in files if _is_test_file(path)]


def _dataset(name: str) -> str:
    """A hub dataset's own name, without its owner: "Salesforce/wikitext" → "wikitext"."""
    return name.rstrip("/").split("/")[-1]


def _is_test_file(path: Path) -> bool:
    """Whether `path` is WikiText-2's wiki.test.raw (a link by its target too)."""
    return WIKITEXT_SPLIT_FILES["test"] in (path.name, path.resolve().name)


@functools.lru_cache(maxsize=None)
def is_wikitext2_test(spec: str) -> bool | None:
    """Whether `spec`'s test text is WikiText-2's raw test text alone (the papers' evaluation text):
    the hub's `wikitext2` or hf:wikitext:wikitext-2-raw-v1 (its test split, column text), or one file
    named wiki.test.raw (a folder holding it).  None where the files cannot be read now.  Recorded
    with a run's perplexity, so that a comparison made elsewhere, where the path means nothing,
    still knows the text; asked once per process (every results.json a run writes says the same)."""
    if spec == "wikitext2":
        return True
    if spec.startswith("hf:"):
        name, config, split, column = _hf_fields(spec, "test")
        return (_dataset(name), config, split, column) == (*WIKITEXT_HUB, "test", "text")
    try:
        files = _files_of(spec, "test") or []
    except DataError:
        return False
    except (OSError, RuntimeError):  # unreadable now: unknown, and the results are still written
        return None
    return len(files) == 1 and _is_test_file(files[0])


@contextlib.contextmanager
def _datasets_offline(datasets, offline: bool):
    """`datasets` reads only its local cache inside (when `offline`), and reaches the hub again after."""
    previous = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = previous or offline
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = previous


def _load_hf_text(name: str, config: str | None, split: str, column: str) -> str:
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a core dependency
        raise DataError("the 'datasets' package is needed for hub text sources: pip install datasets") from error
    offline = False
    if not Path(name).exists():  # a local dataset folder needs no hub
        try:
            check_hub_reachable(f"datasets/{name}", timeout=3.0)
        except ModelError:
            offline = True  # read the local datasets cache only; no minutes of retries
    try:
        with _datasets_offline(datasets, offline):
            rows = datasets.load_dataset(name, config, split=split)[column]
    except Exception as error:  # noqa: BLE001 - datasets raises many types for one cause
        raise DataError(
            f"could not load dataset {name}/{config} split {split}: {type(error).__name__}: {error}. "
            "Offline? Use local text instead, e.g. --eval-source ../shared/data/wikitext-2-raw "
            "(a folder with wiki.test.raw), --train-source and --calibration-source path/to/file.txt "
            "(e.g. its wiki.valid.raw)") from error
    return "\n\n".join(rows)


def _hf_fields(spec: str, split: str) -> tuple[str, str | None, str, str]:
    """hf:NAME:CONFIG:SPLIT:COLUMN → (name, config or None, split, column); empty or missing fields
    take None, `split` and "text"."""
    fields = spec[3:].split(":")
    field = lambda index: fields[index] if len(fields) > index and fields[index] else None  # noqa: E731
    return fields[0], field(1), field(2) or split, field(3) or "text"


def load_text(spec: str, split: str = "test") -> str:
    """The text of `spec` for `split` (see the module docstring for the forms of `spec`)."""
    if spec == "wikitext2":
        hf_split = "validation" if split == "valid" else split
        return _load_hf_text(*WIKITEXT_HUB, hf_split, "text")
    if spec.startswith("hf:"):
        return _load_hf_text(*_hf_fields(spec, split))
    files = _files_of(spec, split)
    if files is None:
        raise DataError(f"unknown text source '{spec}': give 'wikitext2', a file or folder that exists, "
                        "or hf:NAME:CONFIG:SPLIT:COLUMN")
    return "\n\n".join(read_text_file(path) for path in files)


def _source_key(spec: str, split: str) -> str:
    """Identity of a source for the cache: local files by path, size and mtime."""
    files = None
    if spec != "wikitext2" and not spec.startswith("hf:"):
        files = _files_of(spec, split)
    if not files:
        return f"{spec}|{split}"
    return "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def tokenizer_key(tokenizer) -> str:
    """A fingerprint of a tokenizer: its class, vocabulary size and how it encodes a probe."""
    probe = "The quick brown fox @-@ jumps, 1 @,@ 000 times.\n\n = Héllo = "
    ids = tokenizer(probe)["input_ids"]
    return f"{type(tokenizer).__name__}|{len(tokenizer)}|{ids}"


def tokenize_source(spec: str, tokenizer, split: str = "test", cache_dir: str | os.PathLike | None = None,
                    ) -> TokenizedText:
    """Token ids of a source, tokenized once and then read back from the disk cache."""
    key = hashlib.sha256(f"{_source_key(spec, split)}||{tokenizer_key(tokenizer)}".encode()).hexdigest()[:24]
    cache = Path(cache_dir) if cache_dir else default_cache_dir() / "tokens"
    path = cache / f"{key}.pt"
    cached = read_cached_tokens(path, spec)
    if cached is not None:
        return cached
    text = load_text(spec, split)
    if not text.strip():
        raise DataError(f"text source '{spec}' ({split}) is empty")
    warn_if_not_text(text, spec)
    result = tokenize_text(text, tokenizer, spec)
    write_cached_tokens(path, result)
    return result


def read_cached_tokens(path: Path, source: str) -> TokenizedText | None:
    """A token cache entry, or None when there is none; a damaged one is removed (rebuilt, never fatal)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, weights_only=True)
        return TokenizedText(saved["ids"], int(saved["num_bytes"]), source)
    except Exception:  # noqa: BLE001 - whatever is wrong with the file, it is made again
        path.unlink(missing_ok=True)
        return None


def write_cached_tokens(path: Path, text: TokenizedText) -> None:
    """Write a token cache entry atomically (a reader never sees half a file).  The cache is an
    optimization: a full disk or a read-only cache folder warns and the run goes on."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"ids": text.ids, "num_bytes": text.num_bytes}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        import warnings
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        warnings.warn(f"could not cache the token ids in {path} ({error}); they will be tokenized again next time",
                      stacklevel=2)


def warn_if_not_text(text: str, spec: str, limit: float = 0.05) -> float:
    """Warn when more than `limit` of a source's characters are control characters or undecodable
    bytes: a binary file given as text still yields a perplexity, a meaningless one.  Returns the
    fraction found."""
    sample = text[:1_000_000]
    odd = sum(1 for ch in sample if ch == "\ufffd" or (ord(ch) < 32 and ch not in "\n\r\t\f\v"))
    fraction = odd / max(1, len(sample))
    if fraction > limit:
        import warnings
        warnings.warn(f"text source '{spec}' does not look like text ({fraction:.0%} of its characters are control "
                      "characters or undecodable bytes); is it the file you meant?", stacklevel=2)
    return fraction


def tokenize_text(text: str, tokenizer, source: str = "<text>") -> TokenizedText:
    # Default special tokens, as the papers' `tokenizer(text, return_tensors="pt")` does (OPT's BOS).
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    special = {int(i) for i in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None))
               if i is not None}
    if text.strip() and all(int(i) in special for i in ids[:64].tolist()) and ids.numel() <= 2:
        # a tokenizer without its vocabulary (a model folder missing its tokenizer files) reads nothing
        raise DataError(f"the tokenizer turned {len(text):,} characters of '{source}' into {ids.numel()} token(s); "
                        "does the model folder hold its tokenizer files (tokenizer.json, as "
                        "tokenizer.save_pretrained writes them)?")
    return TokenizedText(ids, len(text.encode("utf-8")), source)


def pack_blocks(ids: torch.Tensor, block_size: int) -> torch.Tensor:
    """(num_blocks, block_size) non-overlapping blocks of a token stream; the tail is dropped."""
    num_blocks = ids.numel() // block_size
    if num_blocks == 0:
        raise DataError(f"training text has {ids.numel()} tokens, fewer than one block of {block_size}; "
                        "use more text (--train-source) or a smaller --block-size")
    return ids[: num_blocks * block_size].view(num_blocks, block_size)


def with_bos(rows: torch.Tensor, bos_id: int | None) -> torch.Tensor:
    """(n, length) rows → (n, length + 1) rows that start with `bos_id` (unchanged when None)."""
    if bos_id is None:
        return rows
    return torch.cat([torch.full((rows.shape[0], 1), bos_id, dtype=rows.dtype), rows], dim=1)


def calibration_windows(ids: torch.Tensor, nsamples: int, length: int, seed: int) -> torch.Tensor:
    """(nsamples, length) random windows, the SparseGPT/Wanda way, reproducible from `seed`."""
    if ids.numel() <= length:
        raise DataError(f"calibration text has {ids.numel()} tokens, fewer than one window of {length}; "
                        "use more text (--calibration-source) or a smaller --calibration-length")
    if nsamples > ids.numel() - length:  # more windows than start positions: no new information, only memory
        raise DataError(f"--nsamples {nsamples:,} windows of {length} tokens: the calibration text has "
                        f"{ids.numel():,} tokens, {ids.numel() - length:,} distinct windows; lower --nsamples or "
                        "give more text (--calibration-source)")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - length, (nsamples,), generator=generator)
    return torch.stack([ids[s: s + length] for s in starts.tolist()])
