"""`bipft convert`: orbax checkpoints <-> PyTorch checkpoint directories.

  bipft convert from-pytorch --src DIR --out WORKDIR
  bipft convert to-pytorch --checkpoint WORKDIR [--step N] --out DIR [--format hf|reference]

`from-pytorch` reads config.json plus model.safetensors or pytorch_model.bin (or their shards),
with Hugging Face BERT names (an FP teacher) or the release's binary names (a student from
pretraining or GLUE finetuning); the head is detected from the tensor names. `to-pytorch
--format hf` writes a directory that plain transformers loads with `trust_remote_code=True` (our
own PyTorch model, `pytorch_model/modeling_bipft.py`, travels with it); `--format reference`
writes the release's state dict, tie aliases included, so the authors' scripts load it with a
strict `load_state_dict`. A classifier whose checkpoint records its run names its task's classes in
config.json (`id2label`, `label2id`); others keep LABEL_0, LABEL_1, ...
Names and transposes come from the single table in `pytorch_io`.
"""
import argparse
import json
import os
import shutil

import numpy as np

from bipft_jax import files, pytorch_io
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax.errors import UserError

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
# The release's GLUE model carries PReLU modules (`sa`) that its forward never uses.
UNUSED_RELEASE_SUFFIXES = (".sa.weight",)
# MLM-only checkpoints (BertForMaskedLM) have no pooler and no NSP head: those start from a fresh
# init, and the conversion says so.
OPTIONAL_PREFIXES = ("cls.seq_relationship.", *pytorch_io.POOLER_PREFIXES)
MODELING_FILE = os.path.join(os.path.dirname(__file__), "pytorch_model", "modeling_bipft.py")
# The release's binarization switches, and the only values this implementation computes.
RELEASE_BINARY_FIELDS = {"input_bits": 1, "weight_layerwise": True, "input_layerwise": True,
                         "embed_layerwise": False, "not_quantize_attention": False,
                         "half_binary": False, "improve_linear": False}
RELEASE_BINARIZER_FIELDS = {"weight_quant_method": "weight_binarizer",
                            "input_quant_method": "activation_binarizer",
                            "linear_quant_method": "linear_binarizer",
                            "attention_prob_quant_method": "attention_prob_binarizer"}
# The binarizers modeling_bipft.py computes (ZOO_LINEARS there; tests check the two agree).
PYTORCH_LINEAR_BINARIZERS = ("bipft", "bnn", "xnor", "xnorplusplus", "dorefa", "bireal", "react", "recu",
                             "fda", "binarydm", "binarydm1", "dbllm_fdb", "bivit_weight")
PYTORCH_PROB_BINARIZERS = ("elastic", "bivit")


# --- PyTorch -> ours ------------------------------------------------------------

def detect_head(state: dict) -> str:
  """pretraining (`cls.*`), classification (`classifier.*`) or encoder (a bare BertModel)."""
  if any(name.startswith("cls.") for name in state):
    return "pretraining"
  if any(name.startswith("classifier.") for name in state):
    return "classification"
  return "encoder"


def _estimator_rank(state: dict) -> int:
  """Rank of the residual estimators (the rows of q_p); 0 when there are none (BiPFT-A)."""
  for name, value in state.items():
    if name.endswith("attention.self.q_p.weight"):
      return int(np.shape(value)[0])
  return 0


def config_from_checkpoint(hf: dict, state: dict) -> model_lib.BertConfig:
  """Our config from a PyTorch config.json; the estimator rank comes from the tensors if it does not say."""
  overrides = {}
  if hf.get("weight_bits", 32) == 1:
    for field, supported in RELEASE_BINARY_FIELDS.items():
      if field in hf and hf[field] != supported:
        raise UserError(f"config.json sets {field}={hf[field]!r}; only {supported!r} (BiPFT) is supported")
    for field, ours in RELEASE_BINARIZER_FIELDS.items():
      if field in hf:
        overrides[ours] = hf[field]
    overrides["estimator_rank"] = hf.get("estimator_rank", _estimator_rank(state))
  return pytorch_io.config_from_hf(hf, **overrides)  # checks every field, the binarizer names too


