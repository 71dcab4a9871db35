"""What each parameter is (a binarized weight, its scale, an activation scale...), declared where it is made.

Every parameter of model.py is created with an initializer from `declare(init, axes, kind)`: it
returns a `Declared` box, flax's logical-partitioning box (the axis names sharding reads) plus the
parameter's `kind`. `model_params.param_kinds(module)` reads the kinds of the whole tree from an abstract
init (`jax.eval_shape`: no arrays are made) as a tree of strings shaped like the params; summary,
packed, optim and finetune read that tree instead of guessing from leaf names or sibling leaves. A
binarizer with a new learnable tensor declares its kind in its `init_extras`; nothing downstream
changes. The boxes are stripped (`nn.meta.unbox`) before params are used or saved, so checkpoints
hold plain arrays, named as before.
"""
from typing import Any, Callable

import flax
import flax.linen as nn
import jax

# The kinds, and what the code downstream does with them.
WEIGHT = "weight"                      # FP matrix or embedding table (weight decay applies)
BINARY_WEIGHT = "binary_weight"        # latent FP kernel of a binarized Linear: sign planes when packed
BINARY_EMBEDDING = "binary_embedding"  # latent FP word table, binarized row-wise: packed per token row
WEIGHT_SCALE = "weight_scale"          # learned scale of a binarized weight or output (fp32 when packed)
ACTIVATION_SCALE = "activation_scale"  # learned scale of a binarized activation, an alpha (fp32 when packed)
SHIFT = "shift"                        # learned per-channel shift before an activation binarizer (move bias)
BIAS = "bias"                          # FP bias
NORM = "norm"                          # LayerNorm scale and bias
FP = "fp"                              # any other FP parameter (a threshold, a small FP network...)
KINDS = (WEIGHT, BINARY_WEIGHT, BINARY_EMBEDDING, WEIGHT_SCALE, ACTIVATION_SCALE, SHIFT, BIAS, NORM, FP)
BINARY = (BINARY_WEIGHT, BINARY_EMBEDDING)
SCALES = (WEIGHT_SCALE, ACTIVATION_SCALE)  # multiply every count of a packed matmul: kept in fp32
DECAYED = (WEIGHT, BINARY_WEIGHT, BINARY_EMBEDDING)  # as BERT: no decay on biases, norms, scales, shifts


class Declared(nn.LogicallyPartitioned):
  """A parameter with its logical axis names and its kind."""
  kind: str = flax.struct.field(default=FP, pytree_node=False)


def declare(init: Callable, axes: tuple, kind: str) -> Callable:
  """`init` wrapped to box its value with logical `axes` and `kind` (as nn.with_logical_partitioning)."""
  if kind not in KINDS:
    raise ValueError(f"unknown parameter kind {kind!r}; choose one of {', '.join(KINDS)}")

  def boxed(*args, **kwargs):
    return Declared(init(*args, **kwargs), tuple(axes), kind=kind)

  return boxed


def kinds_of(boxed_tree: Any) -> Any:
  """The tree of kinds of a tree of `Declared` boxes (e.g. the 'params' of an abstract init)."""
  undeclared = [jax.tree_util.keystr(p) for p, leaf in jax.tree_util.tree_leaves_with_path(
      boxed_tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)) if not isinstance(leaf, Declared)]
  assert not undeclared, f"parameters made without a declared kind: {undeclared}"
  return jax.tree.map(lambda box: box.kind, boxed_tree, is_leaf=lambda x: isinstance(x, Declared))


def paths_of_kind(kinds: Any, *wanted: str) -> set:
  """The param paths (tuples of names) whose kind is one of `wanted`."""
  return {path for path, kind in flax.traverse_util.flatten_dict(kinds).items() if kind in wanted}
