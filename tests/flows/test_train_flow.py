"""The Prefect `train` flow under Prefect's test harness: CNN → features → sequence model on a tiny store."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pandas as pd
import pytest

from ichdata.store import Store, write_store_from_arrays

pytestmark = [pytest.mark.usefixtures("prefect_api"), pytest.mark.slow]

TINY: dict[str, Any] = {
    "backbone": "test_efficientnet",
    "cnn_epochs": 1,
    "epochs": 1,
    "cnn_batch_size": 16,
    "batch_size": 2,
    "max_len": 6,
    "rnn_hidden": 8,
    "rnn_layers": 1,
    "val_fraction": 0.25,
    "device": "cpu",
    "workers": 0,
}


def _tiny_store(path: Path) -> Store:
    """Eight series of random 64² slices, two per patient, random labels."""
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3, 12, 7, 4, 6, 8]
    n = sum(lengths)
    sub = (rng.random((n, 5)) < 0.3).astype(np.uint8)
    series = pd.DataFrame(
        {
            "study_uid": [f"1.2.{i}" for i in range(8)],
            "series_uid": [f"1.2.{i}.1" for i in range(8)],
            "patient_key": [f"ID_p{i // 2}" for i in range(8)],
        }
    )
    return write_store_from_arrays(
        path,
        rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8),
        np.concatenate([sub, sub.max(axis=1, keepdims=True)], axis=1),
        [f"ID_{i:09x}" for i in range(n)],
        np.r_[0, np.cumsum(lengths)],
        series,
        shard_size=8,
    )


def _artifact_keys(flow_run_id: UUID | None) -> set[str | None]:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    assert flow_run_id is not None
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key for a in found}


def test_train_flow_runs_the_three_stages_and_a_rerun_continues(tmp_path: Path) -> None:
    from flows.train import train
    from ichdata.features import open_features
    from ichmodel.models import load_model
    from ichmodel.rundir import read_log

    store = _tiny_store(tmp_path / "store.zarr")
    out = tmp_path / "runs"
    state = train(store=str(store.path), out=str(out), **TINY, return_state=True)
    assert state.is_completed(), state
    result = state.result()
    assert (result.cnn, result.features, result.sequence) == (
        out / "cnn",
        out / "features.zarr",
        out / "xception_gru",
    )
    assert open_features(result.features).n_slices == store.n_slices
    _, info = load_model(out / "xception_gru" / "best.pt")
    assert info["config"]["features"] == str(out / "features.zarr")
    assert info["config"]["split"] == str(out / "cnn" / "split.json")  # the CNN's held-out patients
    assert _artifact_keys(state.state_details.flow_run_id) >= {
        "train-cnn-cnn",
        "train-features-features-zarr",
        "train-sequence-xception-gru",
    }

    # the same parameters again: each stage continues (here: all are done), nothing is trained twice
    again = train(store=str(store.path), out=str(out), **TINY, return_state=True)
    assert again.is_completed(), again
    assert len(read_log(out / "cnn" / "log.csv")) == 1
    assert len(read_log(out / "xception_gru" / "log.csv")) == 1


def test_train_flow_takes_paths_and_no_scheduler() -> None:
    from flows.train import train

    params = inspect.signature(train.fn).parameters
    assert not {"scheduler", "scheduler_file", "cluster"} & set(params)
    state = train(store=" ", out="runs", return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match="parameter store is empty"):
        state.result()


def test_train_flow_paths_lie_under_the_allowed_roots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 16 item 5 for the train flow: served, its store and out must lie under the operator's roots."""
    from flows.train import train

    allowed = tmp_path / "allowed"
    store = _tiny_store(allowed / "s.zarr")
    monkeypatch.setenv("ICH_ALLOWED_ROOTS", str(allowed))
    outside = tmp_path / "outside"
    for params, name in [
        ({"store": str(store.path), "out": str(outside / "runs")}, "out"),
        ({"store": str(allowed / ".." / "elsewhere.zarr"), "out": str(allowed / "runs")}, "store"),
    ]:
        state = train(**params, **TINY, return_state=True)
        assert state.is_failed()
        assert str(state.message).startswith(
            f"Flow run encountered an exception: UserError: parameter {name}: "
        )
    assert not outside.exists()
    assert not (allowed / "runs").exists()
