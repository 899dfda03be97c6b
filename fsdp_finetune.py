"""Masked recovery fine-tuning under FSDP2 (torch `fully_shard`), launched through accelerate.

    python extreme_compression_experiment.py --sparsity 0.1 --model opt-350m --batch-size 8   # 1 process
    accelerate launch --num_processes 2 extreme_compression_experiment.py ...                  # 2 GPUs

    result = Trainer(job, train, logger, callbacks=[...]).fit()    # what utils/pipeline/train.py calls

The loop reads top to bottom: `setup` (optimizer, masks, a resumed state), then epochs of `step`
(one optimizer step, a schedule's stage entered where one begins), each closed by `end_epoch`
(held-out loss, perplexity, best model, saved state).  Every process count joins a process group
(a single process a world-1 one), so evaluation, checkpoints and masks run one code path; the
model is sharded by `fully_shard` only across processes (utils/training/parallel.py).  Pruned
weights stay exactly zero because their gradients are masked before clipping and the optimizer
step (utils/training/masks.py), and every epoch checks it.  A Ctrl-C or SIGTERM stops at the end
of a whole step and saves resumable state.  Callbacks see the trainer after every step (tests
interrupt a run there, as a user would).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError

from utils.config.sections import EvalProtocol, TrainCfg
from utils.data.sources import TokenizedText
from utils.eval_utils import CompiledKernels, Heading, evaluate_and_log, evaluate_perplexity
from utils.io.events import MetricsLogger, describe_density
from utils.io.history import PerplexityHistory
from utils.io.memory import MemoryTracker
from utils.models.sparsity import sparsity_report
from utils.pruning.schedule import SparsitySchedule
from utils.training.masks import MaskSet
from utils.training.parallel import Prepared
from utils.training.progress import LogCadence, estimate_line
from utils.training.reprune import prune_in_place
from utils.training.stopping import (STOPPING_ERRORS, Patience, TrainingStopped, TrainResult, check_finite,
                                     stop_message)
from utils.training.state import StopRequests, TrainState, load_state, save_best_model, save_state
from utils.training.step import BlockSampler, Optimization, train_step


@dataclass
class TrainingJob:
    """What the pipeline hands the loop: the prepared model and its data, how it is measured, and
    where its state goes."""
    prepared: Prepared
    tokenizer: object
    blocks: torch.Tensor  # (blocks, block_size) training blocks
    holdout: torch.Tensor | None  # held-out blocks of the training text, evaluated every epoch
    eval_tokens: TokenizedText
    protocol: EvalProtocol  # the per-epoch evaluation (bos and compile resolved)
    schedule: SparsitySchedule
    reprune: Callable[[float], None] | None  # prunes the model in place to a density (later stages)
    identity: dict  # what the run is (checked by --resume), saved with its state
    best_info: Callable[[], dict]  # pruning.json of the best model
    history: PerplexityHistory
    output: Path
    loss_kind: str = "ce"  # the loss's name, for the held-out line
    resume: bool = False
    save_best: bool = True
    kernels: CompiledKernels | None = None
    compiles: bool = False  # training compiles (its first log window is not the steady rate)
    started: float = 0.0  # when this process began the run (time.monotonic), for its wall time
    save_dtype: torch.dtype = torch.float32  # best/'s weights (--save-dtype)
    eval_seconds: float | None = None  # how long one evaluation took (the baseline), for the time estimate


class Callback(Protocol):
    def on_step_end(self, trainer: "Trainer") -> None: ...
    # optional: on_epoch_end(trainer), after an epoch's state is saved (utils/pipeline/train.py draws curves.png there)


class Trainer:
    """Train `job.prepared` for `train.epochs` epochs, evaluating after each on `job.eval_tokens`
    and, when given, on `job.holdout`.  At each later stage of `job.schedule` the model is pruned
    further in place (`job.reprune`) and its masks and optimizer moments follow; an iterative
    stage also reports perplexity before and after."""

    def __init__(self, job: TrainingJob, train: TrainCfg, logger: MetricsLogger, callbacks=()):
        self.job, self.train, self.logger, self.callbacks = job, train, logger, list(callbacks)
        self.model = job.prepared.module
        self.device = next(self.model.parameters()).device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.micro = train.micro_batch_size or max(1, train.batch_size // self.world)
        self.accumulation = train.batch_size // (self.micro * self.world)
        if self.accumulation < 1 or self.accumulation * self.micro * self.world != train.batch_size:
            raise ValueError(f"batch size {train.batch_size} is not micro-batch {self.micro} × {self.world} "
                             "processes × a whole number of accumulation steps")
        self.state_dir, self.best_dir = job.output / "state", job.output / "best"
        self.history = job.history
        self.state = TrainState(history=self.history.to_dict())
        self.stop: StopRequests | None = None
        self.cadence = LogCadence(train.log_every, self.world)
        self.patience = Patience.from_config(train)
        self.estimated, self.last_eval_seconds = False, job.eval_seconds
        self.holdout_seconds = 0.0  # the last held-out pass's time (0: none yet in this process)
        self.evaluating = False  # inside an epoch's evaluation: its training is whole (_save_evaluated)

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        job, train = self.job, self.train
        # At density 1 nothing was pruned: weights that happen to be zero (quantized checkpoints have
        # some) are free to move, and there is nothing to re-apply.
        self.masks = MaskSet.for_model(self.model) if job.schedule.final < 1 else MaskSet({}, {})
        if job.prepared.compile_mode is not None and self.masks.mask_in_backward():  # released at the end
            self.logger.info("Gradient masks: in the compiled backward (each weight gradient comes out masked)")
        self.optimization = Optimization.create(self.model, train, self.device)
        # Dropout draws from the global generators: start them from the run's seed (what ran before in
        # this process, pruning or another run, must not decide them); a resumed run restores them.
        torch.manual_seed(train.seed * 1_000_003 + self.rank)
        if job.resume and (self.state_dir / "train_state.json").exists():
            self._resume()
        self.sampler = BlockSampler(job.blocks.shape[0], train.seed)
        self.memory = MemoryTracker(self.device)
        # A finished state resumed (its results were not all written): nothing trains, the run delivers.
        self.result = TrainResult(self.history, self.state,
                                  stopped_early=self.state.stopped_early(train.epochs),
                                  earlier_seconds=self.state.timings.get("wall_seconds", 0.0))
        self.logger.report(f"Training: {train.epochs} epochs × {train.max_step} steps, batch {train.batch_size} "
                           f"= {self.micro} per micro-batch × {self.accumulation} accumulation × {self.world} "
                           f"process{'es' if self.world > 1 else ''}, lr {train.lr:.3g}",
                           {"event": "training", "micro_batch_size": self.micro, "accumulation": self.accumulation,
                            "processes": self.world})
        self.window_loss = torch.zeros((), device=self.device, dtype=torch.float64)  # not yet folded into state
        self.window_steps, self.bar = 0, None
        self.compiling = job.compiles  # this process's first log window compiles

    def _resume(self) -> None:
        self.state = load_state(self.state_dir, self.model, self.optimization)
        self.masks.refresh()  # the saved weights' zeros (an iterative run may be past its first stage)
        self.masks.mask_optimizer_state(self.optimization.optimizer)  # older states may hold pruned moments
        self.history = PerplexityHistory.from_dict(self.state.history)
        now = f", measured {describe_density(self.masks.kept_fraction())}" if len(self.masks) else ""
        self.logger.report(f"Resumed from {self.state_dir}: epoch {self.state.epoch}, optimizer step "
                           f"{self.state.global_step} of {self.train.total_steps}{now}",
                           {"event": "resumed", "epoch": self.state.epoch, "step": self.state.global_step})

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        self.setup()
        self.stop = StopRequests()
        try:
            while self.state.epoch <= self.train.epochs and not self.state.finished:
                self._run_epoch()
                self.end_epoch()
                if self.result.stopped_early:
                    break
        except TrainingStopped as error:  # weights may be NaN: keep the last good state and the best model
            self.result.error = str(error)
        except STOPPING_ERRORS as error:
            self.result.error = stop_message(error, self._save_evaluated())
        except (OSError, SafetensorError) as error:  # a full disk or a folder gone while saving state or the best model
            self.result.error = (f"could not write to {self.job.output}: {getattr(error, 'strerror', None) or error} "
                                 f"({getattr(error, 'filename', None) or ''}); results.json and the last complete "
                                 "state are kept. Free space, then add --resume")
        except KeyboardInterrupt:
            self._save_interrupted()
        finally:
            self.stop.close()
            self.masks.release()
            if self.job.prepared.exchange is not None:  # its hooks leave the module with the loop
                self.job.prepared.exchange.close()
        self.result.history, self.result.state = self.history, self.state
        return self.result

    def _run_epoch(self) -> None:
        state, train = self.state, self.train
        epoch_end = min(state.epoch * train.max_step, state.stop_at_step or train.total_steps)  # a cool-down ends early
        self.bar = self.logger.progress(train.max_step, f"Epoch {state.epoch}/{train.epochs}", unit="steps",
                                        initial=state.global_step - (state.epoch - 1) * train.max_step)
        self.model.train()
        self.tick = time.perf_counter()
        while state.global_step < epoch_end:
            self.step()
            stopping = self.stop.requested and self.world == 1  # several processes agree at the window's end
            if self.cadence.due(self.window_steps, time.perf_counter() - self.tick, self.compiling) or \
                    state.global_step == epoch_end:
                stopping = self._flush_window(self.bar)
            if stopping:
                raise KeyboardInterrupt
        self.bar.close()

    def step(self) -> None:
        """One optimizer step (a schedule's stage entered first where one begins), then the callbacks."""
        stage = self.job.schedule.stage_starting_at(self.state.global_step)
        if stage is not None:
            self.enter_stage(stage)
        batches = [self.job.blocks[self.sampler.micro_batch(self.state.global_step, index, self.train.batch_size,
                                                             self.micro, self.rank, self.world)]
                   for index in range(self.accumulation)]
        self.window_loss += train_step(self.job.prepared, batches, self.optimization, self.masks, self.device,
                                       self.train.max_grad_norm)
        self.state.global_step += 1
        self.window_steps += 1
        for callback in self.callbacks:
            callback.on_step_end(self)

    def enter_stage(self, density: float) -> None:
        """A schedule's later stage: the model pruned further to `density`; iterative stages are
        evaluated before and after."""
        with self.job.prepared.precision():
            if not self.job.schedule.evaluates_stages:
                prune_in_place(self.model, density, self.job.reprune, self.masks, self.optimization, self.logger,
                               self.state)
                return
            step = self.state.global_step
            before = self._evaluate(Heading(f"End of Stage (step {step})", step=step))
            measured = prune_in_place(self.model, density, self.job.reprune, self.masks, self.optimization,
                                      self.logger, self.state)
            after = self._evaluate(Heading(f"Pruned Further: Next Stage (step {step})", density=density, step=step))
        self.logger.info(f"Stage at step {step}: {before.perplexity:.2f} → pruned to {describe_density(measured)} "
                         f"→ {after.perplexity:.2f}")
        self.logger.log({"event": "stage", "step": step, "epoch": self.state.epoch, "density": density,
                         "measured_density": measured, "perplexity_before": before.perplexity,
                         "perplexity_after": after.perplexity}, step=step)

    def _evaluate(self, heading: Heading, history: PerplexityHistory | None = None):
        return evaluate_and_log(self.model, self.job.eval_tokens, self.logger, heading, self.job.protocol,
                                history=history, kernels=self.job.kernels)

    def _flush_window(self, bar) -> bool:
        """One host sync per log window (LogCadence): loss bookkeeping, the NaN check, the log line.
        Returns whether any process asked to stop (one all-reduce carries the loss and that vote)."""
        state, window_loss, stop = self.state, self.window_loss, bool(self.stop.requested)
        if self.world > 1:
            packed = torch.stack([window_loss, torch.full_like(window_loss, float(stop))])
            dist.all_reduce(packed)
            window_loss, stop = packed[0] / self.world, bool(packed[1] > 0)
        total, steps = check_finite(float(window_loss), state.global_step), self.window_steps
        seconds = time.perf_counter() - self.tick
        tokens = steps * self.train.batch_size * self.job.blocks.shape[1]
        state.epoch_tokens += tokens
        state.epoch_loss_sum += total
        state.epoch_batches += steps
        state.epoch_seconds += seconds
        state.add_seconds("training_seconds", seconds)
        if not self.compiling and not self.estimated and bar is not None:
            self._estimate(seconds / steps)
        if self.compiling:
            state.epoch_compile_steps += steps
            state.epoch_compile_seconds += seconds
        lr = self.optimization.scheduler.get_last_lr()[0]
        if bar is not None:
            bar.update(steps, loss=total / steps, lr=lr)
        self.logger.log({"event": "train", "step": state.global_step, "epoch": state.epoch, "loss": total / steps,
                         "lr": lr, "seconds": seconds, "tokens_per_second": tokens / seconds if seconds else None},
                        step=state.global_step)
        self.compiling, self.tick, self.window_steps = False, time.perf_counter(), 0
        self.window_loss.zero_()
        return stop

    def _estimate(self, seconds_per_step: float) -> None:
        """Once a process, after its first window that did not compile: the time left."""
        self.estimated = True
        remaining = self.train.total_steps - self.state.global_step
        evaluations = self.train.epochs - self.state.epoch + 1
        line, event = estimate_line(seconds_per_step, remaining, evaluations, self.last_eval_seconds,
                                    holdout_untimed=self.job.holdout is not None and not self.holdout_seconds)
        self.logger.report(line, event)

    def _save_state(self) -> None:
        self.state.history = self.history.to_dict()
        self.state.timings["wall_seconds"] = self.result.earlier_seconds + time.monotonic() - self.job.started
        save_state(self.state_dir, self.model, self.optimization, self.state, self.job.identity)

    def _save_evaluated(self) -> int | None:
        """An error in an epoch's evaluation (out of memory) leaves its training whole: saved as Ctrl-C
        saves it, --resume evaluates that epoch without training it again. The epoch saved, or None."""
        if not self.evaluating or self.world > 1:  # several processes: the save is collective, one may have failed
            return None
        try:
            self._save_state()
        except (OSError, SafetensorError, *STOPPING_ERRORS):
            return None
        return self.state.epoch

    def _save_interrupted(self) -> None:
        self.result.interrupted = True
        if self.bar is not None:
            self.bar.close()
        if self.window_steps:  # steps finished since the last log line belong to the saved epoch average
            self._flush_window(None)
        self.logger.info(f"Interrupted at optimizer step {self.state.global_step}: saving resumable state to "
                         f"{self.state_dir} ...")
        self._save_state()
        self.logger.info("Saved. Continue with the same command plus --resume.")

    # ------------------------------------------------------------------ end of epoch

    def end_epoch(self) -> None:
        """Held-out loss, the mask check, perplexity with its trend, the best model, the saved state."""
        state, train, job = self.state, self.train, self.job
        self.holdout_record, self.holdout_seconds = {}, 0.0
        self.evaluating = True
        with job.prepared.precision():
            if job.holdout is not None:
                self._evaluate_holdout()
            density = job.schedule.density_at(state.global_step - 1)
            measured, memory = self._report_epoch(density)
            previous_best = self.history.best
            evaluation = self._evaluate(Heading(f"Evaluation After Epoch {state.epoch}", epoch=state.epoch,
                                                density=density, step=state.global_step), history=self.history)
        self.evaluating = False
        self.logger.log({"event": "epoch", "epoch": state.epoch, **measured, "scheduled_density": density,
                         "perplexity": evaluation.perplexity, **memory}, step=state.global_step)
        eligible = state.epoch >= self.history.final_from  # earlier epochs of a schedule hold more weights
        improved = eligible and (previous_best is None or
                                 evaluation.perplexity < previous_best[1] * (1 - train.min_delta))
        if improved and job.save_best:
            save_best_model(self.model, job.tokenizer, self.best_dir,
                            {**job.best_info(), "epoch": state.epoch, "perplexity": evaluation.perplexity},
                            dtype=job.save_dtype)
            self.logger.info(f"Best model so far saved to {self.best_dir}")
        if state.stop_at_step is None and \
                self.patience.exhausted(state, eligible, improved, self.holdout_record.get("holdout_loss")):
            self._stop_short()
        if state.stop_at_step is not None and state.global_step >= state.stop_at_step:  # the cool-down is over
            self.result.stopped_early, state.finished = True, True
        self.history.details[state.epoch] = {"train_loss": measured["average_loss"], "accuracy": evaluation.accuracy,
                                             "bits_per_byte": evaluation.bits_per_byte, **self.holdout_record}
        # the time left, once more after the first epoch: now with the held-out evaluation's time too
        self.last_eval_seconds, self.estimated = evaluation.seconds + self.holdout_seconds, state.epoch > 1
        state.add_seconds("evaluation_seconds", evaluation.seconds + self.holdout_seconds)
        state.next_epoch()
        state.finished = state.finished or state.epoch > train.epochs
        self._save_state()
        for callback in self.callbacks:
            getattr(callback, "on_epoch_end", lambda trainer: None)(self)

    def _stop_short(self) -> None:
        """Patience ran out: stop now, or cool down first (the lr to 0 over --cooldown-steps)."""
        state, patience = self.state, self.patience
        steps = min(patience.cooldown_steps, self.train.total_steps - state.global_step)
        if steps:  # else the run stops now: end_epoch sees stop_at_step reached
            self.optimization.cool_down(state.global_step, steps)
        state.stop_at_step = state.global_step + steps
        self.logger.report(patience.stop_line(state.bad_epochs, self.holdout_record, steps),
                           {"event": "early_stopping", "watched": patience.watch, "bad_epochs": state.bad_epochs,
                            "step": state.global_step, "cooldown_steps": steps})

    def _report_epoch(self, density: float) -> tuple[dict, dict]:
        """The mask check and the epoch's lines: loss, rate, measured density; memory."""
        state = self.state
        violations = self.masks.violations()
        measured = sparsity_report(self.model)
        if violations:
            raise TrainingStopped(f"{violations} pruned weights are non-zero after epoch {state.epoch}: the masks "
                                  "were not kept; this is a bug, please report it")
        average = state.epoch_loss_sum / max(1, state.epoch_batches)
        tokens_per_second = state.epoch_tokens / state.epoch_seconds if state.epoch_seconds else float("nan")
        steady = state.steady_rate()
        rate = f"{tokens_per_second:,.0f} tokens/s" + (
            f" ({steady:,.0f} after the first {state.epoch_compile_steps} steps, which compiled)" if steady else "")
        snapshot = self.memory.snapshot()
        self.logger.info(f"Epoch {state.epoch} done: average loss {average:.4f} | {state.epoch_batches} batches "
                         f"processed | {rate} | measured {describe_density(measured.density)}"
                         + (f" (scheduled {density:.4g})" if abs(measured.density - density) > 1e-3 else ""))
        for line in snapshot.lines():
            self.logger.info(line)
        self.logger.log(measured.event(epoch=state.epoch, step=state.global_step), track=False)
        return ({"average_loss": average, "batches": state.epoch_batches, "tokens_per_second": tokens_per_second,
                 "steady_tokens_per_second": steady or tokens_per_second, "measured_density": measured.density},
                snapshot.to_dict())

    def _evaluate_holdout(self) -> None:
        """Loss on the held-out slice of the training text beside the training loss, and the passes
        made over the training text so far: a falling training loss with a rising held-out loss is
        memorization, seen without looking at the test set."""
        holdout, state = self.job.holdout, self.state
        block = holdout.shape[1]
        result = evaluate_perplexity(self.model, holdout.reshape(-1),
                                     EvalProtocol(token_length=block, stride=block,
                                                  batch_size=self.job.protocol.batch_size),
                                     progress=self.logger.is_main, desc="Held-out loss")
        self.holdout_seconds = result.seconds  # counted in state once the epoch's evaluation is whole
        train_loss = state.epoch_loss_sum / max(1, state.epoch_batches)
        passes = state.global_step * self.train.batch_size / self.job.blocks.shape[0]
        kind = self.job.loss_kind
        beside = (f"training cross-entropy {train_loss:.4f}" if kind == "ce" else
                  f"training loss {train_loss:.4f} ({kind}: not a cross-entropy on the text, not comparable)")
        self.logger.info(f"Held-out training text ({holdout.numel():,} tokens): cross-entropy {result.mean_nll:.4f} "
                         f"(perplexity {result.perplexity:.2f}) | {beside} | {passes:.3g} passes over the "
                         "training text so far")
        self.holdout_record = {"holdout_loss": result.mean_nll, "holdout_perplexity": result.perplexity}
        self.logger.log({"event": "holdout", "epoch": state.epoch, "step": state.global_step, "loss": result.mean_nll,
                         "perplexity": result.perplexity, "train_loss": train_loss, "passes": passes},
                        step=state.global_step)
