"""The contract every zoo binarizer fulfils, so a layer can take one as a policy object.

A binarized Linear operator (`LinearOp`) owns the whole layer forward of its authors' code: it gets
the FP kernel (flax layout, in x out), the bias and its own extra parameters, and returns the output.
What each extra parameter is (`Extra.kind`) is declared here, where it is made, so that optimizers,
summaries and exporters never infer it from a leaf name.
"""
import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from bipft_jax.kinds import ACTIVATION_SCALE, FP, WEIGHT_SCALE

Array = jax.Array
Initializer = Callable[[Array, tuple, Any], Array]  # flax style: (key, shape, dtype) -> array

# The kinds an extra parameter may have (kinds.py defines them all): a weight scale multiplies the
# weight's sign plane(s) per output channel (or per tensor) and may be folded into a packed weight;
# an activation scale multiplies or steps the activation quantizer; FP is any other trained
# full-precision tensor (thresholds, noise MLPs).
KINDS = (WEIGHT_SCALE, ACTIVATION_SCALE, FP)

# The axis names of `Extra.axes`: which layer dimension an extra tensor's axis follows.
IN, OUT = "in", "out"


class Extra(NamedTuple):
  """One extra parameter of an operator: its initializer, shape, kind and per-axis layer axis."""
  init: Initializer
  shape: tuple
  kind: str
  axes: tuple = ()  # one of IN, OUT or None per dimension of `shape` (for sharding rules)


# A plane is (scale, signs) with signs in {-1, 0, +1} and a scale that broadcasts against them: for
# a weight () or (O,) (one per output channel), for an activation () or (..., 1) (one per token).
# Inference computes (a_scale * a_signs) @ sum_k (w_scale_k * w_signs_k) [+ bias if uses_bias].
Plane = tuple


@dataclasses.dataclass(frozen=True)
class LinearOp:
  """A binarized Linear layer as its authors compute it.

  apply(x_...xI, kernel_IxO, bias_O, extras, *, train) -> y_...xO: the training forward; every
    quantizer in it is a `jax.custom_vjp` with its authors' backward. `train` switches the few
    operators whose forward or backward differs in eval mode (ReCU's activation normalisation).
  init_extras(in_features, out_features) -> {name: Extra}: the parameters beyond kernel and bias.
  calibrate(x_...xI, kernel_IxO, extras) -> extras: the data-dependent init the authors' first
    forward does (None when there is none).
  weight_planes(kernel_IxO, extras) -> [(scale, signs_IxO), ...]: the inference weight as a sum of
    scaled sign planes; None when it is not one.
  activation_planes(x_...xI, extras) -> (scale, signs_...xI): the inference activation as one
    scaled sign plane; None when it is not one (8-bit, noise terms, full precision).
  uses_bias: whether the forward adds `bias` (Bi-Real and ReAct own one but never add it).
  elementwise_activation: activation_planes' signs are elementwise in x (channel by channel) and its
    scale does not depend on x, so a packed forward may tabulate them (packed.py's FFN table).
  """
  name: str
  apply: Callable[..., Array]
  init_extras: Callable[[int, int], dict]
  calibrate: Optional[Callable[[Array, Array, dict], dict]] = None
  weight_planes: Optional[Callable[[Array, dict], list]] = None
  activation_planes: Optional[Callable[[Array, dict], Plane]] = None
  uses_bias: bool = True
  elementwise_activation: bool = False
  doc: str = ""

  @property
  def packable(self) -> bool:
    """Inference is scaled sign planes on both operands, so a packed forward can run it."""
    return self.weight_planes is not None and self.activation_planes is not None


@dataclasses.dataclass(frozen=True)
class ProbOp:
  """A binarizer of attention probabilities p (after the softmax; rows sum to 1 over the last axis).

  apply(p_...xL, extras, *, train) -> the binarized probabilities; gradients flow back to p, and
    through the caller's softmax to the scores.
  init_extras() -> {name: Extra}: its parameters (scalars or none).
  calibrate(p, extras) -> extras: the data-dependent first-call init (None when there is none).
  planes(p, extras) -> (scale, mask_...xL): inference as a scale times a {0, 1} mask (None if not).
  """
  name: str
  apply: Callable[..., Array]
  init_extras: Callable[[], dict]
  calibrate: Optional[Callable[[Array, dict], dict]] = None
  planes: Optional[Callable[[Array, dict], Plane]] = None
  doc: str = ""


def no_extras(in_features: int, out_features: int) -> dict:
  """`init_extras` of an operator without extra parameters."""
  del in_features, out_features
  return {}


def linear(x_NxI: Array, w_IxO: Array) -> Array:
  """x @ W over the last axis of x (the matmul precision is the caller's jax default)."""
  return jnp.einsum("...i,io->...o", x_NxI, w_IxO)


@jax.custom_vjp
def factored_linear(x_b: Array, w_b: Array, x_plane: Plane, w_plane: Plane) -> Array:
  """linear(x_b, w_b) of two scaled sign planes, x_b = x_scale * x_signs and w_b = w_scale * w_signs,
  given beside their planes (x_scale () or (..., 1), w_scale () or (O,)).

  Computed as (x_signs @ w_signs) * (x_scale * w_scale): the sums of signs are exact integers in fp32
  and the scales multiply once, after them, as the packed forward computes its counts (and
  model.binary_einsum a product of per-tensor scales), so both give the same numbers. Gradients are
  the plain product's, to x_b and w_b (and through them their quantizers' backward); none to the planes.
  """
  (x_scale, x_signs), (w_scale, w_signs) = x_plane, w_plane
  return linear(x_signs, w_signs) * (x_scale * w_scale)


def _factored_linear_bwd(residuals, g):
  x_b, w_b, x_plane, w_plane = residuals
  _, vjp = jax.vjp(linear, x_b, w_b)
  return (*vjp(g), jax.tree.map(jnp.zeros_like, x_plane), jax.tree.map(jnp.zeros_like, w_plane))


factored_linear.defvjp(lambda *args: (factored_linear(*args), args), _factored_linear_bwd)


def per_output_mean(v_IxO: Array) -> Array:
  """One value per output channel: the mean over the input axis, shape (1, O).

  PyTorch weights are (out, in), so the authors' `mean(dim=-1)` of a weight is this mean."""
  return jnp.mean(v_IxO, axis=0, keepdims=True)


def centred_per_output(v_IxO: Array) -> Array:
  """v minus its per-output-channel mean (XNOR's, ReCU's and BiViT's weight centring)."""
  return v_IxO - per_output_mean(v_IxO)


def activation_signs(x: Array) -> Array:
  """jnp.sign(x) exactly (sign(+-0) = +-0, sign(NaN) = NaN, zero gradient): an activation plane's signs.

  Written as two selects because the packed forward packs bits straight from it: with XLA:CPU's
  own `sign` op in those fusions LLVM left them scalar, and the whole popcount forward took 1.1-1.2x
  as long (AMD EPYC, bench/packed_inference.py).
  """
  return jnp.where(x > 0, jnp.ones_like(x), jnp.where(x < 0, -jnp.ones_like(x), x * 0))


def unit_plane(signs: Array) -> Plane:
  """A sign plane without a scale."""
  return jnp.ones((), signs.dtype), signs
