"""The store: one Zarr v3 group that holds a converted head-CT archive, and its reader.

The arrays, their shapes and meaning, the group attributes, the files beside the store
(`STORE.manifest.parquet`, `STORE.quarantine.csv`, `STORE.salt`) and the conversion states are the
README's store section (the first four arrays are fixed by DESIGN.md "The store contract"). This
module creates the arrays (`create_images`, `create_shard_done`, `write_committed`), writes whole
shards (`ichdata.shardfile`), and opens a store for reading (`open_store`). Readers want contiguous ranges
(`Store.read_series`, `Store.read_rows`), never fancy indexing (slow on sharded arrays in zarr 3.1,
zarr-python #3829), and use `n_slices` / `study_offsets`, never `images.shape[0]`: an append in
progress may have grown `images` beyond the committed rows.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from ichdata import pathkeys
from ichdata.atomic import atomic_path
from ichdata.csvsafe import safe_table
from ichdata.errors import UserError
from ichdata.labels import CLASSES, UNLABELLED
from ichdata.shardfile import ZSTD_LEVEL, shard_checksum, write_images
from ichdata.windows import WINDOWS

if TYPE_CHECKING:
    from zarr import Array, Group
    from zarr.abc.codec import BytesBytesCodec

FORMAT_VERSION = 1
IMAGE_SIZE = 256
DEFAULT_SHARD_SIZE = 64
N_CHANNELS = 3
SERIES_COLUMNS: tuple[str, ...] = ("study_uid", "series_uid", "patient_key", "n_slices")
QUARANTINE_COLUMNS: tuple[str, ...] = ("path", "reason", "detail")
STATES = ("converting", "finalizing", "complete")
#: Every array ich writes in a store, by its path inside the group (the README's store table).
ARRAYS: tuple[str, ...] = (
    "images",
    "labels",
    "image_id",
    "study_offsets",
    "slice_position",
    "source_path",
    *(f"series/{c}" for c in SERIES_COLUMNS),
    *(f"quarantine/{c}" for c in QUARANTINE_COLUMNS),
    "conversion/shard_done",
)
#: The groups that hold them ("" is the store itself).
GROUPS: tuple[str, ...] = ("", "series", "quarantine", "conversion")
#: The arrays every commit replaces whole (`write_array`): a run deletes their folders.
REWRITTEN: tuple[str, ...] = tuple(a for a in ARRAYS if a not in ("images", "conversion/shard_done"))
#: The group attribute only ich writes: `{"kind": "store", "format_version": 1}`.
ICH_ATTR = "ich"
_SMALL_CHUNK = 1 << 16  # rows per chunk of the small 1-D/2-D arrays
_STRING_ZSTD_LEVEL = 0  # zstd's default, what zarr's "auto" compressor gives the string arrays
_SALT_BYTES = 16  # `STORE.salt`: what `ichdata.resume.load_salt` makes


def manifest_path(store: str | os.PathLike[str]) -> Path:
    """`STORE.manifest.parquet`: the scan's table of every input file, beside the store."""
    return _beside(store, ".manifest.parquet")


def quarantine_csv_path(store: str | os.PathLike[str]) -> Path:
    """`STORE.quarantine.csv`: the quarantine table as CSV, beside the store."""
    return _beside(store, ".quarantine.csv")


def salt_path(store: str | os.PathLike[str]) -> Path:
    """`STORE.salt`: the random salt of the patient keys, beside the store."""
    return _beside(store, ".salt")


def _beside(store: str | os.PathLike[str], suffix: str) -> Path:
    p = Path(store)
    return p.with_name(p.name.rstrip("/") + suffix)


