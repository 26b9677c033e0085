"""The run directory of `ich train` (`--out`): what lands there, and the checks before a run starts.

`config.json` (the resolved `TrainConfig` plus the world size and device), `split.json` (the patient
split, `ichmodel.data.write_split`, reusable with `--split`), `log.csv` (one row per epoch,
`LOG_COLUMNS`), and the checkpoints `last.pt` and `best.pt` (`ichmodel.checkpoint`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ichdata.atomic import write_text_atomic
from ichdata.errors import UserError
from ichmodel.config import RESUMABLE_CHANGES, TrainConfig
from ichmodel.data import Split, read_split, split_by_patient, split_folds, write_split

if TYPE_CHECKING:
    from ichdata.store import Store

LOG_COLUMNS: tuple[str, ...] = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "train_slices",
    "train_slices_per_s",
    "data_wait_frac",
    "epoch_s",
    "val_loss_epidural",
    "val_loss_intraparenchymal",
    "val_loss_intraventricular",
    "val_loss_subarachnoid",
    "val_loss_subdural",
    "val_loss_any",
)


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory."""

    path: Path

    @property
    def last(self) -> Path:
        """The checkpoint after the latest epoch, with the training state."""
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        """The checkpoint of the epoch with the lowest validation loss."""
        return self.path / "best.pt"

    @property
    def log(self) -> Path:
        """One row per epoch."""
        return self.path / "log.csv"

    @property
    def split(self) -> Path:
        """The patient split."""
        return self.path / "split.json"

    @property
    def config(self) -> Path:
        """The resolved config."""
        return self.path / "config.json"


def check_fresh(run: RunDir, config: TrainConfig, main: bool) -> None:
    """Refuse to resume where there is no run, and (rank 0) to start a new run where one is."""
    if config.resume and not run.last.is_file():
        raise UserError(f"--resume: {run.last} does not exist; start without --resume")
    if main and not config.resume and run.last.is_file():
        raise UserError(f"{run.path}: holds a run already (last.pt); use --resume or another --out")


def prepare(run: RunDir, config: TrainConfig) -> None:
    """Create the directory; a new run starts a new log."""
    run.path.mkdir(parents=True, exist_ok=True)
    if not config.resume and run.log.is_file():
        run.log.unlink()


def check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    """Refuse to resume with settings that change the result (`RESUMABLE_CHANGES` may change)."""
    now = dataclasses.asdict(config)
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise UserError(f"--resume from {path}: the run was started with different settings ({pretty})")


def resolve_split(config: TrainConfig, store: Store, run: RunDir, main: bool) -> Split:
    """The split of `--split`, of the run being resumed, or a new one; rank 0 writes it to the run.

    A new one is a patient fold with `--folds K --fold I` (`split_folds`), else `split_by_patient`.
    """
    if config.split is not None:
        split = read_split(config.split, store.series)
    elif config.resume and run.split.is_file():
        split = read_split(run.split, store.series)
    elif config.folds is not None:
        split = split_folds(
            store.series, config.folds, int(config.fold or 0), config.val_fraction, config.seed
        )
    else:
        split = split_by_patient(store.series, config.val_fraction, config.seed)
    if main:
        write_split(run.split, split, store.series)
    if len(split.train_series) == 0:
        raise UserError(f"{config.store}: no series left for training after the split")
    return split


def write_config(run: RunDir, config: TrainConfig, world_size: int, device: str) -> None:
    """Save the resolved config next to what it produces."""
    resolved = {**dataclasses.asdict(config), "world_size": world_size, "device": device}
    write_text_atomic(run.config, json.dumps(resolved, indent=1) + "\n")


def append_log(path: Path, row: dict[str, Any]) -> None:
    """Add one epoch's row to `log.csv` (with the header when the file is new).

    The file is replaced whole (`write_text_atomic`, one row per epoch: small): a full disk leaves the
    rows of the epochs before, never half a row that `--resume` could not read.
    """
    text = io.StringIO()
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as f:  # the rows as written, `\r\n` and all
            text.write(f.read())
    w = csv.DictWriter(text, fieldnames=list(LOG_COLUMNS))
    if not text.tell():
        w.writeheader()
    w.writerow({k: row.get(k, "") for k in LOG_COLUMNS})
    write_text_atomic(path, text.getvalue())


def truncate_log(path: Path, epochs: int) -> None:
    """Keep the rows of `log.csv` up to epoch `epochs` (those after it are run again on `--resume`)."""
    if not path.is_file():
        return
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    kept = rows[:1] + [r for r in rows[1:] if r and int(r[0]) <= epochs]
    if len(kept) < len(rows):
        text = io.StringIO()
        csv.writer(text).writerows(kept)
        write_text_atomic(path, text.getvalue())


def read_log(path: Path) -> list[dict[str, Any]]:
    """The rows of `log.csv`, numbers parsed (empty when there is none)."""
    if not path.is_file():
        return []
    ints = {"epoch", "step", "train_slices"}
    with path.open(newline="") as f:
        return [{k: (int(v) if k in ints else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


__all__ = [
    "LOG_COLUMNS",
    "RunDir",
    "append_log",
    "check_fresh",
    "check_resumable",
    "prepare",
    "read_log",
    "resolve_split",
    "truncate_log",
    "write_config",
]
