"""The checkpoint format of `ich train` (`best.pt`, `last.pt`): written, read and checked here only.

A checkpoint is a safetensors file: the tensors, plus JSON metadata holding the rest of the tree and
a sha256 over both, so that loading one runs no code and a changed byte is refused. The tree's keys
are listed in `save_checkpoint`; a reader checks each one's type (`_ENTRIES`) before anything uses it,
since a valid checksum proves only that the file is whole, not who wrote it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ichdata.atomic import write_bytes_atomic
from ichdata.errors import UserError
from ichmodel.models import RECORDED_ARGS, check_backbone

CHECKPOINT_FORMAT = "ich-checkpoint"
CHECKPOINT_VERSION = 2
#: Keys only `last.pt` holds: the training state that `--resume` needs and inference does not.
TRAINING_STATE = frozenset({"optimizer", "scheduler", "rng"})

_TREE_KEY = "ich"  # safetensors metadata entry holding the JSON tree
_SUM_KEY = "sha256"  # ... and the one holding the checksum of tree and tensors
_TENSOR, _TUPLE, _ITEMS = "__tensor__", "__tuple__", "__items__"
_ZIP_MAGIC = b"PK\x03\x04"  # what `torch.save` writes: a zip around a pickle


def _encode(obj: object, name: str, tensors: dict[str, torch.Tensor]) -> object:
    """`obj` as JSON-ready data, its tensors moved into `tensors` under path-like names."""
    if isinstance(obj, torch.Tensor):
        key = name if name not in tensors else f"{name}#{len(tensors)}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, f"{name}/{k}", tensors) for k, v in obj.items()}
        # int keys (an optimizer's per-parameter state) survive as pairs
        return {_ITEMS: [[k, _encode(v, f"{name}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{name}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, str | int | float | bool):
        return obj
    raise TypeError(f"checkpoint entry {name}: cannot store a {type(obj).__name__}")


def _decode(obj: object, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of `_encode`."""
    if isinstance(obj, dict):
        if _TENSOR in obj:
            return tensors[obj[_TENSOR]]
        if _TUPLE in obj:
            return tuple(_decode(v, tensors) for v in obj[_TUPLE])
        if _ITEMS in obj:
            return {k: _decode(v, tensors) for k, v in obj[_ITEMS]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _digest(tree_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the JSON tree and of every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(tree_json.encode())
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def save_checkpoint(checkpoint: Mapping[str, object], path: str | os.PathLike[str]) -> None:
    """Write `checkpoint` (the tree below) to `path` atomically.

    | key | content |
    | --- | --- |
    | `format`, `version` | `"ich-checkpoint"`, 2 |
    | `model`, `state_dict` | `create_model` keyword arguments (`name`, `backbone`, `bidirectional`, `num_classes`, `drop_rate`, `rnn_hidden`, `rnn_layers`, `neighbour_diff`, `ensemble`); the plain module's weights |
    | `classes`, `image_size`, `windows`, `max_len` | label columns in output order; what inputs look like; the training window length |
    | `config`, `store` | the resolved `TrainConfig` as a dict; the training store's `path`, `n_slices`, `n_series` |
    | `epoch`, `step`, `val_loss`, `best_val_loss`, `best_epoch` | epochs and optimizer steps done; validation losses |
    | `features` | trained on cached features: the group's `path`, `config_hash`, `n_slices`, `route`, `tta`; else None |
    | `optimizer`, `scheduler`, `rng` | `last.pt` only (`TRAINING_STATE`): what `--resume` restores, RNG states of every rank |

    Args:
        checkpoint: the tree; `format` and `version` are filled in. Values are tensors, str, int,
            float, bool, None and dicts, lists and tuples of them.
        path: the file to write (replaced whole or not at all).
    """
    from safetensors.torch import save

    tree = {**checkpoint, "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION}
    tensors: dict[str, torch.Tensor] = {}
    tree_json = json.dumps(_encode(tree, "", tensors))
    seen: set[int] = set()
    for name, t in tensors.items():  # safetensors refuses tensors that share memory
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            tensors[name] = t.clone()
        seen.add(ptr)
    data = save(tensors, metadata={_TREE_KEY: tree_json, _SUM_KEY: _digest(tree_json, tensors)})
    write_bytes_atomic(path, data)


def _parse(data: bytes) -> dict[str, Any]:
    """The tree of checkpoint bytes `data`; raises ValueError saying what is wrong with them."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    if not data:
        raise ValueError("the file is empty")
    if data.startswith(_ZIP_MAGIC):
        raise ValueError(
            "a torch.save pickle, which ich does not load because loading a pickle can run code "
            f"(ich writes format {CHECKPOINT_VERSION}: safetensors with JSON metadata)"
        )
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except (SafetensorError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"not a safetensors file, or a damaged one ({first})") from exc
    tree_json, digest = meta.get(_TREE_KEY), meta.get(_SUM_KEY)
    if not isinstance(tree_json, str) or not isinstance(digest, str):
        raise ValueError("a safetensors file without ich metadata")
    if _digest(tree_json, tensors) != digest:
        raise ValueError("its contents do not match their checksum (the file is damaged or was changed)")
    try:
        tree = _decode(json.loads(tree_json), tensors)
    except (KeyError, TypeError, ValueError, RecursionError) as exc:  # JSON ich's `_encode` does not write
        raise ValueError(f"its metadata is malformed ({type(exc).__name__})") from exc
    if not isinstance(tree, dict) or tree.get("format") != CHECKPOINT_FORMAT:
        raise ValueError("not an ich training checkpoint")
    if tree.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"format version {tree.get('version')!r}, this ich reads {CHECKPOINT_VERSION}")
    model = tree.get("model")
    if not isinstance(model, dict) or not all(isinstance(model.get(k), str) for k in ("name", "backbone")):
        raise ValueError("its metadata names no model and backbone")
    if not isinstance(tree.get("state_dict"), dict):
        raise ValueError("it holds no model weights")
    _check_entries(tree)
    return tree


def _count(least: int) -> Callable[[object], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= least


def _number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _class_names(v: object) -> bool:
    return (
        isinstance(v, list) and bool(v) and all(isinstance(c, str) and c for c in v) and len(set(v)) == len(v)
    )


def _dicts(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, dict) for x in v)


#: What each entry of a tree must be, where present: (check, what is expected). `model` and
#: `state_dict` are checked apart; the training state only in the shape `--resume` hands to torch.
_ENTRIES: dict[str, tuple[Callable[[object], bool], str]] = {
    "classes": (_class_names, "a list of distinct class names"),
    "image_size": (lambda v: v is None or _count(1)(v), "a whole number of at least 1"),
    "max_len": (lambda v: v is None or _count(1)(v), "a whole number of at least 1"),
    "windows": (lambda v: v is None or isinstance(v, list | dict), "a list"),
    "config": (lambda v: isinstance(v, dict), "the run's settings"),
    "store": (lambda v: isinstance(v, dict), "the training store's description"),
    "epoch": (_count(0), "a whole number"),
    "step": (_count(0), "a whole number"),
    "best_epoch": (_count(-1), "a whole number"),
    "val_loss": (lambda v: v is None or _number(v), "a number"),
    "best_val_loss": (lambda v: v is None or _number(v), "a number"),
    "optimizer": (lambda v: isinstance(v, dict), "an optimizer state"),
    "scheduler": (lambda v: isinstance(v, dict), "a schedule state"),
    "rng": (_dicts, "a list of random states"),
    "features": (lambda v: v is None or isinstance(v, dict), "the cached features' description"),
}
#: The entries `--resume` needs besides the model (`read_checkpoint(training=True)`).
_RESUME_ENTRIES = ("config", "epoch", "step", "best_val_loss", "best_epoch", *sorted(TRAINING_STATE))


def _kind(value: object) -> str:
    return "null" if value is None else f"a {type(value).__name__}"


def _check_entries(tree: Mapping[str, Any]) -> None:
    """Raise ValueError naming the first entry that is not what `save_checkpoint` writes.

    `model` may hold only `RECORDED_ARGS`, each of its type: a file that asks for `pretrained`
    weights or a weights file is refused rather than silently built otherwise than it says.
    """
    for key, value in tree["model"].items():
        kind = RECORDED_ARGS.get(key)
        if kind is None:
            raise ValueError(
                f"its model entry {key!r} is not one ich records ({', '.join(RECORDED_ARGS)}): "
                "not a checkpoint `ich train` wrote"
            )
        fits = _number(value) if kind is float else type(value) is kind
        if not fits or (kind is int and value < 1) or (key == "drop_rate" and not 0 <= value < 1):
            expected = {int: "a whole number of at least 1", float: "a number in [0, 1)"}.get(
                kind, f"a {kind.__name__}"
            )
            problem = _kind(value) if not fits else "out of range"
            raise ValueError(f"its model entry {key!r} is {problem}, expected {expected}")
    try:
        check_backbone(tree["model"]["backbone"])  # a hub or path name reaches the network or a file
    except UserError as exc:
        raise ValueError(f"its {exc}") from None
    for key, value in tree["state_dict"].items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"its weight {key!r} is {_kind(value)}, not a tensor")
    for key, (check, expected) in _ENTRIES.items():
        if key in tree and not check(tree[key]):
            raise ValueError(f"its entry {key!r} is {_kind(tree[key])}, expected {expected}")
    n_classes, classes = tree["model"].get("num_classes"), tree.get("classes")
    if n_classes is not None and classes is not None and len(classes) != n_classes:
        raise ValueError(f"it names {len(classes)} classes for a model with {n_classes} outputs")


def read_checkpoint(
    path: str | os.PathLike[str], *, what: str = "checkpoint", training: bool = False
) -> dict[str, Any]:
    """Read and check the checkpoint at `path`: its tree with the tensors on the CPU.

    Args:
        path: the checkpoint file.
        what: how error messages name the file (`--init-backbone`, `--resume: last.pt`, ...).
        training: require the entries `--resume` restores (`last.pt`'s training state).

    Raises:
        UserError: one line naming the file when it is missing, empty, truncated, not a checkpoint of
            this format, its checksum does not match, or an entry is not what `ich train` writes.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file")
    try:
        tree = _parse(p.read_bytes())
    except ValueError as exc:
        raise UserError(f"{what} {p}: {exc}") from None
    missing = [k for k in _RESUME_ENTRIES if k not in tree] if training else []
    if missing:
        raise UserError(
            f"{what} {p}: holds no {', '.join(missing)}; not a last.pt that --resume can continue"
        )
    return tree


def checkpoint_info(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's description: every key but the weights and the training state."""
    return {k: v for k, v in checkpoint.items() if k != "state_dict" and k not in TRAINING_STATE}


__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "TRAINING_STATE",
    "checkpoint_info",
    "read_checkpoint",
    "save_checkpoint",
]
