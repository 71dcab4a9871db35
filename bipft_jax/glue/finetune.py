r"""`bipft finetune`: one GLUE task, the release's recipe (METHOD.md section 7).

  bipft finetune --config configs/glue.py:task=rt_demo --workdir runs/rt --init_from runs/pretrain_demo
  bipft finetune --config configs/glue.py:task=rte --workdir runs/rte --init_from runs/pretrain \
      --config.data.path=glue_data
  # more (the FP baseline, TFDS, CSV/JSONL and tasks of your own, distillation, meshes): configs/glue.py

Start (config.init.kind): a pretrained checkpoint (`--init_from`: its `bert` subtree is kept, the
classifier is fresh), a PyTorch teacher folder (the FP baseline, or the teacher binarized with
init.binary=True), or random weights (smoke tests). A student whose activation scales are still
the untrained 1.0 is calibrated once on the first training batch. With `distill.teacher` (a
finetuned classifier: a finetune workdir or a Hugging Face folder) the loss adds downstream
distillation to it (configs/glue.py).

The run engine (engine.py) drives it as it drives pretraining: sharded over `config.mesh`, multi-host
through the launch scripts, checkpoints every `checkpoint_every` steps and at each epoch's end, exact
resume after a kill (rerun the same command), a save on SIGTERM, Ctrl-C or a hangup (exit code 143,
130 or 129), and a stop on a NaN/Inf loss or update before best/ or results.json exist. Each epoch
ends with every dev split evaluated (metrics.jsonl, TensorBoard). The best epoch by the task's first
metric on the first dev split is kept (MNLI-mm is reported from the last epoch, as the release
does); at the end `best/` holds its checkpoint, `results.json` the reported numbers and
`submission/` the GLUE leaderboard files of whatever test splits exist (a custom task:
test_predictions.tsv, its data.test_file predicted).
Everything is written to `WORKDIR/.finetune-staging/` (a killed run resumes from there) and moved
into the workdir when the run ends, so a workdir with an earlier run (replaced only with
`--overwrite`) keeps it whole until then; the same command after the run finished has nothing left
to train and exits 0, one with other settings is refused; a run killed while its outputs were
written or moved is completed by the next `bipft finetune` there. From its first write to its last
the run holds the workdir: another run started there is refused (`distributed.workdir_lock`).
"""
import json
import os
import shutil

from jax.experimental import multihost_utils

from bipft_jax import checkpointing, config_checks, config_loading, distributed, engine, errors, files, sharding
from bipft_jax.errors import UserError
from bipft_jax.glue import finetuning, tasks

CONFIG_KINDS = ("glue",)  # config_loading.KINDS this command takes

OUTPUTS = ("metrics.jsonl", "results.json", "best", "submission", "tensorboard", "profile")
STAGING = ".finetune-staging"  # a run's outputs until it ends; then they replace an earlier run's
PUBLISHING = ".publishing.json"  # in STAGING while its outputs move into the workdir: their names
_DELETED = ".deleted"  # the suffix of a folder renamed away to be deleted
OWN = ("results.json", "best", "submission", STAGING)  # what only a finetuning workdir holds


def add_arguments(parser) -> None:
  config_loading.add_config_argument(parser, CONFIG_KINDS)
  parser.add_argument("--workdir", required=True, help="where metrics, TensorBoard, best/ and submission/ go")
  parser.add_argument("--init_from", default=None,
                      help="a pretrained checkpoint (workdir or step folder); sets init.kind=checkpoint")
  parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier run in workdir")


def run(args) -> int:
  config = config_loading.load_config(args.config, args.config_overrides, kinds=CONFIG_KINDS)
  if args.init_from:
    config.init.kind, config.init.path = "checkpoint", args.init_from
  finetuning.check_model_overrides(config, args.config_overrides)
  results = finetune(config, args.workdir, overwrite=args.overwrite)
  if "stopped_by" in results:
    return errors.signal_exit_code(results["stopped_by"])
  if distributed.is_primary():
    print(summary_line(results))
  return 0


def finetune(config, workdir: str, overwrite: bool = False) -> dict:
  """Runs (or resumes) the task of `config` in `workdir`; returns the contents of results.json, or
  {"stopped_by": the signal} when a SIGTERM, Ctrl-C or hangup stopped the run (saved: rerun to resume)."""
  config_checks.check_glue(config)
  task = tasks.task_from_config(config)
  staging = os.path.join(workdir, STAGING)
  if os.path.exists(os.path.join(staging, "results.json")):
    return _complete_publication(config, staging, workdir)
  finished = None if overwrite else _finished_earlier(config, workdir)
  if finished is not None:
    return finished
  _earlier_outputs(workdir, overwrite)
  files.check_writable_dir(workdir, "--workdir")
  finetuning.check_init(config)
  engine.start(config)
  mesh, rules = sharding.make_mesh(dict(config.mesh.shape)), sharding.rules_from_config(config.mesh.rules)
  run = finetuning.Finetuning(config, task, mesh, rules, staging)  # every input read: outputs may start
  with distributed.workdir_lock(workdir, "finetune"):
    _prepare_staging(staging)
    result = engine.Engine(run.job, mesh, rules, seed=config.seed, max_grad_norm=config.optimizer.max_grad_norm).fit(
        staging, run.schedule, checkpoint_dir=os.path.join(staging, "checkpoints"))
    if "stopped_by" in result:
      return {"stopped_by": result["stopped_by"]}
    results = run.write_outputs()
    if distributed.is_primary():
      _publish(staging, workdir)
  return results


