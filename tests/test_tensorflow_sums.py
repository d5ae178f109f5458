"""The TensorFlow lowering's staged sums (:func:`l2norm.tensorflow._ops.staged_sums`) add
each slice's terms in one fixed order at every batch size.

XLA's CPU reduction with a single output changes its order with the size of the whole
array (above about 2**15 entries it adds in vector lanes), so a sample's sum of squares
or input-gradient inner product changed with the batch at SSD's conv4_3 shape
(8 x 38 x 38 x 512); the conformance invariance shapes are below that size.
"""

from __future__ import annotations

import numpy as np
import pytest

from l2norm.core.spec import Axes
from l2norm.tensorflow._ops import staged_sums, sum_plan  # imports TensorFlow after its preload

# isort: split
import tensorflow as tf

#: Rows in the batch: far above the size where XLA's single-output reduction reorders.
ROWS = 4096


def _sequential_staged_sum(rows: np.ndarray, stages: tuple[int, ...]) -> np.ndarray:
    """The plan's sums in NumPy, each stage's terms added first to last in float32."""
    v = rows
    for k in stages:
        v = v.reshape(v.shape[0], -1, k)
        total = v[:, :, 0].copy()
        for i in range(1, k):
            total = total + v[:, :, i]
        v = total
    return v.reshape(-1)


@pytest.mark.parametrize("length", [16, 38, 512])
def test_single_term_sum_is_sequential_at_every_batch_size(length):
    rng = np.random.default_rng(length)
    # Magnitudes spread over 2**-20 .. 2**20: any change of order shows in the last bits.
    x = rng.standard_normal((ROWS, length)) * np.exp2(rng.integers(-20, 20, (ROWS, length)))
    x = x.astype(np.float32)
    plan = sum_plan(tf.TensorShape(x.shape), Axes(norm=(1,), channel=1, ndim=2))
    stages = plan[0][1]
    summed = tf.function(lambda t: staged_sums([t], plan)[0], jit_compile=True)
    expected = _sequential_staged_sum(x, stages)
    alone = summed(tf.constant(x[:1])).numpy().reshape(-1)
    batch = summed(tf.constant(x)).numpy().reshape(-1)
    np.testing.assert_array_equal(alone.view(np.uint32), expected[:1].view(np.uint32))
    np.testing.assert_array_equal(batch.view(np.uint32), expected.view(np.uint32))
