"""`ich demo`: the whole system on a synthetic archive, in one command, on a laptop CPU.

    synthetic archive (`ichdata.testing.write_archive`: DICOM + stage_2_train.csv)
      -> the Prefect `ingest` flow (scan, plan, Dask conversion, verify, report) into a Zarr store
      -> a short CPU training of a CNN-only model (`xception`) and a CNN-GRU (`xception_gru`), both on
         the same small timm backbone and the same patient split
      -> `ich evaluate` of both on the held-out patients
      -> DIR/report.md (both models side by side, per class, ROC curves, missed slices)

Nothing is downloaded and no server is needed. Prefect runs in its local *ephemeral* mode: the flow
starts a temporary Prefect API for the duration of the run. The demo always uses its own Prefect home,
`DIR/prefect` (database, logs, results), and ignores any configured `PREFECT_API_URL`, so it neither
writes to `~/.prefect` nor posts runs to a server you use for real work. Open the run history
afterwards with `PREFECT_HOME=DIR/prefect prefect server start`.

DIR afterwards:

| path | what |
| --- | --- |
| `archive/` | the synthetic DICOM archive and its label CSV |
| `store.zarr` (+ `.manifest.parquet`, `.quarantine.csv`) | the converted store |
| `runs/xception/`, `runs/xception_gru/` | the two training runs (`ich train --out`) |
| `report.md`, `metrics.json`, `roc.png`, `false_negatives.png`, `predictions_*.csv` | the evaluation |
| `prefect/` | the Prefect home of the ingest run |
| `demo.json` | the demo's settings, stage times and the two weighted log losses |

The phantom lesions span several adjacent slices with faint first and last slices, and single-slice
mimics appear in negative slices, so the slice context a GRU sees should pay. It does when the two
models are trained stage-wise, as the RSNA competition's winners did: the CNN-only model first, then
the CNN-GRU starts from that run's best backbone and classifier, with the backbone frozen, and learns
a small bidirectional GRU (1 × 64 units) that gates the per-slice features (the paper's architecture,
`ichmodel.models.SequenceClassifier`; its gate starts open, so training starts from the CNN-only
model's predictions). With the defaults (60 studies, 4 epochs, seed 0; 12 held-out patients, 537
slices) the held-out weighted log loss is 0.294 for the CNN-only model and 0.224 for the CNN-GRU
(ROC AUC 0.856 -> 0.923), in 378 s on 2 cores (the frozen-backbone GRU stage takes 85 s of it).
Trained end to end from scratch with the paper's 2 × 512-unit GRU (6.6 M
parameters over a 0.37 M-parameter backbone, a few dozen training studies) the CNN-GRU lost to the
CNN-only model in every setting tried (0.320 vs 0.294 with these defaults).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ichdata.errors import UserError

__all__ = ["DemoConfig", "DemoResult", "prefect_home", "run_demo"]

#: Written into DIR so that a re-run may replace a previous demo's outputs (and nothing else).
MARKER = ".ich-demo"
MODELS: tuple[str, ...] = ("xception", "xception_gru")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of `ich demo`; the defaults are the README's run (under 10 minutes on 2 cores)."""

    out: Path = Path("ich-demo")
    studies: int = 60
    epochs: int = 4
    #: rows/columns of the synthetic DICOM slices (the store is always 256×256)
    image_size: int = 256
    #: fraction of slices with a hemorrhage: above RSNA's 0.14 so a small archive has enough positives
    prevalence: float = 0.35
    seed: int = 0
    #: timm's smallest ResNet (0.4 M parameters), random initialisation: nothing to download
    backbone: str = "test_resnet"
    #: slices per step of the CNN-only model
    batch_size_slices: int = 16
    #: study windows of at most `max_len` slices per step of the CNN-GRU (about as many slices per step)
    batch_size_studies: int = 1
    max_len: int = 16
    #: the GRU reads the study both ways, so the slices after a faint lesion end inform it too
    bidirectional: bool = True
    #: a small GRU (units, layers): a few dozen training studies cannot fit the paper's 2 × 512
    rnn_hidden: int = 64
    rnn_layers: int = 1
    #: stage-wise, like the RSNA winners: the CNN-GRU starts from the CNN-only run's best backbone
    #: and classifier, with the backbone frozen, and learns only the GRU (and the head) on top of it
    freeze_backbone: bool = True
    lr: float = 1e-3
    val_fraction: float = 0.3
    workers: int | None = None
    progress: bool = True

    @classmethod
    def quick(cls, **kwargs: Any) -> DemoConfig:
        """A reduced run for CI (about a minute): same pipeline, fewer and smaller studies, one epoch."""
        base = {"studies": 8, "epochs": 1, "image_size": 128}
        return cls(**{**base, **kwargs})


