"""Pictures of a run, drawn from what it recorded (results.json, metrics.jsonl), with matplotlib.

    write_curves(Path("runs/x"))     # runs/x/curves.png; None (and a note once) without matplotlib

curves.png: perplexity per epoch against the dense model and the pruned model before training
(each point labelled with the density it was measured at, when a schedule prunes during training), the
training and held-out losses against optimizer steps, and the density of every decoder layer.
matplotlib is optional (`pip install matplotlib`): the core of the tool stays light, and a run
without it says once how to get the pictures.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

from utils.io.events import finite_number
from utils.io.files import read_json_object

MISSING = "pictures (curves.png, --compare's plot) need matplotlib: pip install matplotlib"


def figure_class():
    """matplotlib's Figure, or None when matplotlib is not installed.  A Figure made directly (not
    through pyplot) draws to files without choosing a backend for the whole process: a notebook
    that imports the tool keeps its own."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure


def perplexity_axes(axes, values: list) -> None:
    """Whole epochs on x; y on a log scale only where `values` span more than 20× (a pruned model's
    thousands beside the dense model's tens), its ticks then written as numbers ("1,000" and, between
    the powers of ten, "20" and "50"; not "10³" and "2×10¹")."""
    axes.xaxis.get_major_locator().set_params(integer=True)
    values = [value for value in values if finite_number(value) and value > 0]
    if values and max(values) / min(values) > 20:
        from matplotlib.ticker import FuncFormatter
        axes.set_yscale("log")
        axes.yaxis.set_major_formatter(FuncFormatter(_number))
        axes.yaxis.set_minor_formatter(FuncFormatter(lambda value, at: _number(value, at)
                                                     if f"{value:.0e}"[0] in "25" else ""))


def _number(value: float, _=None) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def read_events(folder: Path) -> list[dict]:
    """metrics.jsonl's events (a line cut short by a crash is skipped)."""
    events = []
    try:
        lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return events
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def layer_densities(layers: list) -> list[float]:
    """[[linear name, nonzeros, numel], ...] → the density of each decoder layer (by the layer
    index in the names), in layer order."""
    kept, total = defaultdict(int), defaultdict(int)
    for name, nonzeros, numel in layers:
        match = re.search(r"(?:^|\.)(\d+)(?=\.|$)", name)  # model.layers.3, model.layers.3.mlp.up_proj
        index = int(match.group(1)) if match else -1
        kept[index] += nonzeros
        total[index] += numel
    return [kept[i] / total[i] for i in sorted(total) if total[i]]


def write_curves(folder: Path, history: dict | None = None) -> Path | None:
    """Draw the run in `folder` into folder/curves.png; `history`: PerplexityHistory.to_dict()
    (else results.json's).  Returns the file, or None without matplotlib."""
    Figure = figure_class()
    if Figure is None:
        return None
    folder = Path(folder)
    if history is None:
        history = read_json_object(folder / "results.json") or {}
    events = read_events(folder)
    figure = Figure(figsize=(16, 4.6))
    perplexity, loss, density = figure.subplots(1, 3)
    _perplexity_panel(perplexity, history, events)
    _loss_panel(loss, events)
    _density_panel(density, events)
    start = next((e for e in events if e.get("event") == "start"), {})
    title = f"{start.get('model', folder.name)}: {folder.name}"
    if history.get("quick_look"):
        title += "\nQUICK LOOK (--eval-windows): not the papers' protocol"
    figure.suptitle(title)
    figure.tight_layout()
    path = folder / "curves.png"
    tmp = path.with_name("curves.tmp.png")
    figure.savefig(tmp, dpi=110)
    tmp.replace(path)  # a reader never sees half a picture
    return path


def epoch_densities(events: list[dict]) -> dict[int, float]:
    """The density each evaluation measured: epoch → density (0: as pruned, before training), from the
    sparsity events (the last of each epoch)."""
    found = {}
    for event in events:
        if event.get("event") == "sparsity" and finite_number(event.get("density")):
            if event.get("when") == "pruned":
                found.setdefault(0, event["density"])
            elif isinstance(event.get("epoch"), int):
                found[event["epoch"]] = event["density"]
    return found


def _perplexity_panel(axes, history: dict, events: list[dict]) -> None:
    epochs = [(e["epoch"], e["perplexity"]) for e in history.get("epochs") or []
              if finite_number(e.get("perplexity"))]
    baseline, dense = history.get("baseline"), history.get("dense")
    if finite_number(baseline):
        epochs = [(0, baseline)] + epochs
        axes.axhline(baseline, color="tab:red", linestyle=":", label=f"pruned, before training ({baseline:.2f})")
    labels = {epoch: f"{density:.3g}" for epoch, density in epoch_densities(events).items()}
    # a schedule that prunes during training: each point was measured at another density, written above it
    moving = len({labels[e] for e, _ in epochs if e in labels}) > 1
    if epochs:
        axes.plot([e for e, _ in epochs], [p for _, p in epochs], "o-", color="tab:blue",
                  label="after each epoch" + (" (above each: the density kept)" if moving else ""))
    if moving:
        axes.margins(y=0.12)  # room for the labels above the points
    for epoch, value in epochs if moving else []:
        if epoch in labels:
            axes.annotate(labels[epoch], (epoch, value), textcoords="offset points", xytext=(0, 6), ha="center",
                          fontsize=7, color="tab:blue")
    if finite_number(dense):
        axes.axhline(dense, color="black", linestyle="--", label=f"dense ({dense:.2f})")
    perplexity_axes(axes, [p for _, p in epochs] + [dense])
    axes.set(title="Perplexity per epoch (0: before training)", xlabel="epoch", ylabel="perplexity")
    axes.legend(fontsize=8)


def _loss_panel(axes, events: list[dict]) -> None:
    train = [(e["step"], e["loss"]) for e in events if e.get("event") == "train" and finite_number(e.get("loss"))]
    held = [(e["step"], e["loss"]) for e in events if e.get("event") == "holdout" and "step" in e
            and finite_number(e.get("loss"))]
    kind = next((e.get("kind") for e in events if e.get("event") == "loss"), None)
    if train:
        axes.plot(*zip(*train), color="tab:blue", linewidth=1, label=f"training loss ({kind or 'as trained'})")
    axes.set(title="Loss", xlabel="optimizer step", ylabel=f"training loss ({kind or 'as trained'})")
    axes.xaxis.get_major_locator().set_params(integer=True)  # steps are whole (a short run drew 2.5, 7.5)
    lines = list(axes.get_lines())
    if held:
        # distillation is another quantity than the held-out cross-entropy: an axis of its own
        other = axes if kind == "ce" else axes.twinx()
        lines += other.plot(*zip(*held), "s-", color="tab:orange", label="held-out cross-entropy")
        if other is not axes:
            other.set_ylabel("held-out cross-entropy", color="tab:orange")
    if lines:
        axes.legend(lines, [line.get_label() for line in lines], fontsize=8)


def _density_panel(axes, events: list[dict]) -> None:
    last = next((e for e in reversed(events) if e.get("event") == "sparsity" and e.get("layers")), None)
    if last is None:
        axes.set(title="Density per decoder layer (not recorded)")
        return
    values = layer_densities(last["layers"])
    axes.bar(range(len(values)), values, color="tab:green")
    axes.set_xticks(range(0, len(values), max(1, len(values) // 12)))
    overall = last.get("density")
    title = "Density per decoder layer (weights kept)"
    if finite_number(overall):
        axes.axhline(overall, color="black", linestyle="--")
        title += f"\noverall {overall:.4f} (dashed)"
    axes.set(title=title, xlabel="decoder layer", ylabel="density")
