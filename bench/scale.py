"""RSNA at full size: every stage of `ich convert`, the `ingest` flow, `ich verify` and the loader, timed.

    .venv/bin/python bench/scale.py --studies 2504            # ≈ 75k slices (RSNA's size / 10)
    .venv/bin/python bench/scale.py --studies 25040           # RSNA's 752k: ≈ 8 GB archive

Synthesises (or reuses, keyed by studies, seed and image size) an RSNA-shaped archive under the work
folder, then runs, as a user would: `ich convert` (fresh store), `ich verify` (in this process, as the
CLI does without `--workers`), the same `ich convert` again with nothing new, the Prefect `ingest`
flow (ephemeral Prefect home in the work folder) into a second store (the first removed: one store
at a time in the page cache), and one pass of `ichmodel.data.StudyDataset` over it. Per stage: wall time, cost per slice, the peak RSS of
this process (the driver) and of each worker process (psutil, sampled in a thread), Dask tasks run,
and the lines that reached the terminal (standard output and error are captured per run: the stages
are called with progress bars off, so anything there is a library talking to the user). Prints a table
and writes `WORK/scale-<studies>-<seed>-<size>.json`; `bench/RESULTS.md` keeps the figures. `--archive`
takes an archive written elsewhere, e.g. on tmpfs where the disk is slow at small files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import psutil

WORK = Path(__file__).resolve().parent / "_work"


def archive_path(work: Path, studies: int, seed: int, image_size: int) -> Path:
    """The archive's folder: one per (studies, seed, image size), reused by later runs."""
    return work / "scale" / f"archive-s{studies}-seed{seed}-px{image_size}"


def ensure_archive(work: Path, studies: int, seed: int, image_size: int, workers: int) -> tuple[Path, float]:
    """The archive, written now if missing (into a temporary name, renamed once complete); its write time."""
    from ichdata.testing import write_archive

    out = archive_path(work, studies, seed, image_size)
    if (out / "stage_2_train.csv").is_file():
        return out, 0.0
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.perf_counter()
    print(write_archive(tmp, studies=studies, seed=seed, image_size=image_size, workers=workers), flush=True)
    tmp.rename(out)
    return out, time.perf_counter() - t


class RssSampler(threading.Thread):
    """Samples the RSS of this process and of every descendant (the Dask workers) until stopped."""

    def __init__(self, interval_s: float = 0.25) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, dict[int, int]]] = []  # (t, driver rss, {worker pid: rss})
        self._stop_event = threading.Event()
        self._me = psutil.Process()

    def run(self) -> None:
        while not self._stop_event.is_set():
            t = time.perf_counter()
            kids: dict[int, int] = {}
            for c in self._me.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    kids[c.pid] = c.memory_info().rss
            with contextlib.suppress(psutil.Error):
                self.samples.append((t, self._me.memory_info().rss, kids))
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peaks(self, a: float, b: float) -> tuple[int, dict[int, int]]:
        """Peak RSS of the driver and of each descendant between times `a` and `b` (perf_counter)."""
        driver, kids = 0, dict[int, int]()
        for t, d, k in self.samples:
            # A stage shorter than the interval still gets the samples on either side of it.
            if a - self.interval_s <= t <= b + self.interval_s:
                driver = max(driver, d)
                for pid, rss in k.items():
                    kids[pid] = max(kids.get(pid, 0), rss)
        return driver, kids

    def trace(self, a: float, b: float, points: int = 5) -> list[tuple[float, float]]:
        """Driver and largest-worker RSS (MB) at evenly spaced moments of [a, b]: flat or climbing."""
        inside = [(t, d, max(k.values(), default=0)) for t, d, k in self.samples if a <= t <= b]
        if not inside:
            return []
        picks = [inside[round(i * (len(inside) - 1) / (points - 1))] for i in range(points)]
        return [(d / 1e6, w / 1e6) for _, d, w in picks]


@dataclass
class Stage:
    """One timed stage of a run."""

    run: str
    name: str
    start: float
    end: float = 0.0
    tasks: int = 0


