"""Contiguous reads of a store's `images` for training, refusing missing or corrupt shards.

`ImageReader` reads row ranges with tensorstore or zarr-python (`resolve_reader` says which and why).
Each slice of a store carries the CRC-32C of its compressed bytes (`ichdata.shardfile.inner_checksum`),
checked in the read that decodes it: a shard is checked as it is read for use (one read, one CRC, one
decode), each slice once per process with the default reader, every time with tensorstore. A store of an earlier release has no such checksums:
each of its shards is read whole the first time a process reads it and checked against the CRC-32 its
writer recorded in `conversion/shard_done` (`ichdata.shardfile.shard_checksum`, what `ich verify`
checks). A damaged shard stops training with a one-line `UserError` that names the shard and its rows.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from torch.utils.data import get_worker_info

from ichdata.errors import UserError
from ichdata.shardfile import inner_checksum, read_shard, shard_checksum

if TYPE_CHECKING:
    import tensorstore
    import zarr

READERS: tuple[str, ...] = ("auto", "tensorstore", "zarr")


def resolve_reader(reader: str) -> str:
    """Check the reading backend of `images`: `"tensorstore"`, `"zarr"` or `"auto"`.

    Both read the same bytes of the same shards. `"zarr"` decodes a local store's shards straight
    from their files (`ichdata.shardfile.read_shard`, zarr-python elsewhere) and checks each slice's
    CRC-32C once per process; tensorstore checks it on every read, which costs it more than the
    decoding it saves, so `"auto"` reads a store with per-slice checksums that way everywhere. A store
    of an earlier release (none): tensorstore decodes faster (bench/loader.py) because zarr-python
    spends more per chunk in its own machinery than zstd takes, but it is not fork-safe: once its
    threads run in a process, a `fork` of that process aborts. So there `"auto"` uses tensorstore only
    inside DataLoader worker processes (leaves that never fork) and zarr in the main process, which
    stays safe to fork. `"tensorstore"` forces it everywhere; `make_loader` then starts its workers
    with `forkserver`.

    Returns:
        `reader`, except that `"auto"` becomes `"zarr"` when tensorstore is not installed.

    Raises:
        UserError: an unknown reader, or `"tensorstore"` without tensorstore installed.
    """
    if reader not in READERS:
        raise UserError(f"reader {reader!r} is not one of {', '.join(READERS)}")
    if reader != "zarr" and importlib.util.find_spec("tensorstore") is None:
        if reader == "tensorstore":
            raise UserError("reader 'tensorstore': tensorstore is not installed (pip install tensorstore)")
        return "zarr"
    return reader


def _damaged(store: Path, shard: int, a: int, b: int, why: str) -> UserError:
    return UserError(
        f"{store}: shard {shard} (rows {a}–{b - 1}) is damaged: {why}; "
        f"run `ich verify {store}` to list every damaged shard"
    )


class ImageReader:
    """Contiguous reads of `STORE/images` that refuse a missing or corrupt shard.

    Opened lazily in the process that reads; picklable (only the path, backend and layout travel to
    DataLoader workers). Every slice is checked against its own CRC-32C as it is decoded (the first
    time in this process; every time with tensorstore), and the first read of a shard in a process
    checks that its file exists. In a store of an earlier release
    (no per-slice checksums) the first read of a shard in a process reads it whole and checks it
    against the CRC-32 its writer recorded in `conversion/shard_done`; later reads of it are plain
    reads. A missing shard is an error, never the fill value.
    """

    def __init__(self, store_path: Path, backend: str, n_rows: int) -> None:
        self.path = Path(store_path)
        self.backend = backend
        self.n_rows = n_rows  # the committed rows: the checksums cover them
        self._ts: tensorstore.TensorStore | None = None
        self._zarr: zarr.Array | None = None
        self._pid: int | None = None
        self._verified: set[int] = set()
        self._self_checking = False  # whether each slice carries its CRC-32C (set when opened)
        self._checked: np.ndarray | None = None  # per row: its CRC-32C checked in this process
        self._markers: zarr.Array | None = None  # conversion/shard_done, opened on first use
        self._held: tuple[int, np.ndarray] = (0, np.zeros((0,), dtype=np.uint8))  # (first row, rows)

    def __getstate__(self) -> dict[str, object]:
        return {
            **self.__dict__,
            "_ts": None,
            "_zarr": None,
            "_pid": None,
            "_markers": None,
            "_checked": None,
            "_held": (0, np.zeros((0,), dtype=np.uint8)),
        }

    def _open(self) -> None:
        import zarr

        pid = os.getpid()
        # zarr also in a tensorstore process: the shard layout and the markers (strings) come from it
        self._zarr = zarr.open_array(str(self.path / "images"), mode="r")
        self._self_checking = inner_checksum(self._zarr)
        self._checked = np.zeros(int(self._zarr.shape[0]), dtype=bool) if self._self_checking else None
        kind = self.backend
        if kind == "auto":
            in_worker = get_worker_info() is not None
            kind = "tensorstore" if in_worker and not self._self_checking else "zarr"
        if self._pid is not None and self._pid != pid and self._ts is not None:
            kind = "zarr"  # inherited through fork from a process that had tensorstore running
        self._ts = None
        self._markers = None  # a zarr array does not survive a fork
        if kind == "tensorstore":
            import tensorstore as ts

            spec = {
                "driver": "zarr3",
                "kvstore": {"driver": "file", "path": str(self.path / "images")},
                "fill_missing_data_reads": False,  # a missing chunk is an error, not black pixels
            }
            self._ts = ts.open(spec, open=True, read=True).result()
        self._pid = pid

    def _raw(self, start: int, stop: int) -> np.ndarray:
        if self._ts is not None:
            return self._ts[start:stop].read().result()
        assert self._zarr is not None
        # Shard by shard, decoded straight from the files (`read_shard`): zarr-python's own pipeline
        # spends more per inner chunk on bookkeeping than zstd needs to decode it.
        if stop <= start:
            return np.asarray(self._zarr[start:stop])
        k = self.shard_size
        cuts = [start, *range(start - start % k + k, stop, k), stop]
        checked = self._checked
        out = np.empty((stop - start, *self._zarr.shape[1:]), dtype=self._zarr.dtype)
        for a, b in itertools.pairwise(cuts):
            rows = out[a - start : b - start]
            read_shard(self._zarr, a, b, checked=None if checked is None else checked[a:b], out=rows)
        return out

    @property
    def shard_size(self) -> int:
        """Rows per shard of `images`."""
        assert self._zarr is not None
        return int((self._zarr.shards or self._zarr.chunks)[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of `images` as uint8 (T, 3, S, S), one contiguous read.

        Raises:
            UserError: a shard of the range is missing, cannot be decoded or fails its checksum.
        """
        if self._pid != os.getpid():
            self._open()
        k = self.shard_size
        shards = range(start // k, (stop - 1) // k + 1) if stop > start else range(0)
        held_from, held = self._held
        if held_from <= start and stop <= held_from + len(held):
            return held[start - held_from : stop - held_from].copy()  # a caller may write into it
        if self._self_checking:  # every slice decoded is checked: the first pass reads what it uses
            for i in shards:
                if i not in self._verified:
                    self._check_file(i)
                    self._verified.add(i)
        if all(i in self._verified for i in shards):
            return self._read(start, stop, shards)
        a, b = shards[0] * k, min((shards[-1] + 1) * k, self.n_rows)
        block = self._read(a, b, shards)  # whole shards, to check each against its checksum
        for i in shards:
            if i not in self._verified:
                self._verify(i, block[i * k - a : min((i + 1) * k, self.n_rows) - a])
        # The next series is often in the same shard: keep the decoded shards of this read for it.
        self._held = (a, block)
        return block[start - a : stop - a].copy()

    def _read(self, start: int, stop: int, shards: range) -> np.ndarray:
        """`_raw`, naming the shard that fails to read or decode."""
        try:
            return self._raw(start, stop)
        except Exception:
            k = self.shard_size
            for i in shards:  # which one: the error of a multi-shard read does not say
                a, b = i * k, min((i + 1) * k, self.n_rows)
                if not self._shard_file(i).is_file():
                    raise _damaged(self.path, i, a, b, f"its file {self._shard_file(i)} is missing") from None
                try:
                    self._raw(a, b)
                except Exception as exc:
                    why = f"it cannot be decoded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
                    raise _damaged(self.path, i, a, b, why) from exc
            raise

    def _shard_file(self, i: int) -> Path:
        assert self._zarr is not None
        chunk = (i,) + (0,) * (self._zarr.ndim - 1)
        return self.path / "images" / self._zarr.metadata.encode_chunk_key(chunk)

    def _check_file(self, i: int) -> None:
        """Refuse shard i when its file is missing (zarr would read it as the fill value)."""
        if not self._shard_file(i).is_file():
            a = i * self.shard_size
            b = min(a + self.shard_size, self.n_rows)
            raise _damaged(self.path, i, a, b, f"its file {self._shard_file(i)} is missing")

    def _verify(self, i: int, block: np.ndarray) -> None:
        """Check shard i's rows (`block`) against its recorded checksum; remember it when they match."""
        a, b = i * self.shard_size, i * self.shard_size + len(block)
        self._check_file(i)
        want = self._recorded_checksum(i)
        got = shard_checksum(block)
        if want is not None and got != want and not self._appended_to(a, b, want):
            raise _damaged(self.path, i, a, b, f"checksum {got} differs from the recorded {want}")
        self._verified.add(i)

    def _appended_to(self, a: int, b: int, want: str) -> bool:
        """Whether an append in progress rewrote the shard of rows [a, b) with rows beyond `n_rows`.

        Its checksum then covers those rows too; readers of the committed rows must not fail on it.
        """
        assert self._zarr is not None
        end = min(a + self.shard_size, int(self._zarr.shape[0]))
        try:
            return end > b and shard_checksum(self._raw(a, end)) == want
        except Exception:
            return False

    def _recorded_checksum(self, i: int) -> str | None:
        """The CRC-32 shard i's writer recorded; None for a store that records none."""
        import zarr

        if self._markers is None:
            try:
                self._markers = zarr.open_array(str(self.path / "conversion" / "shard_done"), mode="r")
            except FileNotFoundError:
                return None
        markers = self._markers
        try:
            marker = str(markers[i]) if i < markers.shape[0] else ""
        except Exception as exc:  # its chunk fails its checksum, or to decode
            a = i * self.shard_size
            why = f"its done-marker cannot be read ({type(exc).__name__})"
            raise _damaged(self.path, i, a, min(a + self.shard_size, self.n_rows), why) from exc
        if ":" not in marker:
            a = i * self.shard_size
            raise _damaged(self.path, i, a, min(a + self.shard_size, self.n_rows), "no checksum recorded")
        return marker.split(":", 1)[1]


__all__ = ["READERS", "ImageReader", "resolve_reader"]
