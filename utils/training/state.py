"""Resumable training state without pickle: safetensors for tensors, JSON for everything else.

    save_training_state(folder, model, optimizer, meta={...})     # every process calls it
    meta = load_training_state(folder, model, optimizer)           # every process calls it

`torch.distributed.checkpoint` keeps its metadata as a pickle, so a tampered `state/.metadata`
would run code on `--resume`; `torch.load` would unpickle too.  Nothing here is unpickled.

    state/weights-rank{r}.safetensors   parameters and optimizer tensors (rank r's shards under
                                        FSDP; one file, rank 0's, when every process holds a copy)
    state/rng-rank{r}.safetensors       rank r's CPU and CUDA generator states
    state/train_state.json              `meta`: loop position, history, schedule, scaler, run
                                        identity, and the optimizer's hyperparameters

A save writes a new folder beside the old one and swaps it in when complete; Ctrl-C and
SIGTERM arriving meanwhile are held until the folder is whole.
"""
from __future__ import annotations

import contextlib
import json
import signal
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from utils.io.files import CheckpointError, fresh_tmp, save_pretrained_atomic, swap_in, write_json
from utils.models.sparsity import any_sharded, local_part, replication
from utils.training.step import Optimization

META_FILE = "train_state.json"


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class StopRequests:
    """While alive, SIGINT (Ctrl-C) and SIGTERM (what cluster schedulers send before a kill) only
    raise a flag, and the handlers before it come back on `close`.  The training loop stops at the
    end of a whole optimizer step when it sees the flag (several processes: at the end of a log
    window, agreed through its all-reduce), so saved state is a step boundary on every rank; a
    save holds both signals until its folder is whole (`signals_deferred`)."""

    def __init__(self):
        self.requested = False
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._request)

    def _request(self, number, frame) -> None:
        self.requested = True

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, then raise KeyboardInterrupt if one came:
    a second Ctrl-C while state is written must not leave half a folder."""
    stop = StopRequests()
    try:
        yield
    finally:
        stop.close()
    if stop.requested:
        raise KeyboardInterrupt


def _tensors_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """({key: local tensor}, {parameter name: non-tensor optimizer state}) of this process."""
    tensors, scalars = {}, {}
    for name, param in model.named_parameters():
        tensors[f"model::{name}"] = local_part(param.detach()).contiguous()
        for key, value in optimizer.state.get(param, {}).items():
            if torch.is_tensor(value):
                tensors[f"optim::{name}::{key}"] = local_part(value.detach()).contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    return {k: v.cpu() for k, v in tensors.items()}, scalars


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict) -> None:
    """Write every process's part of the state into a new folder and swap it in (a collective)."""
    from safetensors.torch import save_file
    rank, world = _rank_world()
    sharded = any_sharded(model.parameters())
    tmp = folder.with_name(folder.name + ".tmp")
    with signals_deferred():
        if rank == 0:
            fresh_tmp(folder)
        _barrier()
        tensors, scalars = _tensors_of(model, optimizer)
        if sharded or rank == 0:
            save_file(tensors, str(tmp / f"weights-rank{rank}.safetensors"))
        save_file(_rng_state(), str(tmp / f"rng-rank{rank}.safetensors"))
        _barrier()
        if rank == 0:
            groups = [{k: v for k, v in group.items() if k != "params"}
                      for group in optimizer.state_dict()["param_groups"]]
            write_json(tmp / META_FILE, {**meta, "optimizer": {"param_groups": groups, "scalars": scalars},
                                         "layout": {"sharded": sharded, "processes": world,
                                                    "replicas": replication(list(model.parameters()))}})
            swap_in(tmp, folder)
        _barrier()


def read_meta(folder: Path) -> dict:
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: {folder} holds no finished resumable state; "
                              "start again without --resume (or delete the folder)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); start again without --resume, "
                              f"or delete {folder}") from error
    _check_meta(meta, path)
    return meta


# What train_state.json must hold, by key: the JSON types each value may have.
_NUMBER = (int, float)
META_SHAPE = {"train_state": dict, "optimizer": dict, "identity": dict, "layout": dict, "scheduler": dict}


