"""The binarizer zoo against its authors' vectors (`shared/zoo_vectors`) and against hand values."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from bipft_jax import zoo
from bipft_jax import binarize
from bipft_jax.zoo import api, bibench, binarydm, bivit, dbllm
from reference_data import ZOO_VECTORS, needs_zoo_vectors


def _manifest() -> dict:
  return json.loads((ZOO_VECTORS / "manifest.json").read_text())


def assert_rel(ours, ref, rel, what=""):
  """|ours - ref| <= rel * |ref| by Frobenius norm (exact zeros where ref is all zero)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err, scale = np.linalg.norm(ours - ref), np.linalg.norm(ref)
  assert err <= rel * scale if scale > 0 else err == 0, (
      f"{what}: relative error {err / max(scale, 1e-30):.3g}")


def assert_readme_tolerance(ours, ref, what=""):
  """The vectors' README check, |ours - ref| <= 1e-5 * max(1, max|ref|) entrywise."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  assert np.all(np.abs(ours - ref) <= 1e-5 * max(1.0, np.max(np.abs(ref)))), what


# LSQ's step gradient is one sum over all 720 entries whose terms cancel (sum |terms| is 35x |sum|):
# float32 summation order alone moves it by ~1e-5 relative (the reference itself is 4e-6 from the
# float64 value), so it gets the README's tolerance.
README_TOLERANCE = {"grad_quantizer_a.alpha"}

# Each vector file: the operator, and how its PyTorch extras map to ours (name -> (torch name, to_ours)).
# to_ours is linear (a reshape or transpose), so it maps the parameter's gradient too.
def _flat(a):
  return a.reshape(-1)


def _fda_extras():
  return {f"{side}_noise_{fc}": (f"{side}_noise.{fc}.weight", np.transpose)
          for side in ("weight", "act") for fc in ("fc1", "fc2")}


CASES = {
    "bnn": (lambda: zoo.linear_op("bnn"), {}),
    "xnor": (lambda: zoo.linear_op("xnor"), {}),
    "xnorplusplus": (lambda: zoo.linear_op("xnorplusplus"), {"o_scale": ("o_scale", _flat)}),
    "dorefa": (lambda: zoo.linear_op("dorefa"), {}),
    "bireal": (lambda: zoo.linear_op("bireal"), {}),
    "react": (lambda: zoo.linear_op("react"), {"threshold": ("channel_threshold", _flat)}),
    "recu": (lambda: zoo.linear_op("recu"), {"alpha": ("alpha", _flat)}),
    "recu_sched": (lambda: zoo.linear_op("recu", **bibench.recu_schedule(10, 3)),
                   {"alpha": ("alpha", _flat)}),
    "fda": (lambda: zoo.linear_op("fda"), _fda_extras()),
    "fda_sched": (lambda: zoo.linear_op("fda", **bibench.fda_schedule(10, 3)), _fda_extras()),
    "binarydm_bnnlinear_order2": (lambda: zoo.linear_op("binarydm"), {
        "scale_1": ("scaling_first_order", _flat), "scale_2": ("scaling_second_order", _flat),
        "act_step": ("quantizer_a.alpha", lambda a: a.reshape(()))}),
    "binarydm_bnnlinear_order1": (lambda: zoo.linear_op("binarydm1"), {
        "scale_1": ("scaling_first_order", _flat),
        "act_step": ("quantizer_a.alpha", lambda a: a.reshape(()))}),
}
# Operators whose weight planes carry a learned output scale the authors apply after F.linear.
OUTPUT_SCALE = {"xnorplusplus": "o_scale", "recu": "alpha", "recu_sched": "alpha"}


def _initial_extras(op, in_features, out_features, key=jax.random.key(0)):
  return {name: e.init(jax.random.fold_in(key, i), e.shape, jnp.float32)
          for i, (name, e) in enumerate(sorted(op.init_extras(in_features, out_features).items()))}


def _vector_files() -> list:
  if not (ZOO_VECTORS / "manifest.json").is_file():
    return []
  return sorted(_manifest()["operators"])


def _loss_and_grads(op, x, kernel, bias, extras, g, train=True):
  def loss(x, kernel, bias, extras):
    y = op.apply(x, kernel, bias, extras, train=train)
    return jnp.sum(y * g), y
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(x, kernel, bias, extras)


def _load_case(case):
  """The vector file of `case`, its operator, and the file's extras in our layout."""
  ref = load_file(ZOO_VECTORS / _manifest()["operators"][case]["file"])
  make_op, extra_names = CASES[case]
  # An empty tensor of the authors' (FDA's noise MLPs below 64 features, width 0) is one we never make.
  extras = {name: to_ours(ref[torch_name]) for name, (torch_name, to_ours) in extra_names.items()
            if ref[torch_name].size}
  return ref, make_op(), extras


