"""`bipft track`: every binarizer through the same pretraining and finetuning, one comparison table.

  bipft track --config configs/track.py:quick --workdir workdirs/track

A BiBench-style track on the distillation pipeline. Each row (configs/track.py `rows`: a linear
binarizer, optionally `+` an attention-probability binarizer) runs, in WORKDIR/ROW/, the same
commands a user would, through `cli.main`, and reads what they write:
  pretrain/      `bipft pretrain` (the config's overrides + the row's binarizers): metrics.jsonl gives
                 the training speed (median tokens/s of the logged steps) and the final hidden-state
                 MSE to the teacher;
  finetune/      `bipft finetune` from it: results.json gives the dev accuracy;
  summary        `bipft summary --json` of the row's student: OPs and memory ratios to the FP model
                 (the paper's accounting, backbone only) and the honest ones;
  model.bipft.safetensors  `bipft export-packed` of the finetuned classifier (its size), or the
                 command's refusal by name for a binarizer whose inference is not sign planes;
  packed dev     `bipft evaluate` of that file (the 1-bit forward a user deploys) on the dev split the
                 finetuning selected by: its score beside the simulated student's;
  speed          the packed file's forward vs the simulated student's, one batch, side by side.
The row's results go to WORKDIR/ROW/row.json (atomically) when it is complete; a rerun skips rows
that have one and resumes the others (pretraining from its checkpoint, a finetuning run without
results.json afresh). A row whose pretraining or finetuning stops with an error is reported with that
error and not saved. A SIGTERM, Ctrl-C or hangup stops the track with the signal's exit code (143,
130, 129): in a training loop after the loop's save, the row left unsaved (a rerun resumes it); a
SIGTERM or hangup elsewhere once the row is saved; a Ctrl-C elsewhere at once. After every row the
table is rewritten: WORKDIR/track.md and WORKDIR/track.json.
"""
import argparse
import datetime
import json
import os
import time
from typing import Optional

import jax
import numpy as np

from bipft_jax import config_loading, files, policy, precision, zoo
from bipft_jax.runs import (config_with_overrides, override_args, pretraining_numbers, run_command,
                            signals_between_commands)
from bipft_jax.errors import STOPPED, Stopped, UserError, signal_exit_code

CONFIG_KINDS = ("track",)  # config_loading.KINDS this command takes

ROW_FILE = "row.json"
PACKED_FILE = "model.bipft.safetensors"
DEFAULT_PROBS = "elastic"
NOT_PACKABLE = "does not pack"  # in export-packed's refusal of a binarizer by name


def parse_rows(text: str) -> list:
  """[(row name, linear binarizer, attention-probability binarizer)] of a `rows` field; UserError
  naming the choices for an unknown name."""
  rows = []
  for name in filter(None, (item.strip() for item in text.split(","))):
    linear, _, probs = name.partition("+")
    if linear not in policy.LINEAR_BINARIZERS:
      raise UserError(f"row {name!r}: unknown linear binarizer {linear!r}; choose one of "
                      f"{', '.join(policy.LINEAR_BINARIZERS)}")
    if probs and probs not in zoo.ATTENTION_PROB_BINARIZERS:
      raise UserError(f"row {name!r}: unknown attention-probability binarizer {probs!r}; choose one of "
                      f"{', '.join(zoo.ATTENTION_PROB_BINARIZERS)}")
    rows.append((name, linear, probs or DEFAULT_PROBS))
  if not rows:
    raise UserError("config.rows names no binarizer")
  if len({name for name, _, _ in rows}) < len(rows):
    raise UserError(f"config.rows names a row twice: {text}")
  return rows


def _seconds(fn, *args) -> float:
  started = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - started


def packed_speed(packed_path: str, checkpoint: str, speed) -> dict:
  """The packed file's classifier forward vs the simulated student's (the finetuned checkpoint), on
  one padded batch: the fastest of `speed.repeats` each, measured alternately; their largest logit
  difference (a check that the packed model is the one trained)."""
  from bipft_jax import checkpointing, packed, packed_file
  from bipft_jax import model as model_lib
  config, head, packed_params = packed_file.load_packed(packed_path, speed.kernel)  # the kernel prepared
  sim_config, sim_head, params = checkpointing.restore_params(checkpoint)
  batch = packed_file.probe_batch(config, speed.batch_size, speed.length)
  inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  run_packed = packed.jit(lambda p, *x: packed.forward(config, head, p, *x)["logits"])
  module = model_lib.build(sim_config, sim_head)
  run_simulated = jax.jit(lambda p, *x: module.apply({"params": p}, *x)["logits"])
  difference = np.max(np.abs(run_packed(packed_params, *inputs) - run_simulated(params, *inputs)))  # compiles
  packed_times, simulated_times = [], []
  for _ in range(speed.repeats):
    packed_times.append(_seconds(run_packed, packed_params, *inputs))
    simulated_times.append(_seconds(run_simulated, params, *inputs))
  return {"packed_ms": 1e3 * min(packed_times), "simulated_ms": 1e3 * min(simulated_times),
          "packed_speedup": min(simulated_times) / min(packed_times), "packed_kernel":
          packed.resolve_kernel(speed.kernel), "packed_max_logit_difference": float(difference)}


