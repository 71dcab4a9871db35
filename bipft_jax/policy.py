"""The binarization policy: which binarizer each part of the student uses, handed to its layers.

As MaxText hands its quantization object to `DenseGeneral`, model.py's layers get one `Policy`,
built once per BertConfig by `for_config`, and call it; they never test `config.binary` to choose
a binarizer. Its parts:
  linear      the `zoo.api.LinearOp` of every Linear METHOD.md section 3 binarizes (Q/K/V, attention
              output, FFN in and out, pooler dense): forward, extra parameters and their kinds,
              calibration, inference planes. The teacher's is `dense` (FP); the student's is named by
              `linear_binarizer`: `bipft` (the release: BWN weights, elastic inputs with a move bias;
              the default) or any operator of `zoo.LINEAR_OPS`.
  embedding   the word-table lookup (through the release's row-wise BWN; a plain lookup in the teacher).
  qkv         the activation binarizer of Q, K and V (None: FP).
  probs       the attention-probability binarizer (`zoo.api.ProbOp`, by `attention_prob_binarizer`:
              elastic, the release's, or bivit; None: FP).
  product     the einsum of the attention products' operands: exact sign products once binarized.
A new binarizer is one `zoo` entry; the layers, summary, packing and export read it from here.
"""
import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from bipft_jax import binarize, kinds, zoo
from bipft_jax.zoo import api

Array = jax.Array
Product = Callable[[str, Array, Array], Array]  # (einsum spec, a, b) -> a (x) b
BIPFT = "bipft"


@dataclasses.dataclass(frozen=True)
class Policy:
  linear: api.LinearOp
  kernel_kind: str                       # kinds.WEIGHT (FP) or kinds.BINARY_WEIGHT
  embedding: Callable[[Array, Array], Array]  # (word table V x D, ids) -> the rows looked up
  embedding_kind: str                    # kinds.WEIGHT or kinds.BINARY_EMBEDDING
  qkv: Optional[binarize.ActivationBinarizer]
  probs: Optional[api.ProbOp]
  product: Product


def dense(precision: str, product: Optional[Product] = None) -> api.LinearOp:
  """The FP Linear: x @ kernel + bias, or with `product` if given (precision "mixed":
  precision.mixed_einsum). The tokens are flattened into one axis: the same bits as flax's nn.Dense
  under jit, and the kernel's gradient then contracts one axis, which XLA:CPU computes without
  writing the cotangent transposed (MiniLM's 384 -> 1536 layer at 32 x 48 tokens: backward 31 ms
  instead of 55)."""
  def apply(x, kernel, bias, extras, *, train):
    del extras, train
    if product is not None:
      y = product("...i,io->...o", x, kernel)
    else:
      x_MxI = x.reshape(-1, x.shape[-1])
      y = jax.lax.dot_general(x_MxI, kernel, (((1,), (0,)), ((), ())), precision=precision)
      y = y.reshape(*x.shape[:-1], kernel.shape[-1])
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return api.LinearOp(name="dense", apply=apply, init_extras=api.no_extras)


def bipft(weight: Callable[[Array], Array], activation: binarize.ActivationBinarizer,
          product: Product) -> api.LinearOp:
  """The release's binarized Linear: B_act(x + move_bias) @ B_w(kernel) + bias (METHOD.md section 3).

  `move_bias` (one per input channel, init 0) and the scalar `input_alpha` (init 1, set from data by
  calibration: 2 mean|x + move_bias|) are its extras; the product of the two binarized operands
  factors out their scales (model.binary_einsum), so it is exact.
  """
  def apply(x, kernel, bias, extras, *, train):
    del train
    x_b = activation.apply(x + extras["move_bias"], extras["input_alpha"])
    return product("...i,io->...o", x_b, weight(kernel)) + bias

  def init_extras(in_features, out_features):
    del out_features
    return {"move_bias": api.Extra(jax.nn.initializers.zeros, (in_features,), kinds.SHIFT, (api.IN,)),
            "input_alpha": api.Extra(jax.nn.initializers.ones, (), kinds.ACTIVATION_SCALE)}

  def calibrate(x, kernel, extras):
    del kernel
    alpha = jax.lax.stop_gradient(activation.initial_alpha(x + extras["move_bias"]))
    return {**extras, "input_alpha": alpha}

  def weight_planes(kernel, extras):
    del extras
    return [(jnp.mean(jnp.abs(kernel)), jnp.sign(kernel - jnp.mean(kernel)))]  # as binarize.bwn

  def activation_planes(x, extras):
    return binarize.clamped(extras["input_alpha"]), api.activation_signs(x + extras["move_bias"])

  return api.LinearOp(name=BIPFT, apply=apply, init_extras=init_extras, calibrate=calibrate,
                      weight_planes=weight_planes, activation_planes=activation_planes,
                      elementwise_activation=True, doc=bipft.__doc__)


def _lookup(table_VxD: Array, ids: Array) -> Array:
  return jnp.take(table_VxD, ids, axis=0)


LINEAR_BINARIZERS = (BIPFT, *zoo.LINEAR_OPS)


def linear_op(name: str, config, product: Product) -> api.LinearOp:
  """The binarized Linear operator `name` (`bipft` or a zoo operator); ValueError naming the choices."""
  if name == BIPFT:
    layerwise, _ = binarize.weight_binarizers(config.weight_binarizer)
    signed, _ = binarize.activation_binarizers(config.activation_binarizer)
    return bipft(layerwise, signed, product)
  if name not in zoo.LINEAR_OPS:
    raise ValueError(f"unknown linear binarizer {name!r}; choose one of {', '.join(LINEAR_BINARIZERS)}")
  return zoo.linear_op(name)


def packable_binarizers() -> list:
  """The linear binarizers that pack: `bipft` and the zoo operators that run on sign planes."""
  return [BIPFT] + [name for name in zoo.LINEAR_OPS if zoo.linear_op(name).packable]


def for_config(config, product: Product, fp_product: Optional[Product] = None) -> Policy:
  """The policy of a model.BertConfig; `product` multiplies two binarized operands exactly,
  `fp_product` (default: einsum at `matmul_precision`) two FP ones in the teacher."""
  # Every name is looked up, also for the FP teacher: a misspelt binarizer is an error wherever it is.
  _, rowwise = binarize.weight_binarizers(config.weight_binarizer)
  signed, _ = binarize.activation_binarizers(config.activation_binarizer)
  linear = linear_op(config.linear_binarizer, config, product)
  probs = zoo.prob_op(config.attention_prob_binarizer)
  if not config.binary:
    linear = dense(config.matmul_precision, fp_product)
    fp_product = fp_product or (lambda spec, a, b: jnp.einsum(spec, a, b, precision=config.matmul_precision))
    return Policy(linear=linear, kernel_kind=kinds.WEIGHT, embedding=_lookup,
                  embedding_kind=kinds.WEIGHT, qkv=None, probs=None, product=fp_product)
  return Policy(linear=linear, kernel_kind=kinds.BINARY_WEIGHT, embedding=rowwise,
                embedding_kind=kinds.BINARY_EMBEDDING, qkv=signed, probs=probs, product=product)
