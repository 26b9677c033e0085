"""A real single-node SLURM for the test session: munged, slurmctld and slurmd on this host, no systemd.

`single_node_slurm()` writes a private `slurm.conf` and munge key under a temp dir, starts the three
daemons on free loopback ports, points the client commands at them through `SLURM_CONF`, and on exit
cancels every job and stops every process it started, job processes included. `slurm_unavailable()`
says why it cannot run here (no binaries, not root), for a clean skip.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sinfo", "squeue", "sbatch", "scancel", "srun")
_MUNGE_USER = "munge"


@dataclass(frozen=True)
class Slurm:
    """A running single-node SLURM.

    Attributes:
        conf: The `slurm.conf` the daemons and client commands read (`SLURM_CONF`).
        root: The temp dir holding the configuration, state, spool, logs and munge files.
        node: The node's name (this host's short name).
        cpus: The CPUs SLURM may allocate on the node.
        memory_mb: The memory SLURM may allocate on the node, in MiB.
    """

    conf: Path
    root: Path
    node: str
    cpus: int
    memory_mb: int

    def env(self) -> dict[str, str]:
        """The process environment with the client commands pointed at this SLURM."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def site_settings(self, folder: Path) -> dict[str, object]:
        """The `jobqueue.slurm` settings a site would put in `jobqueue.yaml`, for this SLURM.

        Workers reach the scheduler over loopback; the shared temp and log folders are under `folder`.
        """
        return {
            "jobqueue.slurm.interface": "lo",
            "jobqueue.slurm.shared-temp-directory": str(folder),
            "jobqueue.slurm.log-directory": str(folder / "logs"),
            "jobqueue.slurm.death-timeout": 30,
        }

    def job_ids(self) -> list[str]:
        """The ids of the jobs `squeue` lists (pending, running or completing)."""
        out = _run(["squeue", "--noheader", "--format=%A"], self.env()).stdout
        return out.split()

    def logs(self) -> str:
        """The daemons' logs, for a failure message."""
        parts = []
        for name in ("munged.out", "slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            parts.append(f"--- {name}\n{text[-4000:]}")
        return "\n".join(parts)


def slurm_unavailable() -> str | None:
    """Why a single-node SLURM cannot start here, or None when it can."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not found; .ci/install-slurm installs it)"
    if os.geteuid() != 0:
        return "a single-node SLURM needs root (slurmd runs jobs as their users)"
    try:
        import pwd

        pwd.getpwnam(_MUNGE_USER)
    except KeyError:
        return f"no {_MUNGE_USER!r} user (the munge package creates it)"
    return None


@contextmanager
def single_node_slurm(timeout: float = 60.0) -> Iterator[Slurm]:
    """Start munged, slurmctld and slurmd on this host; stop them and every job process on exit.

    While the block runs, `SLURM_CONF` in this process's environment names the private configuration,
    so `sinfo`, `sbatch`, dask-jobqueue and the jobs themselves talk to this SLURM.

    Args:
        timeout: Seconds to wait for the node to come up idle.

    Yields:
        The running SLURM.

    Raises:
        RuntimeError: The node did not come up idle in time (the message carries the daemons' logs).
    """
    root = Path(tempfile.mkdtemp(prefix="ich-slurm-"))
    procs: list[subprocess.Popen[bytes]] = []
    previous = os.environ.get("SLURM_CONF")
    slurm = _configure(root)
    os.environ["SLURM_CONF"] = str(slurm.conf)
    try:
        procs.append(_start_munged(root))
        env = slurm.env()
        log = root / "log"
        for daemon in ("slurmctld", "slurmd"):
            # -D: stay in the foreground so the process is ours to stop; -c: no state from a past run.
            # A session of its own, so a signal to the test's terminal does not reach it first.
            args = [daemon, "-D", "-f", str(slurm.conf)] + (["-c"] if daemon == "slurmctld" else [])
            with (log / f"{daemon}.out").open("wb") as out:
                procs.append(
                    subprocess.Popen(
                        args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                    )
                )
        _wait_idle(slurm, procs, timeout)
        yield slurm
    finally:
        _teardown(slurm, procs)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        shutil.rmtree(root, ignore_errors=True)


def _configure(root: Path) -> Slurm:
    """Write `slurm.conf` and the munge key under `root`; the node is this host with its CPUs and memory."""
    import pwd

    munge = pwd.getpwnam(_MUNGE_USER)
    # munged (as the munge user) must reach its own dir; it refuses group- or world-writable key dirs.
    root.chmod(0o755)
    for name in ("state", "spool", "log", "run"):
        (root / name).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir()
    # Every user's client commands reach munged's socket here; only munge writes to it.
    munge_dir.chmod(0o755)
    key = munge_dir / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    for path in (munge_dir, key):
        os.chown(path, munge.pw_uid, munge.pw_gid)

    node = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    memory_mb = _real_memory_mb()
    ctld_port, slurmd_port = _free_port(), _free_port()
    conf = root / "slurm.conf"
    lines = [
        "ClusterName=ich-test",
        f"SlurmctldHost={node}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        # The daemons bind to 127.0.0.1 (NodeAddr, SlurmctldHost), not every interface.
        "CommunicationParameters=NoInAddrAny",
        f"SlurmdPort={slurmd_port}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_dir / 'munge.socket'}",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
        "ProctrackType=proctrack/pgid",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "SchedulerType=sched/backfill",
        "MpiDefault=none",
        "SwitchType=switch/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        # Declared CPUs and memory are taken as they are (the host may report threads differently).
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        # A cancelled job's processes get SIGKILL soon after SIGTERM; finished jobs leave squeue soon.
        "KillWait=5",
        "MinJobAge=5",
        "SchedulerParameters=sched_interval=1",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN",
        f"PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE"
        f" DefMemPerCPU={memory_mb // cpus}",
    ]
    conf.write_text("\n".join(lines) + "\n")
    return Slurm(conf=conf, root=root, node=node, cpus=cpus, memory_mb=memory_mb)


def _start_munged(root: Path) -> subprocess.Popen[bytes]:
    """Start munged as the munge user with its socket, key, pid, seed and log under `root/munge`."""
    munge_dir = root / "munge"
    socket_path = munge_dir / "munge.socket"
    args = [
        "munged",
        "--foreground",
        f"--socket={socket_path}",
        f"--key-file={munge_dir / 'munge.key'}",
        f"--pid-file={munge_dir / 'munged.pid'}",
        f"--seed-file={munge_dir / 'munged.seed'}",
        f"--log-file={munge_dir / 'munged.log'}",
    ]
    out_path = root / "log" / "munged.out"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            args, user=_MUNGE_USER, group=_MUNGE_USER, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    deadline = time.monotonic() + 10
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc, 1)
            raise RuntimeError(f"munged did not start: {out_path.read_text(errors='replace').strip()}")
        time.sleep(0.05)
    return proc


def _wait_idle(slurm: Slurm, procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait until `sinfo` reports the node idle; raise with the daemons' logs if it does not."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        dead = [p.args[0] for p in procs if p.poll() is not None]  # type: ignore[index]
        if dead:
            raise RuntimeError(f"{', '.join(map(str, dead))} exited at start\n{slurm.logs()}")
        result = _run(["sinfo", "--noheader", "--nodes", slurm.node, "--format=%T"], slurm.env())
        state = result.stdout.strip()
        if result.returncode == 0 and state == "idle":
            return
        time.sleep(0.25)
    raise RuntimeError(
        f"the SLURM node stayed {state or 'unreachable'!r} for {timeout:.0f} s\n{slurm.logs()}"
    )


def _teardown(slurm: Slurm, procs: list[subprocess.Popen[bytes]]) -> None:
    """Cancel every job, stop the daemons (slurmd ignores SIGTERM during a job step), kill leftovers."""
    env = slurm.env()
    ctld_alive = len(procs) > 1 and procs[1].poll() is None
    if ctld_alive:
        with suppress(subprocess.TimeoutExpired):
            jobs = slurm.job_ids()
            if jobs:
                _run(["scancel", *jobs], env)
            deadline = time.monotonic() + 15
            while slurm.job_ids() and time.monotonic() < deadline:
                time.sleep(0.25)
    for proc in reversed(procs):  # slurmd, slurmctld, munged
        _stop(proc, 5)
    _kill_job_processes(slurm)


def _kill_job_processes(slurm: Slurm) -> None:
    """Kill the process groups of any slurmstepd or job process still holding this SLURM's conf."""
    marker = f"SLURM_CONF={slurm.conf}".encode()
    spool = str(slurm.root).encode()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit() or int(pid_dir.name) == os.getpid():
            continue
        try:
            environ = (pid_dir / "environ").read_bytes()
            cmdline = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        ours = marker in environ.split(b"\0") or (cmdline.startswith(b"slurmstepd") and spool in environ)
        if not ours:
            continue
        pid = int(pid_dir.name)
        with suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(pid)
            if pgid != os.getpgid(0):
                os.killpg(pgid, signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; reap the process."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=30, check=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _real_memory_mb() -> int:
    """The host's memory in MiB, less a margin for the system (slurmd drains a node that has less)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 - 256
    raise RuntimeError("/proc/meminfo has no MemTotal")