def read_pytorch_checkpoint(directory: str, seed: int = 0) -> tuple:
  """(config, head, params, report) from a PyTorch checkpoint directory; report lists skipped tensors."""
  import jax
  hf = pytorch_io.read_config(directory)
  state = pytorch_io.read_weights(directory)
  config = config_from_checkpoint(hf, state)
  head = detect_head(state)
  template = model_params.init_params(model_lib.build(config, head), jax.random.key(seed))
  params, report = pytorch_io.from_torch_state(state, template, allow_missing=OPTIONAL_PREFIXES,
                                               skip_suffixes=UNUSED_RELEASE_SUFFIXES)
  return config, head, params, report


def _copy_tokenizer(src: str, dst: str) -> list:
  copied = [name for name in TOKENIZER_FILES if src and os.path.isfile(os.path.join(src, name))]
  if copied:
    os.makedirs(dst, exist_ok=True)
    for name in copied:
      shutil.copy2(os.path.join(src, name), os.path.join(dst, name))
  return copied


def from_pytorch(src: str, out: str) -> dict:
  """Converts the PyTorch checkpoint in `src` into an orbax workdir `out`; returns a report."""
  from bipft_jax import checkpointing
  files.check_new_folder(out, "--out")
  config, head, params, report = read_pytorch_checkpoint(src)
  if pytorch_io.has_tokenizer(src):
    pytorch_io.load_tokenizer(src, config.vocab_size, fix="the checkpoint's vocabulary is not its tokenizer's")
  with files.atomic_folder(out) as tmp:
    checkpointing.save_params(tmp, params, config, head, step=0, run_config=_conversion_record(src, head, config))
    # Beside the step folders, where `bipft finetune --init_from WORKDIR` looks for a tokenizer.
    report["tokenizer"] = _copy_tokenizer(src, tmp)
  report.update(head=head, binary=config.binary, estimator_rank=config.estimator_rank)
  return report


def _conversion_record(src: str, head: str, config: model_lib.BertConfig) -> dict:
  """The run record of a converted checkpoint: its source and a classifier's class names (config.json's
  id2label, unless transformers' defaults), which `to-pytorch` writes back (they were lost)."""
  record = {"converted_from": os.path.abspath(src)}
  id2label = pytorch_io.read_config(src).get("id2label")
  if head == "classification" and isinstance(id2label, dict) and len(id2label) == config.num_labels > 1:
    labels = [str(id2label.get(str(i), id2label.get(i, ""))) for i in range(config.num_labels)]
    if labels != [f"LABEL_{i}" for i in range(config.num_labels)]:
      record["labels"] = labels
  return record


# --- ours -> PyTorch ------------------------------------------------------------

def hf_config_dict(config: model_lib.BertConfig, head: str, labels: tuple | None = None) -> dict:
  """A Hugging Face BertConfig dict with the release's binary fields and our own switches; `labels`:
  the classifier's class names (else LABEL_0, LABEL_1, ...)."""
  labels = labels or tuple(f"LABEL_{i}" for i in range(config.num_labels))
  hf = {theirs: getattr(config, ours) for theirs, ours in pytorch_io.HF_CONFIG_FIELDS.items()}
  hf.update(
      # hidden_act reaches only the MLM transform (the FFN is always erf-GELU), as in the release.
      hidden_act=config.mlm_transform_act, initializer_range=0.02, position_embedding_type="absolute",
      classifier_dropout=config.classifier_dropout,
      id2label={str(i): label for i, label in enumerate(labels)},
      label2id={label: i for i, label in enumerate(labels)},
      weight_bits=1 if config.binary else 32, input_bits=1 if config.binary else 32,
      weight_quant_method=config.weight_binarizer, input_quant_method=config.activation_binarizer,
      linear_quant_method=config.linear_binarizer,
      attention_prob_quant_method=config.attention_prob_binarizer,
      estimator_rank=config.estimator_rank, pooling=config.pooling, precision=config.precision)
  if config.binary:
    # The rest of what the release's model constructors read (clip_init_val is unused by `elastic`).
    hf.update(RELEASE_BINARY_FIELDS, learnable_scaling=True, sym_quant_qkvo=True, sym_quant_ffn_attn=False,
              clip_init_val=2.5, improve_kqv=config.estimator_rank > 0, lora_rank=max(config.estimator_rank, 1))
  if head == "classification":
    hf["problem_type"] = "regression" if config.num_labels == 1 else "single_label_classification"
  return hf


