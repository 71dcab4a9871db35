"""The straight-through sign quantizers the zoo's operators share, each a `jax.custom_vjp`.

Forward: `jnp.sign`, so sign(0) = 0 as `torch.sign` in every authors' code. They differ only in
the gradient they let through, which is where binarizers differ most at the boundaries.
"""
import functools

import jax
import jax.numpy as jnp

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
