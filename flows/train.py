"""The Prefect `train` flow: a store → a CNN → its cached features → a sequence model, one task per stage.

cnn → features → sequence: each task wraps the function its `ich` command runs (`ichmodel.train.train`
for `ich train`, `ichmodel.extract.extract_features` for `ich features`) and leaves an artifact with
its outcome, so a training job is launched the way ingest is (`prefect deployment run 'train/default'
-p store=… -p out=…`) and the UI shows which stage it is in. Training runs in the flow run's own
process, on its GPU when it has one: the flow takes no scheduler or cluster. A re-run with the same
parameters continues where the last one stopped: a stage whose run directory holds `last.pt` resumes
it (and does nothing more once it has finished), and `ich features` computes only what is missing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.ingest import _path, _run_roots, _slug
from ichmodel.config import TrainConfig
from ichmodel.extract import FeaturesConfig

if TYPE_CHECKING:
    from ichmodel.extract import FeaturesSummary
    from ichmodel.train import RunResult

__all__ = ["TrainFlowResult", "train"]

# The store and the runs are state outside Prefect, and the results are large: nothing is cached or
# persisted. A failed stage is not retried: a killed training resumes on the next flow run.
_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, "persist_result": False}


@dataclass(frozen=True)
class TrainFlowResult:
    """Where the flow's stages wrote: the CNN run, the features group and the sequence run."""

    cnn: Path
    features: Path
    sequence: Path
    best_val_loss: float


def _run_markdown(title: str, config: TrainConfig, result: RunResult) -> str:
    last = result.history[-1] if result.history else {}
    rate = last.get("train_slices_per_s")
    return "\n".join(
        [
            f"# {title}: `{config.model}` on `{config.backbone}`",
            "",
            "| | |",
            "| --- | --- |",
            f"| run directory | `{result.out}` |",
            f"| best epoch | {result.best_epoch} of {config.epochs} |",
            f"| best validation weighted log loss | {result.best_val_loss:.4f} |",
            f"| checkpoint | `{result.best_checkpoint}` |",
            f"| training slices/s (last epoch) | {rate:,.0f} |" if rate else "| training slices/s | — |",
            "",
        ]
    )


def _train_or_resume(config: TrainConfig) -> RunResult:
    from ichmodel.train import train as train_model

    resume = (Path(config.out) / "last.pt").is_file()
    return train_model(dataclasses.replace(config, resume=resume))


@task(name="cnn", **_TASK)
def cnn_task(config: TrainConfig) -> RunResult:
    """`ich train --model xception`: the per-slice CNN, end to end on the store's images."""
    result = _train_or_resume(config)
    create_markdown_artifact(
        _run_markdown("CNN", config, result),
        key=f"train-cnn-{_slug(config.out)}",
        description=f"best epoch {result.best_epoch}, val loss {result.best_val_loss:.4f}",
    )
    get_run_logger().info("cnn: best epoch %d, validation loss %.4f", result.best_epoch, result.best_val_loss)
    return result


@task(name="features", **_TASK)
def features_task(config: FeaturesConfig) -> FeaturesSummary:
    """`ich features`: the CNN's best checkpoint once over every slice of the store."""
    from ichmodel.extract import extract_features

    summary = extract_features(config)
    create_markdown_artifact(
        f"# Features `{summary.out}`\n\n{summary}\n",
        key=f"train-features-{_slug(str(summary.out))}",
        description=f"{summary.n_slices:,} slices × {summary.dim}, {summary.n_computed:,} computed",
    )
    get_run_logger().info("features: %s", summary)
    return summary


@task(name="sequence", **_TASK)
def sequence_task(config: TrainConfig) -> RunResult:
    """`ich train --features`: the LSTM/GRU and the head on the cached features, composed with the CNN."""
    result = _train_or_resume(config)
    create_markdown_artifact(
        _run_markdown("Sequence model on cached features", config, result)
        + f"\nIts checkpoint composes the trained head with the CNN: `ich evaluate {result.out} "
        f"--store {config.store} --out REPORT_DIR` scores it on the images.\n",
        key=f"train-sequence-{_slug(config.out)}",
        description=f"best epoch {result.best_epoch}, val loss {result.best_val_loss:.4f}",
    )
    get_run_logger().info(
        "sequence: best epoch %d, validation loss %.4f", result.best_epoch, result.best_val_loss
    )
    return result