@needs_zoo_vectors
def test_every_vector_file_has_a_case():
  assert set(_vector_files()) == set(CASES) | {"binarydm_lrm"}


@needs_zoo_vectors
@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_matches_vectors(case):
  ref, op, extras = _load_case(case)
  x, kernel, bias, g = ref["x"], ref["weight"].T, ref["bias"], ref["g"]
  assert set(extras) == set(op.init_extras(*kernel.shape))
  if op.calibrate is not None:  # the values stored are the first call's data-driven overwrites
    calibrated = op.calibrate(x, kernel, _initial_extras(op, *kernel.shape))
    for name in extras:
      assert_rel(calibrated[name], extras[name], 1e-6, f"calibrated {name}")
    extras = calibrated
  run = jax.jit(_loss_and_grads, static_argnums=(0, 6))
  (_, y), (grad_x, grad_kernel, grad_bias, grad_extras) = run(op, x, kernel, bias, extras, g)
  assert_rel(y, ref["y"], 1e-6, "y")
  assert_rel(grad_x, ref["grad_x"], 1e-5, "grad_x")
  assert_rel(grad_kernel, ref["grad_weight"].T, 1e-5, "grad_weight")
  assert_rel(grad_bias, ref["grad_bias"], 1e-5, "grad_bias")
  for name in extras:
    torch_name, to_ours = CASES[case][1][name]
    what = f"grad_{torch_name}"
    if what in README_TOLERANCE:
      assert_readme_tolerance(grad_extras[name], to_ours(ref[what]), what)
    else:
      assert_rel(grad_extras[name], to_ours(ref[what]), 1e-5, what)


@needs_zoo_vectors
@pytest.mark.parametrize("case", sorted(CASES))
def test_inference_planes_are_the_operands(case):
  """The weight (activation) planes sum to the operand the authors' final F.linear call got."""
  ref, op, extras = _load_case(case)
  kernel = ref["weight"].T
  if op.weight_planes is not None:
    w = sum(scale * signs for scale, signs in op.weight_planes(kernel, extras))
    folded = extras[OUTPUT_SCALE[case]] if case in OUTPUT_SCALE else 1
    assert_rel(w, ref["linear_weight"].T * folded, 1e-6, "weight planes")
  if op.activation_planes is not None:
    scale, signs = op.activation_planes(ref["x"], extras)
    assert_rel(scale * signs, ref["linear_input"].reshape(ref["x"].shape), 1e-6, "activation plane")


@pytest.mark.parametrize("name", sorted(zoo.LINEAR_OPS))
def test_jit_and_eager_agree(name):
  op = zoo.linear_op(name)
  x = jax.random.normal(jax.random.key(1), (2, 3, 7))
  kernel = 0.7 * jax.random.normal(jax.random.key(2), (7, 4))
  extras, bias = _initial_extras(op, 7, 4), jnp.linspace(-1, 1, 4)
  g = jnp.cos(jnp.arange(24.0)).reshape(2, 3, 4)
  if op.calibrate is not None:
    extras = op.calibrate(x, kernel, extras)
  eager = _loss_and_grads(op, x, kernel, bias, extras, g)
  jitted = jax.jit(_loss_and_grads, static_argnums=(0, 6))(op, x, kernel, bias, extras, g)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@needs_zoo_vectors
@pytest.mark.parametrize("case", ["recu", "recu_sched"])
def test_recu_eval_mode_gradient(case):
  """Eval mode skips ReCU's activation normalisation: same y and parameter gradients, other dL/dx."""
  ref = load_file(ZOO_VECTORS / _manifest()["operators"][case]["file"])
  op = CASES[case][0]()
  extras = {"alpha": ref["alpha"].reshape(-1)}
  (_, y), (grad_x, grad_kernel, _, grad_extras) = jax.jit(_loss_and_grads, static_argnums=(0, 6))(
      op, ref["x"], ref["weight"].T, ref["bias"], extras, ref["g"], False)
  assert_rel(y, ref["y"], 1e-6, "y")
  assert_rel(grad_x, ref["grad_x_eval"], 1e-5, "grad_x_eval")
  assert_rel(grad_kernel, ref["grad_weight"].T, 1e-5, "grad_weight")
  assert_rel(grad_extras["alpha"], ref["grad_alpha"].reshape(-1), 1e-5, "grad_alpha")
  assert np.linalg.norm(ref["grad_x_eval"] - ref["grad_x"]) > 0.1 * np.linalg.norm(ref["grad_x"])


