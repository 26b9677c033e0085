"""Compare two stores array by array with plain zarr: the check that a change kept the store's bytes.

    .venv/bin/python bench/store_diff.py A.zarr B.zarr [--ignore source_path]

Prints one line per array (identical, or how it differs) and exits 1 when any array differs. Arrays are
compared by value, dtype and shape; the `images` shard files are also compared byte for byte, since
those are what a reader downloads.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np
import zarr


def _arrays(path: Path) -> dict[str, zarr.Array]:
    group = zarr.open_group(path, mode="r")
    return {name: a for name, a in group.members(max_depth=None) if isinstance(a, zarr.Array)}


def _shard_digests(path: Path) -> dict[str, str]:
    root = path / "images"
    return {
        str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(root.rglob("*"))
        if f.is_file() and f.name != "zarr.json"
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--ignore", nargs="*", default=[], help="array names to leave out")
    args = ap.parse_args(argv)
    a, b = _arrays(args.a), _arrays(args.b)
    differ = False
    for name in sorted(set(a) | set(b)):
        if name in args.ignore:
            print(f"{name}: ignored")
            continue
        if name not in a or name not in b:
            print(f"{name}: only in {'A' if name in a else 'B'}")
            differ = True
            continue
        x, y = a[name][...], b[name][...]
        same = x.dtype == y.dtype and x.shape == y.shape and bool(np.array_equal(x, y))
        print(f"{name}: {'identical' if same else f'DIFFERS ({x.dtype}{x.shape} vs {y.dtype}{y.shape})'}")
        differ |= not same
    da, db = _shard_digests(args.a), _shard_digests(args.b)
    same_files = da == db
    print(f"images shard files: {len(da)} vs {len(db)}, {'byte-identical' if same_files else 'DIFFER'}")
    return int(differ or not same_files)


if __name__ == "__main__":
    sys.exit(main())
