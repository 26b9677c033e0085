"""ichmodel: the store streamed into torch, the paper's three detectors, training, evaluation, prediction.

Modules, one concept each: `data` (study windows, slices, sharding, the patient split), `augment`
(GPU batch augmentation), `models` (xception / xception_lstm / xception_gru on a timm backbone,
`load_model`, `predict_study`), `losses` (the RSNA weighted log loss in torch), `train`
(`TrainConfig`, `train`, the checkpoint format), `metrics`, `evaluate`, `predict`, `report`.

Names are imported lazily on first use, so `import ichmodel` (done by the `ich` CLI) costs nothing
until torch is actually needed. The functions named like their modules are imported from them:
`from ichmodel.train import train`, `from ichmodel.augment import augment`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StudyDataset": "data",
    "SliceDataset": "data",
    "StudyBatchSampler": "data",
    "collate_studies": "data",
    "make_loader": "data",
    "split_by_patient": "data",
    "read_split": "data",
    "write_split": "data",
    "AugmentConfig": "augment",
    "create_model": "models",
    "load_model": "models",
    "predict_study": "models",
    "SliceClassifier": "models",
    "SequenceClassifier": "models",
    "weighted_bce_sums": "losses",
    "TrainConfig": "train",
    "RunResult": "train",
    "weighted_log_loss": "metrics",
    "roc_auc": "metrics",
    "roc_curve": "metrics",
    "confusion_counts": "metrics",
    "Counts": "metrics",
    "summarize": "metrics",
    "evaluate_runs": "evaluate",
    "evaluate_run": "evaluate",
    "write_report": "evaluate",
    "RunEvaluation": "evaluate",
    "predict_folder": "predict",
    "predict_store": "predict",
    "PredictResult": "predict",
    "plot_roc": "report",
    "plot_false_negatives": "report",
    "markdown_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ichmodel' has no attribute {name!r}")
    return getattr(importlib.import_module(f"ichmodel.{module}"), name)
