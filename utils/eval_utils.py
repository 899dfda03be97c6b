"""Perplexity the way the SparseGPT/Wanda papers measure it, fast, and on any number of processes.

    ids = tokenize_source("../shared/data/wikitext-2-raw", tokenizer, split="test")
    result = evaluate_perplexity(model, ids, EvalProtocol(token_length=2048, stride=2048, batch_size=8))
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
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch._dynamo.exc import TorchDynamoException
from torch._inductor.custom_graph_pass import CustomGraphPass

from utils.config.sections import EvalProtocol
from utils.data.sources import DataError, TokenizedText
from utils.io.events import MetricsLogger, Progress, banner, describe_density
from utils.io.history import PerplexityHistory
from utils.models.hub import ModelError
from utils.models.structure import find_decoder_layers

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
    total_windows: int | None = None  # the text's windows when only the first `windows` were scored

    @property
    def quick(self) -> bool:
        return self.total_windows is not None and self.windows < self.total_windows

    def summary(self) -> str:
        return (f"Perplexity: {self.perplexity:.4f} | bits/byte {self.bits_per_byte:.4f} | "
                f"next-token accuracy {self.accuracy * 100:.2f}% | {self.windows} windows, "
                f"{self.tokens:,} tokens ({self.seconds:.1f} s)" + (f"\n{quick_label(self.windows, self.total_windows)}"
                                                                   if self.quick else ""))


def quick_label(windows: int, total: int) -> str:
    """What every quick-look number carries: it is not the papers' protocol."""
    return (f"QUICK LOOK (--eval-windows): the first {windows} of the text's {total} windows, not the papers' "
            "protocol; not comparable with full-protocol numbers")


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


