"""The native popcount kernel (bipft_jax/native): exact Linear and attention counts against integer
matmuls and XLA's popcount loops, both builds (AVX-512 and plain loops), and clean failure without a
compiler."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipft_jax import native, packed, precision
from bipft_jax.errors import UserError
from test_packed import ternary


@pytest.fixture(scope="module")
def compiler(exact_kernels):
  if "native" not in exact_kernels:
    pytest.skip("no C++ compiler here: the native kernel is left out")


@pytest.fixture(scope="module", params=[False, True], ids=["host", "portable"])
def kernels(request, compiler):
  return native.kernels(portable=request.param)


def _weight_planes(w_KxN):
  """(sign, nonzero) planes of w stored word-major [W, N], as pack_params stores a Linear's."""
  return tuple(planes.T for planes in packed.pack_signed(jnp.asarray(w_KxN).T))


# Rows not a multiple of the 3- and 2-row blocks, columns not of the 16-lane vectors or 64-column
# blocks, K not a multiple of the 32-bit words (700: 22 words, more than one vector of 16); 1400
# rows: several packing items (64 rows each).
SHAPES = [(1, 1, 1), (5, 7, 3), (7, 32, 16), (4, 45, 65), (9, 100, 130), (3, 200, 64), (700, 33, 17), (5, 700, 20)]


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("weight_zeros", [False, True])
def test_linear_counts_equal_integer_matmul(kernels, m, k, n, weight_zeros):
  rng = np.random.default_rng(m * k * n)
  x = ternary(rng, (2, m, k))
  w = ternary(rng, (k, n), 0.2 if weight_zeros else 0.0)
  w_sign, w_nonzero = _weight_planes(w)
  got = jax.jit(kernels.linear_counts)(jnp.asarray(x), w_sign, w_nonzero if weight_zeros else None)
  assert got.dtype == jnp.int32 and got.shape == (2, m, n)
  np.testing.assert_array_equal(got, np.einsum("bmk,kn->bmn", x.astype(np.int64), w.astype(np.int64)))


def _random_steps(rng, k, lowest, highest):
  """Per-channel step functions as steps_linear_counts takes them (0-3 starts, codes zero/+/-), and
  the signs they give every count in [lowest, highest]: [counts, k]."""
  unused = np.iinfo(np.int32).max
  steps = np.full((4, k), unused, np.int64)
  signs = np.zeros((highest - lowest + 1, k))
  counts = np.arange(lowest, highest + 1)
  for channel in range(k):
    starts = np.sort(rng.choice(np.arange(lowest + 1, highest + 1), rng.integers(0, 4), replace=False))
    codes = rng.choice([0, 2, 3], 4)  # zero, positive, negative
    steps[:len(starts), channel] = starts
    steps[3, channel] = sum(int(code) << (2 * i) for i, code in enumerate(codes))
    signs[:, channel] = np.array([0, 0, 1, -1])[codes[np.searchsorted(starts, counts, side="right")]]
  return jnp.asarray(steps.astype(np.uint32).view(np.int32)), signs


@pytest.mark.parametrize("m,k,n", SHAPES)
@pytest.mark.parametrize("weight_zeros", [False, True])
def test_steps_linear_counts_equal_integer_matmul(kernels, m, k, n, weight_zeros):
  """A Linear whose input signs are step functions of integer counts (the FFN without its GELU):
  counts on and around every step's start included."""
  rng = np.random.default_rng(m * k * n + 1)
  steps, signs = _random_steps(rng, k, -20, 20)
  counts = rng.integers(-20, 21, (2, m, k))
  w = ternary(rng, (k, n), 0.2 if weight_zeros else 0.0)
  w_sign, w_nonzero = _weight_planes(w)
  got = jax.jit(kernels.steps_linear_counts)(jnp.asarray(counts, jnp.int32), steps, w_sign,
                                             w_nonzero if weight_zeros else None)
  assert got.dtype == jnp.int32 and got.shape == (2, m, n)
  x = np.take_along_axis(signs, counts.reshape(-1, k) + 20, axis=0).reshape(2, m, k)
  np.testing.assert_array_equal(got, np.einsum("bmk,kn->bmn", x.astype(np.int64), w.astype(np.int64)))


def test_linear_packs_signs_as_pack_signed_does(kernels):
  """-0 counts as zero and NaN as a positive nonzero, as the XLA path's planes have them; eager
  calls equal jitted ones."""
  rng = np.random.default_rng(0)
  x = ternary(rng, (6, 70))
  x[0, :5] = -0.0
  x[1, 3] = np.nan
  x[2] = 0.0
  w_sign, w_nonzero = _weight_planes(ternary(rng, (70, 20)))
  want = packed.signed_matmul(*packed.pack_signed(jnp.asarray(x)), w_sign, w_nonzero)
  np.testing.assert_array_equal(kernels.linear_counts(jnp.asarray(x), w_sign, w_nonzero), want)
  np.testing.assert_array_equal(jax.jit(kernels.linear_counts)(jnp.asarray(x), w_sign, w_nonzero), want)
  assert np.all(np.asarray(want)[2] == 0)


