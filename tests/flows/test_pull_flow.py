"""The Prefect `pull` flow against a real Orthanc: pull → incremental ingest, with its summary artifact.

The flow runs in a subprocess inside Orthanc's network namespace (tests/orthanc.py), in Prefect's
ephemeral mode with a temporary PREFECT_HOME (the session's test API server lives outside the
namespace); the subprocess prints the run's state and artifacts as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from flows.pull import pull_markdown
from ichdata.pull import PullResult
from ichdata.store import open_store
from ichdata.testing import write_hospital_studies

_RUNS = """
import json, sys
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from flows.pull import pull_flow
from ichdata.store import open_store

landing, store = sys.argv[1:3]
out = []
for run in json.loads(sys.argv[3]):  # one process: Prefect's ephemeral server starts once
    state = pull_flow(landing=landing, store=store, workers=1, verify=False, return_state=True, **run)
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    out.append({"state": state.type.value, "message": state.message,
                "artifacts": {a.key: a.data for a in found},
                "study_uids": sorted(set(open_store(store).series["study_uid"]))})
print(json.dumps(out))
"""


def _run_flows(
    orthanc: Any, tmp_path: Path, landing: Path, store: Path, runs: list[dict[str, Any]]
) -> list[Any]:
    """The flow runs of `runs` (their parameters besides landing and store), one after another."""
    env = orthanc.env(
        PREFECT_HOME=str(tmp_path / "prefect"),
        PREFECT_SERVER_ALLOW_EPHEMERAL_MODE="true",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        PREFECT_SERVER_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
    )
    env.pop("PREFECT_API_URL", None)
    done = orthanc.run(
        [sys.executable, "-c", _RUNS, str(landing), str(store), json.dumps(runs)], env=env, timeout=500
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_summary_markdown_counts_and_names_failed_studies(tmp_path: Path) -> None:
    result = PullResult(
        landing=tmp_path, found=5, fetched=2, skipped=2, failed={"1.2.3": "HTTP 503, after 4 tries"}
    )
    md = pull_markdown(result, "https://pacs/dicom-web")
    for row in (
        "| studies found | 5 |",
        "| fetched | 2 |",
        "| skipped (already complete) | 2 |",
        "| failed | 1 |",
    ):
        assert row in md
    assert "| 1.2.3 | HTTP 503, after 4 tries |" in md


@pytest.mark.slow
def test_pull_flow_adds_the_new_studies_to_the_store(orthanc: Any, tmp_path: Path) -> None:
    orthanc.clear()
    studies = write_hospital_studies(tmp_path / "src", studies=4, slices=4, seed=5)
    orthanc.upload([f for s in studies for f in s.files])
    bad = studies[3]
    landing, store = tmp_path / "landing", tmp_path / "ct.zarr"
    with orthanc.proxy("--fail-study", bad.study_uid) as flaky:
        first, second, third = _run_flows(
            orthanc,
            tmp_path,
            landing,
            store,
            [
                {"url": orthanc.url, "study": [studies[0].study_uid, studies[1].study_uid]},  # tonight: two
                {"url": flaky, "retries": 2},  # the next night: the rest, one of which cannot be fetched
                {"url": orthanc.url},  # the night after: the archive answers again
            ],
        )
    assert first["state"] == "COMPLETED", first
    (key,) = [k for k in first["artifacts"] if k.startswith("pull-summary-")]
    summary = first["artifacts"][key]
    for row in (
        "| studies found | 2 |",
        "| fetched | 2 |",
        "| failed | 0 |",
    ):
        assert row in summary
    assert not [s for s in studies if s.patient_name in summary or s.patient_id in summary]
    assert len(first["study_uids"]) == 2

    # a study that cannot be fetched: the others are ingested, the run fails naming it
    assert second["state"] == "FAILED"
    assert bad.study_uid in second["message"]
    summary = second["artifacts"][key]
    for row in (
        "| fetched | 1 |",
        "| skipped (already complete) | 2 |",
        "| failed | 1 |",
        f"| {bad.study_uid} |",
    ):
        assert row in summary
    assert len(second["study_uids"]) == 3
    assert bad.study_uid not in second["study_uids"]

    assert third["state"] == "COMPLETED", third
    assert "| fetched | 1 |" in third["artifacts"][key]
    assert third["study_uids"] == sorted(s.study_uid for s in studies)
    assert open_store(store).n_series == 4
