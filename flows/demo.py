"""`ich demo`: the whole system on a synthetic archive, in one command, on a CPU.

A synthetic archive (`ichdata.testing.write_archive`) goes through the Prefect `ingest` flow into a
Zarr store; a CNN-only model (`xception`) trains briefly, then the CNN-GRU (`xception_gru`) is trained
through cached features on the same patient split (the two-stage route: the CNN's best checkpoint
runs once over the store, `ich features`, and the GRU and head train on those vectors); both are
evaluated on the held-out patients into DIR/report.md. Prefect runs in ephemeral mode with its home
in DIR/prefect, so nothing reaches `~/.prefect` or a configured server. `DemoConfig` declares the
command's options; the README says how to run it and what to expect.
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
from typing import TYPE_CHECKING

from ichdata.errors import UserError
from ichdata.options import option

if TYPE_CHECKING:
    from ichdata.finalize import ConvertSummary
    from ichdata.testing import ArchiveSummary
    from ichmodel.extract import FeaturesSummary
    from ichmodel.train import RunResult

__all__ = ["DemoConfig", "DemoResult", "main_demo", "prefect_home", "run_demo"]

#: Written into DIR so that a re-run may replace a previous demo's outputs (and nothing else).
MARKER = ".ich-demo"
MODELS: tuple[str, ...] = ("xception", "xception_gru")
#: The default run, and the reduced one `--quick` asks for: (studies, epochs, image size).
_FULL, _QUICK = (60, 4, 256), (8, 1, 128)
#: Seconds the demo waits for its Prefect API server to answer: Prefect's default is too short for
#: a small machine that is busy with other work.
SERVER_STARTUP_TIMEOUT_S = 120


@dataclass(frozen=True)
class DemoConfig:
    """Settings of `ich demo`; the defaults are the README's run.

    `studies`, `epochs` and `image_size` left at None take the default run's values, or the reduced
    run's with `quick`; after construction they always hold a number.
    """

    out: Path = option(Path("ich-demo"), help="folder to write (ich-demo)", metavar="DIR")
    studies: int = option(None, help="synthetic studies (default 60; --quick 8)")
    epochs: int = option(None, help="training epochs per model (default 4; --quick 1)")
    #: rows/columns of the synthetic DICOM slices (the store is always 256×256)
    image_size: int = option(None, help="rows/columns of the synthetic DICOM slices (256; --quick 128)")
    #: timm's smallest ResNet, random initialisation: nothing to download
    backbone: str = option("test_resnet", help="timm backbone of both models (test_resnet)")
    workers: int | None = option(None, help="Dask worker processes (default: one per core)")
    seed: int = option(0, help="seed of the archive, the split and the training")
    quick: bool = option(False, help="a reduced run (about a minute) to check that all works")
    progress: bool = option(True, flag="--quiet", help="no progress bars")
    #: fraction of slices with a hemorrhage: above RSNA's 0.14 so a small archive has enough positives
    prevalence: float = 0.35
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
    #: the 2nd place's sequence input: each slice's features with their differences to its neighbours'
    #: (on this archive it beats the stage-wise GRU on images: bench/RESULTS.md, "Two-stage training")
    neighbour_diff: bool = True
    #: two-stage, like the RSNA winners: the CNN-only run's best CNN embeds every slice once
    #: (`ich features`), and the CNN-GRU learns only the GRU and the head (started from the CNN's
    #: classifier) on those vectors; its checkpoint composes them with that CNN
    lr: float = 1e-3
    val_fraction: float = 0.3

    def __post_init__(self) -> None:
        defaults = _QUICK if self.quick else _FULL
        for name, value in zip(("studies", "epochs", "image_size"), defaults, strict=True):
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)


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

    Raises:
        UserError: the server did not answer within `SERVER_STARTUP_TIMEOUT_S`.
    """
    home = home.absolute()
    home.mkdir(parents=True, exist_ok=True)
    db = f"sqlite+aiosqlite:///{home / 'prefect.db'}"
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": db,
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(SERVER_STARTUP_TIMEOUT_S),
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
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            temporary_settings,
        )

        with (
            temporary_settings(
                updates={
                    PREFECT_HOME: str(home),
                    PREFECT_SERVER_DATABASE_CONNECTION_URL: db,
                    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: SERVER_STARTUP_TIMEOUT_S,
                },
                restore_defaults={PREFECT_API_URL},
            ),
            _api_server() as api_url,
            temporary_settings(updates={PREFECT_API_URL: api_url}),
        ):
            yield
            _flush_prefect_logs()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _api_server() -> Iterator[str]:
    """A Prefect API server on a free loopback port for the block; yields its API URL.

    Prefect's ephemeral mode starts this same server by itself, but then stops it only at
    interpreter exit; started here, on a port of its own, it is stopped when the demo is done.
    """
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer(port=_free_port())
    try:
        try:
            server.start(timeout=SERVER_STARTUP_TIMEOUT_S)
        except RuntimeError as e:
            if "Timed out" not in str(e):
                raise
            raise UserError(
                f"the demo's temporary Prefect server did not answer within {SERVER_STARTUP_TIMEOUT_S} s "
                "(the machine is busy?); close other programs or try `ich demo` again"
            ) from None
        yield server.api_url
    finally:
        server.stop()


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


