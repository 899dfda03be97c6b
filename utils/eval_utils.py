"""Perplexity the way the SparseGPT/Wanda papers measure it, fast, and on any number of processes.

    ids = tokenize_source("../shared/data/wikitext-2-raw", tokenizer, split="test")
    result = evaluate_perplexity(model, ids, token_length=2048, stride=2048, batch_size=8)
    print(result.perplexity, result.bits_per_byte, result.accuracy)

Protocol.  stride == token_length (the papers'): non-overlapping windows, the tail that does not
fill a window is dropped, every window scores its last token_length-1 tokens.  stride <
token_length (Hugging Face's sliding-window rule): windows start every `stride` tokens, each
scores only the tokens no earlier window scored, with its full left context, so every token but
the first is scored exactly once.  Perplexity = exp(total NLL / tokens scored); with equal
windows that is exp(mean of per-window mean losses), the papers' formula.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from torch._dynamo.exc import TorchDynamoException
from torch._inductor.custom_graph_pass import CustomGraphPass

from .data_utils import DataError, TokenizedText
from .logging_utils import MetricsLogger, Progress, describe_density
from .model_utils import ModelError, find_decoder_layers

COMPILE_LEVELS = ("off", "scoring", "layers")


@dataclass(frozen=True)
class Window:
    begin: int  # first token of the input
    end: int  # one past the last token of the input
    score_from: int  # first position (within the window) whose token is scored; >= 1


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    bits_per_byte: float
    accuracy: float
    windows: int
    tokens: int  # tokens in the text
    scored_tokens: int
    seconds: float

    def summary(self) -> str:
        return (f"Perplexity: {self.perplexity:.4f} | bits/byte {self.bits_per_byte:.4f} | "
                f"next-token accuracy {self.accuracy * 100:.2f}% | {self.windows} windows, "
                f"{self.tokens:,} tokens ({self.seconds:.1f} s)")


def plan_windows(num_tokens: int, token_length: int, stride: int) -> list[Window]:
    if token_length < 2:
        raise ValueError(f"token_length must be at least 2, got {token_length}")
    if not 0 < stride <= token_length:
        raise ValueError(f"stride must be in 1..token_length ({token_length}), got {stride}")
    if num_tokens < token_length:
        raise DataError(f"the evaluation text has {num_tokens:,} tokens, fewer than one window of "
                        f"{token_length}; use a longer text or a smaller --token-length")
    if stride == token_length:
        return [Window(i * token_length, (i + 1) * token_length, 1) for i in range(num_tokens // token_length)]
    windows, previous_end = [], 0
    for begin in range(0, num_tokens, stride):
        end = min(begin + token_length, num_tokens)
        target_length = end - previous_end
        windows.append(Window(begin, end, max(1, (end - begin) - target_length)))
        previous_end = end
        if end == num_tokens:
            break
    return windows


def _batches(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Consecutive windows of one length per batch (only the sliding rule's last one is shorter)."""
    batches: list[list[Window]] = []
    for window in windows:
        length = window.end - window.begin
        if batches and len(batches[-1]) < batch_size and batches[-1][0].end - batches[-1][0].begin == length:
            batches[-1].append(window)
        else:
            batches.append([window])
    return batches


