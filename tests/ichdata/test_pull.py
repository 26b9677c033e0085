"""`ich pull` against a real Orthanc (tests/orthanc.py), and its parts that need no server.

With Orthanc: studies written by our DICOM writer, stored in Orthanc, pulled into a landing folder
(byte for byte, paging followed through a proxy that caps pages) and converted into the same store as
the files themselves; a re-run fetches nothing; a proxy that fails every third request (503, dropped
connection, half a body) costs retries, not studies; a study that keeps failing is named in one line,
is never converted half, and the next run finishes it; each mistake a user can make is one line.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from ichdata import landing
from ichdata.config import ClusterConfig, ConvertConfig
from ichdata.convert import convert
from ichdata.dicomweb import PASSWORD_ENV, TOKEN_ENV, USER_ENV, Retry, Transient, credentials, multipart_parts
from ichdata.errors import UserError
from ichdata.pull import ArchiveQuery, PullConfig, study_date_range
from ichdata.store import manifest_path, open_store
from ichdata.testing import HospitalStudy, write_hospital_studies

# ------------------------------------------------------------------------------- without a server


def test_multipart_parts_yields_whole_parts_only() -> None:
    body = (
        b"--b\r\nContent-Type: application/dicom\r\n\r\nFIRST\r\n"
        b"--b\r\nContent-Type: application/dicom\r\n\r\nSEC\r\n--bOND\r\n--b \r\n\r\nTHIRD\r\n"
        b"--b--\r\n"
    )
    # boundaries split across chunks anywhere; `--bOND` is content; the third part has no header fields
    for size in (1, 3, 7, len(body)):
        chunks = [body[i : i + size] for i in range(0, len(body), size)]
        assert list(multipart_parts(chunks, b"b")) == [b"FIRST", b"SEC\r\n--bOND", b"THIRD"]
    cut = body[: body.index(b"SEC") + 2]  # the connection dropped inside the second part
    got: list[bytes] = []
    with pytest.raises(Transient, match="ended before its last part"):
        got.extend(multipart_parts([cut], b"b"))
    assert got == [b"FIRST"]


def test_landing_refuses_uids_that_are_paths_and_publishes_whole_studies(tmp_path: Path) -> None:
    for bad in ("..", "../x", ".hidden", "a/b", "", "1" * 65):
        with pytest.raises(ValueError, match="is not a UID"):
            landing.check_uid(bad, "SOP Instance UID")
    landing.write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.1", b"one")
    assert not (tmp_path / "1.2").exists()  # still incoming
    assert not landing.publish(tmp_path, "1.2", ["1.2.3.1", "1.2.3.2"])
    assert not (tmp_path / "1.2").exists()
    landing.write_instance(tmp_path, "1.2", "1.2.3", "1.2.3.2", b"two")
    assert landing.publish(tmp_path, "1.2", ["1.2.3.1", "1.2.3.2"])
    assert sorted(p.name for p in (tmp_path / "1.2" / "1.2.3").iterdir()) == ["1.2.3.1.dcm", "1.2.3.2.dcm"]
    assert not (landing.incoming_dir(tmp_path) / "1.2").exists()
    assert landing.held_instances(tmp_path, "1.2") == {"1.2.3.1", "1.2.3.2"}


def test_study_dates_and_options_are_checked(tmp_path: Path) -> None:
    assert study_date_range("20240101-20240131") == "20240101-20240131"
    assert study_date_range("-20240131") == "-20240131"
    for bad in ("2024-01-01", "20241301", "-", "20240101-2024"):
        with pytest.raises(UserError, match="--study-date"):
            study_date_range(bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        PullConfig("http://x/dicom-web", tmp_path / "file").check()
    with pytest.raises(UserError, match="--limit 0"):
        PullConfig("http://x/dicom-web", tmp_path, query=ArchiveQuery(limit=0)).check()


def test_credentials_come_from_the_environment_or_netrc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in (TOKEN_ENV, USER_ENV, PASSWORD_ENV):
        monkeypatch.delenv(name, raising=False)
    netrc = tmp_path / "netrc"
    netrc.write_text("machine pacs.example login alice password wonder\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    auth, where = credentials("https://pacs.example/dicom-web")
    assert auth == ("alice", "wonder")
    assert where == f"the {netrc} entry for pacs.example"
    assert "wonder" not in where
    assert credentials("https://other.example/dicom-web") == (None, "a request without credentials")
    monkeypatch.setenv(USER_ENV, "bob")
    with pytest.raises(UserError, match="go together"):
        credentials("https://pacs.example/dicom-web")
    monkeypatch.setenv(PASSWORD_ENV, "builder")
    assert credentials("https://pacs.example/dicom-web")[0] == ("bob", "builder")
    monkeypatch.setenv(TOKEN_ENV, "t0ken")
    auth, where = credentials("https://pacs.example/dicom-web")
    assert where == f"the token in {TOKEN_ENV}"


def test_retry_backs_off_and_gives_up() -> None:
    calls: list[int] = []
    waits: list[float] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise Transient("HTTP 503")
        return "ok"

    assert Retry(attempts=4, first_wait_s=0.5).call(flaky, sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0]
    with pytest.raises(Transient):
        Retry(attempts=3, first_wait_s=1, max_wait_s=1.5).call(
            lambda: flaky() and flaky() and _fail(), sleep=waits.append
        )
    assert waits[2:] == [1, 1.5]


def _fail() -> str:
    raise Transient("HTTP 503")


# ---------------------------------------------------------------------------------- with Orthanc


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by the file's name (SOP Instance UID in a landing folder)."""
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p.name for p in folder.rglob("*") if p.is_file()}


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


