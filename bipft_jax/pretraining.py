"""Pretraining's parts (METHOD.md section 6): the frozen teacher, the student, the distillation
loss and the held-out MLM evaluator. `bipft pretrain` (train.py) hands them to the run engine;
`bipft evaluate` scores checkpoints with the same evaluator.
"""
import dataclasses
import os
import sys
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from bipft_jax import distributed, engine, losses, optim, pytorch_io, sharding
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax.data import hosts, sources
from bipft_jax.errors import UserError

SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")


# ----------------------------------------------------------------------------------------------
# Models


def tokenizer_folder(config) -> str:
  """The folder of the student's tokenizer: `config.tokenizer`, else the teacher's."""
  if config.tokenizer:
    return config.tokenizer
  if not config.teacher.path:
    raise UserError("a random teacher (teacher.path='') needs --config.tokenizer=FOLDER with a vocab.txt")
  return _teacher_folder(config)


def _teacher_folder(config) -> str:
  if config.teacher.path == "minilm":
    from bipft_jax import assets
    return str(assets.minilm_dir())
  return config.teacher.path


def load_teacher(config) -> tuple:
  """(teacher config, teacher params as numpy, tokenizer folder) from `config.teacher`."""
  head = "pretraining" if config.loss.nsp_distill else "encoder"
  tokenizer = tokenizer_folder(config)
  if config.teacher.path:
    try:
      teacher_config, params = pytorch_io.load_pretrained(_teacher_folder(config), head)
    except UserError as e:  # a bare BertModel (sentence encoders, MiniLM): name the switch, not 7 tensors
      if head == "pretraining" and "missing tensor cls.seq_relationship." in str(e):
        raise UserError(f"the teacher in {_teacher_folder(config)} has no NSP head (cls.seq_relationship), which "
                        "loss.nsp_distill=True distils: set --config.loss.nsp_distill=False (and, without an MLM "
                        "head either, --config.loss.detach_heads=True, as the demo does)") from None
      raise
    return teacher_config, jax.device_get(params), tokenizer
  teacher_config = dataclasses.replace(student_config(config), binary=False, mlm_transform_act="gelu")
  params = model_params.init_params(model_lib.build(teacher_config, head), jax.random.key(config.seed + 1))
  return teacher_config, jax.device_get(params), tokenizer


def student_config(config, teacher_config: Optional[model_lib.BertConfig] = None) -> model_lib.BertConfig:
  try:
    student = model_lib.BertConfig.from_dict(config.model)
  except (TypeError, ValueError) as e:
    raise UserError(f"bad model config: {e}") from None
  if teacher_config is not None:
    _check_same_shape(student, teacher_config, "set --config.model.FIELD to the teacher's values")
  return student


def _check_same_shape(student: model_lib.BertConfig, teacher_config: model_lib.BertConfig, fix: str) -> None:
  differ = {f: (getattr(student, f), getattr(teacher_config, f)) for f in SHAPE_FIELDS
            if getattr(student, f) != getattr(teacher_config, f)}
  if differ:
    raise UserError(f"the student's shape differs from the teacher's (student, teacher): {differ}; {fix}")


def teacher_module(config, teacher_config: model_lib.BertConfig, student: model_lib.BertConfig) -> nn.Module:
  """The frozen teacher: its NSP head only if it is distilled; the student's precision policy."""
  return model_lib.build(dataclasses.replace(teacher_config, precision=student.precision),
                         "pretraining" if config.loss.nsp_distill else "encoder")


def placed_teacher(config, student: model_lib.BertConfig, mesh, rules) -> tuple:
  """(module, parameters on the mesh) of the teacher `config` names, for a saved `student`."""
  teacher_config, params, _ = load_teacher(config)
  _check_same_shape(student, teacher_config, "--config.teacher must name the run's teacher")
  teacher = teacher_module(config, teacher_config, student)
  return teacher, engine.put_global(params, engine.param_shardings(teacher, mesh, rules))


def teacher_outputs(teacher: nn.Module, params, batch: dict, dropout: bool, key) -> dict:
  """The frozen teacher's hidden states (and NSP logits when it has the head; no MLM decoder)."""
  kwargs = {}
  if isinstance(teacher, model_lib.BertForPreTraining):  # the MLM decoder at one position: unused
    kwargs["mlm_positions_BxN"] = jnp.zeros((batch["input_ids"].shape[0], 1), jnp.int32)
  out = teacher.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                      deterministic=not dropout, rngs={"dropout": key}, **kwargs)
  return jax.lax.stop_gradient(out)


