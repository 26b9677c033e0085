"""Synthetic head-CT data for the tests, the benchmarks, `ich synth` and `ich demo`.

- `dicom_writer`: `write_ct_slice` (the project's one DICOM writer), `stored_from_hu`,
  `add_reference_sequence`.
- `study`, `grid` and `render`: a phantom study drawn in millimetres, then rendered into HU.
- `phantom`: `phantom_series`, one series as NumPy arrays with per-slice labels.
- `archive`: `write_archive` (`ich synth`, configured by `SynthConfig`), an RSNA-format archive.
- `hospital`: `write_hospital_studies`, studies as a PACS holds them (valid UIDs, patient names).
"""

from __future__ import annotations

from ichdata.testing.archive import ArchiveKwargs, ArchiveSummary, SynthConfig, write_archive
from ichdata.testing.dicom_writer import add_reference_sequence, stored_from_hu, write_ct_slice
from ichdata.testing.hospital import HospitalStudy, write_hospital_studies
from ichdata.testing.phantom import Phantom, phantom_series
from ichdata.testing.study import SUBTYPES

__all__ = [
    "SUBTYPES",
    "ArchiveKwargs",
    "ArchiveSummary",
    "HospitalStudy",
    "Phantom",
    "SynthConfig",
    "add_reference_sequence",
    "phantom_series",
    "stored_from_hu",
    "write_archive",
    "write_ct_slice",
    "write_hospital_studies",
]
