"""The binarizer zoo: other systems' binarizers as drop-in policies for the student's layers.

`LINEAR_OPS` maps a name to a factory of `LinearOp` (a whole binarized Linear layer, see
`zoo.api`); factories take the operator's constructor parameters (schedules) as keywords.
"""
import functools

from bipft_jax.binarize import _lookup
from bipft_jax.zoo import bibench, binarydm, bipft, bivit, dbllm
from bipft_jax.zoo.api import (ACTIVATION_SCALE, FP, IN, KINDS, OUT, WEIGHT_SCALE, Extra,  # noqa: F401
                               LinearOp, ProbOp)

LINEAR_OPS = {
    "bnn": bibench.bnn,
    "xnor": bibench.xnor,
    "xnorplusplus": bibench.xnorplusplus,
    "dorefa": bibench.dorefa,
    "bireal": bibench.bireal,
    "react": bibench.react,
    "recu": bibench.recu,
    "fda": bibench.fda,
    "binarydm": binarydm.binarydm,
    "binarydm1": functools.partial(binarydm.binarydm, order=1),
    "dbllm_fdb": dbllm.flexible_dual_binarization,
    "bivit_weight": bivit.weight_scales,
}

# Attention-probability binarizers: name -> factory of ProbOp.
ATTENTION_PROB_BINARIZERS = {
    "elastic": bipft.elastic_probs,
    "bivit": bivit.softmax_aware,
}

# Distillation losses: name -> loss(student, teacher, ...) -> scalar.
DISTILL_LOSSES = {
    "binarydm_lrm": binarydm.lrm_loss,
    "dbllm_dad": dbllm.dad_loss,
}


@functools.cache
def linear_op(name: str, **params) -> LinearOp:
  """The Linear operator registered under `name`, built with its constructor `params`.

  Cached: the same name and parameters give the same object, so jitted functions that take the
  operator as a static argument (or modules holding it) do not retrace."""
  return _lookup(LINEAR_OPS, "linear", name)(**params)


@functools.cache
def prob_op(name: str, **params) -> ProbOp:
  """The attention-probability binarizer registered under `name`."""
  return _lookup(ATTENTION_PROB_BINARIZERS, "attention-probability", name)(**params)
