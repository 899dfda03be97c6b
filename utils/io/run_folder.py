"""The run folder: one run per folder, one process writing it, a resume that continues the same run.

    folder = RunFolder(Path("runs/x"), resume=False, overwrite=False)
    folder.claim()                          # checks writable, refuses a second writer, takes the lock
    folder.release()

A lock file (`.lock`, holding the owner's pid and host) keeps two processes from writing one
folder at once; a lock whose process is gone (same host) is stale and taken over.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from utils.io.files import CheckpointError, read_json_object

LOCK_FILE = ".lock"
# What a run computed: results, state, models (best/ and every exporter's folder: tests/test_researcher.py
# keeps this in step with utils/export/registry.EXPORTERS) and its picture
RESULT_FILES = ("results.json", "state", "state.old", "best", "compressed", "dense", "curves.png")
STARTED_FILES = ("run.json", "metrics.jsonl")  # what a start writes before any work
RUN_FILES = STARTED_FILES + RESULT_FILES


class RunFolderError(CheckpointError):
    """The output folder cannot take this run; the message says which folder and what to do."""


def check_writable(path: Path, what: str) -> None:
    """Fail now, before any pruning or training, if `path` (a folder) cannot be created and written."""
    try:
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{what} {path} exists and is not a folder; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise RunFolderError(f"{what} {path} is not writable ({error.strerror or error}); "
                             "choose another path") from None


def check_file_writable(path: Path, what: str) -> None:
    if path.is_dir():
        raise RunFolderError(f"{what} {path} is a folder; give a file name")
    check_writable(path.parent if str(path.parent) else Path("."), f"the folder of {what}")


EMPTY_LOCK_SECONDS = 10.0  # a lock with no owner written this long ago is stale (its writer fills it at once)


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunFolder:
    def __init__(self, path: Path, resume: bool, overwrite: bool):
        self.path, self.resume, self.overwrite = path, resume, overwrite
        self.run_key = ""  # rank 0's name for this run, the same in every process (run.py)
        self._locked = False

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    def has_run(self) -> bool:
        """Whether the folder holds what a run computed (a start that failed before any work left
        at most run.json and metrics.jsonl, which block nothing)."""
        return any((self.path / name).exists() for name in RESULT_FILES)

    def previous(self) -> str:
        """What the run in the folder was, for messages: "a training run", "an --eval-only run", ..."""
        config = (read_json_object(self.path / "run.json") or {}).get("config", {})
        mode = config.get("mode") if isinstance(config, dict) else None
        return {"train": "a training run", "eval": "an --eval-only run", "prune": "a --prune-only run",
                "export": "an --export-only run"}.get(mode, "a run")

    def claim(self, training: bool) -> None:
        """Check the folder can be written, take its lock, and refuse a folder that holds the results
        of a run (unless --resume continues a training run or --overwrite clears it): a folder with
        results is never overwritten."""
        check_writable(self.path, "--output-dir")
        self._lock()
        if training and self.resume:
            self._recover_state()
            return
        if self.has_run() and not self.overwrite:
            self.release()
            way = "continue it with --resume, " if training and (self.state_dir.exists() or
                                                                  self.path.joinpath("state.old").exists()) else ""
            raise RunFolderError(f"{self.path} already holds the results of {self.previous()}; {way}start over with "
                                 "--overwrite (its files are deleted), or choose another --output-dir")
        for name in RUN_FILES if self.overwrite else STARTED_FILES:
            target = self.path / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)

    def _recover_state(self) -> None:
        """A crash inside the state folder's swap can leave only `state.old` (the last complete
        state): put it back before resuming from it."""
        old = self.path / "state.old"
        if not self.state_dir.exists() and (old / "train_state.json").exists():
            os.replace(old, self.state_dir)

    def _lock(self) -> None:
        lock = self.path / LOCK_FILE
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    owner = json.loads(lock.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    owner = {}
                if owner.get("host") == me["host"] and isinstance(owner.get("pid"), int) and not _alive(owner["pid"]):
                    lock.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                if not owner and _older_than(lock, EMPTY_LOCK_SECONDS):  # a writer died between creating and filling it
                    lock.unlink(missing_ok=True)
                    continue
                raise RunFolderError(f"{self.path} is in use by another run (pid {owner.get('pid')} on "
                                     f"{owner.get('host')}); wait for it, choose another --output-dir, or delete "
                                     f"{lock} if that process no longer exists") from None
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(me, handle)
            self._locked = True
            return

    def release(self) -> None:
        if self._locked:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            self._locked = False


def drop_events_after(metrics: Path, step: int, epoch: int) -> int:
    """Remove from metrics.jsonl what a run recorded after the state it resumes from (training
    lines past `step`, evaluations and epoch lines of epoch `epoch` on): a resumed run records
    them again.  Returns how many lines were dropped."""
    if not metrics.exists():
        return 0
    kept, dropped = [], 0
    for line in metrics.read_text(encoding="utf-8").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            dropped += 1
            continue
        late = (event.get("event") in ("train", "stage") and event.get("step", 0) > step) or (
            event.get("event") in ("epoch", "evaluation", "holdout") and (event.get("epoch") or 0) >= epoch)
        if late:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = metrics.with_name(metrics.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, metrics)
    return dropped
