"""One shard file of `images`: its checksum, and writing and reading it whole, without zarr's pipeline.

A shard task renders a shard's slices and writes the file once (`write_images`); `ich verify` and the
training reader read it back (`read_shard`), each slice checked against its own CRC-32C (zarr's
`crc32c` codec on the inner chunks, `inner_checksum`), and `ich verify` compares `shard_checksum` with
the done-marker. On a
local store with the layout `ichdata.store.create_images` makes, the file is encoded and decoded
here, byte for byte what zarr writes and reads (tested); anywhere else zarr does it. A features
group's `features` (`ichdata.features`) has the same layout (one row per inner chunk, zstd) in
float16, and goes through the same functions.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ichdata.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from zarr import Array

ZSTD_LEVEL = 1


def shard_checksum(block: np.ndarray) -> str:
    """CRC-32 of a shard's values (their bytes in C order), as 8 hex digits.

    What the done-marker records and `ich verify` checks. A checksum against accidents (a truncated or
    damaged shard file), not an adversary: CRC-32 is far cheaper than a cryptographic hash.
    """
    import zlib

    return f"{zlib.crc32(np.ascontiguousarray(block).reshape(-1).view(np.uint8).data):08x}"


def write_images(images: Array, start: int, block: np.ndarray) -> None:
    """`images[start:start + len(block)] = block` for one whole shard.

    `start` is on a shard boundary and `block` is the whole shard or the array's last rows. On a local
    store the shard file is encoded here and written atomically (`ichdata.atomic`): byte for byte what
    zarr writes (tested), at a fraction of the CPU time, because zarr's pipeline spends as long on
    bookkeeping per inner chunk as on zstd. Anywhere else (an fsspec store, another layout) zarr writes
    it, without its per-chunk test for all-zero chunks (a CT slice is never all air, and the test is
    as costly as the bookkeeping).
    """
    import zarr

    path = _local_shard_path(images, start, len(block))
    if path is not None and images.shards is not None and block.dtype == images.dtype:
        data = _encode_shard(block, int(images.shards[0]), checksum=inner_checksum(images))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
        return
    with zarr.config.set({"array.write_empty_chunks": True}):
        images[start : start + len(block)] = block


def _local_shard_path(images: Array, start: int, n: int) -> Path | None:
    """The file of the shard at row `start`, or None where zarr must write it.

    A file only when `images` has exactly the layout `create_images` makes on a local store (or the one
    of earlier releases, without the inner chunks' `crc32c`) and `n` rows fill the shard.
    """
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec
    from zarr.core.metadata import ArrayV3Metadata
    from zarr.storage import LocalStore

    store = getattr(images, "store", None)
    meta = images.metadata
    shards = images.shards
    if not isinstance(store, LocalStore) or not isinstance(meta, ArrayV3Metadata) or shards is None:
        return None
    codecs = meta.codecs
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sc = codecs[0]
    inner = sc.codecs
    k = int(shards[0])
    endian = getattr(inner[0], "endian", None) if inner else None
    native = endian is None or str(getattr(endian, "value", endian)) == sys.byteorder
    expected_index = (
        len(sc.index_codecs) == 2
        and isinstance(sc.index_codecs[0], BytesCodec)
        and str(getattr(sc.index_codecs[0].endian, "value", sc.index_codecs[0].endian)) == "little"
        and isinstance(sc.index_codecs[1], Crc32cCodec)
        and str(getattr(sc.index_location, "value", sc.index_location)) == "end"
    )
    expected_inner = (
        len(inner) in (2, 3)
        and isinstance(inner[0], BytesCodec)
        and native
        and isinstance(inner[1], ZstdCodec)
        and not inner[1].checksum
        and (len(inner) == 2 or isinstance(inner[2], Crc32cCodec))
        and tuple(sc.chunk_shape) == (1, *images.shape[1:])
        and tuple(shards[1:]) == tuple(images.shape[1:])
    )
    separator = getattr(meta.chunk_key_encoding, "separator", None)
    fits = start % k == 0 and (n == k or start + n == images.shape[0]) and n > 0
    if not (expected_index and expected_inner and fits and meta.chunk_key_encoding.name == "default"):
        return None
    if separator != "/":
        return None
    key = "/".join(["c", str(start // k), *["0"] * (len(images.shape) - 1)])
    return Path(store.root) / images.path / key


def inner_checksum(images: Array) -> bool:
    """Whether each inner chunk of `images` carries its CRC-32C (zarr's `crc32c` codec after zstd).

    Stores of earlier releases do not: their shards are checked whole, against the done-marker.
    """
    from zarr.codecs import Crc32cCodec, ShardingCodec
    from zarr.core.metadata import ArrayV3Metadata

    meta = images.metadata
    if (
        not isinstance(meta, ArrayV3Metadata)
        or not meta.codecs
        or not isinstance(meta.codecs[0], ShardingCodec)
    ):
        return False
    inner = meta.codecs[0].codecs
    return bool(inner) and isinstance(inner[-1], Crc32cCodec)


def _encode_shard(
    block: np.ndarray, shard_size: int, level: int = ZSTD_LEVEL, *, checksum: bool = True
) -> bytes:
    """A zarr v3 `sharding_indexed` shard of one-row inner chunks.

    Zstd frames (each followed by its CRC-32C with `checksum`), then the index ((offset, nbytes)
    little-endian uint64 per inner chunk; 2**64-1 for a chunk whose bytes are all zero, which reads back as
    the fill value 0, and for chunks past the array's end) and its CRC-32C.
    """
    import google_crc32c
    from numcodecs.zstd import Zstd

    zstd = Zstd(level=level)
    index = np.full((shard_size, 2), np.iinfo(np.uint64).max, dtype="<u8")
    parts = []
    offset = 0
    for j in range(len(block)):
        # All fill value: zarr leaves the inner chunk out, and so do we. Bytes, not values: a float
        # -0.0 must come back as written.
        if not block[j].reshape(-1).view(np.uint8).any():
            continue
        p = bytes(zstd.encode(np.ascontiguousarray(block[j])))
        if checksum:
            p += google_crc32c.value(p).to_bytes(4, "little")
        parts.append(p)
        index[j] = (offset, len(p))
        offset += len(p)
    index_bytes = index.tobytes()
    return (
        b"".join(bytes(p) for p in parts)
        + index_bytes
        + google_crc32c.value(index_bytes).to_bytes(4, "little")
    )


def read_shard(
    images: Array,
    start: int,
    stop: int,
    *,
    checked: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Rows `[start, stop)` of `images`, all in one shard (the one that holds row `start`).

    On a local store with the layout `create_images` makes, decoded straight from the shard file (the
    inverse of `_encode_shard`: the index's CRC-32C checked, each slice's too where the store has them,
    an absent inner chunk or file read as the fill value, as zarr reads them), reading only the bytes
    of these rows; anywhere else through zarr. Same values as `images[start:stop]` at a fraction of the
    CPU time (zarr's per-inner-chunk bookkeeping), and a damaged shard raises.

    `checked`, one flag per row of the range (the caller's, kept between calls), skips the CRC-32C of
    the rows already flagged and flags those it checks: a reader checks each slice once per process.
    `out` (uint8, the range's shape) receives the rows and is returned.
    """
    k = int(images.shards[0]) if images.shards is not None else 0
    first = start - start % k if k else 0
    path = None
    if k and 0 <= start <= stop <= min(first + k, images.shape[0]):
        path = _local_shard_path(images, first, min(k, int(images.shape[0]) - first))
    if path is None or images.fill_value != 0:
        rows = np.asarray(images[start:stop])
        if out is None:
            return rows
        out[...] = rows
        return out
    return _decode_shard(
        path,
        start - first,
        stop - first,
        k,
        tuple(int(d) for d in images.shape[1:]),
        np.dtype(images.dtype),
        checksum=inner_checksum(images),
        checked=checked,
        out=out,
    )


def _decode_shard(
    path: Path,
    first: int,
    n: int,
    shard_size: int,
    chunk_shape: tuple[int, ...],
    dtype: np.dtype[Any],
    *,
    checksum: bool,
    checked: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Inner chunks `first` to `n` (exclusive) of the shard file at `path` (see `read_shard`), into `out`.

    Two positioned reads: the index at the end of the file, then the bytes of these chunks. With
    `checksum`, each chunk's trailing CRC-32C is checked before it is decoded (unless `checked` flags
    its row already).
    """
    import google_crc32c
    from numcodecs.zstd import Zstd

    if out is None:
        out = np.empty((n - first, *chunk_shape), dtype=dtype)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:  # zarr reads a shard that was never written as the fill value
        out[...] = 0
        return out
    try:
        size = os.fstat(fd).st_size
        index_len = 16 * shard_size + 4
        if size < index_len:
            raise ValueError(f"{path}: {size:,} bytes, shorter than its own index ({index_len:,})")
        tail = os.pread(fd, index_len, size - index_len)
        if google_crc32c.value(tail[:-4]) != int.from_bytes(tail[-4:], "little"):
            raise ValueError(f"{path}: the CRC-32C of the shard index does not match")
        index = np.frombuffer(tail[:-4], dtype="<u8").reshape(shard_size, 2)
        empty = np.iinfo(np.uint64).max
        spans = [
            (j, int(index[j, 0]), int(index[j, 1]))
            for j in range(first, n)
            if not (index[j, 0] == empty and index[j, 1] == empty)
        ]
        for j, offset, nbytes in spans:
            if offset + nbytes > size - index_len:
                raise ValueError(
                    f"{path}: inner chunk {j} lies past the end of the data ({offset + nbytes:,} bytes)"
                )
        lo = min((o for _, o, _ in spans), default=0)
        hi = max((o + b for _, o, b in spans), default=0)
        data = os.pread(fd, hi - lo, lo) if spans else b""
    finally:
        os.close(fd)
    if len(data) != hi - lo:
        raise ValueError(f"{path}: ends while it is read ({lo + len(data):,} of {hi:,} bytes)")
    body = np.frombuffer(data, dtype=np.uint8)  # read-only views of `data`
    if len(spans) < n - first:  # absent inner chunks read as the fill value
        absent = sorted(set(range(first, n)) - {j for j, _, _ in spans})
        out[[j - first for j in absent]] = 0
    zstd = Zstd()
    size = out[0].nbytes if len(out) else 0
    for j, offset, nbytes in spans:
        frame = body[offset - lo : offset - lo + nbytes]
        if checksum:
            frame, crc = frame[:-4], frame[-4:].tobytes()
            if checked is None or not checked[j - first]:
                if google_crc32c.value(frame) != int.from_bytes(crc, "little"):
                    raise ValueError(
                        f"{path}: inner chunk {j} (row {j} of the shard) fails its CRC-32C checksum"
                    )
                if checked is not None:
                    checked[j - first] = True
            # The bytes its writer wrote, so a whole slice: decoded in place (zstd would not say if a
            # frame held fewer bytes than `out` has room for).
            zstd.decode(frame, out=out[j - first])
            continue
        chunk = zstd.decode(frame)
        if len(chunk) != size:
            raise ValueError(f"{path}: inner chunk {j} decodes to {len(chunk):,} bytes, {size:,} expected")
        out[j - first] = np.frombuffer(chunk, dtype=dtype).reshape(chunk_shape)
    return out


__all__ = ["ZSTD_LEVEL", "inner_checksum", "read_shard", "shard_checksum", "write_images"]
