"""Where a training process runs: its rank in the process group, its device and its random streams.

Under `torchrun` (env `WORLD_SIZE` > 1) each process joins the process group (NCCL on GPU, gloo on
CPU). The random state of a rank (python, torch CPU and CUDA, the augmentation generator) is what a
checkpoint's `rng` entry holds, one per rank, so that `--resume` continues the same streams.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ichdata.errors import UserError


@dataclass(frozen=True)
class Dist:
    """This process's place in the process group (rank 0 of 1 without torchrun)."""

    rank: int
    world: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Whether this is the rank that writes the run directory."""
        return self.rank == 0


def init_distributed(device_kind: str) -> tuple[Dist, bool]:
    """Join the process group when launched by torchrun; returns (ranks, whether we initialised it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(0, 1, 0), False
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local), False
    dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank, world, local), True


def select_device(name: str) -> torch.device:
    """The device `--device NAME` asks for (`auto`: CUDA when available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    return torch.device(name)


@contextlib.contextmanager
def intra_op_threads(n: int | None) -> Iterator[None]:
    """Set torch's CPU intra-op threads to `n` for the block (None: leave them), then restore them.

    The sequence stage on cached features is a chain of small products (RNN steps over a few
    windows): on the CPU more threads add a synchronisation per op and no speed, and on a machine
    whose cores are busy with other work each of those waits for a descheduled thread (several
    times slower: bench/RESULTS.md, "Two-stage training").
    """
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def all_reduce(t: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum `t` over the ranks in place (a no-op on one process); returns `t`."""
    if d.world > 1:
        dist.all_reduce(t)
    return t


def seed_everything(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """Seed python and torch for `rank`; returns the augmentation's generator on `device`."""
    random.seed(seed + rank)
    torch.manual_seed(seed + rank)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1000 + rank + 1)
    return gen


def rng_state(aug_gen: torch.Generator, device: torch.device) -> dict[str, Any]:
    """This rank's random state: python, torch CPU (and CUDA), the augmentation generator."""
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "augment": aug_gen.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], aug_gen: torch.Generator, device: torch.device) -> None:
    """Restore a state `rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(aug_gen: torch.Generator, device: torch.device, d: Dist) -> list[dict[str, Any]]:
    """Every rank's `rng_state`, in rank order (what a checkpoint's `rng` holds)."""
    state = rng_state(aug_gen, device)
    if d.world == 1:
        return [state]
    gathered: list[Any] = [None] * d.world
    dist.all_gather_object(gathered, state)
    return gathered


__all__ = [
    "Dist",
    "all_reduce",
    "gather_rng_states",
    "init_distributed",
    "intra_op_threads",
    "rng_state",
    "seed_everything",
    "select_device",
    "set_rng_state",
]