@needs_zoo_vectors
def test_schedules_give_the_buffers_of_the_sched_files():
  recu = load_file(ZOO_VECTORS / "recu_sched.safetensors")
  assert np.float32(bibench.recu_schedule(10, 3)["tau"]) == recu["buffer_tau"].item()
  fda = load_file(ZOO_VECTORS / "fda_sched.safetensors")
  assert bibench.fda_schedule(10, 3) == {"n": fda["buffer_n"].item(), "alpha": fda["buffer_alpha"].item()}
  # The constructor defaults are the unscheduled files' buffers (BiBench's BERT track).
  assert load_file(ZOO_VECTORS / "recu.safetensors")["buffer_tau"].item() == 1.0
  fda = load_file(ZOO_VECTORS / "fda.safetensors")
  assert (fda["buffer_n"].item(), fda["buffer_alpha"].item()) == (9, np.float32(0.1))


def test_schedules_by_hand():
  assert bibench.recu_schedule(10, 0)["tau"] == pytest.approx(0.85, abs=1e-6)
  assert bibench.recu_schedule(10, 10)["tau"] == pytest.approx(0.99, abs=1e-6)
  assert bibench.fda_schedule(10, 9) == {"n": 17, "alpha": 0.0}
  assert bibench.fda_schedule(10, 4)["alpha"] == pytest.approx(0.05, abs=1e-8)


# --- boundaries: sign(0) = 0 and the STE window at exactly +-1 ------------------------------

BOUNDARY = jnp.array([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])
# The other operand: no zero after XNOR's centring (its mean is 1/7), one negative sign.
OTHER = jnp.array([0.25, 0.25, 0.25, 0.25, 0.25, 0.25, -0.5])
CLOSED, OPEN = [0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 0, 0]
POLYNOMIAL = [0, 0, 1, 2, 1, 0, 0]  # p'(v) at BOUNDARY (Bi-Real), also ReCU's max(0, 2 - |2v|)


def _boundary_run(op, *, weight: bool, extras=None, train=True):
  """y and the gradient of sum(y) for a 1 x 7 input and a 7 x 1 kernel; the probed side is BOUNDARY."""
  x, kernel = (OTHER[None, :], BOUNDARY[:, None]) if weight else (BOUNDARY[None, :], OTHER[:, None])
  if extras is None:
    extras = _initial_extras(op, 7, 1)
    if op.calibrate is not None:
      extras = op.calibrate(x, kernel, extras)
  def loss(x, k):
    return jnp.sum(op.apply(x, k, jnp.zeros(1), extras, train=train))
  y, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, kernel)
  return y, grads[1][:, 0] if weight else grads[0][0]


# The gradient of the probed side is c * window * sign(OTHER) (1 x 7 by 7 x 1: the other side's sign
# enters each entry; its scales only give c). XNOR's weight gradient passes its centring (mixes
# entries), ReCU's its standardisation: their weight windows are tested on the quantizers below.
WINDOWS = {  # name -> (activation window, weight window, train)
    "bnn": (CLOSED, CLOSED, True), "xnor": (CLOSED, None, True), "xnorplusplus": (OPEN, OPEN, True),
    "dorefa": (OPEN, OPEN, True), "bireal": (POLYNOMIAL, CLOSED, True), "react": (POLYNOMIAL, CLOSED, True),
    "recu": (POLYNOMIAL, None, False),  # eval mode: the window on the raw input
    "bivit_weight": (OPEN, None, True),
    "binarydm1": (None, CLOSED, True),  # its activations are LSQ's (below)
}


@pytest.mark.parametrize("name, weight", [(name, weight) for name in sorted(WINDOWS)
                                          for weight in (False, True) if WINDOWS[name][weight] is not None])
def test_gradient_windows_at_the_boundaries(name, weight):
  window = WINDOWS[name][1 if weight else 0]
  op = zoo.linear_op(name)
  _, grad = _boundary_run(op, weight=weight, train=WINDOWS[name][2])
  expected = np.asarray(window, np.float32) * np.sign(OTHER)
  np.testing.assert_allclose(grad, grad[4] / expected[4] * expected, rtol=1e-6, atol=0)
  assert grad[4] != 0


