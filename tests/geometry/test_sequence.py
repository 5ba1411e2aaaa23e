import numpy as np
import pytest

from loom.geometry import sequence as seq


def test_root_motion_removed_exactly():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 3))
    root = np.cumsum(rng.normal(size=(6, 3)), axis=0)
    v = base[None] + root[:, None, :]  # a rigid body carried by its root
    out, off = seq.remove_root_motion(v, root)
    np.testing.assert_allclose(off[0], 0)
    np.testing.assert_allclose(out, np.broadcast_to(base + root[0], out.shape), atol=1e-12)


def test_sequence_fits_unit_box_with_one_transform():
    rng = np.random.default_rng(1)
    v = rng.uniform(-3, 9, size=(4, 100, 3)) * np.array([1, 2, 0.5])
    m = seq.sequence_normalization(v, half_extent=0.5)
    out = seq.apply(m, v)
    assert np.abs(out).max() <= 0.5 + 1e-12
    lo, hi = out.reshape(-1, 3).min(0), out.reshape(-1, 3).max(0)
    assert (hi - lo).max() == pytest.approx(1.0)
    np.testing.assert_allclose(lo + hi, 0, atol=1e-12)
    # Same transform on every frame: relative motion between frames is preserved up to the scale.
    s = m[0, 0]
    np.testing.assert_allclose(out[1] - out[0], (v[1] - v[0]) * s, atol=1e-12)


def test_degenerate_sequences_refused():
    with pytest.raises(ValueError):
        seq.sequence_normalization(np.zeros((2, 5, 3)))
    with pytest.raises(ValueError):
        seq.remove_root_motion(np.zeros((2, 5, 3)), np.zeros((3, 3)))
