"""ichmodel: the store streamed into torch, the paper's three detectors, training, evaluation, prediction.

Import from the module that does the job (`from ichmodel.train import train`): the store as study
windows `data` (read through `reader`), GPU batch augmentation `augment`, the detectors on a timm
backbone `models`, the RSNA weighted log loss `losses`, training's settings `config`, its run directory
`rundir`, devices and ranks `runtime`, the epoch `loop`, `checkpoint` (the one owner of the checkpoint
format), `train`, `metrics`, `evaluate` with its `report`, and `predict` on new DICOM folders.
"""

from __future__ import annotations

__all__ = [
    "augment",
    "checkpoint",
    "config",
    "data",
    "evaluate",
    "loop",
    "losses",
    "metrics",
    "models",
    "predict",
    "reader",
    "report",
    "rundir",
    "runtime",
    "train",
]
