r"""`bipft evaluate`: score a saved checkpoint without training.

  # a finetuned classifier: a `bipft finetune` workdir (its best/) or a checkpoint folder
  bipft evaluate --config configs/glue.py:task=rte --checkpoint runs/rte --config.data.path=glue_data
  bipft evaluate --config configs/glue.py:task=rte --checkpoint runs/rte --config.data.path=glue_data \
      --split test --predictions RTE.tsv
  bipft evaluate --config configs/glue.py:task=rt_demo --checkpoint runs/rt --json > rt_dev.json
  # the same classifier run 1-bit: its `bipft export-packed` file, on this machine's fastest kernel
  bipft evaluate --config configs/glue.py:task=rt_demo --checkpoint rt.bipft.safetensors [--kernel native]
  # a pretraining checkpoint: a `bipft pretrain` workdir (its latest step) or one step folder
  bipft evaluate --config configs/pretrain.py:demo --checkpoint workdirs/demo
  bipft evaluate --config configs/pretrain.py:demo --checkpoint workdirs/demo/50

The config decides what is measured: a GLUE config (configs/glue.py, it has `task`) scores the
task's metrics on its dev splits (`--split` picks one: train, a dev or a test split); a pretraining
config (configs/pretrain.py, it has `teacher` and `data.max_predictions`) the held-out MLM accuracy
and cross entropy, and the hidden-state MSE to its teacher (loaded as the run loads it). A packed
file (`bipft export-packed` of a finetuned classifier) is scored by the packed forward (packed.py:
popcount counts on the bit-planes, `--kernel`, default `auto`), the model a user deploys, so its
metrics can be set beside the simulated student's: the two predict the same up to float rounding
near a tie. The model comes from the checkpoint (GLUE: `precision`, if set,
changes the one it computes in); everything else from the config, so pass the config and overrides
of the run that wrote the checkpoint (GLUE: data, max_length, min_bucket, eval_batch_size, and
max_train_examples/seed for the majority-class rate; a finetuned checkpoint records its run's
config, and another task or custom labels than the run's are refused, another max_length or
tokenizer noted on stderr; pretraining: the teacher, the data, eval_batches, eval_batch_size and seed
that fix the held-out set, and the mesh). The data reading, tokenization, batching, prediction and metrics
are the runs' own (glue/splits.py, glue/predictions.py, pretraining.py), so the numbers equal what
the runs log: a finetune workdir's results.json (except MNLI-mm, which it takes from the last epoch
rather than the best), and a pretraining step's eval_* scores in metrics.jsonl (on the same devices; other
meshes can change the last float bits of the losses).

Output on stdout: one line per split (GLUE: metrics in percent and the majority-class rate;
pretraining: accuracy, cross entropy and the MSE to the teacher), or with `--json` one JSON object instead. GLUE:
`--predictions FILE` writes the split's predictions as `index<TAB>prediction` with the label
strings of the GLUE leaderboard (`--split test` gives the file to submit); an existing FILE is
replaced only with `--overwrite`, and then whole (written to a temporary name and renamed).
"""
import argparse
import json
import os
import sys

from bipft_jax import checkpointing, config_checks, config_loading, distributed, engine, files, pretraining
from bipft_jax import packed, pytorch_io, saved_models, sharding
from bipft_jax import model as model_lib
from bipft_jax.errors import UserError
from bipft_jax.glue import predictions, splits, tasks
from bipft_jax.glue import metrics as metrics_lib

CONFIG_KINDS = ("glue", "pretrain")  # config_loading.KINDS this command takes


def add_arguments(parser: argparse.ArgumentParser) -> None:
  config_loading.add_config_argument(parser, CONFIG_KINDS)
  parser.add_argument("--checkpoint", required=True,
                      help="a finetune workdir (its best/), a pretrain workdir (latest step), a checkpoint folder, "
                           "or a packed file (`bipft export-packed` of a classifier: run 1-bit)")
  parser.add_argument("--kernel", default=None, help=f"packed file: the kernel ({', '.join(packed.KERNELS)}; default "
                      "auto: this machine's fastest, measured once)")
  parser.add_argument("--split", default=None,
                      help="GLUE: the split to score (default: every dev split of the task)")
  parser.add_argument("--predictions", default=None,
                      help="GLUE: write the split's predictions to this TSV (GLUE leaderboard format)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --predictions file")
  parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def run(args: argparse.Namespace) -> int:
  config = config_loading.load_config(args.config, args.config_overrides, kinds=CONFIG_KINDS)
  if config_loading.config_kind(config) == "glue":
    config_checks.check_glue(config)
    results = evaluate_glue(config, args.checkpoint, args.split, args.predictions, args.overwrite, args.kernel)
    lines = glue_lines(results)
  else:
    if args.split or args.predictions:
      raise UserError("--split and --predictions are for GLUE configs; a pretraining checkpoint is scored on the "
                      "held-out set its config describes")
    if os.path.isfile(args.checkpoint) or args.kernel:
      raise UserError("a packed file holds no MLM head to score (export-packed keeps the encoder): pass a "
                      "`bipft pretrain` workdir as --checkpoint, or a packed classifier with a GLUE config")
    config_checks.check_pretrain(config)
    distributed.initialize(config)  # before any JAX computation, as `bipft pretrain`
    results = evaluate_pretraining(config, args.checkpoint)
    lines = [pretraining.describe(results["step"], results)]
  if distributed.is_primary():
    print(json.dumps(results, indent=1) if args.json else "\n".join(lines))
  return 0