HF_CLASSES = {"pretraining": "BiPFTForPreTraining", "classification": "BiPFTForSequenceClassification",
              "encoder": "BiPFTModel"}


def hf_export_config(config: model_lib.BertConfig, head: str, labels: tuple | None = None) -> dict:
  """config.json of the `hf` export: loads through `auto_map` into modeling_bipft.py."""
  hf = hf_config_dict(config, head, labels)
  hf.update(model_type="bipft", architectures=[HF_CLASSES[head]], auto_map={
      "AutoConfig": "modeling_bipft.BiPFTConfig",
      "AutoModel": "modeling_bipft.BiPFTModel",
      "AutoModelForPreTraining": "modeling_bipft.BiPFTForPreTraining",
      "AutoModelForSequenceClassification": "modeling_bipft.BiPFTForSequenceClassification"})
  if head == "pretraining":  # only a pretraining export has the MLM head (elsewhere it would start random)
    hf["auto_map"]["AutoModelForMaskedLM"] = "modeling_bipft.BiPFTForMaskedLM"
  return hf


def reference_state(params: dict, head: str) -> dict:
  """The release's state dict: our torch names plus the MLM decoder's tie aliases."""
  state = pytorch_io.to_torch_state(params)
  if head == "pretraining":
    for alias, source in pytorch_io.TIED_ALIASES.items():
      state[alias] = state[source].copy()
  return state


def to_pytorch(checkpoint: str, out: str, step: int | None = None, fmt: str = "hf",
               tokenizer: str | None = None) -> dict:
  """Writes the checkpoint in workdir `checkpoint` as a PyTorch directory `out` (`hf` or `reference`).

  Tokenizer files come from `tokenizer` if given, else from the checkpoint's workdir if it has them.
  """
  from safetensors.numpy import save_file
  from bipft_jax import checkpointing
  if tokenizer is not None and not any(os.path.isfile(os.path.join(tokenizer, f)) for f in TOKENIZER_FILES):
    raise UserError(f"--tokenizer {tokenizer} has none of {', '.join(TOKENIZER_FILES)}")
  files.check_new_folder(out, "--out")
  config, head, params = checkpointing.restore_params(checkpoint, step)
  _check_exportable(config, fmt)
  params = _to_host(params)
  run = checkpointing.read_run_config(checkpoint, step)
  labels = task_labels(run, config)
  if fmt == "hf":
    state, config_json = pytorch_io.to_torch_state(params), hf_export_config(config, head, labels)
  else:
    state = reference_state(params, head)
    config_json = dict(hf_config_dict(config, head, labels), model_type="bert")
  with files.atomic_folder(out) as tmp:
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, "config.json"), "w") as f:  # inside the temp folder: renamed whole
      json.dump(config_json, f, indent=2, sort_keys=True)
    if fmt == "hf":
      shutil.copy2(MODELING_FILE, os.path.join(tmp, "modeling_bipft.py"))
    copied = _copy_tokenizer(tokenizer or _run_tokenizer(checkpoint, run), tmp)
  return {"head": head, "binary": config.binary, "tensors": len(state), "tokenizer": copied}


def task_labels(run: dict | None, config: model_lib.BertConfig) -> tuple | None:
  """The class names of the task a classifier was finetuned on (its run's record), or converted with, for
  id2label; None for another model, a regression task or a checkpoint without the record."""
  from bipft_jax.glue import tasks
  if run and len(run.get("labels") or ()) == config.num_labels:  # converted from a classifier that named them
    return tuple(run["labels"])
  if not run or "task" not in run or config.num_labels < 2:
    return None
  task = tasks.custom_task(run.get("data", {}).get("labels", ""), 1) if run["task"] == "custom" else \
      tasks.TASKS.get(run["task"])
  return task.labels if task is not None and task.num_labels == config.num_labels else None


