"""`ich evaluate`: score trained runs on their held-out patients and write the report.

For each run directory (the `--out` of `ich train`) the best checkpoint goes through every held-out
study whole, in slice order and in the training's windows; the run's own split file says which
patients it never trained on. Images without labels (255 in the store) are predicted but left out of
the metrics (`ichmodel.metrics`) and counted in the report (`ichmodel.report`). `write_report` lists
the files it writes: report.md, metrics.json, roc.png, false_negatives.png, predictions_<run>.csv.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ichdata.atomic import atomic_path, write_text_atomic
from ichdata.csvsafe import safe_table
from ichdata.errors import UserError
from ichdata.options import option
from ichdata.paths import display_name
from ichdata.store import UNLABELLED
from ichmodel.metrics import summarize
from ichmodel.report import MissedSlice, markdown_report, plot_false_negatives, plot_roc

if TYPE_CHECKING:
    from torch import nn

    from ichdata.store import Store

__all__ = [
    "EvaluateConfig",
    "RunEvaluation",
    "evaluate_from_config",
    "evaluate_run",
    "evaluate_runs",
    "predict_series",
    "training_route",
    "write_report",
]

#: The split file `ich train` writes to its run directory.
SPLIT_FILE = "split.json"
#: How many missed hemorrhages per run the false-negative strip shows.
N_FALSE_NEGATIVES = 6


@dataclass
class RunEvaluation:
    """One run scored on its held-out patients.

    `rows` are store rows of the held-out slices (all of them, in series then slice order);
    `probs` their predicted probabilities (N, C); `labelled` marks the rows the metrics use;
    `info` is the checkpoint's metadata and `summary` what `ichmodel.metrics.summarize` returns.
    """

    name: str
    run_dir: Path
    checkpoint: Path
    info: dict[str, Any]
    series: np.ndarray
    rows: np.ndarray
    image_id: np.ndarray
    labels: np.ndarray
    probs: np.ndarray
    labelled: np.ndarray
    summary: dict[str, Any] = field(default_factory=dict)
    n_patients: int = 0

    @property
    def y_true(self) -> np.ndarray:
        """Labels of the scored (labelled) rows, (N, C)."""
        return self.labels[self.labelled]

    @property
    def y_prob(self) -> np.ndarray:
        """Probabilities of the scored (labelled) rows, (N, C)."""
        return self.probs[self.labelled]


def _device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def predict_series(
    model: nn.Module,
    store: Store,
    series: Sequence[int] | np.ndarray,
    *,
    max_len: int | None,
    device: str,
    progress: bool = True,
    desc: str = "predict",
) -> tuple[np.ndarray, np.ndarray]:
    """Run `model` over whole series of `store`, each in windows of at most `max_len` slices.

    Returns:
        The store rows (N,) and their probabilities (N, C) float32.
    """
    from tqdm.auto import tqdm

    from ichmodel.models import predict_study
    from ichmodel.reader import ImageReader

    # The training reader: a missing or corrupt shard stops the run naming it, never reads as zeros.
    reader = ImageReader(store.path, "zarr", store.n_slices)
    rows: list[np.ndarray] = []
    probs: list[np.ndarray] = []
    for s in tqdm(list(series), desc=desc, unit="study", disable=not progress, file=sys.stderr):
        a, b = store.series_rows(int(s))
        if b == a:
            continue
        images = reader.read(a, b)
        probs.append(predict_study(model, images, max_len=max_len, device=device))
        rows.append(np.arange(a, b, dtype=np.int64))
    n_classes = len(store.classes)
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros((0, n_classes), dtype=np.float32)
    return np.concatenate(rows), np.concatenate(probs)


def _held_out_series(run_dir: Path, store: Store) -> tuple[np.ndarray, int]:
    """Store series indices of the run's held-out patients, and how many of them the store holds.

    The split file is the one `ich train` wrote; `read_split` re-applies it by patient, so series
    appended to the store since then follow their patient and the held-out side stays unseen.
    """
    from ichmodel.data import read_split

    path = run_dir / SPLIT_FILE
    if not path.is_file():
        raise UserError(f"run directory {run_dir}: no {SPLIT_FILE}; expected the --out of `ich train`")
    split = read_split(path, store.series)
    present = set(store.series["patient_key"].to_numpy()[split.val_series].tolist())
    return split.val_series, len(present)


def _checkpoint(run_dir: Path, checkpoint: str) -> Path:
    path = run_dir / checkpoint
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir}: no such directory; expected the --out of `ich train`")
    if not path.is_file():
        present = sorted(p.name for p in run_dir.glob("*.pt"))
        raise UserError(
            f"run directory {run_dir}: no {checkpoint} (checkpoints there: {', '.join(present) or 'none'}); "
            "has the training finished an epoch?"
        )
    return path


def evaluate_run(
    run_dir: str | os.PathLike[str],
    store: Store,
    *,
    name: str | None = None,
    checkpoint: str = "best.pt",
    threshold: float = 0.5,
    device: str | None = None,
    progress: bool = True,
) -> RunEvaluation:
    """Score one run on its held-out patients.

    Args:
        run_dir: the `--out` of `ich train`: its split file and checkpoints.
        store: the opened store the run trained on (or a grown version of it).
        name: the run's name in the report (the directory's name by default).
        checkpoint: the checkpoint file within `run_dir`.
        threshold: a label is predicted positive when its probability is at least this.
        device: where the model runs (CUDA when available by default).
        progress: show a progress bar on stderr.

    Raises:
        UserError: no such run or checkpoint, other classes than the store's, or nothing to score.
    """
    from ichmodel.models import load_model

    run = Path(run_dir)
    ckpt = _checkpoint(run, checkpoint)
    dev = _device(device)
    model, info = load_model(ckpt, device=dev)
    classes = tuple(info.get("classes") or store.classes)
    if classes != tuple(store.classes):
        raise UserError(
            f"{ckpt}: trained on classes {', '.join(classes)}, but store {store.path} has {', '.join(store.classes)}"
        )
    series, n_patients = _held_out_series(run, store)
    if len(series) == 0:
        raise UserError(f"run {run}: its split holds out no series of store {store.path}")
    label = name or run.name
    rows, probs = predict_series(
        model, store, series, max_len=info.get("max_len"), device=dev, progress=progress, desc=label
    )
    labels = store.labels[rows]
    labelled = ~(labels == UNLABELLED).any(axis=1)
    if not labelled.any():
        raise UserError(f"run {run}: none of the {len(rows)} held-out slices in {store.path} has labels")
    result = RunEvaluation(
        name=label,
        run_dir=run,
        checkpoint=ckpt,
        info=info,
        series=np.asarray(series, dtype=np.int64),
        rows=rows,
        image_id=store.image_id[rows],
        labels=labels,
        probs=probs,
        labelled=labelled,
        n_patients=n_patients,
    )
    result.summary = summarize(result.y_true, result.y_prob, classes=classes, threshold=threshold)
    return result


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN), NumPy scalars -> Python, names as text, recursively."""
    if isinstance(x, dict):
        return {display_name(str(k)): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, float | np.floating):
        return None if not math.isfinite(float(x)) else float(x)
    if isinstance(x, str | Path):
        return display_name(str(x))
    return x