# FDA is not sign planes; FDB's planes are {0, 1} masks (tested below).
@pytest.mark.parametrize("name", [n for n in zoo.LINEAR_OPS if n not in ("fda", "dbllm_fdb")])
def test_sign_of_zero_is_zero(name):
  op = zoo.linear_op(name)
  kernel, extras = BOUNDARY[:, None], _initial_extras(op, 7, 1)
  # BOUNDARY has mean 0, so XNOR's centring and ReCU's standardisation keep its zero.
  assert op.weight_planes(kernel, extras)[0][1][:, 0].tolist() == [-1, -1, -1, 0, 1, 1, 1]
  if op.activation_planes is not None:
    assert op.activation_planes(BOUNDARY, extras)[1].tolist() == [-1, -1, -1, 0, 1, 1, 1]
    # An all-zero input row gives sign 0 everywhere: only the bias is left.
    y = op.apply(jnp.zeros((1, 7)), kernel, jnp.full((1,), 0.5), extras, train=False)
    np.testing.assert_array_equal(y, [[0.5 if op.uses_bias else 0.0]])


def test_activation_signs_are_jnp_sign_bit_for_bit():
  """The selects-for-speed sign equals jnp.sign everywhere (+-0, +-inf, NaN, subnormals) and has its
  zero gradient."""
  x = jnp.array([-np.inf, -2.5, -1e-45, -0.0, 0.0, 1e-45, 3.0, np.inf, np.nan], jnp.float32)
  for f in (lambda v: v, jax.jit):
    got = f(api.activation_signs)(x)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(jnp.sign(x)))
    np.testing.assert_array_equal(got, jnp.sign(x))  # NaN == NaN for assert_array_equal
  assert got.dtype == x.dtype
  assert jax.grad(lambda v: jnp.sum(api.activation_signs(v)))(x[1:-2]).tolist() == [0.0] * 6


def test_fda_at_the_boundaries():
  """FDA's gradient: the Fourier series inside |v| <= 1 plus the noise path alpha * 0.1 cos(v) everywhere
  (7 features: the noise MLP has width 7 // 64 = 0)."""
  alpha, n = 0.1, 9
  series = sum(np.cos((2 * i + 1) * 0.1 * np.float64(BOUNDARY)) for i in range(n + 1)) * 0.4 / np.pi
  slope = np.where(np.abs(BOUNDARY) <= 1, series, 0) + alpha * 0.1 * np.cos(np.float64(BOUNDARY))
  other_b = (np.sign(OTHER) + alpha * 0.1 * np.sin(OTHER)) * np.mean(np.abs(OTHER))
  y, grad_x = _boundary_run(zoo.linear_op("fda", n=n, alpha=alpha), weight=False)
  noisy_x = np.sign(BOUNDARY) + alpha * 0.1 * np.sin(BOUNDARY)
  np.testing.assert_allclose(y, np.sum(noisy_x * other_b), rtol=1e-6)
  np.testing.assert_allclose(grad_x, slope * other_b, rtol=1e-6)
  _, grad_w = _boundary_run(zoo.linear_op("fda", n=n, alpha=alpha), weight=True)
  other_a = np.sign(OTHER) + alpha * 0.1 * np.sin(OTHER)  # the activation side
  np.testing.assert_allclose(grad_w, slope * other_a * np.mean(np.abs(BOUNDARY)), rtol=1e-6)


def test_fda_noise_mlp_against_the_formula():
  """128 input features give the noise MLPs width 2 (the vectors' 48 give 0): the released NA, written
  in PyTorch's (out, in) layout, with the Fourier STE spelled out."""
  n, alpha = 11, 0.07
  op = zoo.linear_op("fda", n=n, alpha=alpha)
  extras = _initial_extras(op, 128, 3)
  assert extras["weight_noise_fc1"].shape == (128, 2) and extras["act_noise_fc2"].shape == (2, 128)
  x = jax.random.normal(jax.random.key(12), (2, 128)).at[0, :3].set(jnp.array([1.0, -1.0, 0.0]))
  kernel, bias = 0.9 * jax.random.normal(jax.random.key(13), (128, 3)), jnp.array([0.5, 0.0, -0.5])
  g = jax.random.normal(jax.random.key(14), (2, 3))

  def fourier(v):
    series = sum(jnp.cos((2 * i + 1) * 0.1 * v) for i in range(n + 1)) * 0.4 / np.pi
    return explicit_ste(jnp.sign(v), v, jnp.where(jnp.abs(v) <= 1, series, 0.0))

  def noise(v_rows, fc1_kxd, fc2_dxk):  # torch: fc2(relu(fc1(v))) + 0.1 sin(v), Linear weights (out, in)
    return jax.nn.relu(v_rows @ fc1_kxd.T) @ fc2_dxk.T + 0.1 * jnp.sin(v_rows)

  def reference(x, kernel, e):
    w_oi = kernel.T
    w_b = (fourier(w_oi) + alpha * noise(w_oi, e["weight_noise_fc1"].T, e["weight_noise_fc2"].T))
    w_b = w_b * jax.lax.stop_gradient(jnp.mean(jnp.abs(w_oi), axis=1, keepdims=True))
    x_b = fourier(x) + alpha * noise(x, e["act_noise_fc1"].T, e["act_noise_fc2"].T)
    return jnp.sum(g * (x_b @ w_b.T + bias))

  ours = jax.jit(jax.value_and_grad(lambda x, k, e: jnp.sum(g * op.apply(x, k, bias, e, train=True)),
                                    argnums=(0, 1, 2)))(x, kernel, extras)
  expected = jax.jit(jax.value_and_grad(reference, argnums=(0, 1, 2)))(x, kernel, extras)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert np.abs(ours[1][2]["weight_noise_fc1"]).max() > 0


