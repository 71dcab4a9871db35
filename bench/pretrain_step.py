"""One distillation pretraining step of ours vs one FP training step of transformers' BertForPreTraining.

Ours: frozen FP teacher forward + binary student forward/backward (MLM decoder at the masked
positions only) + AdamW, jitted, as `bipft pretrain` runs it, under `--precision` (fp32 | mixed,
model.precision). Peer: PyTorch BertForPreTraining of the same size, FP32, student alone (forward
with MLM and NSP labels, backward, AdamW). Both on random weights and tokens (the time does not
depend on them), measured in the same run; the medians of `--repeats` steps after `--warmup`
untimed ones (compilation excluded).

The breakdown times the parts of each step on their own: ours as separately jitted functions
(teacher forward; student forward with the loss; student forward + backward, minus the forward;
the AdamW update), the peer's phases inside its step (forward, backward, optimizer). The parts of
ours need not sum to the whole step, which XLA compiles as one program.

  PYTHONPATH=. python bench/pretrain_step.py --size base --batch 8 --length 128 --precision mixed
  PYTHONPATH=. python bench/pretrain_step.py --quick   # BERT-base, 1 round of 2 repeats

Memory: glibc's huge-page tunable (opt-in for `bipft`: BIPFT_HUGEPAGES=1, bipft_jax/hugepages.py)
removes most of our step's page faults but makes the PyTorch peer's step 2.4-3x slower on the Intel
host. So each side runs in a child process of its own under both allocators, glibc's default and
the tunable, and the ratio compares each side at its faster; the same-allocator ratios and the four
times are printed too. The host's speed drifts (by up to 30% within minutes on the 2-core VMs we
measured on), so `--rounds` (default 2) starts the four children again, the sides alternating, and
keeps each one's fastest round. A child per side, allocator and round: `--quick` (1 round) takes
6-9 minutes on those VMs.

The first line names the CPU; the last line is `RESULT {json}` with ours_s, peer_s, speedup
(peer_s / ours_s), both breakdowns and the four runs.
"""
import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bipft_jax import config_loading, engine, optim, precision, pretraining, sharding  # noqa: E402
from bipft_jax import model as model_lib  # noqa: E402
from bipft_jax import hugepages, model_params  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_batch(batch: int, length: int, vocab: int, max_predictions: int, seed: int = 0) -> dict:
  """Full-length pairs with 15% of positions masked, as the data pipeline produces them."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, vocab, (batch, length)).astype(np.int32)
  positions = np.sort(np.stack([rng.choice(np.arange(1, length - 1), max_predictions, replace=False)
                                for _ in range(batch)]), axis=1).astype(np.int32)
  labels = np.full((batch, length), -100, np.int32)
  np.put_along_axis(labels, positions, np.take_along_axis(ids, positions, 1), 1)
  return {"input_ids": ids, "token_type_ids": (np.arange(length) >= length // 2).astype(np.int32)[None].repeat(batch, 0),
          "attention_mask": np.ones((batch, length), np.int32), "labels": labels,
          "mlm_positions": positions, "mlm_labels": np.take_along_axis(ids, positions, 1),
          "next_sentence_label": rng.integers(0, 2, batch).astype(np.int32)}


def step_batch(args) -> dict:
  """`synthetic_batch` of `args`' size, batch and length, 15% of the positions masked."""
  size = config_loading.load_config(os.path.join(REPO, "configs", "model.py") + f":{args.size}")
  return synthetic_batch(args.batch, args.length, size.vocab_size, max(1, round(0.15 * args.length)))


def median_seconds(step, warmup: int, repeats: int) -> float:
  for _ in range(warmup):
    step()
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    step()
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def _ours_breakdown(args, run, state, teacher_params, global_batch, config, teacher) -> dict:
  """Median seconds of the step's parts, each jitted alone on the step's inputs."""
  key, student, tx = jax.random.key(0), run.job.module, run.job.tx
  teacher_fwd = jax.jit(lambda tp, b: pretraining.teacher_outputs(teacher, tp, b, False, key))
  loss = lambda p, t, b: pretraining.student_loss(student, config, p, t, b, key)
  student_fwd = jax.jit(loss)
  student_grad = jax.jit(jax.value_and_grad(loss, has_aux=True))
  update = jax.jit(lambda g, o, p: optax.apply_updates(p, tx.update(g, o, p)[0]))
  timed = lambda fn, *a: jax.block_until_ready(run.on_mesh(fn, *a))
  params, opt_state = state["params"], state["opt_state"]
  teacher_out = timed(teacher_fwd, teacher_params, global_batch)
  grads = timed(student_grad, params, teacher_out, global_batch)[1]
  parts = {"teacher_forward": (teacher_fwd, teacher_params, global_batch),
           "student_forward": (student_fwd, params, teacher_out, global_batch),
           "student_forward_backward": (student_grad, params, teacher_out, global_batch),
           "optimizer": (update, grads, opt_state, params)}
  seconds = {name: median_seconds(lambda a=a: timed(*a), 1, args.repeats) for name, a in parts.items()}
  seconds["backward"] = seconds["student_forward_backward"] - seconds["student_forward"]
  return seconds


