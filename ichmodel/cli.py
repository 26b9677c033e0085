"""Parsers and handlers of this stage's `ich` subcommands. Imports nothing heavy at module level."""

from __future__ import annotations

import argparse


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this stage's commands on the `ich` parser."""
    _add_train(sub)
    _add_evaluate(sub)
    _add_predict(sub)


# --- ich train (training stage) -------------------------------------------------------------------


def _train(a: argparse.Namespace) -> int:
    from ichmodel.train import TrainConfig, train

    config = TrainConfig(
        store=str(a.store),
        out=str(a.out),
        model=a.model,
        backbone=a.backbone,
        pretrained=a.pretrained,
        weights=None if a.weights is None else str(a.weights),
        bidirectional=a.bidirectional,
        rnn_hidden=a.rnn_hidden,
        rnn_layers=a.rnn_layers,
        init_backbone=None if a.init_backbone is None else str(a.init_backbone),
        freeze_backbone=a.freeze_backbone,
        epochs=a.epochs,
        batch_size=a.batch_size,
        max_len=a.max_len,
        lr=a.lr,
        weight_decay=a.weight_decay,
        warmup=a.warmup,
        accum=a.accum,
        device=a.device,
        compile=a.compile,
        grad_checkpointing=a.grad_checkpointing,
        workers=a.workers,
        seed=a.seed,
        val_fraction=a.val_fraction,
        split=None if a.split is None else str(a.split),
        resume=a.resume,
        augment=not a.no_augment,
        window_jitter=a.window_jitter,
        reader=a.reader,
        progress=not a.quiet,
        stop_after=a.stop_after,
    )
    result = train(config)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        print(
            f"best epoch {result.best_epoch}: val loss {result.best_val_loss:.4f}; checkpoint {result.best_checkpoint}"
        )
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "train",
        help="train xception / xception_lstm / xception_gru on a store (CPU, GPU, or torchrun for DDP)",
        description=(
            "Stream STORE's studies into a timm backbone (+ LSTM/GRU over the slices of each study), with the "
            "RSNA weighted log loss, AdamW + warm-up + cosine, bf16 on GPU. Writes RUN_DIR/config.json, "
            "split.json (patients held out), log.csv, last.pt (resumable) and best.pt (lowest validation loss). "
            "Under torchrun each process trains on its share of the studies (DDP)."
        ),
    )
    p.add_argument("store", type=Path, metavar="STORE", help="the store written by `ich convert`")
    p.add_argument("--out", type=Path, required=True, metavar="RUN_DIR", help="run directory (created)")
    p.add_argument("--model", choices=("xception", "xception_lstm", "xception_gru"), default="xception_gru")
    p.add_argument("--backbone", default="legacy_xception", help="timm model name of the per-slice CNN")
    p.add_argument(
        "--pretrained", action="store_true", help="start from timm's pretrained weights (downloads)"
    )
    p.add_argument(
        "--weights", type=Path, default=None, help="local weights file for the backbone (.pth/.safetensors)"
    )
    p.add_argument("--bidirectional", action="store_true", help="bidirectional LSTM/GRU")
    p.add_argument(
        "--rnn-hidden", type=int, default=512, help="LSTM/GRU units per direction (the paper's 512)"
    )
    p.add_argument("--rnn-layers", type=int, default=2, help="LSTM/GRU layers (the paper's 2)")
    p.add_argument(
        "--init-backbone",
        type=Path,
        default=None,
        metavar="CHECKPOINT",
        help="start from the backbone (and classifier) of an earlier run's best.pt: stage-wise training",
    )
    p.add_argument(
        "--freeze-backbone",
        action="store_true",
        help="train only the LSTM/GRU and the head on a fixed backbone",
    )
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--batch-size", type=int, default=None, help="studies per step (slices for xception); default 4 (64)"
    )
    p.add_argument(
        "--max-len", type=int, default=64, help="longest study window in slices (longer studies are cut)"
    )
    p.add_argument("--lr", type=float, default=3e-4, help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.05, help="fraction of the steps spent warming up")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation: batches per optimizer step")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute backbone activations (less memory)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers per process (default: min(8, cores))"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of slices held out, by patient")
    p.add_argument("--split", type=Path, default=None, help="reuse a split.json from an earlier run")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR/last.pt where it stopped")
    p.add_argument(
        "--stop-after", type=int, default=None, help="stop after this many epochs in this invocation"
    )
    p.add_argument("--no-augment", action="store_true", help="no flips/rotations/scales/shifts")
    p.add_argument("--window-jitter", action="store_true", help="also jitter window level/width a little")
    p.add_argument(
        "--reader", choices=("auto", "tensorstore", "zarr"), default="auto", help="store reading backend"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_train)


# --- ich evaluate / ich predict (evaluation stage) ------------------------------------------------


def _evaluate(a: argparse.Namespace) -> int:
    from ichmodel.evaluate import evaluate_runs

    evaluate_runs(
        a.run_dirs,
        a.store,
        a.out,
        threshold=a.threshold,
        checkpoint=a.checkpoint,
        device=a.device,
        progress=not a.quiet,
    )
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "evaluate",
        help="score trained runs on their held-out patients: report.md, metrics.json, ROC and false negatives",
        description=(
            "Run each run's best checkpoint over the held-out patients of its split (whole studies, in "
            "slice order) and write REPORT_DIR/report.md (the runs side by side, per class), "
            "metrics.json, roc.png, false_negatives.png and predictions_<run>.csv."
        ),
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="the --out of `ich train`")
    p.add_argument("--store", type=Path, required=True, help="the store the runs were trained on")
    p.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR", help="folder to write (created)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="probability at or above which a label counts as positive (0.5)",
    )
    p.add_argument(
        "--checkpoint", default="best.pt", help="checkpoint file name inside each RUN_DIR (best.pt)"
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_evaluate)


def _predict(a: argparse.Namespace) -> int:
    from ichmodel.predict import predict_folder

    predict_folder(
        a.checkpoint,
        a.source,
        a.out,
        store=a.store,
        threshold=a.threshold,
        device=a.device,
        workers=a.workers,
        progress=not a.quiet,
    )
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "predict",
        help="run a checkpoint on a folder of new DICOM studies: Kaggle submission CSV + per-study summary",
        description=(
            "Convert SOURCE exactly as `ich convert` does (same reading, set-aside rules and slice order), "
            "run the model over every study, and write OUT (Kaggle `ID,Label`, six rows per image), "
            "OUT's stem + .studies.csv (per study: max probability per class and the slices behind it) "
            "and + .set_aside.csv (files that could not be used, with the reason)."
        ),
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="best.pt of an `ich train` run")
    p.add_argument("source", type=Path, metavar="SOURCE", help="folder of DICOM files (searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="predictions CSV to write")
    p.add_argument(
        "--store", type=Path, default=None, help="keep the converted store here (default: a temporary one)"
    )
    p.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="p(any) at or above which a slice counts as flagged (0.5)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--workers", type=int, default=None, help="Dask worker processes for the conversion")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(handler=_predict)
