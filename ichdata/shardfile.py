"""One shard file of `images`: its checksum, and writing and reading it whole, without zarr's pipeline.

A shard task renders a shard's slices and writes the file once (`write_images`); `ich verify` and the
training reader read it back (`read_shard`) and compare `shard_checksum` with the done-marker. On a
local store with the layout `ichdata.store.create_images` makes, the file is encoded and decoded
here, byte for byte what zarr writes and reads (tested); anywhere else zarr does it. A features
group's `features` (`ichdata.features`) has the same layout (one row per inner chunk, zstd) in
float16, and goes through the same functions.
"""

from __future__ import annotations

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
        data = _encode_shard(block, int(images.shards[0]))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, data)
        return
    with zarr.config.set({"array.write_empty_chunks": True}):
        images[start : start + len(block)] = block


def _local_shard_path(images: Array, start: int, n: int) -> Path | None:
    """The file of the shard at row `start`, or None where zarr must write it.

    A file only when `images` has exactly the layout `create_images` makes on a local store and `n`
    rows fill the shard.
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
        len(inner) == 2
        and isinstance(inner[0], BytesCodec)
        and native
        and isinstance(inner[1], ZstdCodec)
        and not inner[1].checksum
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


def _encode_shard(block: np.ndarray, shard_size: int, level: int = ZSTD_LEVEL) -> bytes:
    """A zarr v3 `sharding_indexed` shard of one-row inner chunks.

    Zstd frames, then the index ((offset, nbytes) little-endian uint64 per inner chunk; 2**64-1 for
    a chunk whose bytes are all zero, which reads back as the fill value 0, and for chunks past the
    array's end) and its CRC-32C.
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
        p = zstd.encode(np.ascontiguousarray(block[j]))
        parts.append(p)
        index[j] = (offset, len(p))
        offset += len(p)
    index_bytes = index.tobytes()
    return (
        b"".join(bytes(p) for p in parts)
        + index_bytes
        + google_crc32c.value(index_bytes).to_bytes(4, "little")
    )


def read_shard(images: Array, start: int, stop: int) -> np.ndarray:
    """Rows `[start, stop)` of `images`, all in one shard (the one that holds row `start`).

    On a local store with the layout `create_images` makes, decoded straight from the shard file (the
    inverse of `_encode_shard`: the index's CRC-32C checked, an absent inner chunk or file read as the
    fill value, as zarr reads them); anywhere else through zarr. Same values as `images[start:stop]`
    at a fraction of the CPU time (zarr's per-inner-chunk bookkeeping), and a damaged shard raises.
    """
    k = int(images.shards[0]) if images.shards is not None else 0
    first = start - start % k if k else 0
    if k == 0 or not 0 <= start <= stop <= min(first + k, images.shape[0]):
        return np.asarray(images[start:stop])
    path = _local_shard_path(images, first, min(k, int(images.shape[0]) - first))
    if path is None or images.fill_value != 0:
        return np.asarray(images[start:stop])
    shape = tuple(int(d) for d in images.shape[1:])
    return _decode_shard(path, start - first, stop - first, k, shape, np.dtype(images.dtype))


def _decode_shard(
    path: Path,
    first: int,
    n: int,
    shard_size: int,
    chunk_shape: tuple[int, ...],
    dtype: np.dtype[Any],
) -> np.ndarray:
    """Inner chunks `first` to `n` (exclusive) of the shard file at `path` (see `read_shard`)."""
    import google_crc32c
    from numcodecs.zstd import Zstd

    out = np.zeros((n - first, *chunk_shape), dtype=dtype)
    try:
        data = path.read_bytes()
    except FileNotFoundError:  # zarr reads a shard that was never written as the fill value
        return out
    index_len = 16 * shard_size + 4
    if len(data) < index_len:
        raise ValueError(f"{path}: {len(data):,} bytes, shorter than its own index ({index_len:,})")
    body = memoryview(data)[: len(data) - index_len]
    index_bytes = data[len(data) - index_len : -4]
    if google_crc32c.value(index_bytes) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"{path}: the CRC-32C of the shard index does not match")
    index = np.frombuffer(index_bytes, dtype="<u8").reshape(shard_size, 2)
    empty = np.iinfo(np.uint64).max
    zstd = Zstd()
    size = out[0].nbytes if len(out) else 0
    for j in range(first, n):
        offset, nbytes = int(index[j, 0]), int(index[j, 1])
        if offset == empty and nbytes == empty:
            continue
        if offset + nbytes > len(body):
            raise ValueError(
                f"{path}: inner chunk {j} lies past the end of the data ({offset + nbytes:,} bytes)"
            )
        chunk = zstd.decode(body[offset : offset + nbytes])
        if len(chunk) != size:
            raise ValueError(f"{path}: inner chunk {j} decodes to {len(chunk):,} bytes, {size:,} expected")
        out[j - first] = np.frombuffer(chunk, dtype=dtype).reshape(chunk_shape)
    return out


__all__ = ["ZSTD_LEVEL", "read_shard", "shard_checksum", "write_images"]
