"""Two-stage training: the sequence stage on cached features against the frozen-backbone route.

    .venv/bin/python bench/features.py speed [--studies 12] [--image-size 256] [--backbone legacy_xception]
    .venv/bin/python bench/features.py quality [--folds 3]
    .venv/bin/python bench/features.py tta --demo DEMO_DIR

speed: one synthetic store (bench/_synthetic.py: `--studies` studies of 24–48 slices of
`--image-size`², few enough that the default backbone runs on 2 cores in minutes), one CNN run (a
randomly initialised `xception` and a patient split: speed does not depend on the weights), then the
same sequence model (`xception_gru`, the paper's 2 × 512 GRU, 4 windows of up to 64 slices a step)
trained one epoch two ways, both through `ichmodel.train.train` on the CNN's split:
`--init-backbone CNN --freeze-backbone` (the frozen CNN runs over every slice in every epoch) and
`--features` (`ich features` once, then the GRU and the head on the cached vectors). Prints each
route's epoch time (training, and training + validation, from `log.csv`), their ratio, the
extraction's throughput in slices/s and the features' bytes per slice on disk.

quality: the demo's synthetic archive and settings (`flows.demo.DemoConfig`: 60 studies, test_resnet,
4 epochs, seed 0), converted with `ich convert`; a CNN, then the CNN-GRU trained (a) stage-wise on
the CNN's frozen backbone (the demo's previous route), (b) on the CNN's in-sample features, (a) and
(b) with and without neighbour differences (`--neighbour-diff`, the demo's GRU now), (c) on
out-of-fold features of `--folds` fold CNNs (`ich train --folds K --fold i`, their test patients the
CNN's held-out patients), with them: every model scored by `ich evaluate` (weighted log loss on the
same held-out patients, the composed checkpoints on the images). One table.

tta: in the folder an `ich demo --out DEMO_DIR` wrote, the demo's CNN-GRU stage again on features
embedded with `--tta none hflip` (same CNN, split, settings and seed); prints its best validation
loss beside the demo's own GRU's (features without TTA). The validation patients are the demo's
held-out ones.

Results go to OUT/features_<part>.json; figures and commands in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic import random_cnn_run, synthetic_store

from ichmodel.config import TrainConfig
from ichmodel.extract import FeaturesConfig, extract_features
from ichmodel.train import RunResult, train


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _train_time(result: RunResult) -> tuple[float, float]:
    """(training seconds, training + validation seconds) of the run's last epoch."""
    row = result.history[-1]
    return row["train_slices"] / row["train_slices_per_s"], row["epoch_s"]


