"""DB-LLM's Flexible Dual Binarization and Deviation-Aware Distillation (Chen et al., "DB-LLM: Accurate
Dual-Binarization for Efficient LLMs", Findings of ACL 2024). The authors released no code
(Hon-Chen/DB-LLM holds a README only).

The paper's method section was not reachable from this machine; the FDB equations below are the
paper's as reproduced in public summaries of it (its variables kept):
  w_hat = alpha1 * w_b1 + alpha2 * w_b2,  w_b1, w_b2 in {0, 1},
  w_b1 = H(w - (alpha1 + alpha2) / 2),  w_b2 = H(-(w - alpha1 w_b1 - alpha2 / 2)),  H(v) = [v >= 0],
  alpha1, alpha2 learned, initialised from the 2-bit uniform quantizer's step s as alpha1 = 2s, alpha2 = -s,
  trained with a straight-through estimator.
With those inits the four levels are {-s, 0, s, 2s} and the thresholds -s/2, s/2, 3s/2: FDB is the
2-bit quantizer (rounding to the nearest level) written as two binary planes.

Our choices where the text gives no detail: s per output channel, the signed 2-bit min-max step
s = max|W_c| / 2; the STE passes dL/dw_hat to w inside the levels' range [min level, max level] (as a
uniform quantizer's clip window) and 0 outside; alpha_k gets sum_in dL/dw_hat * w_bk (the planes held
fixed). The paper quantizes weights only (activations in FP16); activations="sign" gives a
W(1+1)A1 variant for the binary student.

Deviation-Aware Distillation: the summaries say only that it "emphasizes ambiguous samples through
entropy-based reweighting" of the distillation; see `dad_loss` for the form we chose.
"""
import jax
import jax.numpy as jnp

from bipft_jax.zoo import api
from bipft_jax.zoo.ste import check_input_mode, input_operand, sign_activation_planes


def _planes(w, alpha1, alpha2):
  plane1 = (w - (alpha1 + alpha2) / 2 >= 0).astype(w.dtype)
  plane2 = (-(w - alpha1 * plane1 - alpha2 / 2) >= 0).astype(w.dtype)
  return plane1, plane2


@jax.custom_vjp
def dual_binarize(w_IxO: jax.Array, alpha1_O: jax.Array, alpha2_O: jax.Array) -> jax.Array:
  """FDB: alpha1 * w_b1 + alpha2 * w_b2 (module docstring), scales per output channel (last axis)."""
  plane1, plane2 = _planes(w_IxO, alpha1_O, alpha2_O)
  return alpha1_O * plane1 + alpha2_O * plane2


def _dual_binarize_bwd(res, g):
  w, alpha1, alpha2 = res
  plane1, plane2 = _planes(w, alpha1, alpha2)
  levels = jnp.stack([jnp.zeros_like(alpha1), alpha1, alpha2, alpha1 + alpha2])
  inside = (w >= jnp.min(levels, axis=0)) & (w <= jnp.max(levels, axis=0))
  return jnp.where(inside, g, jnp.zeros_like(g)), jnp.sum(g * plane1, axis=0), jnp.sum(g * plane2, axis=0)


dual_binarize.defvjp(lambda w, a1, a2: (dual_binarize(w, a1, a2), (w, a1, a2)), _dual_binarize_bwd)


def initial_step(kernel_IxO: jax.Array) -> jax.Array:
  """s per output channel: the signed 2-bit min-max step max|W_c| / 2^(2-1)."""
  return jnp.max(jnp.abs(kernel_IxO), axis=0) / 2


def flexible_dual_binarization(activations: str = "fp") -> api.LinearOp:
  """DB-LLM's FDB Linear: y = x @ (alpha1 w_b1 + alpha2 w_b2) + b (module docstring); `calibrate`
  sets alpha1 = 2s, alpha2 = -s from the kernel. Inference is two {0, 1} planes with per-output
  scales. activations="sign" binarizes the input too (sign, gradient where |x| <= 1)."""
  check_input_mode(activations)

  def init_extras(in_features, out_features):
    return {name: api.Extra(jax.nn.initializers.zeros, (out_features,), api.WEIGHT_SCALE, (api.OUT,))
            for name in ("alpha1", "alpha2")}

  def apply(x, kernel, bias, extras, *, train):
    w_hat = dual_binarize(kernel, extras["alpha1"], extras["alpha2"])
    return api.linear(input_operand(x, activations, True), w_hat) + bias

  def calibrate(x, kernel, extras):
    step = initial_step(kernel)
    return {**extras, "alpha1": 2 * step, "alpha2": -step}

  def weight_planes(kernel, extras):
    plane1, plane2 = _planes(kernel, extras["alpha1"], extras["alpha2"])
    return [(extras["alpha1"], plane1), (extras["alpha2"], plane2)]

  return api.LinearOp("dbllm_fdb", apply, init_extras, calibrate=calibrate, weight_planes=weight_planes,
                      activation_planes=sign_activation_planes(activations),
                      doc=flexible_dual_binarization.__doc__)


def _entropy(log_p):
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def dad_loss(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
  """Deviation-aware distillation over the last (class) axis, averaged over all other positions:

    L = mean_i w_i KL(p_T,i || p_S,i),  w_i = H(p_T,i) / mean_j H(p_T,j)  (no gradient through w),

  H the entropy. Our reading of "entropy-based reweighting that emphasizes ambiguous samples": the
  teacher's entropy measures a position's ambiguity, normalised so that the loss keeps the scale of
  plain KL distillation (uniform entropies give exactly KL). The teacher is detached."""
  log_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits), axis=-1)
  log_s = jax.nn.log_softmax(student_logits, axis=-1)
  kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
  entropy = _entropy(log_t)
  weight = entropy / jnp.maximum(jnp.mean(entropy), jnp.finfo(entropy.dtype).tiny)
  return jnp.mean(weight * kl)