# --- GLUE -----------------------------------------------------------------------

def split_names(task: tasks.Task, data) -> tuple:
  """Every split `--split` accepts: train, the dev splits and the test splits."""
  return ("train",) + task.dev_splits + splits.leaderboard_splits(task, data)


def _chosen_splits(task: tasks.Task, data, split: str | None, predictions_path: str | None, overwrite: bool) -> tuple:
  """The splits to score (`split`, default every dev split), checked against the task and --predictions."""
  if split is not None and split not in split_names(task, data):
    raise UserError(f"{task.name} has no split {split!r}; choose one of {', '.join(split_names(task, data))}")
  chosen = (split,) if split else task.dev_splits
  if predictions_path:
    if len(chosen) > 1:
      raise UserError(f"{task.name} has {len(chosen)} dev splits ({', '.join(chosen)}): pass --split with "
                      "--predictions")
    files.check_output_file(predictions_path, "--predictions", overwrite)
  if set(chosen) & set(splits.leaderboard_splits(task, data)) and not predictions_path:
    raise UserError(f"the {task.name} {chosen[0]} split has no labels to score: pass --predictions FILE to write "
                    "its predictions")
  return chosen


def _read_examples(config, task: tasks.Task, chosen: tuple) -> dict:
  """split -> examples, test splits (no labels) included."""
  tests = set(splits.leaderboard_splits(task, config.data))
  examples = {s: splits.read_test_split(config, task, s) for s in chosen if s in tests}
  labeled = tuple(s for s in chosen if s not in tests)
  if labeled:
    examples.update(tasks.read_splits(task, config.data, labeled))
  return examples


def evaluate_glue(config, checkpoint: str, split: str | None = None, predictions_path: str | None = None,
                  overwrite: bool = False, kernel: str | None = None) -> dict:
  """Scores the classifier at `checkpoint` (or a packed file of one, run on `kernel`) on `split`
  (default: every dev split) of config's task; `overwrite` lets `predictions_path` replace an
  existing file.

  Returns {"task", "checkpoint", "step" (None for a packed file), "kernel" (the packed kernel, else
  None), "metrics": {split: {metric: %}}, "majority_rate": {split: %}, "predictions": the TSV
  written or None, "examples": {split: count}}.
  """
  saved_models.take_recorded_labels(config, checkpoint)
  task = tasks.task_from_config(config)
  chosen = _chosen_splits(task, config.data, split, predictions_path, overwrite)
  classifier = saved_models.load_classifier(config, task, checkpoint, kernel)
  examples = _read_examples(config, task, chosen)
  labeled = any(examples[s].labels is not None for s in chosen)
  train_labels = None if task.is_regression or not labeled else _training_labels(config, task)
  buckets = tasks.length_buckets(config.max_length, config.min_bucket)
  results = {"task": task.name, "checkpoint": classifier.source, "step": classifier.step,
             "kernel": classifier.kernel, "metrics": {}, "majority_rate": {}, "predictions": predictions_path,
             "examples": {}}
  for name in chosen:
    data = tasks.encode(classifier.tokenizer, examples[name], config.max_length)
    with predictions.progress_bar(len(data), f"{task.name} {name}") as progress:
      predicted = predictions.predict(predictions.counting(classifier.predict_step, progress), classifier.params,
                                      data, config.eval_batch_size, buckets, task.is_regression)
    results["examples"][name] = len(data)
    if data.labels is not None:
      results["metrics"][name] = metrics_lib.compute(task.metrics, data.labels, predicted)
      if train_labels is not None:
        results["majority_rate"][name] = splits.majority_rate(train_labels, data.labels)
    if predictions_path:
      predictions.write_predictions(predictions_path, splits.split_task(task, name), data.ids, predicted)
  return results


