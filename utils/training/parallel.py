"""A model ready to train: the process group, the compile mode, FSDP2 sharding or whole copies,
the training objective compiled as one graph, and --parallel ddp's gradient exchange.

    init_distributed(device)                       # a world-1 group when not launched by accelerate
    mode, why = resolve_compile_mode("auto", device, shards=1)
    prepared = prepare_model(model, device, "bf16", mode, "fsdp", teacher=None, loss=LossCfg())
    loss = prepared.forward(input_ids)             # what fsdp_finetune.train_step calls

The training loop itself is `fsdp_finetune.py`.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from utils.models.hub import ModelError
from utils.models.structure import find_decoder_layers
from utils.config.sections import LossCfg
from utils.training.exchange import GradientExchange
from utils.training.losses import TrainingObjective


class MainFirst:
    """The main process does a block first (prunes, samples text, tokenizes into the cache), the
    others then do it (read what it wrote), like accelerate's `main_process_first`, but the others
    wait on the process group's key-value store instead of inside a barrier: a barrier is a
    collective, bounded by the group's timeout (--dist-timeout), and a SparseGPT prune of a large
    model takes longer.  The wait is bounded by `wait` instead.  If the main process fails inside
    the block, the others stop with a message instead of waiting for it.

        first = MainFirst(accelerator.is_main_process, world)
        with first():
            model = load_or_prune()
    """

    def __init__(self, is_main: bool, world: int, wait: timedelta = timedelta(hours=24), run: str = ""):
        self.is_main, self.world, self.wait, self.run = is_main, world, wait, run
        # Every process enters the same blocks in the same order (none is entered by one rank only,
        # none nests): the count names each; `run` (rank 0's, broadcast) keeps two runs of one
        # process group apart.
        self.blocks = 0

    @contextlib.contextmanager
    def __call__(self):
        if self.world == 1:
            yield
            return
        self.blocks += 1
        key = f"extreme-compression/{self.run}/main-first/{self.blocks}"
        store = dist.distributed_c10d._get_default_store()
        if self.is_main:
            try:
                yield
            except BaseException:
                store.set(key, "failed")
                raise
            store.set(key, "done")
            return
        store.wait([key], self.wait)
        if store.get(key) != b"done":
            raise RuntimeError("the main process failed in a step the others wait for (pruning, sampling or "
                               "tokenizing); its message says why")
        yield


def init_distributed(device: torch.device) -> None:
    """accelerate starts the process group under `accelerate launch`; a single process gets a
    world-1 group so that FSDP2 and the evaluation's all-reduce run unchanged."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    store = tempfile.NamedTemporaryFile(prefix="extreme-compression-pg-", delete=False)
    store.close()
    os.unlink(store.name)  # FileStore wants a path that does not exist yet
    dist.init_process_group(backend, init_method=Path(store.name).as_uri(), rank=0, world_size=1,
                            device_id=device if backend == "nccl" else None)


def resolve_compile_mode(requested: str, device: torch.device, shards: int,
                         accumulation: int = 1) -> tuple[str | None, str]:
    """--compile → (torch.compile mode or None, why).  auto: CUDA graphs in one GPU process (the
    loop is launch-bound otherwise), plain compilation under FSDP (its hooks and collectives stay
    outside the graphs, so CUDA graphs cannot hold a whole step) and with gradient accumulation
    (gradients accumulated across graph replays are a known CUDA-graph-trees hazard, pytorch
    #169545), eager on the CPU or without Triton.  `shards`: processes FSDP shards the model over
    (1 for a plain module, one process or --parallel ddp's copies)."""
    if requested == "off":
        return None, "off"
    if requested == "auto":
        if device.type != "cuda":
            return None, "off (auto: eager on the CPU)"
        if importlib.util.find_spec("triton") is None:  # e.g. Windows builds of torch
            return None, "off (auto: Triton, which compiles GPU kernels, is not installed)"
        if shards > 1:
            return "default", "default (auto: FSDP across processes)"
        if accumulation > 1:
            return "default", "default (auto: no CUDA graphs with gradient accumulation)"
        return "reduce-overhead", "reduce-overhead (auto)"
    if shards > 1 and requested in ("reduce-overhead", "max-autotune"):
        fallback = "default" if requested == "reduce-overhead" else "max-autotune-no-cudagraphs"
        return fallback, f"{fallback} ({requested} uses CUDA graphs, which FSDP's collectives cannot join)"
    return requested, requested


SHARDED = ("fsdp", "hsdp")  # --parallel choices that shard the model (the others keep a whole copy per process)