def _finished_earlier(config, workdir: str):
  """The results of the run that finished in `workdir` with `config`'s settings (the same command
  again: nothing left to train, exit 0, as for a finished pretraining), else None; UserError naming
  the settings of a finished run that differ (its results are not this command's)."""
  results_file = os.path.join(workdir, "results.json")
  try:
    with open(results_file) as f:
      results = json.load(f)
    saved = checkpointing.read_run_config(os.path.join(workdir, finetuning.BEST))
  except (UserError, OSError, ValueError):  # no finished run, or one _earlier_outputs describes
    return None
  if not isinstance(saved, dict) or not isinstance(results, dict):
    return None
  now = config.to_dict()
  # What the run worked out before recording it: its steps (from epochs and the data) and its
  # tokenizer's absolute folder (the one given, else the start's, which init.path names).
  derived = {"optimizer.total_steps"}
  if now["data"].get("tokenizer"):
    now["data"]["tokenizer"] = os.path.abspath(now["data"]["tokenizer"])
  else:
    derived.add("data.tokenizer")
  changes = [change for change in checkpointing.setting_changes(saved, now) if change[0] not in derived]
  if changes:
    listed = "; ".join(f"{name} {then!r} there, {value!r} now" for name, then, value in changes[:5])
    raise UserError(f"{workdir} already holds a finetuning run of other settings ({listed}"
                    f"{'; ...' if len(changes) > 5 else ''}); choose another --workdir or pass --overwrite")
  distributed.log(f"bipft finetune: {workdir} holds this run, finished earlier ({results_file}): nothing left "
                  "to train (--overwrite trains it again)")
  return results


def _earlier_outputs(workdir: str, overwrite: bool) -> list:
  """The outputs of an earlier run in `workdir`; UserError if there are some and not `overwrite`, and
  for a pretraining workdir (its logs share our outputs' names: --overwrite would replace them)."""
  steps = checkpointing.saved_steps(workdir)
  if steps:
    raise UserError(f"{workdir} holds a pretraining run (checkpoint steps {', '.join(map(str, steps))}); to "
                    f"finetune from it, pass --init_from {workdir} and another --workdir")
  existing = [name for name in OUTPUTS if os.path.exists(os.path.join(workdir, name))]
  if existing and not overwrite:
    raise UserError(f"{workdir} already holds a finetuning run ({', '.join(existing)}); choose another "
                    "--workdir or pass --overwrite")
  return existing


def _complete_publication(config, staging: str, workdir: str) -> dict:
  """Publishes the finished run in `staging` that was stopped while its outputs were written or moved
  into `workdir` (whatever the command: the run has ended, only its outputs are left to move); returns
  its results.json."""
  engine.start(config)
  with distributed.workdir_lock(workdir, "finetune"):
    results_file = os.path.join(staging, "results.json")
    if not os.path.exists(results_file):
      raise UserError(f"another run published the finished run in {staging} meanwhile; rerun the command")
    with open(results_file) as f:
      results = json.load(f)
    multihost_utils.sync_global_devices("bipft finetune publication")  # every host has read it
    distributed.log(f"bipft finetune: moving the outputs of the finished run in {staging} into {workdir} "
                    "(they were being moved when it stopped)")
    if distributed.is_primary():
      _publish(staging, workdir)
  return results


def _prepare_staging(staging: str) -> None:
  """Readies the folder of this run's outputs: a killed run's is resumed if it saved a checkpoint; a
  crashed run's leftovers without one, and a published run's, are removed."""
  if distributed.is_primary():
    if os.path.exists(os.path.join(staging, PUBLISHING)):  # published; stopped before removing its staging
      _remove(staging)
    shutil.rmtree(staging + _DELETED, ignore_errors=True)
    if checkpointing.saved_steps(os.path.join(staging, "checkpoints")):
      distributed.log(f"bipft finetune: resuming the run in {staging} (delete that folder to start afresh)")
    else:
      shutil.rmtree(staging, ignore_errors=True)
  multihost_utils.sync_global_devices("bipft finetune staging")  # no host writes there before that


def _publish(staging: str, workdir: str) -> None:
  """Moves a finished run's outputs from `staging` into `workdir`, each replacing an earlier run's
  by rename (results.json, the mark of a finished run, last); earlier outputs it lacks are removed.
  Resumable: the names it moves are written down first, so a rerun after a kill tells an output
  already moved from an earlier run's that the new one lacks."""
  manifest = os.path.join(staging, PUBLISHING)
  if not os.path.exists(manifest):
    files.write_json(manifest, [name for name in OUTPUTS if os.path.exists(os.path.join(staging, name))])
  with open(manifest) as f:
    moving = json.load(f)
  for name in sorted(OUTPUTS, key=lambda name: name == "results.json"):
    source, target = os.path.join(staging, name), os.path.join(workdir, name)
    if name in moving:
      if os.path.exists(source):  # else moved before a kill
        files.replace_tree(source, target)
    elif os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)
  _remove(staging)


def _remove(folder: str) -> None:
  """Deletes `folder` after renaming it away, so that a kill mid-way leaves no part of it by its name."""
  shutil.rmtree(folder + _DELETED, ignore_errors=True)  # an earlier removal's, killed mid-way
  os.rename(folder, folder + _DELETED)
  shutil.rmtree(folder + _DELETED)


def summary_line(results: dict) -> str:
  """One line for the end of `bipft finetune`."""
  parts = [f"{split}: " + ", ".join(f"{m} {v:.2f}" for m, v in d.items()) for split, d in results["dev"].items()]
  line = f"{results['task']} best epoch {results['best_epoch']}/{results['epochs']}: " + "; ".join(parts)
  if "dev_majority_rate" in results:
    line += f" (majority class {results['dev_majority_rate']:.2f})"
  return line
