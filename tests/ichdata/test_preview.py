"""`ich preview`: raw HU and the three windows of one slice, side by side, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread

from flows.cli import main
from ichdata.errors import UserError
from ichdata.preview import PREVIEW_SIZE_PX, write_preview
from ichdata.testing import phantom_series, stored_from_hu, write_ct_slice


def _slice(path: Path, *, cols: int | None = None, **header: Any) -> Path:
    p = phantom_series(1, n_slices=20, image_size=96, cols=cols, lesions=[("subdural", 6, 14)])
    write_ct_slice(
        path,
        stored_from_hu(p.hu[10], **header),
        image_id="ID_012345678",
        study_uid="ID_aaaaaaaaaa",
        series_uid="ID_bbbbbbbbbb",
        patient_id="ID_cccccccc",
        image_position=(0.0, 0.0, 12.5),
        **header,
    )
    return path


@pytest.mark.parametrize(
    ("cols", "header"),
    [(None, {}), (120, {"intercept": 0.0, "bits_stored": 12, "pixel_representation": 0})],
)
def test_preview_writes_a_png_of_the_four_panels(
    tmp_path: Path, cols: int | None, header: dict[str, Any]
) -> None:
    src = _slice(tmp_path / "ID_012345678.dcm", cols=cols, **header)
    out = write_preview(src, tmp_path / "preview.png")
    assert out == tmp_path / "preview.png"
    png = imread(out)
    width, height = PREVIEW_SIZE_PX
    assert png.shape[:2] == (height, width)
    grey = png[..., :3].mean(axis=2)
    # Four panels of head CT across the width: each quarter holds dark (air) and bright (bone) pixels.
    for q in range(4):
        part = grey[height // 5 : -height // 10, q * width // 4 : (q + 1) * width // 4]
        assert part.min() < 0.1
        assert part.max() > 0.9
    assert np.unique((grey * 255).astype(np.uint8)).size > 50


def test_preview_names_the_file_when_it_is_missing_or_not_a_slice(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.dcm: no such file"):
        write_preview(tmp_path / "nope.dcm", tmp_path / "p.png")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a DICOM file")
    with pytest.raises(UserError, match=r"cannot preview notes\.txt: .*\(reason: not_dicom\)"):
        write_preview(junk, tmp_path / "p.png")
    src = _slice(tmp_path / "ID_012345678.dcm")
    with pytest.raises(UserError, match="no such folder"):
        write_preview(src, tmp_path / "missing" / "p.png")
    assert not (tmp_path / "p.png").exists()


def test_cli_preview(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _slice(tmp_path / "ID_012345678.dcm")
    out = tmp_path / "fig1.png"
    assert main(["preview", str(src), "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert imread(out).shape[:2] == (PREVIEW_SIZE_PX[1], PREVIEW_SIZE_PX[0])
    assert main(["preview", str(tmp_path / "missing.dcm"), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"ich: error: {tmp_path / 'missing.dcm'}: no such file\n"
