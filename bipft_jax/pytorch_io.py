"""PyTorch checkpoints <-> our params: one name/transpose table for Hugging Face and release names.

Our parameter paths are Hugging Face's module paths (`bert/encoder/layer/0/attention/self/query`),
so a torch name is the path joined by dots plus a renamed leaf. `LEAF_TABLE` is the whole mapping;
the release's binary leaves (`move.bias`, `input_clip_val`, `clip_query`...) are in it too.
Weights are read from safetensors, or `pytorch_model.bin` with `torch.load(weights_only=True)`:
no pickled code ever runs. Sharded checkpoints (`*.index.json`) and bfloat16/float16 tensors load too.
"""
import json
import os
import pickle
import sys
from typing import Iterable, Mapping, Optional

import flax
import numpy as np

from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax import zoo
from bipft_jax.errors import UserError

# our leaf name -> (torch leaf name, transpose?). Flax kernels are (in, out), torch weights (out, in).
_MODEL_LEAVES = {
    "kernel": ("weight", True),
    "bias": ("bias", False),
    "scale": ("weight", False),          # LayerNorm
    "embedding": ("weight", False),
    "move_bias": ("move.bias", False),   # release: QuantizeLinear.move (LearnableBias)
    "input_alpha": ("input_clip_val", False),
    "query_alpha": ("clip_query", False),
    "key_alpha": ("clip_key", False),
    "value_alpha": ("clip_value", False),
    "probs_alpha": ("clip_attn", False),
}


BIGGEST_FAN_IN = 1 << 16  # large enough for every extra an operator makes (FDA's appear from 64 features)


def _zoo_extra_leaves() -> dict:
  """The zoo operators' extra parameters, named where each operator declares them (its init_extras) and
  kept as they are in torch (modeling_bipft.ZOO_LINEARS makes them so). A name the model's leaves use
  already (e.g. LayerNorm's `scale`) would map two tensors to one torch name: refused here."""
  names = {name for op in zoo.LINEAR_OPS
           for name in zoo.linear_op(op).init_extras(BIGGEST_FAN_IN, BIGGEST_FAN_IN)}
  clashes = names & set(_MODEL_LEAVES)
  assert not clashes, f"zoo extras named as model leaves: {sorted(clashes)}; give them names of their own"
  return {name: (name, False) for name in sorted(names)}


LEAF_TABLE = {**_MODEL_LEAVES, **_zoo_extra_leaves()}
# Tied aliases and buffers that torch state dicts may hold; never parameters of their own.
TIED_ALIASES = {"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
                "cls.predictions.decoder.bias": "cls.predictions.bias"}
IGNORED_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")


def torch_name(path: tuple) -> tuple:
  """(torch name, transpose?) of the parameter at `path`."""
  leaf, transpose = LEAF_TABLE[path[-1]]
  return ".".join(path[:-1] + (leaf,)), transpose


def name_table(params: Mapping) -> dict:
  """torch name -> (our path, transpose?) for every leaf of `params`."""
  table = {}
  for path in flax.traverse_util.flatten_dict(params):
    name, transpose = torch_name(path)
    table[name] = (path, transpose)
  return table


def to_torch_state(params: Mapping) -> dict:
  """Our params as a torch-named dict of numpy arrays (tied aliases omitted)."""
  state = {}
  for name, (path, transpose) in name_table(params).items():
    value = np.asarray(flax.traverse_util.flatten_dict(params)[path])
    state[name] = np.array(value.T if transpose else value, order="C")  # keeps 0-d alphas 0-d
  return state


def _is_ignored(name: str, skip_suffixes: Iterable[str]) -> bool:
  return name.endswith(IGNORED_BUFFERS) or any(name.endswith(s) for s in skip_suffixes)


