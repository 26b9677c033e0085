"""`ich predict`: a trained model on a folder of new DICOM studies, in the Kaggle submission format.

There is one preprocessing path: the folder is converted with `ichdata.convert.convert` (the same
scan, set-aside rules, slice ordering and windowing as `ich convert`) into a temporary store, or one
the user keeps with `--store`, and the model reads that store as `ich evaluate` does: each study
whole, in slice order. What the three CSVs hold is `PredictResult`'s to say.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from torch import nn

    from ichdata.pull import ArchiveQuery
    from ichdata.store import Store

from ichdata.config import ClusterConfig
from ichdata.csvsafe import safe_table
from ichdata.errors import UserError
from ichdata.options import option

__all__ = [
    "PredictConfig",
    "PredictResult",
    "predict_folder",
    "predict_from_config",
    "predict_store",
    "study_summary",
    "submission_frame",
]


def submission_frame(image_ids: Sequence[str], probs: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Kaggle's `ID,Label` table: six rows per image, `ID_<hex>_<class>` (image ids are `ID_<hex>`).

    Image ids that are not RSNA's `ID_…` (a hospital's SOPInstanceUIDs) are used as they are, so the
    ID is `<uid>_<class>`.
    """
    ids = np.asarray(image_ids, dtype=str)
    p = np.asarray(probs, dtype=np.float64)
    if p.shape != (len(ids), len(classes)):
        raise ValueError(f"probabilities have shape {p.shape}, expected ({len(ids)}, {len(classes)})")
    row_ids = np.char.add(
        np.repeat(ids, len(classes)), np.tile(np.char.add("_", np.asarray(classes)), len(ids))
    )
    return pd.DataFrame({"ID": row_ids, "Label": p.reshape(-1)})


def study_summary(
    store: Store, rows: np.ndarray, probs: np.ndarray, threshold: float = 0.5, top: int = 3
) -> pd.DataFrame:
    """One row per study from slice probabilities (see the module docstring for the columns).

    `rows` are store rows (in series then slice order), `probs` their (N, C) probabilities.
    """
    classes = list(store.classes)
    any_col = classes.index("any")
    series_of_row = np.searchsorted(store.study_offsets, rows, side="right") - 1
    slice_index = rows - store.study_offsets[series_of_row]
    frame = pd.DataFrame(
        {
            "study_uid": store.series["study_uid"].to_numpy()[series_of_row],
            "series_uid": store.series["series_uid"].to_numpy()[series_of_row],
            "image_id": store.image_id[rows],
            "slice_index": slice_index,
            "pos": np.arange(len(rows)),
        }
    )
    out: list[dict[str, Any]] = []
    for study, g in frame.groupby("study_uid", sort=False):
        pos = g["pos"].to_numpy()
        p = probs[pos]
        rec: dict[str, Any] = {
            "study_uid": study,
            "series_uid": ";".join(dict.fromkeys(g["series_uid"])),
            "n_slices": len(pos),
        }
        for c, name in enumerate(classes):
            k = int(np.argmax(p[:, c]))
            rec[f"p_{name}"] = float(p[k, c])
            rec[f"{name}_slice"] = g["image_id"].iloc[k]
            rec[f"{name}_slice_index"] = int(g["slice_index"].iloc[k])
        flagged = np.flatnonzero(p[:, any_col] >= threshold)
        rec["n_slices_any"] = len(flagged)
        rec["first_slice_any"] = int(g["slice_index"].iloc[flagged[0]]) if len(flagged) else None
        rec["last_slice_any"] = int(g["slice_index"].iloc[flagged[-1]]) if len(flagged) else None
        order = np.argsort(-p[:, any_col], kind="stable")[:top]
        rec["top_slices"] = ";".join(f"{g['image_id'].iloc[k]}:{p[k, any_col]:.3f}" for k in order)
        out.append(rec)
    df = pd.DataFrame(out)
    if len(df):
        for col in ("first_slice_any", "last_slice_any"):
            df[col] = df[col].astype("Int64")
    return df


def _outputs(out: Path) -> tuple[Path, Path]:
    stem = out.with_suffix("") if out.suffix == ".csv" else out
    return stem.with_name(stem.name + ".studies.csv"), stem.with_name(stem.name + ".set_aside.csv")