def _training_labels(config, task: tasks.Task):
  """The labels of the training examples the run used (for the majority-class rate), or None if the
  train split is not readable: the rate is left out, the scores are not."""
  try:
    return splits.training_sample(config, tasks.read_splits(task, config.data, ("train",))["train"]).labels
  except UserError as e:
    print(f"bipft evaluate: no majority-class rate: {e}", file=sys.stderr)
    return None


def glue_lines(results: dict) -> list:
  """One line per split: its metrics and majority-class rate, or where its predictions went."""
  lines = []
  for name, count in results["examples"].items():
    packed_run = f", packed 1-bit on the {results['kernel']} kernel" if results.get("kernel") else ""
    line = f"{results['task']} {name} ({count} examples{packed_run}): "
    if name in results["metrics"]:
      line += ", ".join(f"{m} {v:.2f}" for m, v in results["metrics"][name].items())
      if name in results["majority_rate"]:
        line += f" (majority class {results['majority_rate'][name]:.2f})"
    if results["predictions"]:
      line += ("; " if name in results["metrics"] else "") + f"predictions written to {results['predictions']}"
    lines.append(line)
  return lines


# --- pretraining ----------------------------------------------------------------

# What makes the held-out batches and their scores: set otherwise than in the run, they are not its.
HELD_OUT_FIELDS = ("data.source", "data.eval_paths", "data.tfds_name", "data.tfds_eval_split", "eval_batches",
                   "eval_batch_size", "seed", "data.max_seq_length", "data.max_predictions", "data.mask_prob",
                   "data.whole_word_masking", "teacher.path")


def _held_out_as_run(config, run: dict | None, directory: str) -> None:
  """A file corpus without data.eval_paths takes the run's (it was an error), a config without a
  tokenizer the checkpoint's; a note for each other HELD_OUT_FIELDS value or tokenizer than the run's,
  whose held-out scores these are then not."""
  notes = []
  tokenizer = splits.saved_tokenizer(directory, run)
  if tokenizer and not config.tokenizer:
    config.tokenizer = tokenizer  # the teacher's was read, or none was found for a random teacher
  elif tokenizer and os.path.realpath(config.tokenizer) != os.path.realpath(tokenizer):
    notes.append(f"tokenizer is {config.tokenizer!r} here but was {tokenizer!r}")
  recorded = ((run or {}).get("data") or {}).get("eval_paths")
  if recorded and config.data.source == run["data"].get("source") and not config.data.eval_paths:
    config.data.eval_paths = recorded
    if distributed.is_primary():
      print(f"bipft: note: data.eval_paths={recorded} (the run's)", file=sys.stderr)
  notes += [f"{field} is {ours!r} here but was {theirs!r}"
            for field, ours, theirs in saved_models.differing(config, run or {}, HELD_OUT_FIELDS)]
  for note in notes if distributed.is_primary() else ():
    print(f"bipft: note: {note} in the run that wrote {directory}: these held-out scores are not the run's",
          file=sys.stderr)


def evaluate_pretraining(config, checkpoint: str) -> dict:
  """The held-out scores of a pretraining checkpoint, as `bipft pretrain` measures them (the same
  evaluator and teacher, on the config's mesh): {"checkpoint", "step", "eval_mlm_accuracy",
  "eval_mlm_loss", "eval_rep_dist_loss", "eval_total_loss"}."""
  directory, step, student_config = saved_models.find_checkpoint(
      checkpoint, "pretraining", "pass a `bipft pretrain` workdir or one of its step folders")
  _held_out_as_run(config, checkpointing.read_run_config(directory, step), directory)
  mesh, rules = sharding.make_mesh(dict(config.mesh.shape)), sharding.rules_from_config(config.mesh.rules)
  student = model_lib.build(student_config, "pretraining")
  # Read at once: a run still writing to the workdir removes its older steps as it saves new ones.
  _, _, params = checkpointing.restore_params(directory, step, shardings=engine.param_shardings(student, mesh, rules))
  teacher, teacher_params = pretraining.placed_teacher(config, student_config, mesh, rules)
  tokenizer = pytorch_io.load_tokenizer(pretraining.tokenizer_folder(config), student_config.vocab_size,
                                        fix="set --config.tokenizer to the vocabulary the run used")
  batches, _ = pretraining.held_out_batches(config, tokenizer, sharding.batch_sharding(mesh, rules))
  evaluate = pretraining.held_out_evaluator(student, teacher, config, batches, mesh, rules)
  return {"checkpoint": directory, "step": step, **evaluate(params, teacher_params)}