def test_react_threshold_moves_only_the_gradient():
  op = zoo.linear_op("react")
  extras = {"threshold": jnp.full((7,), 0.5)}
  y, grad_x = _boundary_run(op, weight=False, extras=extras)
  # Forward: sign of the unshifted input (sign(-0.5 + 0.5) = 0 would drop a term).
  scale = np.mean(np.abs(OTHER))
  np.testing.assert_allclose(y, scale * np.sum(np.sign(BOUNDARY) * np.sign(OTHER)), rtol=1e-6)
  # Backward: p'(x + 0.5) at x + 0.5 = [-1, -0.5, 0, 0.5, 1, 1.5, 2].
  np.testing.assert_allclose(grad_x, scale * np.array([0, 1, 2, 1, 0, 0, 0]) * np.sign(OTHER), rtol=1e-6)
  grad_t = jax.grad(lambda t: jnp.sum(op.apply(BOUNDARY[None, :], OTHER[:, None], jnp.zeros(1),
                                                {"threshold": t}, train=True)))(extras["threshold"])
  np.testing.assert_allclose(grad_t, grad_x, rtol=1e-6)


def test_lsq_by_hand():
  """2 bits (Qn = -2, Qp = 1), step 1: the clamp window is closed; round half to even."""
  x = jnp.array([-3.0, -2.0, -0.5, 0.75, 1.0, 1.5])
  y, vjp = jax.vjp(lambda x, step: binarydm.lsq_quantize(x, step, 2), x, jnp.float32(1.0))
  np.testing.assert_array_equal(y, [-2, -2, 0, 1, 1, 1])
  grad_x, grad_step = vjp(jnp.ones_like(x))
  np.testing.assert_array_equal(grad_x, [0, 1, 1, 1, 1, 0])
  # Outside: Qn or Qp; inside: round(v) - v = 0, 0.5, 0.25, 0; over sqrt(numel * Qp).
  np.testing.assert_allclose(grad_step, (-2 + 0 + 0.5 + 0.25 + 0 + 1) / np.sqrt(6), rtol=1e-6)


def test_lsq_step_of_an_all_zero_input_is_clamped():
  """The release's per-call step is 0 on an all-zero input; ours is clamped at ALPHA_EPS: no NaN."""
  op = zoo.linear_op("binarydm")
  x = jnp.zeros((2, 3, 8))
  kernel = jax.random.normal(jax.random.key(0), (8, 4))
  extras = {"scale_1": jnp.ones(4), "scale_2": jnp.ones(4), "act_step": jnp.float32(1.0)}
  loss = lambda x, extras: jnp.sum(op.apply(x, kernel, jnp.zeros(4), extras, train=True))
  grads = jax.grad(loss, argnums=(0, 1))(x, extras)
  np.testing.assert_array_equal(op.apply(x, kernel, jnp.zeros(4), extras, train=True), 0.0)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # v = 0 lies inside the clamp window: dL/dx = g @ W_q^T, W_q the op's inference weight.
  w_q = sum(scale * signs for scale, signs in op.weight_planes(kernel, extras))
  np.testing.assert_allclose(grads[0], np.broadcast_to(np.sum(w_q, axis=1), x.shape), rtol=1e-6)


@needs_zoo_vectors
def test_binarydm_activation_operand():
  ref = load_file(ZOO_VECTORS / "binarydm_bnnlinear_order2.safetensors")
  step = binarydm.initial_step(ref["x"], 8)
  assert_rel(step, ref["quantizer_a.alpha"][0], 1e-6, "step")
  assert_rel(binarydm.lsq_quantize(ref["x"], step, 8), ref["linear_input"], 1e-6, "linear_input")


# --- BinaryDM's low-rank representation mimicking --------------------------------------------

