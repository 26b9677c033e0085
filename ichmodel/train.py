"""Training: `train(TrainConfig(...)) -> RunResult`, what `ich train` runs, on CPU, one GPU or DDP.

One process per device; under `torchrun` each reads its own share of the study windows
(`ichmodel.data.StudyBatchSampler`). AdamW with linear warm-up and cosine decay, channels_last on GPU,
optional `torch.compile` of the backbone and gradient checkpointing; the epoch loop is
`ichmodel.loop`, the run directory `ichmodel.rundir`, the checkpoint format `ichmodel.checkpoint`.
Stage-wise training (the RSNA winners' schedule): `init_backbone=` a CNN run's `best.pt` and
`freeze_backbone=True` train only the RNN and the head; `features=` a features group of `ich features`
does the same on cached vectors, batched from memory (`ichmodel.data.FeatureStudies`) without reading
an image, and the checkpoint composes the trained head with the features' CNN. A resumed run replays
the same data order (a function of seed and epoch) and random streams, so it ends with the weights of
an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ichdata.errors import UserError, out_of_space
from ichdata.features import Features, check_store, file_sha256, open_features
from ichdata.store import open_store
from ichmodel.augment import AugmentConfig
from ichmodel.checkpoint import read_checkpoint, save_checkpoint
from ichmodel.config import TrainConfig
from ichmodel.data import (
    FeatureLoader,
    FeatureStudies,
    SliceDataset,
    Split,
    StudyBatchSampler,
    StudyDataset,
    check_trainable,
    make_loader,
)
from ichmodel.loop import EpochStats, Training, Window, train_epoch, validate
from ichmodel.models import SequenceClassifier, SliceClassifier, create_model, variant
from ichmodel.rundir import (
    RunDir,
    append_log,
    check_fresh,
    check_resumable,
    prepare,
    read_log,
    resolve_split,
    truncate_log,
    write_config,
)
from ichmodel.runtime import (
    Dist,
    gather_rng_states,
    init_distributed,
    intra_op_threads,
    seed_everything,
    select_device,
    set_rng_state,
)

if TYPE_CHECKING:
    from tqdm import tqdm

    from ichdata.store import Store


@dataclass(frozen=True)
class RunResult:
    """What a training run produced (on every rank; paths are the same on all)."""

    out: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_epoch: int
    best_val_loss: float
    history: tuple[dict[str, Any], ...]
    elapsed_s: float
    #: per epoch run in this invocation, the (series, start, stop) windows this rank trained on
    seen_windows: tuple[tuple[Window, ...], ...] = field(default=(), repr=False)


def train(config: TrainConfig) -> RunResult:
    """Train one model on a store; `ichmodel.rundir` says what lands in `config.out`."""
    t_start = time.perf_counter()
    config = config.resolve()
    device = select_device(config.device)
    d, own_group = init_distributed(device.type)
    # On the CPU the sequence stage on cached features runs on one intra-op thread (`intra_op_threads`).
    threads = 1 if config.features is not None and device.type == "cpu" else None
    try:
        with intra_op_threads(threads):
            return _train(config, _setup_device(device, d, config.model), d, t_start)
    except Exception as exc:
        # Every file of the run is replaced whole or not at all: what the last epoch saved is intact.
        last = RunDir(Path(config.out)).last
        then = f"continue with --resume ({last} holds the last epoch saved)" if last.is_file() else None
        error = out_of_space(exc, then or "run the same command again")
        if error is None:
            raise
        raise error from exc
    finally:
        if own_group:
            dist.destroy_process_group()


def _setup_device(device: torch.device, d: Dist, model_name: str) -> torch.device:
    """This rank's device, with the CUDA settings training uses."""
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # cuDNN autotuning pays off for a fixed batch shape (slices); study batches vary in size.
        torch.backends.cudnn.benchmark = not variant(model_name).sequence
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


# --- data ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loaders:
    train: Iterable[Any]
    train_sampler: StudyBatchSampler
    val: Iterable[Any] | None