def from_torch_state(state: Mapping, template: Mapping, *, allow_missing: Iterable[str] = (),
                     skip_suffixes: Iterable[str] = ()) -> tuple:
  """Maps a torch state dict onto the structure of `template` (our params, e.g. freshly initialised).

  Returns (params, report) where report lists the tensors taken from `template` (allowed missing,
  matched by prefix) and those skipped. Raises UserError naming every missing, unexpected or
  mis-shaped tensor.
  """
  table = name_table(template)
  flat_template = flax.traverse_util.flatten_dict(template)
  state = dict(state)
  problems, flat, report = [], {}, {"kept_from_init": [], "skipped": []}
  if not any(n.startswith("bert.") for n in table) and any(n.startswith("bert.") for n in state):
    # The encoder of a model with heads: BERT's own heads are left out, any other tensor is named.
    problems += [f"unexpected tensor {n}" for n in sorted(state) if not n.startswith(("bert.", *BERT_HEADS))]
    state = {n[len("bert."):]: v for n, v in state.items() if n.startswith("bert.")}
  elif any(n.startswith("bert.") for n in table) and not any(n.startswith("bert.") for n in state):
    state = {"bert." + n: v for n, v in state.items()}  # a bare BertModel checkpoint
  for alias, source in TIED_ALIASES.items():
    if alias in state:
      if source in state and not np.array_equal(np.asarray(state[alias]), np.asarray(state[source])):
        problems.append(f"{alias} should be tied to {source} but differs")
      state.pop(alias)
  for name, (path, transpose) in table.items():
    if name not in state:
      if any(name.startswith(prefix) for prefix in allow_missing):
        flat[path] = flat_template[path]
        report["kept_from_init"].append(name)
      else:
        problems.append(f"missing tensor {name}")
      continue
    value = np.asarray(state.pop(name))
    value = value.T if transpose else value
    expected = tuple(np.shape(flat_template[path]))
    if value.shape != expected:
      problems.append(f"shape mismatch for {name}: checkpoint {tuple(value.T.shape if transpose else value.shape)}"
                      f", model {expected[::-1] if transpose else expected}")
      continue
    flat[path] = value.astype(np.asarray(flat_template[path]).dtype)
  for name in sorted(state):
    if _is_ignored(name, skip_suffixes):
      report["skipped"].append(name)
    else:
      problems.append(f"unexpected tensor {name}")
  if problems:
    raise UserError("checkpoint does not fit the model: " + "; ".join(problems))
  return flax.traverse_util.unflatten_dict(flat), report


# --- checkpoint directories ---------------------------------------------------

# The heads of BERT checkpoints we read: pretraining (MLM and NSP) and sequence classification.
BERT_HEADS = ("cls.", "classifier.")
POOLER_PREFIXES = ("bert.pooler.", "pooler.")  # BertForMaskedLM has none: a fresh init, as transformers does
# config.json's `architectures` whose tensors are those heads; ours (BiPFT*) are written by `convert to-pytorch`.
ARCHITECTURES = ("BertModel", "BertForPreTraining", "BertForMaskedLM", "BertForSequenceClassification",
                 "BiPFTModel", "BiPFTForPreTraining", "BiPFTForSequenceClassification")

HF_CONFIG_FIELDS = {  # Hugging Face BertConfig field -> BertConfig field
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "hidden_dropout_prob": "hidden_dropout",
    "attention_probs_dropout_prob": "attention_dropout", "pad_token_id": "pad_token_id",
}


