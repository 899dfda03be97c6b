"""Masked recovery fine-tuning under FSDP2 (torch `fully_shard`), launched through accelerate.

    python extreme_compression_experiment.py --sparsity 0.1 --model opt-350m --batch-size 8   # 1 process
    accelerate launch --num_processes 2 extreme_compression_experiment.py ...                  # 2 GPUs

Every process count joins a process group (a single process a world-1 one), so evaluation,
checkpoints and masks run one code path; the model is sharded by `fully_shard` only across
processes (`prepare_model`; `--parallel ddp` instead keeps a whole copy per process and averages
gradients after backward), and on a GPU its training forward is compiled (`--compile`).
Pruned weights stay exactly zero because their gradients are masked before clipping and the
optimizer step (AdamW keeps a zero weight with zero gradient at zero; see utils/mask_utils.py):
inside the compiled backward where the plain module is compiled, otherwise after backward
(gradient hooks alone do not fire on FSDP's sharded parameters).  Every epoch checks it.
Each epoch is `max_step` optimizer steps of `batch_size` packed blocks; sample g of the run is
block perm_p[g mod n] with perm_p a seeded permutation per pass p, so the data order is a pure
function of the step and a resumed run continues it exactly.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo.exc import TorchDynamoException

from utils.data_utils import TokenizedText
from utils.eval_utils import PerplexityHistory, evaluate_and_log, evaluate_perplexity
from utils.logging_utils import MetricsLogger, describe_density
from utils.prepare_utils import (Prepared, average_gradients, compute_dtype, init_distributed, prepare_model,
                                 resolve_compile_mode, shard_model)
from utils.mask_utils import MaskSet, sparsity_report
from utils.prune_utils import density_tolerance
from utils.schedules import SparsitySchedule
from utils.state_utils import StopRequests, load_training_state, save_training_state
from utils.memory_utils import MemoryTracker


# The setup this loop runs on lives in utils/prepare_utils.py; its names stay importable from here.
__all__ = ["Optimization", "Prepared", "STOPPING_ERRORS", "TrainConfig", "TrainResult", "TrainState", "TrainingStopped",
           "average_gradients", "compute_dtype", "finetune", "init_distributed", "load_state", "make_scheduler",
           "prepare_model", "resolve_compile_mode", "save_state", "shard_model", "stop_message", "train_step"]


class TrainingStopped(RuntimeError):
    """Raised when a run must stop (NaN loss); the message says what was kept."""


@dataclass
class TrainConfig:
    epochs: int = 5
    max_step: int = 1250
    lr: float = 5e-6 * math.sqrt(8)
    batch_size: int = 8
    micro_batch_size: int = 8
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16 (fp16 gets dynamic loss scaling)
    compile_mode: str | None = None  # torch.compile mode the model was prepared with (None = eager)
    eval_compile: str = "off"  # evaluate_perplexity's compile level for the per-epoch evaluations
    patience: int | None = None
    min_delta: float = 0.0  # relative perplexity drop that counts as an improvement
    token_length: int = 2048
    stride: int = 2048
    eval_batch_size: int = 4
    log_every: int = 10
    output_dir: str = "runs/latest"
    resume: bool = False
    save_best: bool = True
    interrupt_after_steps: int | None = None  # testing: send this process `interrupt_signal` after this step
    interrupt_signal: str = "int"  # int (Ctrl-C) | term (what cluster schedulers send)
    identity: dict = field(default_factory=dict)  # what the run is (checked by --resume), saved with its state
    loss: str = "ce"  # the loss's name, for the log lines
    bos_id: int | None = None  # every evaluation window starts with this token (--bos-per-window)

    def evaluation(self) -> dict:
        """evaluate_and_log's protocol arguments for the evaluations made during training."""
        return dict(token_length=self.token_length, stride=self.stride, batch_size=self.eval_batch_size,
                    compile=self.eval_compile, bos_id=self.bos_id)


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resumed run needs."""
    global_step: int = 0
    epoch: int = 1  # the epoch in progress (1-based)
    epoch_loss_sum: float = 0.0
    epoch_batches: int = 0
    epoch_tokens: int = 0
    epoch_seconds: float = 0.0
    epoch_compile_steps: int = 0  # steps of the first log window after compiling (not the steady rate)
    epoch_compile_seconds: float = 0.0
    bad_epochs: int = 0
    history: dict = field(default_factory=dict)
    finished: bool = False


# --------------------------------------------------------------------------- setup (utils/prepare_utils.py)

def make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=fused)


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 to the peak lr over `warmup_steps`, then linear decay to zero at the
    last step (transformers' own schedule, the one its Trainer uses)."""
    from transformers import get_linear_schedule_with_warmup
    return get_linear_schedule_with_warmup(optimizer, warmup_steps, total_steps)


