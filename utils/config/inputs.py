"""What the arguments point at, checked before any library loads or any work starts: the model
(a mistyped short name gets its close matches), the text sources (each under its own flag), and
an export where --kernels sparse needs one.

    problems = input_problems(args)      # ["argument --model: unknown model 'smollm-135m': did you mean ..."]
"""
from __future__ import annotations

import argparse
from pathlib import Path

from utils.data.generated import split_sources
from utils.data.sources import TEXT_SUFFIXES, DataError
from utils.export.compressed import is_compressed_folder
from utils.models.hub import ModelError
from utils.models.loading import resolve_model
from utils.pruning.methods import needs_calibration


def input_problems(args: argparse.Namespace) -> list[str]:
    problems = _model_problems(args) + _source_problems(args)
    if args.kernels == "sparse" and args.eval_only and _is_directory(args.model) and \
            not is_compressed_folder(args.model):
        problems.append(f"argument --kernels sparse: --model {args.model} is not a compressed export (it has no "
                        "compression.json); export it with --export-only --model THAT_FOLDER, then --model "
                        "OUTPUT/compressed")
    return problems


def _model_problems(args: argparse.Namespace) -> list[str]:
    """A --model that names nothing (a mistyped short name: the close ones suggested), found in
    milliseconds, before the heavy libraries load."""
    try:
        resolve_model(args.model)
    except ModelError as error:
        return [f"argument --model: {error}"]
    except OSError as error:  # a name the file system refuses, e.g. longer than it allows
        return [f"argument --model: {error.strerror or error} (shorten the path)"]
    return []


def _source_problems(args: argparse.Namespace) -> list[str]:
    """Text sources that name local paths which do not exist, each under its own flag."""
    mode_reads = {"--eval-source": not args.export_only,
                  "--train-source": not (args.eval_only or args.prune_only or args.export_only),
                  "--calibration-source": not (args.eval_only or args.export_only) and needs_calibration(args.method)}
    problems = []
    for name, used in mode_reads.items():
        spec = getattr(args, name[2:].replace("-", "_"))
        if not used or spec == "wikitext2" or spec.startswith("hf:"):
            continue
        try:
            parts = [part for part in split_sources(spec)[0].split(",") if part] if name == "--train-source" else [spec]
        except DataError:  # two generated: parts, reported with the training text's checks
            continue
        missing = [part for part in parts if part != "wikitext2" and not part.startswith("hf:")
                   and not Path(part).expanduser().exists()
                   and (len(parts) > 1 or "/" in part or "\\" in part or Path(part).suffix in TEXT_SUFFIXES)]
        if missing:
            problems.append(f"argument {name}: text source not found: {', '.join(missing)} (give an existing file "
                            "or folder, 'wikitext2', or hf:NAME:CONFIG:SPLIT:COLUMN)")
    return problems


def _is_directory(path: str) -> bool:
    try:
        return Path(path).is_dir()
    except OSError:  # a name the file system refuses: reported with --model
        return False