def _check_exportable(config: model_lib.BertConfig, fmt: str) -> None:
  """UserError naming a binarizer the PyTorch model (`hf`) or the release (`reference`) does not compute,
  or an FP model plain BERT would misread, before anything is written."""
  if not config.binary:
    if fmt == "reference" and config.mlm_transform_act != "gelu":  # plain BERT would apply it in the FFN too
      raise UserError(f"an FP model with mlm_transform_act={config.mlm_transform_act!r} has no Hugging Face BERT "
                      "config (its hidden_act is the FFN's activation too): export it with --format hf")
    return
  linear, probs = PYTORCH_LINEAR_BINARIZERS, PYTORCH_PROB_BINARIZERS
  if fmt != "hf":  # the release computes its own binarizers only
    linear, probs = ("bipft",), ("elastic",)
  for name, supported, kind in ((config.linear_binarizer, linear, "linear"),
                                (config.attention_prob_binarizer, probs, "attention-probability")):
    if name not in supported:
      raise UserError(f"the {kind} binarizer {name!r} has no PyTorch implementation in the {fmt} format; "
                      f"convert to-pytorch exports {', '.join(supported)}")


def _run_tokenizer(checkpoint: str, run: dict | None) -> str:
  """The folder of the tokenizer the model reads texts with: beside its steps, or its run's (MiniLM's for
  a training run that used the default); "" when nothing says (a converted checkpoint without one)."""
  from bipft_jax import assets
  from bipft_jax.glue import splits
  trained = run and ("task" in run or "teacher" in run)
  return splits.saved_tokenizer(checkpoint, run) or (str(assets.minilm_dir()) if trained else "")


def _to_host(params: dict) -> dict:
  """Numpy copies of (possibly sharded) arrays, gathered onto the host."""
  import jax
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)


# --- CLI ------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
  src = sub.add_parser("from-pytorch", help="PyTorch checkpoint directory -> orbax workdir")
  src.add_argument("--src", required=True, help="directory with config.json and model.safetensors "
                   "or pytorch_model.bin (Hugging Face or release names)")
  src.add_argument("--out", required=True, help="new workdir for the orbax checkpoint")
  dst = sub.add_parser("to-pytorch", help="orbax workdir -> PyTorch checkpoint directory")
  dst.add_argument("--checkpoint", required=True, help="workdir holding the orbax checkpoint")
  dst.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  dst.add_argument("--out", required=True, help="new directory for the PyTorch files")
  dst.add_argument("--format", choices=("hf", "reference"), default="hf",
                   help="hf: transformers-loadable with trust_remote_code (default); "
                        "reference: the original release's state dict names")
  dst.add_argument("--tokenizer", default=None,
                   help="folder whose vocab.txt / tokenizer.json to ship (default: the workdir's, if any)")


def run(args: argparse.Namespace) -> int:
  if args.direction == "from-pytorch":
    report = from_pytorch(args.src, args.out)
    for name in report["skipped"]:
      print(f"skipped unused tensor {name}")
    for name in report["kept_from_init"]:
      print(f"note: {name} is not in the checkpoint; it starts from a fresh init")
    kind = "binary student" if report["binary"] else "full-precision model"
    print(f"wrote {args.out}: {kind}, head {report['head']}, tokenizer files: "
          f"{', '.join(report['tokenizer']) or 'none'}")
  else:
    report = to_pytorch(args.checkpoint, args.out, args.step, args.format, args.tokenizer)
    print(f"wrote {args.out} ({args.format}): {report['tensors']} tensors, head {report['head']}, "
          f"tokenizer files: {', '.join(report['tokenizer']) or 'none (pass --tokenizer FOLDER to ship one)'}")
  return 0
