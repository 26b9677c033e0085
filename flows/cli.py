"""`ich`: the one command line of the three stages, generated from their config dataclasses.

It sits in the top layer and imports downward, lazily: `ich --help` builds no stage's parser, and a
command imports only its own stage, so `ich convert` runs where only the core is installed (no torch,
no prefect). Each command's options are the `option()` fields of its config dataclasses
(`flows.cliparse`); `main(argv)` is the console script and what the tests call. What each command does
is in the README.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flows.demo import DemoConfig
    from flows.deploy import ServeConfig
    from ichdata.config import ConvertConfig
    from ichdata.listen import ListenConfig
    from ichdata.preview import PreviewConfig
    from ichdata.pull import ArchiveQuery, PullConfig
    from ichdata.testing import SynthConfig
    from ichdata.verify import VerifyConfig
    from ichmodel.config import TrainConfig
    from ichmodel.evaluate import EvaluateConfig
    from ichmodel.extract import FeaturesConfig
    from ichmodel.predict import PredictConfig

from flows.cliparse import add_options, build_config
from flows.console import EXIT_READER_GONE, reader_gone, setup_streams
from ichdata.errors import UserError, out_of_space
from ichdata.options import option

_HEAVY = {"torch", "timm", "torchvision", "prefect"}


# --- options of commands that have no stage config of their own ------------------------------------


@dataclass(frozen=True)
class Display:
    """How much a long command prints while it runs."""

    progress: bool = option(False, help="progress bars even when stderr is not a terminal", group="display")
    quiet: bool = option(False, help="no progress bars", group="display")

    def bars(self) -> bool:
        """Whether to draw progress bars: on a terminal unless `--quiet`, anywhere with `--progress`."""
        return (not self.quiet and sys.stderr.isatty()) or self.progress


@dataclass(frozen=True)
class QuarantineOptions:
    """`ich quarantine`: where to write the set-aside files' table."""

    store: Path = option(help="the store written by `ich convert`", positional=True, metavar="STORE")
    out: Path | None = option(None, help="file to write (default: standard output)", metavar="CSV")


# --- handlers: each builds its stage's call from the parsed configs ---------------------------------


def _synth(config: SynthConfig) -> int:
    from ichdata.testing import write_archive

    print(write_archive(**config.archive_kwargs()))
    return 0


def _preview(config: PreviewConfig) -> int:
    from ichdata.preview import write_preview

    print(f"wrote {write_preview(config.file, config.out)}")
    return 0


def _convert(config: ConvertConfig, display: Display) -> int:
    from ichdata.convert import convert

    print(convert(config, progress=display.bars()))
    return 0


def _pull(config: PullConfig, display: Display) -> int:
    from ichdata.pull import pull

    result = pull(config, progress=display.bars())
    print(result)
    failures = result.failure_line()
    if failures is not None:
        print(f"ich pull: {failures}", file=sys.stderr)
        return 1
    return 0


def _listen(config: ListenConfig) -> int:
    from ichdata.listen import listen

    def say(line: str) -> None:
        print(line, flush=True)  # as it happens, also into a pipe or a log file

    listen(config, out=say, ready=say)
    return 0  # not reached: only a signal ends `listen`


def _verify(config: VerifyConfig) -> int:
    from ichdata.cluster import check_cluster, cluster_client
    from ichdata.features import is_features_group, verify_features
    from ichdata.verify import verify_store

    check_cluster(config.cluster)
    if is_features_group(config.store):
        features = verify_features(config.store)
        print(features)
        return 0 if features.ok else 1
    if config.on_cluster():
        with cluster_client(config.cluster) as client:
            report = verify_store(config.store, client=client)
    else:
        report = verify_store(config.store)
    print(report)
    return 0 if report.ok else 1


