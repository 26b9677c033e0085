"""Prefect orchestration of `ichdata`: the `ingest` flow and its deployments.

- `flows.ingest`: the flow `ingest` (scan → plan → convert → verify → report, one task per stage).
- `flows.deploy`: `serve()`, what `ich serve` runs (deployment `ingest/default`); `prefect.yaml` at the
  repo root defines the same deployment for a process work pool.
- `flows.demo`: `run_demo(DemoConfig(...))`, what `ich demo` runs (synthetic archive → ingest → two
  short trainings → evaluation → report).
- `flows.cli`: the `ich serve` and `ich demo` parsers.

Importing this package imports no Prefect (the `ich` parser imports `flows.cli`): use the flow as
`from flows.ingest import ingest`.
"""

from __future__ import annotations

__all__ = ["cli", "demo", "deploy", "ingest"]
