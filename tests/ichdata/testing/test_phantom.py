"""The head-CT phantom: `phantom_series`."""

from __future__ import annotations

import numpy as np
import pytest

from ichdata.labels import CLASSES
from ichdata.testing import SUBTYPES, phantom_series


def test_phantom_labels_match_the_blood_drawn_on_each_slice() -> None:
    runs = [
        ("subdural", 8, 20),
        ("intraventricular", 12, 16),
        ("epidural", 7, 11),
        ("intraparenchymal", 10, 18),
        ("subarachnoid", 6, 22),
    ]
    p = phantom_series(3, n_slices=30, image_size=128, lesions=runs, with_masks=True)
    assert p.hu.shape == (30, 128, 128)
    assert p.hu.dtype == np.float32
    assert p.lesion_runs == tuple(runs)
    expected = np.zeros((30, 6), np.uint8)
    for name, first, last in runs:
        expected[first : last + 1, CLASSES.index(name)] = 1
    expected[:, 5] = expected[:, :5].max(axis=1)
    assert np.array_equal(p.labels, expected)
    # Blood is drawn exactly where labelled, and nowhere else.
    assert np.array_equal(p.lesion_pixels > 0, p.labels[:, :5] == 1)
    assert p.masks is not None
    assert np.array_equal((p.masks >= 0.5).sum(axis=(2, 3)), p.lesion_pixels)
    # Lesions are hyperdense blood (50-90 HU) in their middle, fainter at the ends of the run.
    for name, first, last in runs:
        c = SUBTYPES.index(name)
        mid = (first + last) // 2
        core = p.masks[mid, c] >= 0.8
        assert 45 < float(np.median(p.hu[mid][core])) < 95, name
        end_core = p.masks[first, c] >= 0.8
        if end_core.any():
            assert np.median(p.hu[first][end_core]) < np.median(p.hu[mid][core]) - 5, name


def test_phantom_anatomy_has_air_bone_brain_and_csf_in_their_hu_ranges() -> None:
    p = phantom_series(5, n_slices=24, image_size=128, lesions=())
    assert not p.labels.any()
    assert not p.lesion_pixels.any()
    hu = p.hu
    assert abs(float(np.median(hu[:, :4, :4])) + 1000) < 15  # air in the corners
    k = 12  # a mid-head slice: ventricles present
    centre = hu[k, 44:84, 44:84]
    assert 20 < float(np.median(centre)) < 45  # brain
    assert (centre < 15).mean() > 0.03  # CSF in the ventricles
    assert 700 < float(np.percentile(hu[k], 99.5)) < 1600  # the skull
    # The head narrows from the skull base to the vertex.
    head_area = (hu > -500).sum(axis=(1, 2))
    assert head_area[-1] < 0.6 * head_area[8]


def test_phantom_is_deterministic_for_a_seed() -> None:
    a = phantom_series(7, n_slices=6, image_size=64, lesions="random")
    b = phantom_series(7, n_slices=6, image_size=64, lesions="random")
    c = phantom_series(8, n_slices=6, image_size=64, lesions="random")
    assert np.array_equal(a.hu, b.hu)
    assert a.lesion_runs == b.lesion_runs
    assert not np.array_equal(a.hu, c.hu)
    # The anatomy and lesions do not depend on the image size.
    big = phantom_series(7, n_slices=6, image_size=128, lesions="random")
    assert big.lesion_runs == a.lesion_runs
    assert np.array_equal(big.labels, a.labels)
    assert np.array_equal(big.slice_z, a.slice_z)


def test_phantom_random_lesions_form_runs_of_adjacent_slices() -> None:
    for seed in range(8):
        p = phantom_series(seed, n_slices=30, image_size=128)
        assert p.labels[:, 5].any()
        for c in range(6):
            ks = np.flatnonzero(p.labels[:, c])
            if ks.size:
                assert np.array_equal(ks, np.arange(ks[0], ks[-1] + 1)), (seed, c)
        assert np.array_equal(p.lesion_pixels > 0, p.labels[:, :5] == 1)


def test_phantom_rejects_runs_where_the_subtype_cannot_occur() -> None:
    with pytest.raises(
        ValueError, match=r"intraventricular run 0\.\.2 is outside the slices where it can occur"
    ):
        phantom_series(0, n_slices=30, image_size=64, lesions=[("intraventricular", 0, 2)])
    with pytest.raises(ValueError, match="unknown subtype 'any'"):
        phantom_series(0, n_slices=30, image_size=64, lesions=[("any", 10, 12)])
