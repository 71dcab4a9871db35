"""The binarizer zoo against its authors' vectors (`shared/zoo_vectors`) and against hand values."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from bipft_jax import zoo
from reference_data import ZOO_VECTORS, needs_zoo_vectors


def _manifest() -> dict:
  return json.loads((ZOO_VECTORS / "manifest.json").read_text())


def assert_rel(ours, ref, rel, what=""):
  """|ours - ref| <= rel * |ref| by Frobenius norm (exact zeros where ref is all zero)."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (what, ours.shape, ref.shape)
  err, scale = np.linalg.norm(ours - ref), np.linalg.norm(ref)
  assert err <= rel * scale if scale > 0 else err == 0, f"{what}: relative error {err / max(scale, 1e-30):.3g}"


# Each vector file: the operator, and how its PyTorch extras map to ours (name -> (torch name, to_ours)).
# to_ours is linear (a reshape or transpose), so it maps the parameter's gradient too.
CASES = {
    "bnn": (lambda: zoo.linear_op("bnn"), {}),
}


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
def test_every_case_has_a_vector_file():
  assert set(CASES) <= set(_vector_files())


@needs_zoo_vectors
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_operator_matches_vectors(case, jit):
  ref = load_file(ZOO_VECTORS / _manifest()["operators"][case]["file"])
  make_op, extra_names = CASES[case]
  op = make_op()
  x, kernel, bias, g = ref["x"], ref["weight"].T, ref["bias"], ref["g"]
  extras = {name: to_ours(ref[torch_name]) for name, (torch_name, to_ours) in extra_names.items()}
  assert set(extras) == set(op.init_extras(*kernel.shape))
  run = jax.jit(_loss_and_grads, static_argnums=(0, 6)) if jit else _loss_and_grads
  (_, y), (grad_x, grad_kernel, grad_bias, grad_extras) = run(op, x, kernel, bias, extras, g)
  assert_rel(y, ref["y"], 1e-6, "y")
  assert_rel(grad_x, ref["grad_x"], 1e-5, "grad_x")
  assert_rel(grad_kernel, ref["grad_weight"].T, 1e-5, "grad_weight")
  assert_rel(grad_bias, ref["grad_bias"], 1e-5, "grad_bias")
  for name, (torch_name, to_ours) in extra_names.items():
    assert_rel(grad_extras[name], to_ours(ref[f"grad_{torch_name}"]), 1e-5, f"grad_{torch_name}")


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
    assert_rel(w, ref["linear_weight"].T, 1e-6, "weight planes")
  if op.activation_planes is not None:
    scale, signs = op.activation_planes(ref["x"], extras)
    assert_rel(scale * signs, ref["linear_input"].reshape(ref["x"].shape), 1e-6, "activation plane")


# --- boundaries: sign(0) = 0 and the STE window at exactly +-1 ------------------------------

BOUNDARY = jnp.array([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5])


def _boundary_grads(op, *, weight: bool):
  """Forward signs and gradients of a (1 x 7) input against a 7 x 1 kernel; the probed side is BOUNDARY."""
  x, kernel = BOUNDARY[None, :], BOUNDARY[:, None]
  fixed = jnp.full_like(BOUNDARY, 0.25)
  x, kernel = (fixed[None, :], kernel) if weight else (x, fixed[:, None])
  extras = {name: e.init(jax.random.key(0), e.shape, jnp.float32)
            for name, e in op.init_extras(7, 1).items()}
  grads = jax.grad(lambda x, k: jnp.sum(op.apply(x, k, jnp.zeros(1), extras, train=True)), argnums=(0, 1))(x, kernel)
  return grads[1][:, 0] if weight else grads[0][0]


@pytest.mark.parametrize("weight", [False, True], ids=["activation", "weight"])
def test_bnn_boundaries(weight):
  op = zoo.linear_op("bnn")
  assert op.activation_planes(BOUNDARY, {})[1].tolist() == [-1, -1, -1, 0, 1, 1, 1]
  # The window is closed: v = +-1 passes (gt/lt masks). The other side's signs are all +1 here.
  np.testing.assert_array_equal(_boundary_grads(op, weight=weight), [0, 1, 1, 1, 1, 1, 0])
