"""`bipft pretrain`: distil the 1-bit student from a frozen full-precision teacher (METHOD.md section 6).

  bipft pretrain --config configs/pretrain.py:demo --workdir DIR [--init_from CKPT]

Where the parameters come from, in this order: the latest checkpoint in DIR (resume: parameters,
optimizer and data state), else `--init_from` (parameters only), else the teacher's weights. A fresh
start calibrates the activation scales on the first batch before step 0. Checkpoints are orbax,
asynchronous, every `checkpoint_every` steps and at the end; SIGTERM saves and exits; a NaN/Inf
loss or update stops the run before it is saved (nothing non-finite is ever saved). A resume skips
(and sets aside) newer steps that fail their checksums or are not finite. Process 0 writes
metrics.jsonl and TensorBoard scalars (`DIR/tensorboard`).
"""
import dataclasses
import functools
import json
import os
import queue
import signal
import threading
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from bipft_jax import checkpointing, config_checks, config_loading, distributed, files, losses, optim
from bipft_jax import pytorch_io, sharding
from bipft_jax import model as model_lib
from bipft_jax.data import hosts, sources
from bipft_jax.errors import UserError

SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "type_vocab_size")


def add_arguments(parser) -> None:
  config_loading.add_config_argument(parser, default="configs/pretrain.py:demo")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard logs; "
                      "an existing workdir is resumed from its latest checkpoint")
  parser.add_argument("--init_from", default=None,
                      help="start from the parameters of this checkpoint (a workdir or step folder)")


def run(args) -> int:
  config = config_loading.load_config(args.config, args.config_overrides)
  config_checks.check_pretrain(config)
  files.check_writable_dir(args.workdir, "--workdir")
  distributed.initialize(config)  # before any JAX computation
  if not jax.config.jax_compilation_cache_dir:  # reruns and resumes skip XLA compilation
    from bipft_jax import assets
    jax.config.update("jax_compilation_cache_dir", str(assets.cache_dir() / "jax_compilation"))
  train_and_evaluate(config, args.workdir, init_from=args.init_from)
  return 0


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
    teacher_config, params = pytorch_io.load_pretrained(_teacher_folder(config), head)
    return teacher_config, jax.device_get(params), tokenizer
  teacher_config = dataclasses.replace(student_config(config), binary=False, mlm_transform_act="gelu")
  params = model_lib.init_params(model_lib.build(teacher_config, head), jax.random.key(config.seed + 1))
  return teacher_config, jax.device_get(params), tokenizer


def student_config(config, teacher_config: Optional[model_lib.BertConfig] = None) -> model_lib.BertConfig:
  try:
    student = model_lib.BertConfig.from_dict(config.model)
  except (TypeError, ValueError) as e:
    raise UserError(f"bad model config: {e}") from None
  if teacher_config is not None:
    differ = {f: (getattr(student, f), getattr(teacher_config, f)) for f in SHAPE_FIELDS
              if getattr(student, f) != getattr(teacher_config, f)}
    if differ:
      raise UserError(f"the student's shape differs from the teacher's (student, teacher): {differ}; "
                      "set --config.model.FIELD to the teacher's values")
  return student


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
# Steps


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


def make_train_step(student: nn.Module, teacher: nn.Module, tx, config):
  """(state, teacher_params, batch, step) -> (state, metrics); state = {params, opt_state}.

  The batch is split into `grad_accum_steps` micro-batches (example i goes to micro-batch
  i % grad_accum_steps, so each device keeps its own examples); their gradients are averaged.
  """
  accum = config.grad_accum_steps
  schedule = optim.learning_rate_schedule(config.optimizer)

  def loss_fn(params, teacher_params, batch, key):
    teacher_key, student_key = jax.random.split(key)
    teacher_out = teacher_outputs(teacher, teacher_params, batch, config.teacher.dropout, teacher_key)
    return student_loss(student, config, params, teacher_out, batch, student_key)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, teacher_params, batch, step):
    key = jax.random.fold_in(jax.random.key(config.seed), step)
    params = state["params"]
    if accum == 1:
      (_, metrics), grads = grad_fn(params, teacher_params, batch, key)
    else:
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(total, inputs):
        micro_batch, i = inputs
        (_, metrics), grads = grad_fn(params, teacher_params, micro_batch, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, (grads, metrics)), None

      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: (params, grad_fn(params, teacher_params, first, key)[0][1])))
      (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum)))
      grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["learning_rate"] = schedule(step)
    state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
    metrics["state_finite"] = checkpointing.all_finite(state)  # fetched with the metrics: no extra sync
    return state, metrics

  return train_step


