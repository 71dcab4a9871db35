"""A model's parameter trees: made, shaped without computing, classified, calibrated, merged.

`model.build` gives the module; these give its parameters: `init_params` (fresh), `abstract_boxed_params`
(shapes, logical axes and kinds, for sharding and checkpoint restore), `param_kinds` (what each leaf is),
`calibrate_alphas` (the activation scales from one batch) and `merge_params` (the one way a run starts
from other weights).
"""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bipft_jax import kinds

Array = jax.Array


def boxed_params(module: nn.Module, rng: Array, seq_len: int = 8) -> dict:
  """Parameters of `module` boxed with their logical axes and kinds (`kinds.Declared`)."""
  return module.init({"params": rng}, jnp.zeros((1, seq_len), jnp.int32))["params"]


def init_params(module: nn.Module, rng: Array, seq_len: int = 8) -> dict:
  """Plain (unboxed) parameters of `module`.

  Jitted: one compiled program instead of one per initializer op (dozens of small compiles, seconds
  and ~100 MB of executables per process, which a many-process run pays in every process)."""
  return jax.jit(lambda rng_: nn.meta.unbox(boxed_params(module, rng_, seq_len)))(rng)


def abstract_boxed_params(module: nn.Module, seq_len: int = 8) -> dict:
  """ShapeDtypeStructs of `boxed_params`, without computing anything."""
  return jax.eval_shape(lambda: boxed_params(module, jax.random.key(0), seq_len))


def param_kinds(module: nn.Module) -> dict:
  """What every parameter is (`kinds`: binary_weight, activation_scale, ...), as declared where made."""
  return kinds.kinds_of(abstract_boxed_params(module))


def calibrate_alphas(module: nn.Module, params: dict, batch: dict) -> dict:
  """Sets every activation alpha from one batch, in forward order (METHOD.md section 2 decision).

  Each alpha comes from activations that already use the upstream calibrated alphas, as with the
  release's lazy init on its first forward; this pass is deterministic (no dropout).
  """
  _, state = module.apply({"params": params}, batch["input_ids"], batch.get("token_type_ids"),
                          batch.get("attention_mask"), deterministic=True, calibrate=True,
                          mutable=["calibration"])
  flat = flax.traverse_util.flatten_dict(params)
  calibrated = flax.traverse_util.flatten_dict(state["calibration"])
  missing = set(calibrated) - set(flat)
  assert not missing, f"calibrated alphas without parameters: {missing}"
  flat.update(calibrated)
  return flax.traverse_util.unflatten_dict(flat)


def merge_params(module: nn.Module, source: dict, rng: Array, complete: tuple = ()) -> dict:
  """`module`'s params: the source's tensors where the names agree, fresh ones elsewhere. The one way
  any run starts from other weights (a teacher, a pretraining checkpoint, another run).

  Either tree may be a bare encoder (`embeddings/encoder/pooler`) or have heads around a `bert`
  subtree; encoder tensors are matched below those prefixes, heads by their full names (a head the
  model lacks is dropped). Fresh leaves are the model's own init (METHOD.md section 6): estimators
  N(0, 0.02^2) with zero bias, move biases 0, alphas 1 (calibrate them before training), the pooler's
  new LayerNorm 1/0, and any head the source lacks. Every encoder tensor of the source must find its
  place, with the same shape (ValueError otherwise), and so must every leaf of the model below the
  top-level names in `complete` (e.g. ("bert",): a finetuning start that keeps a trained encoder).
  """
  params = init_params(module, rng)
  flat = flax.traverse_util.flatten_dict(params)
  prefix = ("bert",) if "bert" in params else ()
  source_prefix = ("bert",) if "bert" in source else ()
  unplaced, placed = [], set()
  for path, value in flax.traverse_util.flatten_dict(source).items():
    is_encoder = path[:len(source_prefix)] == source_prefix
    target = prefix + path[len(source_prefix):] if is_encoder else path
    if target in flat:
      if tuple(flat[target].shape) != tuple(value.shape):
        raise ValueError(f"{'/'.join(path)} has shape {tuple(value.shape)}, the model needs "
                         f"{tuple(flat[target].shape)}")
      flat[target] = value
      placed.add(target)
    elif is_encoder:
      unplaced.append("/".join(path))
  if unplaced:
    raise ValueError(f"{len(unplaced)} source tensors have no place in the model (first: {unplaced[0]})")
  missing = ["/".join(p) for p in flat if p[0] in complete and p not in placed]
  if missing:
    raise ValueError(f"{len(missing)} tensors of the model are missing (first: {missing[0]})")
  return flax.traverse_util.unflatten_dict(flat)