@dataclass
class Recorder:
    """The stages of the runs as they happen, and the Dask tasks each one ran."""

    stages: list[Stage] = field(default_factory=list)
    run: str = ""
    _tasks: list[int] = field(default_factory=lambda: [0])

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        st = Stage(self.run, name, time.perf_counter())
        before = self._tasks[0]
        try:
            yield
        finally:
            st.end = time.perf_counter()
            st.tasks = self._tasks[0] - before
            self.stages.append(st)

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self.stage(name):
                return fn(*args, **kwargs)

        return wrapper

    def client_factory(self, dask_client: Callable[..., Any]) -> Callable[..., Any]:
        """`ichdata.cluster.dask_client`, timed as the stage `cluster start`, counting the tasks it runs."""
        rec = self

        @contextlib.contextmanager
        def counted(*args: Any, **kwargs: Any) -> Iterator[Any]:
            from distributed.diagnostics.plugin import SchedulerPlugin

            class Count(SchedulerPlugin):
                def transition(self, key: Any, start: str, finish: str, *a: Any, **kw: Any) -> None:
                    if start == "processing" and finish in ("memory", "erred"):
                        rec._tasks[0] += 1

            with rec.stage("cluster start"):
                cm = dask_client(*args, **kwargs)
                client = cm.__enter__()
                scheduler = getattr(client.cluster, "scheduler", None)
                if scheduler is not None:  # an in-process LocalCluster
                    scheduler.add_plugin(Count(), name="bench-count")
            try:
                yield client
            except BaseException:
                if not cm.__exit__(*sys.exc_info()):
                    raise
            else:
                with rec.stage("cluster stop"):
                    cm.__exit__(None, None, None)

        return counted


@contextlib.contextmanager
def instrumented(rec: Recorder) -> Iterator[None]:
    """Time the stages of `ich convert`, `ich verify` and the flow where they are looked up at run time."""
    import ichdata.convert
    import ichdata.finalize
    import ichdata.verify

    patches = [
        mock.patch.object(ichdata.convert, "scan_source", rec.timed("scan", ichdata.convert.scan_source)),
        mock.patch.object(
            ichdata.convert, "plan_conversion", rec.timed("plan", ichdata.convert.plan_conversion)
        ),
        mock.patch.object(
            ichdata.convert, "convert_shards", rec.timed("shards", ichdata.convert.convert_shards)
        ),
        mock.patch.object(ichdata.finalize, "finalize", rec.timed("finalize", ichdata.finalize.finalize)),
        mock.patch.object(ichdata.verify, "verify_store", rec.timed("verify", ichdata.verify.verify_store)),
    ]
    # Wherever a cluster is started from (the names differ between versions of the driver).
    for module in (ichdata.convert, sys.modules.get("flows.ingest")):
        for name in ("dask_client", "cluster_client"):
            if module is not None and hasattr(module, name):
                patches.append(mock.patch.object(module, name, rec.client_factory(getattr(module, name))))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


