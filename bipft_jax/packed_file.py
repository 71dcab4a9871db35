"""The bit-packed file of a 1-bit student: `export` writes it, `load_packed` reads it back for
`packed.forward` (`bipft export-packed` is the command; `bipft track` and the benches load files).

The file (format "bipft-packed" v1) holds the tree of `packed.pack_params` under '/'-joined names:
  <binarized Linear>/kernel_sign        uint32 [ceil(K/32), N]  sign bits of W - mean(W), packed along K
  <binarized Linear>/kernel_nonzero     uint32, same shape      only if the matrix has an exact zero
  <binarized Linear>/kernel_scale       float32 [] or [N]       BWN scale mean|W| (the operator's scales)
  (kernel_sign_1, kernel_scale_1...)                            further planes of a multi-plane weight
  .../word_embeddings/embedding_sign    uint32 [V, ceil(D/32)]  (+ embedding_nonzero if needed)
  .../word_embeddings/embedding_scale   float32 [V]             one scale per row
  learned scales (kinds weight_scale and activation_scale: `*_alpha`...)   float32
  everything else (LayerNorms, biases, move biases, estimators, position/type embeddings, the
  classifier): the FP remainder, in `remainder_dtype`.
Metadata: format, format_version, head, config (the BertConfig as JSON), remainder_dtype, word_bits,
and sha256 (of every tensor's bytes, in name order), so a damaged file is refused, not run.

The remainder is stored in float16 when that keeps the model's predictions (`--remainder auto`,
the default): the packed model runs PROBE_SEQUENCES fixed random sequences with the remainder in
float32 and in float16, and float16 is kept only if every prediction agrees (classifier: identical
argmax; regression or encoder: outputs within PROBE_TOLERANCE). Scales and alphas stay float32: they
multiply every count. A binary model is fragile here: a rounded LayerNorm weight or bias flips
signs downstream. The rt_demo classifier of the README moved its logits by up to 1.1 in float16 and
changed 47 of its 1,281 dev predictions; a probe of 8 sequences saw no change, 256 saw 15.
"""
import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

from bipft_jax import files, kinds, packed, policy
from bipft_jax.errors import UserError
from bipft_jax.model import BertConfig

FORMAT = "bipft-packed"
FORMAT_VERSION = "1"
PROBE_TOLERANCE = 1e-3  # regression values / pooled features when there is no argmax to compare
PROBE_SEQUENCES = 256  # of length 64: a change of 1 prediction in 100 goes unseen with probability 0.08
SCALE_LEAVES = ("kernel_scale", "embedding_scale")
PLANE_LEAVES = ("kernel_sign", "kernel_nonzero", "embedding_sign", "embedding_nonzero")


def _leaf(name: str) -> str:
  return name.rsplit("/", 1)[-1]


def _is_plane(name: str) -> bool:
  return packed.base_leaf(_leaf(name)) in PLANE_LEAVES


def file_tensors(config: BertConfig, head: str, packed_params: dict, remainder_dtype: str) -> dict:
  """The arrays as written: bit-planes uint32, scales float32, the remainder in `remainder_dtype`.

  Scales are the planes' (`kernel_scale`...) and the parameters declared weight or activation scales."""
  param_kinds = packed.flatten(packed.packed_param_kinds(config, head))
  out = {}
  for name, value in packed.flatten(packed_params).items():
    value = np.asarray(value)
    if _is_plane(name):
      out[name] = value.astype(np.uint32)
    elif packed.base_leaf(_leaf(name)) in SCALE_LEAVES or param_kinds.get(name) in kinds.SCALES:
      out[name] = value.astype(np.float32)
    else:
      out[name] = value.astype(packed.REMAINDER_DTYPES[remainder_dtype])
  return out


def _digest(tensors: dict) -> str:
  digest = hashlib.sha256()
  for name in sorted(tensors):
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(tensors[name]).tobytes())
  return digest.hexdigest()