@dataclass(frozen=True)
class PredictResult:
    """What `ich predict` wrote and counted; for `--out predictions.csv`.

    - `predictions.csv`: Kaggle's `ID,Label` with the six rows `ID_<image id>_<class>` of every
      converted image, classes in the store's order (`epidural` … `any`); every readable slice appears.
    - `predictions.studies.csv`: one row per study: the probability of each class for the study is
      the maximum over its slices (a study has a hemorrhage when any of its slices has one, which is
      how a radiologist reads it and how the RSNA labels were made per slice), the image id and slice
      index of the slice that sets each maximum, how many slices reach the threshold for `any`, the
      first and last of them (the extent of the finding along the series), and the three slices with
      the highest p(any).
    - `predictions.set_aside.csv`: every input file that is not in the predictions (`path`, `reason`,
      `detail`); their count is printed, never dropped silently.
    """

    predictions: Path
    studies: Path
    set_aside: Path
    n_images: int
    n_studies: int
    n_set_aside: int
    set_aside_by_reason: dict[str, int]
    #: The per-study table as written to `studies` (unrounded), for the SRs of `ich predict --sr`.
    summary: pd.DataFrame | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.set_aside_by_reason.items()))
        aside = f"{self.n_set_aside} files set aside" + (f" ({reasons})" if reasons else "")
        return (
            f"predicted {self.n_images} images of {self.n_studies} studies -> {self.predictions} "
            f"(studies: {self.studies}); {aside} -> {self.set_aside}"
        )


def predict_store(
    checkpoint: str | os.PathLike[str],
    store: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    threshold: float = 0.5,
    device: str | None = None,
    progress: bool = True,
    set_aside: pd.DataFrame | None = None,
    loaded: tuple[nn.Module, dict[str, Any]] | None = None,
) -> PredictResult:
    """Predict every series of a converted store and write the three CSVs next to `out`.

    `set_aside` defaults to the store's quarantine table; `loaded` is `load_model(checkpoint)` when
    the caller has it already.
    """
    from ichdata.store import open_store
    from ichmodel.evaluate import _device, predict_series
    from ichmodel.models import load_model

    _check_threshold(threshold)
    st = open_store(store)
    dev = _device(device)
    model, info = loaded if loaded is not None else load_model(Path(checkpoint), device=dev)
    classes = tuple(info.get("classes") or st.classes)
    if classes != tuple(st.classes):
        raise UserError(
            f"{checkpoint}: trained on classes {', '.join(classes)}, the store has {', '.join(st.classes)}"
        )
    rows, probs = predict_series(
        model,
        st,
        range(st.n_series),
        max_len=info.get("max_len"),
        device=dev,
        progress=progress,
        desc="predict",
    )
    out_path = Path(out)
    studies_path, aside_path = _outputs(out_path)
    safe_table(submission_frame(st.image_id[rows], probs, classes)).to_csv(
        out_path, index=False, float_format="%.6g"
    )
    summary = study_summary(st, rows, probs, threshold)
    safe_table(summary).to_csv(studies_path, index=False, float_format="%.6g")
    aside = (st.quarantine if set_aside is None else set_aside).loc[:, ["path", "reason", "detail"]]
    safe_table(aside).to_csv(aside_path, index=False)
    return PredictResult(
        predictions=out_path,
        studies=studies_path,
        set_aside=aside_path,
        n_images=len(rows),
        n_studies=len(summary),
        n_set_aside=len(aside),
        set_aside_by_reason={str(k): int(v) for k, v in aside["reason"].value_counts().items()},
        summary=summary,
    )


def _check_threshold(threshold: float) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise UserError(f"--threshold {threshold}: expected a probability within [0, 1]")


def _check_store_target(store: Path, source: Path) -> None:
    """Refuse a `--store` path holding anything but a store predict converted from `source`.

    Predict's conversion replaces what is at `store`; that may only be its own earlier result for
    the same input: a finished store without labels made from `source` (`ichdata.resume.made_from`),
    holding no file ich did not write (`ichdata.storefiles.check_replaceable`).
    """
    from ichdata.resume import made_from
    from ichdata.store import open_store
    from ichdata.storefiles import check_replaceable

    if not store.exists() and not store.is_symlink():
        return
    refuse = f"ich predict --store {store}: {{}}; predict replaces only a store it converted from {source}"
    if not store.is_dir():
        raise UserError(refuse.format("a file is there"))
    if not any(store.iterdir()):
        return  # an empty folder: nothing to lose
    try:
        attrs = open_store(store).attrs
    except UserError:
        raise UserError(refuse.format("holds something that is not a finished ich store")) from None
    prov = dict(attrs.get("provenance") or {})
    # A store converted with a label CSV: its provenance names the CSV (`--keep-paths`) or counts labels.
    labelled = prov.get("labels") is not None or bool(prov.get("n_labelled"))
    if labelled or not made_from(store, source):
        what = "a labelled store" if labelled else "a store"
        origin = "converted from another folder" if attrs.get("plan") else "not converted from a DICOM folder"
        raise UserError(refuse.format(f"holds {what} {origin}"))
    check_replaceable(store, what="ich predict --store")


