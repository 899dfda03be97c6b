"""Runs side by side: one markdown table, one JSON file and one plot from the runs' results.json.

    python extreme_compression_experiment.py --compare runs/a runs/b runs/c [--output-dir runs/comparison]
    rows = compare_runs([Path("runs/a"), Path("runs/b")], Path("runs/comparison"))

Runs whose run.json settings are the same but for --seed are also summarized together: the mean
of their best perplexities and the spread (sample standard deviation, range), the way a recipe
is reported over seeds.

Quick looks (--eval-windows) are never mixed with the papers' protocol: they get a table (and a
panel) of their own, and so does every other protocol (another text, window length or stride).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.io.events import count, duration, finite_number
from utils.io.files import read_json_object, write_json
from utils.io.plots import MISSING as PLOTS_MISSING, figure_class, perplexity_axes


NOT_RECORDED = "protocol not recorded"


class ReportError(ValueError):
    """A folder that is not a finished or running run's folder; the message names it."""


@dataclass
class Row:
    """One run's line of the comparison, every number straight from its results.json."""
    run: str
    model: str
    mode: str
    density: float | None
    recipe: str
    final: float | None
    best: float | None
    best_epoch: int | None
    dense: float | None
    times_dense: float | None  # best / dense
    tokens: int | None
    wall_seconds: float | None
    export_bytes: int | None
    protocol: str  # "paper" or what differs (a quick look, another text or window)
    status: str  # finished, interrupted, stopped short, or the mode of a run that does not train
    epochs: list  # [(epoch, perplexity)]
    final_from: int = 0  # the first epoch at the final density (iterative and gradual schedules hold more before)


def read_row(folder: Path) -> Row:
    path = folder / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (folder / "run.json").exists():
            raise ReportError(f"--compare: {folder} has no results.json yet: a training run writes it after its "
                              "first epoch and again when it ends") from None
        raise ReportError(f"--compare: {folder} has no results.json (not a run folder); give run folders such as "
                          "runs/smollm2-135m-0.1-sparsegpt") from None
    except ValueError as error:
        raise ReportError(f"--compare: {path} is damaged ({error})") from None
    if not isinstance(results, dict):
        raise ReportError(f"--compare: {path} is not a results file")
    best = results.get("best") or {}
    best_value = best.get("perplexity") if results.get("mode") != "eval" else results.get("perplexity")
    final = results.get("final") if results.get("mode") != "eval" else results.get("perplexity")
    dense = results.get("dense")
    later = results.get("reprune_method")  # the later prunes' method, where it is not the first prune's
    method = f"{results.get('method')}, then {later}" if later and later != results.get("method") else results.get("method")
    recipe = " ".join(str(part) for part in (results.get("recipe"), (results.get("loss") or {}).get("kind"),
                                             results.get("schedule_kind"), method,
                                             results.get("layer_density") if results.get("layer_density") != "uniform"
                                             else None) if part)
    return Row(run=folder.name, model=str(results.get("model", "?")).rstrip("/").split("/")[-1], mode=str(results.get("mode", "train")),
               density=results.get("density"), recipe=recipe or "-", final=final, best=best_value,
               best_epoch=best.get("epoch"), dense=dense,
               times_dense=best_value / dense if finite_number(best_value) and finite_number(dense) and dense else None,
               tokens=results.get("tokens_trained"), wall_seconds=(results.get("timings") or {}).get(
                   "wall_seconds", results.get("wall_seconds")),
               export_bytes=(results.get("export") or {}).get("file_bytes"), protocol=_protocol(results, folder),
               status=_status(results),
               epochs=[(e["epoch"], e["perplexity"]) for e in results.get("epochs") or []],
               final_from=int(results.get("final_from") or 0))


@dataclass
class SeedGroup:
    """Runs of one setting that differ only in --seed (run.json's identity less the seed): what
    a recipe gives, as the mean of its seeds and their spread."""
    runs: list[str]
    seeds: list
    best: list[float]
    dense: float | None

    @property
    def mean(self) -> float:
        return sum(self.best) / len(self.best)

    @property
    def sd(self) -> float:
        """The sample standard deviation of the seeds' best perplexities."""
        return (sum((value - self.mean) ** 2 for value in self.best) / (len(self.best) - 1)) ** 0.5

    def to_json(self) -> dict:
        return {**asdict(self), "mean": self.mean, "sd": self.sd}


# When a run stops: not in its identity (a resume may change it), but runs that stop differently are
# not seeds of one setting.
STOPPING = ("patience", "patience_on", "cooldown_steps", "min_delta")