def run_row(config, row_dir: str, linear: str, probs: str) -> dict:
  """One row's commands (see the module docstring); its results, or {"error": ...} if one failed
  (`Stopped` if a SIGTERM or Ctrl-C stopped one)."""
  binarizers = [f"--config.model.linear_binarizer={linear}",
                f"--config.model.attention_prob_binarizer={probs}"]
  pretrain_dir, finetune_dir = os.path.join(row_dir, "pretrain"), os.path.join(row_dir, "finetune")
  started = time.time()
  code, _, error = run_command(["pretrain", "--config", config.pretrain.config, "--workdir", pretrain_dir,
                                *override_args(config.pretrain.overrides), *binarizers])
  if code:
    return {"error": f"pretrain: {error}"}
  pretrain_config = config_with_overrides(config.pretrain.config, config.pretrain.overrides)
  result = pretraining_numbers(pretrain_dir, pretrain_config.batch_size * pretrain_config.data.max_seq_length)

  results_file = os.path.join(finetune_dir, "results.json")
  if not os.path.exists(results_file):  # else finished before an interruption: kept
    code, _, error = run_command(["finetune", "--config", config.finetune.config, "--workdir", finetune_dir,
                                  "--init_from", pretrain_dir, "--overwrite",
                                  *override_args(config.finetune.overrides)])
    if code:
      return {"error": f"finetune: {error}"}
  with open(results_file) as f:
    finetuned = json.load(f)
  selection_split, metric = finetuned["selection"].split()
  result.update(dev_metric=metric, dev_score=finetuned["dev"][selection_split][metric],
                dev_majority_rate=finetuned.get("dev_majority_rate"), finetune_steps=finetuned["steps"])

  code, stdout, error = run_command(["summary", "--config", config.summary.model, "--seq-len",
                                     str(config.summary.seq_len), "--json",
                                     f"--config.linear_binarizer={linear}",
                                     f"--config.attention_prob_binarizer={probs}"], quiet=True)
  if code:
    raise UserError(f"bipft summary failed for row {linear}+{probs}: {error}")
  summary = json.loads(stdout.strip().splitlines()[-1])
  result.update({key: summary[key] for key in ("ops_ratio", "memory_ratio", "honest_ops_ratio",
                                               "honest_memory_ratio", "packed_bytes")})
  result["predicted_packed_bytes"] = result.pop("packed_bytes")

  packed_path, best = os.path.join(row_dir, PACKED_FILE), os.path.join(finetune_dir, "best")
  # The remainder in fp32, as `bipft summary` predicts the size (its `packed_bytes`).
  code, _, error = run_command(["export-packed", "--checkpoint", best, "--out", packed_path, "--overwrite",
                                "--remainder", "float32"], quiet=True)
  if code and NOT_PACKABLE in error:
    result["packed"] = f"refused: {error.split('; export-packed needs')[0]}"
    print(f"bipft track: export-packed {result['packed']}")
  elif code:
    return {"error": f"export-packed: {error}"}
  else:
    code, stdout, error = run_command(["evaluate", "--config", config.finetune.config, "--checkpoint", packed_path,
                                       "--kernel", config.speed.kernel, "--split", selection_split, "--json",
                                       *override_args(config.finetune.overrides)], quiet=True)
    if code:
      return {"error": f"evaluate (packed): {error}"}
    result.update(packed="packed", packed_file_bytes=os.path.getsize(packed_path),
                  packed_dev_score=json.loads(stdout)["metrics"][selection_split][metric],
                  **packed_speed(packed_path, best, config.speed))
  result["row_seconds"] = round(time.time() - started, 1)
  return result


# --- the table ---------------------------------------------------------------------

COLUMNS = ("row", "linear", "probs", "dev acc %", "packed dev acc %", "hidden MSE", "held-out MSE", "OPs ratio",
           "memory ratio",
           "honest OPs / memory", "packed bytes", "packed ms", "packed vs simulated", "train tok/s",
           "step s")