def _loaders(config: TrainConfig, store: Store, split: Split, d: Dist, device: torch.device) -> _Loaders:
    """Study windows (slices for `xception`) of the training split; whole windows for validation."""
    assert config.batch_size is not None  # set by resolve()
    assert config.workers is not None
    if variant(config.model).sequence:
        train_ds = StudyDataset(store, split.train_series, max_len=config.max_len, reader=config.reader)
    else:
        train_ds = SliceDataset(store, split.train_series, reader=config.reader)
    val_ds = StudyDataset(store, split.val_series, max_len=config.max_len, reader=config.reader)
    sampler = StudyBatchSampler(
        len(train_ds), config.batch_size, shuffle=True, seed=config.seed, rank=d.rank, world_size=d.world
    )
    # slice batches are far larger than study-window batches: validation reads whole windows
    val_batch = config.batch_size if variant(config.model).sequence else max(1, config.batch_size // 16)
    val_sampler = StudyBatchSampler(len(val_ds), val_batch, shuffle=False, rank=d.rank, world_size=d.world)
    pin = device.type == "cuda"
    loader = make_loader(train_ds, sampler, workers=config.workers, pin_memory=pin)
    # A DataLoader draws its workers' base seed when an iterator starts: once per invocation with
    # persistent workers, so a resumed run would draw from the training RNG where an uninterrupted
    # one does not. The loaders' own generators keep the training RNG out of it (the workers draw
    # no random numbers: order and windows come from the sampler).
    loader.generator = torch.Generator().manual_seed(config.seed * 1000 + d.rank)
    val = (
        make_loader(val_ds, val_sampler, workers=min(config.workers, 2), pin_memory=pin)
        if len(val_ds)
        else None
    )
    if val is not None:
        val.generator = torch.Generator().manual_seed(config.seed * 1000 + d.rank)
    return _Loaders(loader, sampler, val)


def _feature_loaders(
    config: TrainConfig, features: Features, store: Store, split: Split, d: Dist, device: torch.device
) -> _Loaders:
    """Study windows of cached features, read once into memory on `device` (no DataLoader, no images)."""
    assert config.batch_size is not None  # set by resolve()
    vectors = torch.from_numpy(features.read_all()).to(device)
    labels = torch.from_numpy(np.ascontiguousarray(store.labels)).to(device)
    offsets = store.study_offsets
    train_ds = FeatureStudies(
        vectors,
        labels,
        offsets,
        split.train_series,
        max_len=config.max_len,
        crop=config.seq_crop,
        reverse=config.seq_reverse,
        seed=config.seed,
    )
    val_ds = FeatureStudies(vectors, labels, offsets, split.val_series, max_len=config.max_len)
    sampler = StudyBatchSampler(
        len(train_ds), config.batch_size, shuffle=True, seed=config.seed, rank=d.rank, world_size=d.world
    )
    val_sampler = StudyBatchSampler(
        len(val_ds), config.batch_size, shuffle=False, rank=d.rank, world_size=d.world
    )
    val = FeatureLoader(val_ds, val_sampler, augment=False) if len(val_ds) else None
    return _Loaders(FeatureLoader(train_ds, sampler, augment=True), sampler, val)


@dataclass(frozen=True)
class _Cached:
    """The features group a `--features` run trains on, and the checkpoints of the CNNs that made it."""

    features: Features
    cnns: list[dict[str, Any]]

    @property
    def record(self) -> dict[str, Any]:
        """What a checkpoint records of the features it was trained on."""
        a = self.features.attrs
        return {
            "path": str(self.features.path),
            "config_hash": a.get("config_hash"),
            "n_slices": self.features.n_slices,
            "route": a.get("route"),
            "tta": a.get("tta"),
        }


def _open_cached(config: TrainConfig, store: Store) -> _Cached:
    """Open `--features` and refuse, in one line, features that do not belong to this store or model."""
    name = f"--features {config.features}"
    features = open_features(cast(str, config.features))
    check_store(features, store)
    cnns = []
    for rec in features.attrs.get("checkpoints") or []:
        path = Path(str(rec.get("path")))
        if not path.is_file():
            raise UserError(
                f"{name}: made by checkpoint {path}, which is not there; the trained head is composed with its CNN"
            )
        if file_sha256(path) != rec.get("sha256"):
            raise UserError(
                f"{name}: checkpoint {path} changed since the features were made; run `ich features` again"
            )
        cnns.append(read_checkpoint(path, what=f"{name}: checkpoint"))
    if not cnns:
        raise UserError(f"{name}: names no checkpoint it was made from")
    width = int(cnns[0]["state_dict"]["fc.weight"].shape[1])
    if width != features.dim:
        raise UserError(
            f"{name}: {features.dim} features per slice, but the model on backbone {config.backbone!r} "
            f"of {cnns[0]['model']['name']} reads {width}; run `ich features` again"
        )
    return _Cached(features, cnns)


def _check_unseen_validation(cached: _Cached, store: Store, split: Split) -> None:
    """Refuse validation slices that a CNN of the features trained on: the composed model has seen them."""
    offsets = store.study_offsets
    rows = [np.arange(offsets[s], offsets[s + 1]) for s in split.val_series.tolist()]
    seen = cached.features.trained_on[np.concatenate(rows)] if rows else np.zeros(0, dtype=bool)
    if seen.any():
        raise UserError(
            f"--features {cached.features.path}: {int(seen.sum()):,} of the {len(seen):,} validation slices are "
            "of series the features' CNN trained on, so the validation loss and the composed model's "
            "evaluation would be optimistic; use the CNN run's split (--split RUN/split.json), or, for "
            "out-of-fold features, the fold runs' --seed and --val-fraction"
        )


# --- model and optimisation ------------------------------------------------------------------------


def _model_kwargs(config: TrainConfig, store: Store, ensemble: int = 1) -> dict[str, Any]:
    """The `create_model` arguments a checkpoint records (the state dict holds the weights).

    `ensemble`: the number of CNNs composed (the fold models of out-of-fold features).
    """
    return {
        "name": config.model,
        "backbone": config.backbone,
        "bidirectional": config.bidirectional,
        "num_classes": len(store.classes),
        "drop_rate": 0.2,
        "rnn_hidden": config.rnn_hidden,
        "rnn_layers": config.rnn_layers,
        "neighbour_diff": config.neighbour_diff,
        "ensemble": ensemble,
    }


def _build_model(
    config: TrainConfig, kwargs: dict[str, Any], device: torch.device, init: list[dict[str, Any]]
) -> SliceClassifier | SequenceClassifier:
    """The model on `device`, its CNN(s) from `init` (`--init-backbone`, or the features' CNNs) when given."""
    model = create_model(
        **kwargs,
        pretrained=config.pretrained,
        weights=config.weights,
        grad_checkpointing=config.grad_checkpointing,
    ).to(device)
    if init:
        what = (
            f"--features {config.features}" if config.features else f"--init-backbone {config.init_backbone}"
        )
        _init_from(model, init, what, str(config.backbone))
    if config.freeze_backbone:
        model.encoder.requires_grad_(False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        model.encoder.channels_last = True
    if config.compile:
        model.encoder.backbone.compile(dynamic=variant(config.model).sequence)
    return model


def _init_from(model: nn.Module, ckpts: list[dict[str, Any]], what: str, backbone: str) -> None:
    """Copy the per-slice CNN of checkpoints `ckpts` into `model` (see `TrainConfig.init_backbone`).

    Several checkpoints are the members of an ensemble CNN (`create_model(ensemble=K)`) in order; the
    classifier starts as the mean of theirs.
    """
    for ckpt in ckpts:
        theirs = ckpt["model"].get("backbone")
        if theirs != backbone:
            raise UserError(f"{what}: trained on backbone {theirs!r}, this run uses {backbone!r}")
    states = [ckpt["state_dict"] for ckpt in ckpts]
    if len(states) == 1:
        encoder = {k[len("encoder.") :]: v for k, v in states[0].items() if k.startswith("encoder.")}
    else:
        prefix = "encoder.backbone."
        encoder = {
            f"backbone.members.{m}.{k[len(prefix) :]}": v
            for m, state in enumerate(states)
            for k, v in state.items()
            if k.startswith(prefix)
        }
    try:
        cast(nn.Module, model.encoder).load_state_dict(encoder)
    except RuntimeError as exc:  # the same backbone name, other weight names or shapes
        raise UserError(f"{what}: its weights do not fit backbone {backbone!r} ({_first(exc)})") from None
    own = model.state_dict()
    fc = {k: torch.stack([s[k] for s in states]).mean(0) for k in states[0] if k.startswith("fc.")}
    if fc and all(k in own and own[k].shape == v.shape for k, v in fc.items()):
        cast(nn.Module, model.fc).load_state_dict({k[len("fc.") :]: v for k, v in fc.items()})
        proj = getattr(model, "proj", None)
        if isinstance(proj, nn.Linear):
            # gate = 1 + (small learned correction): the sequence model starts as the CNN it came from
            with torch.no_grad():
                proj.weight.mul_(0.01)
                proj.bias.fill_(1.0)


def _optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # a frozen backbone is left out
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, norms: no weight decay
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, fused=device.type == "cuda")


def _schedule(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float
) -> torch.optim.lr_scheduler.LambdaLR:
    warm = max(1, round(warmup * total_steps)) if warmup > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total_steps - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class _HeadOnly(nn.Module):
    """A model's sequence head alone: what trains on cached features (`forward` = `forward_head`)."""

    def __init__(self, model: SequenceClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, C) of cached features (B, T, D) and mask (B, T)."""
        return self.model.forward_head(features, mask)


def _training(
    config: TrainConfig,
    model: SliceClassifier | SequenceClassifier,
    loaders: _Loaders,
    gen: torch.Generator,
    device: torch.device,
    d: Dist,
) -> Training:
    """The model wrapped for DDP, its optimizer and schedule; `gen` is the augmentation's stream."""
    net: nn.Module = model
    if config.features is not None:
        net = _HeadOnly(cast(SequenceClassifier, model))
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = _optimizer(model, config, device)
    steps_per_epoch = -(-len(loaders.train_sampler) // config.accum)
    scheduler = _schedule(optimizer, steps_per_epoch * config.epochs, config.warmup)
    aug = (
        AugmentConfig(window_jitter=config.window_jitter) if config.augment and not config.features else None
    )
    return Training(
        model, net, optimizer, scheduler, gen, aug, device, d, config.accum, config.freeze_backbone
    )


# --- the run -------------------------------------------------------------------------------------


@dataclass
class _Best:
    val_loss: float = math.inf
    epoch: int = -1


def _train(config: TrainConfig, device: torch.device, d: Dist, t_start: float) -> RunResult:
    run = RunDir(Path(config.out))
    check_fresh(run, config, d.main)
    store = open_store(config.store)
    cached = _open_cached(config, store) if config.features is not None else None
    resume_ckpt: dict[str, Any] | None = None
    init: list[dict[str, Any]] = []
    if config.resume:
        resume_ckpt = read_checkpoint(run.last, what="--resume:", training=True)
        check_resumable(resume_ckpt["config"], config, run.last)
        if cached is not None and resume_ckpt.get("features") != cached.record:
            raise UserError(
                f"--resume from {run.last}: trained on other features than {config.features} holds now "
                f"({resume_ckpt.get('features')})"
            )
    elif cached is not None:
        init = cached.cnns
    elif config.init_backbone is not None:
        init = [read_checkpoint(config.init_backbone, what="--init-backbone")]
    if d.main:
        prepare(run, config)
    if d.world > 1:
        dist.barrier()

    split = resolve_split(config, store, run, d.main)
    for warning in check_trainable(store, split):
        if d.main:
            print(f"ich train: {warning}", file=sys.stderr)
    if cached is not None:
        _check_unseen_validation(cached, store, split)
    if d.main:
        write_config(run, config, d.world, str(device))
    if cached is not None:
        loaders = _feature_loaders(config, cached.features, store, split, d, device)
    else:
        loaders = _loaders(config, store, split, d, device)
    gen = seed_everything(config.seed, d.rank, device)  # before the model: its initial weights
    ensemble = len(cached.cnns) if cached is not None else 1
    model = _build_model(config, _model_kwargs(config, store, ensemble), device, init)
    t = _training(config, model, loaders, gen, device, d)
    start_epoch, best = 0, _Best()
    if resume_ckpt is not None:
        start_epoch, best = _restore(t, resume_ckpt, run.last)
        del resume_ckpt

    history = [r for r in read_log(run.log) if r["epoch"] <= start_epoch] if config.resume else []
    if config.resume and d.main:
        truncate_log(run.log, start_epoch)  # an epoch whose last.pt was not written runs again
    seen: list[tuple[Window, ...]] = []
    end_epoch = (
        config.epochs if config.stop_after is None else min(config.epochs, start_epoch + config.stop_after)
    )
    for epoch in range(start_epoch, end_epoch):
        t_epoch = time.perf_counter()
        loaders.train_sampler.set_epoch(epoch)
        stats = train_epoch(t, loaders.train, _progress(config, d, len(loaders.train_sampler), epoch))
        epoch_train_s = time.perf_counter() - t_epoch
        val_loss, per_class = (
            validate(t.net, loaders.val, device, d) if loaders.val is not None else (math.nan, [math.nan] * 6)
        )
        row = _log_row(t, stats, epoch, val_loss, per_class, store.classes, epoch_train_s, t_epoch)
        history.append(row)
        seen.append(stats.seen)
        improved = math.isnan(val_loss) or val_loss < best.val_loss
        if improved:
            best = _Best(val_loss if not math.isnan(val_loss) else best.val_loss, epoch + 1)
        rng = gather_rng_states(t.generator, device, d)
        if d.main:
            # last.pt last: it is what --resume continues from, so an epoch counts once it is written.
            append_log(run.log, row)
            ckpt = _checkpoint(config, t, store, epoch, val_loss, best, cached)
            if improved:
                save_checkpoint(ckpt, run.best)
            training_state = {"optimizer": t.optimizer.state_dict(), "scheduler": t.scheduler.state_dict()}
            save_checkpoint({**ckpt, **training_state, "rng": rng}, run.last)
            if config.progress:
                _print_epoch(row, config.epochs)
        if d.world > 1:
            dist.barrier()
    return RunResult(
        out=run.path,
        best_checkpoint=run.best,
        last_checkpoint=run.last,
        best_epoch=best.epoch,
        best_val_loss=best.val_loss,
        history=tuple(history),
        elapsed_s=time.perf_counter() - t_start,
        seen_windows=tuple(seen),
    )


def _restore(t: Training, ckpt: dict[str, Any], path: Path) -> tuple[int, _Best]:
    """Load `last.pt`'s weights, optimizer, schedule and this rank's random state; returns where it stopped.

    The entries' types are checked on reading (`read_checkpoint`); what torch makes of their contents
    (names, shapes, a random state of another length) is one line naming the file too.
    """
    try:
        t.model.load_state_dict(ckpt["state_dict"])
        t.optimizer.load_state_dict(ckpt["optimizer"])
        t.scheduler.load_state_dict(ckpt["scheduler"])
        set_rng_state(ckpt["rng"][t.dist.rank], t.generator, t.device)
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise UserError(
            f"--resume: {path}: its training state does not fit this run ({type(exc).__name__}: {_first(exc)})"
        ) from None
    t.step = int(ckpt["step"])
    return int(ckpt["epoch"]), _Best(float(ckpt["best_val_loss"]), int(ckpt["best_epoch"]))


def _first(exc: BaseException) -> str:
    """The first line of torch's message (a load_state_dict error lists every key on lines of its own)."""
    return (str(exc).replace("\n\t", " ").strip().splitlines() or [""])[0][:300]


def _checkpoint(
    config: TrainConfig,
    t: Training,
    store: Store,
    epoch: int,
    val_loss: float,
    best: _Best,
    cached: _Cached | None,
) -> dict[str, Any]:
    """`best.pt`'s tree after `epoch` (`last.pt` adds the training state)."""
    return {
        "model": _model_kwargs(config, store, len(cached.cnns) if cached is not None else 1),
        "state_dict": t.model.state_dict(),
        "classes": list(store.classes),
        "image_size": store.image_size,
        "windows": store.attrs.get("windows"),
        "max_len": config.max_len,
        "config": dataclasses.asdict(config),
        "store": {"path": str(store.path), "n_slices": store.n_slices, "n_series": store.n_series},
        "epoch": epoch + 1,
        "step": t.step,
        "val_loss": val_loss,
        "best_val_loss": best.val_loss,
        "best_epoch": best.epoch,
        "features": cached.record if cached is not None else None,
    }


def _log_row(
    t: Training,
    stats: EpochStats,
    epoch: int,
    val_loss: float,
    per_class: list[float],
    classes: tuple[str, ...],
    train_s: float,
    t_epoch: float,
) -> dict[str, Any]:
    """The epoch's `log.csv` row (`LOG_COLUMNS` order)."""
    row = {
        "epoch": epoch + 1,
        "step": t.step,
        "lr": t.optimizer.param_groups[0]["lr"],
        "train_loss": stats.train_loss,
        "val_loss": val_loss,
        "train_slices": stats.train_slices,
        "train_slices_per_s": stats.train_slices / max(train_s, 1e-9),
        "data_wait_frac": stats.wait_s / max(train_s, 1e-9),
        "epoch_s": time.perf_counter() - t_epoch,
        **{f"val_loss_{c}": v for c, v in zip(classes, per_class, strict=True)},
    }
    return row


def _print_epoch(row: dict[str, Any], epochs: int) -> None:
    print(
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f}, val loss {row['val_loss']:.4f}, "
        f"{row['train_slices_per_s']:.0f} slices/s, loader wait {row['data_wait_frac']:.0%}",
        flush=True,
    )


def _progress(config: TrainConfig, d: Dist, total: int, epoch: int) -> tqdm[Any] | None:
    if not (config.progress and d.main):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=-(-total // config.accum), desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False
    )


__all__ = ["RunResult", "train"]
