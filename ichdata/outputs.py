"""Outputs are never inputs: the checks a command that writes makes before any work, each one line.

An output (a store with the files beside it, a CSV) is never one of the command's inputs, no input
lies inside it, it is never written inside another ich store, and a missing parent folder is taken
for a typo unless the user asks for it (`--parents`). Paths are compared with links resolved.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from ichdata.errors import UserError
from ichdata.lock import lock_path
from ichdata.store import manifest_path, quarantine_csv_path, salt_path
from ichdata.storefiles import enclosing_store

__all__ = ["check_output_file", "check_parent", "check_store_target", "store_outputs", "within"]


def _real(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(path))


def within(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Whether `path` is `folder` or lies inside it, links resolved (neither needs to exist)."""
    p, f = _real(path), _real(folder)
    return p == f or f in p.parents


def store_outputs(store: str | os.PathLike[str]) -> list[Path]:
    """What a run on `store` writes: the store and the files beside it (manifest, quarantine, salt, lock)."""
    return [Path(store), manifest_path(store), quarantine_csv_path(store), salt_path(store), lock_path(store)]


def check_parent(path: str | os.PathLike[str], *, what: str, parents: bool) -> None:
    """Refuse `path` whose folder does not exist, unless `parents` (the caller then creates it)."""
    parent = Path(os.path.abspath(path)).parent
    if parent.is_dir():
        return
    if parent.exists():
        raise UserError(f"{what} {path}: {parent} is not a folder")
    if not parents:
        raise UserError(f"{what} {path}: the folder {parent} does not exist; create it, or pass --parents")


def check_store_target(
    store: str | os.PathLike[str],
    *,
    what: str,
    parents: bool,
    inputs: Mapping[str, str | os.PathLike[str] | None],
) -> None:
    """The checks on a store a command is about to write, before anything is read or removed.

    Its folder exists (or `parents`), it does not lie inside another ich store, and none of `inputs`
    (by option name: `SOURCE`, `--labels`, `CHECKPOINT`) is the store, lies inside it or is one of
    the files beside it.
    """
    check_parent(store, what=what, parents=parents)
    outer = enclosing_store(store)
    if outer is not None:
        raise UserError(f"{what} {store}: inside the ich store {outer}; choose a path outside it")
    for name, path in inputs.items():
        if path is None:
            continue
        for out in store_outputs(store):
            if within(path, out):
                where = f"inside {what} {store}" if out == Path(store) else f"the file {out} beside {what}"
                raise UserError(
                    f"{name} {path}: {where}, which this run writes; inputs must lie outside the store "
                    "(move it, or choose another store)"
                )


def check_output_file(
    path: str | os.PathLike[str],
    *,
    what: str,
    parents: bool,
    inputs: Mapping[str, str | os.PathLike[str] | None],
    stores: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> None:
    """The checks on a file a command is about to write (a CSV), before any work.

    It is not a folder, not one of `inputs` nor inside one (a source folder), not inside any ich store
    nor one of `stores` (by option name) or a file beside one, and its folder exists (or `parents`).
    """
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{what} {p}: a folder; expected the path of the file to write")
    for name, other in inputs.items():
        if other is not None and within(p, other):
            raise UserError(f"{what} {p}: is {name} {other} or inside it; write outputs outside the inputs")
    outer = enclosing_store(p)
    if outer is not None:
        raise UserError(f"{what} {p}: inside the ich store {outer}; choose a path outside it")
    for name, store in (stores or {}).items():
        if store is not None and any(within(p, out) for out in store_outputs(store)):
            raise UserError(f"{what} {p}: inside {name} {store} or beside it as one of its files")
    check_parent(p, what=what, parents=parents)
