"""Numeric policies: every sign-product backend equals the others exactly, `auto` and its per-machine
cache, the mixed-precision FP matmuls and a mixed training run."""
import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax import engine, precision, pretraining, sharding

from test_train import files, first_batch, tiny_config  # noqa: F401  (files is a fixture)

TINY = dict(vocab_size=64, hidden_size=40, num_layers=2, num_heads=2, intermediate_size=70,
            max_position_embeddings=24, binary=True)


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
  """Each test measures into its own cache folder, with no in-process memory of earlier choices."""
  monkeypatch.setenv("BIPFT_CACHE", str(tmp_path / "cache"))
  precision._auto_sign_dtype.cache_clear()
  yield
  precision._auto_sign_dtype.cache_clear()


def _signs(rng, shape, unsigned=False):
  values = rng.integers(0 if unsigned else -1, 2, shape).astype(np.float32)
  return jnp.asarray(values * rng.uniform(0.1, 3.0))  # one scale times signs, as a binarizer gives


@pytest.mark.parametrize("spec, x_shape, y_shape", [
    ("...i,io->...o", (3, 5, 33), (33, 7)),         # K not a multiple of 32
    ("...i,io->...o", (2, 100), (100, 65)),
    ("bqhk,bshk->bhqs", (2, 9, 3, 20), (2, 9, 3, 20)),
    ("bhqs,bshk->bqhk", (2, 3, 11, 11), (2, 11, 3, 13)),
])
def test_every_sign_backend_equals_float32_exactly(spec, x_shape, y_shape):
  rng = np.random.default_rng(sum(x_shape) * 7 + sum(y_shape))
  x, y = _signs(rng, x_shape, unsigned=spec.startswith("bhqs")), _signs(rng, y_shape)
  ref_config = model_lib.BertConfig(**TINY, binary_matmul_dtype="float32")
  reference = model_lib.binary_einsum(spec, x, y, ref_config)
  ref_grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(model_lib.binary_einsum(spec, a, b, ref_config))),
                       (0, 1))(x, y)
  exact = np.einsum(spec, np.asarray(x, np.float64), np.asarray(y, np.float64))
  np.testing.assert_allclose(reference, exact, rtol=1e-6)
  for dtype in ("bfloat16", "int8", "auto"):
    config = model_lib.BertConfig(**TINY, binary_matmul_dtype=dtype)
    np.testing.assert_array_equal(model_lib.binary_einsum(spec, x, y, config), reference)
    np.testing.assert_array_equal(jax.jit(model_lib.binary_einsum, static_argnums=(0, 3))(spec, x, y, config),
                                  reference)
    grads = jax.grad(lambda a, b: jnp.sum(jnp.sin(model_lib.binary_einsum(spec, a, b, config))), (0, 1))(x, y)
    for got, want in zip(grads, ref_grads):  # the backward stays fp32: the same gradients
      np.testing.assert_array_equal(got, want)


def test_student_outputs_are_bit_identical_on_every_backend():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, TINY["vocab_size"], (2, 13)), jnp.int32)
  reference_config = model_lib.BertConfig(**TINY, binary_matmul_dtype="float32")
  module = model_lib.build(reference_config, "encoder")
  params = model_params.init_params(module, jax.random.key(0))
  params = model_params.calibrate_alphas(module, params, {"input_ids": ids})
  reference = jax.jit(module.apply)({"params": params}, ids)
  for dtype in ("bfloat16", "int8", "auto"):
    config = dataclasses.replace(reference_config, binary_matmul_dtype=dtype)
    out = jax.jit(model_lib.build(config, "encoder").apply)({"params": params}, ids)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(reference)):
      np.testing.assert_array_equal(got, want)


def test_unknown_names_are_refused():
  with pytest.raises(ValueError, match="binary_matmul_dtype 'int4'"):
    model_lib.BertConfig(binary_matmul_dtype="int4")
  with pytest.raises(ValueError, match="precision 'fp16'"):
    model_lib.BertConfig.from_dict({"precision": "fp16"})


def _cache() -> dict:
  return json.loads(precision._cache_path().read_text())


def test_auto_measures_once_and_reuses_the_cached_choice(monkeypatch):
  choice = precision.sign_product_dtype("auto")
  assert choice in precision.SIGN_DTYPES
  record = _cache()[precision.host_key()]["sign_matmul"]
  assert record["choice"] == choice and set(record["seconds"]) == set(precision.SIGN_DTYPES)
  precision._auto_sign_dtype.cache_clear()
  monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
  assert precision.sign_product_dtype("auto") == choice