@contextlib.contextmanager
def terminal_capture(lines: list[str]) -> Iterator[None]:
    """Send file descriptors 1 and 2 (this process's and the workers' it starts) to a file meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            f.seek(0)
            lines.extend(ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip())


def _cpu_probe_s() -> float:
    """Seconds of a fixed pure-Python loop: how fast the (shared) machine is right now."""
    t = time.perf_counter()
    sum(i * i for i in range(3_000_000))
    return time.perf_counter() - t


def _count_files(path: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(path))


def _dataset_pass(store: Path, rec: Recorder) -> int:
    from ichmodel.data import StudyDataset

    with rec.stage("index"):
        ds = StudyDataset(store)
    n = 0
    with rec.stage("pass"):
        for i in range(len(ds)):
            n += int(ds[i]["images"].shape[0])
    return n


def main(argv: list[str] | None = None) -> int:
    """Run the stages (see the module docstring) and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--studies", type=int, default=2504, help="studies (25,040 gives 752,351 slices, RSNA's size)"
    )
    ap.add_argument("--seed", type=int, default=9)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=WORK, help="work folder (default bench/_work)")
    ap.add_argument(
        "--archive",
        type=Path,
        help="an archive `ich synth` wrote for these --studies, --seed and --image-size (e.g. on tmpfs)",
    )
    ap.add_argument("--skip", nargs="*", default=[], choices=["verify", "rerun", "flow", "dataset"])
    args = ap.parse_args(argv)
    from ichdata.config import ClusterConfig, ConvertConfig
    from ichdata.convert import convert
    from ichdata.store import open_store

    if args.archive is not None:
        if not (args.archive / "stage_2_train.csv").is_file():
            ap.error(f"--archive {args.archive}: no stage_2_train.csv (not an `ich synth` archive)")
        archive, synth_s = args.archive, 0.0
    else:
        archive, synth_s = ensure_archive(args.work, args.studies, args.seed, args.image_size, args.workers)
    run_dir = args.work / "scale" / f"run-s{args.studies}-seed{args.seed}-px{args.image_size}"
    run_dir.mkdir(parents=True, exist_ok=True)
    store, flow_store = run_dir / "store.zarr", run_dir / "flow.zarr"
    labels = archive / "stage_2_train.csv"
    config = ConvertConfig(
        archive, store, labels=labels, overwrite=True, cluster=ClusterConfig(workers=args.workers)
    )
    rec = Recorder()
    sampler = RssSampler()
    sampler.start()
    terminal: dict[str, list[str]] = {}
    runs: dict[str, tuple[float, float]] = {}
    speed: dict[str, float] = {}  # the machine's speed before each run (it is shared and drifts)

    def run(name: str, fn: Callable[[], Any]) -> Any:
        # One process runs every command here; each would be a fresh one for a user. What the earlier
        # runs freed is handed back first, so a later run's driver figure is not theirs.
        from ichdata.cluster import _shed_memory

        _shed_memory()
        speed[name] = _cpu_probe_s()
        rec.run = name
        terminal[name] = []
        t = time.perf_counter()
        with instrumented(rec), terminal_capture(terminal[name]):
            out = fn()
        runs[name] = (t, time.perf_counter())
        print(f"{name}: {runs[name][1] - t:.1f} s", flush=True)
        return out

    summary = run("convert", lambda: convert(config, progress=False))
    n = summary.n_slices
    store_files = _count_files(store)
    if "verify" not in args.skip:
        import ichdata.verify

        report = run("verify", lambda: ichdata.verify.verify_store(store))
        if not report.ok:
            print(report)
    if "rerun" not in args.skip:
        run(
            "rerun",
            lambda: convert(
                ConvertConfig(archive, store, labels=labels, cluster=ClusterConfig(workers=args.workers)),
                False,
            ),
        )
    stored = open_store(store)
    n_series, shard_size, store_bytes = stored.n_series, stored.shard_size, _du(store)
    if "flow" not in args.skip:
        from flows.demo import prefect_home
        from flows.ingest import ingest

        # One store at a time in the page cache: this VM's disk serves few small random reads, and the
        # flow's verify would read its just-written store back from disk instead of from memory. The
        # loader then reads the flow's store (the same arrays).
        shutil.rmtree(store)

        def flow() -> Any:
            # Replaced, manifest included, as `convert` above: a flow from scratch, not a resumed one.
            with prefect_home(run_dir / "prefect"):
                return ingest(
                    str(archive), str(flow_store), labels=str(labels), workers=args.workers, overwrite=True
                )

        run("flow", flow)
        store = flow_store  # the same store, for the loader
    if "dataset" not in args.skip:
        run("dataset", lambda: _dataset_pass(store, rec))
    sampler.stop()

    rows = []
    for st in rec.stages:
        driver, kids = sampler.peaks(st.start, st.end)
        rows.append(
            {
                "run": st.run,
                "stage": st.name,
                "wall_s": st.end - st.start,
                "us_per_slice": 1e6 * (st.end - st.start) / max(1, n),
                "driver_peak_mb": driver / 1e6,
                "worker_peak_mb": max(kids.values(), default=0) / 1e6,
                "tasks": st.tasks,
            }
        )
    # Memory through the longest stage (the first conversion's shard tasks): does it climb with tasks?
    shards = next(st for st in rec.stages if st.run == "convert" and st.name == "shards")
    shard_trace = sampler.trace(shards.start, shards.end)
    totals = []
    for name, (a, b) in runs.items():
        driver, kids = sampler.peaks(a, b)
        staged = sum(r["wall_s"] for r in rows if r["run"] == name)
        # The rest of the run: imports, Numba's warm-up, the Prefect server, the flow's verify and report.
        rows.append(
            {
                "run": name,
                "stage": "other",
                "wall_s": b - a - staged,
                "us_per_slice": 1e6 * (b - a - staged) / max(1, n),
                "driver_peak_mb": None,
                "worker_peak_mb": None,
                "tasks": 0,
            }
        )
        totals.append(
            {
                "run": name,
                "wall_s": b - a,
                "us_per_slice": 1e6 * (b - a) / max(1, n),
                "driver_peak_mb": driver / 1e6,
                "worker_peak_mb": {str(pid): rss / 1e6 for pid, rss in kids.items()},
                "terminal_lines": len(terminal[name]),
                "terminal_head": terminal[name][:10],
            }
        )
    result = {
        "command": "bench/scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "studies": args.studies,
        "seed": args.seed,
        "image_size": args.image_size,
        "workers": args.workers,
        "n_slices": n,
        "n_series": n_series,
        "n_shards": -(-n // shard_size),
        "store_files": store_files,
        "archive": str(archive),
        "archive_write_s": synth_s,
        "disk": {"archive_bytes": _du(archive), "store_bytes": store_bytes},
        "stages": rows,
        "runs": totals,
        "convert_shards_rss_mb": shard_trace,
        "cpu_probe_s": speed,
    }
    out = args.work / f"scale-{args.studies}-{args.seed}-{args.image_size}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    _print(result)
    print(f"wrote {out}")
    return 0


def _du(path: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _mb(v: float | None) -> str:
    return f"{'':>10}" if v is None else f"{v:10.0f}"


def _print(r: dict[str, Any]) -> None:
    print(
        f"\n{r['n_slices']:,} slices, {r['n_series']:,} series, {r['n_shards']:,} shards, "
        f"{r['store_files']:,} store files; archive {r['disk']['archive_bytes'] / 1e9:.2f} GB, "
        f"store {r['disk']['store_bytes'] / 1e9:.2f} GB"
    )
    print("CPU probe before each run, s: " + ", ".join(f"{k} {v:.3f}" for k, v in r["cpu_probe_s"].items()))
    print(
        f"{'run':9} {'stage':14} {'wall s':>8} {'µs/slice':>9} {'driver MB':>10} {'worker MB':>10} {'tasks':>6}"
    )
    for s in r["stages"]:
        print(
            f"{s['run']:9} {s['stage']:14} {s['wall_s']:8.2f} {s['us_per_slice']:9.1f} "
            f"{_mb(s['driver_peak_mb'])} {_mb(s['worker_peak_mb'])} {s['tasks']:6d}"
        )
    trace = r.get("convert_shards_rss_mb", [])
    if trace:
        print(
            "convert shards, RSS at 0/25/50/75/100 % of the stage: driver "
            + " ".join(f"{d:.0f}" for d, _ in trace)
            + " MB; largest worker "
            + " ".join(f"{w:.0f}" for _, w in trace)
            + " MB"
        )
    for t in r["runs"]:
        w = max(t["worker_peak_mb"].values(), default=0)
        print(
            f"{t['run']:9} {'(whole run)':14} {t['wall_s']:8.2f} {t['us_per_slice']:9.1f} "
            f"{t['driver_peak_mb']:10.0f} {w:10.0f}   terminal lines: {t['terminal_lines']}"
        )
        for line in t["terminal_head"][:3]:
            print(f"    | {line[:150]}")


if __name__ == "__main__":
    sys.exit(main())
