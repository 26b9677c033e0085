"""`ich features`: run trained CNNs once over every slice of a store and keep the embeddings.

The sequence stage of the RSNA winners' two-stage route trains on these vectors instead of running
the frozen CNN over every slice in every epoch (`ich train --features`). One checkpoint gives
in-sample features; the K fold runs of `ich train --folds K` give out-of-fold features, every row from
the fold model that did not train on it and the patients no fold saw from the mean of the K. The
group's format is `ichdata.features`; `plan_features` checks everything it reads before any work,
and `write_features` is the one place that writes the group, shard by shard, each whole and then
marked done, so a killed run resumes to the same bytes and a store that grew costs only its new rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ichdata import features as fgroup
from ichdata.errors import UserError
from ichdata.options import option
from ichdata.store import Store, open_store

if TYPE_CHECKING:
    import torch
    from torch import nn
    from zarr import Group

__all__ = [
    "TTA_VARIANTS",
    "FeaturesConfig",
    "FeaturesPlan",
    "FeaturesSummary",
    "embed",
    "extract_features",
    "plan_features",
    "write_features",
]

#: Test-time variants of a slice whose embeddings are averaged (`--tta`), as both winners did.
TTA_VARIANTS: tuple[str, ...] = ("none", "hflip", "vflip")
#: Slices per CNN call unless `--batch-size` says otherwise (GPU, CPU).
_BATCH_GPU, _BATCH_CPU = 256, 32


@dataclass(frozen=True)
class FeaturesConfig:
    """The options of `ich features`."""

    checkpoints: list[Path] = option(
        positional=True,
        nargs="+",
        metavar="CHECKPOINT",
        help="best.pt of an `ich train` run, or its run directory; the K run directories of "
        "`ich train --folds K` for out-of-fold features",
    )
    store: Path = option(positional=True, metavar="STORE", help="the store whose slices to embed")
    out: Path = option(metavar="FEATURES", help="the features group to write (a path, like a store)")
    tta: list[str] | None = option(
        None,
        choices=TTA_VARIANTS,
        help="embed each slice as the mean over these variants (default: none)",
    )
    batch_size: int | None = option(None, help="slices per CNN call (default 256 on GPU, 32 on CPU)")
    shard_size: int | None = option(
        None, help="rows per shard file of a new group (default: the store's)", metavar="K"
    )
    device: str = option("auto", help="cpu, cuda or auto (default: cuda when available)")
    workers: int | None = option(None, help="DataLoader workers reading the store (default: min(8, cores))")
    overwrite: bool = option(False, help="replace a features group made from other checkpoints, TTA or store")
    progress: bool = option(True, flag="--quiet", help="no progress bar")


@dataclass(frozen=True)
class _Source:
    """One checkpoint the features come from, and what its CNN trained on."""

    path: Path
    sha256: str
    info: dict[str, Any]
    #: series UIDs its run trained on (`split.json` beside it); None when unknown
    trained_series: frozenset[str] | None
    split: dict[str, Any] | None

    @property
    def record(self) -> dict[str, Any]:
        """What the group's attribute `checkpoints` says of it."""
        model = self.info["model"]
        cfg = self.info.get("config") or {}
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "model": model["name"],
            "backbone": model["backbone"],
            "epoch": self.info.get("epoch"),
            "val_loss": self.info.get("val_loss"),
            "fold": cfg.get("fold"),
            "folds": cfg.get("folds"),
        }


@dataclass
class FeaturesPlan:
    """What `ich features` will write, checked against its inputs (`plan_features`)."""

    out: Path
    store: Store
    sources: list[_Source]
    tta: list[str]
    dim: int
    shard_size: int
    batch_size: int | None
    device: str
    workers: int
    overwrite: bool
    #: (N,) int8: the source that makes each row; -1 the mean of all of them
    assignment: np.ndarray
    #: (N,) bool: whether a CNN that makes the row trained on its series
    in_sample: np.ndarray
    #: (N,) bool: whether any of the sources' CNNs trained on its series
    trained_on: np.ndarray
    config_hash: str = ""

    @property
    def route(self) -> str:
        """`in-sample` (one checkpoint) or `out-of-fold` (the K fold runs)."""
        return "in-sample" if len(self.sources) == 1 else "out-of-fold"


