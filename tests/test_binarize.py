"""The binarizers against the release's quantizer vectors and against values computed by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipft_jax import binarize, model
from reference_data import VECTORS, needs_vectors, quantizer_cases

jax.config.update("jax_default_matmul_precision", "highest")



def _weight_vjp(fn, w, g):
  y, vjp = jax.vjp(fn, w)
  return y, vjp(g)[0]


def _activation_vjp(fn, x, alpha, g):
  y, vjp = jax.vjp(fn, x, alpha)
  grad_x, grad_alpha = vjp(g)
  return y, grad_x, grad_alpha


# --- the release's unit vectors -------------------------------------------------

@needs_vectors
def test_every_reference_case_is_covered():
  cases = set(quantizer_cases())
  stored = {k.split(".")[0] for k in np.load(VECTORS / "quantizers.npz").files}
  assert cases == stored and len(cases) == 8


@needs_vectors
@pytest.mark.parametrize("case", quantizer_cases())
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_reference_quantizer_case(case, jit):
  ref = np.load(VECTORS / "quantizers.npz")
  x, g = jnp.asarray(ref[f"{case}.x"]), jnp.asarray(ref[f"{case}.grad_out"])
  maybe_jit = jax.jit if jit else (lambda f: f)
  if case.startswith("bwn"):
    fn = binarize.bwn_rowwise if case == "bwn_rowwise" else binarize.bwn
    y, grad_x = maybe_jit(lambda w, g: _weight_vjp(fn, w, g))(x, g)
  else:
    signed = case.startswith("signed")
    pair = binarize.activation_binarizers("elastic")
    binarizer = pair[0] if signed else pair[1]
    if case.endswith("lazy_init"):
      alpha = binarizer.initial_alpha(x)
      np.testing.assert_allclose(alpha, ref[f"{case}.alpha_after_forward"], rtol=1e-6)
    else:
      alpha = jnp.asarray(ref[f"{case}.alpha_after_forward"])
    y, grad_x, grad_alpha = maybe_jit(lambda x, a, g: _activation_vjp(binarizer.apply, x, a, g))(x, alpha, g)
    np.testing.assert_allclose(grad_alpha, ref[f"{case}.grad_alpha"], rtol=1e-5, atol=1e-7)
    assert grad_alpha.shape == alpha.shape
  np.testing.assert_allclose(y, ref[f"{case}.y"], rtol=1e-6, atol=0)
  np.testing.assert_array_equal(grad_x, ref[f"{case}.grad_x"])


# --- hand-computed values -------------------------------------------------------

def test_bwn_by_hand():
  w = jnp.array([[1.0, -2.0], [3.0, 0.0]])  # mean|W| = 1.5, mean(W) = 0.5
  np.testing.assert_array_equal(binarize.bwn(w), [[1.5, -1.5], [1.5, -1.5]])
  # mean(W) = 0: the exact zeros stay 0 (sign(0) = 0), the scale is still mean|W| = 0.5.
  w = jnp.array([[1.0, -1.0], [0.0, 0.0]])
  np.testing.assert_array_equal(binarize.bwn(w), [[0.5, -0.5], [0.0, 0.0]])


def test_bwn_rowwise_scales_per_row_and_centres_globally():
  w = jnp.array([[1.0, -3.0], [0.5, 1.5]])  # global mean 0.5; row scales 2 and 1
  np.testing.assert_array_equal(binarize.bwn_rowwise(w), [[2.0, -2.0], [1.0, 1.0]])
  # Centring by the global mean (0.5), not the row mean (1.0): 0.75 is above it.
  w = jnp.array([[0.75, 1.25], [-1.0, 1.0]])
  np.testing.assert_array_equal(binarize.bwn_rowwise(w), [[1.0, 1.0], [-1.0, 1.0]])


def test_rowwise_lookup_equals_binarizing_the_whole_table_then_looking_up():
  w = jax.random.normal(jax.random.key(0), (50, 37)) * jnp.linspace(0.1, 3.0, 50)[:, None] + 0.05
  ids = jnp.array([[3, 49, 0, 3], [17, 17, 8, 1]])
  g = jax.random.normal(jax.random.key(1), (2, 4, 37))
  whole = lambda w: jnp.take(binarize.bwn_rowwise(w), ids, axis=0)
  lookup = lambda w: binarize.bwn_rowwise_lookup(w, ids)
  for maybe_jit in (lambda f: f, jax.jit):
    (y, vjp), (expected, expected_vjp) = (jax.vjp(maybe_jit(f), w) for f in (lookup, whole))
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(vjp(g)[0], expected_vjp(g)[0])  # repeated ids sum their gradients


def test_rowwise_lookup_of_a_token_does_not_depend_on_its_batch():
  # XLA:CPU rounds the sum of a row differently with the shape of the tensor it reduces: scales
  # reduced over the looked-up rows gave a batch of 8 and its 8 one-example shards (8 devices)
  # embeddings 1-2 ulp apart, and a sharded binary finetune left the single-device one. The table's
  # scales are the same whatever looks them up.
  w = jax.random.normal(jax.random.key(0), (64, 32)) * 0.02 + 0.001
  ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
  lookup = jax.jit(binarize.bwn_rowwise_lookup)
  batch = lookup(w, ids)
  np.testing.assert_array_equal(batch, np.concatenate([lookup(w, ids[i:i + 1]) for i in range(8)]))
  np.testing.assert_array_equal(batch, jnp.take(binarize.bwn_rowwise(w), ids, axis=0))


@pytest.mark.parametrize("fn", [binarize.bwn, binarize.bwn_rowwise])
def test_weight_gradient_is_identity(fn):
  w = jax.random.normal(jax.random.key(0), (5, 7))
  g = jax.random.normal(jax.random.key(1), (5, 7))
  np.testing.assert_array_equal(_weight_vjp(fn, w, g)[1], g)


def test_signed_by_hand_clip_window_edges():
  alpha = jnp.float32(0.5)
  past = float(np.nextafter(np.float32(0.5), np.float32(1.0)))
  x = jnp.array([-past, -0.5, -0.1, 0.0, 0.2, 0.5, past], jnp.float32)
  g = jnp.arange(1.0, 8.0)
  y, grad_x, grad_alpha = _activation_vjp(binarize.signed_binarize, x, alpha, g)
  np.testing.assert_array_equal(y, [-0.5, -0.5, -0.5, 0.0, 0.5, 0.5, 0.5])
  # |x/alpha| = 1 passes the gradient, just past 1 does not.
  np.testing.assert_array_equal(grad_x, [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 0.0])
  # (1/sqrt(N)) * sum(sign(x) * g), sign(0) = 0.
  expected = (-1 - 2 - 3 + 0 + 5 + 6 + 7) / np.sqrt(7)
  np.testing.assert_allclose(grad_alpha, expected, rtol=1e-6)


def test_unsigned_by_hand_round_half_to_even():
  alpha = jnp.float32(0.25)
  p = jnp.array([0.0, 0.125, 0.2, 0.25, 0.375, 0.625], jnp.float32)  # P/alpha = 0, .5, .8, 1, 1.5, 2.5
  g = jnp.arange(1.0, 7.0)
  y, grad_p, grad_alpha = _activation_vjp(binarize.unsigned_binarize, p, alpha, g)
  # 0.5 rounds to 0 (half to even, not away from zero); 1.5 -> 2 and 2.5 -> 2 are clipped to 1.
  np.testing.assert_array_equal(y, [0.0, 0.0, 0.25, 0.25, 0.25, 0.25])
  np.testing.assert_array_equal(grad_p, [1.0, 2.0, 3.0, 4.0, 0.0, 0.0])
  # step = 1[P/a > 1] + 1[0 <= P/a <= 1] * (round(P/a) - P/a)
  step = np.array([0.0, -0.5, 0.2, 0.0, 1.0, 1.0])
  np.testing.assert_allclose(grad_alpha, np.sum(step * np.arange(1.0, 7.0)) / np.sqrt(6), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, -1.0, 1e-6])
def test_alpha_is_clamped_at_1e_minus_5(alpha):
  x = jnp.array([-2e-5, -1e-5, 0.0, 1e-5, 2e-5], jnp.float32)
  g = jnp.arange(1.0, 6.0)
  y, grad_x, grad_alpha = _activation_vjp(binarize.signed_binarize, x, jnp.float32(alpha), g)
  np.testing.assert_allclose(y, 1e-5 * np.array([-1, -1, 0, 1, 1]), rtol=1e-7)
  # The clip window uses the clamped alpha.
  np.testing.assert_array_equal(grad_x, [0.0, 2.0, 3.0, 4.0, 0.0])
  # The release clamps inside its autograd Function: a clamped alpha still gets the LSQ gradient.
  np.testing.assert_allclose(grad_alpha, (-1 - 2 + 4 + 5) / np.sqrt(5), rtol=1e-6)
  p = jnp.array([0.0, 4e-6, 6e-6, 1e-3], jnp.float32)  # P / 1e-5 = 0, 0.4, 0.6, 100
  y, grad_p, grad_alpha = _activation_vjp(binarize.unsigned_binarize, p, jnp.float32(alpha), jnp.arange(1.0, 5.0))
  np.testing.assert_allclose(y, [0.0, 0.0, 1e-5, 1e-5], rtol=1e-7)
  np.testing.assert_array_equal(grad_p, [1.0, 2.0, 3.0, 0.0])
  np.testing.assert_allclose(grad_alpha, (0 - 0.4 * 2 + 0.4 * 3 + 1 * 4) / 2, rtol=1e-5)


def test_alpha_just_above_the_clamp_gets_a_gradient():
  x = jnp.array([1.0, -3.0, 2.0])
  _, _, grad_alpha = _activation_vjp(binarize.signed_binarize, x, jnp.float32(2e-5), jnp.ones(3))
  np.testing.assert_allclose(grad_alpha, 1 / np.sqrt(3), rtol=1e-6)


# --- properties -----------------------------------------------------------------

def test_outputs_take_only_two_values_plus_exact_zeros():
  key_x, key_p = jax.random.split(jax.random.key(2))
  x = jax.random.normal(key_x, (64, 48)).at[3, :5].set(0.0)
  alpha = jnp.float32(0.7)
  y = binarize.signed_binarize(x, alpha)
  np.testing.assert_array_equal(np.abs(y[x != 0]), 0.7 * np.ones(int(jnp.sum(x != 0)), np.float32))
  assert np.all(y[x == 0] == 0) and int(jnp.sum(x == 0)) == 5

  p = jax.nn.softmax(4 * jax.random.normal(key_p, (4, 16, 16)), axis=-1)
  y = binarize.unsigned_binarize(p, jnp.float32(0.25))
  assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 0.25}

  w = jax.random.normal(key_x, (32, 24)) * 0.02
  centred = w - jnp.mean(w)
  y = binarize.bwn(w)
  scale = float(jnp.mean(jnp.abs(w)))
  assert set(np.unique(np.asarray(y)).tolist()) <= {-scale, 0.0, scale}
  np.testing.assert_array_equal(y == 0, centred == 0)

  y = np.asarray(binarize.bwn_rowwise(w))
  scales = np.asarray(jnp.mean(jnp.abs(w), axis=1))
  for row, s in zip(y, scales):
    assert set(np.unique(row).tolist()) <= {-s, 0.0, s}
    assert set(np.unique(row).tolist()) & {-s, s}


def test_jit_agrees_with_eager():
  key = jax.random.key(3)
  x = jax.random.normal(key, (8, 12))
  p = jax.nn.softmax(x, axis=-1)
  g = jax.random.normal(jax.random.key(4), (8, 12))

  def everything(x, p, g):
    out = [_weight_vjp(binarize.bwn, x, g), _weight_vjp(binarize.bwn_rowwise, x, g),
           _activation_vjp(binarize.signed_binarize, x, jnp.float32(0.9), g),
           _activation_vjp(binarize.unsigned_binarize, p, jnp.float32(0.3), g)]
    return jax.tree.leaves(out)

  # The scales are means, so XLA may sum in another order (1 ulp); the signs must not move.
  for eager, jitted in zip(everything(x, p, g), jax.jit(everything)(x, p, g)):
    np.testing.assert_array_equal(np.sign(eager), np.sign(jitted))
    np.testing.assert_allclose(eager, jitted, rtol=1e-6, atol=1e-7)


def test_unknown_binarizer_names_raise():
  with pytest.raises(ValueError, match=r"unknown weight binarizer 'xnor'.*bwn"):
    binarize.weight_binarizers("xnor")
  with pytest.raises(ValueError, match=r"unknown activation binarizer 'ternary'.*elastic"):
    binarize.activation_binarizers("ternary")
  # A model config naming an unknown binarizer is refused when it is made, before any init or compile.
  with pytest.raises(ValueError, match="unknown activation binarizer 'ternary'"):
    model.BertConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                     max_position_embeddings=8, binary=True, activation_binarizer="ternary")


def test_release_binarizers_are_the_defaults():
  config = model.BertConfig()
  assert binarize.weight_binarizers(config.weight_binarizer) == (binarize.bwn, binarize.bwn_rowwise_lookup)
  signed, unsigned = binarize.activation_binarizers(config.activation_binarizer)
  assert (signed.apply, unsigned.apply) == (binarize.signed_binarize, binarize.unsigned_binarize)
