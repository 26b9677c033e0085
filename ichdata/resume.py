"""What a conversion plan reads from the store it extends: its settings, last manifest and salt.

A store made with other settings (source folder, shard size, image size, format or render version) is
refused with a one-line `UserError` unless the run replaces it (`--overwrite`); `check_store` makes
that check before any file is scanned. The salt of the patient keys lives beside the store
(`STORE.salt`), so that sharing the store does not share the means to test a guessed patient id.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

from ichdata.errors import UserError
from ichdata.scan import Manifest
from ichdata.store import (
    DEFAULT_SHARD_SIZE,
    FORMAT_VERSION,
    IMAGE_SIZE,
    manifest_path,
    salt_path,
    store_attrs,
)

#: Version of the pixel rendering recorded in every shard key: bump it when `read_rendered` changes
#: its output, so that existing stores are refused instead of silently mixing two renderings.
RENDER_VERSION = 1


def plan_config(source: Path, shard_size: int, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """The settings a store is tied to; a store made with other settings is a different plan."""
    return {
        "format_version": FORMAT_VERSION,
        "render_version": RENDER_VERSION,
        "image_size": image_size,
        "shard_size": shard_size,
        "source": os.path.realpath(source),
    }


def previous_run(
    store: Path, config: dict[str, Any], overwrite: bool, *, known: Manifest | None = None
) -> tuple[dict[str, Any] | None, Manifest | None]:
    """The store's attributes and previous manifest, after checking that the store has this plan.

    `known`: the manifest beside the store as the scan just read it (not read again).
    """
    if overwrite:
        return None, None
    attrs = _store_of_plan(store, config)
    mp = manifest_path(store)
    if attrs is None or not mp.is_file():
        return attrs, None
    return attrs, known if known is not None else Manifest.read(mp, config["source"])


def _store_of_plan(store: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The attributes of the ich store at `store` (None where there is none yet), made with `config`.

    Raises:
        UserError: `store` is not an ich store, was made with other settings, or is complete without
            its manifest.
    """
    if store.exists() and not (store / "zarr.json").is_file():
        if store.is_dir() and not any(store.iterdir()):
            return None
        raise UserError(f"STORE {store}: exists and is not an ich store; choose another path")
    found = store_attrs(store)
    if found is None:
        return None
    attrs = dict(found)
    prev_plan = attrs.get("plan") or {}
    prev_config = prev_plan.get("config")
    if prev_config != config:
        was = (
            f"source {prev_config.get('source')}, shard size {prev_config.get('shard_size')}, "
            f"image size {prev_config.get('image_size')}, format {prev_config.get('format_version')}"
            if prev_config
            else "not by `ich convert`"
        )
        now = (
            f"source {config['source']}, shard size {config['shard_size']}, image size {config['image_size']}"
        )
        raise UserError(
            f"STORE {store}: made from a different plan ({was}; this run: {now}); "
            "pass --overwrite to replace it, or choose another STORE"
        )
    mp = manifest_path(store)
    if not mp.is_file() and attrs.get("state") == "complete":
        raise UserError(f"{mp}: missing; it records what the store holds, so the store cannot be extended")
    return attrs


def check_store(
    store: str | os.PathLike[str],
    source: str | os.PathLike[str],
    shard_size: int | None = None,
    overwrite: bool = False,
) -> None:
    """Raise `UserError` when `store` exists and was made from another plan (or is not a store).

    What `ich convert` checks before it scans, so that a mistake costs a second, not a scan: the
    store's attributes only, not its manifest.
    """
    if not overwrite:
        _store_of_plan(Path(store), plan_config(Path(source), resolve_shard_size(store, shard_size)))


def resolve_shard_size(store: str | os.PathLike[str], shard_size: int | None, overwrite: bool = False) -> int:
    """The shard size to use: the one asked for, else the existing store's, else `DEFAULT_SHARD_SIZE`."""
    if shard_size is not None:
        if shard_size < 1:
            raise UserError(f"--shard-size {shard_size}: expected a positive number of slices")
        return int(shard_size)
    attrs = None if overwrite else store_attrs(store)
    if attrs and attrs.get("plan") and attrs["plan"].get("config"):
        return int(attrs["plan"]["config"]["shard_size"])
    return DEFAULT_SHARD_SIZE


def salt_check(salt: bytes) -> str:
    """A check value of `salt` (the store's `salt_check` attribute): recognises the salt, reveals nothing.

    The key of no patient, made with the salt: sharing it tells no more than one more patient key does.
    """
    return hashlib.blake2b(b"ich salt check", key=salt, digest_size=8).hexdigest()


def load_salt(store: Path, *, must_exist: bool) -> bytes:
    """The salt of the store's patient keys, read from beside `store`, or made and saved for a new store.

    Raises:
        UserError: the salt file is missing and `must_exist` (the store has keyed series already).
    """
    p = salt_path(store)
    if p.is_file():
        return bytes.fromhex(p.read_text().strip())
    if must_exist:
        raise UserError(
            f"{p}: missing; the store's patient keys were made with it, so new series cannot be keyed "
            "consistently. Put the salt file back beside the store, or pass --overwrite"
        )
    salt = secrets.token_bytes(16)
    p.parent.mkdir(parents=True, exist_ok=True)
    # Linked into place, not renamed (`ichdata.atomic` renames over the target): two plans racing on a
    # new store must keep the first salt. The temporary name is the writer's own.
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(salt.hex() + "\n")
        os.chmod(tmp, 0o600)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    return bytes.fromhex(p.read_text().strip())


__all__ = [
    "RENDER_VERSION",
    "check_store",
    "load_salt",
    "plan_config",
    "previous_run",
    "resolve_shard_size",
    "salt_check",
]
