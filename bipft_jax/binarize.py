"""1-bit quantizers with straight-through gradients (METHOD.md sections 1-2).

Every binarizer is a `jax.custom_vjp` whose backward is exactly the release's:
BWN weights pass gradients straight through; activation binarizers clip the
straight-through gradient to the quantizer's window and give the learned scale
alpha an LSQ gradient scaled by 1/sqrt(numel).
"""
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

# The release clamps alpha from below in the forward (torch.where(alpha > eps, alpha, eps)) inside
# its autograd Function, so the clamp masks no gradient: a clamped alpha still gets its LSQ gradient
# (computed with the clamped value) and can grow back.
ALPHA_EPS = 1e-5


def clamped(alpha: jax.Array) -> jax.Array:
  """A learned scale clamped from below at ALPHA_EPS, as the release does in its forward."""
  return jnp.where(alpha > ALPHA_EPS, alpha, jnp.asarray(ALPHA_EPS, alpha.dtype))


def _grad_scale(x: jax.Array) -> float:
  return 1.0 / float(x.size) ** 0.5


# --- weights ---------------------------------------------------------------

@jax.custom_vjp
def bwn(w: jax.Array) -> jax.Array:
  """Layer-wise BWN: mean(|W|) * sign(W - mean(W)); sign(0) = 0."""
  return jnp.mean(jnp.abs(w)) * jnp.sign(w - jnp.mean(w))


@jax.custom_vjp
def bwn_rowwise(w_VxD: jax.Array) -> jax.Array:
  """Word-embedding BWN: per-row scale mean_j |W_ij|, centred by the *global* mean."""
  scale_Vx1 = jnp.mean(jnp.abs(w_VxD), axis=-1, keepdims=True)
  return scale_Vx1 * jnp.sign(w_VxD - jnp.mean(w_VxD))


def _identity_fwd(w):
  return bwn(w), None


def _identity_rowwise_fwd(w):
  return bwn_rowwise(w), None


def _identity_bwd(_, g):
  return (g,)


bwn.defvjp(_identity_fwd, _identity_bwd)
bwn_rowwise.defvjp(_identity_rowwise_fwd, _identity_bwd)


def bwn_rowwise_lookup(w_VxD: jax.Array, ids: jax.Array) -> jax.Array:
  """take(bwn_rowwise(w_VxD), ids, axis=0), binarizing only the rows looked up.

  The same values and straight-through gradient without writing the binarized table (BERT's 30522
  rows for the 1024 tokens of a batch). The row scales and the global centre are reduced over the
  table, not over the rows looked up: XLA:CPU rounds a row's sum differently with the shape of the
  tensor it reduces (a batch of 8 or its 8 one-example shards), so scales taken from the looked-up
  rows made an embedding depend on the batch shape and a sharded run leave the single-device one.
  """
  scale_V = jax.lax.stop_gradient(jnp.mean(jnp.abs(w_VxD), axis=-1))
  centre = jax.lax.stop_gradient(jnp.mean(w_VxD))
  return _bwn_rows(jnp.take(w_VxD, ids, axis=0), jnp.take(scale_V, ids, axis=0)[..., None], centre)


@jax.custom_vjp
def _bwn_rows(rows_NxD: jax.Array, scale_Nx1: jax.Array, centre: jax.Array) -> jax.Array:
  return scale_Nx1 * jnp.sign(rows_NxD - centre)


def _bwn_rows_fwd(rows, scale, centre):
  return _bwn_rows(rows, scale, centre), None


def _bwn_rows_bwd(_, g):
  # The scale and the centre are constants of the straight-through estimator.
  return g, jnp.zeros(g.shape[:-1] + (1,), g.dtype), jnp.zeros((), g.dtype)


_bwn_rows.defvjp(_bwn_rows_fwd, _bwn_rows_bwd)


# --- activations -----------------------------------------------------------

@jax.custom_vjp
def signed_binarize(x: jax.Array, alpha: jax.Array) -> jax.Array:
  """alpha * sign(x); gradients: x inside |x/alpha| <= 1, alpha by LSQ."""
  return clamped(alpha) * jnp.sign(x)


def _signed_fwd(x, alpha):
  return signed_binarize(x, alpha), (x, alpha)


def _signed_bwd(res, g):
  x, alpha = res
  ratio = x / clamped(alpha)
  grad_x = jnp.where((ratio >= -1) & (ratio <= 1), g, jnp.zeros_like(g))
  grad_alpha = jnp.sum(jnp.sign(x) * g) * _grad_scale(x)
  return grad_x, grad_alpha.astype(alpha.dtype).reshape(alpha.shape)


signed_binarize.defvjp(_signed_fwd, _signed_bwd)


@jax.custom_vjp
def unsigned_binarize(p: jax.Array, alpha: jax.Array) -> jax.Array:
  """alpha * clip(round(p/alpha), 0, 1), round half to even (attention probabilities)."""
  a = clamped(alpha)
  return a * jnp.clip(jnp.round(p / a), 0, 1)


def _unsigned_fwd(p, alpha):
  return unsigned_binarize(p, alpha), (p, alpha)


def _unsigned_bwd(res, g):
  p, alpha = res
  ratio = p / clamped(alpha)
  inside = (ratio >= 0) & (ratio <= 1)
  grad_p = jnp.where(inside, g, jnp.zeros_like(g))
  step = jnp.where(ratio > 1, 1.0, 0.0) + jnp.where(inside, jnp.round(ratio) - ratio, 0.0)
  grad_alpha = jnp.sum(step * g) * _grad_scale(p)
  return grad_p, grad_alpha.astype(alpha.dtype).reshape(alpha.shape)


unsigned_binarize.defvjp(_unsigned_fwd, _unsigned_bwd)


def signed_initial_alpha(x: jax.Array) -> jax.Array:
  """The release's data-driven init for signed inputs: 2 * mean|x| over the whole tensor."""
  return 2.0 * jnp.mean(jnp.abs(x))


def unsigned_initial_alpha(p: jax.Array) -> jax.Array:
  """The release's init for attention probabilities: 4 * mean|P| (about 4/L)."""
  return 4.0 * jnp.mean(jnp.abs(p))


# --- registries: binarizers are chosen by name in the model config ----------

class ActivationBinarizer(NamedTuple):
  apply: Callable[[jax.Array, jax.Array], jax.Array]
  initial_alpha: Callable[[jax.Array], jax.Array]


# name -> (layer-wise, row-wise lookup for embeddings: (table V x D, ids) -> binarized rows)
WEIGHT_BINARIZERS = {"bwn": (bwn, bwn_rowwise_lookup)}
ACTIVATION_BINARIZERS = {
    "elastic": (ActivationBinarizer(signed_binarize, signed_initial_alpha),
                ActivationBinarizer(unsigned_binarize, unsigned_initial_alpha)),
}  # name -> (signed for inputs and Q/K/V, unsigned for attention probabilities)


def _lookup(registry: dict, kind: str, name: str):
  if name not in registry:
    raise ValueError(f"unknown {kind} binarizer {name!r}; choose one of {sorted(registry)}")
  return registry[name]


def weight_binarizers(name: str) -> tuple:
  """(layer-wise, row-wise lookup) weight binarizers registered under `name`."""
  return _lookup(WEIGHT_BINARIZERS, "weight", name)


def activation_binarizers(name: str) -> tuple:
  """(signed, unsigned) activation binarizers registered under `name`."""
  return _lookup(ACTIVATION_BINARIZERS, "activation", name)
