"""flows: the top layer, which drives the other two: the `ich` command line, the Prefect flows, the demo.

`cli` (the `ich` command, built from the stages' config dataclasses by `cliparse`; what it prints goes
through `console`), `ingest` (the
Prefect flow: scan -> plan -> convert -> verify -> report), `deploy` (`ich serve`: the deployment
`ingest/default`; `prefect.yaml` defines the same for a work pool), `demo` (`ich demo`). Importing this
package imports no Prefect: use the flow as `from flows.ingest import ingest`.
"""

from __future__ import annotations

__all__ = ["cli", "cliparse", "console", "demo", "deploy", "ingest"]