def write_packed(path: str, config: BertConfig, head: str, packed_params: dict, remainder_dtype: str,
                 run_config: dict | None = None) -> int:
  """Writes the file atomically (temp file, then rename); returns its size in bytes. `run_config`: the
  config of the run that trained the model, kept in the metadata (`read_run_config`)."""
  tensors = file_tensors(config, head, packed_params, remainder_dtype)
  metadata = {"sha256": _digest(tensors), "format": FORMAT, "format_version": FORMAT_VERSION, "head": head,
              "config": json.dumps(dataclasses.asdict(config)), "remainder_dtype": remainder_dtype,
              "word_bits": str(packed.WORD_BITS)}
  if run_config:
    metadata["run"] = json.dumps(run_config)
  with files.atomic_path(path) as tmp:
    safetensors.numpy.save_file(tensors, tmp, metadata=metadata)
  return os.path.getsize(path)


def _expected_shapes(config: BertConfig, head: str) -> dict:
  """name -> (shape, is_plane) of every tensor the file must hold (nonzero planes are optional)."""
  from bipft_jax import model as model_lib
  from bipft_jax import model_params
  module = model_lib.build(config, head)
  abstract = jax.eval_shape(lambda: model_params.init_params(module, jax.random.key(0)))
  tree = jax.eval_shape(lambda p: packed.pack_params(config, head, p, zero_planes=False)[1], abstract)
  return {name: (tuple(v.shape), _is_plane(name)) for name, v in packed.flatten(tree).items()}


def _read(path: str) -> tuple:
  if not os.path.isfile(path):
    raise UserError(f"packed model {path} does not exist; write one with `bipft export-packed`")
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata = f.metadata() or {}
      tensors = {name: f.get_tensor(name) for name in f.keys()}
  except Exception as e:  # safetensors raises several types for truncated/garbled files
    raise _unreadable(path, e) from None
  return metadata, tensors


def _unreadable(path: str, error: Exception) -> UserError:
  return UserError(f"{path} is not a readable safetensors file ({error}); re-export it with `bipft export-packed`")


def read_run_config(path: str) -> dict | None:
  """The config of the run that trained the packed model at `path`, or None where it was not kept."""
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      run = (f.metadata() or {}).get("run")
    return json.loads(run) if run else None
  except Exception as e:  # safetensors raises several types for truncated/garbled files
    raise _unreadable(path, e) from None


def load_packed(path: str, kernel: str = "auto") -> tuple:
  """(BertConfig, head, packed params) from an exported file, made ready for `packed.forward` on
  `kernel` (`packed.prepare`: popcount keeps the float32/uint32 planes as stored; int8 expands them
  into int8 weights; auto, the default, takes this machine's faster, measured once and cached)."""
  if kernel not in packed.KERNELS:
    raise UserError(f"unknown packed kernel {kernel!r}; choose one of {', '.join(packed.KERNELS)}")
  metadata, tensors = _read(path)
  if metadata.get("format") != FORMAT or metadata.get("format_version") != FORMAT_VERSION:
    raise UserError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file (metadata {sorted(metadata)}); "
                    "re-export it with `bipft export-packed`")
  try:
    config = BertConfig.from_dict(json.loads(metadata["config"]))
    head = metadata["head"]
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f"{path} has a bad config in its metadata ({e}); re-export it") from None
  if head not in packed.PACKED_HEADS or metadata.get("word_bits") != str(packed.WORD_BITS):
    raise UserError(f"{path}: unsupported head {head!r} or word size {metadata.get('word_bits')}; re-export it")
  expected = _expected_shapes(config, head)
  for name, value in tensors.items():
    plane_of = name.replace("_nonzero", "_sign")
    if name not in expected and not (name.endswith("_nonzero") and plane_of in tensors):
      raise UserError(f"{path} has an unexpected tensor {name}; it was not written for this config")
    want_shape, is_plane = expected[plane_of] if name not in expected else expected[name]
    if value.shape != want_shape or (value.dtype == np.uint32) != is_plane:
      raise UserError(f"{path}: tensor {name} is {value.dtype}{list(value.shape)}, expected "
                      f"{'uint32' if is_plane else 'float'}{list(want_shape)}; the file is corrupt, re-export it")
  missing = sorted(set(expected) - set(tensors))
  if missing:
    raise UserError(f"{path} lacks {len(missing)} tensors (e.g. {missing[0]}); the file is truncated or "
                    "corrupt, re-export it")
  if metadata.get("sha256") != _digest(tensors):
    raise UserError(f"{path} fails its sha256 check: the file is corrupt, re-export it")
  floats = {n: jnp.asarray(v, jnp.float32 if v.dtype != np.uint32 else jnp.uint32) for n, v in tensors.items()}
  return config, head, packed.prepare(config, packed.unflatten(floats), kernel)