def compute_dtype(mixed_precision: str) -> torch.dtype | None:
    """'bf16'/'fp16' → the compute dtype; 'no' → None (float32 throughout)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


class MeshError(ModelError):
    """A launch whose processes do not form the mesh --parallel hsdp needs; the message says why."""


def mesh_shape(world: int, local: int | None) -> tuple[int, int]:
    """--parallel hsdp's (machines, processes per machine): shard inside a machine, replicate across
    machines.  `local`: the launcher's LOCAL_WORLD_SIZE (processes on this machine)."""
    local = local or world
    if local < 1 or world % local:
        raise MeshError(f"--parallel hsdp: {world} processes are not whole machines of {local} processes "
                        "(LOCAL_WORLD_SIZE); launch the same number of processes on every machine")
    return world // local, local


def launcher_local_size() -> int | None:
    """Processes on this machine, as the launcher says (LOCAL_WORLD_SIZE: torchrun, accelerate),
    or None when it says nothing."""
    return int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or None


def device_mesh(device: torch.device, parallel: str):
    """The mesh FSDP2 shards over: None (every process, flat) for fsdp; (replicate, shard) for hsdp."""
    if parallel != "hsdp":
        return None
    from torch.distributed.device_mesh import init_device_mesh
    local = launcher_local_size()
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, local)  # every machine must run as many processes
    if len(set(everyone)) > 1:
        raise MeshError(f"--parallel hsdp: the machines run different numbers of processes ({sorted(set(everyone))} "
                        "by LOCAL_WORLD_SIZE); launch the same number on every machine")
    shape = mesh_shape(dist.get_world_size(), local)
    return init_device_mesh(device.type, shape, mesh_dim_names=("replicate", "shard"))


def shard_model(model: nn.Module, device: torch.device, mixed_precision: str, mesh=None) -> nn.Module:
    """FSDP2: shard each decoder layer, then the root (embeddings, norms, LM head); over `mesh` when
    given (a 2-D mesh: HSDP, sharded along its second dimension and replicated along its first)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    dtype = compute_dtype(mixed_precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    model.to(device)
    _, layers = find_decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


@dataclass
class Prepared:
    """A model ready to train: the module itself (state dicts, evaluation, masks), the callable
    that runs its training forwards (the module, or its torch.compile'd wrapper), and a context
    factory for its compute precision."""
    module: nn.Module
    forward: Callable  # batch (input_ids) → loss: the TrainingObjective, or its torch.compile'd wrapper
    precision: Callable = contextlib.nullcontext
    compile_mode: str | None = None  # how one process compiles `forward` (None: eager, or FSDP's layers)
    exchange: GradientExchange | None = None  # --parallel ddp: averages the gradients over the whole copies


def prepare_model(model: nn.Module, device: torch.device, mixed_precision: str,
                  compile_mode: str | None = None, parallel: str = "fsdp", teacher: nn.Module | None = None,
                  loss: LossCfg = LossCfg()) -> Prepared:
    """Shard with FSDP2 across several processes (`parallel="fsdp"`: over all of them; `"hsdp"`:
    inside each machine, replicated across machines); otherwise train the module as it is: in one
    process, or with a whole copy in each (`"ddp"`, gradients averaged by `train_step`).
    A distillation `teacher` (frozen) is placed the same way: sharded too, or a copy per process.

    FSDP at world size 1 shards nothing and costs CPU time per module (measured on an H100 with
    opt-350m, batch 8 × 512: 142 ms a step under fully_shard against 70 ms plain).  FSDP's policy
    casts to the compute dtype by itself; the plain module gets autocast.

    `compile_mode` (a torch.compile mode): for a plain module the training objective (teacher
    forward, student forward, loss) goes through `torch.compile` as one graph (CUDA graphs with
    reduce-overhead; the gradient exchange of ddp runs after it, outside the graphs) while
    evaluation keeps the eager module (compiling the evaluation shapes too cost 90 s on a cold
    cache, more than it saves); under FSDP each decoder layer is compiled in place, its hooks and
    collectives staying outside the graphs.  Parameters and state dict keys are the module's own."""
    dtype = compute_dtype(mixed_precision)
    world = dist.get_world_size()
    if world > 1 and parallel in SHARDED:
        mesh = device_mesh(device, parallel)
        model = shard_model(model, device, mixed_precision, mesh)
        teacher = shard_model(teacher, device, mixed_precision, mesh) if teacher is not None else None
        if compile_mode:
            for network in (model, teacher):
                for layer in (find_decoder_layers(network)[1] if network is not None else []):
                    layer.compile(mode=compile_mode)
        return Prepared(model, TrainingObjective(model, teacher, loss))
    model.to(device)
    if teacher is not None:
        teacher.to(device)
    objective = TrainingObjective(model, teacher, loss)
    forward = torch.compile(objective, mode=compile_mode) if compile_mode else objective
    precision = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype is not None else contextlib.nullcontext
    exchange = GradientExchange(model, overlap=compile_mode is None) if world > 1 else None
    return Prepared(model, forward, precision, compile_mode, exchange)