@dataclass
class FeaturesSummary:
    """The one-line report of `ich features` (`str()`), and its figures."""

    out: Path
    n_slices: int
    dim: int
    n_computed: int
    n_shards_written: int
    n_shards_skipped: int
    route: str
    n_in_sample: int
    n_mean: int
    elapsed_s: float = 0.0

    @property
    def slices_per_s(self) -> float:
        """Rows computed per second of the run's wall time."""
        return self.n_computed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        head = (
            f"{self.out}: features of {self.n_slices:,} slices × {self.dim} ({self.n_computed:,} computed now: "
            f"{self.n_shards_written:,} shards written, {self.n_shards_skipped:,} already done), "
            f"{self.elapsed_s:.1f} s, {self.slices_per_s:,.1f} slices/s"
        )
        if self.route == "in-sample":
            how = (
                f"in-sample features from one checkpoint: {self.n_in_sample:,} of the {self.n_slices:,} rows "
                "are of series its CNN trained on (for out-of-fold features: `ich train --folds K`)"
            )
        else:
            how = (
                "out-of-fold features: each row from the fold model that did not train on it, "
                f"{self.n_mean:,} rows of patients no fold saw from the mean of all folds"
            )
        return f"{head}; {how}"


# --- the plan: every input checked before any work ----------------------------------------------------


def _checkpoint_path(given: Path) -> Path:
    """A checkpoint file, or the `best.pt` of a run directory."""
    if given.is_dir():
        best = given / "best.pt"
        if not best.is_file():
            raise UserError(
                f"{given}: a folder without best.pt; expected a checkpoint or the --out of `ich train`"
            )
        return best.absolute()
    if not given.is_file():
        raise UserError(f"checkpoint {given}: no such file or run directory")
    return given.absolute()


def _source(given: Path) -> _Source:
    from ichmodel.checkpoint import checkpoint_info, read_checkpoint
    from ichmodel.data import split_document

    path = _checkpoint_path(given)
    tree = read_checkpoint(path)
    split_file = path.parent / "split.json"
    split = split_document(split_file) if split_file.is_file() else None
    trained = frozenset(str(u) for u in split["train_series"]) if split and "train_series" in split else None
    info = checkpoint_info(tree)
    info["dim"] = int(tree["state_dict"]["fc.weight"].shape[1])  # the classifier reads the pooled features
    return _Source(path, fgroup.file_sha256(path), info, trained, split)


def _check_sources(sources: list[_Source], store: Store) -> None:
    """One backbone, the store's classes and image size; several checkpoints must be the K folds of one split."""
    first = sources[0]
    for s in sources:
        model = s.info["model"]
        if model["backbone"] != first.info["model"]["backbone"]:
            raise UserError(
                f"checkpoint {s.path}: backbone {model['backbone']!r}, but {first.path} has "
                f"{first.info['model']['backbone']!r}; features come from one backbone"
            )
        if tuple(s.info.get("classes") or store.classes) != tuple(store.classes):
            raise UserError(f"checkpoint {s.path}: trained on other classes than store {store.path} has")
        if s.info.get("image_size", store.image_size) != store.image_size:
            raise UserError(
                f"checkpoint {s.path}: trained on {s.info['image_size']}² slices, store {store.path} "
                f"holds {store.image_size}²"
            )
    if len(sources) == 1:
        return
    k = len(sources)
    hint = f"several checkpoints make out-of-fold features only as the {k} fold runs of one `ich train --folds {k}`"
    keys = set()
    for s in sources:
        cfg = s.info.get("config") or {}
        if s.split is None or cfg.get("folds") != k or s.split.get("folds") != k:
            raise UserError(
                f"checkpoint {s.path}: not a fold run of {k} folds (no split.json with folds {k}); {hint}"
            )
        keys.add((cfg.get("seed"), cfg.get("val_fraction"), tuple(s.split["test_patients"])))
    folds = sorted(int((s.info.get("config") or {})["fold"]) for s in sources)
    if folds != list(range(k)) or len(keys) != 1:
        raise UserError(
            f"checkpoints {', '.join(str(s.path) for s in sources)}: folds {folds} of different or repeated splits; {hint}"
        )


