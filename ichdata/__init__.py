"""ichdata: head-CT DICOM -> HU -> three windows -> a sharded Zarr v3 store, with Dask.

What it offers (imported lazily, so `import ichdata` stays cheap and never pulls in torch or prefect):

- reading: `read_slice`, `read_header`, `read_rendered`, `is_dicom`, `SliceMeta`, `SliceError`, `REASONS`
- windows: `WINDOWS`, `Window`, `window_hu`, `window_stored`
- order: `slice_position`, `slice_order`
- labels: `CLASSES`, `UNLABELLED`, `read_labels`, `LabelError`
- synthetic archives: `write_ct_slice`, `stored_from_hu`, `phantom_series`, `Phantom`, `write_archive`,
  `ArchiveSummary`, `SUBTYPES`
- preview: `write_preview`
- the store: `open_store`, `Store`, `write_store_from_arrays`
- the conversion: `ichdata.convert.convert`, `ConvertConfig`, `ConvertSummary`, `verify_store` (the stages one by one, as
  the Prefect flow runs them: `ichdata.convert.scan_source`, `plan_conversion`, `convert_shards`,
  `finalize`)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        (
            "read_slice",
            "read_header",
            "read_rendered",
            "read_header_layout",
            "read_rendered_layout",
            "is_dicom",
            "SliceMeta",
            "SliceError",
            "REASONS",
        ),
        "ichdata.dicom",
    ),
    **dict.fromkeys(("WINDOWS", "Window", "window_hu", "window_stored"), "ichdata.windows"),
    **dict.fromkeys(("slice_position", "slice_order"), "ichdata.order"),
    **dict.fromkeys(("CLASSES", "UNLABELLED", "read_labels", "LabelError"), "ichdata.labels"),
    **dict.fromkeys(
        (
            "write_ct_slice",
            "stored_from_hu",
            "phantom_series",
            "Phantom",
            "write_archive",
            "ArchiveSummary",
            "SUBTYPES",
        ),
        "ichdata.testing",
    ),
    "write_preview": "ichdata.preview",
    **dict.fromkeys(("open_store", "Store", "write_store_from_arrays"), "ichdata.store"),
    **dict.fromkeys(("ConvertConfig", "ConvertSummary"), "ichdata.convert"),
    "verify_store": "ichdata.verify",
    "UserError": "ichdata.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ichdata' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return [*globals(), *__all__]
