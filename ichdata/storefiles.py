"""What ich writes inside a store, told from what it does not: the one definition of "ours".

A store folder holds the group's `zarr.json`, the `zarr.json` of each group and array in
`ichdata.store.ARRAYS`, and each array's chunk (or shard) files inside its shape. Anything else is a
`Stray`: a file ich did not write (a user's notes, a link, an unknown folder), a temporary file a
killed write left behind, or a chunk file outside its array's shape. `ich verify` lists every stray;
`--overwrite` (and `ich predict --store`) replaces a store only when it holds no file ich did not
write (`check_replaceable`), and then deletes only ich's files (`remove_ich_files`), so that a file
that appears meanwhile stays. The files beside a store are `ichdata.store`'s (manifest, quarantine CSV,
salt) and `ichdata.lock`'s (the lock).
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ichdata.errors import UserError
from ichdata.store import ARRAYS, GROUPS, array, is_ich_store, open_group

__all__ = [
    "Stray",
    "StrayKind",
    "check_metadata",
    "check_replaceable",
    "enclosing_store",
    "refuse_foreign",
    "remove_ich_files",
    "remove_leftovers",
    "stray_files",
]

# Temporary names of a write in progress: `ichdata.atomic`'s `.NAME.PID.THREAD.tmp`, and zarr's
# `STEM.<32 hex>.partial` (its LocalStore writes through one).
_OUR_TMP = re.compile(r"^\.(zarr\.json|\d+)\.\d+\.\d+\.tmp$")
_ZARR_TMP = re.compile(r"^(zarr|\d+)\.[0-9a-f]{32}\.partial$")


class StrayKind(enum.StrEnum):
    """Why a file in a store folder is not one of ich's."""

    FOREIGN = "not written by ich"
    LEFTOVER = "a temporary file a killed write left behind"
    OUTSIDE = "a chunk file outside its array's shape"


@dataclass(frozen=True)
class Stray:
    """A file inside a store that no array accounts for: its path relative to the store, and why."""

    path: str
    kind: StrayKind

    def __str__(self) -> str:
        return f"{self.path}: {self.kind}"


@dataclass(frozen=True)
class _Grid:
    """Where an array's chunk files lie: `c` + separator + indices, each below `counts` (None: unknown)."""

    separator: str
    ndim: int | None
    counts: tuple[int, ...] | None


def _grid(array_dir: Path) -> _Grid:
    """The chunk grid of the array whose folder is `array_dir`, from its `zarr.json` (read as JSON).

    Unreadable metadata gives an unbounded grid: its chunk files still count as ich's (so that
    `--overwrite` can replace a store with a damaged array), and `ich verify` names the damage.
    """
    try:
        meta = json.loads((array_dir / "zarr.json").read_text(encoding="utf-8"))
        shape = [int(n) for n in meta["shape"]]
        chunks = [int(n) for n in meta["chunk_grid"]["configuration"]["chunk_shape"]]
        encoding = meta.get("chunk_key_encoding") or {}
        separator = str((encoding.get("configuration") or {}).get("separator", "/"))
        if encoding.get("name", "default") != "default" or len(shape) != len(chunks) or 0 in chunks:
            raise ValueError("unknown chunk layout")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return _Grid("/", None, None)
    return _Grid(separator, len(shape), tuple(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True)))


def _chunk_kind(rest: str, grid: _Grid) -> StrayKind | None:
    """None when `rest` (a path inside an array's folder) is a chunk file of that array, else why not."""
    prefix = "c" + grid.separator
    if not rest.startswith(prefix):
        return StrayKind.FOREIGN
    parts = rest[len(prefix) :].split(grid.separator)
    if grid.separator != "/" and "/" in rest:
        return StrayKind.FOREIGN
    if not all(p.isdigit() for p in parts) or (grid.ndim is not None and len(parts) != grid.ndim):
        return StrayKind.FOREIGN
    if grid.counts is not None and any(int(p) >= n for p, n in zip(parts, grid.counts, strict=True)):
        return StrayKind.OUTSIDE
    return None


def _walk(root: Path, within: Iterable[str]) -> Iterator[tuple[str, bool]]:
    """(path relative to `root`, whether it is a plain file) of every entry but folders under `within`.

    Links are entries, never followed.
    """
    for top in within:
        start = root / top if top else root
        if not start.is_dir() or start.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(start):
            here = Path(dirpath)
            for d in sorted(dirnames):
                if (here / d).is_symlink():
                    yield (here / d).relative_to(root).as_posix(), False
            for f in sorted(filenames):
                p = here / f
                yield p.relative_to(root).as_posix(), p.is_file() and not p.is_symlink()
            dirnames.sort()


def stray_files(
    store: str | os.PathLike[str],
    *,
    within: Iterable[str] = ("",),
    arrays: tuple[str, ...] = ARRAYS,
    groups: tuple[str, ...] = GROUPS,
) -> list[Stray]:
    """The files inside the store at `store` that ich's layout does not account for, sorted by path.

    `within`: the folders of the store to look in (default: all of it). `arrays`, `groups`: the
    layout (a store's by default; a features group's is `ichdata.features.ARRAYS`, `.GROUPS`).
    """
    root = Path(store)
    grids: dict[str, _Grid] = {}
    metadata = {f"{g}/zarr.json".lstrip("/") for g in groups}
    folders = {*groups, *arrays}
    out: list[Stray] = []
    for rel, plain in _walk(root, within):
        kind = _kind(root, rel, plain, metadata, folders, grids, arrays)
        if kind is not None:
            out.append(Stray(rel, kind))
    return sorted(out, key=lambda s: s.path)


