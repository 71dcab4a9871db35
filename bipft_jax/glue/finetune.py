"""`bipft finetune`: one GLUE task, the release's recipe (METHOD.md section 7).

Start (config.init.kind): a pretrained checkpoint (`--init_from`: its `bert` subtree is kept, the
classifier is fresh), a PyTorch teacher folder (the FP baseline, or the teacher binarized with
init.binary=True), or random weights (smoke tests). A student whose activation scales are still
the untrained 1.0 is calibrated once on the first training batch.

Each epoch: train, evaluate every dev split, append a line to `metrics.jsonl` and TensorBoard.
A NaN/Inf loss or update stops the run with one error line, before best/ or results.json exist.
The best epoch by the task's first metric on the first dev split is kept (MNLI-mm is reported from
the last epoch, as the release does); at the end `best/` holds its checkpoint, `results.json` the
reported numbers and `submission/` the GLUE leaderboard files of whatever test splits exist. They
are written to `.finetune-staging/` and moved into the workdir when the run ends, so a workdir with
an earlier run (replaced only with `--overwrite`) keeps it whole until then.
"""
import dataclasses
import json
import os
import shutil
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bipft_jax import config_checks, config_loading, files, kinds, losses, optim, pytorch_io
from bipft_jax import model as model_lib
from bipft_jax.errors import UserError
from bipft_jax.glue import metrics as metrics_lib
from bipft_jax.glue import report, tasks

OUTPUTS = ("metrics.jsonl", "results.json", "best", "submission", "tb")
STAGING = ".finetune-staging"  # a run's outputs until it ends; then they replace an earlier run's


def add_arguments(parser) -> None:
  config_loading.add_config_argument(parser)
  parser.add_argument("--workdir", required=True, help="where metrics, TensorBoard, best/ and submission/ go")
  parser.add_argument("--init_from", default=None,
                      help="a pretrained checkpoint (workdir or step folder); sets init.kind=checkpoint")
  parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in workdir")


def run(args) -> int:
  config = config_loading.load_config(args.config, args.config_overrides)
  if args.init_from:
    config.init.kind, config.init.path = "checkpoint", args.init_from
  results = finetune(config, args.workdir, overwrite=args.overwrite)
  print(report.summary_line(results))
  return 0


# --- the initial model ----------------------------------------------------------

def _alphas_untrained(params, param_kinds) -> bool:
  """Whether the activation scales are all still at their init 1 (never calibrated nor trained)."""
  flat = flax.traverse_util.flatten_dict(params)
  alphas = [flat[path] for path in kinds.paths_of_kind(param_kinds, kinds.ACTIVATION_SCALE)]
  return bool(alphas) and all(np.all(np.asarray(a) == 1.0) for a in alphas)


def _keep_bert(template: dict, bert: dict, source: str) -> dict:
  """`template` with its `bert` subtree replaced by `bert`; UserError if the two differ in shape."""
  want = flax.traverse_util.flatten_dict(template["bert"])
  have = flax.traverse_util.flatten_dict(bert)
  problems = [f"{'/'.join(p)} missing" for p in want if p not in have]
  problems += [f"{'/'.join(p)} is {tuple(np.shape(have[p]))}, the model needs {tuple(np.shape(v))}"
               for p, v in want.items() if p in have and np.shape(have[p]) != np.shape(v)]
  if problems:
    raise UserError(f"{source} does not fit the model ({len(problems)} problems; first: {problems[0]})")
  return {**template, "bert": flax.traverse_util.unflatten_dict({p: have[p] for p in want})}