@flow(name="train", log_prints=False)
def train(
    store: str,
    out: str,
    model: str = "xception_gru",
    backbone: str | None = None,
    cnn_epochs: int = 10,
    epochs: int = 10,
    cnn_batch_size: int | None = None,
    batch_size: int | None = None,
    max_len: int = 64,
    lr: float = 3e-4,
    bidirectional: bool = False,
    rnn_hidden: int = 512,
    rnn_layers: int = 2,
    neighbour_diff: bool = False,
    seq_crop: int | None = None,
    seq_reverse: bool = False,
    tta: list[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    device: str = "auto",
    workers: int | None = None,
) -> TrainFlowResult:
    """Train the two-stage CNN-RNN on the store `store`; the runs go under the folder `out`.

    `out/cnn` (the CNN run), `out/features.zarr` (its features of every slice), `out/<model>` (the
    sequence run, whose `best.pt` composes the trained head with the CNN). Both runs hold out the
    same patients. The parameters are `ich train`'s and `ich features`' options.

    Args:
        store: The Zarr store written by `ich convert` or the ingest flow.
        out: Folder for the two runs and the features (created).
        model: The sequence model: `xception_gru` or `xception_lstm`.
        backbone: timm model name of the per-slice CNN (default `legacy_xception`).
        cnn_epochs: Epochs of the CNN.
        epochs: Epochs of the sequence model.
        cnn_batch_size: Slices per step of the CNN (default 64).
        batch_size: Study windows per step of the sequence model (default 4).
        max_len: Longest study window, in slices.
        lr: Peak learning rate of both stages.
        bidirectional: A bidirectional LSTM/GRU.
        rnn_hidden: LSTM/GRU units per direction.
        rnn_layers: LSTM/GRU layers.
        neighbour_diff: The LSTM/GRU also reads each slice's differences to its neighbours.
        seq_crop: Train the sequence model on random runs of this many slices of each window.
        seq_reverse: Reverse a training window's slice order with probability 1/2.
        tta: Embed each slice as the mean over these variants (`none`, `hflip`, `vflip`).
        val_fraction: Fraction of slices held out, by patient.
        seed: Seed of the split, the data order and the initial weights.
        device: `cpu`, `cuda` or `auto`.
        workers: DataLoader workers per process.
    """
    # Long: a flow's parameters are its deployment's form, so each option is its own documented argument.
    # Under the operator's allowed roots when served (`ich serve --allow-root`), as ingest's paths are.
    roots = _run_roots()
    store_path = _path("store", store, "the path of a Zarr store written by `ich convert`", roots, store=True)
    out_path = _path("out", out, "a folder for the runs and the features", roots)
    common = {
        "store": str(store_path),
        "max_len": max_len,
        "lr": lr,
        "val_fraction": val_fraction,
        "seed": seed,
        "device": device,
        "workers": workers,
        "progress": False,
    }
    cnn_config = TrainConfig(
        **common,  # type: ignore[arg-type]
        out=str(out_path / "cnn"),
        model="xception",
        backbone=backbone,
        epochs=cnn_epochs,
        batch_size=cnn_batch_size,
    )
    cnn = cnn_task(cnn_config)
    features = out_path / "features.zarr"
    features_task(
        FeaturesConfig(
            checkpoints=[cnn.best_checkpoint],
            store=store_path,
            out=features,
            tta=tta,
            device=device,
            workers=workers,
            progress=False,
        )
    )
    sequence_config = TrainConfig(
        **common,  # type: ignore[arg-type]
        out=str(out_path / model),
        model=model,
        features=str(features),
        epochs=epochs,
        batch_size=batch_size,
        bidirectional=bidirectional,
        rnn_hidden=rnn_hidden,
        rnn_layers=rnn_layers,
        neighbour_diff=neighbour_diff,
        seq_crop=seq_crop,
        seq_reverse=seq_reverse,
        split=str(cnn.out / "split.json"),  # the CNN's held-out patients: unseen by the features' CNN
    )
    result = sequence_task(sequence_config)
    return TrainFlowResult(cnn.out, features, result.out, result.best_val_loss)