def compressors(level: int = ZSTD_LEVEL) -> list[BytesBytesCodec]:
    """zstd, then zarr's `crc32c` codec: every chunk carries the CRC-32C of its compressed bytes.

    Each slice of `images` (an inner chunk of its shard) and each chunk of the small arrays: every zarr
    reader (zarr-python, tensorstore, `ichdata.shardfile`) checks it as it decodes the chunk.
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=level), Crc32cCodec()]


def create_images(group: Group, n_slices: int, shard_size: int, image_size: int = IMAGE_SIZE) -> Array:
    """Create (or replace) `images`: one slice per chunk, `shard_size` slices per shard, zstd."""
    shape = (n_slices, N_CHANNELS, image_size, image_size)
    return group.create_array(
        "images",
        shape=shape,
        dtype="uint8",
        chunks=(1, N_CHANNELS, image_size, image_size),
        shards=(shard_size, N_CHANNELS, image_size, image_size),
        compressors=compressors(),
        fill_value=0,
        overwrite=True,
        dimension_names=("slice", "window", "y", "x"),
    )


def create_shard_done(group: Group, n_shards: int, folder: str = "conversion") -> Array:
    """Create (or replace) `FOLDER/shard_done`: one chunk per shard, so that tasks never share a file.

    A store's is `conversion/shard_done`; a features group's `extraction/shard_done` (`ichdata.features`).
    """
    conv = group.require_group(folder)
    return conv.create_array(
        "shard_done",
        shape=(n_shards,),
        dtype=str,
        chunks=(1,),
        fill_value="",
        overwrite=True,
        compressors=compressors(_STRING_ZSTD_LEVEL),
    )


def write_array(group: Group, name: str, data: np.ndarray) -> None:
    """Replace the small array `name` (path inside the group, e.g. `series/n_slices`) by `data`.

    Only the driver of a conversion calls this (tasks write whole shards of `images` and their own
    `conversion/shard_done` chunk, nothing else).
    """
    parent_name, _, leaf = name.rpartition("/")
    parent = group.require_group(parent_name) if parent_name else group
    if data.dtype.kind in "USTO":
        data = np.asarray(data, dtype=str)
        dtype: Any = str
        fill: Any = ""
    else:
        dtype = data.dtype
        fill = 0
    chunks = (max(1, min(len(data), _SMALL_CHUNK)), *data.shape[1:])
    arr = parent.create_array(
        leaf,
        shape=data.shape,
        dtype=dtype,
        chunks=chunks,
        fill_value=fill,
        overwrite=True,
        compressors=compressors() if dtype is not str else compressors(_STRING_ZSTD_LEVEL),
        # Every chunk is a file, even one of fill values: a chunk file that goes missing is then damage
        # `check_small_arrays` sees, not a run of zeros (labels read as "no hemorrhage").
        config={"write_empty_chunks": True},
    )
    if data.size:
        arr[...] = data


def base_attrs(image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """The attributes every store carries whatever its contents.

    `ich` is the namespace only ich writes: what tells an ich store from another Zarr group
    (`is_ich_store`).
    """
    return {
        ICH_ATTR: {"kind": "store", "format_version": FORMAT_VERSION},
        "format_version": FORMAT_VERSION,
        "classes": list(CLASSES),
        "windows": [{"name": w.name, "level": w.level, "width": w.width} for w in WINDOWS],
        "image_size": image_size,
    }


def software_version() -> str:
    """`ich <version>` as installed (for the provenance attribute)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"ich {version('ich')}"
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "ich (not installed)"


def write_committed(
    group: Group,
    *,
    labels: np.ndarray,
    image_ids: np.ndarray,
    study_offsets: np.ndarray,
    series: pd.DataFrame,
    slice_position: np.ndarray,
    source_path: np.ndarray,
    quarantine: pd.DataFrame,
) -> None:
    """Write every array but `images` (the driver's part of a conversion, and of `write_store_from_arrays`)."""
    n = len(image_ids)
    study_offsets = np.asarray(study_offsets, dtype=np.int64)
    labels = np.asarray(labels, dtype=np.uint8)
    _check_shapes(n, labels, study_offsets, series)
    write_array(group, "labels", labels.reshape(n, len(CLASSES)))
    write_array(group, "image_id", np.asarray(image_ids, dtype=str))
    write_array(group, "study_offsets", study_offsets)
    write_array(group, "slice_position", np.asarray(slice_position, dtype=np.float64))
    write_array(group, "source_path", np.asarray(source_path, dtype=str))
    for col in ("study_uid", "series_uid", "patient_key"):
        write_array(group, f"series/{col}", np.asarray(series[col].to_numpy(), dtype=str))
    write_array(group, "series/n_slices", np.diff(study_offsets).astype(np.int64))
    for col in QUARANTINE_COLUMNS:
        write_array(group, f"quarantine/{col}", np.asarray(quarantine[col].to_numpy(), dtype=str))