def make_eval_step(student: nn.Module):
  """(params, batch) -> (correct, counted, summed cross entropy) of MLM predictions, deterministic."""
  def eval_step(params, batch):
    out = student.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                        mlm_positions_BxN=batch["mlm_positions"], deterministic=True)
    correct, counted = masked_accuracy(out["mlm_logits"], batch["mlm_labels"])
    return correct, counted, losses.cross_entropy(out["mlm_logits"], batch["mlm_labels"]) * counted
  return eval_step


def calibrate(student_config_: model_lib.BertConfig, params: dict, batch: dict) -> dict:
  """The activation alphas set from one batch (on the encoder alone: no MLM logits needed)."""
  encoder = model_lib.build(student_config_, "encoder")
  return {**params, "bert": model_lib.calibrate_alphas(encoder, params["bert"], batch)}


# ----------------------------------------------------------------------------------------------
# Data and logging


class Prefetch:
  """(batch, data state after it) made in a background thread, so data preparation overlaps steps."""

  def __init__(self, data: hosts.HostData, size: int = 2):
    self.data, self.queue, self.stopped = data, queue.Queue(size), threading.Event()
    threading.Thread(target=self._fill, daemon=True).start()

  def _fill(self):
    try:
      while not self.stopped.is_set():
        item = (next(self.data), self.data.state())
        while not self.stopped.is_set():
          try:
            self.queue.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
    except Exception as e:  # handed to the training thread, which raises it
      self.queue.put(e)

  def __next__(self) -> tuple:
    item = self.queue.get()
    if isinstance(item, Exception):
      raise item
    return item

  def close(self):
    self.stopped.set()


class MetricsWriter:
  """metrics.jsonl and TensorBoard scalars in the workdir, written by process 0 only.

  Object stores (gs://) cannot append to a file, so there metrics.jsonl is rewritten whole on
  every record; local files are appended to.
  """

  def __init__(self, workdir: str):
    self.active = distributed.is_primary()
    if self.active:
      from tensorboardX import SummaryWriter
      self.path = epath.Path(workdir) / "metrics.jsonl"
      self.rewrite = "://" in workdir
      self.text = self.path.read_text() if self.rewrite and self.path.exists() else ""
      self.jsonl = None if self.rewrite else open(self.path, "a")
      self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict) -> None:
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    line = json.dumps({"step": step, **scalars}) + "\n"
    if self.rewrite:
      self.text += line
      self.path.write_text(self.text)
    else:
      self.jsonl.write(line)
      self.jsonl.flush()
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self) -> None:
    if self.active:
      if self.jsonl:
        self.jsonl.close()
      self.tensorboard.close()


