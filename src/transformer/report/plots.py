"""Figures: training curves from a run's log, attention heatmaps, and confusion matrices.

A run folder holds ``log.jsonl``, one JSON object per line. Records with
``"kind": "train"`` carry ``step``, ``loss`` and ``lr``; records with
``"kind": "valid"`` carry ``step``, ``loss`` and ``bleu``. Other kinds are ignored.
Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot, so
nothing needs a display.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from transformer.text.data import read_lines
from transformer.errors import UserError


def read_log(path: Path) -> list[dict]:
    """The records of a JSON-lines log, skipping blank lines.

    A corrupt last line is dropped, since a run killed mid-write leaves one; a corrupt
    line anywhere else raises `UserError` naming the file and the line.
    """
    lines = read_lines(path)
    records = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, found {line[:40]!r}")
        records.append(record)
    return records


def _series(records: list[dict], kind: str, key: str) -> tuple[list[float], list[float]]:
    """Steps and values of ``key`` in the records of ``kind`` that hold a finite number."""
    points = [
        (r["step"], r[key])
        for r in records
        if r.get("kind") == kind
        and isinstance(r.get("step"), (int, float))
        and isinstance(r.get(key), (int, float))
        and math.isfinite(r[key])
    ]
    return [s for s, _ in points], [v for _, v in points]


def _panel(ax: Axes, title: str, ylabel: str, lines: dict[str, tuple[list, list]]) -> None:
    """Plot each non-empty ``label: (steps, values)`` series on ``ax``, with labels and grid.

    A panel with nothing to plot says so; one with several series gets a legend.
    """
    drawn = {label: xy for label, xy in lines.items() if xy[0]}
    for label, (steps, values) in drawn.items():
        style = "o-" if len(steps) < 50 else "-"  # markers while the points are sparse
        ax.plot(steps, values, style, label=label, linewidth=1, markersize=3)
    if not drawn:
        ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes)
    if len(drawn) > 1:
        ax.legend()
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def training_figure(records: list[dict], title: str = "") -> Figure:
    """Three panels: train and valid loss, validation BLEU, and learning rate, by step."""
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    loss_ax, bleu_ax, lr_ax = fig.subplots(1, 3)
    losses = {kind: _series(records, kind, "loss") for kind in ("train", "valid")}
    _panel(loss_ax, "Loss", "loss per token", losses)
    _panel(bleu_ax, "Validation BLEU", "BLEU", {"valid": _series(records, "valid", "bleu")})
    _panel(lr_ax, "Learning rate", "learning rate", {"train": _series(records, "train", "lr")})
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    if title:
        fig.suptitle(title)
    return fig


def _save(fig: Figure, out: Path) -> Path:
    """Write ``fig`` as a PNG to ``out``, creating its folder."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120, format="png")
    except OSError as e:
        raise UserError(f"{out}: cannot write the figure ({e.strerror or e})") from None
    return out


def plot_training(run_dir: Path, out: Path | None = None) -> list[Path]:
    """Plot the curves of the run in ``run_dir`` to ``out`` (default ``RUN/curves.png``).

    Returns the paths written.
    """
    run_dir = Path(run_dir)
    log = run_dir / "log.jsonl"
    if not log.is_file():
        raise UserError(f"{log}: no such file (is {run_dir} a training run folder?)")
    records = [r for r in read_log(log) if r.get("kind") in ("train", "valid")]
    if not records:
        raise UserError(f"{log}: no train or valid records to plot")
    fig = training_figure(records, title=run_dir.resolve().name)
    return [_save(fig, Path(out) if out is not None else run_dir / "curves.png")]


def attention_figure(
    weights: Tensor, src_tokens: list[str], tgt_tokens: list[str], title: str
) -> Figure:
    """A heatmap per head of ``weights`` (heads, queries, keys), in a grid of up to 4 columns.

    Keys (``src_tokens``) label the x axis and queries (``tgt_tokens``) the y axis;
    brighter cells are larger weights. In the spirit of the paper's Figures 3-5.
    """
    shape = tuple(weights.shape)
    if len(shape) != 3 or shape[0] == 0 or shape[1:] != (len(tgt_tokens), len(src_tokens)):
        raise ValueError(
            f"weights of shape {shape} do not match "
            f"{len(tgt_tokens)} query and {len(src_tokens)} key tokens"
        )
    heads = shape[0]
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    cell = 0.22 * max(len(src_tokens), len(tgt_tokens)) + 1.5
    fig = Figure(figsize=(cols * cell, rows * cell + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).flatten()
    data = weights.detach().float().cpu().numpy()
    for head, ax in enumerate(axes):
        if head >= heads:
            ax.set_axis_off()
            continue
        ax.imshow(data[head], cmap="viridis", vmin=0.0, aspect="auto")
        ax.set_title(f"head {head + 1}")
        ax.set_xticks(range(len(src_tokens)), src_tokens, rotation=90, fontsize=8)
        ax.set_yticks(range(len(tgt_tokens)), tgt_tokens, fontsize=8)
    fig.suptitle(title)
    return fig


def plot_attention(
    weights: Tensor, src_tokens: list[str], tgt_tokens: list[str], title: str, out: Path
) -> Path:
    """Draw `attention_figure` and write it as a PNG to ``out``; returns ``out``."""
    return _save(attention_figure(weights, src_tokens, tgt_tokens, title), Path(out))


def confusion_figure(confusion: list[list[int]], labels: list[str], title: str) -> Figure:
    """A heatmap of a confusion matrix (rows: the true label, columns: the predicted one), each cell's count
    written in it; the colour is the share of the row, so that rare labels read as plainly as frequent ones."""
    n = len(labels)
    counts = [[float(c) for c in row] for row in confusion]
    shares = [[c / max(sum(row), 1.0) for c in row] for row in counts]
    side = 0.5 * n + 2.5
    fig = Figure(figsize=(side + 1.0, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=8,
                    color="white" if shares[i][j] > 0.5 else "black")
    ax.set_xticks(range(n), labels, rotation=90 if n > 6 else 0, fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=8)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    fig.colorbar(image, ax=ax, label="share of the true label")
    ax.set_title(title)
    return fig


def plot_confusion(confusion: list[list[int]], labels: list[str], title: str, out: Path) -> Path:
    """Draw `confusion_figure` and write it as a PNG to ``out``; returns ``out``."""
    return _save(confusion_figure(confusion, labels, title), Path(out))