def config_from_hf(hf: Mapping, **overrides) -> model_lib.BertConfig:
  """Our BertConfig from a Hugging Face BERT config.json dict (the release's fields included)."""
  if hf.get("model_type", "bert") not in ("bert", "bipft"):
    raise UserError(f"config.json describes a {hf['model_type']} model: bipft reads BERT checkpoints "
                    "(model_type bert) and its own exports (bipft)")
  unknown = [name for name in hf.get("architectures") or () if name not in ARCHITECTURES]
  if unknown:
    raise UserError(f"config.json describes a {unknown[0]}, whose head bipft does not compute: it reads "
                    f"{', '.join(ARCHITECTURES[:4])} checkpoints")
  for field in ("is_decoder", "add_cross_attention"):
    if hf.get(field):
      raise UserError(f"config.json sets {field}=true (a BERT decoder): bipft's BERT attends in both directions only")
  binary = hf.get("weight_bits", 32) == 1
  # The release's students (and our exports) set hidden_act for the MLM transform only, relu in the
  # release; in a Hugging Face BERT it is the FFN's activation too, and our FFN is GELU.
  transform_only = binary or hf.get("model_type") == "bipft"
  if hf.get("hidden_act", "gelu") not in (("gelu", "relu") if transform_only else ("gelu",)):
    raise UserError(f"hidden_act {hf['hidden_act']!r} is not supported: the FFN computes GELU"
                    + (" (the release's students set relu for their MLM transform only)" if transform_only else ""))
  if hf.get("position_embedding_type", "absolute") != "absolute":
    raise UserError("only absolute position embeddings are supported")
  values = {ours: hf[theirs] for theirs, ours in HF_CONFIG_FIELDS.items() if theirs in hf}
  if values.get("pad_token_id", 0) is None:  # some hub configs say null: BERT's vocabularies pad with 0
    del values["pad_token_id"]
  if hf.get("classifier_dropout") is not None:
    values["classifier_dropout"] = hf["classifier_dropout"]
  for field in ("pooling", "precision"):  # ours; Hugging Face BERT pools [CLS], in fp32
    if field in hf:
      values[field] = hf[field]
  values["binary"] = binary
  values["mlm_transform_act"] = hf.get("hidden_act", "gelu")
  values.update(overrides)
  try:
    if "id2label" in hf:
      values.setdefault("num_labels", len(hf["id2label"]))
    return model_lib.BertConfig.from_dict(values)
  except (TypeError, ValueError) as e:
    raise UserError(f"config.json does not describe a supported model: {e}") from None


def read_config(directory: str) -> dict:
  path = os.path.join(directory, "config.json")
  if not os.path.isdir(directory):
    raise UserError(f"checkpoint directory {directory} does not exist")
  if not os.path.isfile(path):
    if any(name.isdigit() or name == "best" for name in os.listdir(directory)):  # step folders: orbax's
      raise UserError(f"{directory} is a bipft workdir (orbax checkpoints), not a PyTorch checkpoint folder: "
                      f"`bipft convert to-pytorch --checkpoint {directory} --out FOLDER` writes one")
    raise UserError(f"{path} is missing: a checkpoint directory needs config.json and model.safetensors "
                    "or pytorch_model.bin")
  try:
    with open(path) as f:
      config = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(config, dict):
    raise UserError(f"{path} holds a JSON {type(config).__name__}, not an object of config fields")
  return config


# TF-converted checkpoints (e.g. bert-base-uncased's pytorch_model.bin) name LayerNorm leaves gamma/beta.
LEGACY_LEAVES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def _current_names(state: dict) -> dict:
  renamed = {}
  for name, value in state.items():
    for old, new in LEGACY_LEAVES.items():
      if name.endswith(old):
        name = name[:-len(old)] + new
    renamed[name] = value
  return renamed


def _read_safetensors(path: str) -> dict:
  from safetensors import safe_open
  try:
    state = {}
    with safe_open(path, framework="numpy") as f:
      bfloat16 = [k for k in f.keys() if f.get_slice(k).get_dtype() == "BF16"]
      state.update((k, f.get_tensor(k)) for k in f.keys() if k not in bfloat16)
    if bfloat16:  # numpy has no bfloat16; JAX reads it
      with safe_open(path, framework="flax") as f:
        state.update((k, np.asarray(f.get_tensor(k), np.float32)) for k in bfloat16)
  except Exception as e:  # safetensors raises several types for corrupt files
    raise UserError(f"{path} is not a readable safetensors file: {e}") from None
  return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) else v for k, v in state.items()}