def initial_model(config, task: tasks.Task, rng) -> tuple:
  """(BertConfig with the task's head, params, the folder its tokenizer may live in, a description)."""
  overrides = dict(num_labels=task.num_labels, pooling=config.pooling, hidden_dropout=config.dropout,
                   attention_dropout=config.dropout, classifier_dropout=config.dropout)
  check_init(config)
  kind, path = config.init.kind, config.init.path
  if kind == "checkpoint":
    from bipft_jax import checkpointing
    saved_config, head, saved = checkpointing.restore_params(path, None if config.init.step < 0 else config.init.step)
    saved = jax.device_get(saved)  # host copies: the run places them itself
    model_config = dataclasses.replace(saved_config, **overrides)
    template = model_lib.init_params(model_lib.build(model_config, "classification"), rng)
    bert = saved if head == "encoder" else saved.get("bert", saved)
    return model_config, _keep_bert(template, bert, f"checkpoint {path}"), path, f"checkpoint {path}"
  if kind == "teacher":
    from bipft_jax import assets
    folder = path or str(assets.minilm_dir())
    fp_config, teacher = pytorch_io.load_pretrained(folder, "classification", allow_missing=("classifier",),
                                                    **overrides)
    if not config.init.binary:
      return fp_config, teacher, folder, f"FP teacher {path or 'all-MiniLM-L6-v2'}"
    binary_fields = {k: config.model[k] for k in (
        "estimator_rank", "weight_binarizer", "activation_binarizer", "linear_binarizer",
        "attention_prob_binarizer", "mlm_transform_act", "matmul_precision")}
    try:
      model_config = model_lib.BertConfig.from_dict({**dataclasses.asdict(fp_config), "binary": True,
                                                     **binary_fields})
    except ValueError as e:
      raise UserError(f"bad config.model: {e}") from None
    try:
      params = model_lib.init_student_from_teacher(model_lib.build(model_config, "classification"), teacher, rng)
    except ValueError as e:
      raise UserError(f"teacher {folder} does not fit the student: {e}") from None
    return model_config, params, folder, f"binarized teacher {path or 'all-MiniLM-L6-v2'}"
  if kind == "scratch":
    try:
      model_config = model_lib.BertConfig.from_dict({**config.model.to_dict(), **overrides})
    except ValueError as e:
      raise UserError(f"bad config.model: {e}") from None
    module = model_lib.build(model_config, "classification")
    return model_config, jax.jit(lambda r: model_lib.init_params(module, r))(rng), "", "scratch"


def check_init(config) -> None:
  """Fails fast, before any data is read, on a config without a valid starting point."""
  if config.init.kind not in ("checkpoint", "teacher", "scratch"):
    raise UserError(f"unknown init.kind {config.init.kind!r}; use checkpoint, teacher or scratch")
  if config.init.kind == "checkpoint" and not config.init.path:
    raise UserError("no starting point: pass --init_from CHECKPOINT, or --config.init.kind=teacher "
                    "(the FP baseline) or scratch")


def load_tokenizer(config, init_folder: str, model_config):
  """The configured tokenizer, else the init folder's, else all-MiniLM-L6-v2's uncased vocab."""
  folder = config.data.tokenizer
  if not folder and init_folder and any(os.path.isfile(os.path.join(init_folder, f))
                                        for f in ("vocab.txt", "tokenizer.json")):
    folder = init_folder
  if not folder:
    from bipft_jax import assets
    folder = str(assets.minilm_dir())
  return pytorch_io.load_tokenizer(folder, model_config.vocab_size, fix="the checkpoint is of another size; "
                                   "set --config.data.tokenizer to the checkpoint's vocab")


def check_max_length(config, model_config) -> None:
  """UserError if config.max_length exceeds the model's position embeddings."""
  if config.max_length > model_config.max_position_embeddings:
    raise UserError(f"max_length {config.max_length} exceeds the model's {model_config.max_position_embeddings} "
                    "positions; lower --config.max_length")


# --- steps -----------------------------------------------------------------------

MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def task_loss(logits_BxC, labels_B, weights_B, regression: bool):
  """Weighted mean of MSE (regression, one output) or cross entropy over the real rows."""
  if regression:
    squared_B = (logits_BxC[:, 0] - labels_B) ** 2
    return jnp.sum(squared_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)
  return losses.cross_entropy(logits_BxC, jnp.where(weights_B > 0, labels_B, losses.IGNORE_INDEX))