@dataclass
class DemoResult:
    """Where everything went, how long each stage took, and the headline figures."""

    out: Path
    report: Path
    store: Path
    runs: dict[str, Path]
    weighted_log_loss: dict[str, float]
    stages_s: dict[str, float] = field(default_factory=dict)
    wall_s: float = 0.0

    def __str__(self) -> str:
        losses = ", ".join(f"{k} {v:.4f}" for k, v in self.weighted_log_loss.items())
        return f"demo done in {self.wall_s:.0f} s: weighted log loss on held-out patients: {losses} -> {self.report}"


@contextlib.contextmanager
def prefect_home(home: Path) -> Iterator[None]:
    """Run Prefect in ephemeral mode with its home (database, results, logs) under `home`.

    Environment variables cover a process that has not imported Prefect yet (the usual `ich demo`);
    `temporary_settings` covers one that has (tests, notebooks). A configured `PREFECT_API_URL` is
    never used: a temporary API server (Prefect's ephemeral one) runs on a free 127.0.0.1 port for
    the duration of the block, with its SQLite database in `home`.
    """
    home = home.absolute()
    home.mkdir(parents=True, exist_ok=True)
    db = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": db,
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # no telemetry from a demo (and often no network)
    }
    saved = {k: os.environ.get(k) for k in (*env, "PREFECT_API_URL")}
    os.environ.update(env)
    os.environ.pop("PREFECT_API_URL", None)
    try:
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_HOME,
            PREFECT_SERVER_DATABASE_CONNECTION_URL,
            temporary_settings,
        )

        with temporary_settings(
            updates={PREFECT_HOME: str(home), PREFECT_SERVER_DATABASE_CONNECTION_URL: db},
            restore_defaults={PREFECT_API_URL},
        ):
            # Prefect's ephemeral mode starts this same server by itself, but then stops it only at
            # interpreter exit; started here, on a port of its own, it is stopped when the demo is done.
            from prefect.server.api.server import SubprocessASGIServer

            server = SubprocessASGIServer(port=_free_port())
            server.start()
            try:
                with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                    yield
                    _flush_prefect_logs()
            finally:
                server.stop()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _flush_prefect_logs() -> None:
    """Send the flow's remaining log records to the API before its server stops (best effort)."""
    from prefect.logging.handlers import APILogHandler

    with contextlib.suppress(Exception):
        APILogHandler().flush()


