"""--parallel ddp's gradient exchange: every process holds a whole copy, and after each step's
backward its gradients are averaged over the processes in flat buckets (one collective per bucket,
not one per tensor).

    exchange = GradientExchange(module, overlap=True)
    for index, batch in enumerate(micro_batches):
        exchange.arm(last=index == len(micro_batches) - 1)
        loss(batch).backward()          # overlapped: a bucket's all-reduce starts once its gradients are in
    exchange.finish()                   # the rest started, all awaited, averaged in place

Overlapped (eager training): a hook on every parameter counts its bucket's gradients in during the
last micro-batch's backward and starts that bucket's all-reduce at once, so the exchange of the
last layers runs while the backward computes the first ones (the buckets are filled in reverse
order of the parameters, the order a backward produces them).  Compiled training (torch.compile,
CUDA graphs) produces every gradient at the end of one graph: there is nothing to overlap, and the
buckets are started together after it.  Autograd visits the parameters in the same order in every
process, so the collectives are issued in the same order everywhere.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

OVERLAP_BUCKET = 1 << 22  # values a bucket while overlapping (16 MB of float32: early starts)
AFTER_BUCKET = 1 << 26  # values a bucket after the backward (fewer, larger collectives)


class GradientExchange:
    def __init__(self, module: nn.Module, overlap: bool):
        self.world, self.overlap = dist.get_world_size(), overlap
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = list(buckets(params[::-1], OVERLAP_BUCKET if overlap else AFTER_BUCKET))
        self.bucket_of = {id(p): index for index, bucket in enumerate(self.buckets) for p in bucket}
        self.arrived: list[set[int]] = [set() for _ in self.buckets]
        self.started: dict[int, tuple] = {}
        self.armed = False
        self.hooks = [p.register_post_accumulate_grad_hook(self._arrived) for p in params] if overlap else []

    def arm(self, last: bool) -> None:
        """Before a micro-batch's backward: only the last one's gradients are final.  Arming starts
        afresh (a step that raised half-way left nothing behind)."""
        self.armed = self.overlap and last
        if last:
            self.arrived = [set() for _ in self.buckets]
            self.started.clear()

    def _arrived(self, param: torch.Tensor) -> None:
        if not self.armed:
            return
        index = self.bucket_of[id(param)]
        self.arrived[index].add(id(param))  # a set: a hook that fires twice counts once
        if len(self.arrived[index]) == len(self.buckets[index]) and index not in self.started:
            self._start(index)

    def _start(self, index: int) -> None:
        grads = [p.grad for p in self.buckets[index] if p.grad is not None]
        flat = torch.cat([grad.reshape(-1) for grad in grads]) if grads else None
        work = dist.all_reduce(flat, async_op=True) if flat is not None else None  # SUM: gloo has no AVG
        self.started[index] = (work, flat, grads)

    def finish(self) -> None:
        """Start the buckets not started yet (in order), wait for all, and put the averages in place."""
        for index in range(len(self.buckets)):
            if index not in self.started:
                self._start(index)
        for index in range(len(self.buckets)):
            work, flat, grads = self.started[index]
            if work is None:
                continue
            work.wait()
            flat.div_(self.world)
            torch._foreach_copy_(grads, [part.view_as(grad) for part, grad in
                                         zip(flat.split([grad.numel() for grad in grads]), grads)])
        self.started.clear()
        self.arrived = [set() for _ in self.buckets]
        self.armed = False

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def buckets(tensors: list[torch.Tensor], limit: int):
    """Consecutive runs of one dtype and at most `limit` values (a larger tensor alone)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for tensor in tensors:
        if bucket and (size + tensor.numel() > limit or tensor.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(tensor)
        size += tensor.numel()
    if bucket:
        yield bucket
