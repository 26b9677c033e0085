"""The evaluation report: ROC curves (the paper's Fig. 5), missed hemorrhages, Tables I and II.

Everything here takes plain arrays and the dicts of `ichmodel.metrics.summarize`, so the pictures and
tables can be made from any predictions, not only from a checkpoint. matplotlib is switched to its
file-only Agg backend inside each plotting function (never at import), so importing this module does
not change the backend of a notebook that imports it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from ichdata.atomic import atomic_path
from ichdata.paths import display_name
from ichmodel.metrics import roc_auc, roc_curve

__all__ = [
    "MissedSlice",
    "markdown_report",
    "plot_false_negatives",
    "plot_roc",
]

#: Rows of Table I / Table II: (key in the summary, label in the table, True if lower is better).
_METRIC_ROWS: tuple[tuple[str, str, bool], ...] = (
    ("log_loss", "Loss", True),
    ("accuracy", "Accuracy", False),
    ("roc_auc", "ROC AUC", False),
    ("precision", "Precision", False),
    ("sensitivity", "Sensitivity", False),
    ("specificity", "Specificity", False),
    ("f1", "F1 score", False),
)


def _classes(classes: Sequence[str] | None) -> tuple[str, ...]:
    if classes is None:
        from ichdata.labels import CLASSES

        return tuple(CLASSES)
    return tuple(classes)


def _table_order(classes: Sequence[str]) -> list[str]:
    """`any` first, as the paper's Table II and a reader's eye have it; then the subtypes."""
    return [c for c in classes if c == "any"] + [c for c in classes if c != "any"]


def _agg() -> ModuleType:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_roc(
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
) -> Path:
    """ROC curves of several models overlaid: all labels pooled (micro, Fig. 5A), then one panel per class.

    `predictions` maps a model's name to `(y_true, y_prob)`, both (N, C); each curve's legend entry
    carries its AUC. A class without positives in the held-out data gets an empty panel that says so.
    Written as PNG to `path`; returns the path.
    """
    classes = _classes(classes)
    plt = _agg()
    panels = [("all labels (micro)", None), *[(c, i) for i, c in enumerate(classes)]]
    ncols = 4
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.2 * nrows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, col) in zip(axes.flat, panels, strict=False):
        drawn = 0
        for k, (name, (y_true, y_prob)) in enumerate(predictions.items()):
            y = np.asarray(y_true)
            p = np.asarray(y_prob)
            yc, pc = (y.ravel(), p.ravel()) if col is None else (y[:, col], p[:, col])
            auc = roc_auc(yc, pc)
            if math.isnan(auc):
                continue
            fpr, tpr, _ = roc_curve(yc, pc)
            label = f"{display_name(name)} (AUC {auc:.4f})"
            ax.plot(fpr, tpr, color=colours[k % len(colours)], lw=1.6, label=label)
            drawn += 1
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        if not drawn:
            ax.text(0.5, 0.5, "no positive\n(or no negative)\nimages", ha="center", va="center", color="0.4")
        else:
            ax.legend(loc="lower right", fontsize=8)
        # The positives count in the title only when every model was scored on the same labels.
        counts = (
            {int(np.asarray(y)[:, col].sum()) for y, _ in predictions.values()} if col is not None else set()
        )
        ax.set_title(f"{title} ({counts.pop()} positive)" if len(counts) == 1 else title, fontsize=10)
        ax.set_xlim(-0.01, 1.01)
        ax.set_ylim(-0.01, 1.01)
        ax.set_aspect("equal")
        ax.set_xlabel("1 - specificity (false positive rate)", fontsize=8)
        ax.set_ylabel("sensitivity (true positive rate)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("ROC curves on the held-out patients", fontsize=12)
    return _save(plt, fig, path)


@dataclass(frozen=True)
class MissedSlice:
    """One slice a model got wrong, as the false-negative strip shows it.

    `image` is the stored uint8 (3, H, W) tensor (brain, subdural, bone windows); `labels` and
    `probs` are its (C,) true labels and predicted probabilities.
    """

    model: str
    image_id: str
    image: np.ndarray
    labels: np.ndarray
    probs: np.ndarray


def _crop_to_head(image: np.ndarray, margin: int = 4) -> np.ndarray:
    """The square around everything that is not air (0 in every window), so the head fills the tile."""
    body = np.flatnonzero(image.max(axis=(0, 1)) > 0), np.flatnonzero(image.max(axis=(0, 2)) > 0)
    if not body[0].size or not body[1].size:
        return image
    (x0, x1), (y0, y1) = (body[0][[0, -1]]), (body[1][[0, -1]])
    half = max(x1 - x0, y1 - y0) // 2 + margin
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    h, w = image.shape[1:]
    ya, xa = max(0, cy - half), max(0, cx - half)
    return image[:, ya : min(h, cy + half + 1), xa : min(w, cx + half + 1)]


def plot_false_negatives(
    missed: Sequence[MissedSlice],
    path: str | os.PathLike[str],
    classes: Sequence[str] | None = None,
    window: str = "brain",
    per_row: int = 6,
    models: Sequence[str] | None = None,
) -> Path:
    """A strip of missed hemorrhages, one row per model, worst first, as PNG at `path`.

    Each tile is the slice cropped to the head, in the brain window (level 40, width 80: where
    blood is brightest against brain) by default, or `window="subdural"`/`"bone"`, or `"rgb"`: the
    three windows as red/green/blue, the tensor the network saw. Each tile is captioned with the
    image id, the true hemorrhage classes and the predicted probability of each of them. `models`
    lists the rows (default: the models in `missed`); a model without a missed slice gets a row that
    says so.
    """
    classes = _classes(classes)
    channel = {"brain": 0, "subdural": 1, "bone": 2}
    if window != "rgb" and window not in channel:
        raise ValueError(f"window must be 'rgb', 'brain', 'subdural' or 'bone', got {window!r}")
    plt = _agg()
    models = list(models) if models is not None else list(dict.fromkeys(m.model for m in missed))
    rows = {m: [s for s in missed if s.model == m][:per_row] for m in models}
    nrows = max(1, len(models))
    ncols = max(3, min(per_row, max((len(v) for v in rows.values()), default=1)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 3.2 * nrows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not models:
        axes[0, 0].text(0, 0.5, "no false negatives at this threshold", fontsize=11, va="center")
    for r, m in enumerate(models):
        if not rows[m]:
            axes[r, 0].text(0, 0.5, "no false negatives at this threshold", fontsize=11, va="center")
        for c, s in enumerate(rows[m]):
            ax = axes[r, c]
            img = _crop_to_head(np.asarray(s.image))
            if window == "rgb":
                ax.imshow(np.transpose(img, (1, 2, 0)), interpolation="nearest")
            else:
                ax.imshow(img[channel[window]], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            truth = [k for k, v in zip(classes, s.labels, strict=True) if v == 1 and k != "any"]
            shown = [*truth, "any"] if "any" in classes else truth
            idx = {k: i for i, k in enumerate(classes)}
            probs = ", ".join(f"{k[:5]} {float(s.probs[idx[k]]):.2f}" for k in shown)
            ax.set_title(
                f"{display_name(s.image_id)}\ntrue: {', '.join(truth) or 'any'}\np: {probs}", fontsize=7
            )
        axes[r, 0].text(
            -0.08,
            0.5,
            display_name(m),
            transform=axes[r, 0].transAxes,
            rotation=90,
            ha="right",
            va="center",
            fontsize=9,
        )
    label = "RGB = brain / subdural / bone windows" if window == "rgb" else f"{window} window"
    fig.suptitle(
        f"Worst false negatives: true hemorrhages with the lowest predicted p(any)\n{label}", fontsize=10
    )
    return _save(plt, fig, path)


def _save(plt: ModuleType, fig: Any, path: str | os.PathLike[str]) -> Path:
    """Lay out `fig`, write it as PNG to `path` whole or not at all (a full disk), and close it."""
    out = Path(path)
    try:
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return out


def _fmt(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, int | np.integer):
        return f"{int(x):,}"
    return f"{float(x):.4f}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _best(values: Sequence[Any], lower_is_better: bool) -> set[int]:
    """Indices of the best value as shown (ties all bold); none when fewer than two are comparable."""
    finite = [(i, float(v)) for i, v in enumerate(values) if v is not None and not math.isnan(float(v))]
    if len(finite) < 2:
        return set()
    pick = min if lower_is_better else max
    best = _fmt(pick(v for _, v in finite))
    return {i for i, v in finite if _fmt(v) == best}


def _metric_table(columns: Sequence[str], cells: Sequence[Mapping[str, Any]], bold: bool) -> list[str]:
    """Rows of `_METRIC_ROWS` × columns; `cells[j]` is the dict of column j."""
    lines = [_row(["", *columns]), _row(["---", *["---:"] * len(columns)])]
    for key, label, lower in _METRIC_ROWS:
        values = [c.get(key) for c in cells]
        best = _best(values, lower) if bold else set()
        shown = [f"**{_fmt(v)}**" if i in best else _fmt(v) for i, v in enumerate(values)]
        lines.append(_row([label, *shown]))
    return lines


def _runs_section(names: Sequence[str], run_info: Mapping[str, Mapping[str, Any]]) -> list[str]:
    keys = list(dict.fromkeys(k for info in run_info.values() for k in info))
    out = ["## Runs", "", _row(["", *names]), _row(["---", *["---"] * len(names)])]
    for k in keys:
        out.append(_row([k, *[str(run_info.get(n, {}).get(k, "")) for n in names]]))
    return [*out, ""]


def _overall_section(summaries: Mapping[str, Mapping[str, Any]], n_classes: int) -> list[str]:
    threshold = next(iter(summaries.values()))["threshold"]
    out = [
        "## Overall (Table I)",
        "",
        f"Loss is the RSNA weighted log loss (weight 2 for `any`, 1 for each subtype; lower is better). "
        f"The other metrics pool all {n_classes} labels of every image (micro average); a label is "
        f"predicted positive when its probability is ≥ {threshold:g}. Best of each row in bold.",
        "",
    ]
    out += _metric_table(list(summaries), [s["overall"] for s in summaries.values()], bold=True)
    out.append(_row(["Images", *[_fmt(int(s["n_images"])) for s in summaries.values()]]))
    return [*out, ""]


def _per_class_section(summaries: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> list[str]:
    out = [
        "## Per class (Table II)",
        "",
        "Sensitivity = TP / (TP + FN), specificity = TN / (TN + FP), by their textbook definitions "
        "(the paper's Table II appears to swap the two).",
        "",
    ]
    for name, s in summaries.items():
        pc = s["per_class"]
        out += [f"### {name}", ""]
        out += _metric_table(order, [pc[c] for c in order], bold=False)
        out.append(_row(["Positive images", *[_fmt(int(pc[c]["n_positive"])) for c in order]]))
        out.append("")
    return out


def _thresholds_section(summaries: Mapping[str, Mapping[str, Any]], order: Sequence[str]) -> list[str]:
    out = [
        "## F1-maximising thresholds",
        "",
        "Each class's threshold chosen to maximise its F1 on these same held-out images, so optimistic: "
        "pick an operating point this way on a validation split, not from test figures.",
        "",
    ]
    rows = ("threshold", "f1", "precision", "sensitivity", "specificity")
    for name, s in summaries.items():
        pc = s["per_class"]
        out += [f"### {name}", "", _row(["", *order]), _row(["---", *["---:"] * len(order)])]
        for key in rows:
            label = key.capitalize() if key != "f1" else "F1"
            out.append(_row([label, *[_fmt(pc[c]["best_f1"].get(key)) for c in order]]))
        ob = s["overall_best_f1"]
        out += [
            "",
            f"All labels at these thresholds: F1 {_fmt(ob['f1'])}, precision {_fmt(ob['precision'])}, "
            f"sensitivity {_fmt(ob['sensitivity'])}, specificity {_fmt(ob['specificity'])}.",
            "",
        ]
    return out


def markdown_report(
    summaries: Mapping[str, Mapping[str, Any]],
    classes: Sequence[str] | None = None,
    *,
    title: str = "Evaluation",
    intro: Sequence[str] = (),
    figures: Mapping[str, str] | None = None,
    run_info: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The report as Markdown.

    Table I (runs side by side), the figures, Table II and the F1-maximising thresholds per run,
    then the notes on undefined values.

    Args:
        summaries: a run's name → `ichmodel.metrics.summarize(...)` of it.
        classes: the label classes (`ichdata.labels.CLASSES` by default); tables put `any` first.
        title: the level-1 heading.
        intro: paragraphs before the tables.
        figures: caption → path relative to the report, embedded after Table I.
        run_info: a run's name → a few facts for a header table (model, backbone, epochs, …).
    """
    classes = _classes(classes)
    order = _table_order(classes)
    out = [f"# {title}", ""]
    out += [*intro, ""] if intro else []
    if run_info:
        out += _runs_section(list(summaries), run_info)
    out += _overall_section(summaries, len(classes))
    for caption, rel in (figures or {}).items():
        out += [f"![{caption}]({rel})", "", f"*{caption}*", ""]
    out += _per_class_section(summaries, order)
    out += _thresholds_section(summaries, order)
    notes = [(n, note) for n, s in summaries.items() for note in s.get("notes", [])]
    if notes:
        out += ["## Notes", "", *[f"- {n}: {note}" for n, note in notes], ""]
    return "\n".join(out).rstrip() + "\n"