def make_steps(module, optimizer, regression: bool):
  """(train_step, predict_step), jitted."""
  from bipft_jax import checkpointing
  def loss_fn(params, batch, rng):
    out = module.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS), deterministic=False,
                       rngs={"dropout": rng})
    return task_loss(out["logits"], batch["labels"], batch["weights"], regression)

  @jax.jit
  def train_step(params, opt_state, batch, rng):
    """(params, opt_state, loss, whether the new params and optimizer state are all finite)."""
    loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, loss, checkpointing.all_finite((params, opt_state))

  return train_step, make_predict_step(module)


def make_predict_step(module):
  """predict_step(params, batch) -> logits, jitted, without dropout."""
  @jax.jit
  def predict_step(params, batch):
    return module.apply({"params": params}, *(batch[k] for k in MODEL_INPUTS), deterministic=True)["logits"]
  return predict_step


def _device_batch(batch: dict) -> dict:
  return {k: batch[k] for k in MODEL_INPUTS + ("labels", "weights")}


def predict(predict_step, params, data: tasks.Encoded, batch_size: int, buckets, regression: bool) -> np.ndarray:
  """Predicted class ids (or scores) of every example of `data`, in order."""
  out = np.zeros(len(data), np.float32 if regression else np.int64)
  for batch in tasks.batches(data, batch_size, buckets, sort_by_length=True):
    logits = np.asarray(predict_step(params, _device_batch(batch)))
    keep = batch["positions"] >= 0
    out[batch["positions"][keep]] = logits[keep, 0] if regression else logits[keep].argmax(-1)
  return out


def _diverged(loss: float, step: int, epoch: int) -> str:
  """The error of a step whose loss or updated parameters are not finite."""
  what = f"the loss is {loss}" if not np.isfinite(loss) else "the update made the parameters non-finite"
  return (f"{what} at step {step} (epoch {epoch}); stopped before writing best/ or results.json: lower "
          "--config.optimizer.learning_rate")


# --- the run --------------------------------------------------------------------

def _earlier_outputs(workdir: str, overwrite: bool) -> list:
  """The outputs of an earlier run in `workdir`; UserError if there are some and not `overwrite`."""
  existing = [name for name in OUTPUTS if os.path.exists(os.path.join(workdir, name))]
  if existing and not overwrite:
    raise UserError(f"{workdir} already holds a finetuning run ({', '.join(existing)}); choose another "
                    "--workdir or pass --overwrite")
  return existing


def _staging_dir(workdir: str) -> str:
  """An empty folder in `workdir` for this run's outputs (a crashed run's leftovers removed)."""
  staging = os.path.join(workdir, STAGING)
  shutil.rmtree(staging, ignore_errors=True)
  os.makedirs(staging)
  return staging


def _publish(staging: str, workdir: str) -> None:
  """Moves a finished run's outputs from `staging` into `workdir`, each replacing an earlier run's
  by rename (results.json, the mark of a finished run, last); earlier outputs it lacks are removed."""
  for name in sorted(OUTPUTS, key=lambda name: name == "results.json"):
    source, target = os.path.join(staging, name), os.path.join(workdir, name)
    if os.path.exists(source):
      files.replace_tree(source, target)
    elif os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)
  shutil.rmtree(staging)


def _read_data(config, task: tasks.Task) -> tuple:
  """(train, dev splits, test splits present). Test splits are optional: missing ones are skipped."""
  splits = tasks.read_splits(task, config.data, ("train",) + task.dev_splits)
  tests = {}
  for split in leaderboard_splits(task, config.data):
    try:
      tests[split] = read_test_split(config, task, split)
    except UserError as e:
      print(f"bipft: no {task.name} {split} predictions: {e}", file=sys.stderr)
  return training_sample(config, splits.pop("train")), splits, tests