def score_tokens(scores: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL (float32) and whether the target has the top score (the argmax, but for exact
    ties), for (..., vocab) scores in the model's dtype.  logsumexp − target logit is cross-entropy
    without writing log-probs; compiled, the maximum that logsumexp needs anyway answers the
    accuracy too, so the logits are read in one pass and nothing of their size is written."""
    wide = scores.float()
    target = wide.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return torch.logsumexp(wide, dim=-1) - target, target == wide.amax(-1)


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


class CompiledKernels:
    """The torch.compile'd pieces of evaluation, made on first use and kept by their owner (a run
    evaluates every epoch; each compiles once): the scoring kernel over the logits, and one
    decoder-layer forward per layer class (`fuse_relu`: a ReLU after a linear runs in the GEMM's
    epilogue, FuseLinearReLU)."""

    def __init__(self):
        self._scoring = None
        self._layer_forwards: dict[tuple[type, bool], object] = {}

    def token_stats(self):
        if self._scoring is None:
            self._scoring = torch.compile(score_tokens)
        return self._scoring

    def layer_forward(self, kind: type, fuse_relu: bool = True):
        key = (kind, fuse_relu)
        if key not in self._layer_forwards:
            options = {"post_grad_custom_pre_pass": FuseLinearReLU()} if fuse_relu else None
            self._layer_forwards[key] = torch.compile(kind.forward, dynamic=False, options=options)
        return self._layer_forwards[key]


@contextlib.contextmanager
def _compiled_layers(model: torch.nn.Module, kernels: CompiledKernels, fuse_relu: bool = True):
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
        layer.forward = functools.partial(kernels.layer_forward(type(layer), fuse_relu), layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def evaluate_perplexity(model: torch.nn.Module, tokens: TokenizedText | torch.Tensor,
                        protocol: EvalProtocol = EvalProtocol(), *, kernels: CompiledKernels | None = None,
                        progress: bool = True, desc: str = "Computing perplexity", distributed: bool = True,
                        fuse_relu: bool = True) -> PerplexityResult:
    """Perplexity, bits per byte and next-token accuracy of `model` on `tokens` (see module doc),
    by `protocol`: windows of `token_length` tokens every `stride` (None: token_length), batches of
    `batch_size` windows.

    Under torch.distributed the batches are dealt round-robin to the ranks and the sums are
    all-reduced; every rank runs the same number of forwards (padding with a zero-weight batch)
    so that FSDP's collectives stay in step.  `distributed=False` evaluates every window in this
    process alone (a model only one rank holds, e.g. while the main process prunes).
    `protocol.compile`: "off"; "scoring" scores the logits with a torch.compile'd kernel; "layers"
    also runs the decoder layers compiled (once per layer class and window shape; worth it for
    large models evaluated often; `fuse_relu=False` leaves OPT's ReLU out of the GEMM epilogue,
    for benchmarks); the compiled pieces are `kernels`' (a fresh set when None).  Compiling the
    whole model is its owner's choice.
    `protocol.bos_id`: every window starts with this token (families such as Gemma need it):
    windows hold token_length - 1 tokens of text after it, all of them scored; the text's own
    leading BOS is dropped.  None keeps the papers' protocol (one BOS at the start of the whole text).
    """
    token_length, stride, bos_id = protocol.token_length, protocol.window_stride, protocol.bos_id
    ids = tokens.ids if isinstance(tokens, TokenizedText) else tokens
    num_bytes = tokens.num_bytes if isinstance(tokens, TokenizedText) else None
    ids = ids.reshape(-1)
    if bos_id is not None:
        ids = ids[1:] if ids.numel() and int(ids[0]) == bos_id else ids
        token_length, stride = token_length - 1, min(stride, token_length - 1)
    windows = plan_windows(ids.numel(), token_length, stride)
    total_windows = len(windows)
    windows = windows[:protocol.windows] if protocol.windows else windows
    grouped = distributed and dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if grouped else (0, 1)
    device = _model_device(model)
    level = protocol.compile
    if level not in COMPILE_LEVELS:
        raise ValueError(f"compile must be one of {COMPILE_LEVELS}, got {level!r}")
    kernels = kernels if kernels is not None or level == "off" else CompiledKernels()
    token_stats = kernels.token_stats() if level != "off" else score_tokens
    layers = contextlib.ExitStack()  # holds the compiled decoder layers while evaluating; closing restores them
    if level == "layers":
        layers.enter_context(_compiled_layers(model, kernels, fuse_relu))
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    # float64 sums: 300k token losses summed in float32 lose the 4th significant digit.
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # nll, scored tokens, correct
    batches = _batches(windows, protocol.batch_size)
    mine = batches[rank::world]
    rounds = math.ceil(len(batches) / world)
    bar = Progress(len(windows), desc, enabled=progress and rank == 0, unit="windows")
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
                    if token_stats is score_tokens:
                        raise
                    warnings.warn(f"compiled scoring failed ({type(error).__name__}); scoring eagerly", stacklevel=2)
                    token_stats = score_tokens
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
    covered = windows[-1].end - windows[0].begin  # tokens of the text the scored windows span
    scored_bytes = num_bytes * scored / ids.numel() if num_bytes else float("nan")
    return PerplexityResult(perplexity=math.exp(mean_nll), mean_nll=mean_nll,
                            bits_per_byte=nll / math.log(2) / scored_bytes if num_bytes else float("nan"),
                            accuracy=correct / scored, windows=len(windows),
                            tokens=ids.numel() if len(windows) == total_windows else covered,
                            scored_tokens=int(scored), seconds=time.perf_counter() - start,
                            total_windows=total_windows if len(windows) < total_windows else None)


@dataclass(frozen=True)
class Heading:
    """How one evaluation is printed and recorded: its title and where in the run it stands."""
    title: str
    epoch: int | None = None
    density: float | None = None
    step: int | None = None


def evaluate_and_log(model: torch.nn.Module, tokens: TokenizedText, logger: MetricsLogger, heading: Heading,
                     protocol: EvalProtocol, *, history: PerplexityHistory | None = None,
                     kernels: CompiledKernels | None = None, distributed: bool = True) -> PerplexityResult:
    """Evaluate, print the block (and the trend when `history` is given), record the event."""
    result = evaluate_perplexity(model, tokens, protocol, kernels=kernels, progress=logger.is_main,
                                 distributed=distributed)
    logger.info(banner(heading.title))
    if heading.epoch is not None:
        logger.info(f"Epoch: {heading.epoch}")
    if heading.density is not None:
        logger.info(f"Sparsity: {describe_density(heading.density)}")
    logger.info(result.summary())
    if history is not None and heading.epoch is not None:
        history.add(heading.epoch, result.perplexity)
        logger.info("Perplexity trend:")
        for line in history.trend_lines():
            logger.info(f"  {line}")
    logger.log({"event": "evaluation", "title": heading.title, "epoch": heading.epoch, **asdict(result)},
               step=heading.step)
    return result