def masked_accuracy(mlm_logits_BxNxV, mlm_labels_BxN) -> tuple:
  """(correct, counted) MLM predictions at positions with a label."""
  valid_BxN = mlm_labels_BxN != losses.IGNORE_INDEX
  correct_BxN = (jnp.argmax(mlm_logits_BxNxV, axis=-1) == mlm_labels_BxN) & valid_BxN
  return jnp.sum(correct_BxN), jnp.sum(valid_BxN)


# ----------------------------------------------------------------------------------------------
# Loss and evaluation


def student_loss(student: nn.Module, config, params, teacher_out: dict, batch: dict, key) -> tuple:
  """(loss, metrics) of the student's training forward against the teacher's outputs."""
  student_out = student.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                              batch["attention_mask"], mlm_positions_BxN=batch["mlm_positions"],
                              deterministic=False, detach_heads=config.loss.detach_heads,
                              rngs={"dropout": key})
  loss, metrics = losses.distillation_loss(
      student_out, teacher_out, batch, nsp_distill=config.loss.nsp_distill,
      mask_padding_in_mse=config.loss.mask_padding_in_mse, mlm_labels=batch["mlm_labels"])
  correct, counted = masked_accuracy(student_out["mlm_logits"], batch["mlm_labels"])
  metrics = {k: v for k, v in metrics.items() if k != "rep_dist_layerwise"}
  metrics["mlm_accuracy"] = correct / jnp.maximum(counted, 1)
  return loss, metrics


def make_loss_fn(student: nn.Module, teacher: nn.Module, config):
  """loss_fn(params, teacher_params, batch, key) -> (loss, metrics) for the engine's step: the frozen
  teacher's forward, then the student's distillation loss against it."""
  def loss_fn(params, teacher_params, batch, key):
    teacher_key, student_key = jax.random.split(key)
    teacher_out = teacher_outputs(teacher, teacher_params, batch, config.teacher.dropout, teacher_key)
    return student_loss(student, config, params, teacher_out, batch, student_key)
  return loss_fn


def held_out_evaluator(student: nn.Module, teacher: nn.Module, config, batches: list, mesh, rules):
  """evaluate(params, teacher_params) -> {eval_mlm_accuracy, eval_mlm_loss, eval_rep_dist_loss,
  eval_total_loss} over the held-out `batches` (global arrays), deterministic: what `bipft pretrain`
  logs and `bipft evaluate` prints. The last two are the training objective's hidden-state MSE to
  the teacher and its total (losses.distillation_loss), without dropout."""
  def eval_step(params, teacher_params, batch):
    out = student.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                        mlm_positions_BxN=batch["mlm_positions"], deterministic=True)
    teacher_out = teacher_outputs(teacher, teacher_params, batch, False, jax.random.key(0))
    _, metrics = losses.distillation_loss(
        out, teacher_out, batch, nsp_distill=config.loss.nsp_distill,
        mask_padding_in_mse=config.loss.mask_padding_in_mse, mlm_labels=batch["mlm_labels"])
    correct, counted = masked_accuracy(out["mlm_logits"], batch["mlm_labels"])
    return correct, counted, metrics["mlm_loss"] * counted, metrics["rep_dist_loss"], metrics["total_loss"]

  replicated = NamedSharding(mesh, PartitionSpec())
  step = jax.jit(eval_step, in_shardings=(engine.param_shardings(student, mesh, rules),
                                          engine.param_shardings(teacher, mesh, rules),
                                          sharding.batch_sharding(mesh, rules)),
                 out_shardings=replicated)

  def evaluate(params, teacher_params) -> dict:
    with sharding.on_mesh(mesh, rules):
      per_batch = np.array([jax.device_get(step(params, teacher_params, b)) for b in batches], np.float64)
    correct, counted, nll = per_batch[:, :3].sum(axis=0)
    rep, total = per_batch[:, 3:].mean(axis=0)  # the batches are of one size
    return {"eval_mlm_accuracy": float(correct / max(counted, 1)), "eval_mlm_loss": float(nll / max(counted, 1)),
            "eval_rep_dist_loss": float(rep), "eval_total_loss": float(total)}
  return evaluate


def held_out_batches(config, tokenizer, batch_sharding: NamedSharding) -> tuple:
  """(the fixed held-out batches (global arrays) the run measures its MLM accuracy on, what their source
  holds); a warning on stderr if they hold an example twice (a held-out set too small for them)."""
  source = sources.open_source(config.data, "eval")
  held = sources.describe(source)
  try:
    batches, repeated = hosts.fixed_batches(source, tokenizer, config.data, global_batch_size=config.eval_batch_size,
                                            num_batches=config.eval_batches, seed=config.seed + 1)
  except UserError as e:  # which data: the training corpus's error reads the same
    raise UserError(f"the held-out data ({held}): {e}") from None
  if repeated and distributed.is_primary():
    print(f"bipft: warning: the held-out data ({held}) makes fewer examples than eval_batches x eval_batch_size "
          f"({config.eval_batches} x {config.eval_batch_size}): the evaluation counts some twice or more; give it "
          "more text, or lower eval_batches", file=sys.stderr)
  return [engine.global_batch(b, batch_sharding) for b in batches], held


