"""RSNA label CSVs → one row per image, one uint8 column per class (DESIGN.md's class order).

RSNA's `stage_2_train.csv` has two columns, `ID,Label`, and six rows per image:
`ID_<id>_epidural`, `_intraparenchymal`, `_intraventricular`, `_subarachnoid`, `_subdural`, `_any`.
Copies saved with pandas often carry a leading unnamed index column; both read the same. Identical
duplicate rows (RSNA's stage 1 file has some) are dropped; anything else that would silently change a
label — a duplicate with another value, an image with fewer than six rows, an unknown subtype, a
label other than 0/1, a missing column — is a `LabelError` naming the row or image. Vectorised
throughout (no Python loop per row), for RSNA's millions of rows.

An error names the file, the line and what was expected there, never what the line holds: the path
may come from someone who cannot read the file (a served deployment's `labels` parameter), and the
message travels further than the file does (a Prefect run's state, a terminal).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from ichdata.errors import UserError

__all__ = ["CLASSES", "UNLABELLED", "LabelError", "read_labels"]

CLASSES: tuple[str, ...] = (
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
    "any",
)
UNLABELLED = 255
"""The label value stored for images without a label (e.g. a test set)."""


class LabelError(UserError):
    """A label CSV that cannot be read without guessing: the message names the file and the line(s).

    The message is printable: a file name with binary garbage or terminal escapes is shown escaped, as
    Python's `repr` escapes it, so printing the error never prints raw bytes.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_printable(message))


def _printable(text: str) -> str:
    """`text` with each character that is not printable (a control, a lone surrogate) escaped."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def _more(n: int, noun: str) -> str:
    return f" (and {n:,} more {noun})" if n > 0 else ""


_EXPECTED = "a CSV with the columns ID,Label expected"


def _compression(path: str | os.PathLike[str]) -> str | None:
    """The codec Arrow infers from the file's extension (`gzip` for `.gz`), or None."""
    try:
        return str(pa.Codec.detect("labels" + Path(path).suffix).name)
    except (TypeError, ValueError):  # no compression extension
        return None


def _read_table(path: str | os.PathLike[str], name: str) -> pa.Table:
    """The CSV at `path` (called `name` in errors) as text columns `ID` and `Label`, at least one row."""
    if not os.path.isfile(path):
        raise LabelError(f"label file {os.fspath(path)} does not exist or is not a file")
    try:
        # Opened here, not by Arrow, which refuses a name the locale could not decode (`LC_ALL=C`);
        # a compressed CSV (`.csv.gz`) is still recognised by its extension, as Arrow does.
        with open(path, "rb") as f:
            table = pa_csv.read_csv(
                pa.input_stream(f, compression=_compression(path)),
                convert_options=pa_csv.ConvertOptions(column_types={"ID": pa.string(), "Label": pa.string()}),
            )
    except (pa.ArrowInvalid, UnicodeDecodeError):
        # pyarrow's message quotes the offending row: ours names its line instead.
        raise LabelError(f"{name}: {_unreadable(path)}; {_EXPECTED}") from None
    try:
        columns = table.column_names
    except UnicodeDecodeError:
        raise LabelError(f"{name}: line 1 (the column names) is not UTF-8 text; {_EXPECTED}") from None
    missing = [c for c in ("ID", "Label") if c not in columns]
    if missing:
        raise LabelError(
            f"{name}: line 1 names no column {' or '.join(missing)} ({_count(len(columns), 'column')}); "
            f"{_EXPECTED}"
        )
    if table.num_rows == 0:
        raise LabelError(f"{name}: no label rows")
    return table


def _unreadable(path: str | os.PathLike[str]) -> str:
    """Where and why a file pyarrow cannot parse is not a CSV, without what it holds.

    The first line that is not UTF-8 text, or whose number of fields is not the first line's (a
    second, slow pass in Python: only on the way to an error).
    """
    import csv

    def lines() -> Iterator[str]:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise _NotText(number) from None

    try:
        reader = csv.reader(lines())
        width = None
        for fields in reader:
            if width is None:
                width = len(fields)
            elif fields and len(fields) != width:
                return f"line {reader.line_num:,} has {len(fields)} fields, line 1 has {width}"
        if width is None:
            return "the file is empty"
    except _NotText as e:
        return f"line {e.line:,} is not UTF-8 text"
    except csv.Error:
        return f"line {reader.line_num + 1:,} cannot be read as CSV"
    return "cannot be read as CSV"