def seed_groups(folders: list[Path], rows: list[Row]) -> list[SeedGroup]:
    """The finished training runs among `rows` whose settings are the same but for the seed (run.json's
    identity, and the flags of when a run stops), two seeds or more a group, in the order of their
    first run. A run without a readable run.json or not finished joins none, nor does a folder given
    twice or a seed its group already has (a repeat of one run is not another seed)."""
    groups: dict[str, SeedGroup] = {}
    seen: set[Path] = set()
    for folder, row in zip(folders, rows):
        data = read_json_object(folder / "run.json") or {}
        identity, config = data.get("identity"), data.get("config")
        train = config.get("train") if isinstance(config, dict) else None
        if row.mode != "train" or row.status != "finished" or not isinstance(identity, dict) or \
                not finite_number(row.best) or folder.resolve() in seen:
            continue
        seen.add(folder.resolve())
        stopping = {name: train.get(name) for name in STOPPING} if isinstance(train, dict) else {}
        setting = json.dumps({**{name: value for name, value in identity.items() if name != "seed"}, **stopping},
                             sort_keys=True, default=str)
        group = groups.setdefault(setting, SeedGroup([], [], [], None))
        if identity.get("seed") in group.seeds:
            continue
        group.runs.append(row.run)
        group.seeds.append(identity.get("seed"))
        group.best.append(row.best)
        if group.dense is None and finite_number(row.dense):
            group.dense = row.dense
    return [group for group in groups.values() if len(group.runs) > 1]


def _status(results: dict) -> str:
    if results.get("mode") not in (None, "train"):
        return str(results["mode"])
    if results.get("in_progress"):  # written after an epoch: the run goes on, or was killed outright
        planned = results.get("epochs_planned")
        return f"unfinished, after epoch {results.get('epochs_completed')}" + (f" of {planned}" if planned else "")
    if results.get("interrupted"):
        return "interrupted"
    if results.get("error") or results.get("export_error"):
        return "stopped short"
    return "finished" if results.get("finished", results.get("interrupted") is False) else "unfinished"


def _protocol(results: dict, folder: Path) -> str:
    """How the run measured perplexity: results.json's record, else run.json's evaluation settings
    (runs made before results.json recorded it), else "protocol not recorded"."""
    protocol = results.get("protocol")
    if protocol is None:
        try:
            config = (read_json_object(folder / "run.json") or {})["config"]["eval"]
            protocol = {"source": config["source"], "token_length": config["token_length"],
                        "stride": config.get("stride") or config["token_length"], "windows": config.get("windows"),
                        "paper": config.get("windows") is None}
        except (KeyError, TypeError):  # no run.json, or one without the evaluation settings
            return NOT_RECORDED
    if protocol.get("paper") is False:
        return f"quick look: first {protocol.get('windows')} windows of {protocol.get('source')}"
    if protocol and (protocol.get("token_length"), protocol.get("stride")) != (2048, 2048):
        return f"{protocol.get('source')}, windows of {protocol.get('token_length')} every {protocol.get('stride')}"
    wikitext = (protocol or {}).get("wikitext2_test")
    if wikitext is None:  # recorded before results.json said which text it was: the source's name
        wikitext = not protocol or protocol.get("source") in ("wikitext2",) or \
            str(protocol.get("source", "")).rstrip("/").endswith(("wikitext-2-raw", "wiki.test.raw"))
    return "paper" if wikitext else f"text {protocol.get('source')}"


HEADER = ("| run | model | density | recipe | final | best (epoch) | × dense | tokens | wall time | export | status |\n"
          "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")


def table_line(row: Row) -> str:
    best = _fmt(row.best) + (f" ({row.best_epoch})" if row.best_epoch is not None else "")
    return (f"| {row.run} | {row.model} | {_fmt(row.density, '.4g')} | {row.recipe} | {_fmt(row.final)} | {best} | "
            f"{_fmt(row.times_dense, '.2f')}× | {count(row.tokens) if finite_number(row.tokens) else '-'} | "
            f"{duration(row.wall_seconds) if finite_number(row.wall_seconds) else '-'} | "
            f"{(f'{row.export_bytes / 2**20:,.1f} MiB') if finite_number(row.export_bytes) else '-'} | {row.status} |")


def markdown(rows: list[Row], seeds: list[SeedGroup] = ()) -> str:
    """One table per protocol, the papers' first; quick looks are never in the same table. Then
    the runs that differ only in their seed, as the mean and spread of their best perplexity."""
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.protocol, []).append(row)
    parts = ["# Runs compared", ""]
    for protocol in sorted(groups, key=_order):
        title = ("WikiText-2 test, the papers' protocol" if protocol == "paper" else
                 f"{protocol}: NOT the papers' protocol, not comparable with full-protocol numbers" if
                 protocol.startswith("quick") else
                 "Protocol not recorded (older runs): not comparable with the other tables" if
                 protocol == NOT_RECORDED else f"{protocol}: another protocol")
        parts += [f"## {title}", "", HEADER, *(table_line(row) for row in groups[protocol]), ""]
    if seeds:
        parts += ["## Seeds of one setting (finished runs whose settings are the same but for --seed; a repeated "
                  "seed counts once)", "",
                  "| runs | seeds | best: mean ± sd | range | × dense |", "| --- | --- | ---: | ---: | ---: |",
                  *(seed_line(group) for group in seeds), ""]
    parts.append("Perplexity: lower is better. × dense: the best perplexity over the dense model's, measured in "
                 "the same run (for seeds: their mean over it). ± is the sample standard deviation of the seeds. "
                 "Every number is the run's results.json.")
    return "\n".join(parts) + "\n"


