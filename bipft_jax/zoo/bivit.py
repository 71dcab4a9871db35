"""BiViT's binarizers (He et al., "BiViT: Extremely Compressed Binary Vision Transformers", ICCV 2023).

The paper's method section was not reachable from this machine (only its abstract: "Softmax-aware
Binarization, which dynamically adapts to the data distribution", "Parameterized Weight Scales which
introduce learnable scaling factors for weight binarization"). The formulas below are read from the
first author's public modules (github.com/ThisisBillhe/BiViT @ 6b34303, `binary_modules/utils_quant.py`
SoftmaxBinaryQuantizer and BinaryLinear_adapscaling, `utils_model.py` BiAttention_SAB), which are
that description made concrete:

  Softmax-aware binarization (per query row i of an attention map with scores s_i = q_i K^T / sqrt(d)):
    P_i = softmax(s_i);  B(P)_ij = 1 if P_ij >= tau * max_j P_ij else 0,  tau = 0.25;
    A = B(P).detach() - P.detach() + P      (forward {0, 1}, no scale; backward through the softmax).
  Parameterized weight scales (per output channel c):
    W_b = a_c * sign(W - mean_c(W)),  a_c learned, set on the first call to mean_c |W|;
    activations sign(x); both signs pass the gradient where |v| < 1 (ge/le masks: +-1 blocked).
"""
import jax
import jax.numpy as jnp

from bipft_jax.zoo import api
from bipft_jax.zoo.ste import check_input_mode, input_operand, sign_activation_planes, sign_ste

SAB_THRESHOLD = 0.25  # the released ratio to the row maximum


@jax.custom_vjp
def softmax_aware_binarize(p: jax.Array) -> jax.Array:
  """1[p >= 0.25 max_row(p)] over the last axis; the gradient passes to p unchanged (the released
  `B.detach() - P.detach() + P`), so it reaches the scores through the caller's softmax."""
  return (p >= SAB_THRESHOLD * jnp.max(p, axis=-1, keepdims=True)).astype(p.dtype)


softmax_aware_binarize.defvjp(lambda p: (softmax_aware_binarize(p), None), lambda _, g: (g,))


def softmax_aware() -> api.ProbOp:
  """BiViT's softmax-aware binarization of attention probabilities (see the module docstring)."""
  return api.ProbOp("bivit", lambda p, extras, *, train: softmax_aware_binarize(p), lambda: {},
                    planes=lambda p, extras: (jnp.ones((), p.dtype), softmax_aware_binarize(p)),
                    doc=softmax_aware.__doc__)


def weight_scales(activations: str = "sign") -> api.LinearOp:
  """BiViT's Linear with parameterized (learned, per output channel) weight scales:
  y = sign(x) @ (a * sign(W - mean W)) + b; `calibrate` sets a = mean|W| (the released first call).
  activations="fp" is the released 1w32a variant (full-precision inputs)."""
  check_input_mode(activations)

  def init_extras(in_features, out_features):
    return {"channel_scale": api.Extra(jax.nn.initializers.zeros, (out_features,), api.WEIGHT_SCALE,
                                       (api.OUT,))}

  activation_planes = sign_activation_planes(activations)

  def weight_planes(kernel, extras):
    return [(extras["channel_scale"], jnp.sign(api.centred_per_output(kernel)))]

  def apply(x, kernel, bias, extras, *, train):
    w_b = sign_ste(api.centred_per_output(kernel), False) * extras["channel_scale"]
    x_b = input_operand(x, activations, False)
    if activation_planes is None:  # full-precision inputs: nothing to factor out
      return api.linear(x_b, w_b) + bias
    return api.factored_linear(x_b, w_b, activation_planes(x, extras), *weight_planes(kernel, extras)) + bias

  return api.LinearOp(
      "bivit_weight", apply, init_extras,
      calibrate=lambda x, kernel, extras: {**extras, "channel_scale": jnp.mean(jnp.abs(kernel), axis=0)},
      weight_planes=weight_planes, activation_planes=activation_planes, doc=weight_scales.__doc__)