class _NotText(Exception):
    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


def read_labels(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read an RSNA label CSV into a table indexed by `image_id`, columns `CLASSES`, dtype uint8.

    Rows are images in the order of their first appearance in the file. Raises `LabelError` for a
    missing file or column, an ID without a known subtype suffix, a label other than 0 or 1,
    conflicting duplicates, or an image with fewer than six label rows.
    """
    name = os.path.basename(os.fspath(path))
    table = _read_table(path, name)
    row_id = pc.utf8_trim_whitespace(table["ID"].combine_chunks())
    label_text = table["Label"].combine_chunks()
    # `<image id>_<subtype>`: the image id may itself contain underscores (`ID_…`), the subtype not.
    # An ID without one gets an empty subtype (an unknown one).
    padded = pc.if_else(pc.match_substring(row_id, "_"), row_id, pc.binary_join_element_wise(row_id, "_", ""))
    split = pc.split_pattern(padded, "_", max_splits=1, reverse=True)
    image_id = pc.list_element(split, 0)
    subtype = pc.list_element(split, 1)
    subtype_code = pc.index_in(subtype, value_set=pa.array(CLASSES)).to_numpy(zero_copy_only=False)
    bad_id = pc.or_kleene(pc.is_null(image_id), pc.equal(image_id, "")).to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(np.isnan(subtype_code.astype(np.float64)) | np.asarray(bad_id, dtype=bool))
    if bad.size:
        i = int(bad[0])
        raise LabelError(
            f"{name}: line {i + 2:,}: the ID does not end in _<subtype>, one of "
            f"{', '.join(CLASSES)}{_more(bad.size - 1, 'rows')}"
        )
    subtype_code = subtype_code.astype(np.int64)

    label_index = pc.index_in(
        pc.utf8_trim_whitespace(label_text), value_set=pa.array(["0", "1", "0.0", "1.0"])
    )
    label_np = label_index.to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.flatnonzero(np.isnan(label_np))
    if bad.size:
        i = int(bad[0])
        raise LabelError(f"{name}: line {i + 2:,}: the Label is not 0 or 1{_more(bad.size - 1, 'rows')}")
    label = label_np.astype(np.int64) % 2

    encoded = pc.dictionary_encode(image_id)
    image_code = encoded.indices.to_numpy(zero_copy_only=False)
    images = encoded.dictionary.to_pylist()
    key = image_code.astype(np.int64) * len(CLASSES) + subtype_code
    # Per (image, class): how many rows, and how many of them say 1. Identical duplicates leave
    # ones ∈ {0, count}; anything in between is a conflict; count 0 is a missing row.
    n_keys = len(images) * len(CLASSES)
    count = np.bincount(key, minlength=n_keys)
    ones = np.bincount(key, weights=label, minlength=n_keys).astype(np.int64)
    conflict = np.flatnonzero((ones > 0) & (ones < count))
    if conflict.size:
        k = int(conflict[0])
        rows = np.flatnonzero(key == k)
        zero, one = (int(rows[np.argmax(label[rows] == v)]) + 2 for v in (0, 1))
        raise LabelError(
            f"{name}: lines {min(zero, one):,} and {max(zero, one):,} give one image's "
            f"{CLASSES[k % len(CLASSES)]} label as both 0 and 1{_more(conflict.size - 1, 'conflicts')}"
        )
    labels = np.where(count == 0, UNLABELLED, ones > 0).astype(np.uint8).reshape(len(images), len(CLASSES))
    incomplete = np.flatnonzero((labels == UNLABELLED).any(axis=1))
    if incomplete.size:
        i = int(incomplete[0])
        absent = [c for c, v in zip(CLASSES, labels[i], strict=True) if v == UNLABELLED]
        first = int(np.argmax(image_code == i)) + 2
        raise LabelError(
            f"{name}: the image of line {first:,} has {len(CLASSES) - len(absent)} of {len(CLASSES)} "
            f"label rows, missing {', '.join(absent)}{_more(incomplete.size - 1, 'incomplete images')}"
        )
    index = pd.Index(images, name="image_id")
    return pd.DataFrame(labels, index=index, columns=list(CLASSES))
