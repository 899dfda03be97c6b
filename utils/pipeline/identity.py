"""What a run is and what a prune is, as types: the resume check and the pruned-model cache key
come from them, not from lists kept in step by hand.

    identity = RunIdentity.of(config, fingerprint, schedule, bos)
    identity.to_json()                             # run.json's "identity", train_state.json's too
    changed_flags(RunIdentity.from_json(saved), identity)   # ["--lr 0.001 → 0.002"]: --resume refuses
    spec = PruneSpec.of(config, source.name, fingerprint, bos)
    spec.folder("pruned_models")                   # pruned_models/opt-125m-0.1-sparsegpt-owl-0.08-5-1a2b3c4d5e

Every field of RunIdentity names its flag in its metadata; a new setting that changes what a run
trains on is one field here.  The JSON keys are the ones runs saved before these types existed,
so their folders still resume; a key an older run did not save reads as None.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from utils.config.sections import RunConfig, flag
from utils.data.generated import split_sources
from utils.pruning.methods import needs_calibration, non_default_options
from utils.pruning.profile import DensityProfile
from utils.pruning.schedule import SparsitySchedule


@dataclass(frozen=True)
class RunIdentity:
    """What a --resume may not change (everything else may: logging, trackers, evaluation batch
    size and compilation, patience, where the log file goes)."""
    model_fingerprint: str | None = flag("--model")
    density: float | None = flag("--sparsity")
    method: str | None = flag("--method")
    pattern: list | None = flag("--pattern")
    layer_density: str | None = flag("--layer-density")
    schedule: list | None = flag("--schedule/--density-steps/--prune-stages")
    reprune: dict | None = flag("--reprune-method/--reprune-nsamples")  # None: the kind's own (older runs resume)
    batch_size: int | None = flag("--batch-size")
    max_step: int | None = flag("--max-step")
    epochs: int | None = flag("--epochs")
    lr: float | None = flag("--lr")
    warmup_steps: int | None = flag("--warmup-steps")
    weight_decay: float | None = flag("--weight-decay")
    max_grad_norm: float | None = flag("--max-grad-norm")
    block_size: int | None = flag("--block-size")
    train_source: str | None = flag("--train-source")
    holdout: float | None = flag("--holdout")
    seed: int | None = flag("--seed")
    generation: dict | None = flag("--gen-temperature/--gen-top-p/--gen-length/--gen-batch-size")
    mixed_precision: str | None = flag("--mixed-precision")
    loss: str | None = flag("--loss")
    kd_temperature: float | None = flag("--kd-temperature")
    kd_weight: float | None = flag("--kd-weight")
    ce_weight: float | None = flag("--ce-weight")
    kd_hidden_weight: float | None = flag("--kd-hidden-weight")
    calibration: list | None = flag("--calibration-source/--nsamples/--calibration-length")
    method_options: dict | None = flag("--method")  # only options set away from their defaults
    loss_terms: dict | None = flag("--loss")  # the weights of terms beyond ce, kd and hidden (future ones)
    bos_per_window: bool | None = flag("--bos-per-window")
    # What the numbers in results.json are measured with: one history never mixes two protocols.
    eval_source: str | None = flag("--eval-source")
    token_length: int | None = flag("--token-length")
    stride: int | None = flag("--stride")
    eval_windows: int | None = flag("--eval-windows")
    eval_dtype: str | None = flag("--dtype")
    model_content: str | None = flag("--model")  # the whole files' digest: an edit in place is another model
    # Fields the saved run did not record (saved before they existed): not compared.
    unrecorded: frozenset = field(default=frozenset(), compare=False, metadata={"flag": None})

    @classmethod
    def of(cls, config: RunConfig, fingerprint: str, schedule: SparsitySchedule, bos: int | None,
           content: str | None = None) -> "RunIdentity":
        prune, train, loss = config.prune, config.train, config.loss
        generation = train.generation if split_sources(train.train_source)[1] is not None else None
        distilled = loss.weight("kd") is not None
        calibration = prune.calibration
        return cls(
            model_fingerprint=fingerprint, density=prune.density, method=prune.method,
            pattern=list(prune.pattern) if prune.pattern else None, layer_density=profile_of(config).tag,
            schedule=[list(stage) for stage in schedule.stages], reprune=reprune_record(config),
            batch_size=train.batch_size,
            max_step=train.max_step, epochs=train.epochs, lr=train.lr, warmup_steps=train.warmup_steps,
            weight_decay=train.weight_decay, max_grad_norm=train.max_grad_norm, block_size=train.block_size,
            train_source=train.train_source, holdout=train.holdout, seed=train.seed,
            generation=None if generation is None else {  # None without generated:N: older runs resume
                "temperature": generation.temperature, "top_p": generation.top_p,
                "length": train.sampled_length, "batch_size": generation.batch_size},
            mixed_precision=train.mixed_precision, loss=loss.kind,
            kd_temperature=loss.temperature if distilled else None, kd_weight=loss.weight("kd"),
            ce_weight=loss.weight("ce"), kd_hidden_weight=loss.weight("hidden"),  # None when off: older runs resume
            calibration=[calibration.source, calibration.nsamples, calibration.length]
            if needs_calibration(prune.method) else None,
            method_options=non_default_options(prune.options) or None,
            loss_terms={term.name: term.weight for term in loss.terms if term.name not in ("ce", "kd", "hidden")}
            or None, bos_per_window=bos is not None, eval_source=config.eval.source,
            token_length=config.eval.token_length, stride=config.eval.window_stride,
            eval_windows=config.eval.windows, eval_dtype=config.model.dtype,
            model_content=content)

    def to_json(self) -> dict:
        """The JSON runs save (run.json's "identity", and the saved state's)."""
        return {field.name: getattr(self, field.name) for field in _compared()}

    @classmethod
    def from_json(cls, data: dict) -> "RunIdentity":
        """A saved identity; the fields it lacks (a run saved before they existed) are `unrecorded`,
        except those whose absence has one meaning (every older run measured the full protocol)."""
        names = [field.name for field in _compared()]
        missing = [name for name in names if name not in data and name not in MEANT_WHEN_MISSING]
        return cls(**{name: data.get(name) for name in names}, unrecorded=frozenset(missing))


# Fields added later whose absence from a saved run still says what it was: compared as None.
MEANT_WHEN_MISSING = {"eval_windows", "reprune"}  # before the flags: the full protocol, the kind's own re-prunes


def reprune_record(config: RunConfig) -> dict | None:
    """What a schedule's later prunes use, when --reprune-method chose it (None: the kind's own, as
    every run before the flag): the method, and the windows of a calibrated gradual update."""
    schedule = config.schedule
    if schedule.kind == "oneshot" or schedule.reprune_method == "auto":
        return None
    calibrated = schedule.kind == "gradual" and needs_calibration(schedule.reprune_method)
    return {"method": schedule.reprune_method, "nsamples": schedule.reprune_nsamples if calibrated else None}


def _compared() -> list:
    return [field for field in fields(RunIdentity) if field.metadata.get("flag")]


def changed_flags(saved: RunIdentity, current: RunIdentity) -> list[str]:
    """The flags whose values differ between a saved run and this command, with both values (a
    field the saved run did not record is not compared)."""
    return [f"{field.metadata['flag']} {_show(getattr(saved, field.name))} → {_show(getattr(current, field.name))}"
            for field in _compared() if field.name not in saved.unrecorded
            and getattr(saved, field.name) != getattr(current, field.name)]


def _show(value) -> str:
    if isinstance(value, float):  # short where that is exact: the value shown can be given back as it is
        return f"{value:g}" if float(f"{value:g}") == value else repr(value)
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def profile_of(config: RunConfig) -> DensityProfile:
    prune = config.prune
    return DensityProfile(prune.layer_density, prune.owl_lambda, prune.owl_m)


@dataclass(frozen=True)
class PruneSpec:
    """What makes two prunes the same: the pruned-model cache's key."""
    model_name: str  # short, filesystem-safe (ModelSource.name)
    fingerprint: str  # the dense model's (two models whose folders share a base name never share an entry)
    density: float
    method: str
    pattern: tuple[int, int] | None
    profile: str  # DensityProfile.tag
    bos: bool  # calibration windows start with the BOS token
    options: tuple[tuple[str, object], ...] = ()  # method options away from their defaults
    # (source, nsamples, length, seed) of the calibration windows, for a prune that reads activations
    calibration: tuple | None = None

    @classmethod
    def of(cls, config: RunConfig, model_name: str, fingerprint: str, bos: int | None,
           density: float | None = None, calibration_length: int | None = None) -> "PruneSpec":
        """`density`: another than the config's (a schedule's first stage); `calibration_length`:
        the windows' length as the model's positions cap it."""
        prune, calibration = config.prune, config.prune.calibration
        calibrated = needs_calibration(prune.method) or profile_of(config).owl
        return cls(model_name, fingerprint, prune.density if density is None else density, prune.method,
                   prune.pattern, profile_of(config).tag, bos is not None,
                   tuple(sorted(non_default_options(prune.options).items())),
                   (calibration.source, calibration.nsamples, calibration_length or calibration.length,
                    calibration.seed) if calibrated else None)

    def folder(self, root: str | Path) -> Path:
        """The cache folder: readable name, then any setting besides density and method that changes
        the result (profile, BOS, method options), then the model's fingerprint."""
        pattern = f"-{self.pattern[0]}of{self.pattern[1]}" if self.pattern else ""
        variant = ("" if self.profile == "uniform" else f"-{self.profile}") + ("-bos" if self.bos else "")
        variant += "".join(f"-{name}{value:g}" if isinstance(value, float) else f"-{name}{value}"
                           for name, value in self.options)
        if self.calibration is not None:  # a seed or sample sweep prunes anew: the windows are in the key
            variant += "-cal" + hashlib.sha256(json.dumps(list(self.calibration)).encode()).hexdigest()[:8]
        return Path(root) / f"{self.model_name}-{self.density:g}-{self.method}{pattern}{variant}-{self.fingerprint[:10]}"

    def legacy_folder(self, root: str | Path) -> Path:
        """Where the code before the calibration joined the key kept this prune (its pruning.json
        says which calibration made it: `calibrated_as` checks it)."""
        return replace(self, calibration=None).folder(root)

    def calibrated_as(self, info: dict) -> bool:
        """Whether a pruning.json's calibration record is this spec's."""
        if self.calibration is None:
            return True
        record = info.get("calibration") or {}
        return (record.get("source"), record.get("nsamples"), record.get("length"), record.get("seed")) == \
            self.calibration

    def lineage_file(self, root: str | Path) -> Path:
        """Where the seed lineage kept its pruned state dicts: pruned_models/{model}-{sparsity}.pt."""
        return Path(root) / f"{self.model_name}-{self.density:g}.pt"

    def to_json(self) -> dict:
        """The spec's part of pruning.json (its keys as pruned checkpoints always had them)."""
        return {"method": self.method, "density": self.density,
                "pattern": f"{self.pattern[0]}:{self.pattern[1]}" if self.pattern else None}

    @classmethod
    def from_json(cls, info: dict, model_name: str = "") -> "PruneSpec":
        """What a pruning.json says of its prune (the profile and BOS are in its folder's name, not in it)."""
        pattern = info.get("pattern")
        return cls(model_name, (info.get("model_identity") or {}).get("fingerprint") or "", info.get("density"),
                   info.get("method"), tuple(int(n) for n in pattern.split(":")) if pattern else None, "", False)

    def differences(self, saved: "PruneSpec") -> list[str]:
        """Where a cache entry's own record disagrees with the prune it is looked up for."""
        return [f"{name} {getattr(saved, name)} (wanted {getattr(self, name)})"
                for name in ("fingerprint", "density", "method", "pattern") if getattr(saved, name) != getattr(self, name)]
