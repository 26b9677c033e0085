"""The checkpoint format of `ich train` (`best.pt`, `last.pt`): written, read and checked here only.

A checkpoint is a dict saved with `torch.save`. The tree:

| key | content |
| --- | --- |
| `format`, `version` | `"ich-checkpoint"`, 1 |
| `model`, `state_dict` | `create_model` keyword arguments (`name`, `backbone`, `bidirectional`, `num_classes`, `drop_rate`, `rnn_hidden`, `rnn_layers`); the plain module's weights |
| `classes`, `image_size`, `windows`, `max_len` | label columns in output order; what inputs look like; the training window length |
| `config`, `store` | the resolved `TrainConfig` as a dict; the training store's `path`, `n_slices`, `n_series` |
| `epoch`, `step`, `val_loss`, `best_val_loss`, `best_epoch` | epochs and optimizer steps done; validation losses |
| `optimizer`, `scheduler`, `rng` | `last.pt` only (`TRAINING_STATE`): what `--resume` restores, RNG states of every rank |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ichdata.atomic import atomic_path
from ichdata.errors import UserError

CHECKPOINT_FORMAT = "ich-checkpoint"
CHECKPOINT_VERSION = 1
#: Keys only `last.pt` holds: the training state that `--resume` needs and inference does not.
TRAINING_STATE = frozenset({"optimizer", "scheduler", "rng"})


def save_checkpoint(checkpoint: Mapping[str, object], path: str | os.PathLike[str]) -> None:
    """Write `checkpoint` (the tree in the module docstring) to `path` atomically.

    Args:
        checkpoint: the tree; `format` and `version` are filled in.
        path: the file to write (replaced whole or not at all).
    """
    tree = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **checkpoint}
    with atomic_path(path) as tmp:
        torch.save(tree, tmp)


def read_checkpoint(path: str | os.PathLike[str], *, what: str = "checkpoint") -> dict[str, Any]:
    """Read and check the checkpoint at `path`: its tree with the tensors on the CPU.

    Args:
        path: the checkpoint file.
        what: how error messages name the file (`--init-backbone`, `checkpoint`, ...).

    Raises:
        UserError: one line naming the file when it is missing or not an ich training checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{what} {p}: no such file")
    tree = torch.load(p, map_location="cpu", weights_only=False)
    if not isinstance(tree, dict) or tree.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{what} {p}: not an ich training checkpoint")
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