def _check_meta(meta, path: Path) -> None:
    """Refuse a train_state.json that parses but is not what a save writes (a key missing, a value
    of another type), naming the key: it would otherwise fail deep inside the resume."""
    def wrong(where: str, shape: dict, data) -> str | None:
        if not isinstance(data, dict):
            return f"{where} is a {type(data).__name__}, not an object"
        for key, kind in shape.items():
            if key not in data:
                if key in _ADDED_LATER:  # saved before the field existed
                    continue
                return f"{where} has no '{key}'"
            value = data[key]
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
                return f"'{key}' is {value!r}, not {getattr(kind, '__name__', 'a number')}"
        return None
    problem = wrong("it", META_SHAPE, meta) or wrong("its train_state", _state_shape(), meta["train_state"]) or \
        wrong("its optimizer", {"param_groups": list, "scalars": dict}, meta["optimizer"])
    if problem:
        raise CheckpointError(f"{path} is not a saved training state ({problem}); start again without --resume, "
                              f"or delete {path.parent}")


def _state_shape() -> dict:
    """What each TrainState field may hold in JSON, from its annotation (a float may be saved as an int)."""
    kinds = {"int": int, "float": _NUMBER, "dict": dict, "bool": bool, "int | None": (int, type(None)),
             "float | None": (*_NUMBER, type(None))}
    return {field.name: kinds[field.type] for field in fields(TrainState)}


_ADDED_LATER = {"timings", "best_holdout_loss", "stop_at_step"}  # TrainState fields that states saved before them lack: checked only when present


def check_position(meta: dict, folder: Path, max_step: int, epochs: int) -> None:
    """Refuse saved state whose position does not fit this run's schedule (a step past its end, an
    epoch that does not hold its step): continuing from it would skip or repeat training."""
    state = meta["train_state"]
    step, epoch = state["global_step"], state["epoch"]
    total = max_step * epochs
    fits = 0 <= step <= total and 1 <= epoch <= epochs + 1 and (epoch - 1) * max_step <= step <= epoch * max_step
    # a run that stopped short inside an epoch (--cooldown-steps) finished it there and moved past it
    fits = fits or (state.get("finished") is True and state.get("stop_at_step") == step and 2 <= epoch <= epochs + 1
                    and (epoch - 2) * max_step < step <= (epoch - 1) * max_step)
    if not fits:
        raise CheckpointError(f"{folder / META_FILE} says optimizer step {step} in epoch {epoch}, which this run's "
                              f"{epochs} epochs × {max_step} steps do not hold; start again without --resume, or "
                              f"delete {folder}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the resumable state is incomplete or was saved by "
                              "another number of processes") from None
    except Exception as error:  # noqa: BLE001 - safetensors reports damage with its own types
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error}); start again without "
                              "--resume, or delete the state folder") from error