def ours_engine(args, batch: dict, **model_fields) -> tuple:
  """(engine, state, teacher params, batch, config, teacher module): the step `bipft pretrain` runs,
  on one device, for `args`' size, precision and sign products (and `model_fields`)."""
  config = config_loading.load_config(os.path.join(REPO, "configs", "pretrain.py") + ":base")
  config.model = config_loading.load_config(os.path.join(REPO, "configs", "model.py") + f":{args.size},binary")
  config.data.max_seq_length, config.data.max_predictions = args.length, batch["mlm_positions"].shape[1]
  config.loss.nsp_distill = True  # a BERT teacher with its NSP head, as in the paper
  config.model.precision = args.precision
  config.model.binary_matmul_dtype = args.sign_dtype
  config.model.update(model_fields)
  student_config = pretraining.student_config(config)
  teacher_config = dataclasses.replace(student_config, binary=False, mlm_transform_act="gelu", remat=False)
  student, teacher = model_lib.build(student_config, "pretraining"), model_lib.build(teacher_config, "pretraining")
  teacher_params = model_params.init_params(teacher, jax.random.key(1))
  # The engine's own step on one device; the job's data, source and evaluator are not used here.
  job = engine.Job(name="bench", module=student, model_config=student_config, head="pretraining",
                   tx=optim.make_optimizer(config.optimizer, model_params.param_kinds(student)),
                   schedule=optim.learning_rate_schedule(config.optimizer),
                   loss_fn=pretraining.make_loss_fn(student, teacher, config), loss_key="total_loss",
                   batches=None, source=None, evaluate=None, run_config={}, frozen=teacher_params,
                   frozen_module=teacher)
  mesh = sharding.make_mesh({"data": 1}, jax.devices()[:1])
  run = engine.Engine(job, mesh, sharding.rules_from_config(config.mesh.rules), seed=0)
  teacher_params = run.place_frozen()
  global_batch = run.global_batch(batch)
  return run, run.new_state(teacher_params, global_batch), teacher_params, global_batch, config, teacher


def ours(args, batch: dict) -> tuple:
  run, state, teacher_params, global_batch, config, teacher = ours_engine(args, batch)
  state = [state]

  def step():
    state[0], metrics = run.train_step(state[0], teacher_params, global_batch, 0)
    jax.block_until_ready(metrics["total_loss"])

  whole = median_seconds(step, args.warmup, args.repeats)
  return whole, _ours_breakdown(args, run, state[0], teacher_params, global_batch, config, teacher)


def peer(args, batch: dict) -> tuple:
  import torch
  import transformers
  size = config_loading.load_config(os.path.join(REPO, "configs", "model.py") + f":{args.size}")
  hf_config = transformers.BertConfig(
      vocab_size=size.vocab_size, hidden_size=size.hidden_size, num_hidden_layers=size.num_layers,
      num_attention_heads=size.num_heads, intermediate_size=size.intermediate_size,
      max_position_embeddings=size.max_position_embeddings, attn_implementation="eager")
  model = transformers.BertForPreTraining(hf_config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
  inputs = {k: torch.from_numpy(batch[k]).long() for k in ("input_ids", "token_type_ids", "attention_mask", "labels",
                                                          "next_sentence_label")}

  phases = {"forward": [], "backward": [], "optimizer": []}

  def step():
    started = time.perf_counter()
    loss = model(**inputs).loss
    forward_done = time.perf_counter()
    loss.backward()
    backward_done = time.perf_counter()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for name, seconds in zip(phases, (forward_done - started, backward_done - forward_done,
                                      time.perf_counter() - backward_done)):
      phases[name].append(seconds)

  whole = median_seconds(step, args.warmup, args.repeats)
  return whole, {name: statistics.median(times[args.warmup:]) for name, times in phases.items()}


def _line(name: str, seconds: dict) -> str:
  return f"  {name}: " + ", ".join(f"{part} {value:.3f} s" for part, value in seconds.items())


MALLOCS = ("default", "hugepages")


def _malloc_env(malloc: str) -> dict:
  """This process's environment under glibc's default allocator or with the huge-page tunable."""
  tunables = [t for t in os.environ.get("GLIBC_TUNABLES", "").split(":") if t and not t.startswith(hugepages.TUNABLE)]
  env = {**os.environ, "GLIBC_TUNABLES": ":".join(tunables)}
  return hugepages.with_tunable(env) if malloc == "hugepages" else env


def _run_side(side: str, malloc: str, argv: list) -> dict:
  """One side's step in a child process under `malloc`: {"seconds", "parts", ...}."""
  done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--side", side],
                        env=_malloc_env(malloc), capture_output=True, text=True)
  lines = [line for line in done.stdout.splitlines() if line.startswith("SIDE ")]
  if done.returncode or not lines:
    sys.exit(f"the {side} side ({malloc} malloc) failed:\n{done.stderr[-3000:]}")
  return json.loads(lines[-1][len("SIDE "):])