@needs_zoo_vectors
def test_lrm_loss_matches_vectors():
  ref = load_file(ZOO_VECTORS / "binarydm_lrm.safetensors")
  loss_fn = zoo.DISTILL_LOSSES["binarydm_lrm"]
  loss, (grad_s, grad_t) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(
      ref["s_feature"], ref["t_feature"], ref["K"])
  assert_rel(loss, ref["loss_mse"], 1e-6, "loss_mse")
  assert_rel(grad_s, ref["grad_s_feature"], 1e-5, "grad_s_feature")
  np.testing.assert_array_equal(grad_t, 0)  # the teacher is detached
  # Our exact PCA is the one the randomized K approximates (K_svd_exact), up to each column's sign.
  exact = binarydm.lrm_projection(ref["t_feature"])
  assert exact.shape == ref["K"].shape == (12, binarydm.lrm_rank(12))
  assert_rel(jnp.abs(exact), np.abs(ref["K_svd_exact"]), 1e-5, "K_svd_exact")
  overlap = exact.T @ ref["K_svd_exact"]
  np.testing.assert_allclose(overlap, np.diag(np.sign(np.diag(overlap))), atol=1e-5)


def test_lrm_by_hand():
  assert [binarydm.lrm_rank(w) for w in (4, 8, 11, 12, 64)] == [2, 2, 2, 3, 16]
  # Features varying along one direction u of the last axis: the rank-1 projection is +-u.
  u = jnp.array([0.6, 0.8, 0.0])
  t = jnp.arange(-2.0, 3.0)[:, None] * u + jnp.array([1.0, 2.0, 3.0])  # a constant offset, centred away
  k = binarydm.lrm_projection(t, rank=1)
  np.testing.assert_allclose(jnp.abs(k[:, 0]), jnp.abs(u), atol=1e-6)
  s = t + jnp.array([1.0, 0.0, 5.0])  # differs by 0.6 along u (and by 5 off u, which K ignores)
  np.testing.assert_allclose(binarydm.lrm_loss(s, t, k), 0.36, rtol=1e-5)
  grad = jax.grad(binarydm.lrm_loss)(s, t, k)  # 2/5 * 0.6 * u per row
  np.testing.assert_allclose(grad, jnp.broadcast_to(0.4 * 0.6 * u, (5, 3)), atol=1e-6)


# --- BiViT and DB-LLM against their formulas ------------------------------------------------

def explicit_ste(forward, v, slope):
  """forward(v) in the forward pass, d/dv = slope (both given): the STE written out by hand."""
  return jax.lax.stop_gradient(forward) + (v - jax.lax.stop_gradient(v)) * jax.lax.stop_gradient(slope)


