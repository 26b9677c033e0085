r"""Cells of the CSVs we write made safe to open in a spreadsheet: no formula runs, no line breaks.

UIDs, image ids and file names come from the input files, so a cell may hold `=HYPERLINK(…)` or a
newline. `csv_cell` gives a text cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return
a leading `'` (OWASP's advice against CSV injection: the spreadsheet shows the text, never evaluates
it) and writes control characters as `\xNN`; `safe_table` does so for every text column of a table.
Numbers are left alone (a negative number is not a formula).
"""

from __future__ import annotations

import re

import pandas as pd

__all__ = ["csv_cell", "safe_table"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CONTROL = re.compile("[\x00-\x1f\x7f]")


def csv_cell(value: object) -> object:
    """`value` as a CSV cell that a spreadsheet shows as text; non-strings unchanged."""
    if not isinstance(value, str) or not value:
        return value
    if value.startswith(_FORMULA_START):
        value = "'" + value
    return _CONTROL.sub(_hex, value)


def _hex(m: re.Match[str]) -> str:
    return f"\\x{ord(m.group()):02x}"


def safe_table(table: pd.DataFrame) -> pd.DataFrame:
    """A copy of `table` with every text cell passed through `csv_cell` (for `DataFrame.to_csv`)."""
    out = table.copy()
    for c in out.columns:
        if out[c].dtype == object or pd.api.types.is_string_dtype(out[c]):
            out[c] = out[c].map(csv_cell)
    return out
