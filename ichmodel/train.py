"""Training: `train(TrainConfig(...)) -> RunResult`, what `ich train` runs, on CPU, one GPU or DDP.

One process per device; under `torchrun` (env `WORLD_SIZE` > 1) each process joins the process
group (NCCL on GPU, gloo on CPU), reads its own share of the study windows
(`ichmodel.data.StudyBatchSampler`) and the validation metric is summed over ranks before it is
divided. Loss: the RSNA weighted log loss (`ichmodel.losses`), normalised over the whole optimizer
step (all micro-batches of a gradient-accumulation group, all ranks), so `P` ranks × `B` × `accum`
trains like one batch of `P·B·accum` windows. AdamW with linear warm-up and cosine decay, bf16
autocast and channels_last on GPU, augmentation on the device (`ichmodel.augment`), optional
`torch.compile` of the backbone and gradient checkpointing.

Stage-wise training (what the RSNA competition's winners did): train `xception` first, then a
sequence model with `init_backbone=` that run's `best.pt` and `freeze_backbone=True`; it starts from
the CNN's backbone and classifier with its gate open (the CNN-only model's predictions) and learns
only the RNN and the head. `rnn_hidden`/`rnn_layers` size the RNN (the paper's 512 × 2 by default).

The run directory (`out`) receives:

- `config.json`: the resolved `TrainConfig` (every default filled in) plus the world size;
- `split.json`: the patient split (`ichmodel.data.write_split`), reusable with `split=`;
- `log.csv`: one row per epoch (see `LOG_COLUMNS`);
- `last.pt`: the checkpoint after the latest epoch, with everything `resume=True` needs;
- `best.pt`: the epoch with the lowest validation loss (the last epoch when there is no
  validation split), without the training state.

Checkpoint format (a dict saved with `torch.save`; `ichmodel.models.load_model` reads it):

| key | content |
| --- | --- |
| `format`, `version` | `"ich-checkpoint"`, 1 |
| `model` | `create_model` keyword arguments: `name`, `backbone`, `bidirectional`, `num_classes`, `drop_rate`, `rnn_hidden`, `rnn_layers` (no weights file, no `pretrained`: the state dict holds the weights) |
| `state_dict` | the model's weights (plain module: no DDP `module.` or compile prefixes) |
| `classes` | label columns, in output order (`epidural … any`) |
| `image_size`, `windows` | the store's slice size and window list (what inputs must look like) |
| `max_len` | study window length used in training (`predict_study(max_len=…)`) |
| `config` | the resolved `TrainConfig` as a dict |
| `store` | `path`, `n_slices`, `n_series` of the training store |
| `epoch`, `step` | epochs completed, optimizer steps taken |
| `val_loss`, `best_val_loss`, `best_epoch` | validation weighted log loss of this epoch and the best so far |
| `optimizer`, `scheduler`, `rng` | only in `last.pt`: AdamW and LR-schedule state; RNG states of every rank (python, torch CPU and CUDA, the augmentation generator) |

Resume restores all of it and replays the same data order (a function of seed and epoch), so a run
stopped after epoch k and resumed gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from ichdata.errors import UserError
from ichdata.store import open_store
from ichmodel.augment import AugmentConfig, augment, to_float
from ichmodel.data import (
    DEFAULT_MAX_LEN,
    SliceDataset,
    Split,
    StudyBatchSampler,
    StudyDataset,
    make_loader,
    read_split,
    split_by_patient,
    write_split,
)
from ichmodel.losses import rsna_from_sums, val_loss_sums, weighted_bce_sums
from ichmodel.models import DEFAULT_BACKBONE, MODEL_NAMES, create_model, real_index

CHECKPOINT_FORMAT = "ich-checkpoint"
CHECKPOINT_VERSION = 1
#: Config fields that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = frozenset({"resume", "progress", "workers", "stop_after", "compile", "device", "split"})


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on. `None` fields are resolved by `resolve()`."""

    store: str
    out: str
    model: str = "xception_gru"
    backbone: str = DEFAULT_BACKBONE
    pretrained: bool = False
    weights: str | None = None
    bidirectional: bool = False
    #: units and layers of the LSTM/GRU (the paper's 512 × 2; a few hundred training studies need fewer)
    rnn_hidden: int = 512
    rnn_layers: int = 2
    #: start from this checkpoint's per-slice CNN (`best.pt` of an earlier run on the same backbone):
    #: the backbone's weights, and the classifier (`fc`) when the shapes match. A sequence model then
    #: starts with its gate open (`proj` = 1), i.e. exactly as the CNN-only model: the winners'
    #: stage-wise schedule, CNN first, sequence model on its features second.
    init_backbone: str | None = None
    #: keep the backbone's weights and batch-norm statistics fixed (train only the RNN and the head)
    freeze_backbone: bool = False
    epochs: int = 10
    #: study windows per step for the sequence models, slices per step for `xception`
    batch_size: int | None = None
    max_len: int = DEFAULT_MAX_LEN
    lr: float = 3e-4
    weight_decay: float = 0.01
    #: fraction of the optimizer steps spent warming the learning rate up linearly
    warmup: float = 0.05
    accum: int = 1
    device: str = "auto"
    compile: bool = False
    grad_checkpointing: bool = False
    workers: int | None = None
    seed: int = 0
    val_fraction: float = 0.1
    split: str | None = None
    resume: bool = False
    augment: bool = True
    window_jitter: bool = False
    reader: str = "auto"
    progress: bool = True
    #: stop after this many epochs in this invocation (a job time limit); `resume` continues
    stop_after: int | None = None

    def resolve(self) -> TrainConfig:
        """Fill in defaults that depend on the model or the machine, and check values."""
        if self.model not in MODEL_NAMES:
            raise UserError(f"--model {self.model!r}: expected one of {', '.join(MODEL_NAMES)}")
        for name in ("epochs", "accum", "max_len", "rnn_hidden", "rnn_layers"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device {self.device!r}: expected cpu, cuda or auto")
        init = self.init_backbone
        if init is not None:
            if not Path(init).is_file():
                raise UserError(f"--init-backbone {init}: no such file")
            init = str(Path(init).absolute())
        batch = self.batch_size or (64 if self.model == "xception" else 4)
        workers = self.workers if self.workers is not None else min(8, os.cpu_count() or 1)
        return dataclasses.replace(
            self,
            store=str(Path(self.store).absolute()),
            out=str(Path(self.out).absolute()),
            batch_size=batch,
            workers=workers,
            init_backbone=init,
        )


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
    seen_windows: tuple[tuple[tuple[int, int, int], ...], ...] = field(default=(), repr=False)


LOG_COLUMNS: tuple[str, ...] = (
    "epoch",
    "step",
    "lr",
    "train_loss",
    "val_loss",
    "train_slices",
    "train_slices_per_s",
    "data_wait_frac",
    "epoch_s",
    "val_loss_epidural",
    "val_loss_intraparenchymal",
    "val_loss_intraventricular",
    "val_loss_subarachnoid",
    "val_loss_subdural",
    "val_loss_any",
)


# --- process group and device -----------------------------------------------------------------


@dataclass(frozen=True)
class _Dist:
    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_kind: str) -> tuple[_Dist, bool]:
    """Join the process group when launched by torchrun; returns (ranks, whether we initialised it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist(0, 1, 0), False
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), local), False
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return _Dist(rank, world, local), True


def _device(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {config.device}: no CUDA device is available")
    return torch.device(config.device)


def _all_reduce(t: torch.Tensor, d: _Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(t)
    return t


# --- optimisation -----------------------------------------------------------------------------


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


def _init_from(model: nn.Module, path: Path, backbone: str) -> None:
    """Copy the per-slice CNN of checkpoint `path` into `model` (see `TrainConfig.init_backbone`)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"--init-backbone {path}: not an ich training checkpoint")
    theirs = ckpt["model"].get("backbone")
    if theirs != backbone:
        raise UserError(f"--init-backbone {path}: trained on backbone {theirs!r}, this run uses {backbone!r}")
    state = ckpt["state_dict"]
    encoder = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
    cast(nn.Module, model.encoder).load_state_dict(encoder)
    own = model.state_dict()
    fc = {k: v for k, v in state.items() if k.startswith("fc.")}
    if fc and all(k in own and own[k].shape == v.shape for k, v in fc.items()):
        cast(nn.Module, model.fc).load_state_dict({k[len("fc.") :]: v for k, v in fc.items()})
        proj = getattr(model, "proj", None)
        if isinstance(proj, nn.Linear):
            # gate = 1 + (small learned correction): the sequence model starts as the CNN it came from
            with torch.no_grad():
                proj.weight.mul_(0.01)
                proj.bias.fill_(1.0)