def leaderboard_splits(task: tasks.Task, data) -> tuple:
  """The unlabeled splits predicted for the GLUE leaderboard: the task's test splits, plus `ax` (the
  diagnostic set) for MNLI from GLUE or TFDS."""
  return task.test_splits + (("ax",) if task.name == "mnli" and data.format in ("glue", "tfds") else ())


def read_test_split(config, task: tasks.Task, split: str) -> tasks.Split:
  """One test split; `ax` is found beside the MNLI folder when data.path is the MNLI folder itself."""
  if split != "ax":
    return tasks.read_splits(task, config.data, (split,))[split]
  ax, data = tasks.get_task("ax"), config.data
  if data.format == "glue" and not os.path.isdir(os.path.join(data.path, ax.folder)):
    data = _config_copy(data, path=os.path.join(os.path.dirname(os.path.abspath(data.path)), ax.folder))
  return tasks.read_splits(ax, data, ("test",))["test"]


def training_sample(config, train: tasks.Split) -> tasks.Split:
  """The training examples the run uses: all, or `max_train_examples` of them shuffled by `seed`."""
  if config.max_train_examples <= 0:
    return train
  keep = np.random.default_rng(config.seed).permutation(len(train))[:config.max_train_examples]
  return tasks.Split([train.texts_a[i] for i in keep],
                     None if train.texts_b is None else [train.texts_b[i] for i in keep],
                     train.labels[keep], [train.ids[i] for i in keep])


def split_task(task: tasks.Task, split: str) -> tasks.Task:
  """The task whose labels `split` is written with: AX's for the diagnostic set, else `task`."""
  return tasks.get_task("ax") if split == "ax" else task


def _config_copy(config, **changes):
  copy = config.copy_and_resolve_references()
  for key, value in changes.items():
    copy[key] = value
  return copy


def majority_rate(train_labels: np.ndarray, dev_labels: np.ndarray) -> float:
  """Dev accuracy (%) of always predicting the most frequent training label."""
  majority = np.bincount(train_labels).argmax()
  return 100.0 * float(np.mean(dev_labels == majority))