def test_softmax_aware_binarization_by_hand():
  p = jnp.array([[0.5, 0.2, 0.125, 0.1, 0.075], [0.2, 0.2, 0.2, 0.2, 0.2]])
  op = zoo.prob_op("bivit")
  # Kept: p >= 0.25 * row max (0.125 and 0.05); exactly at the threshold is kept (released `attn < t -> 0`).
  expected = [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
  np.testing.assert_array_equal(op.apply(p, {}, train=True), expected)
  scale, mask = op.planes(p, {})
  np.testing.assert_array_equal(scale * mask, expected)


def test_softmax_aware_gradient_is_the_softmax_gradient():
  """BiViT computes A = B(P).detach() - P.detach() + P: dL/dscores is the softmax's VJP of dL/dA."""
  scores = jax.random.normal(jax.random.key(3), (2, 3, 6)) * 2
  g = jax.random.normal(jax.random.key(4), (2, 3, 6))
  op = zoo.prob_op("bivit")
  def loss(s):
    return jnp.sum(g * op.apply(jax.nn.softmax(s), {}, train=True))
  ours = jax.jit(jax.value_and_grad(loss))(scores)

  def reference(s):
    probs = jax.nn.softmax(s)
    mask = (probs >= 0.25 * jnp.max(probs, axis=-1, keepdims=True)).astype(probs.dtype)
    return jnp.sum(g * explicit_ste(mask, probs, jnp.ones_like(probs)))
  expected = jax.jit(jax.value_and_grad(reference))(scores)
  np.testing.assert_allclose(ours[0], expected[0], rtol=1e-6)
  np.testing.assert_allclose(ours[1], expected[1], rtol=1e-6, atol=1e-7)
  assert np.abs(ours[1]).max() > 0


def test_elastic_prob_op_is_binarize_unsigned():
  p = jax.nn.softmax(jax.random.normal(jax.random.key(5), (2, 4, 4)))
  op = zoo.prob_op("elastic")
  extras = op.calibrate(p, {name: e.init(None, e.shape, jnp.float32) for name, e in op.init_extras().items()})
  np.testing.assert_allclose(extras["alpha"], binarize.unsigned_initial_alpha(p))
  y = op.apply(p, extras, train=True)
  np.testing.assert_array_equal(y, binarize.unsigned_binarize(p, extras["alpha"]))
  scale, mask = op.planes(p, extras)
  np.testing.assert_array_equal(scale * mask, y)


def _bivit_reference(x, kernel, bias, scale):
  """y = sign(x) @ (scale * sign(Wc)) + b, Wc = W - mean per output channel, STE windows |v| < 1."""
  centred = kernel - jnp.mean(kernel, axis=0, keepdims=True)
  x_b = explicit_ste(jnp.sign(x), x, jnp.abs(x) < 1)
  w_b = explicit_ste(jnp.sign(centred), centred, jnp.abs(centred) < 1) * scale
  return x_b @ w_b + bias


def test_bivit_weight_scales_against_the_formula():
  x = jnp.concatenate([BOUNDARY[None, :], jax.random.normal(jax.random.key(6), (4, 7))])  # +-1 and 0 included
  kernel = 0.8 * jax.random.normal(jax.random.key(7), (7, 3))
  kernel = kernel.at[:, 0].set(BOUNDARY)  # mean 0: centred entries at exactly +-1 and 0
  bias = jnp.array([0.1, -0.2, 0.3])
  op = zoo.linear_op("bivit_weight")
  extras = op.calibrate(x, kernel, _initial_extras(op, 7, 3))
  np.testing.assert_allclose(extras["channel_scale"], np.mean(np.abs(kernel), axis=0), rtol=1e-6)
  g = jax.random.normal(jax.random.key(8), (5, 3))

  def loss(fn):
    return lambda x, k, b, s: jnp.sum(g * fn(x, k, b, s))
  args = (x, kernel, bias, extras["channel_scale"])
  apply = lambda x, k, b, s: op.apply(x, k, b, {"channel_scale": s}, train=True)  # noqa: E731
  ours = jax.jit(jax.value_and_grad(loss(apply), argnums=(0, 1, 2, 3)))(*args)
  expected = jax.jit(jax.value_and_grad(loss(_bivit_reference), argnums=(0, 1, 2, 3)))(*args)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # FP inputs (the released 1w32a variant): the input is used as is.
  fp = zoo.linear_op("bivit_weight", activations="fp")
  w_b = extras["channel_scale"] * np.sign(kernel - np.mean(kernel, axis=0))
  np.testing.assert_allclose(fp.apply(x, kernel, bias, extras, train=True), x @ w_b + bias, rtol=1e-6)
  assert fp.activation_planes is None


W_FDB = jnp.array([-2.0, -0.6, -0.5, -0.4, 0.4, 0.5, 1.4, 1.5, 1.6, 3.0])[:, None]


def test_flexible_dual_binarization_by_hand():
  """alpha1 = 2, alpha2 = -1 (s = 1): levels {-1, 0, 1, 2}, thresholds -1/2, 1/2, 3/2."""
  alpha1, alpha2 = jnp.array([2.0]), jnp.array([-1.0])
  w_hat, vjp = jax.vjp(dbllm.dual_binarize, W_FDB, alpha1, alpha2)
  np.testing.assert_array_equal(w_hat[:, 0], [-1, -1, -1, 0, 0, 1, 1, 1, 2, 2])
  grad_w, grad_a1, grad_a2 = vjp(jnp.ones_like(w_hat))
  np.testing.assert_array_equal(grad_w[:, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1, 0])  # inside [-1, 2]
  # d/dalpha_k = sum of plane k: w_b1 = [w >= 1/2] (5 entries); w_b2 = [w <= -1/2] or [1/2 <= w <= 3/2] (6).
  np.testing.assert_array_equal(grad_a1, [5.0])
  np.testing.assert_array_equal(grad_a2, [6.0])
  op = zoo.linear_op("dbllm_fdb")
  extras = op.calibrate(None, W_FDB, _initial_extras(op, 10, 1))
  np.testing.assert_array_equal([extras["alpha1"], extras["alpha2"]], [[3.0], [-1.5]])  # s = max|W| / 2
  planes = op.weight_planes(W_FDB, {"alpha1": alpha1, "alpha2": alpha2})
  np.testing.assert_array_equal(sum(scale * plane for scale, plane in planes), w_hat)
  assert all(set(np.unique(plane).tolist()) <= {0.0, 1.0} for _, plane in planes)


@pytest.mark.parametrize("activations", ["fp", "sign"])
def test_fdb_linear_against_the_formula(activations):
  x = jnp.concatenate([BOUNDARY[None, :], jax.random.normal(jax.random.key(9), (3, 7))])
  kernel = jax.random.normal(jax.random.key(10), (7, 4))
  op = zoo.linear_op("dbllm_fdb", activations=activations)
  extras = op.calibrate(x, kernel, _initial_extras(op, 7, 4))
  bias, g = jnp.linspace(-1, 1, 4), jax.random.normal(jax.random.key(11), (4, 4))

  def reference(x, k, b, a1, a2):
    plane1 = (k - (a1 + a2) / 2 >= 0).astype(k.dtype)
    plane2 = (-(k - a1 * plane1 - a2 / 2) >= 0).astype(k.dtype)
    w_hat = a1 * plane1 + a2 * plane2
    levels = jnp.stack([jnp.zeros_like(a1), a1, a2, a1 + a2])
    inside = (k >= levels.min(0)) & (k <= levels.max(0))
    w_ste = (explicit_ste(w_hat, k, inside) + (a1 - jax.lax.stop_gradient(a1)) * plane1
             + (a2 - jax.lax.stop_gradient(a2)) * plane2)
    x_in = explicit_ste(jnp.sign(x), x, jnp.abs(x) <= 1) if activations == "sign" else x
    return jnp.sum(g * (x_in @ w_ste + b))
  args = (x, kernel, bias, extras["alpha1"], extras["alpha2"])
  ours = jax.jit(jax.value_and_grad(lambda x, k, b, a1, a2: jnp.sum(g * op.apply(
      x, k, b, {"alpha1": a1, "alpha2": a2}, train=True)), argnums=range(5)))(*args)
  expected = jax.jit(jax.value_and_grad(reference, argnums=range(5)))(*args)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert (op.activation_planes is None) == (activations == "fp")


def test_packable_operators():
  packable = {name for name in zoo.LINEAR_OPS if zoo.linear_op(name).packable}
  # FDA adds noise terms, BinaryDM's inputs are 8-bit, FDB's inputs are FP by default (W2A16).
  assert packable == set(zoo.LINEAR_OPS) - {"fda", "binarydm", "binarydm1", "dbllm_fdb"}
  assert zoo.linear_op("dbllm_fdb", activations="sign").packable
  assert not zoo.linear_op("bivit_weight", activations="fp").packable


def test_operators_are_cached():
  assert zoo.linear_op("recu", tau=0.9) is zoo.linear_op("recu", tau=0.9)
  assert zoo.linear_op("recu", tau=0.9) is not zoo.linear_op("recu")
  assert zoo.prob_op("bivit") is zoo.prob_op("bivit")


def test_operator_options_are_checked():
  with pytest.raises(ValueError, match="activations"):
    zoo.linear_op("dbllm_fdb", activations="int8")
  with pytest.raises(ValueError, match="order"):
    zoo.linear_op("binarydm", order=3)
  with pytest.raises(ValueError, match="unknown linear binarizer 'nope'"):
    zoo.linear_op("nope")


def test_dad_loss_by_hand():
  teacher = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0], [5.0, -5.0, 0.0]])
  student = jnp.array([[0.0, 1.0, 0.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  p_t, p_s = np.asarray(jax.nn.softmax(teacher)), np.asarray(jax.nn.softmax(student))
  kl = np.sum(p_t * (np.log(p_t) - np.log(p_s)), axis=-1)
  entropy = -np.sum(p_t * np.log(p_t), axis=-1)
  expected = np.mean(entropy / entropy.mean() * kl)
  loss_fn = zoo.DISTILL_LOSSES["dbllm_dad"]
  np.testing.assert_allclose(loss_fn(student, teacher), expected, rtol=1e-6)
  # The uniform teacher row (most ambiguous) weighs most; equal entropies give plain KL.
  assert entropy.argmax() == 1
  np.testing.assert_allclose(loss_fn(student, jnp.zeros((3, 3))), np.mean(
      np.sum(np.full(3, 1 / 3) * (np.log(1 / 3) - np.log(p_s)), axis=-1)), rtol=1e-6)
  # Gradient: the weights are constants, the teacher is detached; d KL / d student logits = p_s - p_t.
  grad_s, grad_t = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(student, teacher)
  weight = entropy / entropy.mean()
  np.testing.assert_allclose(grad_s, weight[:, None] * (p_s - p_t) / 3, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grad_t, 0)
  assert loss_fn(teacher, teacher) == pytest.approx(0, abs=1e-7)
