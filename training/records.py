"""What a run writes as it goes, beside its checkpoints: the learning curves and the order it read the data in.

- `metrics.jsonl`: one line per log step (`"kind": "train"`: the means since the last log step and the learning
  rate) and one per validation (`"kind": "validation"`). Trackers such as TensorBoard get the same values, but
  they are optional and often missing offline; this file is always there.
- `curves.png`: drawn from metrics.jsonl at every validation: training losses (log scale; symmetric-log where a
  term goes negative, as the adversarial one does), validation PSNR and the learning rate against the step, the
  picture one would otherwise open TensorBoard for. A failure to draw it is a warning, never the run's end.
- `validation.log` (`step N: name value, ...`) and `data_order.rankR.txt` (`STEP INDEX ...`).

Only the main process writes the first three. A run killed after a checkpoint has recorded steps that its resumed
run trains again: `forget_after` drops them, so every step appears once. A line cut short by the kill is dropped.
Values that are not finite are written as null, so that strict JSON readers (jq) accept the file.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

from codec.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CURVES = "curves.png"
VALIDATION_LOG = "validation.log"


def append_metrics(output_dir: Path, step: int, kind: str, values: dict[str, float]) -> None:
    """One line of metrics.jsonl: `{"step": step, "kind": kind, **values}`."""
    values = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in values.items()}
    with open(output_dir / METRICS, "a") as handle:
        handle.write(json.dumps({"step": step, "kind": kind, **values}, allow_nan=False) + "\n")


def append_validation_log(output_dir: Path, step: int, values: dict[str, float]) -> None:
    text = ", ".join(f"{key} {value:.4f}" for key, value in values.items())
    with open(output_dir / VALIDATION_LOG, "a") as handle:
        handle.write(f"step {step}: {text}\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, without a last line that a kill cut short."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def _step_of(line: str) -> int | None:
    """The step a line of any of the run's records starts with: `{"step": N, ...}`, `step N: ...` or `N ...`."""
    if line.startswith("{"):
        try:
            step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):
            return None
        return step if isinstance(step, int) else None
    words = line.removeprefix("step ").split(" ", 1)
    try:
        return int(words[0].rstrip(":"))
    except ValueError:
        return None


def forget_steps(record: Path, keep: Callable[[int], bool]) -> None:
    """Rewrite `record` (atomically) with only the lines whose step `keep` accepts. Unreadable lines go too, and so
    does a last line without its newline: cut short by a kill, and the next line would be appended to it."""
    if record.is_file():
        lines = record.read_text().splitlines(keepends=True)
        whole = [line for line in lines if line.endswith("\n")]
        kept = [line for line in whole if (step := _step_of(line)) is not None and keep(step)]
        if kept != lines:
            atomic_write_text(record, "".join(kept))


def forget_after(output_dir: Path, step: int) -> None:
    """Resumed at `step` (the checkpoint's, which had logged and validated it): drop what later steps recorded."""
    for name in (METRICS, VALIDATION_LOG):
        forget_steps(output_dir / name, lambda recorded: recorded <= step)


def curve_series(records: list[dict]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """The lines of each panel of curves.png: {panel: {label: (steps, values)}}, finite values only.

    "loss": the total and each weighted term (`*_loss`, the discriminator's `d_loss`); a term that is zero
    throughout (a discriminator that has not started) is left out.
    "validation PSNR": `psnr`, the EMA's where the run has one (its `trained_psnr` is then the raw weights').
    "learning rate": `lr`.
    """
    train = [r for r in records if r.get("kind") == "train"]
    validation = [r for r in records if r.get("kind") == "validation"]

    def line(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        points = [(s, float(v)) for s, v in points if math.isfinite(v)]
        return [s for s, _ in points], [v for _, v in points]

    loss_keys = sorted({k for r in train for k in r if k == "loss" or k.endswith("_loss")})
    has_ema = any("trained_psnr" in r for r in validation)
    panels = {
        "loss": {key: xy for key in loss_keys if any((xy := line(train, key))[1])},
        "validation PSNR": {
            "EMA" if has_ema else "psnr": line(validation, "psnr"),
            "trained weights": line(validation, "trained_psnr"),
        },
        "learning rate": {"lr": line(train, "lr")},
    }
    return {panel: {label: xy for label, xy in lines.items() if xy[0]} for panel, lines in panels.items()}


def draw_curves(output_dir: Path) -> Path | None:
    """Draw curves.png from metrics.jsonl (atomically); None when there is nothing to draw yet or drawing failed
    (a warning: the picture is never worth a run)."""
    try:
        return _draw(output_dir)
    except Exception as error:  # disk full, a matplotlib error: the run goes on
        log.warning("could not draw %s: %s", output_dir / CURVES, error)
        return None


def _draw(output_dir: Path) -> Path | None:
    panels = curve_series(read_metrics(output_dir / METRICS))
    if not any(panels.values()):
        (output_dir / CURVES).unlink(missing_ok=True)  # an earlier run's, whose records were dropped
        return None
    # A Figure without pyplot: no global backend switch (a notebook calling train() keeps its own), nothing to
    # close, nothing that leaks if saving fails.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(panels), 3.8), layout="tight")
    axes = figure.subplots(1, len(panels))
    for ax, (title, lines) in zip(axes, panels.items(), strict=True):
        for label, (steps, values) in lines.items():
            style = {"color": "black", "lw": 2.0, "zorder": 1} if label == "loss" else {"lw": 1.2, "zorder": 2}
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, ms=3, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if lines:
            ax.legend(fontsize=7)
        if title == "loss" and lines:
            values = [abs(v) for _, ys in lines.values() for v in ys if v]
            if all(v > 0 for _, ys in lines.values() for v in ys):
                ax.set_yscale("log")
            else:  # the adversarial term goes negative: log beyond the smallest term's magnitude, linear inside
                ax.set_yscale("symlog", linthresh=min(values, default=1e-8))
        if title == "validation PSNR":
            ax.set_ylabel("dB")
    path = output_dir / CURVES
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    return path
