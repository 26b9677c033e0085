"""`ich synth`: an RSNA-format synthetic head-CT archive, flat `ID_<hex>.dcm` files and the label CSV.

Everything random is drawn in one process first, in a fixed order (patients, studies, ids, header
quirks, the CSV's row order); the studies are then rendered and written by worker processes that
each rebuild the archive's random fields from the same seed. So a seed gives the same bytes for
any number of workers. `SynthConfig` declares the command's options.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

import numpy as np

from ichdata.cluster import usable_cpus
from ichdata.errors import UserError
from ichdata.labels import CLASSES
from ichdata.options import option
from ichdata.testing.dicom_writer import stored_from_hu, write_ct_slice
from ichdata.testing.grid import RandomFields
from ichdata.testing.render import bank_size, render_study
from ichdata.testing.study import Anatomy, Study, draw_anatomy, draw_study, study_labels, without_lesions

__all__ = ["ArchiveKwargs", "ArchiveSummary", "SynthConfig", "write_archive"]

# Header styles seen in RSNA's archive, with the share of series that have each.
_HEADER_STYLES: tuple[tuple[str, float], ...] = (
    ("signed16", 0.45),  # BitsStored 16, signed, intercept -1024
    ("unsigned12", 0.35),  # BitsStored 12, unsigned, intercept -1024 (HU -1024..3071)
    ("rsna12", 0.12),  # BitsStored 12, unsigned, intercept 0 (or 1): RSNA's broken header
    ("unsigned16", 0.08),  # BitsStored 16, unsigned, intercept -1024
)
_STUDIES_PER_PATIENT = ((1, 0.6), (2, 0.3), (3, 0.1))
_RSNA_STUDY_POSITIVE_COVERAGE = 0.35  # mean fraction of slices with blood in a positive study


class ArchiveKwargs(TypedDict):
    """The arguments of `write_archive`, as `SynthConfig.archive_kwargs` gives them."""

    out: Path
    studies: int
    seed: int
    any_prevalence: float
    image_size: int
    workers: int | None


@dataclass(frozen=True)
class SynthConfig:
    """Settings of `ich synth`."""

    out: Path = option(help="folder to write (created)", positional=True)
    studies: int = option(20, help="number of studies (default 20)")
    seed: int = option(0, help="random seed; same seed, same archive")
    prevalence: float = option(
        0.14, help="fraction of slices with any hemorrhage, 0..0.6 (default 0.14, RSNA's)"
    )
    image_size: int = option(512, help="slice rows and columns, 32..1024 (default 512, RSNA's)")
    workers: int | None = option(
        None,
        help="processes writing the studies (default: the usable cores); any number writes the same archive",
        metavar="N",
    )

    def archive_kwargs(self) -> ArchiveKwargs:
        """The arguments of `write_archive` for these settings."""
        return ArchiveKwargs(
            out=self.out,
            studies=self.studies,
            seed=self.seed,
            any_prevalence=self.prevalence,
            image_size=self.image_size,
            workers=self.workers,
        )


@dataclass(frozen=True)
class ArchiveSummary:
    """What `write_archive` wrote."""

    path: Path
    n_studies: int
    n_patients: int
    n_slices: int
    prevalence: dict[str, float]  # fraction of slices labelled positive, per class
    labels_csv: Path
    elapsed_s: float

    def __str__(self) -> str:
        rates = ", ".join(f"{name} {100 * rate:.1f} %" for name, rate in self.prevalence.items())
        speed = self.n_slices / self.elapsed_s if self.elapsed_s > 0 else float("inf")
        return (
            f"wrote {self.n_slices:,} slices ({self.n_studies:,} studies, {self.n_patients:,} patients) to "
            f"{self.path} in {self.elapsed_s:.1f} s ({speed:,.0f} slices/s); {rates}"
        )


@dataclass(frozen=True)
class _SeriesHeader:
    """The DICOM header choices of one series (its quirks)."""

    bits_stored: int
    pixel_representation: int
    intercept: float
    pad_outside_circle: bool  # stored values of -2000 HU outside the reconstruction circle
    orientation: tuple[float, ...]
    positions: tuple[tuple[float, float, float], ...]
    instance_numbers: tuple[int | None, ...]
    window_center: float | list[str] | list[float]
    window_width: float | list[str] | list[float]


@dataclass(frozen=True)
class _Series:
    """One series to write: what it shows, its header and its ids."""

    study: Study
    header: _SeriesHeader
    image_ids: tuple[str, ...]
    study_uid: str
    series_uid: str
    patient_id: str


@dataclass(frozen=True)
class _ArchivePlan:
    """Everything random about an archive, drawn before a file is written."""

    series: tuple[_Series, ...]
    labels: tuple[tuple[str, np.ndarray], ...]  # (image id, its six labels), series by series in slice order
    csv_order: np.ndarray  # the order of `labels` in the label CSV
    n_patients: int


def _unique_ids(rng: np.random.Generator, n: int, digits: int, taken: set[str]) -> list[str]:
    """`n` fresh RSNA-style ids `ID_<digits hex>`, distinct from each other and from `taken`."""
    out: list[str] = []
    while len(out) < n:
        for x in rng.integers(0, 16**digits, n - len(out), dtype=np.int64):
            name = f"ID_{int(x):0{digits}x}"
            if name not in taken:
                taken.add(name)
                out.append(name)
    return out


def _pick_positive(
    rng: np.random.Generator, counts: Sequence[int], n_total: int, prevalence: float
) -> set[int]:
    """Studies to make positive so that their positive slices come closest to `prevalence`.

    Greedy over the studies in random order, each taken if it brings the total nearer the target.
    """
    target = prevalence * n_total
    chosen: set[int] = set()
    total = 0
    for i in rng.permutation(len(counts)):
        if abs(total + counts[i] - target) < abs(total - target):
            chosen.add(int(i))
            total += counts[i]
    return chosen


def _series_header(rng: np.random.Generator, style: str, st: Study) -> _SeriesHeader:
    """The DICOM header choices of one series, drawn per series."""
    pad = False
    if style == "signed16":
        bits, rep, intercept = 16, 1, -1024.0
        pad = bool(rng.random() < 0.5)
    elif style == "unsigned12":
        bits, rep, intercept = 12, 0, -1024.0
    elif style == "rsna12":
        bits, rep, intercept = 12, 0, 1.0 if rng.random() < 0.1 else 0.0
    else:
        bits, rep, intercept = 16, 0, -1024.0
    # Geometry: mostly axial, a few gantry-tilted (without a GantryDetectorTilt tag, as in RSNA).
    x0 = -(st.cols - 1) / 2 * st.spacing
    y0 = -(st.rows - 1) / 2 * st.spacing
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if rng.random() < 0.1:
        a = np.deg2rad(rng.uniform(8.0, 25.0))
        orientation = (1.0, 0.0, 0.0, 0.0, float(np.cos(a)), float(-np.sin(a)))
    numbering = rng.choice(["none", "up", "down"], p=[0.3, 0.55, 0.15])
    n = st.n_slices
    numbers: list[int | None] = [None] * n
    if numbering == "up":
        numbers = list(range(1, n + 1))
    elif numbering == "down":
        numbers = list(range(n, 0, -1))
    style_w = rng.choice(["single", "rsna", "pair"], p=[0.4, 0.4, 0.2])
    center: float | list[str] | list[float] = 40.0
    width: float | list[str] | list[float] = 80.0
    if style_w == "rsna":  # RSNA's GE headers: two equal values with leading zeros
        center, width = ["00036", "00036"], ["00080", "00080"]
    elif style_w == "pair":
        center, width = [40.0, 600.0], [80.0, 2800.0]
    return _SeriesHeader(
        bits_stored=bits,
        pixel_representation=rep,
        intercept=intercept,
        pad_outside_circle=pad,
        orientation=orientation,
        positions=tuple((round(x0, 4), round(y0, 4), round(float(z), 4)) for z in st.z),
        instance_numbers=tuple(numbers),
        window_center=center,
        window_width=width,
    )


def _draw_patients(rng: np.random.Generator, studies: int) -> tuple[list[int], list[Anatomy]]:
    """The patient of each study (studies assigned to patients in order) and each patient's anatomy."""
    patient_of: list[int] = []
    anatomies: list[Anatomy] = []
    while len(patient_of) < studies:
        n = int(rng.choice([x for x, _ in _STUDIES_PER_PATIENT], p=[p for _, p in _STUDIES_PER_PATIENT]))
        anatomies.append(draw_anatomy(rng))
        patient_of.extend([len(anatomies) - 1] * n)
    return patient_of[:studies], anatomies


