"""Per-family quirks, one row per transformers `model_type`: what the tool must do differently for a
family, found by its config rather than by per-family code paths.

    family_of(model.config).bos_per_window      # True for Gemma: a BOS at the start of every window
    bos_per_window("auto", model.config, tokenizer)   # → the BOS id, or None (the papers' protocol)

A new quirk is a field here with its default, and a row for each family that has it.  Quirks found
by structure need no row: GPT-2's transposed Conv1D linears (utils/models/structure.py), fused
mixture-of-experts tensors (refused there), tied LM heads (the state dict's shared storage).
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.models.hub import ModelError


@dataclass(frozen=True)
class Family:
    # Trained with a BOS at the start of every sequence: without it their perplexity is far off
    # (a Gemma model measured 60.8 on packed windows against 22.4 with a BOS in each).
    bos_per_window: bool = False


PLAIN = Family()
FAMILIES: dict[str, Family] = {
    "gemma": Family(bos_per_window=True),
    "gemma2": Family(bos_per_window=True),
    "gemma3": Family(bos_per_window=True),
    "gemma3_text": Family(bos_per_window=True),
    "recurrent_gemma": Family(bos_per_window=True),
}


def family_of(model_config) -> Family:
    return FAMILIES.get(getattr(model_config, "model_type", ""), PLAIN)


def bos_per_window(requested: str, model_config, tokenizer) -> int | None:
    """--bos-per-window → the BOS id every evaluation window, calibration window and training
    block starts with, or None (the papers' protocol for OPT and Llama: one BOS for the whole text)."""
    family = getattr(model_config, "model_type", "")
    wanted = requested == "on" or (requested == "auto" and family_of(model_config).bos_per_window)
    if not wanted:
        return None
    if tokenizer.bos_token_id is None:
        raise ModelError(f"--bos-per-window {requested}: the tokenizer of this {family or 'model'} has no BOS "
                         "token; run with --bos-per-window off")
    return int(tokenizer.bos_token_id)
