"""One optimizer step and what it needs: AdamW with its lr schedule, the data order, the step itself.

    optimization = Optimization.create(model, train, device)       # AdamW, warmup + linear decay, fp16 scaler
    optimization.cool_down(start=step, steps=200)                   # --cooldown-steps: the lr to 0 from here
    sampler = BlockSampler(num_blocks, seed)                        # sample g of the run → block index
    loss = train_step(prepared, micro_batches, optimization, masks, device, max_grad_norm=1.0)

Pruned weights stay exactly zero because their gradients are masked before clipping and the
optimizer step (AdamW keeps a zero weight with zero gradient at zero; see masks.py).  Each epoch
is `max_step` optimizer steps of `batch_size` packed blocks; sample g of the run is block
perm_p[g mod n] with perm_p a seeded permutation per pass p, so the data order is a pure function
of the step and a resumed run continues it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from utils.config.sections import TrainCfg
from utils.training.masks import MaskSet
from utils.training.parallel import Prepared


def make_optimizer(model: nn.Module, train: TrainCfg, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.95), fused=fused)


@dataclass
class LrPlan:
    """The lr factor before optimizer step `step`: linear warmup from 0 to 1 over `warmup` steps, then
    linear decay to 0 at `total` (the numbers of transformers' get_linear_schedule_with_warmup, the
    schedule its Trainer uses).  A cool-down (--patience with --cooldown-steps) takes the factor the
    plan had at `cool_from` linearly to 0 at `cool_to`: the run's schedule then ends where it stops.
    A callable object, not a function, so that LambdaLR's state_dict carries these fields (plain
    numbers) and a resumed run continues its cool-down."""
    warmup: int
    total: int
    cool_from: int | None = None
    cool_to: int | None = None

    def planned(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        return max(0.0, (self.total - step) / max(1, self.total - self.warmup))

    def __call__(self, step: int) -> float:
        if self.cool_from is None or step < self.cool_from:
            return self.planned(step)
        return self.planned(self.cool_from) * max(0.0, (self.cool_to - step) / max(1, self.cool_to - self.cool_from))


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """LrPlan's schedule (warmup, linear decay to zero at the last step) as a LambdaLR."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, LrPlan(warmup_steps, total_steps))


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
    def create(cls, model: nn.Module, train: TrainCfg, device: torch.device) -> "Optimization":
        """AdamW and its lr schedule for `train` (its mixed_precision resolved: "no", "bf16" or "fp16")."""
        optimizer = make_optimizer(model, train, device)
        scheduler = make_scheduler(optimizer, train.warmup_steps, train.total_steps)
        # fp16 gradients underflow without loss scaling; GradScaler takes DTensors, so it serves
        # FSDP2 too.  bf16 and float32 need none.
        scaler = torch.amp.GradScaler(device.type) if train.mixed_precision == "fp16" else None
        return cls(optimizer, scheduler, scaler)

    def cool_down(self, start: int, steps: int) -> None:
        """From optimizer step `start` on, the lr falls linearly to 0 over `steps` steps."""
        plan = self.scheduler.lr_lambdas[0]  # one LrPlan for every parameter group
        plan.cool_from, plan.cool_to = start, start + steps

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
    exchange = prepared.exchange
    for index, batch in enumerate(micro_batches):
        if exchange is not None:  # --parallel ddp, eager: the last backward starts the exchange as it goes
            exchange.arm(last=index == len(micro_batches) - 1)
        batch = batch.to(device, non_blocking=True)
        with prepared.precision():
            loss = prepared.forward(batch)  # the TrainingObjective: CE and/or distillation
        scaled = loss / len(micro_batches)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach().double() / len(micro_batches)
    if exchange is not None:
        exchange.finish()
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