def _kind(
    root: Path,
    rel: str,
    plain: bool,
    metadata: set[str],
    folders: set[str],
    grids: dict[str, _Grid],
    arrays: tuple[str, ...],
) -> StrayKind | None:
    if not plain:
        return StrayKind.FOREIGN
    if rel in metadata:
        return None
    folder, _, name = rel.rpartition("/")
    array = next((a for a in arrays if rel.startswith(a + "/")), None)
    in_ours = folder in folders or (array is not None and folder.startswith(array + "/c"))
    if in_ours and (_OUR_TMP.match(name) or _ZARR_TMP.match(name)):
        return StrayKind.LEFTOVER
    if array is None:
        return StrayKind.FOREIGN
    rest = rel[len(array) + 1 :]
    if rest == "zarr.json":
        return None
    if array not in grids:
        grids[array] = _grid(root / array)
    return _chunk_kind(rest, grids[array])


def check_metadata(store: str | os.PathLike[str]) -> None:
    """Parse the metadata of the store and of each of its arrays that is there, as zarr reads it.

    Damaged metadata is a one-line `UserError` naming the file (`ichdata.store.unless_damaged`), before
    a run does any work, rather than a traceback at the stage that first opens the array.
    """
    group = open_group(store)
    for name in ARRAYS:
        with contextlib.suppress(KeyError):  # not there (yet): nothing to parse
            array(group, name)


def check_replaceable(store: str | os.PathLike[str], *, what: str = "STORE") -> None:
    """Raise a one-line `UserError` unless what is at `store` may be replaced.

    That is nothing, an empty folder, or an ich store (`ichdata.store.is_ich_store`) that holds no file
    ich did not write (the message names one). `what` starts the message (`STORE`, `--store`).
    """
    p = Path(store)
    if not p.exists() and not p.is_symlink():
        return
    if p.is_symlink() or not p.is_dir() or (any(p.iterdir()) and not is_ich_store(p)):
        raise UserError(
            f"{what} {p}: exists and is not an ich store; --overwrite replaces only a store ich made"
        )
    refuse_foreign(p, what=what)


def refuse_foreign(
    store: str | os.PathLike[str],
    *,
    what: str = "STORE",
    kind: str = "store",
    arrays: tuple[str, ...] = ARRAYS,
    groups: tuple[str, ...] = GROUPS,
) -> None:
    """Raise a one-line `UserError` naming a file inside `store` that ich did not write, if there is one.

    `kind` names what `store` is in the message; `arrays`, `groups`: its layout, as for `stray_files`.
    What `--overwrite` checks before it deletes.
    """
    foreign = [
        s.path for s in stray_files(store, arrays=arrays, groups=groups) if s.kind is StrayKind.FOREIGN
    ]
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise UserError(
            f"{what} {store}: holds {foreign[0]}{more}, which ich did not write; move it out of the "
            f"{kind} first: replacing a {kind} deletes only what ich wrote"
        )


def remove_ich_files(
    store: str | os.PathLike[str], *, arrays: tuple[str, ...] = ARRAYS, groups: tuple[str, ...] = GROUPS
) -> None:
    """Delete what ich wrote inside `store` (strays of its own included), then every folder left empty.

    A file ich did not write stays, with the folders that lead to it (`check_replaceable` refuses such
    a store first; this is what keeps a file that appears meanwhile). `arrays`, `groups`: the layout,
    as for `stray_files`.
    """
    root = Path(store)
    foreign = {s.path for s in stray_files(root, arrays=arrays, groups=groups) if s.kind is StrayKind.FOREIGN}
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        here = Path(dirpath)
        for f in filenames:
            p = here / f
            if p.relative_to(root).as_posix() not in foreign:
                p.unlink(missing_ok=True)
        for d in dirnames:
            with contextlib.suppress(OSError):  # not empty (a foreign file) or a link: it stays
                (here / d).rmdir()
    with contextlib.suppress(OSError):
        root.rmdir()


def remove_leftovers(store: str | os.PathLike[str]) -> int:
    """Delete the temporary files killed writes left inside `store`; how many there were.

    Only under the store's lock (`ichdata.lock`): another writer's temporary file is in flight.
    """
    leftovers = [s for s in stray_files(store) if s.kind is StrayKind.LEFTOVER]
    for s in leftovers:
        (Path(store) / s.path).unlink(missing_ok=True)
    return len(leftovers)


def enclosing_store(path: str | os.PathLike[str]) -> Path | None:
    """The ich store that `path` lies inside (an ancestor, links resolved), or None."""
    real = Path(os.path.realpath(path))
    for parent in real.parents:
        if (parent / "zarr.json").is_file():
            with contextlib.suppress(UserError):  # a damaged group's metadata: not known to be ours
                if is_ich_store(parent):
                    return parent
    return None