def _like(param: torch.Tensor, value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`value` as optimizer state of `param`: a DTensor shard like the parameter where it is one."""
    value = value.to(device)
    if hasattr(param, "to_local") and value.shape == local_part(param).shape:
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(value, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return value


@torch.no_grad()
def load_training_state(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore parameters, optimizer state and this rank's RNG; return the saved `meta`."""
    rank, world = _rank_world()
    meta = read_meta(folder)
    layout = meta.get("layout", {})
    sharded = any_sharded(model.parameters())
    replicas = replication(list(model.parameters()))
    if bool(layout.get("sharded")) != sharded or (sharded and layout.get("processes") != world) or \
            (sharded and layout.get("replicas", 1) != replicas):
        saved = ("whole copies" if not layout.get("sharded") else "sharded" if layout.get("replicas", 1) == 1 else
                 f"sharded within machines, replicated over {layout.get('replicas')} (hsdp)")
        raise CheckpointError(f"{folder} was saved by {layout.get('processes')} processes ({saved}); resume with the "
                              "same number of processes, of machines and --parallel")
    tensors = _read_tensors(folder / f"weights-rank{rank if sharded else 0}.safetensors")
    scalars = meta["optimizer"]["scalars"]
    flags = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, param in model.named_parameters():
        saved = tensors.get(f"model::{name}")
        if saved is None or saved.shape != local_part(param).shape:
            raise CheckpointError(f"{folder}: the saved state has no parameter {name} of shape "
                                  f"{tuple(local_part(param).shape)}; it belongs to another model or layout")
        local_part(param).copy_(saved)
        prefix = f"optim::{name}::"
        state = {key[len(prefix):]: value for key, value in tensors.items() if key.startswith(prefix)}
        if state or name in scalars:
            group = flags[id(param)]
            step_device = local_part(param).device if group.get("fused") or group.get("capturable") else torch.device("cpu")
            optimizer.state[param] = {
                **{key: _like(param, value, step_device if key == "step" else local_part(param).device)
                   for key, value in state.items()},
                **scalars.get(name, {})}
    for group, saved in zip(optimizer.param_groups, meta["optimizer"]["param_groups"]):
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value
    rng = _read_tensors(folder / f"rng-rank{rank}.safetensors")
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return meta


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
    best_holdout_loss: float | None = None  # --patience-on holdout: the lowest held-out loss at the final density
    stop_at_step: int | None = None  # a cool-down under way (--cooldown-steps): the run stops at this step
    history: dict = field(default_factory=dict)
    finished: bool = False
    # Seconds so far, over every process that ran this run: training, evaluation, wall (added later:
    # a state saved before it existed has none and resumes with zeros)
    timings: dict = field(default_factory=dict)

    def next_epoch(self) -> None:
        """Move on to the next epoch, its sums started anew."""
        self.epoch += 1
        self.epoch_loss_sum, self.epoch_batches, self.epoch_tokens, self.epoch_seconds = 0.0, 0, 0, 0.0
        self.epoch_compile_steps, self.epoch_compile_seconds = 0, 0.0

    def stopped_early(self, epochs: int) -> bool:
        """Whether this finished state ended before its last epoch's end: stopped by --patience
        (`stop_at_step`, with a cool-down or not), or, saved before that field, short of `epochs`."""
        return self.finished and (self.stop_at_step is not None or self.epoch <= epochs)

    def add_seconds(self, kind: str, seconds: float) -> None:
        """Count `seconds` of `kind` (training_seconds, evaluation_seconds) into the run's timings."""
        self.timings[kind] = self.timings.get(kind, 0.0) + seconds

    def steady_rate(self) -> float | None:
        """Tokens/s of the epoch without the window that compiled the model; None if none did."""
        steps = self.epoch_batches - self.epoch_compile_steps
        seconds = self.epoch_seconds - self.epoch_compile_seconds
        if not self.epoch_compile_steps or steps <= 0 or seconds <= 0:
            return None
        return self.epoch_tokens * steps / self.epoch_batches / seconds


def save_state(folder: Path, model: nn.Module, optimization: Optimization, state: TrainState,
               identity: dict) -> None:
    """Resumable state (utils/training/state.py: safetensors + JSON, nothing pickled), written beside
    the previous one and swapped in only when complete."""
    save_training_state(folder, model, optimization.optimizer,
                        {"train_state": asdict(state), **optimization.extra_state(), "identity": identity})


def load_state(folder: Path, model: nn.Module, optimization: Optimization) -> TrainState:
    meta = load_training_state(folder, model, optimization.optimizer)
    optimization.load_extra_state(meta)
    return TrainState(**meta["train_state"])


def save_best_model(model: nn.Module, tokenizer, folder: Path, info: dict,
                    dtype: torch.dtype = torch.float32) -> None:
    """Gather the full weights (a collective) and let rank 0 write them atomically; floating-point
    weights in `dtype` (float32: the master weights as trained)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dtype != torch.float32:
        full = {name: value.to(dtype) if value.is_floating_point() else value for name, value in full.items()}
        info = {**info, "saved_dtype": str(dtype).removeprefix("torch.")}
    if dist.get_rank() == 0:
        save_pretrained_atomic(model, tokenizer, folder, info=info, state_dict=full)
    dist.barrier()


