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
from pathlib import Path

from utils.io.files import CheckpointError

LOCK_FILE = ".lock"
RUN_FILES = ("run.json", "metrics.jsonl", "results.json", "state", "best", "compressed")

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
        self._locked = False

    @property
    def state_dir(self) -> Path:
        return self.path / "state"

    def has_run(self) -> bool:
        return any((self.path / name).exists() for name in RUN_FILES)

    def claim(self, training: bool) -> None:
        """Check the folder can be written, take its lock, and for a training run refuse a
        folder that holds another run (unless --resume continues it or --overwrite clears it)."""
        check_writable(self.path, "--output-dir")
        self._lock()
        if not training or self.resume:
            return
        if self.has_run() and not self.overwrite:
            self.release()
            raise RunFolderError(f"{self.path} already holds a run; continue it with --resume, start over with "
                                 "--overwrite, or choose another --output-dir")
        if self.overwrite:
            for name in RUN_FILES:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)

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
