"""What a served deployment's runs may use: the allowed roots, archives and the operator's Dask scheduler.

`flows.deploy.run_roots` and `allowed_path` decide which paths a run may touch, `run_scheduler` which
existing cluster it uses; none of it can be a run's parameter. The end-to-end attack (a real server, a
deployment run naming an attacker's scheduler and files outside the roots) is in `test_serve.py`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flows.deploy import ARCHIVES_ENV, ROOTS_ENV, allowed_archive, allowed_path, run_archives, run_roots
from ichdata.errors import UserError


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """`allowed/` with a store and a link out of it, `outside/` with a file that must stay unread."""
    (tmp_path / "allowed" / "dicom").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "shadow").write_text("root:SECRET:19000::::::\n")
    (tmp_path / "allowed" / "escape").symlink_to(tmp_path / "outside")
    return tmp_path


def test_a_deployment_run_without_roots_may_use_no_path(monkeypatch: pytest.MonkeyPatch, tree: Path) -> None:
    monkeypatch.delenv(ROOTS_ENV, raising=False)
    assert run_roots(as_deployment=False) is None  # a direct call from Python: the caller is trusted
    roots = run_roots(as_deployment=True)
    assert roots == ()
    with pytest.raises(
        UserError, match=r"^parameter source: this deployment may use no folder: the operator"
    ):
        allowed_path("source", str(tree / "allowed" / "dicom"), roots)


def test_roots_come_from_the_environment_when_asked(monkeypatch: pytest.MonkeyPatch, tree: Path) -> None:
    monkeypatch.setenv(ROOTS_ENV, f"{tree / 'allowed'}{os.pathsep}{os.pathsep}{tree / 'allowed' / 'escape'}")
    resolved = tree.resolve()
    assert run_roots(as_deployment=False) == (resolved / "allowed", resolved / "outside")
    monkeypatch.setenv(ROOTS_ENV, "")
    assert run_roots(as_deployment=False) == ()  # set but empty: nothing allowed


@pytest.mark.parametrize(
    ("name", "path", "store"),
    [
        ("labels", "outside/shadow", False),
        ("labels", "allowed/escape/shadow", False),  # a link out of the root
        ("source", "allowed/../outside", False),
        ("store", "allowed", True),  # the root itself: the store's side files would land beside it
        ("store", "allowed/escape/s.zarr", True),
    ],
)
def test_paths_outside_the_roots_are_refused_naming_the_parameter(
    tree: Path, name: str, path: str, store: bool
) -> None:
    roots = (tree.resolve() / "allowed",)
    with pytest.raises(UserError) as info:
        allowed_path(name, str(tree / path), roots, store=store)
    message = str(info.value)
    assert message.startswith(
        f"parameter {name}: {tree / path} is not inside a folder this deployment may use"
    )
    assert "SECRET" not in message


def test_paths_inside_the_roots_are_resolved(tree: Path) -> None:
    roots = (tree.resolve() / "allowed",)
    got = allowed_path("store", str(tree / "allowed" / "dicom" / ".." / "s.zarr"), roots, store=True)
    assert got == tree.resolve() / "allowed" / "s.zarr"
    assert allowed_path("source", str(tree / "allowed"), roots) == roots[0]


def test_a_pull_run_may_fetch_only_from_the_archives_the_operator_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pull run sends the serving user's DICOMweb credentials to its URL: never one a caller picks."""
    monkeypatch.delenv(ARCHIVES_ENV, raising=False)
    assert run_archives(as_deployment=False) is None  # a direct call from Python: the caller is trusted
    with pytest.raises(UserError, match=r"^parameter url: this deployment may pull from no archive: "):
        allowed_archive("url", "https://pacs.example.org/dicom-web", run_archives(as_deployment=True))
    monkeypatch.setenv(ARCHIVES_ENV, "https://PACS.example.org/dicom-web/ http://127.0.0.1:8042/dicom-web")
    archives = run_archives(as_deployment=True)
    assert archives == ("https://pacs.example.org/dicom-web", "http://127.0.0.1:8042/dicom-web")
    for ok in ("https://pacs.example.org/dicom-web", "HTTPS://pacs.example.org/dicom-web/"):
        assert allowed_archive("url", ok, archives) == ok
    for refused in (
        "https://attacker.example.org/dicom-web",
        "https://pacs.example.org/dicom-web-evil",  # a prefix of the path is not the archive
        "https://pacs.example.org/dicom-web/../admin",
        "https://pacs.example.org.attacker.org/dicom-web",
        "https://pacs.example.org/dicom-web?redirect=https://attacker.example.org",
        "http://pacs.example.org/dicom-web",  # the scheme is part of the archive
    ):
        with pytest.raises(UserError, match=r"is not an archive this deployment may pull from; the operator"):
            allowed_archive("url", refused, archives)