def step_parser(description: str) -> argparse.ArgumentParser:
  """The arguments of our step: its model size, batch, precision and sign products, and the timing."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--size", default="base", help="a size of configs/model.py (tiny, mini, small, base...)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--precision", choices=precision.PRECISIONS, default="fp32",
                      help="our training precision policy (model.precision); the peer is always FP32")
  parser.add_argument("--sign-dtype", choices=precision.BINARY_MATMUL_DTYPES, default="auto",
                      help="model.binary_matmul_dtype: the units of the exact forward sign products")
  return parser


def main() -> None:
  parser = step_parser(__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2,
                      help="rounds over the four sides and allocators; each keeps its fastest round")
  parser.add_argument("--quick", action="store_true", help="1 round of 2 repeats (BERT-base still): 6-9 minutes")
  parser.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)  # a child's one side
  args = parser.parse_args()
  if args.quick:
    args.repeats, args.rounds = 2, 1
  if min(args.repeats, args.rounds) < 1:
    parser.error("--repeats and --rounds must be at least 1")
  batch = step_batch(args)
  if args.side:
    seconds, parts = (ours if args.side == "ours" else peer)(args, batch)
    print("SIDE " + json.dumps({"seconds": seconds, "parts": parts,
                                "sign_dtype": precision.sign_product_dtype(args.sign_dtype)}), flush=True)
    return
  cpu, flags = precision.cpu_description()
  print(f"host: {cpu}; flags: {flags}; jax {jax.__version__}; load {os.getloadavg()}", flush=True)
  runs = {}
  for round_index in range(args.rounds):  # the sides alternate, so a slow spell of the host hits both
    for malloc in MALLOCS:
      for side in ("ours", "peer"):
        run = _run_side(side, malloc, sys.argv[1:])
        what = (f"ours ({args.precision}, sign products in {run['sign_dtype']}: teacher forward + binary student "
                "step + AdamW)" if side == "ours" else "peer (transformers BertForPreTraining FP32 step + AdamW)")
        print(f"round {round_index + 1}: {what}, {malloc} malloc: median {run['seconds']:.3f} s", flush=True)
        print(_line(side, run["parts"]), flush=True)
        kept = runs.get(f"{side}_{malloc}")
        if kept is None or run["seconds"] < kept["seconds"]:
          runs[f"{side}_{malloc}"] = run
  faster = {side: min(MALLOCS, key=lambda m: runs[f"{side}_{m}"]["seconds"]) for side in ("ours", "peer")}
  ours_best, peer_best = faster["ours"], faster["peer"]
  ours_s, peer_s = runs[f"ours_{ours_best}"]["seconds"], runs[f"peer_{peer_best}"]["seconds"]
  same_malloc = {m: runs[f"peer_{m}"]["seconds"] / runs[f"ours_{m}"]["seconds"] for m in MALLOCS}
  print(f"speedup (each side at its faster: peer {peer_best} malloc / ours {ours_best} malloc): {peer_s / ours_s:.2f}x; "
        "same allocator on both sides: " + ", ".join(f"{m} {r:.2f}x" for m, r in same_malloc.items())
        + f"; load {os.getloadavg()}", flush=True)
  rounded = lambda parts: {k: round(v, 4) for k, v in parts.items()}
  print("RESULT " + json.dumps({"ours_s": round(ours_s, 4), "peer_s": round(peer_s, 4),
                                "speedup": round(peer_s / ours_s, 3), "ours_malloc": ours_best, "peer_malloc": peer_best,
                                "speedup_same_malloc": {m: round(r, 3) for m, r in same_malloc.items()},
                                "precision": args.precision, "sign_dtype": runs[f"ours_{ours_best}"]["sign_dtype"],
                                "ours_breakdown_s": rounded(runs[f"ours_{ours_best}"]["parts"]),
                                "peer_breakdown_s": rounded(runs[f"peer_{peer_best}"]["parts"]),
                                "runs_s": {name: round(run["seconds"], 4) for name, run in runs.items()},
                                "cpu": cpu, "size": args.size, "batch": args.batch, "length": args.length,
                                "repeats": args.repeats, "rounds": args.rounds}))


if __name__ == "__main__":
  main()
