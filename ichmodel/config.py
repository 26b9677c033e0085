"""`TrainConfig`: everything a training run depends on, one field per `ich train` option.

Each field carries its default and help (`ichdata.options.option`); the `ich` command line is built
from them. The resolved config (`resolve()`) is what `config.json` and the checkpoints record, so the
path fields stay `str` (JSON-ready).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ichdata.errors import UserError
from ichdata.options import option
from ichmodel.data import DEFAULT_MAX_LEN
from ichmodel.models import DEFAULT_BACKBONE, MODEL_NAMES, variant

#: Config fields that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = frozenset({"resume", "progress", "workers", "stop_after", "compile", "device", "split"})
#: Options of training on images that mean nothing with `--features` (the CNN is the features' own).
_IMAGE_ONLY = ("init_backbone", "weights", "pretrained", "compile", "grad_checkpointing", "window_jitter")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. `None` fields are resolved by `resolve()`."""

    store: str = option(positional=True, metavar="STORE", help="the store written by `ich convert`")
    out: str = option(metavar="RUN_DIR", help="run directory (created)")
    model: str = option("xception_gru", choices=MODEL_NAMES, help="the detector to train")
    backbone: str | None = option(
        None,
        help=f"timm model name of the per-slice CNN (default {DEFAULT_BACKBONE}; with --features, theirs)",
    )
    pretrained: bool = option(False, help="start from timm's pretrained weights (downloads)")
    weights: str | None = option(None, help="local weights file for the backbone (.pth/.safetensors)")
    bidirectional: bool = option(False, help="bidirectional LSTM/GRU")
    rnn_hidden: int = option(512, help="LSTM/GRU units per direction (the paper's 512)")
    rnn_layers: int = option(2, help="LSTM/GRU layers (the paper's 2)")
    # The winners' stage-wise schedule: the CNN first, the sequence model on its features second.
    # The backbone's weights (and `fc` when the shapes match) come from that run's checkpoint, and a
    # sequence model starts with its gate open, i.e. exactly as the CNN-only model.
    init_backbone: str | None = option(
        None,
        metavar="CHECKPOINT",
        help="start from the backbone (and classifier) of an earlier run's best.pt: stage-wise training",
    )
    freeze_backbone: bool = option(False, help="train only the LSTM/GRU and the head on a fixed backbone")
    # The two-stage route: the CNN ran once over the store (`ich features`); the sequence model and
    # the head train on its cached vectors and compose with that CNN into an ordinary checkpoint.
    features: str | None = option(
        None,
        metavar="FEATURES",
        help="train only the LSTM/GRU and the head on the cached CNN features of `ich features` "
        "(no image is read); the checkpoint composes them with the features' CNN",
    )
    seq_crop: int | None = option(
        None, metavar="T", help="with --features: each training window becomes a random run of T slices of it"
    )
    seq_reverse: bool = option(
        False, help="with --features: reverse a training window's slice order with probability 1/2"
    )
    neighbour_diff: bool = option(
        False, help="the LSTM/GRU reads each slice's features with their differences to its neighbours'"
    )
    folds: int | None = option(
        None, metavar="K", help="K patient-grouped folds (with --fold), for out-of-fold features"
    )
    fold: int | None = option(None, metavar="I", help="the fold (0 to K-1) this run validates on")
    epochs: int = option(10, help="epochs to train")
    batch_size: int | None = option(None, help="studies per step (slices for xception); default 4 (64)")
    max_len: int = option(DEFAULT_MAX_LEN, help="longest study window in slices (longer studies are cut)")
    lr: float = option(3e-4, help="peak learning rate (AdamW)")
    weight_decay: float = option(0.01, help="AdamW weight decay (not on biases and norms)")
    warmup: float = option(0.05, help="fraction of the steps spent warming up")
    accum: int = option(1, help="gradient accumulation: batches per optimizer step")
    device: str = option("auto", help="cpu, cuda or auto (default: cuda when available)")
    compile: bool = option(False, help="torch.compile the backbone")
    grad_checkpointing: bool = option(False, help="recompute backbone activations (less memory)")
    workers: int | None = option(None, help="DataLoader workers per process (default: min(8, cores))")
    seed: int = option(0, help="seed of the split, the data order, the initial weights and augmentation")
    val_fraction: float = option(0.1, help="fraction of slices held out, by patient")
    split: str | None = option(None, help="reuse a split.json from an earlier run")
    resume: bool = option(False, help="continue RUN_DIR/last.pt where it stopped")
    augment: bool = option(True, flag="--no-augment", help="no flips/rotations/scales/shifts")
    window_jitter: bool = option(False, help="also jitter window level/width a little")
    reader: str = option("auto", choices=("auto", "tensorstore", "zarr"), help="store reading backend")
    progress: bool = option(True, flag="--quiet", help="no progress bar")
    stop_after: int | None = option(None, help="stop after this many epochs in this invocation")

    def resolve(self) -> TrainConfig:
        """Fill in defaults that depend on the model, the features or the machine, and check values."""
        if self.model not in MODEL_NAMES:
            raise UserError(f"--model {self.model!r}: expected one of {', '.join(MODEL_NAMES)}")
        for name in ("epochs", "accum", "max_len", "rnn_hidden", "rnn_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.seq_crop is not None and self.seq_crop < 1:
            raise UserError(f"--seq-crop {self.seq_crop}: must be at least 1")
        if (self.folds is None) != (self.fold is None):
            raise UserError("--folds and --fold go together: --folds K --fold I trains fold I of K")
        if self.folds is not None and self.split is not None:
            raise UserError("--folds makes its own split; --split cannot be given with it")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device {self.device!r}: expected cpu, cuda or auto")
        init = self.init_backbone
        if init is not None:
            if not Path(init).is_file():
                raise UserError(f"--init-backbone {init}: no such file")
            init = str(Path(init).absolute())
        backbone = self.backbone or DEFAULT_BACKBONE
        features = None
        if self.features is not None:
            features = str(Path(self.features).absolute())
            backbone = self._check_features_route(features)
        elif self.seq_crop is not None or self.seq_reverse:
            raise UserError("--seq-crop and --seq-reverse augment cached features: they go with --features")
        batch = self.batch_size or variant(self.model).batch_size
        workers = self.workers if self.workers is not None else min(8, os.cpu_count() or 1)
        return dataclasses.replace(
            self,
            store=str(Path(self.store).absolute()),
            out=str(Path(self.out).absolute()),
            backbone=backbone,
            batch_size=batch,
            workers=workers,
            init_backbone=init,
            features=features,
            freeze_backbone=self.freeze_backbone or features is not None,
        )

    def _check_features_route(self, features: str) -> str:
        """Refuse what training on cached features cannot do; returns the features' backbone."""
        from ichdata.features import open_features

        if not variant(self.model).sequence:
            raise UserError(
                f"--features trains a sequence model on cached features; --model {self.model} "
                "classifies single slices (use xception_lstm or xception_gru)"
            )
        given = [f"--{k.replace('_', '-')}" for k in _IMAGE_ONLY if getattr(self, k) not in (None, False)]
        if given:
            raise UserError(
                f"{', '.join(given)}: options of training on images; with --features the CNN is the one "
                "the features came from"
            )
        made = open_features(features).attrs.get("checkpoints") or []
        theirs = str(made[0].get("backbone")) if made else None
        if self.backbone is not None and self.backbone != theirs:
            raise UserError(
                f"--features {features}: made by a CNN on backbone {theirs!r}, not the --backbone "
                f"{self.backbone!r} asked for"
            )
        return theirs or DEFAULT_BACKBONE


__all__ = ["RESUMABLE_CHANGES", "TrainConfig"]
