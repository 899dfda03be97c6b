"""What every results.json says about its run besides the numbers: the mode, the model, the
density and recipe, how perplexity was measured (the full protocol or a quick look), and how long
it took.  `--compare` reads these back (utils/io/report.py), so a table never needs run.json.

    write_json(folder / "results.json", {**run_record(context), **numbers})
"""
from __future__ import annotations

import time

from utils.config.sections import EvalProtocol
from utils.data.sources import is_wikitext2_test
from utils.pipeline.context import Context
from utils.pipeline.identity import profile_of
from utils.pruning.schedule import reprune_method


def protocol_record(protocol: EvalProtocol) -> dict:
    """How the perplexity was measured; `paper` is False for a quick look (--eval-windows);
    `wikitext2_test`: whether the text was WikiText-2's raw test text alone (a folder of any name
    holding wiki.test.raw is; sources.is_wikitext2_test)."""
    return {"source": protocol.source, "token_length": protocol.token_length, "stride": protocol.window_stride,
            "windows": protocol.windows, "paper": not protocol.quick,
            "wikitext2_test": is_wikitext2_test(protocol.source)}


def quick_note(protocol: EvalProtocol) -> str | None:
    """The line every summary of a quick look carries; None under the full protocol."""
    if not protocol.quick:
        return None
    return (f"QUICK LOOK (--eval-windows {protocol.windows}): perplexity over the first {protocol.windows} windows "
            "of the evaluation text, not the papers' protocol; not comparable with full-protocol numbers")


def run_record(context: Context, earlier_seconds: float = 0.0) -> dict:
    """The run's description for results.json; `earlier_seconds`: the wall time of the processes
    that ran it before a --resume."""
    config = context.config
    record = {"mode": config.mode, "model": config.model.name,
              "wall_seconds": round(earlier_seconds + time.monotonic() - context.started, 3)}
    if config.mode in ("prune", "train"):
        record.update(density=config.prune.density, method=config.prune.method,
                      layer_density=profile_of(config).tag,
                      pattern=list(config.prune.pattern) if config.prune.pattern else None)
    if config.mode == "train":
        train = config.train
        record.update(recipe=train.recipe, lr=train.lr, batch_size=train.batch_size, epochs_planned=train.epochs,
                      schedule_kind=context.schedule.kind, tokens_planned=train.total_steps * train.batch_size
                      * train.block_size, reprune_method=None if context.schedule.kind == "oneshot"
                      else reprune_method(config.schedule, config.prune.method))  # what the later prunes used
    if context.protocol is not None:
        record["protocol"] = protocol_record(context.protocol)
    return record