class BlockSampler:
    """Sample g of the run → block index, reshuffled every pass over the blocks."""

    def __init__(self, num_blocks: int, seed: int):
        self.num_blocks, self.seed = num_blocks, seed
        self._pass, self._perm = -1, None

    def block(self, sample: int) -> int:
        current = sample // self.num_blocks
        if current != self._pass:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + current)
            self._pass, self._perm = current, torch.randperm(self.num_blocks, generator=generator)
        return int(self._perm[sample % self.num_blocks])

    def micro_batch(self, step: int, micro: int, batch_size: int, micro_size: int, rank: int, world: int) -> list[int]:
        first = step * batch_size + micro * micro_size * world + rank * micro_size
        return [self.block(first + i) for i in range(micro_size)]


@dataclass
class Optimization:
    """What an optimizer step changes besides the weights; saved and restored as one."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None = None  # fp16 only

    @classmethod
    def create(cls, model: nn.Module, config: "TrainConfig", device: torch.device) -> "Optimization":
        optimizer = make_optimizer(model, config, device)
        scheduler = make_scheduler(optimizer, config.warmup_steps, config.epochs * config.max_step)
        # fp16 gradients underflow without loss scaling; GradScaler takes DTensors, so it serves
        # FSDP2 too.  bf16 and float32 need none.
        scaler = torch.amp.GradScaler(device.type) if config.mixed_precision == "fp16" else None
        return cls(optimizer, scheduler, scaler)

    def extra_state(self) -> dict:
        """Plain JSON values (no tensors): the schedule's position and the fp16 loss scale."""
        return {"scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_extra_state(self, extra: dict) -> None:
        self.scheduler.load_state_dict(extra["scheduler"])
        if self.scaler is not None and extra.get("scaler"):
            self.scaler.load_state_dict(extra["scaler"])


def train_step(prepared: Prepared, micro_batches: list[torch.Tensor], optimization: Optimization,
               masks: MaskSet | None, device: torch.device, max_grad_norm: float | None) -> torch.Tensor:
    """One optimizer step over `micro_batches` (gradient accumulation), the pruned weights'
    gradients masked before clipping.  With a GradScaler a step whose
    gradients overflowed is skipped and the scale lowered.  Returns the mean loss as a device
    tensor (no host sync without a scaler)."""
    optimizer, scheduler, scaler = optimization.optimizer, optimization.scheduler, optimization.scaler
    total = torch.zeros((), device=device, dtype=torch.float64)
    # CUDA-graph trees: the last step's graph outputs are done with.  Once per optimizer step, not
    # per micro-batch: gradients accumulating in .grad are outputs of the first backward's graph.
    torch.compiler.cudagraph_mark_step_begin()
    for batch in micro_batches:
        batch = batch.to(device, non_blocking=True)
        with prepared.precision():
            loss = prepared.forward(batch)  # the TrainingObjective: CE and/or distillation
        scaled = loss / len(micro_batches)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().double() / len(micro_batches)
    if prepared.replicas > 1:
        average_gradients(prepared.module)
    if scaler is not None:
        scaler.unscale_(optimizer)
    if masks is not None:
        masks.mask_gradients(compiled=prepared.compile_mode is not None)
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(prepared.module.parameters(), max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return total


# --------------------------------------------------------------------------- state on disk

def save_state(folder: Path, model: nn.Module, optimization: Optimization, state: TrainState,
               identity: dict) -> None:
    """Resumable state (utils/state_utils.py: safetensors + JSON, nothing pickled), written beside
    the previous one and swapped in only when complete."""
    save_training_state(folder, model, optimization.optimizer,
                        {"train_state": asdict(state), **optimization.extra_state(), "identity": identity})


def load_state(folder: Path, model: nn.Module, optimization: Optimization) -> TrainState:
    meta = load_training_state(folder, model, optimization.optimizer)
    optimization.load_extra_state(meta)
    return TrainState(**meta["train_state"])


def save_best_model(model: nn.Module, tokenizer, folder: Path, info: dict) -> None:
    """Gather the full weights (a collective) and let rank 0 write them atomically."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from utils.checkpoint_utils import save_pretrained_atomic
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        save_pretrained_atomic(model, tokenizer, folder, info=info, state_dict=full)
    dist.barrier()


# --------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    history: PerplexityHistory
    state: TrainState
    stopped_early: bool = False
    interrupted: bool = False
    error: str | None = None  # why the run stopped short (NaN loss, out of memory, compilation); best model kept


# Errors that end a run with a message and its results kept, instead of a traceback.
STOPPING_ERRORS = (torch.cuda.OutOfMemoryError, TorchDynamoException)


def stop_message(error: BaseException) -> str:
    """What went wrong and what to do about it, with the first line of the error itself."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return ("out of memory: lower --micro-batch-size (gradient accumulation keeps the effective batch), "
                "--block-size, --eval-batch-size or --token-length, or use more GPUs with accelerate launch "
                f"({first})")
    return (f"torch.compile failed ({type(error).__name__}: {first}); run again with --compile off "
            "(add --resume to continue from the last finished epoch)")


def finetune(prepared: Prepared, tokenizer, blocks: torch.Tensor, eval_tokens: TokenizedText, config: TrainConfig,
             density: float, logger: MetricsLogger, device: torch.device,
             history: PerplexityHistory, best_info: Callable[[], dict],
             holdout: torch.Tensor | None = None, schedule: SparsitySchedule | None = None,
             reprune: Callable[[float], None] | None = None) -> TrainResult:
    """Train the model (from `prepare_model`) for `config.epochs` epochs, evaluating after each
    on `eval_tokens` and, when given, on `holdout` (blocks of the training text it never trains on).
    `schedule` with `reprune(density)`: at each later stage's first step the model is pruned
    further in place and its masks and optimizer moments follow; an iterative stage also reports
    perplexity before and after."""
    model = prepared.module
    rank, world = dist.get_rank(), dist.get_world_size()
    micro = config.micro_batch_size
    accum = config.batch_size // (micro * world)
    if accum < 1 or accum * micro * world != config.batch_size:
        raise ValueError(f"batch size {config.batch_size} is not micro-batch {micro} × {world} processes × "
                         "a whole number of accumulation steps")
    output = Path(config.output_dir)
    state_dir, best_dir = output / "state", output / "best"
    # At density 1 nothing was pruned: weights that happen to be zero (quantized checkpoints have
    # some) are free to move, and there is nothing to re-apply.
    masks = MaskSet.for_model(model) if density < 1 else MaskSet({}, {})
    if prepared.compile_mode is not None and masks.mask_in_backward():  # released at the end
        logger.info("Gradient masks: in the compiled backward (each weight gradient comes out masked)")
    optimization = Optimization.create(model, config, device)
    total_steps = config.epochs * config.max_step
    state = TrainState(history=history.to_dict())
    # Dropout draws from the global generators: start them from the run's seed (what ran before in
    # this process, pruning or another run, must not decide them); a resumed run restores them.
    torch.manual_seed(config.seed * 1_000_003 + rank)
    if config.resume and (state_dir / "train_state.json").exists():
        state = load_state(state_dir, model, optimization)
        masks.refresh()  # the saved weights' zeros (an iterative run may be past its first stage)
        masks.mask_optimizer_state(optimization.optimizer)  # state saved by an older version may hold pruned moments
        history = PerplexityHistory.from_dict(state.history)
        now = f", measured {describe_density(masks.kept_fraction())}" if len(masks) else ""  # a stage's, past the first
        logger.info(f"Resumed from {state_dir}: epoch {state.epoch}, optimizer step {state.global_step} of "
                    f"{total_steps}{now}")
    sampler = BlockSampler(blocks.shape[0], config.seed)
    memory = MemoryTracker(device)
    # A finished state resumed (its results were not all written): nothing trains, the run delivers.
    result = TrainResult(history, state, stopped_early=state.finished and state.epoch <= config.epochs)
    logger.info(f"Training: {config.epochs} epochs × {config.max_step} steps, batch {config.batch_size} "
                f"= {micro} per micro-batch × {accum} accumulation × {world} processes, lr {config.lr:.3g}")
    tokens_per_step = config.batch_size * blocks.shape[1]
    window_loss = torch.zeros((), device=device, dtype=torch.float64)  # losses not yet folded into `state`
    window_steps, bar = 0, None
    compiling = config.compile_mode is not None  # this process's first log window compiles the model
    stop = StopRequests()
    try:
        while state.epoch <= config.epochs and not state.finished:
            epoch_end = state.epoch * config.max_step
            bar = logger.progress(config.max_step, f"Epoch {state.epoch}/{config.epochs}")
            bar.update(state.global_step - (state.epoch - 1) * config.max_step)
            model.train()
            tick = time.perf_counter()
            while state.global_step < epoch_end:
                stage = schedule.stage_starting_at(state.global_step) if schedule is not None else None
                if stage is not None:
                    with prepared.precision():
                        if schedule.evaluates_stages:
                            _next_stage(model, stage, reprune, masks, optimization, eval_tokens, config, logger, state)
                        else:
                            _prune_further(model, stage, reprune, masks, optimization, logger, state)
                micro_batches = [blocks[sampler.micro_batch(state.global_step, index, config.batch_size, micro,
                                                            rank, world)] for index in range(accum)]
                window_loss += train_step(prepared, micro_batches, optimization, masks, device,
                                          config.max_grad_norm)
                state.global_step += 1
                window_steps += 1
                if config.interrupt_after_steps and state.global_step == config.interrupt_after_steps:
                    _send_signal(config.interrupt_signal)
                stopping = stop.requested and world == 1  # several processes agree at the window's end
                if window_steps == config.log_every or state.global_step == epoch_end:
                    stopping = _flush_window(state, window_loss, window_steps, tokens_per_step,
                                             optimization.scheduler, logger, bar, tick, compiling, stop.requested)
                    compiling = False
                    tick = time.perf_counter()
                    window_loss.zero_()
                    window_steps = 0
                if stopping:
                    raise KeyboardInterrupt
            bar.close()
            with prepared.precision():
                if holdout is not None:
                    _evaluate_holdout(model, holdout, config, logger, state, blocks.shape[0])
                scheduled = schedule.density_at(state.global_step - 1) if schedule is not None else density
                _end_of_epoch(model, tokenizer, masks, eval_tokens, config, scheduled, logger, state, history,
                              memory, optimization, state_dir, best_dir, best_info, result)
            if result.stopped_early:
                break
    except TrainingStopped as error:  # weights may be NaN: keep the last good state and the best model
        result.error = str(error)
    except STOPPING_ERRORS as error:
        result.error = stop_message(error)
    except OSError as error:  # a full disk or a folder gone while saving state or the best model
        result.error = (f"could not write to {output}: {error.strerror or error} ({error.filename or ''}); "
                        "results.json and the last complete state are kept. Free space, then add --resume")
    except KeyboardInterrupt:
        result.interrupted = True
        if bar is not None:
            bar.close()
        if window_steps:  # steps finished since the last log line belong to the saved epoch average
            _flush_window(state, window_loss, window_steps, tokens_per_step, optimization.scheduler, logger, None,
                          time.perf_counter())
        logger.info(f"Interrupted at optimizer step {state.global_step}: saving resumable state to {state_dir} ...")
        state.history = history.to_dict()
        save_state(state_dir, model, optimization, state, config.identity)
        logger.info("Saved. Continue with the same command plus --resume.")
    finally:
        stop.close()
        masks.release()
    result.history, result.state = history, state
    return result


def _prune_further(model: nn.Module, density: float, reprune: Callable[[float], None], masks: MaskSet,
                   optimization: Optimization, logger: MetricsLogger, state: TrainState) -> float:
    """Prune the trained model in place to `density`: masks refreshed in place (the compiled
    backward reads these very buffers), the new zeros' optimizer moments cleared.  Returns the
    measured density; a gradual schedule's updates are recorded as events, not printed."""
    was_training = model.training
    model.eval()
    reprune(density)
    model.train(was_training)
    masks.agree()  # --parallel ddp: every copy pruned itself; all keep rank 0's masks
    masks.refresh()
    masks.mask_optimizer_state(optimization.optimizer)
    measured = sparsity_report(model).density
    logger.log({"event": "mask_update", "step": state.global_step, "epoch": state.epoch, "density": density,
                "measured_density": measured}, step=state.global_step)
    if abs(measured - density) > density_tolerance(model):
        logger.info(f"Warning: the prune at step {state.global_step} left {describe_density(measured)}, not the "
                    f"scheduled {density:.4g} (more than rounding); training goes on at the measured density. "
                    "This is a bug, please report it with the run's metrics.jsonl")
    return measured


def _next_stage(model: nn.Module, density: float, reprune: Callable[[float], None], masks: MaskSet,
                optimization: Optimization, eval_tokens: TokenizedText, config: TrainConfig, logger: MetricsLogger,
                state: TrainState) -> None:
    """Iterative pruning's stage boundary: perplexity at the end of the stage, prune to `density`
    (re-calibrated on the trained model), perplexity again."""
    evaluation = {**config.evaluation(), "step": state.global_step}
    before = evaluate_and_log(model, eval_tokens, logger, title=f"End of Stage (step {state.global_step})",
                              **evaluation)
    measured = _prune_further(model, density, reprune, masks, optimization, logger, state)
    after = evaluate_and_log(model, eval_tokens, logger, title=f"Pruned Further: Next Stage (step {state.global_step})",
                             density=density, **evaluation)
    logger.info(f"Stage at step {state.global_step}: {before.perplexity:.2f} → pruned to {describe_density(measured)} "
                f"→ {after.perplexity:.2f}")
    logger.log({"event": "stage", "step": state.global_step, "epoch": state.epoch, "density": density,
                "measured_density": measured, "perplexity_before": before.perplexity,
                "perplexity_after": after.perplexity}, step=state.global_step)


def _send_signal(name: str) -> None:
    """Testing hook: interrupt this process as a user (SIGINT) or a scheduler (SIGTERM) would."""
    import signal
    signal.raise_signal({"int": signal.SIGINT, "term": signal.SIGTERM}[name])  # handled before it returns


def _flush_window(state: TrainState, window_loss: torch.Tensor, steps: int, tokens_per_step: int, scheduler,
                  logger: MetricsLogger, bar, tick: float, compiling: bool = False, stop: bool = False) -> bool:
    """One host sync per `log_every` steps: loss bookkeeping, the NaN check, the log line.
    Returns whether any process asked to stop (one all-reduce carries the loss and that vote)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        packed = torch.stack([window_loss, torch.full_like(window_loss, float(stop))])
        dist.all_reduce(packed)
        window_loss, stop = packed[0] / dist.get_world_size(), bool(packed[1] > 0)
    total = float(window_loss)
    if not math.isfinite(total):
        raise TrainingStopped(f"the training loss became {total} by optimizer step {state.global_step}; "
                              "the best model so far is kept. Lower --lr or use --mixed-precision bf16 "
                              "instead of fp16")
    seconds = time.perf_counter() - tick
    tokens = steps * tokens_per_step
    state.epoch_tokens += tokens
    state.epoch_loss_sum += total
    state.epoch_batches += steps
    state.epoch_seconds += seconds
    if compiling:
        state.epoch_compile_steps += steps
        state.epoch_compile_seconds += seconds
    lr = scheduler.get_last_lr()[0]
    if bar is not None:
        bar.update(steps, loss=total / steps, lr=lr)
    logger.log({"event": "train", "step": state.global_step, "epoch": state.epoch, "loss": total / steps, "lr": lr,
                "seconds": seconds, "tokens_per_second": tokens / seconds if seconds else None},
               step=state.global_step)
    return stop


def _steady_rate(state: TrainState) -> float | None:
    """Tokens/s of the epoch without the window that compiled the model; None if none did."""
    steps, seconds = state.epoch_batches - state.epoch_compile_steps, state.epoch_seconds - state.epoch_compile_seconds
    if not state.epoch_compile_steps or steps <= 0 or seconds <= 0:
        return None
    return state.epoch_tokens * steps / state.epoch_batches / seconds


def _evaluate_holdout(model: nn.Module, holdout: torch.Tensor, config: TrainConfig, logger: MetricsLogger,
                      state: TrainState, train_blocks: int) -> None:
    """Loss on the held-out slice of the training text beside the training loss, and the passes
    made over the training text so far: a falling training loss with a rising held-out loss is
    memorization, seen without looking at the test set."""
    block = holdout.shape[1]
    result = evaluate_perplexity(model, holdout.reshape(-1), token_length=block, stride=block,
                                 batch_size=config.eval_batch_size, progress=False)
    train_loss = state.epoch_loss_sum / max(1, state.epoch_batches)
    passes = state.global_step * config.batch_size / train_blocks
    logger.info(f"Held-out training text ({holdout.numel():,} tokens): loss {result.mean_nll:.4f} "
                f"(perplexity {result.perplexity:.2f}) | training loss ({config.loss}) {train_loss:.4f} | "
                f"{passes:.1f} passes over the training text so far")
    logger.log({"event": "holdout", "epoch": state.epoch, "loss": result.mean_nll, "perplexity": result.perplexity,
                "train_loss": train_loss, "passes": passes}, step=state.global_step)


def _end_of_epoch(model, tokenizer, masks: MaskSet, eval_tokens, config: TrainConfig, density: float,
                  logger: MetricsLogger, state: TrainState, history: PerplexityHistory, memory: MemoryTracker,
                  optimization: Optimization, state_dir: Path, best_dir: Path, best_info: Callable[[], dict],
                  result: TrainResult) -> None:
    epoch = state.epoch
    violations = masks.violations()
    measured = sparsity_report(model)
    if violations:
        raise TrainingStopped(f"{violations} pruned weights are non-zero after epoch {epoch}: the masks were not "
                              "kept; this is a bug, please report it")
    average = state.epoch_loss_sum / max(1, state.epoch_batches)
    tokens_per_second = state.epoch_tokens / state.epoch_seconds if state.epoch_seconds else float("nan")
    steady = _steady_rate(state)
    rate = f"{tokens_per_second:,.0f} tokens/s" + (
        f" ({steady:,.0f} after the first {state.epoch_compile_steps} steps, which compiled)" if steady else "")
    snapshot = memory.snapshot()
    logger.info(f"Epoch {epoch} done: average loss {average:.4f} | {state.epoch_batches} batches processed | "
                f"{rate} | measured {describe_density(measured.density)}"
                + (f" (scheduled {density:.4g})" if abs(measured.density - density) > 1e-3 else ""))
    for line in snapshot.lines():
        logger.info(line)
    previous_best = history.best
    evaluation = evaluate_and_log(model, eval_tokens, logger, title=f"Evaluation After Epoch {epoch}", epoch=epoch,
                                  density=density, history=history, step=state.global_step, **config.evaluation())
    logger.log({"event": "epoch", "epoch": epoch, "average_loss": average, "batches": state.epoch_batches,
                "tokens_per_second": tokens_per_second, "steady_tokens_per_second": steady or tokens_per_second,
                "measured_density": measured.density, "scheduled_density": density,
                "perplexity": evaluation.perplexity, **snapshot.to_dict()}, step=state.global_step)
    eligible = epoch >= history.final_from  # iterative pruning: earlier epochs hold more weights than asked
    improved = eligible and (previous_best is None or evaluation.perplexity < previous_best[1] * (1 - config.min_delta))
    if improved and config.save_best:
        save_best_model(model, tokenizer, best_dir, {**best_info(), "epoch": epoch,
                                                     "perplexity": evaluation.perplexity})
        logger.info(f"Best model so far saved to {best_dir}")
    state.bad_epochs = 0 if improved or not eligible else state.bad_epochs + 1
    if config.patience is not None and state.bad_epochs >= config.patience:
        logger.info(f"Early stopping: perplexity has not improved for {state.bad_epochs} epoch(s) "
                    f"(--patience {config.patience})")
        result.stopped_early = True
        state.finished = True
    state.epoch += 1
    state.epoch_loss_sum, state.epoch_batches, state.epoch_tokens, state.epoch_seconds = 0.0, 0, 0, 0.0
    state.epoch_compile_steps, state.epoch_compile_seconds = 0, 0.0
    if state.epoch > config.epochs:
        state.finished = True
    state.history = history.to_dict()
    save_state(state_dir, model, optimization, state, config.identity)