def speed(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Epoch time of the sequence stage, frozen-backbone route vs cached features, on one store."""
    store = synthetic_store(work / "bench.zarr", args.studies, size=args.image_size, shard_size=64)
    print(f"store: {store.n_slices} slices of {args.image_size}² in {store.n_series} studies", flush=True)
    common: dict[str, Any] = {
        "store": str(store.path),
        "backbone": args.backbone,
        "device": "cpu",
        "workers": args.workers,
        "progress": False,
        "epochs": 1,
        "val_fraction": 0.2,
    }
    best = random_cnn_run(work / "cnn", store, args.backbone, val_fraction=0.2)
    split = str(work / "cnn" / "split.json")
    gru: dict[str, Any] = {**common, "model": "xception_gru", "split": split}

    frozen = train(
        TrainConfig(
            **gru,
            out=str(work / "frozen"),
            init_backbone=str(best),
            freeze_backbone=True,
        )
    )
    frozen_train, frozen_epoch = _train_time(frozen)
    print(
        f"frozen-backbone epoch: {frozen_train:.1f} s training, {frozen_epoch:.1f} s with validation",
        flush=True,
    )

    features = work / "features.zarr"
    summary = extract_features(
        FeaturesConfig(
            checkpoints=[best],
            store=store.path,
            out=features,
            device="cpu",
            workers=args.workers,
            progress=False,
        )
    )
    print(summary, flush=True)
    cached = train(TrainConfig(**{**gru, "backbone": None}, out=str(work / "cached"), features=str(features)))
    cached_train, cached_epoch = _train_time(cached)
    print(
        f"cached-features epoch: {cached_train:.2f} s training, {cached_epoch:.2f} s with validation",
        flush=True,
    )
    bytes_per_slice = _du(features / "features") / store.n_slices
    out = {
        "part": "speed",
        "backbone": args.backbone,
        "image_size": args.image_size,
        "slices": store.n_slices,
        "studies": store.n_series,
        "threads": os.cpu_count(),
        "load_average": os.getloadavg(),
        "frozen_train_s": frozen_train,
        "frozen_epoch_s": frozen_epoch,
        "cached_train_s": cached_train,
        "cached_epoch_s": cached_epoch,
        "ratio_train": frozen_train / cached_train,
        "ratio_epoch": frozen_epoch / cached_epoch,
        "extract_slices_per_s": summary.slices_per_s,
        "extract_s": summary.elapsed_s,
        "feature_dim": summary.dim,
        "bytes_per_slice": bytes_per_slice,
        "frozen_val_loss": frozen.history[-1]["val_loss"],
        "cached_val_loss": cached.history[-1]["val_loss"],
    }
    print()
    print(
        f"| {args.backbone}, {store.n_slices} slices of {args.image_size}², 1 epoch | frozen backbone | cached features | ratio |"
    )
    print("| --- | ---: | ---: | ---: |")
    print(f"| training s | {frozen_train:.1f} | {cached_train:.2f} | {out['ratio_train']:.0f}× |")
    print(
        f"| training + validation s | {frozen_epoch:.1f} | {cached_epoch:.2f} | {out['ratio_epoch']:.0f}× |"
    )
    print(
        f"extraction: {summary.slices_per_s:.1f} slices/s ({summary.elapsed_s:.1f} s, model loading included); "
        f"features: {summary.dim} × float16, {bytes_per_slice:,.0f} bytes per slice on disk"
    )
    return out


def _evaluate(runs: dict[str, Path], store: Path, out: Path) -> dict[str, float]:
    from ichmodel.evaluate import evaluate_runs

    evaluated, _ = evaluate_runs(list(runs.values()), store, out, progress=False, log=None)
    return {name: float(r.summary["weighted_log_loss"]) for name, r in zip(runs, evaluated, strict=True)}


def quality(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Weighted log loss on the demo's held-out patients: stage-wise GRU vs GRU on in-sample / out-of-fold features."""
    from flows.demo import DemoConfig
    from ichdata.config import ConvertConfig
    from ichdata.convert import convert
    from ichdata.testing import write_archive

    demo = DemoConfig()
    archive = write_archive(
        work / "archive",
        studies=demo.studies,
        seed=demo.seed,
        any_prevalence=demo.prevalence,
        image_size=demo.image_size,
    )
    store = work / "store.zarr"
    convert(ConvertConfig(source=archive.path, store=store, labels=Path(archive.labels_csv)), progress=False)
    base: dict[str, Any] = {
        "store": str(store),
        "epochs": demo.epochs,
        "max_len": demo.max_len,
        "lr": demo.lr,
        "device": "cpu",
        "workers": 0,
        "seed": demo.seed,
        "val_fraction": demo.val_fraction,
        "progress": False,
    }
    cnn_kw = {**base, "model": "xception", "backbone": demo.backbone, "batch_size": demo.batch_size_slices}
    gru_kw = {
        **base,
        "model": "xception_gru",
        "batch_size": demo.batch_size_studies,
        "bidirectional": demo.bidirectional,
        "rnn_hidden": demo.rnn_hidden,
        "rnn_layers": demo.rnn_layers,
    }
    runs: dict[str, Path] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, config: TrainConfig) -> None:
        t = time.perf_counter()
        train(config)
        seconds[name] = time.perf_counter() - t
        runs[name] = Path(config.out)
        print(f"{name}: {seconds[name]:.0f} s", flush=True)

    timed("cnn", TrainConfig(**cnn_kw, out=str(work / "cnn")))
    best = str(work / "cnn" / "best.pt")
    split = str(work / "cnn" / "split.json")
    for nd in (False, True):
        name = "gru_stagewise" + ("_ndiff" if nd else "")
        timed(
            name,
            TrainConfig(
                **gru_kw, backbone=demo.backbone, out=str(work / name), split=split,
                init_backbone=best, freeze_backbone=True, neighbour_diff=nd,
            ),
        )  # fmt: skip
    t = time.perf_counter()
    in_sample = work / "in_sample.zarr"
    extract_features(FeaturesConfig([Path(best)], store, in_sample, device="cpu", workers=0, progress=False))
    seconds["features_in_sample"] = time.perf_counter() - t
    for nd in (False, True):
        name = "gru_features" + ("_ndiff" if nd else "")
        timed(
            name,
            TrainConfig(
                **gru_kw, out=str(work / name), split=split, features=str(in_sample), neighbour_diff=nd
            ),
        )
    folds = [work / f"fold{i}" for i in range(args.folds)]
    t = time.perf_counter()
    for i, run in enumerate(folds):
        train(TrainConfig(**cnn_kw, out=str(run), folds=args.folds, fold=i))
    seconds["fold_cnns"] = time.perf_counter() - t
    t = time.perf_counter()
    oof = work / "oof.zarr"
    extract_features(FeaturesConfig(list(folds), store, oof, device="cpu", workers=0, progress=False))
    seconds["features_oof"] = time.perf_counter() - t
    # no --split: the same seed and fraction hold out the CNN's patients, the fold runs' test patients
    timed(
        "gru_oof_ndiff",
        TrainConfig(**gru_kw, out=str(work / "gru_oof_ndiff"), features=str(oof), neighbour_diff=True),
    )
    held = [json.loads((runs[k] / "split.json").read_text())["val_patients"] for k in runs]
    assert all(h == held[0] for h in held), "the runs must hold out the same patients"

    losses = _evaluate(runs, store, work / "report")
    labels = {
        "cnn": "CNN only (xception)",
        "gru_stagewise": "CNN-GRU stage-wise on the frozen backbone (images every epoch; the demo's previous route)",
        "gru_stagewise_ndiff": "… the same with neighbour differences",
        "gru_features": "CNN-GRU on cached in-sample features",
        "gru_features_ndiff": "… the same with neighbour differences (the demo's route)",
        "gru_oof_ndiff": f"CNN-GRU on cached out-of-fold features ({args.folds} fold CNNs, composed as their "
        "mean), neighbour differences",
    }
    print()
    print(
        f"| model ({demo.studies} studies, {len(held[0])} held-out patients, seed {demo.seed}, {demo.epochs} epochs) | weighted log loss | training s |"
    )
    print("| --- | ---: | ---: |")
    for k, v in losses.items():
        print(f"| {labels[k]} | {v:.4f} | {seconds[k]:.0f} |")
    print(
        f"features: in-sample {seconds['features_in_sample']:.0f} s; out-of-fold: fold CNNs "
        f"{seconds['fold_cnns']:.0f} s + features {seconds['features_oof']:.0f} s"
    )
    return {
        "part": "quality",
        "weighted_log_loss": losses,
        "seconds": seconds,
        "held_out_patients": len(held[0]),
    }


