"""A run's training text: --train-source → token stream → training and held-out blocks → the
budget in passes over it, with the memorization warning.

    ids = read_training_text("a.txt,generated:1M", tokenizer, spec, dense, model_key, device, logger)
    blocks, holdout = training_blocks(ids, block_size=512, holdout=0.05, bos=None)
    report_budget(ids, blocks, holdout, config.train, memorization_passes(config.loss), logger)

Held-out blocks are the tail of the text (other documents, not neighbours of training blocks),
never trained on and evaluated every epoch, so memorization shows without the test set.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch

from utils.config.sections import TrainCfg
from utils.data.generated import GenerationSpec, generated_text, split_sources
from utils.data.sources import TokenizedText, pack_blocks, tokenize_source, with_bos
from utils.io.events import count

def read_training_text(train_source: str, tokenizer, spec: GenerationSpec | None,
                       dense: Callable[[], torch.nn.Module] | None, model_key: str, device: torch.device | None,
                       logger, first: Callable = nullcontext) -> TokenizedText:
    """The token stream of --train-source: its files and datasets, then the text the dense model
    samples for a `generated:N` part (`spec`; `dense()` loads that model when it must sample).
    `first`: a context in which one process reads (and samples) before the others read its cache."""
    rest, _ = split_sources(train_source)
    with first():
        streams = [tokenize_source(rest, tokenizer, split="train")] if rest else []
        if spec is not None:
            streams.append(generated_text(spec, dense, tokenizer, model_key, device, logger))
    if len(streams) == 1:
        return streams[0]
    return TokenizedText(torch.cat([s.ids for s in streams]), sum(s.num_bytes for s in streams), train_source)


def split_holdout(blocks: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training blocks, held-out blocks): the last `fraction` of the blocks, at least one, kept
    out of training (the tail of the text: other documents, not neighbours of training blocks)."""
    count = round(blocks.shape[0] * fraction) if fraction > 0 else 0
    if count == 0 and fraction > 0 and blocks.shape[0] >= 2:
        count = 1
    if count == 0:
        return blocks, None
    return blocks[:-count], blocks[-count:]


def training_blocks(text: TokenizedText, block_size: int, holdout: float,
                    bos: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Blocks of `block_size` tokens (BOS first when `bos` is given), the held-out tail split off."""
    text_block = block_size - 1 if bos is not None else block_size
    return split_holdout(with_bos(pack_blocks(text.ids, text_block), bos), holdout)


def report_budget(text: TokenizedText, blocks: torch.Tensor, holdout: torch.Tensor | None, train: TrainCfg,
                  memorizes_after: float, logger) -> float:
    """Print the text, the budget and its passes over the text (warning past `memorizes_after`
    passes, the loss's bound), record the `budget` event; returns the passes in all."""
    block_size, fraction = blocks.shape[1], train.holdout
    held = f"; {holdout.shape[0]:,} held out ({fraction:.0%}), evaluated every epoch" if holdout is not None else ""
    logger.info(f"Training text: {text.ids.numel():,} tokens → {blocks.shape[0]:,} blocks of {block_size}{held}")
    per_epoch = train.max_step * train.batch_size / blocks.shape[0]
    total = per_epoch * train.epochs
    tokens = train.epochs * train.max_step * train.batch_size * block_size
    logger.info(f"Budget: {train.epochs} epochs × {train.max_step} steps × {train.batch_size} blocks = "
                f"{count(tokens)} tokens = {per_epoch:.3g} passes over the training text per epoch, {total:.3g} in "
                "all (the time it takes is estimated after the first steps)")
    logger.log({"event": "budget", "train_tokens": int(blocks.numel()), "passes_per_epoch": per_epoch,
                "passes": total, "holdout_tokens": int(holdout.numel()) if holdout is not None else 0})
    if total > memorizes_after:
        distill = "" if memorizes_after > 4 else ", or distill (--loss kd: it memorizes later)"
        logger.info(f"Warning: {total:.0f} passes over {blocks.numel():,} tokens; models trained this long on this "
                    "little text memorize it (its training loss falls while perplexity elsewhere rises). Add text "
                    f"(--train-source a.txt,b.raw,folder/), lower --max-step or --epochs{distill}, "
                    "and watch the held-out loss")
    return total
