"""Slice order: position along the normal, ties by InstanceNumber (missing last) then image id."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ichdata.order import slice_order, slice_position

AXIAL = (1, 0, 0, 0, 1, 0)
CORONAL = (1, 0, 0, 0, 0, -1)


def test_axial_position_is_z() -> None:
    assert slice_position((-125.0, -110.5, 42.5), AXIAL) == pytest.approx(42.5)


def test_coronal_position_is_y_whatever_z() -> None:
    # normal = cross((1,0,0), (0,0,-1)) = (0, 1, 0)
    assert slice_position((-120.0, 33.0, 80.0), CORONAL) == pytest.approx(33.0)
    assert slice_position((-120.0, 33.0, -80.0), CORONAL) == pytest.approx(33.0)


def test_gantry_tilt_position_is_along_the_tilted_normal() -> None:
    t = math.radians(20)
    orientation = (1, 0, 0, 0, math.cos(t), -math.sin(t))
    normal = np.cross(orientation[:3], orientation[3:])
    # Moving 5 mm along the normal and anywhere in-plane changes the position by exactly 5.
    origin = np.array([-120.0, -100.0, 30.0])
    moved = origin + 5 * normal + 17 * np.array(orientation[:3]) - 9 * np.array(orientation[3:])
    assert slice_position(moved, orientation) - slice_position(origin, orientation) == pytest.approx(5.0)


def test_rounded_cosines_give_millimetres() -> None:
    # Headers round the cosines; the normal is scaled to unit length.
    assert slice_position((0, 0, 10), (1, 0, 0, 0, 0.9999, 0)) == pytest.approx(10.0)


@pytest.mark.parametrize(
    ("position", "orientation", "match"),
    [
        ((0, 0), AXIAL, "3 numbers"),
        ((0, 0, 0), (1, 0, 0, 0, 1), "6 numbers"),
        ((0, 0, 0), (1, 0, 0, 1, 0, 0), "do not span a plane"),
        ((0, 0, 0), (0, 0, 0, 0, 0, 0), "do not span a plane"),
    ],
)
def test_slice_position_rejects_bad_geometry(position: tuple, orientation: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        slice_position(position, orientation)


def test_order_by_position_not_by_instance_number_or_name() -> None:
    positions = [30.0, 10.0, 20.0]
    order = slice_order(positions, [1, 2, 3], ["ID_a", "ID_b", "ID_c"])
    assert order.tolist() == [1, 2, 0]


def test_coronal_series_where_z_is_constant() -> None:
    ipps = [(-120, y, 50.0) for y in (12.0, -3.0, 7.5, 0.0)]
    positions = [slice_position(p, CORONAL) for p in ipps]
    assert slice_order(positions, [None] * 4, ["ID_1", "ID_2", "ID_3", "ID_4"]).tolist() == [1, 3, 2, 0]


def test_ties_by_instance_number_missing_last_then_image_id() -> None:
    positions = [5.0, 5.0, 5.0, 5.0, 5.0, 1.0]
    numbers = [None, 3, None, 2, 3, None]
    ids = ["ID_z", "ID_b", "ID_a", "ID_y", "ID_a", "ID_q"]
    order = slice_order(positions, numbers, ids)
    assert [ids[i] for i in order] == ["ID_q", "ID_y", "ID_a", "ID_b", "ID_a", "ID_z"]
    assert order.tolist() == [5, 3, 4, 1, 2, 0]


def test_empty_series_and_mismatched_lengths() -> None:
    assert slice_order([], [], []).tolist() == []
    with pytest.raises(ValueError, match="one length"):
        slice_order([1.0, 2.0], [None], ["a", "b"])


def _rotation(q: tuple[float, float, float, float]) -> np.ndarray:
    w, x, y, z = np.array(q) / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


_unit = st.floats(-1, 1, allow_nan=False)


@settings(max_examples=150, deadline=None)
@given(
    q=st.tuples(_unit, _unit, _unit, _unit).filter(lambda q: np.linalg.norm(q) > 0.1),
    n=st.integers(1, 40),
    spacing=st.floats(0.5, 10),
    origin=st.tuples(*[st.floats(-300, 300)] * 3),
    in_plane=st.integers(0, 2**32 - 1),
    permutation_seed=st.integers(0, 2**32 - 1),
    with_numbers=st.booleans(),
)
def test_order_recovers_any_oriented_series_whatever_the_file_order(
    q: tuple, n: int, spacing: float, origin: tuple, in_plane: int, permutation_seed: int, with_numbers: bool
) -> None:
    """Any orientation (axial, coronal, tilted, oblique) recovers its order.

    Slices k·spacing along the normal, each shifted arbitrarily in-plane (as a gantry tilt does),
    shuffled, with or without (misleading) InstanceNumber.
    """
    r = _rotation(q)
    row, col = r[:, 0], r[:, 1]
    orientation = (*row, *col)
    normal = np.cross(row, col)
    shifts = np.random.default_rng(in_plane).uniform(-50, 50, (n, 2))
    ipps = [np.array(origin) + k * spacing * normal + a * row + b * col for k, (a, b) in enumerate(shifts)]
    ids = [f"ID_{k:04d}" for k in range(n)]
    numbers = [n - k for k in range(n)] if with_numbers else [None] * n  # reversed: must not matter
    perm = np.random.default_rng(permutation_seed).permutation(n)

    positions = [slice_position(ipps[i], orientation) for i in perm]
    order = slice_order(positions, [numbers[i] for i in perm], [ids[i] for i in perm])
    assert [ids[perm[i]] for i in order] == ids


@settings(max_examples=100, deadline=None)
@given(
    slices=st.lists(
        st.tuples(
            st.sampled_from([0.0, 1.25, 2.5, -7.0]),  # few values: many ties
            st.one_of(st.none(), st.integers(1, 4)),
            st.text("abc", min_size=1, max_size=3),
        ),
        min_size=1,
        max_size=30,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_order_is_invariant_to_input_order(slices: list[tuple], seed: int) -> None:
    def ordered(items: list[tuple]) -> list[tuple]:
        pos, num, ids = zip(*items, strict=True)
        return [items[i] for i in slice_order(list(pos), list(num), list(ids))]

    perm = np.random.default_rng(seed).permutation(len(slices))
    expected = ordered(slices)
    assert ordered([slices[i] for i in perm]) == expected
    keys = [(p, n is None, n or 0, i) for p, n, i in expected]
    assert keys == sorted(keys)
