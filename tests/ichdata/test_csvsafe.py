"""CSV cells that a spreadsheet shows as text: no formula runs, no cell spills onto a new line (issue 11 item 16)."""

from __future__ import annotations

import csv

import pandas as pd
import pytest

from ichdata.csvsafe import csv_cell, safe_table
from ichdata.store import write_quarantine_csv


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ('=HYPERLINK("http://evil","x")', '\'=HYPERLINK("http://evil","x")'),  # a formula
        ("+1+2", "'+1+2"),  # also a formula to Excel and LibreOffice
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\\x09x"),  # a leading tab: quoted, then escaped
        ("\r=1", "'\\x0d=1"),
        ("ID_1\n=2", "ID_1\\x0a=2"),  # a newline inside: escaped, so the row stays one line
        ("a\x00b\x1bc\x7f", "a\\x00b\\x1bc\\x7f"),  # other control characters
        ("1.2.840.10008.1", "1.2.840.10008.1"),  # ordinary UIDs, ids and paths are unchanged
        ("axial/f01", "axial/f01"),
        ('"caf\\xe9.dcm"', '"caf\\xe9.dcm"'),  # a quoted non-UTF-8 name (`ichdata.paths`)
        ("", ""),
    ],
)
def test_csv_cell(value: str, cell: str) -> None:
    assert csv_cell(value) == cell


def test_non_text_is_left_alone() -> None:
    assert csv_cell(-3) == -3
    assert csv_cell(None) is None
    t = safe_table(pd.DataFrame({"n": [-1, 2], "s": ["=1", "ok"]}))
    assert t["n"].tolist() == [-1, 2]
    assert t["s"].tolist() == ["'=1", "ok"]


def test_the_quarantine_csv_is_safe_to_open_in_a_spreadsheet(tmp_path) -> None:
    q = pd.DataFrame(
        {
            "path": ['=HYPERLINK("http://evil","x")', "new\nline.dcm", "ok/f01"],
            "reason": ["not_dicom", "not_dicom", "duplicate"],
            "detail": ["no DICOM preamble", "no DICOM preamble", "image id @evil is already stored from -x"],
        }
    )
    out = write_quarantine_csv(tmp_path / "s.zarr", q)
    text = out.read_text(encoding="utf-8")
    assert len(text.splitlines()) == 4  # a header and one line per row
    rows = list(csv.DictReader(text.splitlines()))
    assert [r["path"] for r in rows] == ['\'=HYPERLINK("http://evil","x")', "new\\x0aline.dcm", "ok/f01"]
    assert rows[2]["detail"] == "image id @evil is already stored from -x"  # not at the cell's start
    assert not any(v[:1] in "=+-@" for r in rows for v in r.values())
