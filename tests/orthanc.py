"""A real Orthanc with its DICOMweb plugin for the test session, reachable from nothing outside it.

Orthanc 1.10 binds every interface whatever its configuration, so `running_orthanc()` starts it in a
network namespace of its own (`unshare --net`, loopback brought up): the namespace has no other
interface, so nothing outside it can reach the server. Every client of the tests (`ich pull`,
`ich predict --send`, the fault proxy, the upload and clean-up snippets) runs inside the same
namespace through `nsenter`. Basic auth with a password made for the session. On exit the server and
everything started in its namespace are stopped, and its files removed. `orthanc_unavailable()` says
why it cannot run here, for a clean skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
PORT = 8042  # inside the namespace: no other server there to collide with
PROXY = Path(__file__).with_name("faulty_proxy.py")
BIN = Path(sys.executable).parent
_COMMANDS = ("unshare", "nsenter", "ip")


def _orthanc_binary() -> str | None:
    return shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/sbin")


def orthanc_unavailable() -> str | None:
    """Why a namespaced Orthanc cannot start here, or None when it can."""
    if _orthanc_binary() is None or not PLUGIN.is_file():
        return "Orthanc and its DICOMweb plugin are not installed (.ci/install-orthanc installs them)"
    missing = [
        c for c in _COMMANDS if shutil.which(c) is None and shutil.which(c, path="/usr/sbin:/sbin") is None
    ]
    if missing:
        return f"{', '.join(missing)} not found (util-linux, iproute2): no network namespace for Orthanc"
    if os.geteuid() != 0:
        return "a network namespace for Orthanc needs root (unshare --net)"
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        return f"unshare --net is not allowed here: {probe.stderr.decode(errors='replace').strip()[:200]}"
    return None


def dciodvfy_unavailable() -> str | None:
    """Why dicom3tools' `dciodvfy` cannot validate here, or None."""
    return (
        None if shutil.which("dciodvfy") else "dciodvfy is not installed (dicom3tools; .ci/install-orthanc)"
    )