def seed_line(group: SeedGroup) -> str:
    times = f"{group.mean / group.dense:.2f}×" if finite_number(group.dense) and group.dense else "-"
    return (f"| {', '.join(group.runs)} | {', '.join(str(seed) for seed in group.seeds)} | "
            f"{group.mean:.2f} ± {group.sd:.2f} | {min(group.best):.2f}–{max(group.best):.2f} | {times} |")


def compare_runs(folders: list[Path], output: Path) -> tuple[list[Row], list[Path]]:
    """Write comparison.md, comparison.json and (with matplotlib) comparison.png into `output`;
    returns the rows and the files written."""
    folders = [Path(folder) for folder in folders]
    rows = [read_row(folder) for folder in folders]
    seeds = seed_groups(folders, rows)
    if (output / "results.json").exists():
        raise ReportError(f"--output-dir {output} holds a run's results; the comparison goes into a folder of its "
                          "own (default runs/comparison)")
    output.mkdir(parents=True, exist_ok=True)
    written = [output / "comparison.md", output / "comparison.json"]
    tmp = written[0].with_name("comparison.md.tmp")
    tmp.write_text(markdown(rows, seeds), encoding="utf-8")
    tmp.replace(written[0])  # a reader never sees half a table
    write_json(written[1], {"runs": [asdict(row) for row in rows], "seed_groups": [group.to_json() for group in seeds]})
    picture = _plot(rows, output / "comparison.png")
    return rows, written + ([picture] if picture else [])


def _plot(rows: list[Row], path: Path) -> Path | None:
    Figure = figure_class()
    if Figure is None:
        return None
    protocols = sorted({row.protocol for row in rows}, key=_order)
    figure = Figure(figsize=(7 * len(protocols), 4.6))
    panels = figure.subplots(1, len(protocols), squeeze=False)
    for axes, protocol in zip(panels[0], protocols):
        drawn = [r for r in rows if r.protocol == protocol]
        for row in drawn:
            if row.epochs:
                line, = axes.plot([e for e, _ in row.epochs], [p for _, p in row.epochs], "o-", label=row.run)
                early = [(e, p) for e, p in row.epochs if e < row.final_from]  # more weights kept: not the result
                if early:
                    axes.plot(*zip(*early), "o", color=line.get_color(), markerfacecolor="white")
                if finite_number(row.dense):
                    axes.axhline(row.dense, color=line.get_color(), linestyle="--", linewidth=0.8)
            elif finite_number(row.final):
                axes.axhline(row.final, linestyle=":", label=f"{row.run} ({row.mode})")
        axes.set(title="paper protocol" if protocol == "paper" else protocol, xlabel="epoch", ylabel="perplexity")
        perplexity_axes(axes, [p for row in drawn for _, p in row.epochs] + [r.dense for r in drawn if r.epochs]
                        + [r.final for r in drawn if not r.epochs])
        axes.legend(fontsize=8)
    early = any(e < row.final_from for row in rows for e, _ in row.epochs)
    figure.suptitle("Perplexity per epoch (dashed: each run's dense model"
                    + (";\nhollow: epochs before the run's final density)" if early else ")"), fontsize=11)
    figure.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    figure.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def run_compare(folders: list[str], output: str | None, stream) -> int:
    """--compare: the table printed and written; 0, or 2 with the message for a folder it cannot read."""
    try:
        rows, written = compare_runs([Path(folder) for folder in folders], Path(output or "runs/comparison"))
    except ReportError as error:
        print(f"error: {error}", file=stream)
        return 2
    print(written[0].read_text(encoding="utf-8"), end="")
    print("Written: " + ", ".join(str(path) for path in written))
    if not any(path.suffix == ".png" for path in written):
        print(f"No comparison.png: {PLOTS_MISSING}")
    return 0


def _order(protocol: str) -> tuple[bool, bool]:
    """The papers' protocol first, quick looks and unknown protocols last."""
    return protocol != "paper", protocol.startswith("quick") or protocol == NOT_RECORDED


def _fmt(value, spec: str = ".2f") -> str:
    return format(value, spec) if finite_number(value) else "-"
