"""`ich demo --quick` end to end: archive -> Prefect ingest (ephemeral) -> Dask -> two models -> report."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from flows.demo import DemoConfig
from ichdata.errors import UserError


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--quiet", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    for k in range(1, 6):
        assert f"[{k}/5]" in printed  # progress, stage by stage
    assert "demo done in" in printed

    # the store came through the Prefect flow, complete, with every synthetic slice
    from ichdata.store import open_store

    st = open_store(out / "store.zarr")
    demo = json.loads((out / "demo.json").read_text())
    assert demo["config"]["studies"] == 8
    assert st.n_studies == 8
    assert st.n_slices > 8 * 19
    assert not (st.labels == 255).any()
    # Prefect ran against its own home inside DIR (ephemeral mode, nothing in ~/.prefect)
    assert (out / "prefect" / "prefect.db").is_file()

    # both models trained on the same split, and were evaluated on its held-out patients
    s1 = json.loads((out / "runs" / "xception" / "split.json").read_text())
    s2 = json.loads((out / "runs" / "xception_gru" / "split.json").read_text())
    assert s1["val_patients"] == s2["val_patients"]
    assert s1["val_patients"]
    # two-stage: the CNN-GRU trained on the CNN-only run's cached features of every slice
    gru_config = json.loads((out / "runs" / "xception_gru" / "config.json").read_text())
    assert gru_config["features"] == str(out / "features.zarr")
    assert gru_config["backbone"] == "test_resnet"
    assert gru_config["init_backbone"] is None
    assert (gru_config["rnn_hidden"], gru_config["rnn_layers"]) == (64, 1)
    from ichdata.features import open_features

    features = open_features(out / "features.zarr")
    assert features.n_slices == st.n_slices
    assert features.attrs["checkpoints"][0]["path"] == str(out / "runs" / "xception" / "best.pt")
    assert "features" in demo["stages_s"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["runs"]) == ["xception", "xception_gru"]
    assert metrics["same_held_out_patients"] is True
    for name, run in metrics["runs"].items():
        wll = run["metrics"]["weighted_log_loss"]
        assert np.isfinite(wll)
        assert wll > 0
        assert demo["weighted_log_loss"][name] == pytest.approx(wll)
        assert run["held-out patients"] == len(s1["val_patients"])

    report = (out / "report.md").read_text()
    assert report.startswith("# ich demo: CNN-only vs CNN-GRU")
    assert "| Loss |" in report
    assert "| model | xception | xception_gru |" in report
    assert (
        "| trained | end to end on images | two-stage: sequence model on cached in-sample features" in report
    )
    assert "](roc.png)" in report
    import matplotlib.image as mpimg

    assert mpimg.imread(out / "roc.png").shape[1] > 400

    # a folder that ich demo did not make is refused before anything is written into it
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious\n")
    assert main(["demo", "--out", str(foreign), "--quick"]) == 2
    assert "was not made by `ich demo`" in capsys.readouterr().err
    assert (foreign / "thesis.tex").read_text() == "precious\n"


def test_demo_config_takes_the_quick_sizes_only_where_none_was_given() -> None:
    full, quick = DemoConfig(), DemoConfig(quick=True)
    assert (full.studies, full.epochs, full.image_size) == (60, 4, 256)
    assert (quick.studies, quick.epochs, quick.image_size) == (8, 1, 128)
    assert DemoConfig(quick=True, studies=12).studies == 12
    assert DemoConfig(epochs=2).epochs == 2


def test_demo_prefect_server_gets_the_start_up_time_a_busy_machine_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from flows.demo import prefect_home as demo_prefect_home

    waited: list[float] = []

    def start(self: SubprocessASGIServer, timeout: int | None = None) -> None:
        # What Prefect's own start() would wait for, in this process and in the environment a
        # subprocess (or Prefect's ephemeral mode started by a flow) sees.
        waited.append(timeout or PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        waited.append(float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "0")))
        waited.append(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())

    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    with demo_prefect_home(tmp_path / "prefect"):
        pass
    assert len(waited) == 3
    assert min(waited) >= 120


def test_demo_prefect_server_that_never_answers_is_one_line_saying_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.server.api.server import SubprocessASGIServer

    from flows.demo import prefect_home as demo_prefect_home

    def start(self: SubprocessASGIServer, timeout: int | None = None) -> None:
        raise RuntimeError(
            "Timed out while attempting to connect to ephemeral Prefect API server. stdout: None stderr: None"
        )

    stopped: list[bool] = []
    real_stop = SubprocessASGIServer.stop

    def stop(self: SubprocessASGIServer) -> None:
        stopped.append(True)
        real_stop(self)

    monkeypatch.setattr(SubprocessASGIServer, "start", start)
    monkeypatch.setattr(SubprocessASGIServer, "stop", stop)
    env_before = dict(os.environ)
    block = demo_prefect_home(tmp_path / "prefect")
    with pytest.raises(UserError) as info:
        block.__enter__()
    message = str(info.value)
    assert "\n" not in message
    assert "temporary Prefect server did not answer within 120 s" in message
    assert "try `ich demo` again" in message
    assert stopped == [True]  # no server process left behind
    assert dict(os.environ) == env_before
