"""Our Dask clusters refuse strangers, and we refuse theirs: issue 11 item 2, issue 16 item 5, DESIGN.md's Trust.

During a real `ich convert` on a local cluster, another process on the machine, without this run's
credentials, can neither connect to the scheduler, a worker or a nanny nor submit a task; everything
the cluster listens on is loopback, and the store is the one the tests' own cluster makes. An existing
scheduler is reached only over TLS with the site's credentials (`--insecure-scheduler` says otherwise).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask
import numpy as np
import psutil
import pytest
import zarr

import ichdata.convert
from flows.cli import main
from ichdata.cluster import OnDemandClient, resolve_client

if TYPE_CHECKING:
    from distributed import Client
    from distributed.security import Security


def _archive(root: Path) -> tuple[Path, Path]:
    """A small synthetic archive (a few studies of 64 × 64 slices) and its label CSV."""
    from ichdata.testing import write_archive

    summary = write_archive(root / "archive", studies=3, seed=31, image_size=64, workers=1)
    return summary.path, summary.labels_csv


def _identity(address: str, security: Security) -> dict[str, Any] | None:
    """The reply of the Dask server at `address` to `identity`, asked with `security`; None when refused."""
    from distributed.comm import connect

    async def ask() -> dict[str, Any]:
        comm = await connect(address, timeout=5, **security.get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})
            return dict(await asyncio.wait_for(comm.read(), 5))
        finally:
            comm.abort()

    try:
        return asyncio.run(ask())
    # ssl.SSLError and distributed's CommClosedError are OSErrors; a RuntimeError is distributed
    # declining to offer TLS credentials to a plain tcp address.
    except (OSError, TimeoutError, RuntimeError):
        return None


def _runs_code(address: str, security: Security | None) -> bool:
    """Whether a client presenting `security` gets a task of its own run by the scheduler at `address`."""
    from distributed import Client

    try:
        with Client(address, security=security, timeout=5, set_as_default=False) as outsider:
            return bool(outsider.submit(os.getpid, pure=False).result(timeout=10) > 0)
    except (OSError, TimeoutError, RuntimeError):  # refused, as `_identity` says
        return False


def _strangers(run: Security) -> dict[str, Security | None]:
    """Peers without this run's credentials, by what they present.

    The run's certificate is no secret (the scheduler shows it to every peer in the handshake): a
    stranger that trusts it but presents its own key proves that the refusal is the cluster's, not a
    client's distrust of the cluster.
    """
    from distributed.security import Security

    own = Security.temporary()
    return {
        "plain tcp": None,
        "its own temporary credentials": own,
        "its own key, trusting the run's certificate": Security(
            require_encryption=True,
            tls_ca_file=run.get_tls_config_for_role("client")["ca_file"],
            tls_client_cert=own.tls_client_cert,
            tls_client_key=own.tls_client_key,
        ),
    }


def _listening(pid: int) -> set[str]:
    """The IP addresses that process `pid` and its children listen on (TCP).

    The suite's own single-node SLURM (tests/slurm.py), when an earlier test started it, is not the
    conversion's: its daemons are left out (slurmctld binds every interface; munge authenticates).
    """
    root = psutil.Process(pid)
    hosts = set()
    for process in [root, *root.children(recursive=True)]:
        if process.name().startswith(("slurmctld", "slurmd", "slurmstepd", "munged")):
            continue
        for conn in process.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                hosts.add(conn.laddr.ip)
    return hosts


def _assert_same_arrays(got: Path, want: Path) -> None:
    """Every array of the two stores, read as plain zarr, holds the same values."""
    want_arrays = dict(zarr.open_group(want, mode="r").arrays())
    got_arrays = dict(zarr.open_group(got, mode="r").arrays())
    assert sorted(got_arrays) == sorted(want_arrays)
    for name, array in want_arrays.items():
        np.testing.assert_array_equal(got_arrays[name][...], array[...], err_msg=name)


def test_a_local_conversion_refuses_strangers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dask_scheduler: str
) -> None:
    source, labels = _archive(tmp_path)
    common = ["--labels", str(labels), "--shard-size", "8", "--quiet"]
    reference = tmp_path / "reference.zarr"
    argv = ["convert", str(source), str(reference), "--scheduler", dask_scheduler, "--insecure-scheduler"]
    assert main([*argv, *common]) == 0

    seen: dict[str, Any] = {}
    real = ichdata.convert.convert_shards

    def probed(
        plan: Any, client: Client | OnDemandClient | None, on_shard_done: Callable[..., None] | None = None
    ) -> Any:
        """`convert_shards`, probing the cluster from outside once its first shard is done."""
        assert client is not None

        def on_done(done: Any) -> None:
            if not seen:
                started = resolve_client(client)  # the cluster is up: a shard was written on it
                assert started is not None
                seen.update(_probe(started))
            if on_shard_done is not None:
                on_shard_done(done)

        return real(plan, client, on_shard_done=on_done)

    monkeypatch.setattr(ichdata.convert, "convert_shards", probed)
    store = tmp_path / "local.zarr"
    assert main(["convert", str(source), str(store), "--workers", "2", *common]) == 0
    assert seen, "the probe ran during the conversion"

    # No stranger is let in anywhere, and no task of a stranger's runs …
    assert seen["strangers"] == {}, seen["strangers"]
    # … while the run's own credentials are let in everywhere (the probe can tell).
    assert all(reply is not None for reply in seen["own"].values()), seen["own"]
    info = seen["info"]
    workers = info["workers"]
    assert len(workers) == 2
    addresses = [info["address"], *workers, *(w["nanny"] for w in workers.values())]
    assert all(a.startswith("tls://127.0.0.1:") for a in addresses), addresses
    assert seen["listening"] == {"127.0.0.1"}
    _assert_same_arrays(store, reference)


def _probe(client: Client) -> dict[str, Any]:
    """What an outsider meets at every address of `client`'s cluster, and where the cluster listens."""
    from distributed.security import Security

    info = client.scheduler_info()
    workers = info["workers"]
    addresses = [info["address"], *workers, *(w["nanny"] for w in workers.values())]
    run = client.security
    let_in = {}
    for who, security in _strangers(run).items():
        # Plain tcp is spoken to the same host and port: what a peer without TLS would try.
        at = (lambda a: a.replace("tls://", "tcp://")) if security is None else (lambda a: a)
        for address in addresses:
            if _identity(at(address), security or Security()) is not None:
                let_in[f"{who} at {at(address)}"] = "identity answered"
        if _runs_code(at(info["address"]), security):
            let_in[f"{who} at the scheduler"] = "its task ran"
    return {
        "info": info,
        "own": {address: _identity(address, run) for address in addresses},
        "strangers": let_in,
        "listening": _listening(os.getpid()),
    }