# --- choosing the remainder's dtype --------------------------------------------

def probe_batch(config: BertConfig, batch_size: int = 8, length: int = 64) -> dict:
  """A fixed random batch with padding, for comparing a model's predictions before and after."""
  length = min(length, config.max_position_embeddings)
  rng = np.random.default_rng(0)
  lengths = rng.integers(length // 4, length + 1, batch_size)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, rng.integers(1, config.vocab_size, (batch_size, length)), config.pad_token_id)
  types = ((np.arange(length)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
  return {"input_ids": jnp.asarray(ids), "token_type_ids": jnp.asarray(types), "attention_mask": jnp.asarray(mask)}


def changed_predictions(config: BertConfig, head: str, a: dict, b: dict) -> int:
  """How many sequences two forward outputs predict differently (see the module docstring)."""
  if head == "classification" and config.num_labels > 1:
    return int(jnp.sum(jnp.argmax(a["logits"], -1) != jnp.argmax(b["logits"], -1)))
  key = "logits" if head == "classification" else "pooled"
  return int(jnp.sum(jnp.max(jnp.abs(a[key] - b[key]), -1) > PROBE_TOLERANCE))


def choose_remainder(config: BertConfig, head: str, packed_params: dict) -> tuple:
  """('float16' if storing the FP remainder in float16 keeps every probe prediction, else 'float32',
  how many of the PROBE_SEQUENCES it changed)."""
  batch = probe_batch(config, PROBE_SEQUENCES)
  run = packed.jit(lambda p: packed.forward(config, head, p, batch["input_ids"], batch["token_type_ids"],
                                            batch["attention_mask"]))
  as_stored = lambda dtype: packed.unflatten({n: jnp.asarray(v) for n, v in file_tensors(
      config, head, packed_params, dtype).items()})
  reference = run(packed.cast_floats(as_stored("float32"), jnp.float32))
  halved = run(packed.cast_floats(as_stored("float16"), jnp.float32))
  changed = changed_predictions(config, head, reference, halved)
  return ("float32" if changed else "float16"), changed


# --- the command ---------------------------------------------------------------------

def export(config: BertConfig, head: str, params: dict, out: str, remainder: str = "auto",
           run_config: dict | None = None) -> dict:
  """Packs and writes `params` (with the config of the run that trained them, if given); returns the
  sizes (bytes) and choices made."""
  if not config.binary:
    raise UserError("the checkpoint holds a full-precision model (binary=False); export a 1-bit student")
  try:
    packed.packable(config)
  except ValueError as e:
    raise UserError(f"{e}; export-packed needs one of {', '.join(policy.packable_binarizers())}") from None
  packed_head, packed_params = packed.pack_params(config, head, params)
  dtype, changed = choose_remainder(config, packed_head, packed_params) if remainder == "auto" else (remainder, None)
  size = write_packed(out, config, packed_head, packed_params, dtype, run_config)
  kept = params["bert"] if head == "pretraining" else params  # the model the file holds
  return {"head": packed_head, "remainder_dtype": dtype, "float16_changed_probes": changed, "packed_bytes": size,
          "fp32_bytes": 4 * packed.param_count(kept), "ratio": 4 * packed.param_count(kept) / size}
