"""``assert_tables_close`` (conftest), the comparison of two runs' results across executors and
thread counts: floats within the stated tolerance, everything else exactly; a real difference fails."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from artifacts.columns import tensor_type
from conftest import FLOAT_ATOL, FLOAT_RTOL, assert_tables_close, float_differences


def table(iou=(0.5, 0.25), answer=("red", "two"), heat=None, scores=((0.1, 0.2), (0.3,))):
    heat = np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 7 if heat is None else heat
    kind = tensor_type("float32", (2, 2))
    return pa.table({
        "sam.iou": pa.array(iou, pa.float32()),
        "answer": pa.array(answer),
        "heatmap": pa.ExtensionArray.from_storage(kind, pa.FixedSizeListArray.from_arrays(pa.array(heat.reshape(-1)), 4)),
        "scores": pa.array([list(s) for s in scores], pa.list_(pa.float64())),
    })


def test_rounding_passes_and_is_measured():
    a = table()
    b = table(iou=(0.5 + 4.5e-8, 0.25), heat=np.arange(8, dtype=np.float32).reshape(2, 2, 2) / 7 + np.float32(1e-7),
              scores=((0.1, 0.2 + 1e-12), (0.3,)))
    assert_tables_close(a, b)
    diffs = float_differences(a, b)
    assert set(diffs) == {"sam.iou", "heatmap", "scores"} and 0 < diffs["sam.iou"][0] < 1e-7
    assert float_differences(a, a) == {"sam.iou": (0.0, 0.0), "heatmap": (0.0, 0.0), "scores": (0.0, 0.0)}


@pytest.mark.parametrize("other, message", [
    (dict(iou=(0.5, 0.25 * (1 + 10 * FLOAT_RTOL))), "sam.iou"),               # a float beyond the tolerance
    (dict(iou=(0.5, 1e-5)), "sam.iou"),
    (dict(heat=np.zeros((2, 2, 2), np.float32)), "heatmap"),                  # inside a tensor column
    (dict(scores=((0.1, 0.2), (0.3 + 10 * FLOAT_ATOL + 1e-4,))), "scores"),   # inside a list column
    (dict(scores=((0.1, 0.2), (0.3, 0.4))), "scores: list lengths differ"),
    (dict(answer=("red", "three")), "answer: values differ"),                # a non-float column: exactly
    (dict(answer=("red", None)), "answer: nulls differ"),
    (dict(iou=(0.5, float("nan"))), "sam.iou"),
])
def test_a_real_difference_fails(other, message):
    with pytest.raises(AssertionError, match=message):
        assert_tables_close(table(), table(**other))


def test_schemas_and_row_counts_must_match():
    a = table()
    with pytest.raises(AssertionError, match="schemas differ"):
        assert_tables_close(a, a.rename_columns(["iou", "answer", "heatmap", "scores"]))
    with pytest.raises(AssertionError, match="schemas differ"):
        assert_tables_close(a, a.set_column(0, "sam.iou", pa.array([0.5, 0.25], pa.float64())))
    with pytest.raises(AssertionError, match="rows"):
        assert_tables_close(a, a.slice(0, 1))
