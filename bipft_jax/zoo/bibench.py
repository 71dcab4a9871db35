"""BiBench's eight binarized Linear layers (htqin/BiBench, `bibench/models/layers/*.py`).

Each operator reproduces the released layer's forward and backward (see
`shared/zoo_vectors/manifest.json` for the formulas as read from the code). Our kernels are
(in, out): the authors' per-row (per output channel) reductions over a (out, in) weight are
reductions over axis 0 here.
"""
import jax.numpy as jnp

from bipft_jax.zoo import api
from bipft_jax.zoo.ste import sign_ste


def _bnn_apply(x, kernel, bias, extras, *, train):
  del extras, train
  return api.linear(sign_ste(x, True), sign_ste(kernel, True)) + bias


def bnn() -> api.LinearOp:
  """BNN: y = sign(x) @ sign(W) + b; both gradients pass where |v| <= 1 (+-1 included)."""
  return api.LinearOp(
      name="bnn", apply=_bnn_apply, init_extras=api.no_extras,
      weight_planes=lambda kernel, extras: [api.unit_plane(jnp.sign(kernel))],
      activation_planes=lambda x, extras: api.unit_plane(jnp.sign(x)),
      doc=bnn.__doc__)