@pytest.mark.parametrize("damage", ["not json {", "[1, 2]", '{"KEY": {"sign_matmul": {"choice": "int3"}}}'])
def test_a_corrupt_cache_is_measured_again(damage):
  path = precision._cache_path()
  path.parent.mkdir(parents=True)
  path.write_text(damage.replace("KEY", precision.host_key()))
  assert precision.sign_product_dtype("auto") in precision.SIGN_DTYPES
  assert _cache()[precision.host_key()]["sign_matmul"]["choice"] in precision.SIGN_DTYPES


def test_a_choice_made_among_other_candidates_is_measured_again():
  """A new kernel (or one dropped) is measured before the cached choice is trusted."""
  exact = lambda: jnp.arange(4)
  assert precision.choose("kind", {"a": exact}, repeats=1) == "a"
  assert _cache()[precision.host_key()]["kind"]["candidates"] == ["a"]
  precision.choose("kind", {"a": exact, "b": exact}, repeats=1)
  assert set(_cache()[precision.host_key()]["kind"]["seconds"]) == {"a", "b"}


def _failing_for(failing: set, probe_for=precision._sign_probe):
  def probe(dtype, **kwargs):
    if dtype in failing:
      def unsupported():
        raise RuntimeError(f"{dtype} dot is not supported by this backend")
      return unsupported
    return probe_for(dtype, **kwargs)
  return probe


def test_auto_skips_an_unsupported_backend_on_cpu(monkeypatch):
  monkeypatch.setattr(precision, "_sign_probe", _failing_for({"int8", "bfloat16"}))
  assert precision.sign_product_dtype("auto") == "float32"
  assert set(_cache()[precision.host_key()]["sign_matmul"]["seconds"]) == {"float32"}


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_on_accelerators_takes_the_first_native_dtype_that_compiles(monkeypatch, backend):
  assert precision._auto_sign_dtype(backend) == "int8"
  precision._auto_sign_dtype.cache_clear()
  monkeypatch.setattr(precision, "_sign_probe", _failing_for({"int8"}))
  assert precision._auto_sign_dtype(backend) == "bfloat16"
  precision._auto_sign_dtype.cache_clear()
  monkeypatch.setattr(precision, "_sign_probe", _failing_for({"int8", "bfloat16"}))
  assert precision._auto_sign_dtype(backend) == "float32"


def test_measure_never_keeps_an_inexact_candidate():
  exact = lambda: jnp.arange(4)
  seconds = precision.measure({"reference": exact, "off_by_one": lambda: jnp.arange(4) + 1, "same": exact},
                              repeats=1)
  assert set(seconds) == {"reference", "same"}


def test_mixed_einsum_is_bf16_products_with_fp32_accumulation_both_ways():
  rng = np.random.default_rng(1)
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(3, 4, 50), (50, 6)])
  g = jnp.asarray(rng.standard_normal((3, 4, 6)), jnp.float32)
  round16 = lambda t: np.asarray(t.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  out, vjp = jax.vjp(lambda x, y: precision.mixed_einsum("...i,io->...o", x, y), a, b)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, round16(a) @ round16(b), rtol=1e-5, atol=1e-5)
  da, db = vjp(g)
  assert da.dtype == db.dtype == jnp.float32
  np.testing.assert_allclose(da, round16(g) @ round16(b).T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(db, np.einsum("mki,mko->io", round16(a), round16(g)), rtol=1e-5, atol=1e-5)


def _dot_operand_dtypes(compiled_text: str) -> set:
  """The (lhs, rhs) element types of every dot in an optimized HLO module's text."""
  dtypes = dict(re.findall(r"(%[\w.-]+) = (\w+)\[", compiled_text))
  return {(dtypes[x], dtypes[y]) for x, y in re.findall(r" dot\((%[\w.-]+), (%[\w.-]+)\)", compiled_text)}


@pytest.mark.parametrize("spec,a_shape,b_shape", [("...i,io->...o", (3, 40, 48), (48, 64)),     # a Linear
                                                  ("nd,vd->nv", (24, 48), (64, 48)),          # the MLM decoder
                                                  ("bqhk,bshk->bhqs", (2, 9, 3, 20), (2, 9, 3, 20)),  # attention
                                                  ("bhqs,bshk->bqhk", (2, 3, 11, 11), (2, 11, 3, 13))])
def test_mixed_products_compile_to_bf16_dots_weight_gradients_included(spec, a_shape, b_shape):
  # XLA:CPU would run a bf16 weight gradient (operands contracted on their first axis) as an fp32 dot,
  # and some of attention's backward products on a loop that rejects bf16.
  rng = np.random.default_rng(3)
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (a_shape, b_shape))
  g = jnp.asarray(rng.standard_normal(jnp.einsum(spec, a, b).shape), jnp.float32)
  grads = jax.jit(lambda x, y: jax.vjp(lambda x_, y_: precision.mixed_einsum(spec, x_, y_), x, y)[1](g))
  assert _dot_operand_dtypes(grads.lower(a, b).compile().as_text()) == {("bf16", "bf16")}
  round16 = lambda t: np.asarray(t.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  expected = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), round16(a), round16(b))[1](round16(g))
  for got, want in zip(grads(a, b), expected):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,a_shape,b_shape", [("bqk,bk->bq", (2, 5, 16), (2, 16)), ("bk,bkn->bn", (2, 16), (2, 16, 7))])