def describe(step: int, evaluation: dict) -> str:
  """One line for a `held_out_evaluator` result at `step`."""
  return (f"held-out MLM accuracy at step {step}: {evaluation['eval_mlm_accuracy']:.4f} "
          f"(cross entropy {evaluation['eval_mlm_loss']:.3f}), hidden-state MSE to the teacher "
          f"{evaluation['eval_rep_dist_loss']:.4f}")


def _endless(data: hosts.HostData):
  """(batch, data state) pairs without end (the step count ends the run); closing the generator
  (engine.Prefetch does) or dropping it ends the data's worker processes."""
  try:
    while True:
      yield next(data), data.state()
  finally:
    data.close()


# ----------------------------------------------------------------------------------------------
# The job


def distillation_job(config, mesh, rules, init_from: Optional[str] = None) -> engine.Job:
  """Pretraining for the run engine: the student distilled from the frozen teacher on the corpus,
  starting (in a new workdir) from `init_from`'s parameters, else from the teacher's."""
  schedule = optim.learning_rate_schedule(config.optimizer)  # a bad one fails before anything is loaded
  teacher_config, teacher_params, tokenizer_dir = load_teacher(config)
  student_cfg = student_config(config, teacher_config)
  if config.data.max_seq_length > student_cfg.max_position_embeddings:
    raise UserError(f"data.max_seq_length {config.data.max_seq_length} exceeds the model's "
                    f"{student_cfg.max_position_embeddings} positions")
  if student_cfg.type_vocab_size < 2:  # a lookup past the table reads its last row: segment B read as A
    raise UserError(f"pretraining makes sentence pairs, whose second segments have token type 1, but the model's "
                    f"type_vocab_size is {student_cfg.type_vocab_size}: set --config.model.type_vocab_size=2 (and a "
                    "teacher with two token types)")
  divisor = sharding.batch_divisor(mesh, rules)
  engine.check_batch_size("batch_size", config.batch_size, divisor, config.grad_accum_steps)
  engine.check_batch_size("eval_batch_size", config.eval_batch_size, divisor)
  student = model_lib.build(student_cfg, "pretraining")
  teacher = teacher_module(config, teacher_config, student_cfg)
  tokenizer = pytorch_io.load_tokenizer(tokenizer_dir, student_cfg.vocab_size,
                                        fix="set --config.model.vocab_size or --config.tokenizer")
  held_out, held = held_out_batches(config, tokenizer, sharding.batch_sharding(mesh, rules))
  corpus = hosts.training_source(config.data)
  distributed.log(f"bipft pretrain: training data: {sources.describe(corpus)}; held out: {held}")
  shared = sources.held_out_in_training(config.data)
  if shared:
    distributed.log(f"bipft pretrain: warning: {shared}: the held-out scores are on data the student trains on")

  def batches(step: int, data_state: Optional[dict]):
    data = hosts.HostData(corpus, tokenizer, config.data, global_batch_size=config.batch_size, seed=config.seed)
    if data_state is not None:
      data.restore(data_state)
    if data.pool:  # data.workers=-1 chose by the host's CPUs
      count = data.pool.workers
      distributed.log(f"bipft pretrain: examples made by {count} worker process{'es' * (count > 1)} a host "
                      "(data.workers)")
    if isinstance(corpus, sources.FileShards):
      for line in data.describe_file_shards(len(corpus.paths)):
        distributed.log(f"bipft pretrain: {line}")
    return _endless(data)

  def source():
    if init_from:
      from bipft_jax import checkpointing
      return checkpointing.restore_params(init_from)[2]
    return teacher_params

  run_config = config.to_dict()
  if config.tokenizer or config.teacher.path != "minilm":  # found from any folder by finetune, convert, predict
    run_config["tokenizer"] = os.path.abspath(tokenizer_dir)
  return engine.Job(
      name="pretrain", module=student, model_config=student_cfg, head="pretraining",
      tx=optim.make_optimizer(config.optimizer, model_params.param_kinds(student)),
      schedule=schedule, loss_fn=make_loss_fn(student, teacher, config), loss_key="total_loss",
      batches=batches, source=source, run_config=run_config, frozen=teacher_params, frozen_module=teacher,
      evaluate=held_out_evaluator(student, teacher, config, held_out, mesh, rules),
      checkpoint_state=hosts.global_state, describe=describe)