@pytest.fixture
def studies(orthanc: Any, tmp_path: Path) -> list[HospitalStudy]:
    """Four studies in an emptied Orthanc (the last JPEG-LS compressed), their files under tmp_path/src."""
    orthanc.clear()
    written = write_hospital_studies(tmp_path / "src", studies=3, slices=5, seed=1, image_size=128)
    written += write_hospital_studies(
        tmp_path / "src" / "jls",
        studies=1,
        slices=4,
        seed=2,
        transfer_syntax="1.2.840.10008.1.2.4.80",
        first_date=20240110,
    )
    orthanc.upload([f for s in written for f in s.files])
    return written


@pytest.mark.slow
def test_pull_gives_the_archives_files_and_the_same_store(
    orthanc: Any,
    studies: list[HospitalStudy],
    tmp_path: Path,
    dask_scheduler: str,
    assert_same_content: Callable[[Path, Path], None],
) -> None:
    land = tmp_path / "landing"
    with orthanc.proxy("--page-cap", "2") as url:  # an archive that answers 2 studies per page
        done = orthanc.ich("pull", url, str(land), "--quiet")
        assert done.returncode == 0, done.stderr
        assert orthanc.proxy_stats(url)["requests"] > 4
    assert "pulled 4 of 4 studies found (0 already complete, 0 failed): 19 instances" in done.stdout
    assert sorted(p.name for p in land.iterdir()) == sorted(
        [landing.INCOMING, *(s.study_uid for s in studies)]
    )
    assert not any(landing.incoming_dir(land).iterdir())
    # the archive's files as they are, compressed ones included
    assert set(_digests(land)) == set(_digests(tmp_path / "src"))

    a, b = tmp_path / "pulled.zarr", tmp_path / "files.zarr"
    convert(
        ConvertConfig(land, a, cluster=ClusterConfig(scheduler=dask_scheduler, insecure_scheduler=True)),
        progress=False,
    )
    convert(
        ConvertConfig(
            tmp_path / "src", b, cluster=ClusterConfig(scheduler=dask_scheduler, insecure_scheduler=True)
        ),
        progress=False,
    )
    assert_same_content(a, b)
    assert open_store(a).n_series == 4

    # the store still holds no patient name, ID or birth date (the landing folder does: the user's data)
    phi = (
        [s.patient_name.encode() for s in studies] + [s.patient_id.encode() for s in studies] + [b"19700101"]
    )
    blobs = [p.read_bytes() for p in a.rglob("*") if p.is_file()] + [manifest_path(a).read_bytes()]
    assert not [m for m in phi for blob in blobs if m in blob]
    group = zarr.open_group(str(a), mode="r")
    texts = [
        str(v)
        for _, member in group.members(max_depth=None)
        if isinstance(member, zarr.Array) and member.dtype.kind in "OTU"
        for v in np.asarray(member[...]).ravel()
    ]
    assert not [t for t in texts for m in phi if m.decode() in t]

    # a re-run fetches nothing and touches nothing
    before = {p: p.stat().st_mtime_ns for p in land.rglob("*")}
    again = orthanc.ich("pull", orthanc.url, str(land), "--quiet")
    assert again.returncode == 0, again.stderr
    assert "pulled 0 of 4 studies found (4 already complete, 0 failed): 0 instances" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in land.rglob("*")} == before


@pytest.mark.slow
def test_filters_select_studies_and_limit_defers_the_rest(
    orthanc: Any, studies: list[HospitalStudy], tmp_path: Path
) -> None:
    land = tmp_path / "landing"
    dated = orthanc.ich("pull", orthanc.url, str(land), "--study-date", "20240102-20240110", "--quiet")
    assert dated.returncode == 0, dated.stderr
    assert sorted(p.name for p in land.iterdir() if p.name != landing.INCOMING) == sorted(
        s.study_uid for s in studies if "20240102" <= s.study_date <= "20240110"
    )
    picked = orthanc.ich(
        "pull",
        orthanc.url,
        str(tmp_path / "two"),
        "--study",
        studies[0].study_uid,
        "--study",
        studies[2].study_uid,
        "--quiet",
    )
    assert picked.returncode == 0, picked.stderr
    assert {p.name for p in (tmp_path / "two").iterdir()} - {landing.INCOMING} == {
        studies[0].study_uid,
        studies[2].study_uid,
    }
    limited = orthanc.ich("pull", orthanc.url, str(tmp_path / "two"), "--limit", "1", "--quiet")
    assert (
        "pulled 1 of 4 studies found (2 already complete, 0 failed, 1 left for a later run (--limit))"
        in limited.stdout
    )
    none_mr = orthanc.ich("pull", orthanc.url, str(tmp_path / "mr"), "--modality", "MR", "--quiet")
    assert "pulled 0 of 0 studies found" in none_mr.stdout


