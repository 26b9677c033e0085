"""The `ich` command line: lazy stages, one-line user errors, and a lean conversion image."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from flows.cli import main

# Runs Python with torch, torchvision, timm and prefect made unimportable, as on a conversion image
# that installed `ich` without extras.
_LEAN = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {"torch", "torchvision", "timm", "prefect"}
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _Block())
    from flows.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # argparse's --help
        code = exc.code
    loaded = sorted(m for m in BLOCKED if m in sys.modules)
    print("LOADED", loaded)
    sys.exit(code)
    """
)


def _lean(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _LEAN, *argv], capture_output=True, text=True, timeout=300, check=False
    )


def test_help_lists_every_stage_without_importing_heavy_stages() -> None:
    result = _lean("--help")
    assert result.returncode == 0, result.stderr
    for command in (
        "synth",
        "preview",
        "convert",
        "verify",
        "quarantine",
        "serve",
        "train",
        "features",
        "evaluate",
        "predict",
        "demo",
    ):
        assert command in result.stdout
    assert "LOADED []" in result.stdout


@pytest.mark.slow
def test_convert_runs_without_torch_or_prefect(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    assert main(["synth", str(archive), "--studies", "2", "--seed", "3", "--image-size", "64"]) == 0
    result = _lean(
        "convert",
        str(archive),
        str(tmp_path / "store.zarr"),
        "--workers",
        "1",
        "--labels",
        str(archive / "stage_2_train.csv"),
    )
    assert result.returncode == 0, result.stderr
    assert "LOADED []" in result.stdout
    import zarr

    images = zarr.open_array(tmp_path / "store.zarr" / "images", mode="r")
    labels = zarr.open_array(tmp_path / "store.zarr" / "labels", mode="r")
    assert images.shape[1:] == (3, 256, 256)
    assert images.shape[0] == labels.shape[0] > 0


def test_user_mistakes_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.dcm"
    assert main(["preview", str(missing), "--out", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: ")
    assert str(missing.name) in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err

    assert main(["convert", str(tmp_path / "no-such-folder"), str(tmp_path / "s.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ich: error: ")
    assert "no-such-folder" in err
    assert len(err.strip().splitlines()) == 1


# `ich convert` paused once its local cluster is up: the worker pids go to the file named by argv[1].
_PAUSED_CONVERT = textwrap.dedent(
    """
    import sys, threading
    import ichdata.convert
    from ichdata.cluster import resolve_client
    from flows.cli import main

    def paused(plan, client, on_shard_done=None, **kwargs):
        started = resolve_client(client)
        pids = started.run(__import__("os").getpid)
        with open(sys.argv[1], "w") as f:
            f.write(" ".join(str(p) for p in pids.values()))
        threading.Event().wait()

    ichdata.convert.convert_shards = paused
    sys.exit(main(sys.argv[2:]))
    """
)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "to_group", "line", "status"),
    [
        (signal.SIGINT, True, "ich: interrupted", 130),  # Ctrl-C: the terminal signals the whole group
        (signal.SIGTERM, False, "ich: terminated", 143),  # kill PID
        (signal.SIGTERM, True, "ich: terminated", 143),  # scancel of the allocation: every process
    ],
)
def test_a_signal_stops_a_conversion_in_one_line_and_closes_its_cluster(
    tmp_path: Path, signum: int, to_group: bool, line: str, status: int
) -> None:
    """Issue 16 item 10: SIGTERM is handled as Ctrl-C, at a known point (the cluster up, no shard written)."""
    archive = tmp_path / "archive"
    assert main(["synth", str(archive), "--studies", "1", "--seed", "3", "--image-size", "64"]) == 0
    ready = tmp_path / "workers"
    proc = subprocess.Popen(
        [sys.executable, "-c", _PAUSED_CONVERT, str(ready), "convert", str(archive), str(tmp_path / "s.zarr"),
         "--workers", "2", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (ready.is_file() and ready.read_text()):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the cluster did not start"
            time.sleep(0.1)
        workers = [int(p) for p in ready.read_text().split()]
        assert len(workers) == 2
        assert all(_alive(p) for p in workers)
        if to_group:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert (proc.returncode, err) == (status, line + "\n"), err
    assert out == ""
    assert not [p for p in workers if _alive(p)]
    assert not (tmp_path / "s.zarr.lock").exists()  # the store's lock is released too


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(SOURCE, STORE): a one-study synthetic archive and its store, converted in this process."""
    from ichdata.config import ConvertConfig
    from ichdata.convert import convert
    from ichdata.testing import write_archive

    root = tmp_path_factory.mktemp("small")
    archive = write_archive(root / "src", studies=1, seed=3, image_size=64)
    store = root / "st.zarr"
    convert(ConvertConfig(archive.path, store, shard_size=8), progress=False, client=None)
    return archive.path, store


def _copy_store(store: Path, dst: Path) -> Path:
    import shutil

    from ichdata.store import manifest_path, quarantine_csv_path, salt_path

    shutil.copytree(store, dst)
    for side in (manifest_path, quarantine_csv_path, salt_path):
        shutil.copy(side(store), side(dst))
    return dst


# (file to damage, relative to the copied store's folder, with its bytes; the commands that must say so)
_DAMAGE = {
    "store metadata": ("st.zarr/zarr.json", b"{not json", ("verify", "quarantine", "train", "convert")),
    "array metadata": (
        "st.zarr/labels/zarr.json",
        b'{"zarr_format": 3, "node_type": "array"}',
        ("verify", "quarantine", "train", "convert"),
    ),
    "images metadata": ("st.zarr/images/zarr.json", b"\xff\xfe", ("verify", "train", "convert")),
    "done-markers metadata": (
        "st.zarr/conversion/shard_done/zarr.json",
        b"[]",
        ("verify", "train", "convert"),
    ),
    "manifest": ("st.zarr.manifest.parquet", b"PAR1 not parquet", ("verify", "quarantine", "convert")),
    "salt": ("st.zarr.salt", b"not hex\n", ("convert",)),
    "short salt": ("st.zarr.salt", b"abcd\n", ("convert",)),
}


@pytest.mark.parametrize("case", list(_DAMAGE))
def test_a_damaged_store_file_is_one_line_naming_it_in_every_command(
    case: str, small_store: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 16 item 12: each of these was a traceback."""
    source, good = small_store
    store = _copy_store(good, tmp_path / "st.zarr")
    rel, data, commands = _DAMAGE[case]
    damaged = tmp_path / rel
    damaged.write_bytes(data)
    argv = {
        "verify": ["verify", str(store)],
        "quarantine": ["quarantine", str(store)],
        "train": ["train", str(store), "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet"],
        "convert": ["convert", str(source), str(store), "--quiet"],
    }
    for command in commands:
        assert main(argv[command]) == 2, command
        captured = capsys.readouterr()
        err = captured.err
        assert err.startswith(f"ich: error: {damaged}: damaged ("), (command, err)
        assert len(err.strip().splitlines()) == 1, (command, err)
        assert "restore it from a backup" in err
        assert data.decode(errors="replace").strip() not in err  # never the file's contents
    assert damaged.read_bytes() == data  # nothing rewrote it


# Runs `ich ARGS` in a fresh interpreter and reports which of the conversion's heavier modules it imported.
_IMPORTS = textwrap.dedent(
    """
    import sys
    from flows.cli import main
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # argparse's --help
        code = exc.code
    heavy = ("pandas", "pyarrow", "zarr", "pydicom", "dask", "distributed", "numba")
    print("IMPORTED", sorted(m for m in heavy if m in sys.modules))
    sys.exit(code)
    """
)


def _imports(*argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", _IMPORTS, *argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    return next(line for line in result.stdout.splitlines() if line.startswith("IMPORTED"))


def test_nested_configs_are_built_from_the_same_flat_flags(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16 item 14: `ConvertConfig.cluster` is a `ClusterConfig`, its own `--help` group; the flags stay."""
    from flows.cli import build_parser
    from flows.cliparse import build_config
    from ichdata.config import ClusterConfig, ConvertConfig
    from ichdata.pull import ArchiveQuery, PullConfig

    argv = [
        "convert",
        "src",
        "st.zarr",
        "--workers",
        "2",
        "--oversubscribe",
        "--shard-size",
        "8",
        "--parents",
    ]
    assert build_config(ConvertConfig, build_parser("convert").parse_args(argv)) == ConvertConfig(
        Path("src"),
        Path("st.zarr"),
        shard_size=8,
        parents=True,
        cluster=ClusterConfig(workers=2, oversubscribe=True),
    )
    argv = [
        "convert",
        "src",
        "st.zarr",
        "--cluster",
        "slurm",
        "--jobs",
        "4",
        "--memory",
        "4GB",
        "--keep-paths",
    ]
    assert build_config(ConvertConfig, build_parser("convert").parse_args(argv)) == ConvertConfig(
        Path("src"),
        Path("st.zarr"),
        keep_paths=True,
        cluster=ClusterConfig(kind="slurm", jobs=4, memory="4GB"),
    )
    argv = ["pull", "https://pacs/dicom-web", "landing", "--study", "1.2", "--study", "1.3", "--retries", "2"]
    assert build_config(PullConfig, build_parser("pull").parse_args(argv)) == PullConfig(
        "https://pacs/dicom-web", Path("landing"), retries=2, query=ArchiveQuery(study=["1.2", "1.3"])
    )
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    shown = capsys.readouterr().out
    group = shown.index("The Dask cluster (local processes, SLURM jobs or an existing scheduler):")
    listed = [shown.index(f"\n  {flag}") for flag in ("--keep-paths", "--workers N", "--walltime TIME")]
    assert listed[0] < group < listed[1] < listed[2]


def test_convert_help_imports_none_of_the_stages_modules() -> None:
    """`ich convert --help` builds its options from `ConvertConfig` alone: none of the stages' libraries."""
    assert _imports("convert", "--help") == "IMPORTED []"


def _stored(store: Path) -> dict[str, object]:
    """Every array's values and every shard file's bytes: what two conversions must agree on."""
    import numpy as np
    import zarr

    group = zarr.open_group(store, mode="r")
    arrays: dict[str, object] = {
        name: (a.dtype, a.shape, np.asarray(a[...]).tobytes())
        for name, a in group.members(max_depth=None)
        if isinstance(a, zarr.Array)
    }
    shards = {
        str(f.relative_to(store)): f.read_bytes()
        for f in sorted((store / "images").rglob("*"))
        if f.is_file() and f.name != "zarr.json"
    }
    return {**arrays, **shards}


def test_a_small_conversion_starts_no_cluster_and_writes_the_same_store(tmp_path: Path) -> None:
    """A few dozen slices are converted in the `ich` process itself: no Dask, no Numba to start.

    The store is the one a cluster of worker processes (what `--workers 1` asks for) writes.
    """
    archive = tmp_path / "archive"
    assert main(["synth", str(archive), "--studies", "2", "--seed", "4", "--image-size", "96"]) == 0
    (archive / "junk.dcm").write_bytes(b"not DICOM")
    labels = ["--labels", str(archive / "stage_2_train.csv"), "--quiet"]
    here, cluster = tmp_path / "here.zarr", tmp_path / "cluster.zarr"
    assert _imports("convert", str(archive), str(here), *labels) == "IMPORTED " + str(
        ["pandas", "pyarrow", "pydicom", "zarr"]
    )
    assert "distributed" in _imports("convert", str(archive), str(cluster), *labels, "--workers", "1")
    assert _stored(here) == _stored(cluster)
    assert (tmp_path / "here.zarr.quarantine.csv").read_bytes() == (
        tmp_path / "cluster.zarr.quarantine.csv"
    ).read_bytes()
