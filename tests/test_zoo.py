"""The binarizer zoo against its authors' vectors (`shared/zoo_vectors`) and against hand values."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from bipft_jax import zoo
from bipft_jax.zoo import bibench, binarydm
from reference_data import ZOO_VECTORS, needs_zoo_vectors


def _manifest() -> dict:
  return json.loads((ZOO_VECTORS / "manifest.json").read_text())


def assert_rel(ours, ref, rel, what=""):
  """|ours - ref| <= rel * |ref| by Frobenius norm (exact zeros where ref is all zero)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err, scale = np.linalg.norm(ours - ref), np.linalg.norm(ref)
  assert err <= rel * scale if scale > 0 else err == 0, f"{what}: relative error {err / max(scale, 1e-30):.3g}"


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
    "recu_sched": (lambda: zoo.linear_op("recu", **bibench.recu_schedule(10, 3)), {"alpha": ("alpha", _flat)}),
    "fda": (lambda: zoo.linear_op("fda"), _fda_extras()),
    "fda_sched": (lambda: zoo.linear_op("fda", **bibench.fda_schedule(10, 3)), _fda_extras()),
    "binarydm_bnnlinear_order2": (lambda: zoo.linear_op("binarydm"), {
        "scale_1": ("scaling_first_order", _flat), "scale_2": ("scaling_second_order", _flat),
        "act_step": ("quantizer_a.alpha", lambda a: a.reshape(()))}),
    "binarydm_bnnlinear_order1": (lambda: zoo.linear_op("binarydm1"), {
        "scale_1": ("scaling_first_order", _flat), "act_step": ("quantizer_a.alpha", lambda a: a.reshape(()))}),
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


@needs_zoo_vectors
def test_every_vector_file_has_a_case():
  assert set(_vector_files()) == set(CASES) | {"binarydm_lrm"}


@needs_zoo_vectors
@pytest.mark.parametrize("case", sorted(CASES))
def test_operator_matches_vectors(case):
  ref = load_file(ZOO_VECTORS / _manifest()["operators"][case]["file"])
  make_op, extra_names = CASES[case]
  op = make_op()
  x, kernel, bias, g = ref["x"], ref["weight"].T, ref["bias"], ref["g"]
  extras = {name: to_ours(ref[torch_name]) for name, (torch_name, to_ours) in extra_names.items()}
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
  for name, (torch_name, to_ours) in extra_names.items():
    what = f"grad_{torch_name}"
    if what in README_TOLERANCE:
      assert_readme_tolerance(grad_extras[name], to_ours(ref[what]), what)
    else:
      assert_rel(grad_extras[name], to_ours(ref[what]), 1e-5, what)


@needs_zoo_vectors
@pytest.mark.parametrize("case", sorted(CASES))
def test_inference_planes_are_the_operands(case):
  """The weight (activation) planes sum to the operand the authors' final F.linear call got."""
  ref = load_file(ZOO_VECTORS / _manifest()["operators"][case]["file"])
  make_op, extra_names = CASES[case]
  op = make_op()
  extras = {name: to_ours(ref[torch_name]) for name, (torch_name, to_ours) in extra_names.items()}
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
  x, kernel = jax.random.normal(jax.random.key(1), (2, 3, 7)), 0.7 * jax.random.normal(jax.random.key(2), (7, 4))
  extras, bias, g = _initial_extras(op, 7, 4), jnp.linspace(-1, 1, 4), jnp.cos(jnp.arange(24.0)).reshape(2, 3, 4)
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
  (_, y), (grad_x, grad_kernel, _, grad_extras) = _loss_and_grads(
      op, ref["x"], ref["weight"].T, ref["bias"], extras, ref["g"], train=False)
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
  y, grads = jax.value_and_grad(lambda x, k: jnp.sum(op.apply(x, k, jnp.zeros(1), extras, train=train)),
                                argnums=(0, 1))(x, kernel)
  return y, grads[1][:, 0] if weight else grads[0][0]


# The gradient of the probed side is c * window * sign(OTHER) (1 x 7 by 7 x 1: the other side's sign
# enters each entry; its scales only give c). XNOR's weight gradient passes its centring (mixes
# entries), ReCU's its standardisation: their weight windows are tested on the quantizers below.
WINDOWS = {  # name -> (activation window, weight window, train)
    "bnn": (CLOSED, CLOSED, True), "xnor": (CLOSED, None, True), "xnorplusplus": (OPEN, OPEN, True),
    "dorefa": (OPEN, OPEN, True), "bireal": (POLYNOMIAL, CLOSED, True), "react": (POLYNOMIAL, CLOSED, True),
    "recu": (POLYNOMIAL, None, False),  # eval mode: the window on the raw input
}


@pytest.mark.parametrize("name, weight", [(name, weight) for name in sorted(WINDOWS) for weight in (False, True)
                                          if WINDOWS[name][weight] is not None])
def test_gradient_windows_at_the_boundaries(name, weight):
  window = WINDOWS[name][1 if weight else 0]
  op = zoo.linear_op(name)
  _, grad = _boundary_run(op, weight=weight, train=WINDOWS[name][2])
  expected = np.asarray(window, np.float32) * np.sign(OTHER)
  np.testing.assert_allclose(grad, grad[4] / expected[4] * expected, rtol=1e-6, atol=0)
  assert grad[4] != 0


@pytest.mark.parametrize("name", [n for n in zoo.LINEAR_OPS if n != "fda"])
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


# --- BinaryDM's low-rank representation mimicking --------------------------------------------

@needs_zoo_vectors
def test_lrm_loss_matches_vectors():
  ref = load_file(ZOO_VECTORS / "binarydm_lrm.safetensors")
  loss_fn = zoo.DISTILL_LOSSES["binarydm_lrm"]
  loss, (grad_s, grad_t) = jax.value_and_grad(loss_fn, argnums=(0, 1))(ref["s_feature"], ref["t_feature"], ref["K"])
  assert_rel(loss, ref["loss_mse"], 1e-6, "loss_mse")
  assert_rel(grad_s, ref["grad_s_feature"], 1e-5, "grad_s_feature")
  np.testing.assert_array_equal(grad_t, 0)  # the teacher is detached
  # Our exact PCA is the one the randomized K approximates (K_svd_exact), up to each column's sign.
  exact = binarydm.lrm_projection(ref["t_feature"])
  assert exact.shape == ref["K"].shape == (12, binarydm.lrm_rank(12))
  assert_rel(jnp.abs(exact), np.abs(ref["K_svd_exact"]), 1e-5, "K_svd_exact")
  np.testing.assert_allclose(exact.T @ ref["K_svd_exact"], np.diag(np.sign(np.diag(exact.T @ ref["K_svd_exact"]))),
                             atol=1e-5)


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