@pytest.mark.slow
def test_failing_requests_are_retried_and_a_study_that_keeps_failing_is_named(
    orthanc: Any, studies: list[HospitalStudy], tmp_path: Path, dask_scheduler: str
) -> None:
    clean = tmp_path / "clean"
    assert orthanc.ich("pull", orthanc.url, str(clean), "--quiet").returncode == 0

    # every third request fails (503, dropped connection, half a body, in turn): retries absorb it
    flaky = tmp_path / "flaky"
    with orthanc.proxy("--every", "3") as url:
        done = orthanc.ich("pull", url, str(flaky), "--connections", "1", "--quiet")
        stats = orthanc.proxy_stats(url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert min(stats["status_503"], stats["dropped"], stats["truncated"]) >= 1, stats
    assert "4 of 4 studies found (0 already complete, 0 failed)" in done.stdout
    assert set(_digests(flaky)) == set(_digests(clean))

    # a study whose retrievals always break off half-way: named in one line, the others kept
    bad = studies[1]
    broken = tmp_path / "broken"
    with orthanc.proxy("--fail-study", bad.study_uid) as url:
        done = orthanc.ich("pull", url, str(broken), "--retries", "2", "--quiet")
    assert done.returncode == 1
    line = _one_line(done)
    assert line.startswith(f"ich pull: 1 of 4 studies failed: {bad.study_uid} (")
    assert "run the same `ich pull` again" in line
    assert not (broken / bad.study_uid).exists()
    held = landing.held_instances(broken, bad.study_uid)
    assert 0 < len(held) < len(bad.sop_uids)  # whole instances of the half-sent answers are kept
    # nothing half-fetched is converted
    store = tmp_path / "broken.zarr"
    convert(
        ConvertConfig(
            broken, store, cluster=ClusterConfig(scheduler=dask_scheduler, insecure_scheduler=True)
        ),
        progress=False,
    )
    assert bad.study_uid not in set(open_store(store).series["study_uid"])
    assert open_store(store).n_series == 3

    # the next run fetches only what is missing, and the landing folder ends as a clean pull's
    again = orthanc.ich("pull", orthanc.url, str(broken), "--quiet")
    assert again.returncode == 0, again.stderr
    assert (
        f"pulled 1 of 4 studies found (3 already complete, 0 failed): {len(bad.sop_uids) - len(held)} instances"
        in again.stdout
    )
    assert set(_digests(broken)) == set(_digests(clean))


@pytest.mark.slow
def test_each_mistake_is_one_line_and_no_secret_is_shown(orthanc: Any, tmp_path: Path) -> None:
    land = str(tmp_path / "landing")
    cases = [
        (
            orthanc.env(**{PASSWORD_ENV: "not-the-password"}),
            orthanc.url,
            "the archive refused the user in ICH_DICOMWEB_USER (HTTP 401",
        ),
        (orthanc.env(), orthanc.url.replace("/dicom-web", ""), "does not answer as a DICOMweb service"),
        (
            orthanc.env(),
            orthanc.url.replace("/dicom-web", "/app"),
            "does not answer as a DICOMweb service (HTTP 404",
        ),
        (
            orthanc.env(),
            "http://127.0.0.1:9/dicom-web",
            "cannot be reached (connection refused) after 2 tries",
        ),
        (orthanc.env(), f"http://ich:{orthanc.password}@127.0.0.1:8042/dicom-web", "holds credentials"),
        (
            {k: v for k, v in orthanc.env().items() if k not in (USER_ENV, PASSWORD_ENV)}
            | {"HOME": str(tmp_path)},
            orthanc.url,
            "refused a request without credentials (HTTP 401",
        ),
    ]
    for env, url, expected in cases:
        done = orthanc.ich("pull", url, land, "--retries", "2", "--quiet", env=env)
        assert done.returncode == 2, (url, done.stdout, done.stderr)
        line = _one_line(done)
        assert line.startswith("ich: error: "), line
        assert expected in line, line
        assert orthanc.password not in done.stdout + done.stderr
        assert "not-the-password" not in done.stdout + done.stderr
    assert not os.path.exists(land)  # nothing was written

    netrc = tmp_path / ".netrc"
    netrc.write_text(f"machine 127.0.0.1 login {orthanc.user} password {orthanc.password}\n")
    netrc.chmod(0o600)
    env = {k: v for k, v in orthanc.env().items() if k not in (USER_ENV, PASSWORD_ENV)} | {
        "HOME": str(tmp_path)
    }
    done = orthanc.ich("pull", orthanc.url, land, "--quiet", env=env)
    assert done.returncode == 0, done.stderr
    assert orthanc.password not in done.stdout + done.stderr
