"""How the store names input files: by their paths (`--keep-paths`), or by keys into the manifest.

File names may carry patient names (DESIGN.md "Trust"), and the store is what users share. Without
`--keep-paths` the store's `source_path` and `quarantine/path` hold `#k`, row k of the manifest beside
the store, and no quarantine detail names a file; the manifest stays on the converting machine, where
`ichdata.store.open_store` turns the keys back into paths. The group attribute `source_paths` says
which the store holds (absent: paths, as stores written before the option, or from arrays, hold).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

#: The group attribute that says what `source_path` and `quarantine/path` hold.
ATTR = "source_paths"
KEPT = "kept"  # the path relative to SOURCE
MANIFEST_ROWS = "manifest_rows"  # `#k`: row k of the manifest beside the store

_KEY = r"^#[0-9]{1,18}$"  # k fits an int64
# Where a path named in a detail may start and end: the details write a path between words.
_STARTS = re.compile(r"(?:^|(?<=[\s(]))\S")
_ENDS = re.compile(r"[\s,;:)]|$")


def mode(keep_paths: bool) -> str:
    """The `source_paths` attribute of a store converted with (or without) `--keep-paths`."""
    return KEPT if keep_paths else MANIFEST_ROWS


def keys(manifest: pd.DataFrame, paths: Iterable[str]) -> np.ndarray:
    """The key (`#k`, k the manifest row) of each of `paths`; every one must be in `manifest`."""
    wanted = list(paths)
    pos = pd.Index(manifest["path"]).get_indexer(wanted)
    if (pos < 0).any():
        raise ValueError(f"{wanted[int(np.argmin(pos))]}: not in the manifest, so it has no key")
    text = pc.binary_join_element_wise("#", pa.array(pos).cast(pa.string()), "")
    return np.asarray(text.to_numpy(zero_copy_only=False), dtype=str)


def scrub_details(manifest: pd.DataFrame, details: Iterable[str]) -> np.ndarray:
    """`details` with every path of `manifest` they name replaced by its key.

    A path is looked for between word boundaries only (the details write a path as a word, or several
    words when it holds spaces), the longest first, so the cost grows with the words of the details,
    not with the manifest's size.
    """
    details = [str(d) for d in details]
    if not details:
        return np.zeros(0, dtype=str)
    where = {str(p): k for k, p in enumerate(manifest["path"])}
    return np.asarray([_scrub(d, where) for d in details], dtype=str)


def _scrub(detail: str, where: dict[str, int]) -> str:
    ends = [m.start() for m in _ENDS.finditer(detail)]
    out, done = [], 0
    for start in (m.start() for m in _STARTS.finditer(detail)):
        if start < done:
            continue
        found = next((e for e in reversed(ends) if e > start and detail[start:e] in where), None)
        if found is not None:
            out += [detail[done:start], f"#{where[detail[start:found]]}"]
            done = found
    return "".join([*out, detail[done:]])


def local_paths(
    manifest: Path, source_path: np.ndarray, quarantine: pd.DataFrame
) -> tuple[np.ndarray, pd.DataFrame]:
    """`source_path` and the quarantine with their keys turned back into the paths of `manifest`.

    Quarantine rows take the manifest's detail too (the store's names no file). Without the manifest
    (a shared store) the keys stay; a key that is no row of the manifest stays, for `ich verify` to
    report.
    """
    if not manifest.is_file():
        return source_path, quarantine
    with manifest.open("rb") as f:  # Arrow refuses a name the locale could not decode (`LC_ALL=C`)
        table = pq.read_table(f, columns=["path", "detail"])
    paths = table.column("path").to_numpy()
    if not len(paths):
        return source_path, quarantine
    rows = _rows(source_path, len(paths))
    source_path = np.where(rows >= 0, paths[np.maximum(rows, 0)], source_path).astype(str)
    q_rows = _rows(quarantine["path"].to_numpy(dtype=str), len(paths))
    hit = q_rows >= 0
    q = quarantine.copy()
    q.loc[hit, "path"] = paths[q_rows[hit]]
    q.loc[hit, "detail"] = pc.fill_null(table.column("detail"), "").to_numpy()[q_rows[hit]]
    return source_path, q


def is_key(names: np.ndarray) -> np.ndarray:
    """Whether each of `names` is a key (`#k`) rather than a path."""
    text = pa.array(np.asarray(names, dtype=object), type=pa.string())
    return np.asarray(pc.match_substring_regex(text, _KEY).to_numpy(zero_copy_only=False), dtype=bool)


def _rows(names: np.ndarray, n: int) -> np.ndarray:
    """The manifest row each of `names` is the key of, -1 where it is no key of a row below `n`."""
    text = pa.array(np.asarray(names, dtype=object), type=pa.string())
    is_key = pc.match_substring_regex(text, _KEY)
    rows = pc.cast(pc.utf8_slice_codeunits(pc.if_else(is_key, text, "#-1"), 1), pa.int64()).to_numpy()
    rows = np.array(rows, dtype=np.int64)  # writable
    rows[rows >= n] = -1
    return rows


__all__ = ["ATTR", "KEPT", "MANIFEST_ROWS", "is_key", "keys", "local_paths", "mode", "scrub_details"]
