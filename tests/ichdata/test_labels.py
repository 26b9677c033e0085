"""RSNA label CSVs: both layouts, duplicates, and every error a user can fix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ichdata.errors import UserError
from ichdata.labels import CLASSES, UNLABELLED, LabelError, read_labels

LABELS = {
    "ID_63eb1e259": [0, 0, 0, 0, 0, 0],
    "ID_2669954a7": [0, 1, 0, 1, 0, 1],
    "ID_052e1ab54": [1, 0, 0, 0, 0, 1],
}


def _rows(labels: dict[str, list[int]]) -> list[tuple[str, int]]:
    return [
        (f"{image}_{cls}", v)
        for image, values in labels.items()
        for cls, v in zip(CLASSES, values, strict=True)
    ]


def _write(path: Path, rows: Sequence[tuple[str, object]], header: str = "ID,Label") -> Path:
    path.write_text(header + "\n" + "".join(f"{i},{v}\n" for i, v in rows))
    return path


def test_constants() -> None:
    assert CLASSES == ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any")
    assert UNLABELLED == 255
    assert issubclass(LabelError, UserError)


def test_reads_rsna_layout_into_wide_table(tmp_path: Path) -> None:
    rows = _rows(LABELS)
    rows = rows[6:] + rows[:6]  # rows of one image need not be first
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.permutation(len(rows))]  # nor contiguous
    table = read_labels(_write(tmp_path / "stage_2_train.csv", rows))
    assert list(table.columns) == list(CLASSES)
    assert table.index.name == "image_id"
    assert (table.dtypes == np.uint8).all()
    assert sorted(table.index) == sorted(LABELS)
    for image, values in LABELS.items():
        assert table.loc[image].tolist() == values


def test_images_in_order_of_first_appearance(tmp_path: Path) -> None:
    table = read_labels(_write(tmp_path / "l.csv", _rows(LABELS)))
    assert list(table.index) == list(LABELS)


def test_leading_pandas_index_column(tmp_path: Path) -> None:
    frame = pd.DataFrame(_rows(LABELS), columns=["ID", "Label"])
    path = tmp_path / "with_index.csv"
    frame.to_csv(path)  # writes ",ID,Label" and 0..n-1 first
    assert path.read_text().startswith(",ID,Label\n0,")
    table = read_labels(path)
    assert table.to_numpy().tolist() == list(LABELS.values())


def test_image_ids_with_underscores_keep_them(tmp_path: Path) -> None:
    table = read_labels(_write(tmp_path / "l.csv", _rows({"ID_a_b_c": [1, 1, 1, 1, 1, 1]})))
    assert list(table.index) == ["ID_a_b_c"]


def test_identical_duplicates_are_dropped(tmp_path: Path) -> None:
    rows = _rows(LABELS)
    rows += rows[6:12] + rows[7:8]  # stage 1 repeated whole images
    table = read_labels(_write(tmp_path / "l.csv", rows))
    assert len(table) == 3
    assert table.loc["ID_2669954a7"].tolist() == [0, 1, 0, 1, 0, 1]


def test_conflicting_duplicate_names_both_lines(tmp_path: Path) -> None:
    rows = [*_rows(LABELS), ("ID_2669954a7_subarachnoid", 0)]  # line 11 says 1, line 20 says 0
    with pytest.raises(
        LabelError, match=r"^l\.csv: lines 11 and 20 give one image's subarachnoid label as both 0 and 1$"
    ):
        read_labels(_write(tmp_path / "l.csv", rows))


def test_image_with_fewer_than_six_rows(tmp_path: Path) -> None:
    rows = [r for r in _rows(LABELS) if r[0] not in ("ID_052e1ab54_any", "ID_052e1ab54_subdural")]
    with pytest.raises(
        LabelError, match=r"the image of line 14 has 4 of 6 label rows, missing subdural, any"
    ):
        read_labels(_write(tmp_path / "l.csv", rows))


def test_unknown_subtype_names_the_line(tmp_path: Path) -> None:
    rows = _rows(LABELS)
    rows[8] = ("ID_2669954a7_chronic", 1)
    with pytest.raises(LabelError, match=r"^l\.csv: line 10: the ID does not end in _<subtype>") as info:
        read_labels(_write(tmp_path / "l.csv", rows))
    assert "chronic" not in str(info.value)


@pytest.mark.parametrize("value", ["2", "0.5", "yes", "-1"])
def test_label_must_be_zero_or_one(tmp_path: Path, value: str) -> None:
    rows: list[tuple[str, object]] = list(_rows(LABELS))
    rows[3] = (rows[3][0], value)
    with pytest.raises(LabelError, match=r"^l\.csv: line 5: the Label is not 0 or 1$"):
        read_labels(_write(tmp_path / "l.csv", rows))


def test_float_zero_and_one_are_accepted(tmp_path: Path) -> None:
    rows = [(i, f"{v}.0") for i, v in _rows(LABELS)]
    assert read_labels(_write(tmp_path / "l.csv", rows)).to_numpy().tolist() == list(LABELS.values())


def test_missing_column(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match=r"^l\.csv: line 1 names no column Label \(2 columns\)"):
        read_labels(_write(tmp_path / "l.csv", _rows(LABELS), header="ID,Value"))


def test_missing_file_and_no_rows(tmp_path: Path) -> None:
    with pytest.raises(LabelError, match="does not exist"):
        read_labels(tmp_path / "absent.csv")
    with pytest.raises(LabelError, match="no label rows"):
        read_labels(_write(tmp_path / "l.csv", []))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(LabelError, match=r"^empty\.csv: the file is empty; a CSV with the columns ID,Label"):
        read_labels(tmp_path / "empty.csv")


def test_many_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    values = (rng.random((n, 6)) < 0.1).astype(np.uint8)
    ids = [f"ID_{i:09x}" for i in rng.choice(2**36, n, replace=False)]
    frame = pd.DataFrame(
        {"ID": [f"{i}_{c}" for i in ids for c in CLASSES], "Label": values.reshape(-1)},
    )
    path = tmp_path / "big.csv"
    frame.to_csv(path, index=False)
    table = read_labels(path)
    assert list(table.index) == ids
    assert np.array_equal(table.to_numpy(), values)


# One per way binary garbage reaches a message: through pyarrow's parse error, the column names, an
# ID, a label and an image id, and bytes that are not UTF-8 in the header or the file name.
_GARBAGE = {
    "random.csv": bytes(np.random.default_rng(3).integers(0, 256, 3000, dtype=np.uint8)),
    "header.csv": b"\x1b[31mID,Label\xff\n",  # not UTF-8 in the column names
    "nul.csv": b"\x00\x01\x02\x1b[31mRED\x1b[0m\xff\xfe\n" * 5,
    "id.csv": b"ID,Label\n\x1b[2J\x07ID_x_epidural,1\n",  # an image id with a terminal escape and a bell
    "label.csv": b"ID,Label\nID_x_epidural,\x1b[31m1\n",
    "subtype.csv": b"ID,Label\nID_x_\x9b2J,1\n",  # a C1 control (CSI)
    "conflict.csv": b"ID,Label\nID_\x1b[31m_epidural,0\nID_\x1b[31m_epidural,1\n",
    "name\x1b[31m.csv": b"ID,Label\n",
}


@pytest.mark.parametrize("name", sorted(_GARBAGE))
def test_binary_garbage_gives_a_printable_one_line_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(_GARBAGE[name])
    with pytest.raises(LabelError) as info:
        read_labels(path)
    message = str(info.value)
    assert message.isprintable(), ascii(message)  # no control characters reach the terminal
    assert message.startswith(name.replace("\x1b", "\\x1b") + ": "), message  # names the file


# Issue 16 item 5: `-p labels=/etc/shadow` put the file's first line into the run's state. Whatever a
# file holds, the message names the file, the line and what was expected there: never the line.
_SECRET = "SECRET-4f2a"
_NOT_LABELS = {
    "shadow": f"root:$y$j9T${_SECRET}:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    "passwd.csv": f"root,x,0,0,{_SECRET},/root\n",
    "wide.csv": f"ID,Label\nID_1_epidural,0\nID_1_any,0,{_SECRET}\n",
    "id.csv": f"ID,Label\n{_SECRET}_epidural,0\n{_SECRET},1\n",
    "label.csv": f"ID,Label\nID_1_epidural,{_SECRET}\n",
    "conflict.csv": f"ID,Label\nID_{_SECRET}_epidural,0\nID_{_SECRET}_epidural,1\n",
    "incomplete.csv": f"ID,Label\nID_{_SECRET}_epidural,0\n",
    "latin1.csv": f"ID,Label\nID_{_SECRET}\xe9_epidural,0\n",
}


@pytest.mark.parametrize("name", sorted(_NOT_LABELS))
def test_errors_name_the_line_never_what_it_holds(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(_NOT_LABELS[name].encode("latin-1"))
    with pytest.raises(LabelError) as info:
        read_labels(path)
    message = str(info.value)
    assert message.startswith(f"{name}: "), message
    assert "line" in message, message
    for held in (_SECRET, "root", "daemon", "4f2a"):
        assert held not in message, message
