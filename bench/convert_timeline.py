"""Where a conversion's wall time goes with 1 and with 2 workers: stages, the driver's CPU, the workers'.

    .venv/bin/python bench/convert_timeline.py                    # 1 and 2 workers, 3 rounds
    .venv/bin/python bench/convert_timeline.py --slices 300       # the fixed cost of a run

Runs the stages `ich convert` chains on a fresh local cluster per run, alternating the worker counts,
and prints per run: each stage's wall time and the driver's CPU during it; from distributed's task
stream, per worker its tasks, busy and idle time, the serial gap between scan and shard tasks and how
far apart the workers finished; the workers' user and system CPU. The archive is `bench/convert.py`'s
(same seed, in `bench/_work`), read once first to warm the page cache; a first, untimed run pays the
one-off imports and Numba's start.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convert import WORK, _archive


def _children() -> tuple[float, float]:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime, ru.ru_stime


def _run(archive: Path, workers: int) -> dict[str, Any]:
    from distributed import get_task_stream

    from ichdata.cluster import dask_client
    from ichdata.config import ClusterConfig, ConvertConfig
    from ichdata.convert import convert_shards, plan_conversion, scan_source
    from ichdata.finalize import finalize
    from ichdata.plan import load_labels

    store = WORK / f"timeline{workers}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    config = ConvertConfig(
        archive,
        store,
        labels=archive / "stage_2_train.csv",
        overwrite=True,
        cluster=ClusterConfig(workers=workers),
    )
    stages: dict[str, tuple[float, float]] = {}  # name: (wall s, driver CPU s)
    mark = [time.perf_counter(), time.process_time()]

    def stage(name: str) -> None:
        t, c = time.perf_counter(), time.process_time()
        stages[name] = (t - mark[0], c - mark[1])
        mark[:] = [t, c]

    kids = _children()
    start = mark[0]
    labels = load_labels(config.labels)
    stage("labels")
    with dask_client(workers) as client:
        stage("cluster start")
        with get_task_stream(client) as ts:
            manifest = scan_source(config, client)
            stage("scan")
            p = plan_conversion(config, manifest, labels)
            stage("plan")
            result = convert_shards(p, client)
            stage("convert")
        records = ts.data
    stage("cluster stop")
    finalize(result, config=config)
    stage("finalize")
    wall = time.perf_counter() - start
    user, system = (b - a for a, b in zip(kids, _children(), strict=True))
    shutil.rmtree(store, ignore_errors=True)

    per_worker: dict[str, list[tuple[float, float, str]]] = {}
    for r in records:
        for ss in r["startstops"]:
            if ss["action"] == "compute":
                kind = "scan" if str(r["key"]).startswith("scan_files") else "shard"
                per_worker.setdefault(r["worker"], []).append((ss["start"], ss["stop"], kind))
    workers_out = []
    for iv in per_worker.values():
        iv.sort()
        busy = sum(b - a for a, b, _ in iv)
        workers_out.append(
            {"tasks": len(iv), "busy_s": busy, "idle_s": iv[-1][1] - iv[0][0] - busy, "last_stop": iv[-1][1]}
        )
    every = [x for iv in per_worker.values() for x in iv]
    last_scan = max(b for _, b, k in every if k == "scan")
    first_shard = min(a for a, _, k in every if k == "shard")
    stops = [w["last_stop"] for w in workers_out]
    return {
        "workers": workers,
        "wall_s": wall,
        "stages": stages,
        "driver_cpu_s": sum(c for _, c in stages.values()),
        "task_workers": workers_out,
        "scan_to_convert_gap_s": first_shard - last_scan,
        "finish_spread_s": max(stops) - min(stops),
        "workers_user_s": user,
        "workers_system_s": system,
    }


def _print(r: dict[str, Any]) -> None:
    stages = ", ".join(f"{k} {w:.3f}/{c:.3f}" for k, (w, c) in r["stages"].items())
    print(f"{r['workers']} worker(s): {r['wall_s']:.2f} s; stage wall/driver CPU s: {stages}")
    tasks = "; ".join(
        f"{w['tasks']} tasks, busy {w['busy_s']:.2f} s, idle between {w['idle_s']:.3f} s"
        for w in r["task_workers"]
    )
    print(
        f"    workers: {tasks}; scan → convert gap {r['scan_to_convert_gap_s']:.3f} s, finish spread "
        f"{r['finish_spread_s']:.3f} s; worker CPU user {r['workers_user_s']:.2f} s, system "
        f"{r['workers_system_s']:.2f} s; driver CPU {r['driver_cpu_s']:.2f} s",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slices", type=int, default=4000, help="at least this many slices (default 4000)")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    archive = _archive(a.slices, WORK)
    for f in archive.glob("*.dcm"):
        f.read_bytes()
    _run(archive, a.workers[0])  # one-off imports and Numba's start
    runs: dict[int, list[dict[str, Any]]] = {w: [] for w in a.workers}
    for _ in range(a.rounds):
        for w in a.workers:
            runs[w].append(_run(archive, w))
            _print(runs[w][-1])
    print()
    for w, rs in runs.items():
        med = {k: float(np.median([r["stages"][k][0] for r in rs])) for k in rs[0]["stages"]}
        cpu = {k: float(np.median([r["stages"][k][1] for r in rs])) for k in rs[0]["stages"]}
        print(
            f"{w} worker(s), median of {len(rs)}: wall {np.median([r['wall_s'] for r in rs]):.2f} s; "
            + ", ".join(f"{k} {med[k]:.3f} s ({cpu[k]:.3f} CPU)" for k in med)
        )
    if len(a.workers) == 2:
        one, two = sorted(a.workers)
        ratios = [x["wall_s"] / y["wall_s"] for x, y in zip(runs[one], runs[two], strict=True)]
        print(f"same-round {one} → {two} workers: {', '.join(f'{r:.2f}' for r in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