@dataclass
class Orthanc:
    """A running Orthanc in its own network namespace.

    Attributes:
        root: Its configuration, storage and logs.
        pid: The server's process (its namespace is `/proc/PID/ns/net`).
        user: The user of the basic auth.
        password: The session's password.
    """

    root: Path
    pid: int
    user: str
    password: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The DICOMweb root, as clients inside the namespace reach it."""
        return f"http://127.0.0.1:{PORT}/dicom-web"

    def command(self, argv: Sequence[str]) -> list[str]:
        """`argv` run inside Orthanc's network namespace."""
        return ["nsenter", f"--net=/proc/{self.pid}/ns/net", "--", *argv]

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a client: the session's credentials, no proxy settings, `extra` on top."""
        env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
        env.update(ICH_DICOMWEB_USER=self.user, ICH_DICOMWEB_PASSWORD=self.password, PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def run(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the namespace (credentials in the environment unless `env` says otherwise)."""
        return subprocess.run(
            self.command(argv),
            env=self.env() if env is None else env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ich(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """`ich ARGS` inside the namespace."""
        return self.run([str(BIN / "ich"), *args], env=env, timeout=timeout)

    def python(self, code: str, *args: str) -> Any:
        """Run a Python snippet inside the namespace; its last stdout line, parsed as JSON."""
        done = self.run([sys.executable, "-c", code, *args], timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"snippet failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def rest(self, method: str, path: str, body: bytes | None = None) -> Any:
        """One call of Orthanc's own REST API (not DICOMweb) from inside the namespace."""
        return self.python(_REST, method, path, body.hex() if body is not None else "")

    def upload(self, files: Sequence[Path]) -> None:
        """Store `files` in Orthanc (its REST API, as a modality's push would)."""
        self.python(_UPLOAD, *map(str, files))

    def clear(self) -> None:
        """Delete every study, so that a test sees only what it uploaded."""
        self.python(_CLEAR)

    @contextlib.contextmanager
    def proxy(self, *args: str) -> Iterator[str]:
        """A `faulty_proxy.py ARGS` in front of Orthanc, inside the namespace; yields its DICOMweb URL."""
        port = 9000 + len(self.procs)
        with open(self.root / f"proxy{port}.log", "wb") as log:
            proc = subprocess.Popen(
                self.command([sys.executable, str(PROXY), str(port), f"http://127.0.0.1:{PORT}", *args]),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        try:
            self.python(_WAIT, f"http://127.0.0.1:{port}/_stats", "")
            yield f"http://127.0.0.1:{port}/dicom-web"
        finally:
            _stop(proc)

    def proxy_stats(self, url: str) -> dict[str, int]:
        """The fault proxy's counts: requests, and each kind of fault it made."""
        base = url.rsplit("/dicom-web", 1)[0]
        return dict(self.python(_GET_JSON, f"{base}/_stats"))


_AUTH = """
import base64, os
AUTH = "Basic " + base64.b64encode(
    f"{os.environ['ICH_DICOMWEB_USER']}:{os.environ['ICH_DICOMWEB_PASSWORD']}".encode()).decode()
"""
_REST = (
    _AUTH
    + f"""
import json, sys, urllib.request
method, path, body = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
req = urllib.request.Request("http://127.0.0.1:{PORT}" + path, data=body or None, method=method,
                             headers={{"Authorization": AUTH}})
with urllib.request.urlopen(req, timeout=60) as r:
    text = r.read().decode() or "null"
print(json.dumps(json.loads(text)))
"""
)
_UPLOAD = (
    _AUTH
    + f"""
import sys, urllib.request
for path in sys.argv[1:]:
    with open(path, "rb") as f:
        req = urllib.request.Request("http://127.0.0.1:{PORT}/instances", data=f.read(), method="POST",
                                     headers={{"Authorization": AUTH, "Content-Type": "application/dicom"}})
    urllib.request.urlopen(req, timeout=60).read()
print(len(sys.argv) - 1)
"""
)
_CLEAR = (
    _AUTH
    + f"""
import json, urllib.request
def call(method, path):
    req = urllib.request.Request("http://127.0.0.1:{PORT}" + path, method=method, headers={{"Authorization": AUTH}})
    with urllib.request.urlopen(req, timeout=60) as r:
        return r.read()
studies = json.loads(call("GET", "/studies"))
for s in studies:
    call("DELETE", "/studies/" + s)
print(len(studies))
"""
)
_WAIT = (
    _AUTH
    + """
import sys, time, urllib.error, urllib.request
url, auth = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
while True:
    try:
        req = urllib.request.Request(url, headers={"Authorization": AUTH} if auth else {})
        urllib.request.urlopen(req, timeout=5).read()
        break
    except (urllib.error.URLError, ConnectionError):
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
print(1)
"""
)
_GET_JSON = """
import sys, urllib.request
print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
"""

_CONFIG = {
    "Name": "ich-tests",
    "HttpServerEnabled": True,
    "HttpPort": PORT,
    "DicomServerEnabled": False,
    "RemoteAccessAllowed": False,
    "AuthenticationEnabled": True,
    "Plugins": [str(PLUGIN)],
    "DicomWeb": {
        "Enable": True,
        "Root": "/dicom-web/",
        "EnableWado": False,
        "StudiesMetadata": "MainDicomTags",
    },
}


def _stop(proc: subprocess.Popen[Any], grace_s: float = 10.0) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`, and reap the process."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


@contextlib.contextmanager
def running_orthanc(timeout: float = 90.0) -> Iterator[Orthanc]:
    """Start Orthanc in a new network namespace; stop it and everything started beside it on exit.

    Raises:
        RuntimeError: It did not answer in `timeout` seconds (the message carries its log).
    """
    root = Path(tempfile.mkdtemp(prefix="ich-orthanc-"))
    user, password = "ich", secrets.token_urlsafe(16)
    config = {**_CONFIG, "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db")}
    config["RegisteredUsers"] = {user: password}
    (root / "orthanc.json").write_text(json.dumps(config))
    (root / "orthanc.json").chmod(0o600)
    binary = _orthanc_binary()
    assert binary is not None
    with open(root / "orthanc.log", "wb") as log:
        # unshare execs sh, which execs Orthanc: one process, whose namespace the clients enter.
        server = subprocess.Popen(
            [
                "unshare",
                "--net",
                "--",
                "sh",
                "-c",
                'ip link set lo up && exec "$0" "$1"',
                binary,
                str(root / "orthanc.json"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    orthanc = Orthanc(root, server.pid, user, password)
    try:
        deadline = time.monotonic() + timeout
        # Until unshare has made the namespace, /proc/PID/ns/net is still ours: nsenter would join the
        # host's network, where nothing answers.
        ours = os.readlink("/proc/self/ns/net")
        while server.poll() is None and os.readlink(f"/proc/{server.pid}/ns/net") == ours:
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --net made no namespace in time")
            time.sleep(0.01)
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({server.returncode}):\n{_tail(root / 'orthanc.log')}")
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                orthanc.python(_WAIT, f"http://127.0.0.1:{PORT}/system", "auth")
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"Orthanc did not answer in {timeout} s:\n{_tail(root / 'orthanc.log')}")
        yield orthanc
    finally:
        for proc in orthanc.procs:
            _stop(proc)
        _stop(server)
        shutil.rmtree(root, ignore_errors=True)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"