def _round(x: Any, digits: int = 4) -> Any:
    return round(float(x), digits) if isinstance(x, float | int) and not isinstance(x, bool) else x


def training_route(info: dict[str, Any]) -> str:
    """How a checkpoint's model was trained, in words (from its recorded config)."""
    config = info.get("config") or {}
    features = info.get("features") or {}
    if config.get("features"):
        cnns = "the mean of its fold CNNs" if (info.get("model") or {}).get("ensemble", 1) > 1 else "its CNN"
        return (
            f"two-stage: sequence model on cached {features.get('route', '')} features "
            f"(`ich features`), composed with {cnns}"
        )
    if config.get("init_backbone"):
        frozen = "a frozen" if config.get("freeze_backbone") else "a"
        return f"stage-wise on images: from {frozen} backbone of an earlier run"
    return "end to end on images"


def _run_info(r: RunEvaluation, store: Store) -> dict[str, Any]:
    model = r.info.get("model", {})
    return {
        "model": model.get("name", "?"),
        "trained": training_route(r.info),
        "backbone": model.get("backbone", "?"),
        "bidirectional": bool(model.get("bidirectional", False)),
        "checkpoint": str(r.checkpoint),
        "epoch": r.info.get("epoch"),
        "validation loss at checkpoint": _round(r.info.get("val_loss")),
        "held-out patients": r.n_patients,
        "held-out studies": int(store.series["study_uid"].iloc[r.series].nunique()),
        "held-out slices": len(r.rows),
        "unlabelled (not scored)": int((~r.labelled).sum()),
    }