def finetune(config, workdir: str, overwrite: bool = False) -> dict:
  """Runs the task of `config` in `workdir`; returns the contents of results.json."""
  from tensorboardX import SummaryWriter
  from tqdm import tqdm
  from bipft_jax import checkpointing

  started_run = time.time()
  config_checks.check_glue(config)
  task = tasks.task_from_config(config)
  _earlier_outputs(workdir, overwrite)
  files.check_writable_dir(workdir, "--workdir")
  check_init(config)
  train, devs, tests = _read_data(config, task)
  rng = jax.random.key(config.seed)
  init_rng, rng = jax.random.split(rng)
  model_config, params, init_folder, description = initial_model(config, task, init_rng)
  tokenizer = load_tokenizer(config, init_folder, model_config)
  check_max_length(config, model_config)
  encode = lambda split: tasks.encode(tokenizer, split, config.max_length)
  train_data = encode(train)
  dev_data = {name: encode(split) for name, split in devs.items()}
  buckets = tasks.length_buckets(config.max_length, config.min_bucket)

  module = model_lib.build(model_config, "classification")
  plan = lambda epoch: tasks.batch_plan(train_data, config.batch_size, buckets, shuffle_seed=config.seed + epoch)
  steps_per_epoch = len(plan(1))
  if config.steps_per_epoch > 0:
    steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
  config.optimizer.total_steps = steps_per_epoch * config.epochs
  param_kinds = model_lib.param_kinds(module)
  optimizer = optim.make_optimizer(config.optimizer, param_kinds)
  if _alphas_untrained(params, param_kinds):
    first = tasks.make_batch(train_data, plan(1)[0], config.batch_size, buckets)
    params = jax.jit(lambda p, b: model_lib.calibrate_alphas(module, p, b))(
        params, {k: first[k] for k in MODEL_INPUTS})
    print("bipft: activation scales calibrated on the first training batch", file=sys.stderr)
  opt_state = optimizer.init(params)
  train_step, predict_step = make_steps(module, optimizer, task.is_regression)

  # Every input has loaded: the outputs go to a staging folder, moved over an earlier run's at the end.
  workdir, finished_workdir = _staging_dir(workdir), workdir
  writer = SummaryWriter(os.path.join(workdir, "tb"))
  selection_split, selection_metric = (task.dev_splits or ("dev",))[0], task.metrics[0]
  best_params, history, step = None, [], 0
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as metrics_file:
    for epoch in range(1, config.epochs + 1):
      started = time.time()
      chunks = plan(epoch)[:steps_per_epoch]
      progress = tqdm(chunks, desc=f"{task.name} epoch {epoch}/{config.epochs}", unit="step",
                      file=sys.stderr, dynamic_ncols=True)
      loss_sum = 0.0
      for chosen in progress:
        rng, dropout_rng = jax.random.split(rng)
        batch = tasks.make_batch(train_data, chosen, config.batch_size, buckets)
        params, opt_state, loss, finite = train_step(params, opt_state, _device_batch(batch), dropout_rng)
        if not (np.isfinite(float(loss)) and bool(finite)):
          progress.close()  # the bar's last line before the error, not after it
          raise UserError(_diverged(float(loss), step, epoch))
        step += 1
        loss_sum += float(loss)
        if step % config.log_every == 0:
          writer.add_scalar("train/loss", float(loss), step)
          progress.set_postfix(loss=f"{float(loss):.4f}")
      record = {"epoch": epoch, "step": step, "train_loss": loss_sum / len(chunks), "dev": {}}
      for name, data in dev_data.items():
        predictions = predict(predict_step, params, data, config.eval_batch_size, buckets, task.is_regression)
        record["dev"][name] = metrics_lib.compute(task.metrics, data.labels, predictions)
        for metric, value in record["dev"][name].items():
          writer.add_scalar(f"{name}/{metric}", value, step)
      record["seconds"] = round(time.time() - started, 1)
      metrics_file.write(json.dumps(record) + "\n")
      metrics_file.flush()
      history.append(record)
      print(f"epoch {epoch}: train loss {record['train_loss']:.4f}, "
            + ", ".join(f"{n} {m} {v:.2f}" for n, d in record["dev"].items() for m, v in d.items()), file=sys.stderr)
      results = select_results(task, history)
      if results["best_epoch"] == epoch:
        best_params = jax.device_get(params)
  writer.close()

  checkpointing.save_params(os.path.join(workdir, "best"), best_params, model_config, "classification",
                            step=results["best_epoch"])
  submission = os.path.join(workdir, "submission")
  for split, examples in tests.items():
    data = encode(examples)
    predictions = predict(predict_step, best_params, data, config.eval_batch_size, buckets, task.is_regression)
    report.write_submission(submission, split_task(task, split), "test" if split == "ax" else split, data.ids,
                            predictions)

  results.update(model=config.name or description, init=description, task=task.name,
                 selection=f"{selection_split} {selection_metric}", steps=step,
                 seconds=round(time.time() - started_run, 1))
  if not task.is_regression:
    results["dev_majority_rate"] = majority_rate(train.labels, devs[selection_split].labels)
  files.write_json(os.path.join(workdir, "results.json"), results)
  _publish(workdir, finished_workdir)
  return results


def select_results(task: tasks.Task, history: list) -> dict:
  """The reported dev numbers: each dev split at the best epoch (by the task's first metric on the
  first dev split), except MNLI-mm, reported from the last epoch as the release does."""
  selection_split, metric = (task.dev_splits or ("dev",))[0], task.metrics[0]
  best = max(history, key=lambda r: (r["dev"][selection_split][metric], -r["epoch"]))
  reported = dict(best["dev"])
  if "dev_mismatched" in reported:
    reported["dev_mismatched"] = history[-1]["dev"]["dev_mismatched"]
  return {"best_epoch": best["epoch"], "epochs": len(history), "dev": reported}