def _plan_archive(
    rng: np.random.Generator,
    study_seq: np.random.SeedSequence,
    studies: int,
    any_prevalence: float,
    image_size: int,
) -> _ArchivePlan:
    """Draw the whole archive from `rng` (and one stream per study from `study_seq`).

    The draws from `rng` happen in one fixed order; changing it changes every archive a seed gives.
    """
    patient_of, anatomies = _draw_patients(rng, studies)
    ncols = [image_size + image_size // 4 if rng.random() < 0.05 else image_size for _ in range(studies)]
    n_slices = [int(x) for x in rng.integers(20, 41, studies)]
    size = bank_size(image_size, image_size + image_size // 4)
    # Prevalence: above RSNA's, positive studies also get longer runs.
    coverage_mean = max(_RSNA_STUDY_POSITIVE_COVERAGE, 1.25 * any_prevalence)
    study_rngs = [np.random.default_rng(s) for s in study_seq.spawn(studies)]
    plans = []
    for i in range(studies):
        coverage = float(np.clip(rng.uniform(coverage_mean - 0.2, coverage_mean + 0.2), 0.1, 0.95))
        plans.append(
            draw_study(
                study_rngs[i],
                anatomies[patient_of[i]],
                rows=image_size,
                cols=ncols[i],
                n_slices=n_slices[i],
                bank_size=size,
                lesions=None,
                coverage=coverage,
            )
        )
    counts = [int(study_labels(st)[:, -1].sum()) for st in plans]
    positive = _pick_positive(rng, counts, sum(n_slices), any_prevalence)
    plans = [st if i in positive else without_lesions(st) for i, st in enumerate(plans)]

    taken: set[str] = set()
    patient_ids = _unique_ids(rng, len(anatomies), 8, taken)
    study_uids = _unique_ids(rng, studies, 10, taken)
    series_uids = _unique_ids(rng, studies, 10, taken)
    image_ids = [_unique_ids(rng, n, 9, taken) for n in n_slices]
    styles = [
        str(rng.choice([s for s, _ in _HEADER_STYLES], p=[p for _, p in _HEADER_STYLES]))
        for _ in range(studies)
    ]
    headers = [_series_header(rng, styles[i], st) for i, st in enumerate(plans)]
    series = tuple(
        _Series(
            st, headers[i], tuple(image_ids[i]), study_uids[i], series_uids[i], patient_ids[patient_of[i]]
        )
        for i, st in enumerate(plans)
    )
    labels = tuple(
        (image_id, row)
        for s in series
        for image_id, row in zip(s.image_ids, study_labels(s.study), strict=True)
    )
    return _ArchivePlan(
        series=series, labels=labels, csv_order=rng.permutation(len(labels)), n_patients=len(set(patient_of))
    )


def _outside_circle(rows: int, cols: int) -> np.ndarray:
    """Pixels outside the reconstruction circle (the inscribed circle of the image)."""
    i = np.arange(rows)[:, None] - (rows - 1) / 2
    j = np.arange(cols)[None, :] - (cols - 1) / 2
    return np.asarray(i * i + j * j > (min(rows, cols) / 2) ** 2)


def _write_series(out: Path, s: _Series, fields: RandomFields) -> int:
    """Render and write one series' slices; returns how many were written."""
    st, h = s.study, s.header
    pad = _outside_circle(st.rows, st.cols) if h.pad_outside_circle else None
    for k, (hu, _counts, _masks) in enumerate(render_study(st, fields)):
        if pad is not None:
            hu[pad] = -2000.0
        stored = stored_from_hu(
            hu, intercept=h.intercept, bits_stored=h.bits_stored, pixel_representation=h.pixel_representation
        )
        write_ct_slice(
            out / f"{s.image_ids[k]}.dcm",
            stored,
            image_id=s.image_ids[k],
            study_uid=s.study_uid,
            series_uid=s.series_uid,
            patient_id=s.patient_id,
            image_position=h.positions[k],
            image_orientation=h.orientation,
            pixel_spacing=(st.spacing, st.spacing),
            intercept=h.intercept,
            bits_stored=h.bits_stored,
            pixel_representation=h.pixel_representation,
            instance_number=h.instance_numbers[k],
            window_center=h.window_center,
            window_width=h.window_width,
        )
    return st.n_slices


#: The random fields of the archive a worker process writes, made once per process by `_start_worker`.
_worker_fields: RandomFields | None = None


def _start_worker(seed: np.random.SeedSequence, size: int, spacing: float) -> None:
    global _worker_fields
    # Ctrl-C is the parent's to handle: a worker finishes its series instead of printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_fields = RandomFields(np.random.default_rng(seed), size, spacing)


def _write_series_in_worker(out: Path, s: _Series) -> int:
    if _worker_fields is None:
        raise RuntimeError("_start_worker did not run in this process")
    return _write_series(out, s, _worker_fields)


def _write_all_series(
    out: Path, series: Sequence[_Series], fields_seed: np.random.SeedSequence, image_size: int, workers: int
) -> None:
    """Write every series, in this process (`workers` 1) or in `workers` processes."""
    size, spacing = bank_size(image_size, image_size + image_size // 4), 240.0 / image_size
    if workers == 1:
        fields = RandomFields(np.random.default_rng(fields_seed), size, spacing)
        for s in series:
            _write_series(out, s, fields)
        return
    from concurrent.futures import ProcessPoolExecutor

    # forkserver: the caller may run threads (a Prefect flow, a Dask client) that a fork would copy
    # in whatever state they were in.
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("forkserver"),
        initializer=_start_worker,
        initargs=(fields_seed, size, spacing),
    ) as pool:
        chunk = max(1, min(4, len(series) // (4 * workers)))  # a few series: Ctrl-C waits for no more
        try:
            for _ in pool.map(functools.partial(_write_series_in_worker, out), series, chunksize=chunk):
                pass
        except BaseException:
            # A failed series or Ctrl-C: drop the series not started rather than wait for all of them.
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _write_labels_csv(path: Path, plan: _ArchivePlan) -> None:
    """RSNA's `stage_2_train.csv`: `ID,Label`, six rows `<image id>_<class>` per image, images shuffled."""
    lines = ["ID,Label\n"]
    for j in plan.csv_order:
        image_id, row = plan.labels[j]
        lines.extend(f"{image_id}_{name},{int(v)}\n" for name, v in zip(CLASSES, row, strict=True))
    path.write_text("".join(lines), encoding="ascii")


def write_archive(
    out: str | os.PathLike[str],
    *,
    studies: int,
    seed: int,
    any_prevalence: float = 0.14,
    image_size: int = 512,
    workers: int | None = None,
) -> ArchiveSummary:
    """Write an RSNA-format synthetic head-CT archive: flat `ID_<hex>.dcm` files + `stage_2_train.csv`.

    One series per study, 20-40 slices each, 1-3 studies per patient; about `any_prevalence` of the
    slices show blood (RSNA: 0.14), with RSNA's subtype mix. File names are random ids, so their
    order says nothing about slice order. RSNA's header quirks are reproduced per series: 16-bit
    signed or 12/16-bit unsigned pixels, the broken 12-bit header with `(0028,1052) Rescale
    Intercept` 0 (stored values as RSNA shipped them; DESIGN.md's correction recovers HU), padding
    outside the reconstruction circle, multi-valued `(0028,1050) Window Center`, no
    `(0020,0013) Instance Number` (or numbers counting down), `ID_` UIDs and patient ids, a few
    gantry-tilted and non-square series. The same seed gives byte-identical files, whatever
    `workers` (processes writing the studies; None: the usable cores).
    """
    t_start = time.perf_counter()
    out = Path(out)
    if studies < 1:
        raise UserError(f"--studies must be at least 1, got {studies}")
    if not 0.0 <= any_prevalence <= 0.6:
        raise UserError(f"--prevalence must be between 0 and 0.6, got {any_prevalence}")
    if not 32 <= image_size <= 1024:
        raise UserError(f"--image-size must be between 32 and 1024, got {image_size}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; choose a new one")
    out.mkdir(parents=True, exist_ok=True)

    plan_seq, fields_seq, study_seq = np.random.SeedSequence(seed).spawn(3)
    plan = _plan_archive(np.random.default_rng(plan_seq), study_seq, studies, any_prevalence, image_size)
    n_workers = min(workers or usable_cpus(), studies)
    _write_all_series(out, plan.series, fields_seq, image_size, n_workers)
    labels_csv = out / "stage_2_train.csv"
    _write_labels_csv(labels_csv, plan)

    table = np.stack([row for _, row in plan.labels])
    return ArchiveSummary(
        path=out,
        n_studies=studies,
        n_patients=plan.n_patients,
        n_slices=len(plan.labels),
        prevalence={name: float(table[:, c].mean()) for c, name in enumerate(CLASSES)},
        labels_csv=labels_csv,
        elapsed_s=time.perf_counter() - t_start,
    )
