"""Masks as explicit state: derived from the zeros, applied to every gradient, measured.

    masks = MaskSet.for_model(model)        # after pruning or loading a checkpoint
    masks.mask_in_backward()                # optional: before torch.compile traces the model
    loss.backward(); masks.mask_gradients() # before clipping: the norm is that of the kept weights
    optimizer.step()                        # AdamW keeps a weight that is 0 with gradient 0 at exactly 0
    report = sparsity_report(model)         # measured, never assumed

A pruned weight whose gradient is always 0 stays exactly 0 under AdamW: its moments stay 0, its
update is 0 / (0 + eps) and decoupled weight decay scales 0.  So masking the gradients is enough,
and it is also what makes gradient clipping see the gradient of the sparse model rather than one
dominated by the 90% of positions that are thrown away.  `violations()` checks the invariant.
Where the model is compiled, `mask_in_backward` puts the masks into the backward graph itself:
each weight gradient comes out of the kernel that casts it from bf16 to float32 already masked,
so the masks cost reading a byte per weight there, with no kernel or pass of their own
(measured on an H100: +2.0% a step for opt-1.3b, +2.7% for SmolLM2's shape, against 5.2% and
13.2% for a separate compiled pass over the gradients).

Masks are bool (a quarter of float32's memory) and work on plain tensors and on FSDP2's sharded
DTensor parameters alike: a mask is computed from the parameter itself, so it is sharded exactly
like the parameter, and masking is local.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from utils.models.sparsity import all_reduce_sum, any_sharded, local_part, nonzero_counts, replication
from utils.models.structure import prunable_linears


class MaskSet:
    """Keep-masks (True = kept, False = pruned) for named weights, by parameter name."""

    def __init__(self, params: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                 linears: dict[str, nn.Module] | None = None):
        self.names = list(params)
        self.linears = linears or {}  # parameter name → its nn.Linear, for mask_in_backward
        self.in_backward = False
        self.sharded = any_sharded(params.values())
        self._params = [params[n] for n in self.names]  # the parameters themselves: their .grad is what is masked
        self._local = [local_part(p) for p in self._params]
        self._masks = [local_part(masks[n]).bool() for n in self.names]
        self._compiled_multiply = None  # torch.compile'd _multiply, made on first use

    @classmethod
    @torch.no_grad()
    def from_zeros(cls, weights: dict[str, torch.Tensor], linears: dict[str, nn.Module] | None = None) -> "MaskSet":
        return cls(weights, {name: weight != 0 for name, weight in weights.items()}, linears)

    @classmethod
    def for_model(cls, model: nn.Module) -> "MaskSet":
        """Masks of the decoder linears' zeros, keyed by parameter name (`...q_proj.weight`)."""
        linears = {f"{name}.weight": linear for name, linear in prunable_linears(model).items()}
        return cls.from_zeros({name: linear.weight for name, linear in linears.items()}, linears)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def parameters(self) -> list[torch.Tensor]:
        """The masked parameters, in the order of `names`."""
        return self._params

    @property
    def keep(self) -> list[torch.Tensor]:
        """Their keep-masks (this process's part), in the order of `names`."""
        return self._masks

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the pruned weights themselves (after loading weights from elsewhere)."""
        if self._local:
            torch._foreach_mul_(self._local, self._masks)

    @torch.no_grad()
    def refresh(self) -> None:
        """Masks anew from the weights' zeros, in place (after pruning further): the buffers the
        compiled backward reads are these very tensors, so no recompilation is needed."""
        for mask, param in zip(self._masks, self._local):
            mask.copy_(param != 0)

    @torch.no_grad()
    def agree(self, src: int = 0) -> None:
        """Whole copies of one model in several processes (--parallel ddp) take process `src`'s masked
        weights after a prune that each computed on its own copy: one set of masks on every rank,
        whatever a kernel's rounding or a tie between equal magnitudes did.  Call before `refresh`."""
        if self.sharded or not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for param in self._local:
            dist.broadcast(param, src=src)

    @torch.no_grad()
    def mask_gradients(self, compiled: bool = False) -> None:
        """Zero the pruned weights' gradients: call after backward, before clipping and the step.
        `compiled`: one torch.compile'd multiply over all of them (a few fused kernels; eagerly,
        float32 gradients times bool masks launch a kernel per tensor, which a GPU step of a small
        model feels).  Nothing to do where `mask_in_backward` holds: the backward masked them."""
        if self.in_backward:
            return
        pairs = [(local_part(p.grad), m) for p, m in zip(self._params, self._masks) if p.grad is not None]
        if pairs:
            if compiled and self._compiled_multiply is None:
                self._compiled_multiply = torch.compile(_multiply)
            (self._compiled_multiply if compiled else _multiply)([g for g, _ in pairs], [m for _, m in pairs])

    def mask_in_backward(self) -> bool:
        """Make every masked linear's backward emit its weight gradient masked (class swapped to
        `GradientMaskedLinear`, the mask a non-persistent buffer: parameters, state dict keys and
        values stay the module's own).  For a model that torch.compile then traces: the multiply
        joins the gradient's cast.  False (and nothing changed) where that cannot be done: FSDP's
        sharded parameters, or masked weights that are not plain nn.Linear weights."""
        if self.sharded or not self.names or any(type(self.linears.get(n)) is not nn.Linear for n in self.names):
            return False
        for name, mask in zip(self.names, self._masks):
            linear = self.linears[name]
            linear.register_buffer("gradient_mask", mask, persistent=False)
            linear.__class__ = GradientMaskedLinear
        self.in_backward = True
        return True

    def release(self) -> None:
        """Undo `mask_in_backward`."""
        for linear in self.linears.values():
            if type(linear) is GradientMaskedLinear:
                linear.__class__ = nn.Linear
                del linear.gradient_mask
        self.in_backward = False

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Zero the optimizer's per-weight state (AdamW's moments) at pruned positions: with it
        zero, masked gradients keep pruned weights at zero (state from a run that did not mask its
        gradients has it non-zero there)."""
        for param, mask in zip(self._params, self._masks):
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and local_part(value).shape == mask.shape:
                    local_part(value).mul_(mask)

    @torch.no_grad()
    def violations(self) -> int:
        """How many pruned positions hold a non-zero value (0 while training is right), summed over ranks."""
        count = sum(int(torch.count_nonzero((p != 0) & ~m)) for p, m in zip(self._local, self._masks))
        total = int(all_reduce_sum(torch.tensor([count], dtype=torch.float64), self.sharded)[0])
        return total // replication(self._params)  # HSDP: each shard counted once, not once per machine

    def kept_fraction(self) -> float:
        kept = nonzero_counts([self._masks])[0]  # one host read, not one per mask
        total = sum(m.numel() for m in self._masks)
        counts = all_reduce_sum(torch.tensor([kept, total], dtype=torch.float64), self.sharded)
        return float(counts[0] / counts[1]) if counts[1] else 1.0


def _multiply(tensors: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    torch._foreach_mul_(tensors, masks)


class _MaskGradient(torch.autograd.Function):
    """The weight itself going forward; its gradient times the mask going back."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return grad * mask, None


class GradientMaskedLinear(nn.Linear):
    """An nn.Linear whose weight gradient comes out masked by its `gradient_mask` buffer (see
    `MaskSet.mask_in_backward`); forward values are the plain linear's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(input, _MaskGradient.apply(self.weight, self.gradient_mask), self.bias)


