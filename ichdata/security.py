"""Who may talk to our Dask clusters: TLS credentials made for a run, and those of an existing scheduler.

A Dask client runs what its scheduler sends it (results arrive pickled), and a worker runs what any
client submits: every cluster ich starts (`ichdata.cluster`'s local one, `ichdata.slurm`'s jobs)
speaks TLS with credentials made for the run (`run_security`, DESIGN.md's Trust section), and an
existing scheduler is reached only over TLS with the site's credentials (`existing_security`) unless
the user passes `--insecure-scheduler`. Nothing from distributed is imported until credentials are made.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ichdata.errors import UserError

if TYPE_CHECKING:
    from distributed.security import Security

#: The dask config keys of the site's TLS credentials for a client of an existing scheduler.
_SITE_TLS = ("distributed.comm.tls.ca-file", "distributed.comm.tls.client.cert")


def existing_security(
    scheduler: str | None, scheduler_file: str | os.PathLike[str] | None, *, insecure: bool
) -> Security | None:
    """The credentials for an existing scheduler: the site's TLS ones, or None where `insecure`.

    A Dask client unpickles what its scheduler sends: a scheduler run by someone else runs code as
    the user. So the scheduler must speak TLS (`tls://`) and prove that it holds a certificate of the
    site's authority (the dask config's `distributed.comm.tls.ca-file`), and the client presents the
    site's client certificate (`distributed.comm.tls.client.cert`, `.key`). Checked before any
    connection: a `UserError` names what is missing and the way out.
    """
    if scheduler_file is not None and not Path(scheduler_file).is_file():
        raise UserError(
            f"--scheduler-file {scheduler_file}: no such file; expected the file `dask scheduler` writes"
        )
    if insecure:
        return None
    flag = f"--scheduler {scheduler}" if scheduler else f"--scheduler-file {scheduler_file}"
    address = scheduler if scheduler else _scheduler_file_address(Path(str(scheduler_file)))
    if not address.startswith("tls://"):
        where = "" if scheduler else ": the scheduler it names"
        raise UserError(
            f"{flag}{where} does not speak TLS (tls://HOST:PORT expected); a scheduler we do not "
            "authenticate could run code as you: start it with TLS, or pass --insecure-scheduler"
        )
    import dask
    from distributed.security import Security

    for key in _SITE_TLS:
        value = dask.config.get(key, None)
        if not value:
            raise UserError(
                f"{flag}: no {key} in the dask config; set the site's TLS credentials "
                "(distributed.comm.tls.ca-file, .client.cert, .client.key; or "
                f"DASK_{key.upper().replace('.', '__').replace('-', '_')}), or pass --insecure-scheduler"
            )
        if not Path(str(value)).is_file():
            raise UserError(f"{flag}: {key} {value}: no such file")
    return Security(require_encryption=True)


def _scheduler_file_address(path: Path) -> str:
    """The address in a scheduler file (`dask scheduler --scheduler-file`); its contents stay unshown."""
    import json

    try:
        address = json.loads(path.read_text()).get("address")
    except (OSError, ValueError, AttributeError):
        address = None
    if not isinstance(address, str):
        raise UserError(
            f"--scheduler-file {path}: no scheduler address in it; expected the JSON file `dask scheduler` writes"
        )
    return address


def run_security() -> Security:
    """TLS credentials made for one run: its scheduler, workers and client accept only each other.

    One self-signed certificate, held in memory, is both the authority and every role's certificate
    (DESIGN.md, Trust); a peer that does not present it is refused during the handshake.
    """
    from distributed.security import Security

    return Security.temporary()


def scheduler_http_options() -> dict[str, object]:
    """Scheduler options of our clusters: no dashboard, and its plain HTTP endpoint on a free loopback port.

    Without a dashboard the scheduler still serves HTTP (health, metrics), by default on port 8787 of
    every interface and, when that port is taken (another cluster, a user's Jupyter), elsewhere with
    a UserWarning. A free loopback port from the start says nothing and is reachable from this machine
    only.
    """
    return {"dashboard": False, "dashboard_address": "127.0.0.1:0"}


__all__ = ["existing_security", "run_security", "scheduler_http_options"]
