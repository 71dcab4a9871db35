"""The straight-through sign quantizers the zoo's operators share, each a `jax.custom_vjp`.

Forward: `jnp.sign`, so sign(0) = 0 as `torch.sign` in every authors' code. They differ only in
the gradient they let through, which is where binarizers differ most at the boundaries.
"""
import functools

import jax
import jax.numpy as jnp

from bipft_jax.zoo.api import activation_signs, unit_plane

Array = jax.Array


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sign_ste(v: Array, closed: bool) -> Array:
  """sign(v); the gradient passes where |v| <= 1 (closed window) or |v| < 1 (open window)."""
  del closed
  return jnp.sign(v)


def _sign_ste_fwd(v, closed):
  return jnp.sign(v), v


def _sign_ste_bwd(closed, v, g):
  inside = jnp.abs(v) <= 1 if closed else jnp.abs(v) < 1
  return (jnp.where(inside, g, jnp.zeros_like(g)),)


sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


@jax.custom_vjp
def sign_identity(v: Array) -> Array:
  """sign(v) with a pure straight-through gradient (no window): ReCU's weights."""
  return jnp.sign(v)


sign_identity.defvjp(lambda v: (jnp.sign(v), None), lambda _, g: (g,))


@jax.custom_vjp
def scaled_sign_clip(w: Array, scale: Array) -> Array:
  """scale * sign(w); the gradient is that of clip(w, -1, 1): 1 on [-1, 1], NOT times the scale.

  Bi-Real's and ReAct's weights, computed by the authors as (s*sign(W)).detach() - clip(W).detach()
  + clip(W). The scale is a detached statistic: it gets no gradient."""
  return scale * jnp.sign(w)


def _scaled_sign_clip_bwd(res, g):
  w, scale = res
  return jnp.where(jnp.abs(w) <= 1, g, jnp.zeros_like(g)), jnp.zeros_like(scale)


scaled_sign_clip.defvjp(lambda w, scale: (scale * jnp.sign(w), (w, scale)), _scaled_sign_clip_bwd)


def _sum_to_shape(g: Array, shape: tuple) -> Array:
  """Sums a broadcast gradient back to the shape of the operand that was broadcast."""
  g = jnp.sum(g, axis=tuple(range(g.ndim - len(shape))))
  return jnp.sum(g, axis=tuple(i for i, n in enumerate(shape) if n == 1), keepdims=True).reshape(shape)


def _polynomial_slope(v: Array) -> Array:
  """p'(v) of Bi-Real's piecewise polynomial: 2 + 2v on [-1, 0), 2 - 2v on [0, 1), 0 elsewhere."""
  return jnp.where((v >= -1) & (v < 0), 2 + 2 * v, jnp.where((v >= 0) & (v < 1), 2 - 2 * v, 0.0))


@jax.custom_vjp
def polynomial_sign(x: Array, shift: Array) -> Array:
  """sign(x) forward; backward p'(x + shift) (Bi-Real: shift 0; ReAct: its channel threshold).

  ReAct's released forward is sign of the UNSHIFTED input: its threshold only moves the gradient's
  window, and gets the gradient sum of g * p'(x + shift)."""
  del shift
  return jnp.sign(x)


def _polynomial_sign_bwd(res, g):
  x, shift = res
  grad = g * _polynomial_slope(x + shift)
  return grad, _sum_to_shape(grad, shift.shape).astype(shift.dtype)


polynomial_sign.defvjp(lambda x, shift: (jnp.sign(x), (x, shift)), _polynomial_sign_bwd)


@jax.custom_vjp
def triangle_sign(v: Array) -> Array:
  """sign(v); backward max(0, 2 - |2v|) (ReCU's activations)."""
  return jnp.sign(v)


triangle_sign.defvjp(lambda v: (jnp.sign(v), v),
                     lambda v, g: (jnp.maximum(2 - jnp.abs(2 * v), 0) * g,))


FDA_OMEGA = 0.1


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def fourier_sign(v: Array, n: int) -> Array:
  """sign(v); backward the Fourier series of the square wave, 4w/pi sum_{i=0..n} cos((2i+1)wv),
  w = 0.1, zeroed where |v| > 1 (|v| = 1 keeps it): FDA's quantizer."""
  del n
  return jnp.sign(v)


def _fourier_sign_bwd(n, v, g):
  odd = jnp.arange(n + 1, dtype=v.dtype) * 2 + 1
  series = jnp.sum(jnp.cos(odd * FDA_OMEGA * v[..., None]), axis=-1) * (4 * FDA_OMEGA / jnp.pi)
  return (jnp.where(jnp.abs(v) <= 1, series * g, jnp.zeros_like(g)),)


fourier_sign.defvjp(lambda v, n: (jnp.sign(v), v), _fourier_sign_bwd)


INPUT_MODES = ("sign", "fp")  # the input operand of the operators that offer both


def check_input_mode(activations: str) -> None:
  if activations not in INPUT_MODES:
    raise ValueError(f"activations must be one of {INPUT_MODES}, got {activations!r}")


def input_operand(x: jax.Array, activations: str, closed: bool) -> jax.Array:
  """The input operand: sign(x) with a (closed or open) +-1 window, or x itself ("fp")."""
  return sign_ste(x, closed) if activations == "sign" else x


def sign_activation_planes(activations: str):
  """`LinearOp.activation_planes` of `input_operand`: one unscaled sign plane, none for FP inputs."""
  return (lambda x, extras: unit_plane(activation_signs(x))) if activations == "sign" else None
