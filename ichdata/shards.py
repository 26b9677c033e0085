"""The shard tasks of a conversion: render a shard's slices, write the whole shard, then its done-marker.

`prepare_store` sizes the store for a plan; `convert_shard_group` is the Dask task of a few consecutive
shards (`group_size` of them), each converted by `convert_shard`. Exactly one task writes a shard, in one
assignment (a partial write into a shard reads-modifies-writes it, and two writers on one shard lose
slices: zarr-python #3682/#3683), and only the driver writes the small arrays (`ichdata.finalize`).
The done-marker contract is in the README's store section.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ichdata.reasons import Reason
from ichdata.shardfile import shard_checksum, write_images
from ichdata.store import (
    ICH_ATTR,
    N_CHANNELS,
    array,
    base_attrs,
    create_images,
    create_shard_done,
    manifest_path,
    open_group,
    quarantine_csv_path,
)
from ichdata.storefiles import check_replaceable, remove_ich_files

if TYPE_CHECKING:
    from zarr import Array, Group

    from ichdata.plan import Plan


@dataclass(frozen=True)
class ShardDone:
    """What a shard task reports: written (`failures` empty) or not (the files that failed to render)."""

    index: int
    key: str
    n_rows: int
    checksum: str = ""
    failures: tuple[tuple[str, str, str], ...] = ()  # (path relative to the source, reason, detail)
    elapsed_s: float = 0.0


def convert_shard(
    store: str,
    index: int,
    start: int,
    key: str,
    sources: list[str | None],
    source_root: str,
    image_size: int,
    layouts: list[str] | None = None,
    identities: list[tuple[int | None, int | None, int | None]] | None = None,
) -> ShardDone:
    """The work of one shard: render every row, write the whole shard, then its done-marker.

    `sources[j]` is the file of row `start + j`, or None for a row already in the store (copied from
    there: an append rewrites the last partial shard without re-reading its old DICOMs). `layouts[j]`
    is the scan's pixel layout of that file (`ichdata.dicom.read_header_layout`; "" when unknown): the
    pixels are read without parsing the header a second time. `identities[j]` is what the scan saw of
    the file (`ichdata.dicom.FileIdentity`): a file replaced since fails as `changed_during_conversion`
    rather than being stored under the header facts of the one scanned. A file that fails to render
    is reported in `failures` and nothing is written.
    """
    from ichdata.dicom import FileIdentity, SliceError, read_rendered_layout

    t0 = time.perf_counter()
    images, markers = _open_for_shards(store)
    n = len(sources)
    block = np.empty((n, N_CHANNELS, image_size, image_size), dtype=np.uint8)
    n_old = sum(1 for s in sources if s is None)
    if n_old:
        if any(s is not None for s in sources[:n_old]) or any(s is None for s in sources[n_old:]):
            raise RuntimeError(f"shard {index}: rows already in the store must come first")
        block[:n_old] = images[start : start + n_old]
    failures: list[tuple[str, str, str]] = []
    for j in range(n_old, n):
        path = sources[j]
        assert path is not None
        try:
            expect = FileIdentity(*identities[j]) if identities else None
            read_rendered_layout(path, layouts[j] if layouts else "", image_size, out=block[j], expect=expect)
        except SliceError as exc:
            failures.append((os.path.relpath(path, source_root), exc.reason, exc.detail))
        except Exception as exc:  # a reader bug on one file must not stop a 752k-file run
            failures.append(
                (os.path.relpath(path, source_root), Reason.UNDECODABLE, _failure_detail(exc, path))
            )
    if failures:
        return ShardDone(index, key, n, failures=tuple(failures), elapsed_s=time.perf_counter() - t0)
    write_images(images, start, block)
    checksum = shard_checksum(block)
    markers[index] = f"{key}:{checksum}"
    return ShardDone(index, key, n, checksum=checksum, elapsed_s=time.perf_counter() - t0)


def _failure_detail(exc: Exception, path: str) -> str:
    """The quarantine detail of a file that failed to render with `exc`, naming no file.

    The row names the file (by its key in a store without `--keep-paths`); an OS error's message
    carries the path (a file removed since the scan: `[Errno 2] No such file or directory: '/…'`).
    """
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__}: {exc}".replace(path, "the file")


#: Inside a shard group task (`convert_shard_group`): the arrays it has opened, by store; else unset.
_OPEN = threading.local()


def _open_for_shards(store: str) -> tuple[Array, Array]:
    """The store's `images` and done-markers, opened read-write.

    Once per shard group task (which keeps them for its shards: opening is a noticeable part of a shard's
    time), else now.
    """
    opened: dict[str, tuple[Array, Array]] | None = getattr(_OPEN, "arrays", None)
    if opened is not None and store in opened:
        return opened[store]
    import zarr

    group = zarr.open_group(store, mode="r+")
    images, markers = array(group, "images"), array(group, "conversion/shard_done")
    if opened is not None:
        opened[store] = (images, markers)
    return images, markers


class ShardTaskError(Exception):
    """What a shard group task raises when one of its shards raised (not a bad file: an I/O error, a bug).

    The shard's index and the original exception, for the driver's message.
    """

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(index, error)
        self.index, self.error = index, error

    def __str__(self) -> str:
        return f"shard {self.index}: {type(self.error).__name__}: {self.error}"


def convert_shard_group(
    convert_one: Callable[..., ShardDone], jobs: list[tuple[Any, ...]]
) -> list[ShardDone]:
    """The Dask task of a few consecutive shards: `convert_one(*args)` for each of `jobs` in order.

    The store is opened once for all of them. Stops after a shard with failures (the driver re-plans
    before any later shard is written); a shard that raises ends the task with a `ShardTaskError`
    naming it (the shards before it are written, and their markers say so). `convert_one` is
    `convert_shard`, passed in so that a stand-in a test installs reaches the workers.
    """
    _OPEN.arrays = {}
    out: list[ShardDone] = []
    try:
        for args in jobs:
            try:
                done = convert_one(*args)
            except Exception as exc:
                raise ShardTaskError(args[1], exc) from exc
            out.append(done)
            if done.failures:
                break
    finally:
        _OPEN.arrays = None
    return out


#: Shards per task at most: about a second of one worker with the default shard size.
MAX_SHARDS_PER_TASK = 16


def group_size(remaining: int, n_threads: int) -> int:
    """Shards in the next task, given `remaining` shards still to submit.

    Half of each worker thread's share (at most `MAX_SHARDS_PER_TASK`), so that tasks shrink towards
    the end, down to one shard (guided self-scheduling). Fewer, larger tasks cut distributed's cost per
    task (the driver's CPU, on a core a worker needs, and the worker's between two tasks) where there
    are many shards; the small last tasks keep every worker busy to the end. A whole share per task is
    worse: with two tasks in flight per worker, the two largest can land on the same one.
    `bench/convert_timeline.py` shows the tasks and how far apart the workers finish.
    """
    return max(1, min(MAX_SHARDS_PER_TASK, remaining // (2 * max(1, n_threads))))


def remove_store(store: Path) -> None:
    """Delete the ich store at `store` and its side files, for `--overwrite`.

    Anything else there (a file, a folder that is neither empty nor an ich store, an ich store holding
    a file ich did not write) is refused with a `UserError`, and only ich's files are deleted
    (`ichdata.storefiles`).
    """
    check_replaceable(store)
    if store.is_dir():
        remove_ich_files(store)
    for p in (manifest_path(store), quarantine_csv_path(store)):
        p.unlink(missing_ok=True)


def prepare_store(p: Plan, *, overwrite: bool = False) -> Group:
    """Create the store for `p` (or grow it for an append).

    `images` sized to the plan, one done-marker per shard. Returns the open zarr group. Never touches
    committed rows.
    """
    import zarr

    store = p.store
    if overwrite:
        remove_store(store)
    # The settings as the store records them: the source folder as a keyed digest, and no unkeyed hash
    # of its path (`config_hash`, which stores before it held).
    plan_attr: dict[str, Any] = {"config": p.store_config}
    if not (store / "zarr.json").is_file():
        # "w-" creates and never deletes ("w" empties the folder first); the attributes that make it an
        # ich store are in its first metadata write.
        group = zarr.open_group(
            str(store),
            mode="w-",
            attributes={
                **base_attrs(p.image_size),
                "state": "converting",
                "shard_size": p.shard_size,
                "plan": plan_attr,
            },
        )
        create_images(group, p.n_slices, p.shard_size, p.image_size)
        create_shard_done(group, p.n_shards)
        return group
    group = open_group(store, mode="r+")
    try:  # through `array`: damaged metadata is one line naming the file
        images = array(group, "images")
    except KeyError:
        create_images(group, p.n_slices, p.shard_size, p.image_size)
    else:
        if images.shape[0] != p.n_slices:
            images.resize((p.n_slices, N_CHANNELS, p.image_size, p.image_size))
    try:
        markers = array(group, "conversion/shard_done")
    except KeyError:
        create_shard_done(group, p.n_shards)
    else:
        if markers.shape[0] != p.n_shards:
            markers.resize((p.n_shards,))
    old: dict[str, Any] = dict(group.attrs.get("plan") or {})  # type: ignore[arg-type]
    new = {**{k: v for k, v in old.items() if k != "config_hash"}, **plan_attr}
    updates: dict[str, Any] = {} if old == new else {"plan": new}
    if ICH_ATTR not in group.attrs:
        # A store written before the namespace was told by its plan's `source`, which it holds no more.
        updates[ICH_ATTR] = base_attrs(p.image_size)[ICH_ATTR]
    if updates:
        group.attrs.update(updates)
    return group


def read_markers(group: Group) -> list[str]:
    """The done-marker of every shard ("" where none)."""
    arr = array(group, "conversion/shard_done")
    return [str(v) for v in np.asarray(arr[...])] if arr.shape[0] else []


def marker_key(markers: list[str], i: int) -> str:
    """The shard key recorded in shard `i`'s done-marker ("" where none)."""
    return markers[i].split(":", 1)[0] if i < len(markers) else ""


__all__ = [
    "MAX_SHARDS_PER_TASK",
    "ShardDone",
    "ShardTaskError",
    "convert_shard",
    "convert_shard_group",
    "group_size",
    "marker_key",
    "prepare_store",
    "read_markers",
    "remove_store",
]