# --- RNG state (bit-for-bit resume) -------------------------------------------------------------


def _rng_state(aug_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "augment": aug_gen.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], aug_gen: torch.Generator, device: torch.device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _seed_everything(seed: int, rank: int, device: torch.device) -> torch.Generator:
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1000 + rank + 1)
    return gen


# --- run directory --------------------------------------------------------------------------------


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, path: Path) -> None:
    now = _config_dict(config)
    diff = {k: (saved.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and saved.get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
        raise UserError(f"--resume from {path}: the run was started with different settings ({pretty})")


def _resolve_split(config: TrainConfig, store: Any, out: Path, d: _Dist) -> Split:
    split_file = out / "split.json"
    if config.split is not None:
        split = read_split(config.split, store.series)
    elif config.resume and split_file.is_file():
        split = read_split(split_file, store.series)
    else:
        split = split_by_patient(store.series, config.val_fraction, config.seed)
    if d.main:
        write_split(split_file, split, store.series)
    if len(split.train_series) == 0:
        raise UserError(f"{config.store}: no series left for training after the split")
    return split


def _append_log(path: Path, row: dict[str, Any]) -> None:
    new = not path.is_file()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(LOG_COLUMNS))
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in LOG_COLUMNS})


def _read_log(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    ints = {"epoch", "step", "train_slices"}
    with path.open(newline="") as f:
        return [{k: (int(v) if k in ints else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


# --- the loop ---------------------------------------------------------------------------------


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    out = dict(batch)
    for k in ("images", "labels", "mask", "weight"):
        out[k] = batch[k].to(device, non_blocking=True)
    return out


def _prepare_images(
    batch: dict[str, Any], mask: torch.Tensor, aug: AugmentConfig | None, gen: torch.Generator
) -> torch.Tensor:
    """uint8 (B, T, 3, S, S) on the device -> float (B, T, 3, S, S); only real slices are augmented.

    `mask` is the loader's CPU copy, so that picking the real slices needs no GPU synchronisation.
    """
    images = batch["images"]
    if aug is None:
        return to_float(images)
    b, t = mask.shape
    idx = real_index(mask, images.device)
    group = torch.div(idx, t, rounding_mode="floor")
    valid = augment(images.flatten(0, 1).index_select(0, idx), group, aug, gen, n_groups=b)
    x = valid.new_zeros((b * t, *valid.shape[1:]))
    return x.index_copy_(0, idx, valid).view(b, t, *valid.shape[1:])


def _groups(it: Iterator[dict[str, Any]], n: int, wait: list[float]) -> Iterator[list[dict[str, Any]]]:
    """Group consecutive batches by `n` (the accumulation group), timing the waits on the loader."""
    group: list[dict[str, Any]] = []
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        wait[0] += time.perf_counter() - t0
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


@torch.no_grad()
def _validate(
    model: nn.Module, loader: Any, device: torch.device, autocast: Any, d: _Dist
) -> tuple[float, list[float]]:
    model.eval()
    n_classes = 6
    sums = torch.zeros(n_classes, dtype=torch.float64, device=device)
    counts = torch.zeros(n_classes, dtype=torch.float64, device=device)
    for batch in loader:
        b = _to_device(batch, device)
        with autocast():
            logits = model(to_float(b["images"]), batch["mask"])
        s, c = val_loss_sums(logits, b["labels"], b["mask"], b["weight"])
        sums += s
        counts += c
    _all_reduce(sums, d)
    _all_reduce(counts, d)
    per_class = (sums / counts.clamp_min(1)).tolist()
    per_class = [v if c > 0 else float("nan") for v, c in zip(per_class, counts.tolist(), strict=True)]
    return rsna_from_sums(sums, counts), per_class


def train(config: TrainConfig) -> RunResult:
    """Train one model on a store; see the module docstring for what lands in `config.out`."""
    t_start = time.perf_counter()
    config = config.resolve()
    device = _device(config)
    d, own_group = _init_distributed(device.type)
    try:
        return _train(config, device, d, t_start)
    finally:
        if own_group:
            dist.destroy_process_group()


def _train(config: TrainConfig, device: torch.device, d: _Dist, t_start: float) -> RunResult:
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # cuDNN autotuning pays off for a fixed batch shape (slices); study batches vary in size.
        torch.backends.cudnn.benchmark = config.model == "xception"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(config.out)
    last_path, best_path, log_path = out / "last.pt", out / "best.pt", out / "log.csv"
    resume_ckpt: dict[str, Any] | None = None
    if config.resume:
        if not last_path.is_file():
            raise UserError(f"--resume: {last_path} does not exist; start without --resume")
        resume_ckpt = torch.load(last_path, map_location="cpu", weights_only=False)
        _check_resumable(resume_ckpt["config"], config, last_path)
    elif d.main and last_path.is_file():
        raise UserError(f"{out}: holds a run already (last.pt); use --resume or another --out")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        if not config.resume and log_path.is_file():
            log_path.unlink()
    if d.world > 1:
        dist.barrier()

    store = open_store(config.store)
    split = _resolve_split(config, store, out, d)
    if d.main:
        resolved = {**_config_dict(config), "world_size": d.world, "device": str(device)}
        (out / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")

    # data
    if config.model == "xception":
        train_ds: StudyDataset = SliceDataset(store, split.train_series, reader=config.reader)
    else:
        train_ds = StudyDataset(store, split.train_series, max_len=config.max_len, reader=config.reader)
    val_ds = StudyDataset(store, split.val_series, max_len=config.max_len, reader=config.reader)
    assert config.batch_size is not None
    assert config.workers is not None
    workers = config.workers
    train_sampler = StudyBatchSampler(
        len(train_ds), config.batch_size, shuffle=True, seed=config.seed, rank=d.rank, world_size=d.world
    )
    val_batch = config.batch_size if config.model != "xception" else max(1, config.batch_size // 16)
    val_sampler = StudyBatchSampler(len(val_ds), val_batch, shuffle=False, rank=d.rank, world_size=d.world)
    pin = device.type == "cuda"
    train_loader = make_loader(train_ds, train_sampler, workers=workers, pin_memory=pin)
    val_loader = (
        make_loader(val_ds, val_sampler, workers=min(workers, 2), pin_memory=pin) if len(val_ds) else None
    )

    # model
    gen = _seed_everything(config.seed, d.rank, device)
    model_kwargs: dict[str, Any] = {
        "name": config.model,
        "backbone": config.backbone,
        "bidirectional": config.bidirectional,
        "num_classes": len(store.classes),
        "drop_rate": 0.2,
        "rnn_hidden": config.rnn_hidden,
        "rnn_layers": config.rnn_layers,
    }
    model = create_model(
        **{k: v for k, v in model_kwargs.items() if k != "name"},
        name=config.model,
        pretrained=config.pretrained,
        weights=config.weights,
        grad_checkpointing=config.grad_checkpointing,
    ).to(device)
    if config.init_backbone is not None and resume_ckpt is None:
        _init_from(model, Path(config.init_backbone), config.backbone)
    if config.freeze_backbone:
        model.encoder.requires_grad_(False)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        model.encoder.channels_last = True
    if config.compile:
        model.encoder.backbone.compile(dynamic=config.model != "xception")
    net: Any = model
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = _optimizer(model, config, device)
    steps_per_epoch = -(-len(train_sampler) // config.accum)
    scheduler = _schedule(optimizer, steps_per_epoch * config.epochs, config.warmup)
    aug = AugmentConfig(window_jitter=config.window_jitter) if config.augment else None

    def autocast() -> Any:
        if device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    start_epoch, step = 0, 0
    best_val, best_epoch = math.inf, -1
    if resume_ckpt is not None:
        model.load_state_dict(resume_ckpt["state_dict"])
        optimizer.load_state_dict(resume_ckpt["optimizer"])
        scheduler.load_state_dict(resume_ckpt["scheduler"])
        _set_rng_state(resume_ckpt["rng"][d.rank], gen, device)
        start_epoch, step = int(resume_ckpt["epoch"]), int(resume_ckpt["step"])
        best_val = float(resume_ckpt["best_val_loss"])
        best_epoch = int(resume_ckpt["best_epoch"])
        del resume_ckpt

    history = _read_log(log_path) if config.resume else []
    seen: list[tuple[tuple[int, int, int], ...]] = []
    end_epoch = (
        config.epochs if config.stop_after is None else min(config.epochs, start_epoch + config.stop_after)
    )
    for epoch in range(start_epoch, end_epoch):
        t_epoch = time.perf_counter()
        train_sampler.set_epoch(epoch)
        net.train()
        if config.freeze_backbone:
            model.encoder.eval()  # batch-norm statistics stay the initial backbone's
        wait = [0.0]
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        weight_sum = torch.zeros((), dtype=torch.float64, device=device)
        n_slices = 0
        epoch_seen: list[tuple[int, int, int]] = []
        bar = _progress(config, d, steps_per_epoch, epoch)
        for group in _groups(iter(train_loader), config.accum, wait):
            # normalise by the weight of the whole optimizer step, over micro-batches and ranks
            total = torch.zeros((), dtype=torch.float32)
            for batch in group:
                total += _weight_total(batch)
            total = _all_reduce(total.to(device), d).clamp_min(1e-12)
            for k, batch in enumerate(group):
                b = _to_device(batch, device)
                sync = k == len(group) - 1 or d.world == 1
                ctx = contextlib.nullcontext() if sync else net.no_sync()
                with ctx:
                    x = _prepare_images(b, batch["mask"], aug, gen)
                    with autocast():
                        logits = net(x, batch["mask"])
                    s, w = weighted_bce_sums(logits, b["labels"], b["mask"], b["weight"])
                    (s / total * d.world).backward()
                loss_sum += s.detach().double()
                weight_sum += w.detach().double()
                n_slices += int(batch["lengths"].sum())
                real = batch["weight"] > 0
                epoch_seen.extend(
                    (int(sv), int(st), int(st + ln))
                    for sv, st, ln, r in zip(
                        batch["series"], batch["start"], batch["lengths"], real, strict=True
                    )
                    if r
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        _all_reduce(loss_sum, d)
        _all_reduce(weight_sum, d)
        train_loss = float(loss_sum / weight_sum.clamp_min(1e-12))
        epoch_train_s = time.perf_counter() - t_epoch
        if val_loader is not None:
            val_loss, per_class = _validate(net, val_loader, device, autocast, d)
        else:
            val_loss, per_class = float("nan"), [float("nan")] * 6
        counted = torch.tensor(float(n_slices), dtype=torch.float64, device=device)
        total_slices = int(_all_reduce(counted, d).item())
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "val_loss": val_loss,
            "train_slices": total_slices,
            "train_slices_per_s": total_slices / max(epoch_train_s, 1e-9),
            "data_wait_frac": wait[0] / max(epoch_train_s, 1e-9),
            "epoch_s": time.perf_counter() - t_epoch,
            **{f"val_loss_{c}": v for c, v in zip(store.classes, per_class, strict=True)},
        }
        history.append(row)
        seen.append(tuple(epoch_seen))
        improved = math.isnan(val_loss) or val_loss < best_val
        if improved:
            best_val, best_epoch = (val_loss if not math.isnan(val_loss) else best_val), epoch + 1
        rng = [_rng_state(gen, device)]
        if d.world > 1:
            gathered: list[Any] = [None] * d.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        if d.main:
            ckpt = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "model": model_kwargs,
                "state_dict": model.state_dict(),
                "classes": list(store.classes),
                "image_size": store.image_size,
                "windows": store.attrs.get("windows"),
                "max_len": config.max_len,
                "config": _config_dict(config),
                "store": {"path": str(store.path), "n_slices": store.n_slices, "n_series": store.n_series},
                "epoch": epoch + 1,
                "step": step,
                "val_loss": val_loss,
                "best_val_loss": best_val,
                "best_epoch": best_epoch,
            }
            if improved:
                _save_atomic(ckpt, best_path)
            _save_atomic(
                {
                    **ckpt,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "rng": rng,
                },
                last_path,
            )
            _append_log(log_path, row)
            if config.progress:
                print(
                    f"epoch {epoch + 1}/{config.epochs}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, "
                    f"{row['train_slices_per_s']:.0f} slices/s, loader wait {row['data_wait_frac']:.0%}",
                    flush=True,
                )
        if d.world > 1:
            dist.barrier()
    return RunResult(
        out=out,
        best_checkpoint=best_path,
        last_checkpoint=last_path,
        best_epoch=best_epoch,
        best_val_loss=best_val,
        history=tuple(history),
        elapsed_s=time.perf_counter() - t_start,
        seen_windows=tuple(seen),
    )


def _weight_total(batch: dict[str, Any]) -> torch.Tensor:
    from ichmodel.losses import entry_weights

    return entry_weights(batch["labels"], batch["mask"], batch["weight"]).sum()


def _progress(config: TrainConfig, d: _Dist, total: int, epoch: int) -> Any:
    if not (config.progress and d.main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{config.epochs}", unit="step", leave=False)


__all__ = ["CHECKPOINT_FORMAT", "LOG_COLUMNS", "RunResult", "TrainConfig", "train"]