def _missed(
    r: RunEvaluation, store: Store, threshold: float, k: int = N_FALSE_NEGATIVES
) -> list[MissedSlice]:
    """The run's k held-out slices with a hemorrhage and the lowest p(any) below the threshold."""
    any_col = list(store.classes).index("any")
    y, p = r.labels[:, any_col], r.probs[:, any_col]
    candidates = np.flatnonzero(r.labelled & (y == 1) & (p < threshold))
    worst = candidates[np.argsort(p[candidates], kind="stable")][:k]
    return [
        MissedSlice(
            model=r.name,
            image_id=str(r.image_id[i]),
            image=store.read_rows(int(r.rows[i]), int(r.rows[i]) + 1)[0],
            labels=r.labels[i],
            probs=r.probs[i],
        )
        for i in worst
    ]


def _predictions_frame(r: RunEvaluation, store: Store) -> pd.DataFrame:
    series_of_row = np.searchsorted(store.study_offsets, r.rows, side="right") - 1
    df = pd.DataFrame(
        {
            "image_id": r.image_id,
            "study_uid": store.series["study_uid"].to_numpy()[series_of_row],
            "series_index": series_of_row,
            "slice_index": r.rows - store.study_offsets[series_of_row],
        }
    )
    for c, name in enumerate(store.classes):
        df[f"label_{name}"] = r.labels[:, c]
    for c, name in enumerate(store.classes):
        df[f"p_{name}"] = np.round(r.probs[:, c].astype(np.float64), 6)
    return df


def _write_pictures(
    runs: Sequence[RunEvaluation], store: Store, out_dir: Path, threshold: float
) -> dict[str, Path]:
    """roc.png, false_negatives.png and predictions_<run>.csv in `out_dir`, by key."""
    classes = tuple(store.classes)
    paths = {"roc": out_dir / "roc.png", "false_negatives": out_dir / "false_negatives.png"}
    plot_roc({r.name: (r.y_true, r.y_prob) for r in runs}, paths["roc"], classes)
    missed = [m for r in runs for m in _missed(r, store, threshold)]
    plot_false_negatives(missed, paths["false_negatives"], classes, models=[r.name for r in runs])
    for r in runs:
        p = out_dir / f"predictions_{r.name}.csv"
        with atomic_path(p) as tmp:
            safe_table(_predictions_frame(r, store)).to_csv(tmp, index=False)
        paths[f"predictions_{r.name}"] = p
    return paths


def _report_markdown(
    runs: Sequence[RunEvaluation],
    store: Store,
    pictures: dict[str, Path],
    *,
    same_split: bool,
    title: str,
    intro: Sequence[str],
) -> str:
    notes = list(intro)
    if not same_split:
        notes.append(
            "**The runs hold out different patients** (different split files), so their figures are "
            "not measured on the same images."
        )
    roc, missed = pictures["roc"].name, pictures["false_negatives"].name
    return markdown_report(
        {r.name: r.summary for r in runs},
        tuple(store.classes),
        title=title,
        intro=[
            *notes,
            f"Store: `{store.path}`. Every held-out study went through the model whole, in slice order.",
        ],
        figures={
            "ROC curves, all labels pooled and per class (cf. the paper's Fig. 5)": roc,
            "Worst false negatives: held-out hemorrhage slices with the lowest p(any)": missed,
        },
        run_info={r.name: _run_info(r, store) for r in runs},
    )