def test_mixed_batched_products_with_a_side_without_free_axes(spec, a_shape, b_shape):
  # A batched matrix-vector product: the layout copy once recursed forever on it (swapping the
  # operands of a result with no rows or no columns). XLA:CPU may run these as fp32 dots of the
  # rounded operands; the values are what count.
  rng = np.random.default_rng(4)
  a, b = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in (a_shape, b_shape))
  g = jnp.asarray(rng.standard_normal(jnp.einsum(spec, a, b).shape), jnp.float32)
  out, vjp = jax.jit(lambda x, y: jax.vjp(lambda x_, y_: precision.mixed_einsum(spec, x_, y_), x, y))(a, b)
  round16 = lambda t: np.asarray(t.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  want_out, want_vjp = jax.vjp(lambda x, y: jnp.einsum(spec, x, y), round16(a), round16(b))
  np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5)
  for got, want in zip(vjp(g), want_vjp(round16(g))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_mixed_sign_products_keep_the_exact_forward_and_take_bf16_backward_products():
  rng = np.random.default_rng(2)
  x, y = _signs(rng, (4, 45)), _signs(rng, (45, 6))
  g = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
  fp32, mixed = (model_lib.BertConfig(**TINY, precision=p) for p in ("fp32", "mixed"))
  out, vjp = jax.vjp(lambda a, b: model_lib.binary_einsum("...i,io->...o", a, b, mixed), x, y)
  np.testing.assert_array_equal(out, model_lib.binary_einsum("...i,io->...o", x, y, fp32))
  x_scale, y_scale = jnp.max(jnp.abs(x)), jnp.max(jnp.abs(y))
  # The products of the signs with the bf16-rounded cotangent, summed in fp32, then the chain rule.
  dx_s, dy_s = precision.einsum_transposes("...i,io->...o", jnp.sign(x), jnp.sign(y), g * (x_scale * y_scale))
  dx, dy = vjp(g)
  np.testing.assert_allclose(dx, dx_s / x_scale, rtol=1e-6)
  np.testing.assert_allclose(dy, dy_s / y_scale, rtol=1e-6)
  dx_fp32 = jax.vjp(lambda a: model_lib.binary_einsum("...i,io->...o", a, y, fp32), x)[1](g)[0]
  assert not np.allclose(dx, dx_fp32, rtol=1e-6, atol=0)  # the fp32 policy's backward: bf16 really rounds


def test_mixed_training_has_a_finite_falling_loss(files):  # noqa: F811
  config = tiny_config(files, **{"model.precision": "mixed", "optimizer.learning_rate": 3e-3})
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  rules = sharding.rules_from_config(config.mesh.rules)
  job = pretraining.distillation_job(config, mesh, rules)
  assert job.model_config.precision == "mixed"
  run = engine.Engine(job, mesh, rules, seed=config.seed)
  teacher = run.place_frozen()
  batch = run.global_batch(first_batch(config, files))
  state = run.new_state(job.source(), batch)
  losses = []
  for step in range(8):
    state, metrics = run.train_step(state, teacher, batch, step)
    losses.append(float(metrics["total_loss"]))
  assert np.all(np.isfinite(losses)), losses
  assert losses[-1] < 0.8 * losses[0], losses
  leaves = jax.tree.leaves(state)
  assert all(leaf.dtype != jnp.bfloat16 for leaf in leaves)  # fp32 master weights and optimizer state