def _cells(row: dict) -> list:
  head = [row["row"], row["linear"], row["probs"]]
  if "error" in row:
    return head + [f"failed: {row['error']}"] + [""] * (len(COLUMNS) - 4)
  packs = row["packed"] == "packed"
  return head + [
      f"{row['dev_score']:.1f}",
      f"{row['packed_dev_score']:.1f}" if "packed_dev_score" in row else "",  # rows of older versions lack it
      f"{row['hidden_mse']:.3f}",
      f"{row['held_out_mse']:.3f}" if row.get("held_out_mse") is not None else "",  # older rows lack it
      f"{row['ops_ratio']:.1f}x",
      f"{row['memory_ratio']:.1f}x", f"{row['honest_ops_ratio']:.1f}x / {row['honest_memory_ratio']:.1f}x",
      f"{row['packed_file_bytes']:,}" if packs else row["packed"],
      f"{row['packed_ms']:.1f}" if packs else "", f"{row['packed_speedup']:.2f}x" if packs else "",
      f"{row['train_tokens_per_second']:.0f}", f"{row['train_step_seconds']:.2f}"]


def format_table(rows: list) -> str:
  """The rows as a markdown table."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
  lines += ["| " + " | ".join(_cells(row)) + " |" for row in rows]
  return "\n".join(lines)


def write_table(workdir: str, header: dict, rows: list) -> str:
  """track.md and track.json in `workdir` (atomically); returns the markdown."""
  markdown = format_table(rows)
  speed = header["speed"]
  note = (f"{header['host']}, {header['date']}; config {header['config']}. Dev accuracy: the finetuning "
          f"task's dev set (its majority class: dev_majority_rate in track.json); ratios: `bipft summary` at "
          f"{header['seq_len']} tokens; hidden MSE: the student's to the teacher at the last logged pretraining "
          "step (one batch, with dropout), held-out: at the final held-out evaluation; packed: the finetuned "
          "classifier's export (its dev accuracy from `bipft evaluate` of the file), its forward vs the "
          f"simulated student's at batch {speed['batch_size']} x {speed['length']}; step s = the batch's "
          "positions / the median tokens per second of the logged pretraining steps.")
  with files.atomic_write(os.path.join(workdir, "track.md")) as f:
    f.write(note + "\n\n" + markdown + "\n")
  files.write_json(os.path.join(workdir, "track.json"), {**header, "rows": rows})
  return markdown


# --- the command ---------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
  config_loading.add_config_argument(parser, CONFIG_KINDS)
  parser.add_argument("--workdir", required=True, help="one folder per row, the table (track.md, track.json)")


def run_track(config, workdir: str, config_name: Optional[str] = None) -> tuple:
  """Runs (or resumes) every row of `config` in `workdir`; returns the rows' results and the exit code
  of a signal that stopped the track (else None)."""
  rows = parse_rows(config.rows)
  files.check_writable_dir(workdir, "--workdir")
  with files.workdir_lock(workdir, "track"):
    return _run_rows(config, rows, workdir, config_name)


def _run_rows(config, rows: list, workdir: str, config_name: Optional[str]) -> tuple:
  model_name, _ = precision.cpu_description()
  header = {"config": config_name, "host": f"{model_name} ({os.cpu_count()} cores)",
            "date": datetime.date.today().isoformat(), "seq_len": config.summary.seq_len,
            "speed": config.speed.to_dict()}
  results = []
  with signals_between_commands() as noted:  # the row ends and is saved, then the track stops
    for name, linear, probs in rows:
      row_dir = os.path.join(workdir, name)
      row_file = os.path.join(row_dir, ROW_FILE)
      if os.path.exists(row_file):
        with open(row_file) as f:
          result = json.load(f)
        print(f"bipft track: {name}: finished earlier, skipped")
      else:
        print(f"bipft track: {name}: linear {linear}, attention probabilities {probs}")
        try:
          result = {"row": name, "linear": linear, "probs": probs, **run_row(config, row_dir, linear, probs)}
        except Stopped as e:
          print(f"bipft track: {e}: stopped during row {name} (not recorded); rerun the same command to resume",
                flush=True)
          write_table(workdir, header, results)
          return results, e.code
        if "error" not in result:
          files.write_json(row_file, result)
        jax.clear_caches()  # each row compiles its own model: keep the memory of one
      results.append(result)
      write_table(workdir, header, results)
      if noted:
        stopped = signal_exit_code(noted[0])
        print(f"bipft track: {STOPPED[stopped]}: stopped after row {name}; rerun the same command to resume",
              flush=True)
        return results, stopped
  return results, None


def run(args: argparse.Namespace) -> int:
  config = config_loading.load_config(args.config, args.config_overrides, kinds=CONFIG_KINDS)
  results, stopped = run_track(config, args.workdir, args.config)
  print(format_table(results))
  print(f"bipft track: wrote {os.path.join(args.workdir, 'track.md')} and track.json")
  return stopped or (1 if any("error" in r for r in results) else 0)