def _check(config: DemoConfig) -> None:
    """Refuse settings too small for a demo to mean anything, before anything is written."""
    if config.studies < 4:
        raise UserError(f"--studies {config.studies}: need at least 4 (patients for training and held out)")
    if config.epochs < 1:
        raise UserError(f"--epochs {config.epochs}: must be at least 1")
    if config.image_size < 64:
        raise UserError(f"--image-size {config.image_size}: expected at least 64 pixels")


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


def _write_archive(config: DemoConfig, archive: Path) -> ArchiveSummary:
    from ichdata.testing import write_archive

    return write_archive(
        archive,
        studies=config.studies,
        seed=config.seed,
        any_prevalence=config.prevalence,
        image_size=config.image_size,
        workers=config.workers,
    )


def _ingest(config: DemoConfig, archive: Path, labels: Path, store: Path) -> ConvertSummary:
    """The Prefect `ingest` flow, in ephemeral mode with DIR/prefect as its home."""
    with prefect_home(config.out / "prefect"):
        from flows.ingest import ingest

        return ingest(source=str(archive), store=str(store), labels=str(labels), workers=config.workers)


def _features(config: DemoConfig, checkpoint: Path, store: Path, out: Path) -> FeaturesSummary:
    """`ich features`: the CNN of `checkpoint` once over every slice of the store, on the CPU."""
    from ichmodel.extract import FeaturesConfig, extract_features

    fc = FeaturesConfig(
        checkpoints=[checkpoint], store=store, out=out, device="cpu", workers=0, progress=config.progress
    )
    return extract_features(fc)


def _train(
    config: DemoConfig, store: Path, model: str, out: Path, split: Path | None, features: Path | None = None
) -> RunResult:
    """Train one model on the CPU; `split` holds out the same patients, `features` are cached CNN features."""
    from ichmodel.config import TrainConfig
    from ichmodel.models import variant
    from ichmodel.train import train

    sequence = variant(model).sequence
    tc = TrainConfig(
        store=str(store),
        out=str(out),
        model=model,
        backbone=None if features is not None else config.backbone,
        epochs=config.epochs,
        batch_size=config.batch_size_studies if sequence else config.batch_size_slices,
        max_len=config.max_len,
        bidirectional=config.bidirectional and sequence,
        rnn_hidden=config.rnn_hidden,
        rnn_layers=config.rnn_layers,
        neighbour_diff=config.neighbour_diff and sequence,
        features=None if features is None else str(features),
        lr=config.lr,
        device="cpu",
        workers=0,
        seed=config.seed,
        val_fraction=config.val_fraction,
        split=None if split is None else str(split),
        progress=config.progress,
    )
    return train(tc)


def _report_intro(config: DemoConfig, stages: dict[str, float]) -> list[str]:
    """The paragraphs that open DIR/report.md: what made it, with which settings, in how long."""
    return [
        "Made by `ich demo`: a synthetic head-CT archive → the Prefect `ingest` flow (Dask conversion) → "
        f"a short CPU training of a CNN-only and a CNN-GRU model on the timm backbone `{config.backbone}` "
        "(random initialisation) → this evaluation on the patients neither model trained on.",
        "",
        f"Settings: {config.studies} studies, {config.image_size}² DICOM slices, {config.epochs} epochs, "
        f"seed {config.seed}. The held-out patients also chose each run's best epoch (`best.pt`), "
        "as `ich train`'s validation split does.",
        "",
        "How each model trained: `xception` end to end on the images; `xception_gru` in two stages, as the "
        "RSNA competition's winners did: the CNN-only run's best CNN embedded every slice once "
        "(`ich features`), and the GRU "
        f"({'bidirectional, ' if config.bidirectional else ''}{config.rnn_layers} × {config.rnn_hidden} units"
        f"{', reading each slice with its differences to its neighbours' if config.neighbour_diff else ''}) "
        "and the head, started from the CNN's classifier, trained on those cached vectors; its checkpoint "
        "composes them with that CNN, so it is evaluated here on the images like the CNN-only model.",
        "",
        "Stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + ".",
        "",
    ]


