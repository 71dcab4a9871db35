"""`bipft pretrain`: distil the 1-bit student from a frozen full-precision teacher (METHOD.md section 6).

  bipft pretrain --config configs/pretrain.py:demo --workdir DIR [--init_from CKPT]

Where the parameters come from, in this order: the latest checkpoint in DIR (resume: parameters,
optimizer and data state), else `--init_from` (parameters only), else the teacher's weights. A start
whose activation scales are untrained calibrates them on the first batch. Checkpoints are orbax,
asynchronous, every `checkpoint_every` steps and at the end; a SIGTERM, Ctrl-C or hangup (SIGHUP, or
a console gone: console.py) saves and exits with the signal's code (143, 130, 129:
`errors.signal_exit_code`); a NaN/Inf
loss or update stops the run before it is saved (nothing non-finite is ever saved). A resume skips
(and sets aside) newer steps that fail their checksums or are not finite. While it runs, the
workdir is its own: another run started there is refused (`distributed.workdir_lock`). Process 0 writes
metrics.jsonl and TensorBoard scalars (`DIR/tensorboard`). The parts are pretraining.py's; the loop
is the run engine's (engine.py), the same as finetuning's.
"""
import os
from typing import Optional

from bipft_jax import config_checks, config_loading, distributed, engine, errors, files, pretraining, sharding
from bipft_jax.errors import UserError
from bipft_jax.glue import finetune

CONFIG_KINDS = ("pretrain",)  # config_loading.KINDS this command takes


def add_arguments(parser) -> None:
  config_loading.add_config_argument(parser, CONFIG_KINDS, default="configs/pretrain.py:demo")
  parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl and TensorBoard logs; "
                      "an existing workdir is resumed from its latest checkpoint")
  parser.add_argument("--init_from", default=None,
                      help="start from the parameters of this checkpoint (a workdir or step folder)")


def run(args) -> int:
  config = config_loading.load_config(args.config, args.config_overrides, kinds=CONFIG_KINDS)
  config_checks.check_pretrain(config)
  files.check_writable_dir(args.workdir, "--workdir")
  finetuned = [name for name in finetune.OWN if os.path.exists(os.path.join(args.workdir, name))]
  if finetuned:  # its metrics.jsonl would be cut back to this run's
    raise UserError(f"{args.workdir} holds a finetuning run ({', '.join(finetuned)}); choose another --workdir")
  engine.start(config)
  result = train_and_evaluate(config, args.workdir, init_from=args.init_from)
  return errors.signal_exit_code(result["stopped_by"]) if "stopped_by" in result else 0


def train_and_evaluate(config, workdir: str, init_from: Optional[str] = None) -> dict:
  """Runs (or resumes) pretraining to `config.total_steps`: `Engine.fit`'s result (the last metrics,
  the held-out scores at the start and end, the final global parameters)."""
  schedule = engine.Schedule(config.total_steps, config.log_every, config.eval_every, config.checkpoint_every,
                             config.keep_checkpoints, keep_every=config.keep_every,
                             profile_first_step=config.profile.first_step, profile_steps=config.profile.steps)
  mesh, rules = sharding.make_mesh(dict(config.mesh.shape)), sharding.rules_from_config(config.mesh.rules)
  job = pretraining.distillation_job(config, mesh, rules, init_from)
  run_engine = engine.Engine(job, mesh, rules, seed=config.seed, grad_accum_steps=config.grad_accum_steps,
                             max_grad_norm=config.optimizer.max_grad_norm)
  with distributed.workdir_lock(workdir, "pretrain"):  # every input read
    result = run_engine.fit(workdir, schedule)
  if result.get("final") and result.get("start"):
    start = result["start"]
    distributed.log(f"bipft pretrain: {pretraining.describe(result['step'], result['final'])}; at the start of "
                    f"this run: accuracy {start['eval_mlm_accuracy']:.4f}, MSE {start['eval_rep_dist_loss']:.4f}")
  return result