def test_operands_that_do_not_fit_are_refused(kernels):
  with pytest.raises(Exception, match="a Linear's operands must be"):
    jax.block_until_ready(kernels.linear_counts(jnp.zeros((4, 70)), jnp.zeros((2, 5), jnp.uint32)))  # 3 words
  with pytest.raises(Exception, match="a Linear on step functions takes"):
    jax.block_until_ready(kernels.steps_linear_counts(jnp.zeros((4, 70), jnp.int32), jnp.zeros((3, 70), jnp.int32),
                                                      jnp.zeros((3, 5), jnp.uint32)))


# [B, L, H, K] queries against [B, S, H, K] keys: L and S off the 4-row blocks, the 8- and 16-column
# vectors and the 64-bit words; K off the words (7; 100: two words; 129: three).
HEAD_SHAPES = [(1, 1, 1, 1, 1), (2, 5, 70, 3, 100), (1, 65, 9, 2, 7), (3, 130, 129, 1, 129), (1, 128, 128, 12, 64)]


@pytest.mark.parametrize("b,l,s,h,k", HEAD_SHAPES)
def test_attention_counts_equal_integer_products(kernels, b, l, s, h, k):
  rng = np.random.default_rng(b * l * s * h * k)
  q, key, v = ternary(rng, (b, l, h, k)), ternary(rng, (b, s, h, k)), ternary(rng, (b, s, h, k))
  keep = rng.random((b, h, l, s)) < 0.3
  scores = jax.jit(kernels.query_key_counts)(jnp.asarray(q), jnp.asarray(key))
  assert scores.dtype == jnp.float32 and scores.shape == (b, h, l, s)
  np.testing.assert_array_equal(scores, np.einsum("blhk,bshk->bhls", q.astype(np.int64), key.astype(np.int64)))
  context = jax.jit(kernels.probs_value_counts)(jnp.asarray(keep), jnp.asarray(v))
  assert context.dtype == jnp.float32 and context.shape == (b, l, h, k)
  np.testing.assert_array_equal(context, np.einsum("bhls,bshk->blhk", keep.astype(np.int64), v.astype(np.int64)))


def test_attention_packs_signs_as_the_xla_path_does(kernels):
  """-0 is zero and NaN a positive nonzero in q, k and v, as packed.pack_signed has them; eager == jit."""
  rng = np.random.default_rng(1)
  q, key, v = (ternary(rng, (2, 66, 3, 70)) for _ in range(3))
  for x in (q, key, v):
    x[0, 0, 0, :5] = -0.0
    x[1, 2, 1, 3] = np.nan
  keep = jnp.asarray(rng.random((2, 3, 66, 66)) < 0.5)
  q, key, v = jnp.asarray(q), jnp.asarray(key), jnp.asarray(v)
  want_scores = packed._query_key_counts(q, key, "popcount")
  want_context = packed._probs_value_counts(keep, v, "popcount")
  for call in (lambda f, *a: f(*a), lambda f, *a: jax.jit(f)(*a)):
    np.testing.assert_array_equal(call(kernels.query_key_counts, q, key), want_scores)
    np.testing.assert_array_equal(call(kernels.probs_value_counts, keep, v), want_context)


def test_attention_operands_that_do_not_fit_are_refused(kernels):
  with pytest.raises(Exception, match="query and key must be"):
    jax.block_until_ready(kernels.query_key_counts(jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 3, 8))))
  with pytest.raises(Exception, match="kept probabilities and value must be"):
    jax.block_until_ready(kernels.probs_value_counts(jnp.zeros((1, 2, 4, 5), bool), jnp.zeros((1, 4, 2, 8))))


def test_the_host_build_is_the_vectorized_one_where_the_cpu_has_vpopcntdq(compiler):
  _, flags = precision.cpu_description()
  has_it = {"avx512f", "avx512bw", "avx512_vpopcntdq"} <= set(flags.split())
  assert native.kernels().vectorized == has_it
  assert not native.kernels(portable=True).vectorized


def test_a_build_is_cached_per_machine(compiler, tmp_path, monkeypatch):
  monkeypatch.setenv("BIPFT_CACHE", str(tmp_path))
  path = native._build(portable=True)
  assert path.parent == tmp_path / "native" and path.suffix == ".so"
  compiles = []
  real_run = native.subprocess.run
  monkeypatch.setattr(native.subprocess, "run",
                      lambda command, **kw: compiles.append(command) if "-o" in command else real_run(command, **kw))
  assert native._build(portable=True) == path and compiles == []


def test_no_compiler_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv("BIPFT_CACHE", str(tmp_path))
  monkeypatch.delenv("CXX", raising=False)
  monkeypatch.setenv("PATH", str(tmp_path / "empty"))
  with pytest.raises(native.Unavailable, match="needs a C\\+\\+ compiler"):
    native._build(portable=False)
  assert issubclass(native.Unavailable, UserError)


def test_a_failing_build_leaves_no_library(tmp_path, monkeypatch):
  compiler = tmp_path / "broken-c++"
  compiler.write_text("#!/bin/sh\necho 'error: this compiler is broken' >&2\nexit 1\n")
  compiler.chmod(0o755)
  monkeypatch.setenv("BIPFT_CACHE", str(tmp_path / "cache"))
  monkeypatch.setenv("CXX", str(compiler))
  with pytest.raises(native.Unavailable, match="building the native packed kernel failed: error: this compiler"):
    native._build(portable=False)
  assert list(pathlib.Path(tmp_path / "cache").rglob("*")) in ([], [tmp_path / "cache" / "native"])