def tta(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The demo's GRU on `--tta none hflip` features against the demo's own GRU (no TTA)."""
    from flows.demo import DemoConfig, _train
    from ichmodel.rundir import read_log

    if args.demo is None:
        raise SystemExit("tta: name the folder of an `ich demo --out` run with --demo")
    demo: Path = args.demo
    features = work / "features-tta.zarr"
    fc = FeaturesConfig(
        checkpoints=[demo / "runs" / "xception" / "best.pt"],
        store=demo / "store.zarr",
        out=features,
        tta=["none", "hflip"],
        device="cpu",
        workers=0,
        progress=False,
    )
    extract_features(fc)
    split = demo / "runs" / "xception" / "split.json"
    result = _train(
        DemoConfig(progress=False), demo / "store.zarr", "xception_gru", work / "gru", split, features
    )
    plain = min(float(r["val_loss"]) for r in read_log(demo / "runs" / "xception_gru" / "log.csv"))
    print(f"demo's GRU, features without TTA: best validation loss {plain:.4f}")
    print(f"the same GRU, --tta none hflip:   best validation loss {result.best_val_loss:.4f}")
    return {"no_tta": plain, "tta_none_hflip": result.best_val_loss}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("speed", "quality", "tta"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/_work")))
    p.add_argument("--studies", type=int, default=12, help="speed: synthetic studies (24–48 slices each)")
    p.add_argument("--image-size", type=int, default=256, help="speed: rows and columns of the slices")
    p.add_argument("--backbone", default="legacy_xception", help="speed: the CNN's timm backbone")
    p.add_argument("--workers", type=int, default=2, help="speed: DataLoader workers")
    p.add_argument("--folds", type=int, default=3, help="quality: fold CNNs of the out-of-fold features")
    p.add_argument("--demo", type=Path, help="tta: the folder of an `ich demo --out` run")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ich-features-bench-") as tmp:
        result = {"speed": speed, "quality": quality, "tta": tta}[args.part](args, Path(tmp))
    (args.out / f"features_{args.part}.json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
