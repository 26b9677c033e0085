"""What a conversion plan reads from the store it extends: its settings, last manifest and salt.

A store made with other settings (source folder, shard size, image size, format or render version) is
refused with a one-line `UserError` unless the run replaces it (`--overwrite`); `check_store` makes
that check before any file is scanned. The salt of the patient keys lives beside the store
(`STORE.salt`), so that sharing the store does not share the means to test a guessed patient id.

The store records its source folder by a digest keyed with that salt (`source_id`), never by its
path: a folder named after a patient would otherwise travel with the store. The digest is of the
path's bytes, so the same folder is the same source in every locale (`LC_ALL=C` decodes a non-ASCII
name differently from a UTF-8 locale). A store written before the digest holds the path itself
(`plan.config.source`); it is still recognised, and its next commit records the digest instead.
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
    read_salt,
    salt_path,
    store_attrs,
)

#: Version of the pixel rendering recorded in every shard key: bump it when `read_rendered` changes
#: its output, so that existing stores are refused instead of silently mixing two renderings.
RENDER_VERSION = 1


def plan_config(source: Path, shard_size: int, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    """The settings a store is tied to; a store made with other settings is a different plan.

    `source` is the resolved folder as locale-proof text (`source_text`); the store records its keyed
    digest instead (`stored_config`).
    """
    return {
        "format_version": FORMAT_VERSION,
        "render_version": RENDER_VERSION,
        "image_size": image_size,
        "shard_size": shard_size,
        "source": source_text(source),
    }


def source_text(source: str | os.PathLike[str]) -> str:
    """The resolved folder `source` as text that is the same in every locale.

    Its bytes read as UTF-8, undecodable bytes as surrogates: under a UTF-8 locale (where stores were
    made before) this is the path as Python shows it.
    """
    return os.fsencode(os.path.realpath(source)).decode("utf-8", "surrogateescape")


def source_id(text: str, salt: bytes) -> str:
    """The store's record of its source folder (`source_text`): a digest keyed with the store's salt.

    Keyed, so that someone holding the store but not the salt beside it cannot test a guessed folder.
    """
    data = text.encode("utf-8", "surrogateescape")
    return hashlib.blake2b(data, key=salt, person=b"ich-source", digest_size=16).hexdigest()


def stored_config(config: dict[str, Any], salt: bytes) -> dict[str, Any]:
    """What the store records of the plan settings `config`: the source folder as its `source_id`."""
    out = {k: v for k, v in config.items() if k != "source"}
    out["source_id"] = source_id(config["source"], salt)
    return out


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
    differs = (
        _differences(store, prev_config, config)
        if isinstance(prev_config, dict)
        else ["not by `ich convert`"]
    )
    if differs:
        raise UserError(
            f"STORE {store}: made from a different plan ({'; '.join(differs)}); "
            "pass --overwrite to replace it, or choose another STORE"
        )
    mp = manifest_path(store)
    if not mp.is_file() and attrs.get("state") == "complete":
        raise UserError(f"{mp}: missing; it records what the store holds, so the store cannot be extended")
    return attrs


_SETTINGS = {
    "shard_size": "shard size",
    "image_size": "image size",
    "format_version": "format version",
    "render_version": "render version",
}


def _differences(store: Path, recorded: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """What differs between the plan settings a store recorded and this run's `config`, in words."""
    out = [
        f"{words} {recorded.get(key)}, this run's {words} {config[key]}"
        for key, words in _SETTINGS.items()
        if recorded.get(key) != config[key]
    ]
    extra = set(recorded) - {*_SETTINGS, "source", "source_id"}
    out += [f"a setting {key} this version does not know" for key in sorted(extra)]
    if "source_id" in recorded:
        same_source = recorded["source_id"] == source_id(config["source"], _recorded_salt(store))
    else:  # written before `source_id`: the path itself, as text of the locale it was written in
        same_source = _locale_proof(recorded.get("source")) == config["source"]
    if not same_source:
        out.append(f"another SOURCE folder than this run's, {config['source']}")
    return out


def made_from(store: str | os.PathLike[str], source: str | os.PathLike[str]) -> bool:
    """Whether the ich store at `store` records `source` as its source folder (False for anything else).

    By its `source_id` and the salt beside it, or by the path a store written before that holds.
    """
    attrs = store_attrs(store) or {}
    recorded = (attrs.get("plan") or {}).get("config")
    if not isinstance(recorded, dict):
        return False
    if "source_id" not in recorded:
        return _locale_proof(recorded.get("source")) == source_text(source)
    salt = salt_path(store)
    return salt.is_file() and recorded["source_id"] == source_id(source_text(source), read_salt(salt))


def _locale_proof(text: object) -> object:
    """A path's text as `source_text` gives it, whichever locale decoded it (other values unchanged)."""
    if not isinstance(text, str):
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")


def _recorded_salt(store: Path) -> bytes:
    """The salt the store's `source_id` was made with; a `UserError` when it is gone."""
    p = salt_path(store)
    if not p.is_file():
        raise UserError(
            f"{p}: missing; the store records its SOURCE folder with it, so this run cannot tell whether "
            "SOURCE is the store's. Put the salt file back beside the store, or pass --overwrite"
        )
    return read_salt(p)


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
        return read_salt(p)
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
    return read_salt(p)


__all__ = [
    "RENDER_VERSION",
    "check_store",
    "load_salt",
    "made_from",
    "plan_config",
    "previous_run",
    "resolve_shard_size",
    "salt_check",
    "source_id",
    "source_text",
    "stored_config",
]
