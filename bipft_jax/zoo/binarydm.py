"""BinaryDM's learnable multi-basis binarizer and its low-rank representation mimicking (LRM) loss.

From the authors' release (Xingyu-Zheng/BinaryDM, `ours_util.py` BNNLinear and _ActQ, `ddpm_ours.py`
p_losses; vectors in `shared/zoo_vectors`). The weight is s1 sign(W) + s2 sign(W - s1 sign(W)) (order 2)
or s1 sign(W) (order 1), with learned per-output-channel scales the first call sets from the data;
activations go through an LSQ quantizer (8 bits as released; the paper reports 4).
"""
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from bipft_jax import binarize
from bipft_jax.zoo import api
from bipft_jax.zoo.ste import sign_ste


def _levels(bits: int) -> tuple:
  return -2 ** (bits - 1), 2 ** (bits - 1) - 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def lsq_quantize(x: jax.Array, step: jax.Array, bits: int) -> jax.Array:
  """round(clip(x / step, Qn, Qp)) * step (round half to even), one step for the tensor.

  Backward (LSQ, as the release's grad_scale/round_pass): dx = g inside Qn <= x/step <= Qp (closed);
  dstep = sum(g * (round(v) - v inside, Qn or Qp outside)) / sqrt(numel(x) * Qp).

  Decision (not the release's): the step is clamped from below at binarize.ALPHA_EPS, as the BiPFT
  release clamps its alphas. The release divides by a step re-derived from each call's input, which is
  0 on an all-zero input (a fresh student's attention context) and gives NaN."""
  qn, qp = _levels(bits)
  step = binarize.clamped(step)
  return jnp.round(jnp.clip(x / step, qn, qp)) * step


def _lsq_fwd(x, step, bits):
  return lsq_quantize(x, step, bits), (x, step)


def _lsq_bwd(bits, res, g):
  x, step = res
  qn, qp = _levels(bits)
  v = x / binarize.clamped(step)
  inside = (v >= qn) & (v <= qp)
  slope = jnp.where(inside, jnp.round(v) - v, jnp.clip(v, qn, qp))
  grad_step = jnp.sum(g * slope) / np.sqrt(x.size * qp)
  return jnp.where(inside, g, jnp.zeros_like(g)), grad_step.astype(step.dtype).reshape(step.shape)


lsq_quantize.defvjp(_lsq_fwd, _lsq_bwd)


@jax.custom_vjp
def _overwritten(param: jax.Array, value: jax.Array) -> jax.Array:
  """`value` in the forward; its gradient goes to `param` (the release's `param.data.copy_(value)`)."""
  del param
  return value


_overwritten.defvjp(lambda param, value: (value, None), lambda _, g: (g, None))


def initial_step(x: jax.Array, bits: int) -> jax.Array:
  """The release's LSQ step init: 2 mean|x| / sqrt(Qp)."""
  return 2 * jnp.mean(jnp.abs(x)) / np.sqrt(_levels(bits)[1])


def _weight(kernel, extras, order):
  """s1 sign(W) [+ s2 sign(R), R = W - s1 sign(W) not detached]; both signs pass |v| <= 1."""
  first = sign_ste(kernel, True) * extras["scale_1"]
  if order == 1:
    return first
  return first + sign_ste(kernel - first, True) * extras["scale_2"]


def _scale_init(key, shape, dtype):
  return jax.random.uniform(key, shape, dtype) * 0.001  # the constructor's rand * 0.001


def binarydm(order: int = 2, activation_bits: int = 8, reset_step_every_call: bool = True) -> api.LinearOp:
  """BinaryDM's BNNLinear: y = LSQ(x) @ W_q + b, W_q = s1 sign(W) + s2 sign(R) (order 2) or s1 sign(W).

  s1, s2: learned per output channel; `calibrate` does the release's first-call init s1 = mean|W|,
  s2 = mean|R| per output channel, step = 2 mean|x| / sqrt(Qp). Gradients (autodiff around the STEs):
  dL/ds2 = sum G sign(R); dR = [|R| <= 1] G s2; dL/d(s1 sign W) = G - dR; dL/dW = dR + [|W| <= 1] s1 (G - dR).

  reset_step_every_call=True reproduces the release's bug: _ActQ sets `init_state` but tests
  `init_scale`, so the LSQ step is re-derived from x on EVERY call (its learned value never takes
  effect; its gradient is still computed). False: the step is set once by `calibrate`, then learned.
  """
  if order not in (1, 2):
    raise ValueError(f"BinaryDM's binarizer has order 1 or 2, got {order}")

  def init_extras(in_features, out_features):
    scales = {f"scale_{k}": api.Extra(_scale_init, (out_features,), api.WEIGHT_SCALE, (api.OUT,))
              for k in range(1, order + 1)}
    return {**scales, "act_step": api.Extra(jax.nn.initializers.ones, (), api.ACTIVATION_SCALE, ())}

  def apply(x, kernel, bias, extras, *, train):
    step = extras["act_step"]
    if reset_step_every_call:
      step = _overwritten(step, jax.lax.stop_gradient(initial_step(x, activation_bits)))
    return api.linear(lsq_quantize(x, step, activation_bits), _weight(kernel, extras, order)) + bias

  def calibrate(x, kernel, extras):
    scale_1 = jnp.mean(jnp.abs(kernel), axis=0)
    new = {"scale_1": scale_1, "act_step": initial_step(x, activation_bits)}
    if order == 2:
      new["scale_2"] = jnp.mean(jnp.abs(kernel - jnp.sign(kernel) * scale_1), axis=0)
    return {**extras, **new}

  def weight_planes(kernel, extras):
    planes = [(extras["scale_1"], jnp.sign(kernel))]
    if order == 2:
      planes.append((extras["scale_2"], jnp.sign(kernel - jnp.sign(kernel) * extras["scale_1"])))
    return planes

  return api.LinearOp(f"binarydm{'' if order == 2 else order}", apply, init_extras, calibrate=calibrate,
                      weight_planes=weight_planes, doc=binarydm.__doc__)


# --- low-rank representation mimicking --------------------------------------------------------

def lrm_rank(width: int) -> int:
  """The release's projection rank: q = W // 4 if W // 4 > 2 else 2."""
  return width // 4 if width // 4 > 2 else 2


def lrm_projection(t_feature: jax.Array, rank: Optional[int] = None) -> jax.Array:
  """K (W x q): the top-q principal directions of the teacher feature flattened to (-1, W).

  W is the LAST axis (for the release's (N, C, H, W) UNet features, the spatial width). The release
  computes K once with the randomized `torch.pca_lowrank(..., center=True, niter=2)` and caches it;
  this is the exact PCA it approximates."""
  flat = t_feature.reshape(-1, t_feature.shape[-1])
  _, _, vt = jnp.linalg.svd(flat - jnp.mean(flat, axis=0), full_matrices=False)
  return vt[:rank or lrm_rank(flat.shape[-1])].T


def lrm_loss(s_feature: jax.Array, t_feature: jax.Array, projection: jax.Array) -> jax.Array:
  """mean((s K - t K)^2) over all entries, the teacher side detached (LRM, BinaryDM eq. in p_losses).

  The release averages this over the hooked features and weighs the sum by 1e-4; that weighting is
  the training loop's."""
  t_feature = jax.lax.stop_gradient(t_feature)
  return jnp.mean((s_feature @ projection - t_feature @ projection) ** 2)
