"""The per-unit numerics: exact power-of-two scaling and float32 sums."""

import hypothesis
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np

from layca_jax import _numerics as nx
from layca_jax._layers import LayerSpec


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(exponent=st.integers(-110, 110), seed=st.integers(0, 2 ** 16),
                  per_neuron=st.booleans())
def test_normalize_pow2_is_exact_and_brings_peaks_to_half_one(
    exponent, seed, per_neuron):
  rng = np.random.default_rng(seed)
  spec = LayerSpec('k', (6, 3), 0, per_neuron)
  # Entries within 2^8 of the peak stay normal floats after any scaling here.
  x = (rng.uniform(2.0 ** -8, 1.0, size=spec.shape)
       * rng.choice([-1.0, 1.0], size=spec.shape)
       * 2.0 ** exponent).astype(np.float32)
  x_hat, e, finite = nx.normalize_pow2(jnp.asarray(x), spec, None)
  assert bool(np.all(finite))
  peak = np.max(np.abs(np.asarray(x_hat)), axis=spec.reduce_axes)
  assert np.all((peak >= 0.5) & (peak < 1.0))
  back = np.asarray(x_hat, np.float64) * np.exp2(np.asarray(e, np.float64))
  np.testing.assert_array_equal(back, x.astype(np.float64))  # Bit for bit.


def test_normalize_pow2_flags_non_finite_units_and_keeps_zero_units():
  spec = LayerSpec('k', (2, 3), 0, True)
  x = jnp.array([[np.nan, 0.0, 1e30], [1.0, 0.0, -3e30]], jnp.float32)
  x_hat, _, finite = nx.normalize_pow2(x, spec, None)
  np.testing.assert_array_equal(np.asarray(finite).ravel(), [False, True, True])
  np.testing.assert_array_equal(np.asarray(x_hat)[:, 1], 0.0)
  np.testing.assert_array_equal(np.asarray(x_hat)[:, 0], 0.0)
  assert np.max(np.abs(np.asarray(x_hat)[:, 2])) < 1.0


def test_unit_norm_accumulates_in_float32_for_bfloat16_and_is_scale_free():
  spec = LayerSpec('k', (4096,), 0, False)
  x = jnp.full((4096,), 1.0 + 2.0 ** -7, jnp.bfloat16)
  # A bfloat16 sum would stall near 2^(8+1) long before 4096 terms.
  want = float(np.sqrt(4096) * (1.0 + 2.0 ** -7))
  for scale in (2.0 ** -100, 1.0, 2.0 ** 100):
    norm = float(nx.unit_norm((x.astype(jnp.float32) * scale), spec, None))
    np.testing.assert_allclose(norm / scale, want, rtol=1e-6)
  np.testing.assert_allclose(float(nx.unit_norm(x, spec, None)), want, rtol=1e-6)


def test_safe_range_of_plain_sums():
  values = jnp.array([0.0, 2.0 ** -61, 2.0 ** -60, 1.0, 2.0 ** 60, 2.0 ** 61,
                      np.inf, np.nan], jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(nx.in_safe_range(values)),
      [False, False, True, True, True, False, False, False])


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(mantissa=st.floats(0.5, 1.0, exclude_max=True),
                  power=st.integers(-125, 127), sign=st.sampled_from([-1, 1]),
                  shifts=st.lists(st.integers(-400, 400), min_size=1,
                                  max_size=8))
def test_bit_level_powers_of_two_agree_with_numpy(mantissa, power, sign,
                                                  shifts):
  """``frexp_exponent``, ``pow2`` and ``ldexp_exact`` (written from the bits,
  for compile time) against NumPy's float32 ``frexp`` and ``ldexp``: the same
  exponent, the same value to the bit wherever the result is a normal float,
  zero or infinite where it leaves the range."""
  x = np.float32(sign * mantissa * 2.0 ** power)
  assert int(nx.frexp_exponent(jnp.float32(x))) == np.frexp(x)[1]
  exponents = np.array(shifts, np.int32)
  got = np.asarray(nx.ldexp_exact(jnp.float32(x), jnp.asarray(exponents)))
  with np.errstate(over='ignore', under='ignore'):
    want = np.ldexp(x, exponents).astype(np.float32)
  normal = np.abs(want) >= np.finfo(np.float32).tiny
  np.testing.assert_array_equal(got[normal], want[normal])
  assert np.all((got[~normal] == 0) | (np.abs(got[~normal]) < 2.0 ** -126))
  in_range = np.arange(-126, 128)
  np.testing.assert_array_equal(np.asarray(nx.pow2(in_range, jnp.float32)),
                                np.exp2(in_range).astype(np.float32))


def test_bit_level_exponent_and_scaling_keep_special_values():
  specials = jnp.array([0.0, -0.0, np.inf, -np.inf, np.nan], jnp.float32)
  np.testing.assert_array_equal(np.asarray(nx.frexp_exponent(specials)), 0)
  scaled = np.asarray(nx.ldexp_exact(specials, jnp.int32(-300)))
  np.testing.assert_array_equal(scaled[:4], [0.0, -0.0, np.inf, -np.inf])
  assert np.isnan(scaled[4])