def _check_paths(checkpoint: Path, src: Path | None, out: Path, store: Path | None, parents: bool) -> None:
    """Outputs are never inputs: the checks on `--store` and the three CSVs, before any work.

    `--store` lies inside no store, its folder exists (or `--parents`), and neither SOURCE nor the
    checkpoint lies inside it; each CSV is not a folder, SOURCE, the checkpoint, nor inside a store
    (`ichdata.outputs`).
    """
    from ichdata.outputs import check_output_file, check_store_target

    inputs = {"SOURCE": src, "CHECKPOINT": checkpoint}
    if store is not None:
        check_store_target(store, what="--store", parents=parents, inputs=inputs)
        if src is not None:  # None: a DICOMweb SOURCE pulled into a temporary folder, checked once there
            _check_store_target(store, src)
    for path, what in zip(
        (out, *_outputs(out)), ("--out", "--out's studies CSV", "--out's set-aside CSV"), strict=True
    ):
        check_output_file(path, what=what, parents=parents, inputs=inputs, stores={"--store": store})


def _convert(source: Path, store: Path, cluster: ClusterConfig, progress: bool, parents: bool) -> None:
    """Convert `source` into `store` with the conversion `ich convert` runs (no labels), on `cluster`."""
    from ichdata.config import ConvertConfig
    from ichdata.convert import convert

    convert(
        ConvertConfig(
            source=source, store=store, labels=None, overwrite=True, parents=parents, cluster=cluster
        ),
        progress=progress,
    )


def _is_url(source: str | os.PathLike[str]) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


def predict_folder(
    checkpoint: str | os.PathLike[str],
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    store: str | os.PathLike[str] | None = None,
    threshold: float = 0.5,
    device: str | None = None,
    cluster: ClusterConfig | None = None,
    progress: bool = True,
    parents: bool = False,
    log: Callable[[str], None] | None = print,
    sr: str | os.PathLike[str] | None = None,
    send: bool = False,
    landing: str | os.PathLike[str] | None = None,
    query: ArchiveQuery | None = None,
) -> PredictResult:
    """What `ich predict` runs: convert `source` (to `store`, or a temporary one), then `predict_store`.

    `source` may be a DICOMweb URL: its studies (`query`) are pulled first (`ichdata.pull`) into
    `landing` or a temporary folder. With `sr`, one DICOM SR per study is written there
    (`ichmodel.sr`); `send` stores them back into the archive at `source` with STOW-RS. A kept
    `store` is locked (`ichdata.lock`) from the checks to the last read of it. The conversion runs on
    `cluster` (default: a local one, as `ich convert`'s), whose options are checked with the others.
    """
    from ichdata.cluster import check_cluster
    from ichdata.pull import ArchiveQuery

    url = str(source) if _is_url(source) else None
    query = query or ArchiveQuery()
    src: Path | None
    if url is None:
        src = Path(source)
        if send or landing is not None or query != ArchiveQuery():
            raise UserError(
                f"{src}: --send, --landing and the archive filters need SOURCE to be a DICOMweb URL"
            )
        if not src.is_dir():
            raise UserError(f"{src}: no such folder; expected a folder of DICOM files or a DICOMweb URL")
    else:
        src = Path(landing) if landing is not None else None  # None: a temporary landing folder
    _check_threshold(threshold)
    cluster = cluster or ClusterConfig()
    check_cluster(cluster)
    from ichdata.lock import store_lock
    from ichmodel.evaluate import _device
    from ichmodel.models import load_model

    kept = Path(store) if store is not None else None
    _check_paths(Path(checkpoint), src, Path(out), kept, parents)
    if parents:
        Path(out).absolute().parent.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        # the checkpoint is read and checked before any work on the archive or the store
        loaded = load_model(Path(checkpoint), device=_device(device))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="ich-predict-"))
        if src is None:
            src = Path(tmp) / "landing"
        if kept is not None:
            if parents:
                kept.absolute().parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(store_lock(kept, command="ich predict"))
            _check_store_target(kept, src)  # again, now that no other writer can change it
        if url is not None:
            _pull(url, src, query, progress, log)
        st = kept if kept is not None else Path(tmp) / "store.zarr"
        if log is not None:
            log(f"converting {src} -> {st}")
        _convert(src, st, cluster, progress, parents)
        result = predict_store(
            checkpoint, st, out, threshold=threshold, device=device, progress=progress, loaded=loaded
        )
        if sr is not None or send:
            _write_and_send_srs(
                st, src, result, checkpoint, Path(sr) if sr is not None else Path(tmp) / "sr", loaded[1],
                url if send else None, query, log,
            )  # fmt: skip
    if log is not None:
        log(str(result))
        if result.n_set_aside:
            print(
                f"ich predict: {result.n_set_aside} files were set aside and have no prediction; "
                f"see {result.set_aside}",
                file=sys.stderr,
            )
    return result