def global_batch(local_batch: dict, batch_sharding: NamedSharding) -> dict:
  """Each host's examples assembled into global arrays split over the mesh."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local_batch)


def held_out_batches(config, tokenizer, batch_sharding: NamedSharding) -> list:
  """The fixed held-out batches (global arrays) the run measures its MLM accuracy on."""
  return [global_batch(b, batch_sharding) for b in hosts.fixed_batches(
      sources.open_source(config.data, "eval"), tokenizer, config.data, global_batch_size=config.eval_batch_size,
      num_batches=config.eval_batches, seed=config.seed + 1)]


def put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same on every host) placed onto global shardings."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                      tree, shardings)


def _check_batch_sizes(config, divisor: int) -> None:
  hosts, accum = jax.process_count(), config.grad_accum_steps
  if accum < 1 or config.batch_size % (accum * divisor) or config.batch_size % hosts:
    raise UserError(f"batch_size {config.batch_size} must be a multiple of grad_accum_steps ({accum}) "
                    f"times the {divisor} batch shards of the mesh, and of the {hosts} hosts")
  if config.eval_batch_size % divisor or config.eval_batch_size % hosts:
    raise UserError(f"eval_batch_size {config.eval_batch_size} must be a multiple of the {divisor} batch "
                    f"shards and the {hosts} hosts")


# ----------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class Trainer:
  """The models, optimizer, shardings and jitted functions of one run on one mesh."""
  config: Any
  student_config: model_lib.BertConfig
  student: nn.Module
  teacher: nn.Module
  tx: optax.GradientTransformation
  mesh: jax.sharding.Mesh
  rules: tuple
  state_shardings: dict
  teacher_shardings: Any
  batch_sharding: NamedSharding

  def __post_init__(self):
    replicated = NamedSharding(self.mesh, PartitionSpec())
    params_sh = self.state_shardings["params"]
    self._train_step = jax.jit(make_train_step(self.student, self.teacher, self.tx, self.config),
                               in_shardings=(self.state_shardings, self.teacher_shardings, self.batch_sharding,
                                             replicated),
                               out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    self._eval_step = jax.jit(make_eval_step(self.student), in_shardings=(params_sh, self.batch_sharding),
                              out_shardings=replicated)
    self._merge = jax.jit(functools.partial(model_lib.init_student_from_teacher, self.student),
                          out_shardings=params_sh)
    self._calibrate = jax.jit(functools.partial(calibrate, self.student_config), out_shardings=params_sh)
    self._init_opt = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])

  def _on_mesh(self, fn, *args):
    # Traced under the mesh and rules: the model's activation constraints need both.
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return fn(*args)

  def init_state(self, source_params, calibration_batch: Optional[dict]) -> dict:
    """Student params from `source_params` (a teacher's or another run's: names that agree are
    copied, fresh leaves elsewhere), alphas calibrated on the batch if given, fresh optimizer state."""
    try:
      params = self._on_mesh(self._merge, source_params, jax.random.key(self.config.seed))
    except ValueError as e:
      raise UserError(f"the initial parameters do not fit the student: {e}") from None
    if calibration_batch is not None and self.student_config.binary:
      params = self._on_mesh(self._calibrate, params, calibration_batch)
    return {"params": params, "opt_state": self._on_mesh(self._init_opt, params)}

  def abstract_state(self) -> dict:
    """ShapeDtypeStructs of the train state on its shardings (the target of a restore)."""
    shapes = jax.eval_shape(lambda: _fresh_state(self.student, self.tx))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        self.state_shardings)

  def train_step(self, state: dict, teacher_params, batch: dict, step: int) -> tuple:
    return self._on_mesh(self._train_step, state, teacher_params, batch, jnp.int32(step))

  def evaluate(self, params, batches: list) -> dict:
    """Held-out MLM accuracy and cross entropy over `batches` (global arrays)."""
    correct, counted, nll = np.sum([jax.device_get(self._on_mesh(self._eval_step, params, b)) for b in batches],
                                   axis=0)
    return {"eval_mlm_accuracy": float(correct / max(counted, 1)), "eval_mlm_loss": float(nll / max(counted, 1))}


def _fresh_state(student, tx) -> dict:
  params = model_lib.init_params(student, jax.random.key(0))
  return {"params": params, "opt_state": tx.init(params)}


def make_trainer(config, teacher_config: model_lib.BertConfig, mesh: jax.sharding.Mesh) -> Trainer:
  """Builds the student and teacher modules, the optimizer and every sharding for `mesh`."""
  student_cfg = student_config(config, teacher_config)
  if config.data.max_seq_length > student_cfg.max_position_embeddings:
    raise UserError(f"data.max_seq_length {config.data.max_seq_length} exceeds the model's "
                    f"{student_cfg.max_position_embeddings} positions")
  student = model_lib.build(student_cfg, "pretraining")
  tx = optim.make_optimizer(config.optimizer, model_lib.param_kinds(student))
  # The precision policy covers the teacher too.
  teacher_config = dataclasses.replace(teacher_config, precision=student_cfg.precision)
  teacher = model_lib.build(teacher_config, "pretraining" if config.loss.nsp_distill else "encoder")
  rules = sharding.rules_from_config(config.mesh.rules)
  _check_batch_sizes(config, sharding.batch_divisor(mesh, rules))
  abstract_params = jax.eval_shape(functools.partial(model_lib.init_params, student), jax.random.key(0))
  params_sh = sharding.param_shardings(abstract_params, model_lib.logical_axes(student), mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  state_sh = {"params": params_sh,
              "opt_state": sharding.like_params_shardings(abstract_opt, abstract_params, params_sh, mesh)}
  abstract_teacher = jax.eval_shape(functools.partial(model_lib.init_params, teacher), jax.random.key(0))
  teacher_sh = sharding.param_shardings(abstract_teacher, model_lib.logical_axes(teacher), mesh, rules)
  return Trainer(config, student_cfg, student, teacher, tx, mesh, rules, state_sh, teacher_sh,
                 sharding.batch_sharding(mesh, rules))


def train_and_evaluate(config, workdir: str, init_from: Optional[str] = None) -> dict:
  """Runs (or resumes) pretraining to `config.total_steps`; returns the last metrics, the accuracies
  and the final (global, sharded) parameters."""
  optim.learning_rate_schedule(config.optimizer)  # a bad optimizer config fails before anything is loaded
  teacher_config, teacher_params, tokenizer_dir = load_teacher(config)
  trainer = make_trainer(config, teacher_config, sharding.make_mesh(dict(config.mesh.shape)))
  teacher_params = put_global(teacher_params, trainer.teacher_shardings)

  tokenizer = pytorch_io.load_tokenizer(tokenizer_dir, trainer.student_config.vocab_size,
                                        fix="set --config.model.vocab_size or --config.tokenizer")
  data = hosts.HostData(sources.open_source(config.data, "train"), tokenizer, config.data,
                        global_batch_size=config.batch_size, seed=config.seed)
  eval_batches = held_out_batches(config, tokenizer, trainer.batch_sharding)

  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
  manager = checkpointing.make_manager(workdir, max_to_keep=config.keep_checkpoints)
  state, step, pending = _initial_state(trainer, workdir, init_from, manager, data, teacher_params)
  return _loop(trainer, workdir, manager, state, step, pending, data, teacher_params, eval_batches)


def _initial_state(trainer: Trainer, workdir, init_from, manager, data, teacher_params) -> tuple:
  """(state, first step, first (batch, data state) or None), in the order: resume > init_from > teacher."""
  resumed = checkpointing.restore_newest_intact(manager, trainer.abstract_state())
  if resumed is not None:  # 1. resume this workdir from its newest intact step: params, optimizer, data
    step, restored, skipped = resumed
    for error in skipped:
      distributed.log(f"bipft pretrain: skipped step {error.step}, {error.reason}; "
                      f"moved it to {error.moved_to}")
    data.restore(restored["data"])
    distributed.log(f"bipft pretrain: resuming {workdir} from step {step}")
    return {"params": restored["params"], "opt_state": restored["opt_state"]}, step, None
  if init_from:  # 2. parameters of another checkpoint; a binary one keeps its trained alphas
    source_config, _, source_params = checkpointing.restore_params(init_from)
    needs_calibration = not source_config.binary
  else:  # 3. the teacher's weights where the names agree, fresh leaves elsewhere
    source_params, needs_calibration = teacher_params, True
  first = next(data), data.state()
  batch = global_batch(first[0], trainer.batch_sharding) if needs_calibration else None
  return trainer.init_state(source_params, batch), 0, first


def _loop(trainer: Trainer, workdir, manager, state, step, pending, data, teacher_params, eval_batches) -> dict:
  """Steps to total_steps with logging, evaluation and checkpoints; SIGTERM saves and returns."""
  from tqdm import tqdm
  config = trainer.config
  record = checkpointing.config_record(trainer.student_config, "pretraining", config.to_dict())
  writer = MetricsWriter(workdir)
  prefetch = Prefetch(data)
  terminated = threading.Event()
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: terminated.set())
  start = final = trainer.evaluate(state["params"], eval_batches)
  writer.write(step, start)
  distributed.log(f"bipft pretrain: {describe(step, start)}")
  bar = tqdm(total=config.total_steps, initial=step, desc="pretrain", disable=not distributed.is_primary(),
             dynamic_ncols=True)
  metrics = {}
  try:
    while step < config.total_steps:
      started = time.perf_counter()
      batch, data_state = pending or next(prefetch)
      pending = None
      tokens = int(np.sum(batch["attention_mask"])) * jax.process_count()
      state, metrics = trainer.train_step(state, teacher_params, global_batch(batch, trainer.batch_sharding), step)
      metrics = jax.device_get(metrics)
      loss, finite = float(metrics["total_loss"]), bool(metrics.pop("state_finite"))
      if not (np.isfinite(loss) and finite):  # checked every step, so nothing non-finite is ever saved
        raise UserError(diverged(manager, step, loss, workdir))
      step += 1
      metrics["tokens_per_second"] = tokens / (time.perf_counter() - started)
      bar.update(1)
      bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{metrics['tokens_per_second']:.0f}")
      if step % config.log_every == 0 or step == config.total_steps:
        writer.write(step, metrics)
      if step % config.eval_every == 0 and step < config.total_steps:
        evaluation = trainer.evaluate(state["params"], eval_batches)
        writer.write(step, evaluation)
        bar.write(f"bipft pretrain: {describe(step, evaluation)}")
      if step % config.checkpoint_every == 0 or step == config.total_steps or terminated.is_set():
        checkpointing.save(manager, step, params=state["params"], opt_state=state["opt_state"],
                           data_state=hosts.global_state(data_state), config=record)
      if terminated.is_set():
        manager.wait_until_finished()
        bar.write(f"bipft pretrain: SIGTERM: saved step {step} to {workdir}; rerun the command to resume")
        return {"step": step, "terminated": True}
    bar.close()  # before the final line, so the bar does not print over it
    final = trainer.evaluate(state["params"], eval_batches)
    writer.write(step, final)
    distributed.log(f"bipft pretrain: {describe(step, final)}; at the start of this run: "
                    f"{start['eval_mlm_accuracy']:.4f} (cross entropy {start['eval_mlm_loss']:.3f})")
  finally:
    bar.close()
    prefetch.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous_handler)
  return {"step": step, "metrics": {k: float(v) for k, v in metrics.items()}, "start": start, "final": final,
          "params": state["params"]}


def diverged(manager, step: int, loss: float, workdir: str) -> str:
  """The error of a run whose loss or updated parameters are not finite at `step` (nothing saved).

  A checkpoint of step `step` holds the very parameters that gave a non-finite loss: it is set
  aside as `STEP.diverged`, so that the error names, and a rerun resumes from, the one before."""
  what, aside = f"the loss is {loss}", ""
  if np.isfinite(loss):
    what = "the update made the parameters non-finite"
  elif manager.latest_step() == step:
    manager.wait_until_finished()
    moved = checkpointing.set_aside(manager, step, "diverged")
    aside = f" (step {step}, whose parameters gave this loss, moved to {moved})"
  newest, stopped = manager.latest_step(), f"{what} at step {step}; stopped without saving{aside}."
  if newest is None:
    return f"{stopped} There is no checkpoint in {workdir}: lower optimizer.learning_rate or check the data"
  return (f"{stopped} The newest finite checkpoint is step {newest} in {workdir}: lower "
          "optimizer.learning_rate or check the data, then rerun to resume from it")


def describe(step: int, evaluation: dict) -> str:
  """One line for `Trainer.evaluate`'s result at `step`."""
  return (f"held-out MLM accuracy at step {step}: {evaluation['eval_mlm_accuracy']:.4f} "
          f"(cross entropy {evaluation['eval_mlm_loss']:.3f})")
