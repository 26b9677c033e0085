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
from ichmodel.models import DEFAULT_BACKBONE, MODEL_NAMES

#: Config fields that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = frozenset({"resume", "progress", "workers", "stop_after", "compile", "device", "split"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. `None` fields are resolved by `resolve()`."""

    store: str = option(positional=True, metavar="STORE", help="the store written by `ich convert`")
    out: str = option(metavar="RUN_DIR", help="run directory (created)")
    model: str = option("xception_gru", choices=MODEL_NAMES, help="the detector to train")
    backbone: str = option(DEFAULT_BACKBONE, help="timm model name of the per-slice CNN")
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
        """Fill in defaults that depend on the model or the machine, and check values."""
        if self.model not in MODEL_NAMES:
            raise UserError(f"--model {self.model!r}: expected one of {', '.join(MODEL_NAMES)}")
        for name in ("epochs", "accum", "max_len", "rnn_hidden", "rnn_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device {self.device!r}: expected cpu, cuda or auto")
        init = self.init_backbone
        if init is not None:
            if not Path(init).is_file():
                raise UserError(f"--init-backbone {init}: no such file")
            init = str(Path(init).absolute())
        batch = self.batch_size or (64 if self.model == "xception" else 4)
        workers = self.workers if self.workers is not None else min(8, os.cpu_count() or 1)
        return dataclasses.replace(
            self,
            store=str(Path(self.store).absolute()),
            out=str(Path(self.out).absolute()),
            batch_size=batch,
            workers=workers,
            init_backbone=init,
        )


__all__ = ["RESUMABLE_CHANGES", "TrainConfig"]