def write_report(
    runs: Sequence[RunEvaluation],
    store: Store,
    out: str | os.PathLike[str],
    *,
    threshold: float = 0.5,
    title: str = "Evaluation on held-out patients",
    intro: Sequence[str] = (),
) -> dict[str, Path]:
    """Write the evaluation of `runs` to the folder `out`.

    Returns:
        The paths written, by key: `report` (report.md: the runs side by side, the paper's Tables I
        and II, the F1-maximising thresholds, the pictures), `metrics` (metrics.json: everything in
        the tables, `null` where undefined, with the reason in `notes`), `roc` (roc.png, the paper's
        Fig. 5), `false_negatives` (false_negatives.png: per run, the held-out hemorrhage slices with
        the lowest p(any)) and `predictions_<run>` (every held-out slice's labels and probabilities,
        so other metrics need no second run of the model).
    """
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"report": out_dir / "report.md", "metrics": out_dir / "metrics.json"}
    paths.update(_write_pictures(runs, store, out_dir, threshold))
    same_split = len({tuple(r.series.tolist()) for r in runs}) == 1
    text = _report_markdown(runs, store, paths, same_split=same_split, title=title, intro=intro)
    # Names as a reader's editor shows them, whatever the locale decoded them as (`LC_ALL=C`).
    write_text_atomic(paths["report"], display_name(text))
    metrics = {
        "store": str(store.path),
        "threshold": threshold,
        "classes": list(store.classes),
        "same_held_out_patients": same_split,
        "runs": {
            r.name: {**_run_info(r, store), "run_dir": str(r.run_dir), "metrics": r.summary} for r in runs
        },
    }
    write_text_atomic(paths["metrics"], json.dumps(_json_safe(metrics), indent=2, allow_nan=False) + "\n")
    return paths


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Directory names, made unique (`a`, `a-2`) when two runs share one."""
    names: list[str] = []
    for d in run_dirs:
        base = d.resolve().name or "run"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def evaluate_runs(
    run_dirs: Sequence[str | os.PathLike[str]],
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    threshold: float = 0.5,
    checkpoint: str = "best.pt",
    device: str | None = None,
    progress: bool = True,
    title: str = "Evaluation on held-out patients",
    intro: Sequence[str] = (),
    log: Callable[[str], None] | None = print,
) -> tuple[list[RunEvaluation], dict[str, Path]]:
    """What `ich evaluate` runs: score every run on its held-out patients and write the report.

    Args:
        run_dirs: the runs' `--out` folders; their names (made unique) name them in the report.
        store: the store they trained on.
        out: the report folder (see `write_report`).
        threshold: a label is predicted positive when its probability is at least this.
        checkpoint: the checkpoint file within each run directory.
        device: where the models run (CUDA when available by default).
        progress: show progress bars on stderr.
        title: the report's title.
        intro: paragraphs placed before the report's tables.
        log: receives one summary line per run and the report's path (None: silent).

    Returns:
        The evaluated runs and the paths `write_report` wrote.
    """
    from ichdata.store import open_store

    if not run_dirs:
        raise UserError("no run directory given")
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold {threshold}: expected a probability within [0, 1]")
    opened = open_store(store)
    dirs = [Path(d) for d in run_dirs]
    runs = [
        evaluate_run(
            d, opened, name=n, checkpoint=checkpoint, threshold=threshold, device=device, progress=progress
        )
        for d, n in zip(dirs, _run_names(dirs), strict=True)
    ]
    paths = write_report(runs, opened, out, threshold=threshold, title=title, intro=intro)
    if log is not None:
        for r in runs:
            s = r.summary
            log(
                f"{r.name}: weighted log loss {s['weighted_log_loss']:.4f}, AUC {s['overall']['roc_auc']:.4f}, "
                f"F1 {s['overall']['f1']:.4f} on {s['n_images']} slices of {r.n_patients} held-out patients"
            )
        log(f"wrote {paths['report']}")
    return runs, paths


@dataclass(frozen=True)
class EvaluateConfig:
    """The options of `ich evaluate`."""

    run_dirs: list[Path] = option(
        positional=True, nargs="+", metavar="RUN_DIR", help="the --out of `ich train`"
    )
    store: Path = option(help="the store the runs were trained on")
    out: Path = option(metavar="REPORT_DIR", help="folder to write (created)")
    threshold: float = option(0.5, help="probability at or above which a label counts as positive (0.5)")
    checkpoint: str = option("best.pt", help="checkpoint file name inside each RUN_DIR (best.pt)")
    device: str | None = option(None, help="cpu or cuda (default: cuda when available)")
    progress: bool = option(True, flag="--quiet", help="no progress bars")


def evaluate_from_config(config: EvaluateConfig) -> tuple[list[RunEvaluation], dict[str, Path]]:
    """What `ich evaluate` runs: `evaluate_runs` with the command line's options."""
    return evaluate_runs(
        config.run_dirs,
        config.store,
        config.out,
        threshold=config.threshold,
        checkpoint=config.checkpoint,
        device=config.device,
        progress=config.progress,
    )