def _read_bin(path: str) -> dict:
  try:
    import torch
  except ImportError:
    raise UserError(f"reading {path} needs torch: pip install 'bipft-jax[torch]'") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError:  # torch's message advises weights_only=False: wrong for an untrusted file
    raise UserError(f"{path} was refused: it holds objects other than tensors, and loading it would run "
                    "pickled code; ask for a safetensors file or save a plain state dict") from None
  except Exception as e:
    raise UserError(f"{path} is not a readable PyTorch file: {(str(e).splitlines() or [''])[0]}") from None
  if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise UserError(f"{path} holds a {type(state).__name__}, not a state dict of named tensors")
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def _shard_files(index_path: str) -> list:
  """The files a Hugging Face `*.index.json` (large models saved in shards) maps tensors to."""
  try:
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    files = sorted(set(weight_map.values()))
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise UserError(f"{index_path} is not a shard index with a weight_map: {e}") from None
  directory = os.path.dirname(index_path)
  missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
  if missing:
    raise UserError(f"{index_path} lists {len(missing)} shard(s) that are not there, first {missing[0]}")
  return [os.path.join(directory, name) for name in files]


def read_weights(directory: str) -> dict:
  """Tensors of model.safetensors, or pytorch_model.bin loaded with weights_only=True, or of the
  shards their `.index.json` lists; floating tensors (bfloat16 and float16 included) as float32."""
  for name, read in (("model.safetensors", _read_safetensors), ("pytorch_model.bin", _read_bin)):
    path = os.path.join(directory, name)
    if os.path.isfile(path):
      return _current_names(read(path))
    if os.path.isfile(path + ".index.json"):
      state = {}
      for shard in _shard_files(path + ".index.json"):
        state.update(read(shard))
      return _current_names(state)
  raise UserError(f"no weights in {directory}: expected model.safetensors or pytorch_model.bin "
                  "(or their sharded .index.json)")


def load_pretrained(directory: str, head: str = "encoder", *, allow_missing: Iterable[str] = (),
                    drop: Iterable[str] = (), seed: int = 0, **config_overrides) -> tuple:
  """(config, params) from a PyTorch BERT checkpoint directory (Hugging Face or release names).

  Tensors under `allow_missing` prefixes (e.g. heads the checkpoint lacks) keep a fresh init, as does a
  missing pooler (said on stderr); those under `drop` prefixes (e.g. pretraining heads a classifier
  does not have) are left out.
  """
  import jax
  from bipft_jax import distributed
  config = config_from_hf(read_config(directory), **config_overrides)
  state = {name: value for name, value in read_weights(directory).items() if not name.startswith(tuple(drop))}
  template = model_params.init_params(model_lib.build(config, head), jax.random.key(seed))
  params, report = from_torch_state(state, template, allow_missing=(*allow_missing, *POOLER_PREFIXES))
  if distributed.is_primary() and any(name.startswith(POOLER_PREFIXES) for name in report["kept_from_init"]):
    print(f"bipft: note: {directory} has no pooler (a BertForMaskedLM, say): it starts from a fresh init",
          file=sys.stderr)
  return config, params


def has_tokenizer(directory: str) -> bool:
  """Whether `directory` holds a WordPiece tokenizer `load_tokenizer` reads."""
  return any(os.path.isfile(os.path.join(directory, name)) for name in ("vocab.txt", "tokenizer.json"))


def load_tokenizer(directory: str, vocab_size: Optional[int] = None, fix: str = ""):
  """The WordPiece tokenizer saved beside the weights (transformers BertTokenizerFast).

  With `vocab_size`, a tokenizer with more tokens than the model's embedding table is refused;
  `fix` tells the user which setting to change.
  """
  from transformers import BertTokenizerFast
  if not has_tokenizer(directory):
    raise UserError(f"no tokenizer in {directory}: expected vocab.txt or tokenizer.json")
  tokenizer = BertTokenizerFast.from_pretrained(directory)
  if vocab_size is not None and len(tokenizer) > vocab_size:
    fix = fix or "use the vocab the model was trained with"
    raise UserError(f"the tokenizer in {directory} has {len(tokenizer)} tokens but the model's vocab_size is "
                    f"{vocab_size}: {fix}")
  return tokenizer
