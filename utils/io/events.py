"""One metrics path: console line + metrics.jsonl + trackers, and output that survives pipes.

    logger = MetricsLogger(output_dir, log_file="run.log")
    logger.info("density 10% · 90% of weights pruned")
    logger.log({"event": "epoch", "epoch": 1, "loss": 3.2})   # console? no; jsonl + trackers: yes

Consoles that cannot encode a character (a Windows code page, `LANG=C` piped into a file) get
a replacement character instead of a `UnicodeEncodeError` that would kill a run hours in.
"""
from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from tqdm.auto import tqdm

from utils.io.files import jsonable

_ASCII_FALLBACKS = {"·": "-", "↓": "v", "↑": "^", "→": "->", "≥": ">=", "≤": "<=", "✓": "ok", "…": "..."}


def silence_broken(stream: TextIO) -> None:
    """A stream whose reader went away (`| head`): point its descriptor at the null device, so
    that what is still buffered, and the interpreter's last flush, go nowhere instead of raising."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, stream.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        pass


def make_console_safe(stream: TextIO) -> TextIO:
    """Return `stream` reconfigured so that unencodable characters never raise."""
    if hasattr(stream, "reconfigure"):
        try:
            stream.reconfigure(errors="replace")
        except (ValueError, io.UnsupportedOperation):
            pass
    return stream


def safe_text(text: str, encoding: str | None) -> str:
    """`text` rewritten with ASCII stand-ins for symbols the target encoding cannot hold."""
    if not encoding:
        return text
    try:
        text.encode(encoding)
        return text
    except (UnicodeEncodeError, LookupError):
        for symbol, stand_in in _ASCII_FALLBACKS.items():
            text = text.replace(symbol, stand_in)
        return text.encode(encoding, errors="replace").decode(encoding, errors="replace")


def is_interactive(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class Progress:
    """A progress bar on a terminal; a plain line every `every` seconds when piped, with the rate
    and the time left: "Epoch 1/5: 20/2500 (0.8%) | 0.52 steps/s | ETA 1h19m | loss=3.2140".

    Carriage-return bars turn log files into one giant line; a researcher tailing a log wants
    plain lines instead.  `initial`: units done before this bar began (a resumed epoch); the
    rate counts only what this bar saw.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, every: float = 10.0,
                 stream: TextIO | None = None, initial: int = 0, unit: str = "it"):
        self.total, self.desc, self.enabled, self.every, self.unit = total, desc, enabled, every, unit
        self.stream = stream or sys.stdout
        self.count = self.initial = initial
        self.postfix: dict[str, Any] = {}
        self._bar = None
        self._started = self._last = time.monotonic()
        if enabled and is_interactive(self.stream):
            self._bar = tqdm(total=total, desc=desc, file=self.stream, dynamic_ncols=True, leave=False,
                             initial=initial, unit=unit)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if not self.enabled:
            return
        self.count += n
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.every or self.count == self.total:
            self._last = now
            self._write_line()

    def rate(self) -> float | None:
        """Units per second since this bar began, or None before the first."""
        seconds, done = time.monotonic() - self._started, self.count - self.initial
        return done / seconds if done > 0 and seconds > 0 else None

    def _write_line(self) -> None:
        extra = " ".join(f"{k}={_fmt(v)}" for k, v in self.postfix.items())
        line = f"{self.desc}: {self.count}/{self.total}"
        if self.total:
            line += f" ({self.count / self.total:.0%})"
        rate = self.rate()
        if rate:
            line += f" | {rate:.3g} {self.unit}/s"
            if self.count < self.total:
                line += f" | ETA {duration((self.total - self.count) / rate)}"
        line += f" | {extra}" if extra else ""
        try:
            self.stream.write(safe_text(line, getattr(self.stream, "encoding", None)) + "\n")
            self.stream.flush()
        except (BrokenPipeError, ValueError):  # the reader of a pipe went away: stop writing, keep running
            silence_broken(self.stream)
            self.enabled = False

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            if self.enabled:  # leave one line behind, as a piped run would
                self._write_line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count(number: int) -> str:
    """25_600_000 -> '25.6M', 81_920 -> '81,920'."""
    return f"{number / 1e6:.1f}M" if number >= 1e6 else f"{number:,}"


def finite_number(value) -> bool:
    """A real number that is not NaN or infinite (a bool or None is none): what a JSON record holds
    where something was measured."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def duration(seconds: float) -> str:
    """42 -> '42s', 125 -> '2m05s', 4000 -> '1h06m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


class MetricsLogger:
    """Console + optional log file + metrics.jsonl + accelerate trackers, main process only."""

    def __init__(self, output_dir: str | os.PathLike | None = None, log_file: str | os.PathLike | None = None,
                 is_main_process: bool = True, tracker_log: Callable[[dict, int | None], None] | None = None,
                 stream: TextIO | None = None):
        self.is_main = is_main_process
        self.stream = make_console_safe(stream or sys.stdout)
        self.tracker_log = tracker_log
        self.metrics_path = Path(output_dir) / "metrics.jsonl" if output_dir and is_main_process else None
        if self.metrics_path:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = None
        if log_file and is_main_process:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(log_file, "a", encoding="utf-8")

    def info(self, message: str = "") -> None:
        if not self.is_main:
            return
        if self.stream is not None:
            try:
                self.stream.write(safe_text(message, getattr(self.stream, "encoding", None)) + "\n")
                self.stream.flush()
            except (BrokenPipeError, ValueError):  # `| head` closed the pipe: the run goes on, recorded
                silence_broken(self.stream)
                self.stream = None
        if self._log_file:
            self._log_file.write(message + "\n")
            self._log_file.flush()

    def report(self, line: str, event: dict[str, Any], step: int | None = None) -> None:
        """Print `line` and record `event`, what it says as data: one call, so nothing is printed
        that is not also recorded."""
        self.info(line)
        self.log(event, step=step, track=False)  # settings, not metrics: a tracker would count a step for each

    def log(self, event: dict[str, Any], step: int | None = None, track: bool = True) -> None:
        """Record one event (a dict) in metrics.jsonl and the trackers."""
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **jsonable(event)}
        if self.metrics_path:
            with open(self.metrics_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        if self.tracker_log and track:
            numeric = {f"{event.get('event', 'metric')}/{k}": v for k, v in event.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if numeric:
                self.tracker_log(numeric, step)

    def progress(self, total: int, desc: str, every: float = 10.0, initial: int = 0, unit: str = "it") -> Progress:
        return Progress(total, desc, enabled=self.is_main and self.stream is not None, every=every,
                        stream=self.stream, initial=initial, unit=unit)

    def close(self) -> None:
        if self._log_file:
            self._log_file.close()
            self._log_file = None


def quiet_transformers_progress(stream: TextIO | None) -> None:
    """transformers' own carriage-return bars (loading shards, ...) stay off unless on a terminal."""
    if not is_interactive(stream):
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()


def percent(fraction: float) -> str:
    """0.1 -> '10%', 0.05 -> '5%', 0.125 -> '12.5%'."""
    return f"{fraction * 100:.4g}%"


def first_line(error: BaseException) -> str:
    """An error's first line for a one-line message (its type where it says nothing)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe_density(density: float) -> str:
    """The one sentence every run prints: 'density 10% · 90% of weights pruned'."""
    return f"density {percent(density)} · {percent(1 - density)} of weights pruned"


def banner(title: str) -> str:
    rule = "=" * 64
    return f"{rule}\n{title}\n{rule}"
