"""Training throughput on one GPU: the three models at bf16, eager and compiled, and loader/GPU balance.

    python bench/gpu_train.py [--out DIR] [--workers 12]     # one H100/H200
    python bench/gpu_train.py --smoke                        # CPU, tiny backbone
    python bench/gpu_train.py --plan extract,sequence        # the two-stage rows only

On a synthetic store (bench/_synthetic.py), for each model and each of eager / `torch.compile`:
compute (steps on one batch already on the GPU: its ceiling), train (the same steps fed by the real
loader: what `ich train` gets), loader wait (share of train time blocked in `next(loader)`), GPU busy
(train / compute, with the loader's variable batch shapes: see `_Encoder.slice_bucket`) and the
loader alone, each step as `ichmodel.train` does it (uint8 batch to the device, GPU augmentation,
bf16 autocast, channels_last, weighted BCE, fused AdamW). Prints a table; numbers to OUT/gpu_train.json.

Two rows measure two-stage training: `extract` is `ich features` itself (`ichmodel.extract`: bf16,
channels_last, deterministic cuDNN, batches of `--extract-batch`, DataLoader workers reading the
store) with a randomly initialised CNN of `--backbone` over the synthetic store, in slices/s (model
loading included) and the CNN's ceiling on a batch already on the GPU; `sequence` is one epoch of the
sequence stage (`ichmodel.loop.train_epoch` on `ichmodel.data.FeatureStudies`, the model's head
alone) over `--sequence-slices` slices' worth of random float16 features of the backbone's width in
studies of 24–48 slices, `--sequence-batch` windows a step: its seconds per epoch.
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

import torch
from _synthetic import random_cnn_run, synthetic_store

from ichmodel.augment import AugmentConfig
from ichmodel.data import SliceDataset, StudyBatchSampler, StudyDataset, make_loader
from ichmodel.loop import prepare_images as _prepare_images
from ichmodel.loop import to_device as _to_device_only
from ichmodel.losses import weighted_bce_sums
from ichmodel.models import create_model, variant


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {**_to_device_only(batch, device), "cpu_mask": batch["mask"]}


MODELS = ("xception", "xception_lstm", "xception_gru")
#: Rows of the two-stage route: `ich features`, and one epoch of the sequence stage on cached features.
TWO_STAGE = ("extract", "sequence")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loader_alone(loader: Any, sampler: StudyBatchSampler, seconds: float, epoch: int) -> float:
    """Slices/s the loader delivers with nobody waiting on a GPU (first batches excluded)."""
    sampler.set_epoch(epoch)
    it = iter(loader)
    for _ in range(3):
        next(it)
    n, t0 = 0, time.perf_counter()
    for batch in it:
        n += int(batch["lengths"].sum())
        if time.perf_counter() - t0 > seconds:
            break
    return n / (time.perf_counter() - t0)


def measure(
    name: str,
    compiled: bool,
    loader: Any,
    sampler: StudyBatchSampler,
    epoch: int,
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    # Long: compute, train and loader-wait share one model and optimizer, measured back to back.
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = not variant(name).sequence
    model = create_model(name, backbone=args.backbone).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        model.encoder.channels_last = True
        torch.cuda.reset_peak_memory_stats(device)
    if compiled:
        model.encoder.backbone.compile(dynamic=variant(name).sequence)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    aug = AugmentConfig()
    use_bf16 = device.type == "cuda"

    def step(b: dict[str, Any]) -> None:
        x = _prepare_images(b, b["cpu_mask"], aug, gen)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(x, b["cpu_mask"])
        s, w = weighted_bce_sums(logits, b["labels"], b["mask"], b["weight"])
        (s / w.clamp_min(1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sampler.set_epoch(epoch)
    it = iter(loader)
    t0 = time.perf_counter()
    fixed = None
    for _ in range(args.warmup):  # includes compilation
        batch = next(it)
        if fixed is None:
            fixed = batch
        step(_to_device(batch, device))
    _sync(device)
    warm_s = time.perf_counter() - t0

    # compute ceiling: one batch, already on the device
    assert fixed is not None
    on_dev = _to_device(fixed, device)
    n_fixed = int(fixed["lengths"].sum())
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step(on_dev)
    _sync(device)
    compute = n_fixed * args.steps / (time.perf_counter() - t0)

    # the real thing: fed by the loader
    wait, n = 0.0, 0
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        tw = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        wait += time.perf_counter() - tw
        n += int(batch["lengths"].sum())
        step(_to_device(batch, device))
    _sync(device)
    wall = time.perf_counter() - t0
    train_rate = n / wall
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        "model": name,
        "compile": compiled,
        "slices_per_batch": n_fixed,
        "warmup_s": warm_s,
        "compute_slices_per_s": compute,
        "train_slices_per_s": train_rate,
        "loader_wait_frac": wait / wall,
        "gpu_busy_frac": min(1.0, train_rate / compute),
        "peak_mem_gib": peak,
    }


def measure_extract(
    store_path: Path, work: Path, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    """`ich features` over the store, and the CNN's ceiling on one batch already on the device."""
    from ichdata.store import open_store
    from ichmodel.extract import FeaturesConfig, embed, extract_features
    from ichmodel.models import load_model

    store = open_store(store_path)
    ckpt = random_cnn_run(work / "cnn", store, args.backbone)
    summary = extract_features(
        FeaturesConfig(
            checkpoints=[ckpt],
            store=store_path,
            out=work / "features.zarr",
            batch_size=args.extract_batch,
            device=device.type,
            workers=args.workers,
            progress=False,
        )
    )
    model, _ = load_model(ckpt, device=device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        model.encoder.channels_last = True
    n = min(args.extract_batch, store.n_slices)
    x = torch.from_numpy(store.read_rows(0, n)).to(device)
    for _ in range(3):
        embed(model.encoder, x)
    _sync(device)
    t0 = time.perf_counter()
    steps = max(1, args.steps // 4)
    for _ in range(steps):
        embed(model.encoder, x)
    _sync(device)
    return {
        "model": "extract",
        "compile": False,
        "slices_per_batch": n,
        "extract_slices_per_s": summary.slices_per_s,
        "extract_s": summary.elapsed_s,
        "compute_slices_per_s": n * steps / (time.perf_counter() - t0),
        "feature_dim": summary.dim,
    }


def measure_sequence(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """One epoch of the sequence stage on `--sequence-slices` slices' worth of cached features."""
    import numpy as np

    from ichmodel.data import FeatureLoader, FeatureStudies
    from ichmodel.loop import Training, train_epoch
    from ichmodel.runtime import Dist
    from ichmodel.train import _HeadOnly

    torch.manual_seed(0)
    model = create_model("xception_gru", backbone=args.backbone).to(device)
    model.encoder.requires_grad_(False)
    dim = model.encoder.num_features
    rng = np.random.default_rng(0)
    lengths = rng.integers(24, 49, args.sequence_slices // 36 + 1)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), args.sequence_slices)) + 1]
    offsets = np.r_[0, np.cumsum(lengths)]
    n = int(offsets[-1])
    t0 = time.perf_counter()
    feats = torch.randn(n, dim, device=device, dtype=torch.float16)
    labels = (torch.rand(n, 6, device=device) < 0.1).to(torch.uint8)
    setup_s = time.perf_counter() - t0
    ds = FeatureStudies(feats, labels, offsets, np.arange(len(lengths)), max_len=args.max_len)
    sampler = StudyBatchSampler(len(ds), args.sequence_batch, seed=0)
    net = _HeadOnly(model)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=device.type == "cuda"
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator(device=device)
    t = Training(model, net, opt, sched, gen, None, device, Dist(0, 1, 0), 1, True)
    sampler.set_epoch(0)  # a warm-up epoch's first steps: cuDNN's RNN plans, the optimizer state
    it = iter(FeatureLoader(ds, sampler, augment=False))
    warm = [next(it) for _ in range(3)]
    train_epoch(t, warm, None)
    _sync(device)
    sampler.set_epoch(1)
    t0 = time.perf_counter()
    stats = train_epoch(t, FeatureLoader(ds, sampler, augment=False), None)
    _sync(device)
    epoch_s = time.perf_counter() - t0
    return {
        "model": "sequence",
        "compile": False,
        "slices_per_batch": args.sequence_batch,
        "sequence_slices": stats.train_slices,
        "sequence_epoch_s": epoch_s,
        "train_slices_per_s": stats.train_slices / epoch_s,
        "features_gib": feats.numel() * 2 / 2**30,
        "setup_s": setup_s,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30
        if device.type == "cuda"
        else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    # Long: the options, the store, the plan of runs and the table, in the order the run goes.
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--smoke", action="store_true", help="CPU, tiny backbone and images: checks the script runs"
    )
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "bench/_work")))
    p.add_argument("--store", type=Path, default=None, help="use this store instead of a synthetic one")
    p.add_argument("--studies", type=int, default=240)
    p.add_argument("--backbone", default="legacy_xception")
    p.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 1))
    p.add_argument("--study-batch", type=int, default=4, help="study windows per step (sequence models)")
    p.add_argument("--slice-batch", type=int, default=128, help="slices per step (xception)")
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=12, help="steps before timing (compilation, cuDNN plans)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument(
        "--plan",
        default="extract,sequence,xception,xception_lstm,xception_gru,xception_gru+compile,xception+compile,"
        "xception_lstm+compile",
        help="comma-separated MODEL or MODEL+compile, measured in this order",
    )
    p.add_argument("--no-compile", action="store_true")
    p.add_argument(
        "--skip-slice-loader", action="store_true", help="do not time the single-slice loader alone"
    )
    p.add_argument(
        "--compile-smoke", action="store_true", help="also compile in --smoke (needs a C compiler)"
    )
    p.add_argument(
        "--budget-s", type=float, default=330.0, help="skip what would start after this many seconds"
    )
    p.add_argument("--extract-batch", type=int, default=256, help="extract: slices per CNN call")
    p.add_argument(
        "--sequence-slices", type=int, default=752_803, help="sequence: slices' worth of features (RSNA's)"
    )
    p.add_argument("--sequence-batch", type=int, default=64, help="sequence: study windows per step")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    if args.smoke:
        args.studies, args.backbone, args.workers = 12, "test_efficientnet", 2
        args.study_batch, args.slice_batch, args.warmup, args.steps = 2, 16, 2, 3
        args.max_len = 16
        args.extract_batch, args.sequence_slices, args.sequence_batch = 16, 3000, 16
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "workers": args.workers,
        "backbone": args.backbone,
    }
    print(json.dumps(info), flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="ich-gpu-bench-")
    if args.store is None:
        t0 = time.perf_counter()
        size = 64 if args.smoke else 256
        store_path = Path(tmp.name) / "bench.zarr"
        store = synthetic_store(store_path, args.studies, size=size, distinct=50 if args.smoke else 200)
        print(
            f"synthetic store: {store.n_slices} slices in {store.n_series} studies, {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
    else:
        store_path = args.store
    plan = [(m.removesuffix("+compile"), m.endswith("+compile")) for m in args.plan.split(",")]
    if args.no_compile or (args.smoke and not args.compile_smoke):
        plan = [(m, c) for m, c in plan if not c]
    results: list[dict[str, Any]] = []
    for name in [m for m, _ in plan if m in TWO_STAGE]:
        try:
            if name == "extract":
                r = measure_extract(store_path, Path(tmp.name), args, device)
            else:
                r = measure_sequence(args, device)
        except Exception as exc:  # keep going: the other rows' numbers are worth having
            print(f"FAILED {name}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
            continue
        results.append(r)
        print(json.dumps(r), flush=True)
        (args.out / "gpu_train.json").write_text(json.dumps({**info, "runs": results}, indent=1))
    plan = [(m, c) for m, c in plan if m not in TWO_STAGE]

    alone: dict[str, float] = {}
    if plan:  # the image models: their loaders, alone and feeding the GPU
        studies = StudyDataset(store_path, max_len=args.max_len)
        slices = SliceDataset(store_path)
        study_sampler = StudyBatchSampler(len(studies), args.study_batch, seed=1)
        slice_sampler = StudyBatchSampler(len(slices), args.slice_batch, seed=1)
        pin = device.type == "cuda"
        study_loader = make_loader(studies, study_sampler, workers=args.workers, pin_memory=pin)
        slice_loader = make_loader(slices, slice_sampler, workers=args.workers, pin_memory=pin)

        alone = {
            "study_loader_slices_per_s": loader_alone(study_loader, study_sampler, 3 if args.smoke else 6, 0),
            "slice_loader_slices_per_s": float("nan")
            if args.skip_slice_loader
            else loader_alone(slice_loader, slice_sampler, 3 if args.smoke else 6, 0),
        }
        print(json.dumps(alone), flush=True)
        for epoch, (name, compiled) in enumerate(plan, start=1):
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                print(f"skipped {name} compile={compiled}: {elapsed:.0f} s elapsed", flush=True)
                continue
            loader, sampler = (
                (study_loader, study_sampler) if variant(name).sequence else (slice_loader, slice_sampler)
            )
            try:
                r = measure(name, compiled, loader, sampler, epoch, args, device)
            except Exception as exc:  # keep going: one failing variant should not lose the others' numbers
                print(f"FAILED {name} compile={compiled}: {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                continue
            results.append(r)
            print(json.dumps(r), flush=True)
            (args.out / "gpu_train.json").write_text(json.dumps({**info, **alone, "runs": results}, indent=1))

    print()
    print(
        f"device: {info['device']}, torch {info['torch']}, {args.workers} loader workers, backbone {args.backbone}"
    )
    if alone:
        print(
            f"loader alone: study windows {alone['study_loader_slices_per_s']:.0f} slices/s, "
            f"single slices {alone['slice_loader_slices_per_s']:.0f} slices/s"
        )
    print(
        "| model | compile | slices/batch | compute slices/s | train slices/s | loader wait | GPU busy | peak GiB | warm-up s |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        if r["model"] in TWO_STAGE:
            continue
        print(
            f"| {r['model']} | {'yes' if r['compile'] else 'no'} | {r['slices_per_batch']} | "
            f"{r['compute_slices_per_s']:.0f} | {r['train_slices_per_s']:.0f} | {r['loader_wait_frac']:.0%} | "
            f"{r['gpu_busy_frac']:.0%} | {r['peak_mem_gib']:.1f} | {r['warmup_s']:.0f} |"
        )
    for r in results:
        if r["model"] == "extract":
            print(
                f"extract (`ich features`, batch {r['slices_per_batch']}): {r['extract_slices_per_s']:.0f} slices/s "
                f"end to end, CNN ceiling {r['compute_slices_per_s']:.0f} slices/s, {r['feature_dim']} features"
            )
        elif r["model"] == "sequence":
            print(
                f"sequence stage on cached features: one epoch over {r['sequence_slices']:,} slices in "
                f"{r['sequence_epoch_s']:.1f} s ({r['train_slices_per_s']:.0f} slices/s, "
                f"{r['slices_per_batch']} windows a step, {r['features_gib']:.1f} GiB of features)"
            )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    tmp.cleanup()
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