def _same_start(batch: list[Window]) -> list[list[int]]:
    """Runs of consecutive rows that score from the same position: one loss call each."""
    runs: list[list[int]] = []
    for row, window in enumerate(batch):
        if runs and batch[runs[-1][0]].score_from == window.score_from:
            runs[-1].append(row)
        else:
            runs.append([row])
    return runs


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward_logits(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits  # (batch, seq, vocab)


def _token_stats(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (float32) and whether the target has the top score (the argmax, but for exact
    ties), for (..., vocab) scores in the model's dtype.  logsumexp − target logit is cross-entropy
    without writing log-probs; compiled, the maximum that logsumexp needs anyway answers the
    accuracy too, so the logits are read in one pass and nothing of their size is written."""
    wide = scores.float()
    target = wide.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(wide, dim=-1) - target, target == wide.amax(-1)


_compiled_token_stats = None
_compiled_layer_forwards: dict[tuple[type, bool], object] = {}


def _stats_function(compile: bool):
    global _compiled_token_stats
    if not compile:
        return _token_stats
    if _compiled_token_stats is None:
        _compiled_token_stats = torch.compile(_token_stats)
    return _compiled_token_stats


class FuseLinearReLU(CustomGraphPass):
    """Inductor pass: relu(addmm(bias, x, w)) → aten._addmm_activation, so that bias and ReLU run in
    the GEMM's epilogue (cuBLASLt on a GPU) instead of a pointwise pass that reads and writes the
    (tokens × ffn) activations once more: OPT's fc1, 3-4% of an evaluation.  Inductor leaves them
    unfused by itself (it splits the bias out of addmm to fuse it with the ReLU).  On a CPU, or where
    cuBLASLt cannot take the shapes, _addmm_activation computes addmm then ReLU: the same values."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        aten = torch.ops.aten
        for relu in list(graph.find_nodes(op="call_function", target=aten.relu.default)):
            source = relu.args[0]
            if source.target in (aten.view.default, aten.reshape.default) and len(source.users) == 1:
                source = source.args[0]  # a 3-D linear: addmm on the flattened tokens, viewed back
            if (getattr(source, "target", None) is aten.addmm.default and len(source.users) == 1 and not source.kwargs
                    and getattr(source.args[0], "meta", {}).get("val") is not None
                    and source.args[0].meta["val"].dim() == 1):
                source.target = aten._addmm_activation.default
                relu.replace_all_uses_with(relu.args[0])
                graph.erase_node(relu)

    def uuid(self) -> str:
        return "extreme-compression.FuseLinearReLU.1"


def _layer_forward(kind: type, fuse_relu: bool = True):
    """The torch.compile'd forward shared by every decoder layer of class `kind` (`fuse_relu`: a
    ReLU after a linear runs in the GEMM's epilogue, FuseLinearReLU)."""
    key = (kind, fuse_relu)
    if key not in _compiled_layer_forwards:
        options = {"post_grad_custom_pre_pass": FuseLinearReLU()} if fuse_relu else None
        _compiled_layer_forwards[key] = torch.compile(kind.forward, dynamic=False, options=options)
    return _compiled_layer_forwards[key]


@contextlib.contextmanager
def _compiled_layers(model: torch.nn.Module, fuse_relu: bool = True):
    """Run every decoder layer through one torch.compile'd forward per layer class while inside
    (regional compilation: the layers share the compiled code, so 24 layers compile once; the
    causal mask is still made eagerly outside, which keeps SDPA on its flash kernel).  Nothing
    stays on the model.  A model whose layers FSDP compiled already, or with no layer list, runs as it is."""
    try:
        _, layers = find_decoder_layers(model)
    except ModelError:
        layers = []
    if hasattr(model, "reshard") or any(getattr(layer, "_compiled_call_impl", None) for layer in layers):
        layers = []
    for layer in layers:
        layer.forward = functools.partial(_layer_forward(type(layer), fuse_relu), layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, tokens: TokenizedText | torch.Tensor, token_length: int = 2048,
                        stride: int = 2048, batch_size: int = 1, progress: bool = True,
                        desc: str = "Computing perplexity", distributed: bool = True,
                        compile: bool | str = "off", fuse_relu: bool = True,
                        bos_id: int | None = None) -> PerplexityResult:
    """Perplexity, bits per byte and next-token accuracy of `model` on `tokens` (see module doc).

    Under torch.distributed the batches are dealt round-robin to the ranks and the sums are
    all-reduced; every rank runs the same number of forwards (padding with a zero-weight batch)
    so that FSDP's collectives stay in step.  `distributed=False` evaluates every window in this
    process alone (a model only one rank holds, e.g. while the main process prunes).
    `compile`: "off"; "scoring" (or True) scores the logits with a torch.compile'd kernel; "layers"
    also runs the decoder layers compiled (once per layer class and window shape; worth it for
    large models evaluated often; `fuse_relu=False` leaves OPT's ReLU out of the GEMM epilogue,
    for benchmarks).  Compiling the whole model is its owner's choice.
    `bos_id`: every window starts with this token (families such as Gemma need it): windows hold
    token_length - 1 tokens of text after it, all of them scored; the text's own leading BOS is
    dropped.  None keeps the papers' protocol (one BOS at the start of the whole text).
    """
    ids = tokens.ids if isinstance(tokens, TokenizedText) else tokens
    num_bytes = tokens.num_bytes if isinstance(tokens, TokenizedText) else None
    ids = ids.reshape(-1)
    if bos_id is not None:
        ids = ids[1:] if ids.numel() and int(ids[0]) == bos_id else ids
        token_length, stride = token_length - 1, min(stride, token_length - 1)
    windows = plan_windows(ids.numel(), token_length, stride)
    batches = _batches(windows, batch_size)
    grouped = distributed and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    mine = batches[rank::world]
    rounds = math.ceil(len(batches) / world)
    device = _model_device(model)
    level = {True: "scoring", False: "off"}.get(compile, compile)
    if level not in COMPILE_LEVELS:
        raise ValueError(f"compile must be one of {COMPILE_LEVELS}, got {compile!r}")
    token_stats = _stats_function(level != "off")
    layers = contextlib.ExitStack()  # holds the compiled decoder layers while evaluating; closing restores them
    if level == "layers":
        layers.enter_context(_compiled_layers(model, fuse_relu))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    # float64 sums: 300k token losses summed in float32 lose the 4th significant digit.
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, scored tokens, correct
    bar = Progress(len(windows), desc, enabled=progress and rank == 0)
    on_device = ids.to(device)  # once; each batch is then a slice on the device
    bos = torch.full((1,), bos_id, dtype=ids.dtype, device=device) if bos_id is not None else None
    try:
        for index in range(rounds):
            batch = mine[index] if index < len(mine) else batches[0]
            weight = 1.0 if index < len(mine) else 0.0
            input_ids = torch.stack([on_device[w.begin:w.end] if bos is None else torch.cat([bos, on_device[w.begin:w.end]])
                                     for w in batch])
            # The last batch's logits are consumed: a model its owner compiled with CUDA graphs may reuse them.
            torch.compiler.cudagraph_mark_step_begin()
            try:
                logits = _forward_logits(model, input_ids)
            except TorchDynamoException as error:  # compiling is an optimization: evaluate eagerly
                if level != "layers":
                    raise
                warnings.warn(f"compiled decoder layers failed ({type(error).__name__}); evaluating eagerly",
                              stacklevel=2)
                layers.close()
                level = "scoring"
                logits = _forward_logits(model, input_ids)
            for rows in _same_start(batch):
                first = batch[rows[0]].score_from
                if bos is not None:  # text shifted by one; the window's first token is predicted from the BOS
                    first = (0 if first == 1 else first) + 1
                scores = logits[rows[0]:rows[-1] + 1, first - 1:-1]  # (rows, scored, vocab), model dtype
                targets = input_ids[rows[0]:rows[-1] + 1, first:]
                try:
                    nll, correct = token_stats(scores, targets)  # per token, summed in float64 here
                except TorchDynamoException as error:  # compiling is an optimization: score eagerly
                    if token_stats is _token_stats:
                        raise
                    warnings.warn(f"compiled scoring failed ({type(error).__name__}); scoring eagerly", stacklevel=2)
                    token_stats = _token_stats
                    nll, correct = token_stats(scores, targets)
                totals[0] += weight * nll.double().sum()
                totals[1] += weight * targets.numel()
                totals[2] += weight * correct.sum().double()
            del logits
            bar.update(len(batch) * world if index < len(mine) else 0)
    finally:
        layers.close()
        bar.close()
        model.train(was_training)
        if hasattr(model, "reshard"):
            # FSDP2 keeps the root unsharded after a forward that has no backward; give the
            # optimizer back the sharded parameters it holds.
            model.reshard()
    if world > 1:
        dist.all_reduce(totals)
    nll, scored, correct = totals.tolist()
    mean_nll = nll / scored
    scored_bytes = num_bytes * scored / ids.numel() if num_bytes else float("nan")
    return PerplexityResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll,
                            bits_per_byte=nll / math.log(2) / scored_bytes if num_bytes else float("nan"),
                            accuracy=correct / scored, windows=len(windows), tokens=ids.numel(),
                            scored_tokens=int(scored), seconds=time.perf_counter() - start)


def _banner(title: str) -> str:
    rule = "=" * 64
    return f"{rule}\n{title}\n{rule}"


@dataclass
class PerplexityHistory:
    """Perplexity over a run: the baseline, one entry per epoch, the trend and the summary."""

    baseline: float | None = None
    dense: float | None = None
    epochs: list[tuple[int, float]] = field(default_factory=list)
    final_from: int = 0  # first epoch at the final density (iterative pruning: earlier ones hold more weights)

    def add(self, epoch: int, perplexity: float) -> None:
        self.epochs = [(e, p) for e, p in self.epochs if e != epoch] + [(epoch, perplexity)]

    @property
    def best(self) -> tuple[int, float] | None:
        """(epoch, perplexity) of the best evaluation; epoch 0 is the baseline."""
        candidates = ([(0, self.baseline)] if self.baseline is not None else []) + self.epochs
        finite = [(e, p) for e, p in candidates if math.isfinite(p) and e >= self.final_from]
        return min(finite, key=lambda item: item[1]) if finite else None

    @property
    def final(self) -> float | None:
        return self.epochs[-1][1] if self.epochs else self.baseline

    @staticmethod
    def change(before: float, after: float) -> str:
        """'↓5.9%' when perplexity fell, '↑2.0%' when it rose."""
        if not (math.isfinite(before) and math.isfinite(after)) or before == 0:
            return "n/a"
        delta = (after - before) / before * 100
        return f"{'↓' if delta <= 0 else '↑'}{abs(delta):.1f}%"

    def trend_lines(self) -> list[str]:
        lines = []
        if self.dense is not None:
            lines.append(f"Dense model: {self.dense:.2f}")
        if self.baseline is not None:
            lines.append(f"Baseline (pruned, before training): {self.baseline:.2f}")
        for epoch, ppl in self.epochs:
            trend = f" ({self.change(self.baseline, ppl)})" if self.baseline is not None else ""
            lines.append(f"Epoch {epoch}: {ppl:.2f}{trend}")
        return lines

    def summary_lines(self) -> list[str]:
        lines = [_banner("Final Summary")]
        if self.dense is not None:
            lines.append(f"Dense perplexity:    {self.dense:.4f}")
        if self.baseline is not None:
            lines.append(f"Baseline perplexity: {self.baseline:.4f}")
        if self.final is not None:
            lines.append(f"Final perplexity:    {self.final:.4f}")
        best = self.best
        if best is not None:
            where = "baseline" if best[0] == 0 else f"epoch {best[0]}"
            lines.append(f"Best perplexity:     {best[1]:.4f} ({where})")
        if self.baseline is not None and self.final is not None:
            drop = self.baseline - self.final
            lines.append(f"Total improvement:   {self.change(self.baseline, self.final)} "
                         f"({abs(drop):.4f} {'lower' if drop >= 0 else 'higher'} than the baseline)")
        return lines

    def to_dict(self) -> dict:
        best = self.best
        return {"dense": self.dense, "baseline": self.baseline, "final": self.final, "final_from": self.final_from,
                "epochs": [{"epoch": e, "perplexity": p} for e, p in self.epochs],
                "best": {"epoch": best[0], "perplexity": best[1]} if best else None}

    @classmethod
    def from_dict(cls, data: dict) -> "PerplexityHistory":
        return cls(baseline=data.get("baseline"), dense=data.get("dense"), final_from=int(data.get("final_from", 0)),
                   epochs=[(int(e["epoch"]), float(e["perplexity"])) for e in data.get("epochs", [])])


def evaluate_and_log(model: torch.nn.Module, tokens: TokenizedText, logger: MetricsLogger, *, title: str,
                     token_length: int, stride: int, batch_size: int, epoch: int | None = None,
                     density: float | None = None, history: PerplexityHistory | None = None,
                     step: int | None = None, distributed: bool = True, compile: bool | str = "off",
                     bos_id: int | None = None) -> PerplexityResult:
    """Evaluate, print the block (and the trend when `history` is given), record the event."""
    result = evaluate_perplexity(model, tokens, token_length=token_length, stride=stride,
                                 batch_size=batch_size, progress=logger.is_main, distributed=distributed,
                                 compile=compile, bos_id=bos_id)
    logger.info(_banner(title))
    if epoch is not None:
        logger.info(f"Epoch: {epoch}")
    if density is not None:
        logger.info(f"Sparsity: {describe_density(density)}")
    logger.info(result.summary())
    if history is not None and epoch is not None:
        history.add(epoch, result.perplexity)
        logger.info("Perplexity trend:")
        for line in history.trend_lines():
            logger.info(f"  {line}")
    logger.log({"event": "evaluation", "title": title, "epoch": epoch, **asdict(result)}, step=step)
    return result