def _write_demo_json(
    path: Path, config: DemoConfig, stages: dict[str, float], wall: float, losses: dict[str, float]
) -> None:
    """DIR/demo.json: the settings, the stage times and the two weighted log losses."""
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    summary = {
        "config": settings,
        "stages_s": {k: round(v, 1) for k, v in stages.items()},
        "wall_s": round(wall, 1),
        "weighted_log_loss": losses,
    }
    path.write_text(json.dumps(summary, indent=2) + "\n")


def run_demo(config: DemoConfig, log: Callable[[str], None] | None = None) -> DemoResult:
    """Run the whole demo into `config.out`, printing one line per stage through `log`.

    DIR then holds `archive/` (the DICOM archive and its label CSV), `store.zarr` (with its manifest
    and quarantine), `features.zarr` (the CNN's features of every slice), `runs/xception/` and
    `runs/xception_gru/` (the two `ich train` runs), the
    evaluation (`report.md`, `metrics.json`, `roc.png`, `false_negatives.png`, `predictions_*.csv`),
    `prefect/` (the ingest run's Prefect home) and `demo.json`.
    """
    say = log or (lambda s: print(s, flush=True))
    _check(config)
    out = config.out.absolute()
    config = replace(config, out=out)
    _prepare_out(out)
    t0 = time.perf_counter()
    stages: dict[str, float] = {}
    n_steps = 5

    def stage(k: int, text: str) -> float:
        say(f"[{k}/{n_steps}] {text}")
        return time.perf_counter()

    t = stage(1, f"writing a synthetic archive of {config.studies} studies ({config.image_size}² slices)")
    summary = _write_archive(config, out / "archive")
    stages["synthetic archive"] = time.perf_counter() - t
    say(f"      {summary}")

    store = out / "store.zarr"
    t = stage(
        2, f"Prefect flow `ingest` (ephemeral, home {out / 'prefect'}): scan, plan, Dask conversion, verify"
    )
    ingest_result = _ingest(config, summary.path, Path(summary.labels_csv), store)
    stages["ingest (Prefect + Dask)"] = time.perf_counter() - t
    say(f"      {ingest_result}")

    runs: dict[str, Path] = {}
    cnn, gru = MODELS
    t = stage(3, f"training {cnn} on {config.backbone}, {config.epochs} epochs on the CPU")
    result = _train(config, store, cnn, out / "runs" / cnn, None)
    runs[cnn] = out / "runs" / cnn
    stages[f"train {cnn}"] = time.perf_counter() - t
    say(f"      best epoch {result.best_epoch}, validation weighted log loss {result.best_val_loss:.4f}")

    t = stage(4, f"{gru} in two stages: `ich features` with {cnn}'s best CNN, then the GRU on those features")
    features = out / "features.zarr"
    say(f"      {_features(config, runs[cnn] / 'best.pt', store, features)}")
    stages["features"] = time.perf_counter() - t
    t = time.perf_counter()
    # the same held-out patients as the CNN: none of them was seen by the CNN the features came from
    result = _train(config, store, gru, out / "runs" / gru, runs[cnn] / "split.json", features)
    runs[gru] = out / "runs" / gru
    stages[f"train {gru} on features"] = time.perf_counter() - t
    say(f"      best epoch {result.best_epoch}, validation weighted log loss {result.best_val_loss:.4f}")

    from ichmodel.evaluate import evaluate_runs

    t = stage(5, "evaluating both models on the held-out patients")
    evaluated, paths = evaluate_runs(
        list(runs.values()),
        store,
        out,
        progress=config.progress,
        title="ich demo: CNN-only vs CNN-GRU on synthetic head CT",
        intro=_report_intro(config, stages),
        log=say,
    )
    stages["evaluate"] = time.perf_counter() - t
    wall = time.perf_counter() - t0
    losses = {r.name: float(r.summary["weighted_log_loss"]) for r in evaluated}
    _write_demo_json(out / "demo.json", config, stages, wall, losses)
    return DemoResult(
        out=out,
        report=paths["report"],
        store=store,
        runs=runs,
        weighted_log_loss=losses,
        stages_s=stages,
        wall_s=wall,
    )


def main_demo(config: DemoConfig) -> int:
    """Handler of `ich demo`: run it, print the result, and say so if the CNN-GRU did not win."""
    result = run_demo(config)
    print(result)
    if not config.quick:
        cnn, gru = (result.weighted_log_loss.get(m, float("nan")) for m in MODELS)
        if not gru < cnn:
            print(
                f"ich demo: note: the CNN-GRU did not beat the CNN-only model here ({gru:.4f} vs {cnn:.4f})",
                file=sys.stderr,
            )
    return 0