def _pull(
    url: str, landing: Path, query: ArchiveQuery, progress: bool, log: Callable[[str], None] | None
) -> None:
    """`ich pull URL LANDING` with `query`; failed studies are named on stderr and left out."""
    from ichdata.pull import PullConfig, pull

    pulled = pull(PullConfig(url, landing, query=query), progress=progress)
    if log is not None:
        log(str(pulled))
    failures = pulled.failure_line()
    if failures is not None:
        print(f"ich predict: {failures}", file=sys.stderr)


def _write_and_send_srs(
    store: Path,
    source: Path,
    result: PredictResult,
    checkpoint: str | os.PathLike[str],
    sr_dir: Path,
    info: dict[str, Any],
    send_to: str | None,
    query: ArchiveQuery,
    log: Callable[[str], None] | None,
) -> None:
    """`ich predict --sr` and `--send`: one SR per study, stored back with STOW-RS when asked."""
    from ichdata.dicomweb import Archive, Retry, Transient
    from ichdata.store import open_store
    from ichmodel.sr import write_study_srs

    assert result.summary is not None
    name = f"ich {(info.get('model') or {}).get('name', 'model')}"
    srs = write_study_srs(open_store(store), source, result.summary, checkpoint, sr_dir, name)
    if srs.not_written:
        print(f"ich predict: {srs}; their predictions are in {result.predictions}", file=sys.stderr)
    elif log is not None:
        log(f"{srs} -> {sr_dir}")
    if send_to is None or not srs.written:
        return
    from pydicom import dcmread

    archive = Archive(send_to, ca_bundle=query.ca_bundle)
    for path in srs.written.values():
        ds = dcmread(path)
        try:
            Retry().call(partial(archive.store, [ds]))
        except Transient as exc:
            raise UserError(
                f"{send_to}: storing {path.name} failed ({exc}), after {Retry().attempts} tries"
            ) from None
    if log is not None:
        log(f"sent {len(srs.written)} SRs to {send_to} (STOW-RS)")


@dataclass(frozen=True)
class PredictConfig:
    """The options of `ich predict`."""

    checkpoint: Path = option(positional=True, metavar="CHECKPOINT", help="best.pt of an `ich train` run")
    source: str = option(
        positional=True,
        metavar="SOURCE",
        help="folder of DICOM files (searched recursively), or a DICOMweb URL (then the archive filters apply)",
    )
    out: Path = option(help="predictions CSV to write")
    store: Path | None = option(None, help="keep the converted store here (default: a temporary one)")
    threshold: float = option(0.5, help="p(any) at or above which a slice counts as flagged (0.5)")
    device: str | None = option(None, help="cpu or cuda (default: cuda when available)")
    progress: bool = option(True, flag="--quiet", help="no progress bars")
    parents: bool = option(
        False, help="create the parent folders of --out and --store when they do not exist"
    )
    sr: Path | None = option(
        None, metavar="OUT_DIR", help="also write one DICOM SR per study here (Comprehensive 3D SR, TID 1500)"
    )
    send: bool = option(False, help="store the SRs back into SOURCE's archive with STOW-RS (SOURCE a URL)")
    landing: Path | None = option(
        None, help="SOURCE a URL: pull into this landing folder, kept (default: a temporary one)"
    )
    # The conversion's cluster, as `ich convert`'s.
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


def predict_from_config(config: PredictConfig, query: ArchiveQuery | None = None) -> PredictResult:
    """What `ich predict` runs: `predict_folder` with the command line's options."""
    return predict_folder(
        config.checkpoint,
        config.source,
        config.out,
        store=config.store,
        threshold=config.threshold,
        device=config.device,
        cluster=config.cluster,
        progress=config.progress,
        parents=config.parents,
        sr=config.sr,
        send=config.send,
        landing=config.landing,
        query=query,
    )
