"""The commit of a conversion: the manifest beside the store, then every small array and the attributes.

Only the driver calls `finalize`, once every shard holds its done-marker. The manifest is the commit
record: a run killed after writing it re-plans to exactly this store. While the small arrays are
rewritten the store's state is `finalizing` (readers refuse it); then it is `complete`. The state
machine and the arrays are described in the README's store section.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ichdata import pathkeys
from ichdata.resume import load_salt, salt_check
from ichdata.scan import Manifest
from ichdata.store import (
    UNLABELLED,
    check_small_arrays,
    manifest_path,
    now_utc,
    software_version,
    write_committed,
    write_quarantine_csv,
)

if TYPE_CHECKING:
    import pandas as pd
    from zarr import Group

    from ichdata.config import ConvertConfig
    from ichdata.plan import Plan

_log = logging.getLogger(__name__)

#: The keys of the provenance's `config`, in the order stores have recorded them since before the cluster's
#: options had a dataclass of their own: one flat mapping, `ClusterConfig.kind` as `cluster` (its flag).
_CONFIG_KEYS = (
    "source",
    "store",
    "labels",
    "workers",
    "scheduler",
    "scheduler_file",
    "insecure_scheduler",
    "shard_size",
    "overwrite",
    "parents",
    "keep_paths",
    "oversubscribe",
    "cluster",
    "jobs",
    "queue",
    "cores",
    "memory",
    "walltime",
)


@dataclass
class ConvertResult:
    """The outcome of `ichdata.convert.convert_shards`: the final plan (after pixel-time failures) and the counts."""

    plan: Plan
    n_shards: int
    n_written: int
    n_skipped: int
    pixel_failures: pd.DataFrame
    elapsed_s: float


@dataclass
class ConvertSummary:
    """The one-line report of a conversion (`str()`), and its figures.

    Given a label CSV, it says how many images have labels; under half is also a logged warning
    (the CSV's ids are probably not the images').
    """

    store: Path
    n_slices: int  # rows in the store
    n_new: int  # rows this run added
    n_series: int
    n_studies: int
    n_files: int  # input files accounted for (store rows + files set aside)
    quarantined: dict[str, int]  # files set aside by this run, by reason
    n_quarantined_total: int
    n_shards_written: int
    n_shards_skipped: int
    elapsed_s: float = 0.0
    store_bytes: int = 0
    stages_s: dict[str, float] = field(default_factory=dict)
    n_labelled: int | None = None  # rows with labels, when this run was given a label CSV

    @property
    def slices_per_s(self) -> float:
        """Slices this run added per second of its wall time."""
        return self.n_new / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def __str__(self) -> str:
        q = sum(self.quarantined.values())
        why = ", ".join(f"{n} {r}" for r, n in sorted(self.quarantined.items()))
        parts = [
            f"{self.store}: wrote {self.n_new:,} slices ({self.n_slices:,} in store, {self.n_series:,} series, "
            f"{self.n_studies:,} studies)",
            *(
                []
                if self.n_labelled is None
                else [f"{self.n_labelled:,} of {self.n_slices:,} images labelled"]
            ),
            f"set aside {q:,} files" + (f" ({why})" if q else ""),
            f"{self.elapsed_s:.1f} s, {self.slices_per_s:,.0f} slices/s",
            f"store {self.store_bytes / 1e6:,.1f} MB",
        ]
        return "; ".join(parts)


def finalize(
    result: ConvertResult, *, config: ConvertConfig | None = None, started: float | None = None
) -> ConvertSummary:
    """Commit a conversion and return its summary.

    Args:
        result: what `ichdata.convert.convert_shards` returned (its plan and counts).
        config: the run's config, kept (resolved) in the store's provenance.
        started: `time.perf_counter()` at the start of the run, for the summary's wall time
            (default: the shard stage's own time).
    """
    import zarr

    p = result.plan
    keep_paths = config is not None and config.keep_paths
    group = zarr.open_group(str(p.store), mode="r+")
    salt = salt_check(load_salt(p.store, must_exist=False))  # the plan made it, when it was missing
    if _already_committed(result, group, keep_paths, salt):
        # Nothing written: the size the commit recorded holds (walking a store of ~12k shard folders
        # is seconds, minutes on a cold shared file system, of a daily ingest that found nothing new).
        recorded = group.attrs.get("store_bytes")
        return _summary(
            result,
            started,
            n_studies=int(group.attrs.get("n_studies", 0)),  # type: ignore[arg-type]
            store_bytes=int(recorded) if isinstance(recorded, int) else _du(p.store),
        )
    # The manifest is the commit record: a run killed after this line re-plans to exactly this store.
    table = p.manifest_table()
    Manifest(p.source, table).write(manifest_path(p.store))
    group.attrs["state"] = "finalizing"
    quarantine = p.quarantine[["path", "reason", "detail"]]
    source_path = p.rows["path"].to_numpy(dtype=str)
    shared = quarantine
    if not keep_paths:  # the store names files by their manifest rows (`ichdata.pathkeys`)
        source_path = pathkeys.keys(table, source_path)
        shared = quarantine.assign(
            path=pathkeys.keys(table, quarantine["path"]),
            detail=pathkeys.scrub_details(table, quarantine["detail"]),
        )
    write_committed(
        group,
        labels=p.labels,
        image_ids=p.rows["image_id"].to_numpy(dtype=str),
        study_offsets=p.study_offsets,
        series=p.series,
        slice_position=p.rows["slice_position"].to_numpy(dtype=np.float64),
        source_path=source_path,
        quarantine=shared,
    )
    write_quarantine_csv(p.store, quarantine)  # beside the store, local: the paths themselves
    n_studies = int(p.series["study_uid"].nunique())
    attrs = dict(group.attrs)
    attrs.pop("pixel_failures", None)
    attrs.update(
        {
            "state": "complete",
            pathkeys.ATTR: pathkeys.mode(keep_paths),
            "n_slices": p.n_slices,
            "n_series": len(p.series),
            "n_studies": n_studies,
            "shard_size": p.shard_size,
            "provenance": _provenance(result, config, dict(group.attrs.get("provenance") or {}), keep_paths),  # type: ignore[arg-type]
            "plan": {"config": p.store_config, "plan_hash": p.plan_hash},
            "shard_checksums": "conversion/shard_done",
            "salt_check": salt,
        }
    )
    store_bytes = _du(p.store)
    attrs["store_bytes"] = store_bytes  # before this attribute file is rewritten: within a few bytes
    group.attrs.put(attrs)
    return _summary(result, started, n_studies=n_studies, store_bytes=store_bytes)


def _summary(
    result: ConvertResult, started: float | None, *, n_studies: int, store_bytes: int
) -> ConvertSummary:
    p = result.plan
    elapsed = (time.perf_counter() - started) if started is not None else result.elapsed_s
    n_labelled = None if p.labels_source is None else _n_labelled(p.labels)
    if n_labelled is not None and 2 * n_labelled < p.n_slices:
        _log.warning(
            "%s: %s of %s images labelled; the rest are stored as 255 (unlabelled): the CSV's ID column "
            "must name the images' SOP Instance UIDs (RSNA: ID_…, the file stem)",
            p.labels_source,
            f"{n_labelled:,}",
            f"{p.n_slices:,}",
        )
    return ConvertSummary(
        store=p.store,
        n_slices=p.n_slices,
        n_new=p.n_new,
        n_series=len(p.series),
        n_studies=n_studies,
        n_files=p.n_slices + p.n_set_aside,
        quarantined=p.quarantined_by_reason(new_only=True),
        n_quarantined_total=p.n_set_aside,
        n_shards_written=result.n_written,
        n_shards_skipped=result.n_skipped,
        elapsed_s=elapsed,
        store_bytes=store_bytes,
        n_labelled=n_labelled,
    )


def _n_labelled(labels: np.ndarray) -> int:
    """Rows that have labels (`any` is not 255: the CSV had the image, now or in an earlier run)."""
    return int((labels[:, -1] != UNLABELLED).sum())


def _already_committed(result: ConvertResult, group: Group, keep_paths: bool, salt: str) -> bool:
    """Whether the store already holds exactly this plan, committed: a re-run that found nothing new.

    Then there is nothing to write (the daily ingest of an unchanged landing folder): the same rows,
    series, labels and shard keys (the plan hash), nothing set aside by this run, the same label CSV
    (by name too, with `--keep-paths`), the same choice of `--keep-paths`, the plan settings recorded as
    this version records them (a store written before `source_id` is committed again, without its
    source's path), the salt's check value recorded, `images` no longer than the committed rows, and
    every small array intact and with checksums (a damaged one, or one an earlier release wrote
    without, is rewritten from the plan).
    """
    p = result.plan
    attrs = group.attrs
    prov: dict[str, Any] = dict(attrs.get("provenance") or {})  # type: ignore[arg-type]
    plan_attr: dict[str, Any] = dict(attrs.get("plan") or {})  # type: ignore[arg-type]
    if (
        p.overwrite
        or p.n_new
        or result.n_written
        or len(result.pixel_failures)
        or attrs.get("state") != "complete"
        or "pixel_failures" in attrs
        or bool(p.quarantine["new"].any())
        or prov.get("n_quarantined") != p.n_set_aside
        or (keep_paths and p.labels_source is not None and prov.get("labels") != p.labels_source)
        or attrs.get(pathkeys.ATTR, pathkeys.KEPT) != pathkeys.mode(keep_paths)
        or attrs.get("salt_check") != salt
        or plan_attr.get("config") != p.store_config
        or "config_hash" in plan_attr
        or (not keep_paths and _names_paths(prov))
        or not manifest_path(p.store).is_file()
    ):
        return False
    images = group.get("images")
    if images is None or getattr(images, "shape", (None,))[0] != p.n_slices:
        return False
    # Last: the plan hash reads every shard key, the check reads every chunk of the small arrays.
    if plan_attr.get("plan_hash") != p.plan_hash:
        return False
    damaged, unchecked = check_small_arrays(p.store, group)
    return not damaged and not unchecked


def _names_paths(prov: dict[str, Any]) -> bool:
    """Whether a store's provenance names a path (as every store did before `--keep-paths` kept them out)."""
    config = prov.get("config") or {}
    return any(prov.get(k) is not None for k in ("source", "labels")) or any(
        isinstance(config, dict) and config.get(k) is not None
        for k in ("source", "store", "labels", "scheduler_file")
    )


def _provenance(
    result: ConvertResult, config: ConvertConfig | None, prev: dict[str, Any], keep_paths: bool
) -> dict[str, Any]:
    """The store's `provenance` attribute after this run (`prev`: the one before it).

    Paths (the source folder, the label CSV, the store, a scheduler file) only with `--keep-paths`:
    folder names may name patients, and the store is what users share. The manifest beside the store
    keeps the source folder.
    """
    p = result.plan
    now = now_utc()
    return {
        "source": str(p.source) if keep_paths else None,
        "software": software_version(),
        "created": prev.get("created", now),
        "updated": now,
        "n_files": p.n_slices + p.n_set_aside,
        "n_converted": p.n_slices,
        "n_quarantined": p.n_set_aside,
        "quarantined_by_reason": p.quarantined_by_reason(),
        "labels": (p.labels_source or prev.get("labels")) if keep_paths else None,
        "n_labelled": _n_labelled(p.labels),
        "config": None
        if config is None
        else {
            k: (None if v is None else (str(v) if keep_paths else None) if isinstance(v, Path) else v)
            for k, v in _flat_config(config).items()
        },
    }


def _flat_config(config: ConvertConfig) -> dict[str, Any]:
    """`config` as the one flat mapping the provenance records: `_CONFIG_KEYS` first, in their order."""
    flat = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "cluster"}
    for f in dataclasses.fields(config.cluster):
        flat["cluster" if f.name == "kind" else f.name] = getattr(config.cluster, f.name)
    return {**{k: flat.pop(k) for k in _CONFIG_KEYS if k in flat}, **flat}


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, f)).st_size
    return total


__all__ = ["ConvertResult", "ConvertSummary", "finalize"]