def _prepare_out(out: Path) -> None:
    """Create DIR, or clear a previous demo's outputs from it; refuse a folder that is not a demo's."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise UserError(
                f"--out {out}: folder is not empty and was not made by `ich demo`; give a new or empty folder"
            )
        for child in out.iterdir():
            if child.name == MARKER:
                continue
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `ich demo`; a re-run replaces everything in this folder\n")


def _ingest(config: DemoConfig, archive: Path, labels: Path, store: Path) -> Any:
    """The Prefect `ingest` flow, in ephemeral mode with DIR/prefect as its home."""
    with prefect_home(config.out / "prefect"):
        from flows.ingest import ingest

        return ingest(source=str(archive), store=str(store), labels=str(labels), workers=config.workers)


def _train(
    config: DemoConfig, store: Path, model: str, out: Path, split: Path | None, init: Path | None = None
) -> Any:
    from ichmodel.train import TrainConfig, train

    tc = TrainConfig(
        store=str(store),
        out=str(out),
        model=model,
        backbone=config.backbone,
        epochs=config.epochs,
        batch_size=config.batch_size_slices if model == "xception" else config.batch_size_studies,
        max_len=config.max_len,
        bidirectional=config.bidirectional and model != "xception",
        rnn_hidden=config.rnn_hidden,
        rnn_layers=config.rnn_layers,
        init_backbone=None if init is None else str(init),
        freeze_backbone=config.freeze_backbone and init is not None,
        lr=config.lr,
        device="cpu",
        workers=0,
        seed=config.seed,
        val_fraction=config.val_fraction,
        split=None if split is None else str(split),
        progress=config.progress,
    )
    return train(tc)


def run_demo(config: DemoConfig, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole demo (see the module docstring); prints one line per stage through `log`."""
    say = log or (lambda s: print(s, flush=True))
    if config.studies < 4:
        raise UserError(f"--studies {config.studies}: need at least 4 (patients for training and held out)")
    if config.epochs < 1:
        raise UserError(f"--epochs {config.epochs}: must be at least 1")
    if config.image_size < 64:
        raise UserError(f"--image-size {config.image_size}: expected at least 64 pixels")
    out = config.out.absolute()
    config = replace(config, out=out)
    _prepare_out(out)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    n_steps = 5

    def stage(k: int, text: str) -> float:
        say(f"[{k}/{n_steps}] {text}")
        return time.perf_counter()

    # 1. synthetic archive
    from ichdata.testing import write_archive

    t = stage(1, f"writing a synthetic archive of {config.studies} studies ({config.image_size}² slices)")
    archive = out / "archive"
    summary = write_archive(
        archive,
        studies=config.studies,
        seed=config.seed,
        any_prevalence=config.prevalence,
        image_size=config.image_size,
    )
    labels = Path(summary.labels_csv)
    stages["synthetic archive"] = time.perf_counter() - t
    say(f"      {summary}")

    # 2. ingest
    store = out / "store.zarr"
    t = stage(
        2, f"Prefect flow `ingest` (ephemeral, home {out / 'prefect'}): scan, plan, Dask conversion, verify"
    )
    ingest_result = _ingest(config, archive, labels, store)
    stages["ingest (Prefect + Dask)"] = time.perf_counter() - t
    say(f"      {ingest_result}")

    # 3-4. train both models on the same split
    runs: dict[str, Path] = {}
    split: Path | None = None
    for k, model in enumerate(MODELS, start=3):
        t = stage(k, f"training {model} on {config.backbone}, {config.epochs} epochs on the CPU")
        run_dir = out / "runs" / model
        init = None if model == "xception" else runs["xception"] / "best.pt"
        result = _train(config, store, model, run_dir, split, init)
        split = run_dir / "split.json"  # the second model holds out the same patients
        runs[model] = run_dir
        stages[f"train {model}"] = time.perf_counter() - t
        say(f"      best epoch {result.best_epoch}, validation weighted log loss {result.best_val_loss:.4f}")

    # 5. evaluate
    from ichmodel.evaluate import evaluate_runs

    t = stage(5, "evaluating both models on the held-out patients")
    stages_before = dict(stages)
    intro = [
        "Made by `ich demo`: a synthetic head-CT archive → the Prefect `ingest` flow (Dask conversion) → "
        f"a short CPU training of a CNN-only and a CNN-GRU model on the timm backbone `{config.backbone}` "
        "(random initialisation) → this evaluation on the patients neither model trained on.",
        "",
        f"Settings: {config.studies} studies, {config.image_size}² DICOM slices, {config.epochs} epochs, "
        f"seed {config.seed}. The held-out patients also chose each run's best epoch (`best.pt`), "
        "as `ich train`'s validation split does.",
        "",
        "Stage-wise training, as the RSNA competition's winners did: the CNN-GRU "
        f"({'bidirectional, ' if config.bidirectional else ''}{config.rnn_layers} × {config.rnn_hidden} units) "
        "starts from the CNN-only run's best backbone and classifier"
        + (", with the backbone frozen," if config.freeze_backbone else ",")
        + " and learns the GRU that gates each slice's features with its neighbours' context.",
        "",
        "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages_before.items()) + ".",
        "",
    ]
    evaluated, paths = evaluate_runs(
        list(runs.values()),
        store,
        out,
        progress=config.progress,
        title="ich demo: CNN-only vs CNN-GRU on synthetic head CT",
        intro=intro,
        log=say,
    )
    stages["evaluate"] = time.perf_counter() - t
    wall = time.perf_counter() - t0
    losses = {r.name: float(r.summary["weighted_log_loss"]) for r in evaluated}
    (out / "demo.json").write_text(
        json.dumps(
            {
                "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
                "stages_s": {k: round(v, 1) for k, v in stages.items()},
                "wall_s": round(wall, 1),
                "weighted_log_loss": losses,
            },
            indent=2,
        )
        + "\n"
    )
    return DemoResult(
        out=out,
        report=paths["report"],
        store=store,
        runs=runs,
        weighted_log_loss=losses,
        stages_s=stages,
        wall_s=wall,
    )


def main_demo(args: Any) -> int:
    """Handler of `ich demo` (see `flows.cli`)."""
    kwargs: dict[str, Any] = {"out": args.out, "seed": args.seed, "progress": not args.quiet}
    for name in ("studies", "epochs", "image_size", "workers", "backbone"):
        value = getattr(args, name)
        if value is not None:
            kwargs[name] = value
    config = DemoConfig.quick(**kwargs) if args.quick else DemoConfig(**kwargs)
    result = run_demo(config)
    print(result)
    if not args.quick:
        cnn, gru = (result.weighted_log_loss.get(m, float("nan")) for m in MODELS)
        if not gru < cnn:
            print(
                f"ich demo: note: the CNN-GRU did not beat the CNN-only model here ({gru:.4f} vs {cnn:.4f})",
                file=sys.stderr,
            )
    return 0