# ------------------------------------------------ an existing scheduler: TLS with the site's credentials


def _site_credentials(folder: Path) -> tuple[Security, dict[str, str]]:
    """A site's TLS credentials as files (one authority and certificate), and the dask config naming them."""
    from distributed.security import Security

    made = Security.temporary().get_tls_config_for_role("client")
    folder.mkdir()
    for name, pem in (("ca", made["ca_file"]), ("cert", made["cert"]), ("key", made["key"])):
        (folder / f"{name}.pem").write_text(str(pem))
    files = {k: str(folder / f"{k}.pem") for k in ("ca", "cert", "key")}
    security = Security(
        require_encryption=True,
        tls_ca_file=files["ca"],
        **{
            f"tls_{role}_{kind}": files[kind]
            for role in ("client", "scheduler", "worker")
            for kind in ("cert", "key")
        },
    )
    config = {
        "distributed.comm.tls.ca-file": files["ca"],
        "distributed.comm.tls.client.cert": files["cert"],
        "distributed.comm.tls.client.key": files["key"],
    }
    return security, config


@contextlib.contextmanager
def _tls_cluster(security: Security) -> Iterator[str]:
    """An in-process TLS cluster (one worker thread) speaking with `security`; yields its address."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tls://",
        security=security, dashboard_address=None,
        scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"},
    ) as cluster:  # fmt: skip
        yield cluster.scheduler_address


@pytest.mark.parametrize("command", ["convert", "verify"])
@pytest.mark.parametrize("how", ["address", "file"])
def test_a_plain_tcp_scheduler_is_refused_before_any_connection(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stranger: Any, command: str, how: str
) -> None:
    """Issue 16 item 5: a Dask client unpickles what its scheduler sends; one we cannot authenticate is refused."""
    (tmp_path / "src").mkdir()
    address = f"tcp://127.0.0.1:{stranger.port}"
    if how == "file":
        (tmp_path / "s.json").write_text(json.dumps({"address": address, "secret": "SECRET"}))
        named = ["--scheduler-file", str(tmp_path / "s.json")]
    else:
        named = ["--scheduler", address]
    store = tmp_path / "s.zarr"
    argv = ["convert", str(tmp_path / "src"), str(store)] if command == "convert" else ["verify", str(store)]
    assert main([*argv, *named]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ich: error: {' '.join(named)}")
    assert "does not speak TLS" in err
    assert "--insecure-scheduler" in err
    assert "SECRET" not in err
    assert err.count("\n") == 1
    assert stranger.accepted == 0
    assert not store.exists()


def test_a_tls_scheduler_needs_the_sites_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], stranger: Any
) -> None:
    (tmp_path / "src").mkdir()
    unset = {
        "distributed.comm.tls.ca-file": None,
        "distributed.comm.tls.client.cert": None,
        "distributed.comm.tls.client.key": None,
    }
    with dask.config.set(unset):
        argv = ["convert", str(tmp_path / "src"), str(tmp_path / "s.zarr"), "--scheduler"]
        assert main([*argv, f"tls://127.0.0.1:{stranger.port}"]) == 2
    err = capsys.readouterr().err
    assert "no distributed.comm.tls.ca-file in the dask config" in err
    assert err.count("\n") == 1
    assert stranger.accepted == 0


@pytest.mark.slow
def test_an_existing_scheduler_is_reached_over_tls_and_an_impostor_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the site's credentials `ich convert --scheduler tls://…` converts on that cluster.

    A scheduler holding other credentials (an impostor on the same address space) fails the handshake:
    the run stops in one line and not one of its tasks reaches the impostor.
    """
    import ichdata.cluster

    source, labels = _archive(tmp_path)
    site, config = _site_credentials(tmp_path / "site-tls")
    impostor, _ = _site_credentials(tmp_path / "impostor-tls")
    common = ["--labels", str(labels), "--shard-size", "8", "--quiet"]
    reference = tmp_path / "reference.zarr"
    assert main(["convert", str(source), str(reference), "--workers", "1", *common]) == 0
    monkeypatch.setattr(ichdata.cluster, "CONNECT_TIMEOUT", "3s")
    with dask.config.set(config):
        with _tls_cluster(site) as address:
            store = tmp_path / "tls.zarr"
            assert main(["convert", str(source), str(store), "--scheduler", address, *common]) == 0
            assert main(["verify", str(store), "--scheduler", address]) == 0
        _assert_same_arrays(store, reference)
        capsys.readouterr()
        with _tls_cluster(impostor) as address:
            store = tmp_path / "impostor.zarr"
            assert main(["convert", str(source), str(store), "--scheduler", address, *common]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ich: error: --scheduler {address}: cannot connect")
    assert err.count("\n") == 1