def _check_out(out: Path, store: Store, sources: list[_Source]) -> None:
    """Outputs are never inputs: FEATURES may not be, hold or lie inside the store or a checkpoint."""
    o = Path(os.path.realpath(out))
    for what, p in [("STORE", Path(store.path)), *(("checkpoint", s.path) for s in sources)]:
        inp = Path(os.path.realpath(p))
        if o == inp or inp.is_relative_to(o) or o.is_relative_to(inp):
            raise UserError(f"--out {out}: is, holds or lies inside the {what} {p}; choose another path")


def _assignment(sources: list[_Source], store: Store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: the source that makes it (-1: the mean of all), whether it trained on the row, whether any did."""
    series_of_row = np.repeat(np.arange(store.n_series), np.diff(store.study_offsets))
    uids = store.series["series_uid"].to_numpy(dtype=str)
    if len(sources) == 1:
        which = np.zeros(store.n_slices, dtype=np.int8)
    else:
        fold_of_patient = {p: k for k, s in enumerate(sources) for p in (s.split or {})["val_patients"]}
        per_series = np.array(
            [fold_of_patient.get(p, -1) for p in store.series["patient_key"].tolist()], dtype=np.int8
        )
        which = per_series[series_of_row]
    in_sample = np.zeros(store.n_series, dtype=bool)
    trained_on = np.zeros(store.n_series, dtype=bool)
    for k, s in enumerate(sources):
        makes = np.isin(np.arange(store.n_series), series_of_row[(which == k) | (which == -1)])
        seen = (
            np.ones(store.n_series, dtype=bool)
            if s.trained_series is None
            else np.isin(uids, list(s.trained_series))
        )
        in_sample |= makes & seen
        trained_on |= seen
    return which, in_sample[series_of_row], trained_on[series_of_row]


def plan_features(config: FeaturesConfig) -> FeaturesPlan:
    """Check every input of `ich features` (nothing is written) and decide what the group holds.

    Raises:
        UserError: a missing or damaged checkpoint, an unfinished store, checkpoints of different
            backbones or not the folds of one split, an unknown TTA variant, an output path that is
            an input.
    """
    tta = list(config.tta or ["none"])
    unknown = [v for v in tta if v not in TTA_VARIANTS]
    if unknown or len(set(tta)) != len(tta):
        raise UserError(f"--tta {' '.join(tta)}: expected distinct variants among {', '.join(TTA_VARIANTS)}")
    if config.batch_size is not None and config.batch_size < 1:
        raise UserError(f"--batch-size {config.batch_size}: must be at least 1")
    if config.shard_size is not None and config.shard_size < 1:
        raise UserError(f"--shard-size {config.shard_size}: must be at least 1")
    if config.device not in ("auto", "cpu", "cuda") and not config.device.startswith("cuda:"):
        raise UserError(f"--device {config.device!r}: expected cpu, cuda or auto")
    if not config.checkpoints:
        raise UserError("no checkpoint given")
    store = open_store(config.store)
    sources = [_source(Path(c)) for c in config.checkpoints]
    if len({s.path for s in sources}) != len(sources):
        raise UserError("the same checkpoint is given twice")
    _check_sources(sources, store)
    out = Path(config.out).absolute()
    _check_out(out, store, sources)
    which, in_sample, trained_on = _assignment(sources, store)
    workers = config.workers if config.workers is not None else min(8, os.cpu_count() or 1)
    plan = FeaturesPlan(
        out=out,
        store=store,
        sources=sources,
        tta=tta,
        dim=int(sources[0].info["dim"]),
        shard_size=int(config.shard_size or store.shard_size),
        batch_size=config.batch_size,
        device=config.device,
        workers=workers,
        overwrite=config.overwrite,
        assignment=which,
        in_sample=in_sample,
        trained_on=trained_on,
    )
    settings = {"format": fgroup.FEATURES_FORMAT, "checkpoints": [s.sha256 for s in sources], "tta": tta}
    plan.config_hash = hashlib.blake2b(json.dumps(settings).encode(), digest_size=16).hexdigest()
    return plan


# --- computing embeddings ------------------------------------------------------------------------------


def _flip(x: torch.Tensor, variant: str) -> torch.Tensor:
    if variant == "hflip":
        return x.flip(-1)
    if variant == "vflip":
        return x.flip(-2)
    return x


def embed(encoder: nn.Module, images: torch.Tensor, tta: Sequence[str] = ("none",)) -> torch.Tensor:
    """Pooled CNN features (N, F) float32 of uint8 slices (N, 3, S, S): the mean over the `tta` variants.

    `encoder` is a model's `.encoder` (normalisation + backbone), in eval mode, on the images' device;
    bf16 autocast on GPU. With no TTA this is exactly what the model's own forward pass computes for
    each slice, so a sequence head on these features is the composed model (tested).
    """
    import torch

    from ichmodel.loop import autocast

    x = images.float().div_(255)
    total: torch.Tensor | None = None
    with torch.no_grad():
        for v in tta:
            with autocast(x.device):
                f = encoder(_flip(x, v)).float()
            total = f if total is None else total + f
    assert total is not None
    return total / len(tta)


class _ShardImages:
    """The store rows each job computes, read whole shards at a time and checked (`ImageReader`).

    A map-style dataset of jobs `(shard, first row to compute, end row)` for a DataLoader.
    """

    def __init__(self, store: Store, jobs: list[tuple[int, int, int, int]]) -> None:
        from ichmodel.reader import ImageReader, resolve_reader

        self.jobs = jobs
        self.reader = ImageReader(Path(store.path), resolve_reader("auto"), store.n_slices)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor]:
        import torch

        _, _, a, b = self.jobs[k]
        return k, torch.from_numpy(np.ascontiguousarray(self.reader.read(a, b)))


def _encoders(plan: FeaturesPlan, device: torch.device) -> tuple[list[nn.Module], nn.Module | None]:
    """The sources' CNNs on `device`, eval mode (and their mean, for out-of-fold features)."""
    import torch

    from ichmodel.models import load_model, mean_encoder

    encoders: list[nn.Module] = []
    for s in plan.sources:
        model, _ = load_model(s.path, device=device)
        encoder = cast(Any, model).encoder
        if device.type == "cuda":
            encoder.to(memory_format=torch.channels_last)
            encoder.channels_last = True
        encoders.append(encoder.eval())
    return encoders, (mean_encoder(encoders).eval() if len(encoders) > 1 else None)


def _embed_rows(
    which: np.ndarray,
    images: torch.Tensor,
    encoders: list[nn.Module],
    mean: nn.Module | None,
    tta: list[str],
    batch: int,
    device: torch.device,
) -> np.ndarray:
    """float16 (n, D) features of `images` (n uint8 slices), row j from the encoder `which[j]` names.

    The batches are a function of the rows alone (each encoder's rows in order, `batch` at a time),
    so the same rows give the same bytes however often they are computed.
    """
    import torch

    out: np.ndarray | None = None
    for k in [*range(len(encoders)), -1]:
        idx = np.flatnonzero(which == k)
        enc = encoders[k] if k >= 0 else mean
        for j in range(0, len(idx), batch):
            assert enc is not None
            sel = idx[j : j + batch]
            x = images.index_select(0, torch.from_numpy(sel)).to(device, non_blocking=True)
            f = embed(enc, x, tta).cpu().numpy()
            if out is None:
                out = np.empty((len(which), f.shape[1]), dtype=np.float32)
            out[sel] = f
    assert out is not None
    return out.astype(np.float16)


# --- writing the group --------------------------------------------------------------------------------


def _output_group(plan: FeaturesPlan) -> Group | None:
    """The features group already at `plan.out` when it may be continued; None when there is none.

    Raises:
        UserError: something else is there, or a features group made from other checkpoints, TTA or
            store (unless `--overwrite`, which replaces a features group and nothing else).
    """
    import zarr

    out = plan.out
    if not out.exists() and not out.is_symlink():
        return None
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()
        return None
    if not fgroup.is_features_group(out):
        raise UserError(
            f"--out {out}: exists and is not a features group; choose another path (nothing was changed)"
        )
    group = zarr.open_group(str(out), mode="r+")
    attrs: dict[str, Any] = dict(group.attrs)
    why = None
    if attrs.get("config_hash") != plan.config_hash:
        made = ", ".join(str(c.get("path")) for c in attrs.get("checkpoints") or []) or "other settings"
        why = f"made from other checkpoints or TTA ({made}, TTA {attrs.get('tta')})"
    elif (
        attrs.get("state") == "complete"
        and fgroup.store_relation(attrs.get("store") or {}, plan.store) == "other"
    ):
        why = f"made from another store ({(attrs.get('store') or {}).get('path')})"
    if why is None:
        return group
    if not plan.overwrite:
        raise UserError(
            f"--out {out}: a features group {why}; pass --overwrite to replace it, or choose another --out"
        )
    fgroup.remove_features(out)
    return None


def _jobs(plan: FeaturesPlan, group: Group, keys: list[str]) -> tuple[list[tuple[int, int, int, int]], int]:
    """Shards to write as (shard, first row, first row to compute, end row), and how many are done.

    A marked shard whose key holds is done; a shard whose marker covers its first rows (the last
    shard before the store grew) keeps those rows, when they still match their checksum, and
    computes the rest.
    """
    ids = plan.store.image_id
    markers = fgroup.read_markers(group)
    k = plan.shard_size
    jobs: list[tuple[int, int, int, int]] = []
    done = 0
    for i, key in enumerate(keys):
        a, b = i * k, min((i + 1) * k, plan.store.n_slices)
        m = markers[i] if i < len(markers) else None
        if m is not None and m.rows == b - a and m.key == key:
            done += 1
        elif (
            m is not None
            and 0 < m.rows < b - a
            and m.key == fgroup.shard_key(plan.config_hash, ids[a : a + m.rows].tolist())
            and _intact(group, a, m)
        ):
            jobs.append((i, a, a + m.rows, b))
        else:
            jobs.append((i, a, a, b))
    return jobs, done


def _intact(group: Group, start: int, marker: fgroup.Marker) -> bool:
    """Whether the first `marker.rows` rows of the shard at `start` still match the marker's checksum."""
    from ichdata.shardfile import shard_checksum

    try:
        return shard_checksum(fgroup.read_rows(group, start, start + marker.rows)) == marker.checksum
    except Exception:  # an unreadable shard file: computed again
        return False


def _commit_attrs(plan: FeaturesPlan, encoders_meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "config_hash": plan.config_hash,
        "n_slices": plan.store.n_slices,
        "dim": plan.dim,
        "shard_size": plan.shard_size,
        "dtype": "float16",
        "route": plan.route,
        "store": fgroup.store_identity(plan.store),
        "checkpoints": [
            {**s.record, "rows": int((plan.assignment == k).sum())} for k, s in enumerate(plan.sources)
        ],
        "rows_from_mean": int((plan.assignment == -1).sum()),
        "rows_by": "the array `checkpoint`: index into `checkpoints`, -1 = the mean of all of them",
        "tta": plan.tta,
        "classes": list(plan.store.classes),
        "image_size": plan.store.image_size,
        **encoders_meta,
    }


def write_features(plan: FeaturesPlan, *, progress: bool = True) -> FeaturesSummary:
    """Write the features group `plan.out`: the one place that does, from what is there to the commit.

    Everything that reads what is at `plan.out` and decides what to write happens inside this call
    (one writer per group: DESIGN.md "Trust"). A group of this plan that is complete for this store
    is left untouched and nothing is computed; one behind the store (rows appended) gets its new
    rows; an unfinished one resumes after its last marked shard.
    """
    from ichdata.lock import store_lock

    plan.out.parent.mkdir(parents=True, exist_ok=True)
    # One writer per group, by the lock `ich convert` takes on a store (`ichdata.lock`): a second
    # `ich features` onto the same FEATURES is refused, naming this one.
    with store_lock(plan.out, command="ich features"):
        return _write_features(plan, progress=progress)


def _write_features(plan: FeaturesPlan, *, progress: bool) -> FeaturesSummary:
    from ichmodel.runtime import select_device

    t0 = time.perf_counter()
    store = plan.store
    group = _output_group(plan)
    found: dict[str, Any] = dict(group.attrs) if group is not None else {}
    plan.shard_size = int(found.get("shard_size") or plan.shard_size)  # a group keeps its shard size
    if found.get("state") == "complete" and fgroup.store_relation(found.get("store") or {}, store) == "same":
        return _summary(plan, 0, 0, -(-store.n_slices // plan.shard_size), t0)
    if group is None:
        group = fgroup.create_features(plan.out, store.n_slices, plan.dim, plan.shard_size)
        group.attrs.update({"config_hash": plan.config_hash, "shard_size": plan.shard_size})
    else:
        fgroup.grow_features(group, store.n_slices)
    k = plan.shard_size
    ids = store.image_id
    keys = [fgroup.shard_key(plan.config_hash, ids[a : a + k].tolist()) for a in range(0, store.n_slices, k)]
    jobs, n_done = _jobs(plan, group, keys)
    device = select_device(plan.device)
    batch = plan.batch_size or (_BATCH_GPU if device.type == "cuda" else _BATCH_CPU)
    n_rows = sum(b - c for _, _, c, b in jobs)
    meta: dict[str, Any] = {"extraction": {"device": device.type, "batch_size": batch}}
    if jobs or "normalisation" not in found:  # (a run killed just before its commit has no job left)
        encoders, mean = _encoders(plan, device)
        first = encoders[0]
        meta["normalisation"] = {
            "scale": "uint8 / 255",
            "mean": first.mean.reshape(-1).tolist(),  # type: ignore[operator]
            "std": first.std.reshape(-1).tolist(),  # type: ignore[operator]
        }
        with _deterministic(device), _bar(n_rows, progress) as bar:
            for job, images in _loader(plan, jobs, device):
                i, a, c, b = job
                block = np.empty((b - a, plan.dim), dtype=np.float16)
                if c > a:
                    block[: c - a] = fgroup.read_rows(group, a, c)
                block[c - a :] = _embed_rows(
                    plan.assignment[c:b], images, encoders, mean, plan.tta, batch, device
                )
                fgroup.write_shard(group, i, block, keys[i])
                bar.update(b - c)
    else:
        meta["normalisation"] = found["normalisation"]
    fgroup.commit(
        group,
        checkpoint=plan.assignment,
        in_sample=plan.in_sample,
        trained_on=plan.trained_on,
        attrs=_commit_attrs(plan, meta),
    )
    return _summary(plan, n_rows, len(jobs), n_done, t0)


def _loader(
    plan: FeaturesPlan, jobs: list[tuple[int, int, int, int]], device: torch.device
) -> Iterator[tuple[tuple[int, int, int, int], torch.Tensor]]:
    """Each job with its images (uint8, pinned on GPU), read ahead by DataLoader workers."""
    from torch.utils.data import DataLoader

    ds = _ShardImages(plan.store, jobs)
    workers = min(plan.workers, len(jobs))
    kwargs: dict[str, Any] = {"prefetch_factor": 2} if workers else {}
    loader: DataLoader[Any] = DataLoader(
        cast(Any, ds),
        batch_size=None,
        shuffle=False,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        **kwargs,
    )
    for k, images in loader:
        yield jobs[int(k)], images


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    """Run without cuDNN autotuning, with deterministic kernels: the same rows give the same bytes."""
    import torch

    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved


@contextlib.contextmanager
def _bar(total: int, progress: bool) -> Iterator[Any]:
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="features", unit="slice", disable=not progress, file=sys.stderr) as bar:
        yield bar


def _summary(plan: FeaturesPlan, n_rows: int, written: int, done: int, t0: float) -> FeaturesSummary:
    return FeaturesSummary(
        out=plan.out,
        n_slices=plan.store.n_slices,
        dim=plan.dim,
        n_computed=n_rows,
        n_shards_written=written,
        n_shards_skipped=done,
        route=plan.route,
        n_in_sample=int(plan.in_sample.sum()),
        n_mean=int((plan.assignment == -1).sum()),
        elapsed_s=time.perf_counter() - t0,
    )


def extract_features(config: FeaturesConfig) -> FeaturesSummary:
    """What `ich features` runs: check the inputs (`plan_features`), then write the group (`write_features`)."""
    plan = plan_features(config)
    return write_features(plan, progress=config.progress)
