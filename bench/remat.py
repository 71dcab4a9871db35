"""The distillation step's memory and time with and without `model.remat`, side by side.

`model.remat=True` wraps each layer in jax.checkpoint: the backward recomputes a layer's activations
from its input instead of keeping them from the forward. How much memory that saves is up to XLA's
scheduler, which decides when the recomputation runs: XLA:CPU's default one orders the program for
concurrency and may run every recomputation early, keeping it all; GPU and TPU schedule for memory.
So each of two child processes compiles `bipft pretrain`'s step (bench/pretrain_step.py's, one
device, random weights) without and with remat, one under XLA:CPU's default scheduler and one with
`--xla_cpu_enable_concurrency_optimized_scheduler=false`, and prints XLA's account of the compiled
step (`memory_analysis`: temporaries, the activations kept for the backward and the workspace; the
arguments, parameters, optimizer state, teacher and batch) and the median step time.

  PYTHONPATH=. python bench/remat.py --size base --batch 8 --length 128

The first line names the CPU; the last is `RESULT {json}` with each run's bytes and seconds and the
ratios remat / no remat.
"""
import argparse
import json
import os
import subprocess
import sys

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import pretrain_step  # noqa: E402
from bipft_jax import precision  # noqa: E402

SCHEDULERS = {"default": "", "memory": "--xla_cpu_enable_concurrency_optimized_scheduler=false"}


def measure(args) -> dict:
  """Bytes and median seconds of the step without and with remat, in this process."""
  batch = pretrain_step.step_batch(args)
  out = {}
  for remat in (False, True):
    run, state, teacher_params, global_batch, _, _ = pretrain_step.ours_engine(args, batch, remat=remat)
    memory = run.compiled_step(state, teacher_params, global_batch).memory_analysis()
    holder = [state]

    def step():
      holder[0], metrics = run.train_step(holder[0], teacher_params, global_batch, 0)
      jax.block_until_ready(metrics["total_loss"])

    out["remat" if remat else "plain"] = {
        "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes,
        "seconds": pretrain_step.median_seconds(step, args.warmup, args.repeats)}
  return out


def main() -> None:
  parser = pretrain_step.step_parser(__doc__.splitlines()[0])
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if min(args.repeats, args.batch, args.length) < 1 or args.warmup < 0:
    parser.error("--batch, --length and --repeats must be at least 1, --warmup at least 0")
  if args.child:
    print("CHILD " + json.dumps(measure(args)), flush=True)
    return
  cpu, flags = precision.cpu_description()
  print(f"host: {cpu}; flags: {flags}; jax {jax.__version__}", flush=True)
  print(f"{args.size}, batch {args.batch} x {args.length}, {args.precision}", flush=True)
  results = {}
  for scheduler, flag in SCHEDULERS.items():
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()}
    child = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True,
                           text=True, check=False)
    lines = [line for line in child.stdout.splitlines() if line.startswith("CHILD ")]
    if child.returncode or not lines:
      sys.exit(f"the {scheduler} scheduler's child failed:\n{child.stderr[-3000:]}")
    results[scheduler] = runs = json.loads(lines[-1][len("CHILD "):])
    for name, run in runs.items():
      print(f"XLA:CPU {scheduler} scheduler, {'remat' if name == 'remat' else 'no remat'}: temporaries "
            f"{run['temp_bytes'] / 2**20:,.0f} MiB, arguments {run['argument_bytes'] / 2**20:,.0f} MiB, "
            f"step {run['seconds']:.3f} s", flush=True)
    results[scheduler]["ratios"] = ratios = {
        "temp": runs["remat"]["temp_bytes"] / runs["plain"]["temp_bytes"],
        "seconds": runs["remat"]["seconds"] / runs["plain"]["seconds"]}
    print(f"  remat / no remat: temporaries {ratios['temp']:.2f}x, step time {ratios['seconds']:.2f}x", flush=True)
  print("RESULT " + json.dumps({"cpu": cpu, "size": args.size, "batch": args.batch, "length": args.length,
                                "precision": args.precision, "runs": results}))


if __name__ == "__main__":
  main()