def _quarantine(options: QuarantineOptions) -> int:
    from ichdata.csvsafe import safe_table
    from ichdata.store import open_store

    q = safe_table(open_store(options.store, allow_incomplete=True).quarantine)
    if options.out is None:
        q.to_csv(sys.stdout, index=False)
    else:
        q.to_csv(options.out, index=False)
        print(f"wrote {len(q):,} rows to {options.out}", file=sys.stderr)
    return 0


def _serve(config: ServeConfig) -> int:
    from flows.deploy import serve_from_config

    serve_from_config(config)
    # Prefect's runner serves until a signal stops it, and handles Ctrl-C and SIGTERM itself (it shuts
    # down and returns): end as every command ends on a signal (`main` tells Ctrl-C from SIGTERM).
    raise Terminated


def _demo(config: DemoConfig) -> int:
    from flows.demo import main_demo

    return main_demo(config)


def _train(config: TrainConfig) -> int:
    from ichmodel.train import train

    result = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            f"best epoch {result.best_epoch}: val loss {result.best_val_loss:.4f}; "
            f"checkpoint {result.best_checkpoint}"
        )
    return 0


def _features(config: FeaturesConfig) -> int:
    from ichmodel.extract import extract_features

    print(extract_features(config))
    return 0


def _evaluate(config: EvaluateConfig) -> int:
    from ichmodel.evaluate import evaluate_from_config

    evaluate_from_config(config)
    return 0


def _predict(config: PredictConfig, query: ArchiveQuery) -> int:
    from ichmodel.predict import predict_from_config

    predict_from_config(config, query)
    return 0


# --- the command table ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One `ich` subcommand: its help, its config dataclasses (by `module:Class`) and its handler."""

    name: str
    help: str
    configs: tuple[str, ...]
    handler: Callable[..., int]
    description: str | None = None

    def config_classes(self) -> list[type]:
        """Import and return the config dataclasses (only when this command runs or shows its help)."""
        classes = []
        for ref in self.configs:
            module, _, name = ref.partition(":")
            classes.append(getattr(importlib.import_module(module), name))
        return classes


