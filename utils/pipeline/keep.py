"""What a training run keeps on disk at its end: its picture, and its resumable state only while
it is needed.

    draw_curves(context.output, logger, history.to_dict())   # curves.png; a failure is a warning
    tidy_state(context.output, logger, keep=False, delivered=True)
"""
from __future__ import annotations

import shutil
from pathlib import Path

from utils.io.events import MetricsLogger
from utils.io.plots import MISSING as PLOTS_MISSING, write_curves


def draw_curves(folder: Path, logger: MetricsLogger, history: dict | None = None, final: bool = False) -> None:
    """curves.png of the run in `folder`: a picture never ends a run, so any failure is a warning.
    `final`: the run's last drawing, which says where the picture is (or why there is none)."""
    try:
        picture = write_curves(folder, history)
    except Exception as error:  # noqa: BLE001 - matplotlib, fonts, a full disk: all only the picture's loss
        logger.report(f"Warning: curves.png could not be drawn ({type(error).__name__}: {error}); the run goes on",
                      {"event": "curves", "error": f"{type(error).__name__}: {error}"})
        return
    if final:
        logger.report(f"Curves: {picture}" if picture else f"No curves.png: {PLOTS_MISSING}",
                      {"event": "curves", "path": str(picture) if picture else None})


def tidy_state(output: Path, logger: MetricsLogger, keep: bool, delivered: bool) -> None:
    """A finished run's resumable state is not needed again (--resume of it prints its summary from
    results.json): removed, unless --keep-state or it is the only copy of the trained model (no
    best/ and no export: --no-save-best, --export none, or an export that failed)."""
    if keep:
        return
    if not delivered:
        logger.report(f"Kept {output / 'state'}: it is the only copy of the trained model (no best/ and no export)",
                      {"event": "state", "removed": False})
        return
    sizes = [path.stat().st_size for name in ("state", "state.old") for path in (output / name).rglob("*")
             if path.is_file()]
    for name in ("state", "state.old"):
        shutil.rmtree(output / name, ignore_errors=True)
    logger.report(f"Removed {output / 'state'} ({sum(sizes) / 2**20:,.0f} MiB of resumable state; --keep-state "
                  "keeps it)", {"event": "state", "removed": True, "bytes": sum(sizes)})


class Curves:
    """Draws curves.png into the run folder after every epoch (main process)."""

    def __init__(self, folder: Path, logger: MetricsLogger):
        self.folder, self.logger = folder, logger

    def on_step_end(self, trainer) -> None:
        pass

    def on_epoch_end(self, trainer) -> None:
        draw_curves(self.folder, self.logger, trainer.history.to_dict())