def _check_shapes(n: int, labels: np.ndarray, study_offsets: np.ndarray, series: pd.DataFrame) -> None:
    if labels.shape != (n, len(CLASSES)):
        raise ValueError(f"labels has shape {labels.shape}, ({n}, {len(CLASSES)}) expected")
    if study_offsets.ndim != 1 or len(study_offsets) != len(series) + 1:
        raise ValueError(f"study_offsets has {len(study_offsets)} entries, {len(series) + 1} expected")
    if study_offsets[0] != 0 or study_offsets[-1] != n or np.any(np.diff(study_offsets) < 0):
        raise ValueError(
            f"study_offsets must rise from 0 to {n}, got {study_offsets[:3]}…{study_offsets[-1:]}"
        )


def write_quarantine_csv(store: str | os.PathLike[str], quarantine: pd.DataFrame) -> Path:
    """Export the quarantine table as `STORE.quarantine.csv` and return its path."""
    out = quarantine_csv_path(store)
    with atomic_path(out) as tmp:
        safe_table(quarantine.loc[:, list(QUARANTINE_COLUMNS)]).to_csv(tmp, index=False)
    return out


def write_store_from_arrays(
    path: str | os.PathLike[str],
    images: np.ndarray,
    labels: np.ndarray,
    image_ids: np.ndarray | list[str],
    study_offsets: np.ndarray | list[int],
    series: pd.DataFrame,
    *,
    slice_position: np.ndarray | None = None,
    source_path: np.ndarray | list[str] | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    overwrite: bool = True,
) -> Store:
    """Write a complete store from arrays, without DICOM (for tests of later stages and for tools).

    `images` is (N, 3, S, S) uint8; `series` needs columns `study_uid`, `series_uid` and `patient_key`
    (`n_slices` is taken from `study_offsets`). Positions default to the row index within each series and
    source paths to `<image_id>.dcm`. Images are written one whole shard at a time.
    """
    import zarr

    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != N_CHANNELS or images.shape[2] != images.shape[3]:
        raise ValueError(f"images has shape {images.shape}, (N, 3, S, S) expected")
    if images.dtype != np.uint8:
        raise ValueError(f"images has dtype {images.dtype}, uint8 expected")
    n, image_size = images.shape[0], images.shape[2]
    image_ids = np.asarray(image_ids, dtype=str)
    offsets = np.asarray(study_offsets, dtype=np.int64)
    if slice_position is None:
        slice_position = np.concatenate(
            [np.arange(b - a, dtype=np.float64) for a, b in itertools.pairwise(offsets)] or [np.zeros(0)]
        )
    if source_path is None:
        source_path = np.array([f"{i}.dcm" for i in image_ids], dtype=str)
    group = zarr.open_group(
        str(path),
        mode="w" if overwrite else "w-",
        attributes={**base_attrs(image_size), "state": "converting", "shard_size": shard_size},
    )
    arr = create_images(group, n, shard_size, image_size)
    done = create_shard_done(group, -(-n // shard_size))
    for i, a in enumerate(range(0, n, shard_size)):
        write_images(arr, a, images[a : a + shard_size])
        done[i] = f"arrays:{shard_checksum(images[a : a + shard_size])}"
    quarantine = pd.DataFrame({c: pd.Series([], dtype=object) for c in QUARANTINE_COLUMNS})
    write_committed(
        group,
        labels=labels,
        image_ids=image_ids,
        study_offsets=offsets,
        series=series,
        slice_position=np.asarray(slice_position),
        source_path=np.asarray(source_path, dtype=str),
        quarantine=quarantine,
    )
    n_studies = int(series["study_uid"].nunique())
    group.attrs.update(
        {
            "state": "complete",
            "n_slices": n,
            "n_series": len(series),
            "n_studies": n_studies,
            "provenance": {
                "source": None,
                "software": software_version(),
                "created": now_utc(),
                "updated": now_utc(),
                "n_converted": n,
                "n_quarantined": 0,
                "quarantined_by_reason": {},
                "labels": None,
            },
            "plan": None,
        }
    )
    return open_store(path)


def now_utc() -> str:
    """The current UTC time to the second, ISO 8601 (the provenance's `created` and `updated`)."""
    import datetime as dt

    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass
class Store:
    """An opened store: the small arrays in memory, `images` as the lazy zarr array.

    `labels`, `image_id`, `study_offsets`, `slice_position`, `source_path` are NumPy arrays of the
    committed rows; `series` is a DataFrame (study_uid, series_uid, patient_key, n_slices), one row per
    series in store order; `quarantine` a DataFrame (path, reason, detail). `source_path` and
    `quarantine` name files by their paths where the store keeps them or the manifest beside it has
    them (read on first use), else by keys; `stored_source_path` and `stored_quarantine` are as the
    store holds them (`ichdata.pathkeys`).
    """

    path: Path
    images: Array
    labels: np.ndarray
    image_id: np.ndarray
    study_offsets: np.ndarray
    series: pd.DataFrame
    slice_position: np.ndarray
    stored_source_path: np.ndarray
    stored_quarantine: pd.DataFrame
    attrs: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def _named(self) -> tuple[np.ndarray, pd.DataFrame]:
        if self.attrs.get(pathkeys.ATTR) != pathkeys.MANIFEST_ROWS:
            return self.stored_source_path, self.stored_quarantine
        mp = manifest_path(self.path)
        with unless_damaged(mp):
            return pathkeys.local_paths(mp, self.stored_source_path, self.stored_quarantine)

    @property
    def source_path(self) -> np.ndarray:
        """Each row's input file, relative to the source (a key where no path is at hand)."""
        return self._named[0]

    @property
    def quarantine(self) -> pd.DataFrame:
        """The quarantine table (path, reason, detail), paths as `source_path` names them."""
        return self._named[1]

    @property
    def n_slices(self) -> int:
        """Rows of `images`."""
        return len(self.image_id)

    @property
    def n_series(self) -> int:
        """Series, in store order."""
        return len(self.series)

    @property
    def n_studies(self) -> int:
        """Distinct studies."""
        return int(self.series["study_uid"].nunique())

    @property
    def classes(self) -> tuple[str, ...]:
        """Label columns, in order."""
        return tuple(self.attrs.get("classes", CLASSES))

    @property
    def image_size(self) -> int:
        """Rows and columns of a stored slice."""
        return int(self.attrs.get("image_size", IMAGE_SIZE))

    @property
    def shard_size(self) -> int:
        """Slices per shard file."""
        return int(self.images.shards[0]) if self.images.shards else int(self.images.chunks[0])

    @property
    def complete(self) -> bool:
        """Whether the last conversion committed (state `complete`)."""
        return self.attrs.get("state") == "complete"

    def series_rows(self, s: int) -> tuple[int, int]:
        """Rows `[start, stop)` of series `s`."""
        if not 0 <= s < self.n_series:
            raise IndexError(f"series {s} out of range: the store has {self.n_series} series")
        return int(self.study_offsets[s]), int(self.study_offsets[s + 1])

    def read_series(self, s: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Slices `[start, stop)` of series `s` (in slice order) as uint8 (T, 3, 256, 256), one contiguous read."""
        a, b = self.series_rows(s)
        n = b - a
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise IndexError(f"slices [{start}, {stop}) out of range: series {s} has {n} slices")
        return np.asarray(self.images[a + start : a + stop])

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows `[start, stop)` of `images`, one contiguous read."""
        if not 0 <= start <= stop <= self.n_slices:
            raise IndexError(f"rows [{start}, {stop}) out of range: the store has {self.n_slices} slices")
        return np.asarray(self.images[start:stop])

    def __repr__(self) -> str:
        return (
            f"Store({str(self.path)!r}, {self.n_slices} slices, {self.n_series} series, "
            f"{len(self.stored_quarantine)} quarantined, state={self.attrs.get('state')!r})"
        )


def array(group: Group, name: str) -> Array:
    """The array `name` (a path inside `group`); a `KeyError` when there is none.

    Damaged metadata (its `zarr.json`, or a parent group's) is a one-line `UserError` naming the file.
    """
    import zarr

    member = None
    parts = name.split("/")
    for k in range(1, len(parts) + 1):  # each node's metadata on the way, so that the damaged one is named
        meta = _metadata_file(group, "/".join(parts[:k]))
        if meta is not None and not meta.is_file():
            raise KeyError(name)
        with unless_damaged(meta if meta is not None else Path(name)):
            member = group["/".join(parts[:k])]
    if not isinstance(member, zarr.Array):
        raise KeyError(f"{name} is a group, not an array")
    return member


def _metadata_file(group: Group, name: str) -> Path | None:
    """The `zarr.json` of member `name` of `group` on a local store (None elsewhere)."""
    from zarr.storage import LocalStore

    store = group.store
    if not isinstance(store, LocalStore):
        return None
    return Path(store.root) / group.path / name / "zarr.json"


def open_group(path: str | os.PathLike[str], mode: Literal["r", "r+"] = "r") -> Group:
    """The Zarr group of the store at `path`; damaged metadata is a one-line `UserError` naming it."""
    import zarr
    from zarr.errors import ContainsArrayError

    with unless_damaged(Path(path) / "zarr.json", root=True):
        try:
            return zarr.open_group(str(path), mode=mode)
        except ContainsArrayError:
            raise UserError(
                f"{path}: a Zarr array, not a store; expected the output of `ich convert`"
            ) from None


def read_manifest(path: str | os.PathLike[str], columns: list[str] | None = None) -> pd.DataFrame:
    """The table of `STORE.manifest.parquet` at `path`; a damaged file is a one-line `UserError`."""
    # Opened here, not by Arrow, which refuses a name the locale could not decode (`LC_ALL=C`).
    with unless_damaged(path), open(path, "rb") as f:
        return pd.read_parquet(f, columns=columns)


def read_salt(path: str | os.PathLike[str]) -> bytes:
    """The salt in `STORE.salt` at `path`; a damaged or malformed file is a one-line `UserError`."""
    with unless_damaged(path):
        salt = bytes.fromhex(Path(path).read_text(encoding="ascii").strip())
        if len(salt) != _SALT_BYTES:
            raise ValueError(f"{len(salt)} bytes")
    return salt


@contextlib.contextmanager
def unless_damaged(file: str | os.PathLike[str], *, root: bool = False) -> Iterator[None]:
    """Turn the error that parsing a damaged store file raises into one line naming it and what to do.

    `file` is a store's own `zarr.json` (`root`), a member's, `STORE.manifest.parquet` or `STORE.salt`;
    every reader of those files goes through here (`open_group`, `array`, `read_manifest`,
    `read_salt`), so that `ich verify`, `ich train`, `ich quarantine` and `ich convert` say the same.
    The file's contents are never quoted.
    """
    try:
        yield
    except (ValueError, TypeError, KeyError) as exc:  # JSON, Zarr metadata, Parquet (ArrowInvalid), hex
        raise UserError(damaged_message(Path(file), root=root)) from exc


def damaged_message(file: Path, *, root: bool = False) -> str:
    """What is wrong with the damaged store file `file` and what to do about it, in one line."""
    name = file.name
    if name.endswith(".manifest.parquet"):
        return (
            f"{file}: damaged (not a readable Parquet file); it records which input file is in which row: "
            "restore it from a backup, or convert again with --overwrite"
        )
    if name.endswith(".salt"):
        return (
            f"{file}: damaged (expected {2 * _SALT_BYTES} hex digits); the store's patient keys were made "
            "with it: restore it from a backup, or delete it and convert again with --overwrite (the "
            "patient keys change)"
        )
    if root:
        return (
            f"{file}: damaged (not valid Zarr v3 metadata); the store cannot be read or recognised: restore "
            f"it from a backup, or delete {file.parent} and convert again"
        )
    return (
        f"{file}: damaged (not valid Zarr v3 metadata); restore it from a backup, or convert again with "
        "--overwrite"
    )


def _has(group: Group, name: str) -> bool:
    """Whether `group` has the array `name` (damaged metadata is a `UserError`, not an absence)."""
    try:
        array(group, name)
    except KeyError:
        return False
    return True


def _read_strings(store: Path, group: Group, name: str) -> np.ndarray:
    try:
        data = _read(store, group, name)
    except KeyError:
        return np.zeros(0, dtype=str)
    return np.asarray(data, dtype=object).astype(str) if len(data) else np.zeros(0, dtype=str)


def open_store(path: str | os.PathLike[str], *, allow_incomplete: bool = False) -> Store:
    """Open a store for reading.

    Raises `UserError` when `path` is not a store, when its format version is newer than this software
    reads, or when its first conversion has not finished (running or killed) unless `allow_incomplete`
    (then whatever the committed arrays hold is returned, possibly nothing). A store converted without
    `--keep-paths` names input files by keys, read back as paths from the manifest beside it when there
    (`Store.source_path`, `Store.quarantine`).
    """
    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise UserError(f"{p}: not an ich store (no zarr.json); expected the output of `ich convert`")
    group = open_group(p)
    attrs: dict[str, Any] = dict(group.attrs)
    version = attrs.get("format_version")
    try:
        images = array(group, "images")
    except KeyError:
        images = None
    if version is None or images is None:
        raise UserError(f"{p}: a Zarr group but not an ich store (no format_version attribute or no images)")
    if int(version) > FORMAT_VERSION:
        raise UserError(f"{p}: store format version {version}; this ich reads up to {FORMAT_VERSION}")
    state = attrs.get("state")
    unfinished = (
        f"{p}: the conversion that writes this store has not finished (state {state!r}); "
        "re-run `ich convert` with the same arguments to complete it"
    )
    # While finalize rewrites the small arrays they disagree with each other: nothing to show, even
    # to a reader that accepts an incomplete store.
    if state != "complete" and (not allow_incomplete or state == "finalizing"):
        raise UserError(unfinished)
    damaged, _ = check_small_arrays(p, group)
    if damaged:
        name, why = damaged[0]
        raise UserError(_damaged_array(p, name, why))
    if _has(group, "labels"):
        try:
            labels = np.asarray(_read(p, group, "labels"), dtype=np.uint8)
            offsets = np.asarray(_read(p, group, "study_offsets"), dtype=np.int64)
            positions = np.asarray(_read(p, group, "slice_position"), dtype=np.float64)
            n_slices = np.asarray(_read(p, group, "series/n_slices"), dtype=np.int64)
        except KeyError as exc:  # a committed array is missing: a commit that never finished
            raise UserError(f"{unfinished} ({exc.args[0]} is missing)") from None
    else:
        labels = np.zeros((0, len(CLASSES)), dtype=np.uint8)
        offsets = np.zeros(1, dtype=np.int64)
        positions = np.zeros(0, dtype=np.float64)
        n_slices = np.zeros(0, dtype=np.int64)
    series = pd.DataFrame(
        {
            "study_uid": _read_strings(p, group, "series/study_uid"),
            "series_uid": _read_strings(p, group, "series/series_uid"),
            "patient_key": _read_strings(p, group, "series/patient_key"),
            "n_slices": n_slices,
        }
    )
    quarantine = pd.DataFrame({c: _read_strings(p, group, f"quarantine/{c}") for c in QUARANTINE_COLUMNS})
    with contextlib.suppress(KeyError):  # the readers open the done-markers later: their metadata now
        array(group, "conversion/shard_done")
    return Store(
        path=p,
        images=images,
        labels=labels,
        image_id=_read_strings(p, group, "image_id"),
        study_offsets=offsets,
        series=series,
        slice_position=positions,
        stored_source_path=_read_strings(p, group, "source_path"),
        stored_quarantine=quarantine,
        attrs=json.loads(json.dumps(attrs)),
    )


def _damaged_array(store: Path, name: str, why: str) -> str:
    return (
        f"{store}: array {name} is damaged ({why}); run `ich verify {store}` to list what is damaged, then "
        "`ich convert` with the same arguments to rewrite the store's small arrays from its manifest"
    )


def _read(store: Path, group: Group, name: str) -> np.ndarray:
    """All of the array `name`, as NumPy; a chunk that fails its checksum or to decode is a `UserError`."""
    arr = array(group, name)
    try:
        return np.asarray(arr[...])
    except Exception as exc:  # zarr's checksum ValueError, or a decoder's own error
        raise UserError(_damaged_array(store, name, f"{type(exc).__name__}: {_first_line(exc)}")) from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def check_small_arrays(
    store: str | os.PathLike[str], group: Group
) -> tuple[list[tuple[str, str]], list[str]]:
    """Check the chunk files of every array but `images` and `conversion/shard_done` against their CRC-32C.

    Without decoding anything: each chunk of an array written with `crc32c` ends with the CRC-32C of
    the bytes before it, and every chunk of such an array is a file (`write_array`). Returns the damaged
    arrays as (name, why) and the names of those that carry no checksum (written by an earlier
    release; `ichdata.finalize` rewrites them). Arrays not on a local file system are decoded instead.
    """
    import google_crc32c
    from zarr.codecs import Crc32cCodec
    from zarr.core.metadata import ArrayV3Metadata
    from zarr.storage import LocalStore

    damaged: list[tuple[str, str]] = []
    unchecked: list[str] = []
    for name in REWRITTEN:
        try:
            arr = array(group, name)
        except KeyError:  # a store whose first commit has not written it yet
            continue
        meta = arr.metadata
        if not isinstance(meta, ArrayV3Metadata) or not isinstance(meta.codecs[-1], Crc32cCodec):
            unchecked.append(name)
            continue
        if not isinstance(arr.store, LocalStore):
            try:
                np.asarray(arr[...])
            except Exception as exc:
                damaged.append((name, f"{type(exc).__name__}: {_first_line(exc)}"))
            continue
        folder = Path(arr.store.root) / arr.path
        grid = [-(-n // c) for n, c in zip(arr.shape, arr.chunks, strict=True)]
        for index in np.ndindex(*grid):
            key = meta.encode_chunk_key(tuple(int(i) for i in index))
            try:
                data = (folder / key).read_bytes()
            except FileNotFoundError:
                damaged.append((name, f"chunk {key} is missing"))
                break
            if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
                damaged.append((name, f"chunk {key} fails its CRC-32C checksum"))
                break
    return damaged, unchecked


#: The attributes every store `ich convert` wrote from its start before the `ich` namespace existed,
#: and the plan settings among them (`ichdata.resume.plan_config`).
_LEGACY_ATTRS = frozenset(
    {"format_version", "classes", "windows", "image_size", "state", "shard_size", "plan"}
)
_LEGACY_PLAN = frozenset({"format_version", "render_version", "image_size", "shard_size"})


def is_ich_store(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a store ich wrote: what only ich writes, never a generic key alone.

    A group with the `ich` attribute namespace (`base_attrs`), or one an earlier `ich convert` wrote:
    every attribute it set from the start (format version, classes, windows, image size, state, shard
    size and the plan's settings) and the salt file beside it. A Zarr group that merely has a
    `format_version` attribute is not one. A damaged `zarr.json` is a one-line `UserError`.
    """
    p = Path(path)
    attrs = store_attrs(p) if p.is_dir() and not p.is_symlink() else None
    if attrs is None:
        return False
    ours = attrs.get(ICH_ATTR)
    if isinstance(ours, Mapping):
        return ours.get("kind") == "store"
    plan = attrs.get("plan")
    config = plan.get("config") if isinstance(plan, Mapping) else None
    return (
        attrs.keys() >= _LEGACY_ATTRS
        and attrs.get("classes") == list(CLASSES)
        and attrs.get("state") in STATES
        and isinstance(config, Mapping)
        and config.keys() >= _LEGACY_PLAN
        and ("source" in config or "source_id" in config)  # its path, or its digest (`ichdata.resume`)
        and salt_path(p).is_file()
    )


def store_attrs(path: str | os.PathLike[str]) -> Mapping[str, Any] | None:
    """The group attributes of the store at `path`, or None when there is no Zarr group there."""
    p = Path(path)
    if not (p / "zarr.json").is_file():
        return None
    return dict(open_group(p).attrs)


__all__ = [
    "ARRAYS",
    "CLASSES",
    "DEFAULT_SHARD_SIZE",
    "FORMAT_VERSION",
    "GROUPS",
    "ICH_ATTR",
    "IMAGE_SIZE",
    "REWRITTEN",
    "UNLABELLED",
    "Store",
    "array",
    "check_small_arrays",
    "create_images",
    "is_ich_store",
    "manifest_path",
    "now_utc",
    "open_group",
    "open_store",
    "quarantine_csv_path",
    "read_manifest",
    "read_salt",
    "salt_path",
    "store_attrs",
    "unless_damaged",
    "write_quarantine_csv",
    "write_store_from_arrays",
]