COMMANDS: tuple[Command, ...] = (
    Command(
        "synth",
        "write a synthetic RSNA-format head-CT archive (DICOM + label CSV)",
        ("ichdata.testing:SynthConfig",),
        _synth,
    ),
    Command(
        "preview",
        "raw HU and the three windows of one DICOM slice, side by side, as PNG",
        ("ichdata.preview:PreviewConfig",),
        _preview,
    ),
    Command(
        "convert",
        "convert a DICOM folder into a sharded Zarr v3 store (resumable, incremental)",
        ("ichdata.config:ConvertConfig", "flows.cli:Display"),
        _convert,
        "Scan SOURCE (recursively, files recognised by content), order each series by slice position, "
        "render brain/subdural/bone windows at 256×256 and write them to STORE, on a local Dask cluster, "
        "an existing one, or as SLURM jobs (--cluster slurm). Files that are not usable slices are listed in the store's quarantine. "
        "Re-running resumes a killed run and appends studies added to SOURCE since.",
    ),
    Command(
        "pull",
        "copy CT studies from a DICOMweb archive (PACS) into a landing folder, one whole study at a time",
        ("ichdata.pull:PullConfig", "flows.cli:Display"),
        _pull,
        "List the studies at URL that match the filters (QIDO-RS, every page) and fetch what LANDING does not "
        "hold yet (WADO-RS, in the transfer syntax the archive stored) into LANDING/<study>/<series>/; a study "
        "appears there only when whole, so `ich convert LANDING` never meets half a study. Network errors "
        "and 5xx answers are retried with back-off; studies that still fail are named at the end (exit 1) "
        "and a re-run fetches what is missing. Credentials: ICH_DICOMWEB_TOKEN (bearer), or "
        "ICH_DICOMWEB_USER and ICH_DICOMWEB_PASSWORD, or ~/.netrc; never on the command line.",
    ),
    Command(
        "listen",
        "receive CT studies a PACS or modality sends (DICOM C-STORE) into a landing folder",
        ("ichdata.listen:ListenConfig",),
        _listen,
        "Accept DICOM associations on --host:--port (127.0.0.1:11112 unless told) called --ae-title, and "
        "write each CT or Enhanced CT instance received, as sent, into LANDING/.ich-incoming/<study>/; a "
        "study moves into LANDING/<study>/<series>/ (the layout of `ich pull`) once the associations that "
        "sent it have ended and --quiet seconds passed without a new instance. Runs until Ctrl-C or "
        "SIGTERM; studies still being sent then stay incoming and the next `ich listen` publishes them. "
        "AE titles are not authentication: see the README before listening beyond this machine.",
    ),
    Command(
        "verify",
        "re-read a store (or a features group): counts, order, shard checksums, every input file accounted for",
        ("ichdata.verify:VerifyConfig",),
        _verify,
    ),
    Command(
        "quarantine",
        "the files a conversion set aside, with reasons, as CSV",
        ("flows.cli:QuarantineOptions",),
        _quarantine,
    ),
    Command(
        "serve",
        "serve the Prefect flows as deployments ingest/default, pull/default and train/default "
        "(needs PREFECT_API_URL, --allow-root)",
        ("flows.deploy:ServeConfig",),
        _serve,
        "Register the deployments `ingest/NAME`, `pull/NAME` and `train/NAME` with the Prefect server at "
        "PREFECT_API_URL and run what they are asked to, until Ctrl-C. Start a run from any shell with "
        "`prefect deployment run 'ingest/default' -p source=DICOM_DIR -p store=STORE.zarr "
        "[-p labels=CSV] [-p workers=N]`, or `prefect deployment run 'train/default' -p store=STORE.zarr "
        "-p out=RUNS_DIR`. Every path a run is given must lie under an --allow-root folder; an existing "
        "Dask cluster for the runs is yours to name (--scheduler), never a run's.",
    ),
    Command(
        "train",
        "train xception / xception_lstm / xception_gru on a store (CPU, GPU, or torchrun for DDP)",
        ("ichmodel.config:TrainConfig",),
        _train,
        "Stream STORE's studies into a timm backbone (+ LSTM/GRU over the slices of each study), with the "
        "RSNA weighted log loss, AdamW + warm-up + cosine, bf16 on GPU. Writes RUN_DIR/config.json, "
        "split.json (patients held out), log.csv, last.pt (resumable) and best.pt (lowest validation loss). "
        "Under `torchrun --no-python ich train` each process trains on its share of the studies (DDP).",
    ),
    Command(
        "features",
        "run trained CNNs once over every slice of a store: a features group for `ich train --features`",
        ("ichmodel.extract:FeaturesConfig",),
        _features,
        "Embed every slice of STORE with the CNN of CHECKPOINT (best.pt or its run directory) and write "
        "FEATURES, a Zarr v3 group whose array `features` (N, D) float16 has row i = store row i. "
        "Given the K run directories of `ich train --folds K`, each row comes from the fold model that "
        "did not train on it (out-of-fold features). Resumable; a re-run after an append computes only "
        "the new rows, and one with nothing new computes nothing.",
    ),
    Command(
        "evaluate",
        "score trained runs on their held-out patients: report.md, metrics.json, ROC and false negatives",
        ("ichmodel.evaluate:EvaluateConfig",),
        _evaluate,
        "Run each run's best checkpoint over the held-out patients of its split (whole studies, in "
        "slice order) and write REPORT_DIR/report.md (the runs side by side, per class), "
        "metrics.json, roc.png, false_negatives.png and predictions_<run>.csv.",
    ),
    Command(
        "predict",
        "run a checkpoint on a folder of new DICOM studies: Kaggle submission CSV + per-study summary",
        ("ichmodel.predict:PredictConfig", "ichdata.pull:ArchiveQuery"),
        _predict,
        "Convert SOURCE exactly as `ich convert` does (same reading, set-aside rules and slice order), "
        "run the model over every study, and write OUT (Kaggle `ID,Label`, six rows per image), "
        "OUT's stem + .studies.csv (per study: max probability per class and the slices behind it) "
        "and + .set_aside.csv (files that could not be used, with the reason).",
    ),
    Command(
        "demo",
        "the whole system on a synthetic archive: ingest flow -> Dask conversion -> CNN and CNN-GRU -> report",
        ("flows.demo:DemoConfig",),
        _demo,
        "Write a synthetic head-CT archive, ingest it with the Prefect `ingest` flow (ephemeral mode, "
        "Prefect home DIR/prefect, no server), train a CNN-only and a CNN-GRU model briefly on the CPU, "
        "evaluate both on the held-out patients and write DIR/report.md. Nothing is downloaded.",
    ),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `ich` parser; only `command`'s options are built (its config modules imported), if given."""
    parser = argparse.ArgumentParser(
        prog="ich",
        description="Head-CT DICOM archives -> a sharded Zarr v3 store -> CNN-RNN hemorrhage detectors.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd in COMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.description or cmd.help)
        if cmd.name == command:
            for cls in cmd.config_classes():
                add_options(p, cls)
    return parser


def _run(argv: list[str]) -> int:
    command = next((c for c in COMMANDS if argv and argv[0] == c.name), None)
    args = build_parser(command.name if command else None).parse_args(argv)
    assert command is not None  # argparse exits on a missing or unknown command
    configs: list[object] = [build_config(cls, args) for cls in command.config_classes()]
    return int(command.handler(*configs) or 0)


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, `scancel` and a batch job's end send), raised as Ctrl-C's `KeyboardInterrupt` is.

    A subclass, so that whatever cleans up after Ctrl-C (every `finally` and context manager: SLURM jobs
    cancelled, the local cluster closed, the run's credentials removed) does the same for SIGTERM.
    """


@contextlib.contextmanager
def _signals_raise(received: list[int]) -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` and SIGINT `KeyboardInterrupt`, in the main thread.

    Python's default for SIGTERM is to die at once, without cleaning up. Each signal's number is
    appended to `received` (a library that turns a `KeyboardInterrupt` into another one still ends as
    the signal that started it). A second SIGTERM is ignored, so that it cannot cut the cleanup short
    (a batch system follows with SIGKILL if it must); a process forked from this one (a local Dask
    worker) dies of SIGTERM as it would without this handler. The handlers in place before are
    restored after the block (tests call `main` in-process).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def on_signal(signum: int, frame: object) -> None:
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        received.append(signum)
        if signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_IGN)
            raise Terminated
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ich` console script; tests call it with an argv list.

    A mistake is one line and exit 2; Ctrl-C and SIGTERM stop the command, clean up and say so in one
    line, with the shell's exit status for the signal (130, 143).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_streams()
    received: list[int] = []
    try:
        try:
            with _signals_raise(received):
                return _run(argv)
        finally:
            sys.stdout.flush()  # here rather than at exit, where a closed pipe is a traceback
    except UserError as exc:
        print(f"ich: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if not reader_gone():
            raise
        return EXIT_READER_GONE
    except KeyboardInterrupt as exc:
        signum = (
            received[-1] if received else signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        )
        print("ich: terminated" if signum == signal.SIGTERM else "ich: interrupted", file=sys.stderr)
        return 128 + signum
    except ModuleNotFoundError as exc:
        root = exc.name.split(".")[0] if exc.name else ""
        extra = "dicomweb" if root in ("dicomweb_client", "pynetdicom") else "all" if root in _HEAVY else None
        if extra is not None:
            name = argv[0] if argv else "ich"
            print(
                f"ich: error: `ich {name}` needs {exc.name}, which is not installed: pip install 'ich[{extra}]'",
                file=sys.stderr,
            )
            return 2
        raise
    except Exception as exc:
        error = out_of_space(exc, "run the same command again")
        if error is None:
            raise
        print(f"ich: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
