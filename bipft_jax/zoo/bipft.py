"""BiPFT's own attention-probability binarizer (`binarize.unsigned_binarize`) as a zoo policy."""
import jax
import jax.numpy as jnp

from bipft_jax import binarize
from bipft_jax.zoo import api


def _planes(p, extras):
  alpha = binarize.clamped(extras["alpha"])  # the forward's clamp from below
  return alpha, jnp.clip(jnp.round(p / alpha), 0, 1)


def elastic_probs() -> api.ProbOp:
  """BiT/BiPFT's elastic binarizer: alpha * clip(round(p / alpha), 0, 1) with a learned alpha (LSQ
  gradient) set from the first batch to 4 mean(p) (`binarize.unsigned_binarize`)."""
  return api.ProbOp(
      "elastic", lambda p, extras, *, train: binarize.unsigned_binarize(p, extras["alpha"]),
      lambda: {"alpha": api.Extra(jax.nn.initializers.ones, (), api.ACTIVATION_SCALE)},
      calibrate=lambda p, extras: {**extras, "alpha": binarize.unsigned_initial_alpha(p)},
      planes=_planes,
      doc=elastic_probs.__doc__)
