"""The study's tables and plots (`bipft study`, and `bipft glue-report` on a study workdir).

From the finished cells' records: per task and method (the default learning rate) the mean +- sample
standard deviation over seeds; the average over tasks; the differences the paper names (BiPFT-A vs
the task-specific binary baseline: binary pretraining alone; BiPFT-B vs A: the low-rank estimators;
with downstream distillation; and what distillation adds to each, the paper's "reliance"); the
learning-rate sweep (robustness: the spread of the means over the rates); dev scores after each
epoch (optimisation speed). Written to WORKDIR/results.json, results.md and three PNG plots.
"""
import json
import os

import numpy as np

from bipft_jax import files
from bipft_jax.errors import UserError

RESULTS_FILE, MARKDOWN_FILE = "results.json", "results.md"
PLOTS = {"by_task": "accuracy_by_task.png", "sweep": "accuracy_vs_learning_rate.png",
         "curves": "accuracy_vs_steps.png"}
# (label, minuend, subtrahend): the paper's comparisons, as method names.
DIFFERENCES = (
    ("BiPFT-A - task-specific (binary pretraining)", "bipft_a", "binary"),
    ("BiPFT-B - BiPFT-A (low-rank estimators)", "bipft_b", "bipft_a"),
    ("BiPFT-B - task-specific (both)", "bipft_b", "binary"),
    ("BiPFT-B + KD - task-specific + KD (both, distilled)", "bipft_b_kd", "binary_kd"),
    ("KD gain, task-specific (reliance on distillation)", "binary_kd", "binary"),
    ("KD gain, BiPFT-B (reliance on distillation)", "bipft_b_kd", "bipft_b"),
)


def _stats(values: list) -> dict:
  return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "n": len(values), "values": [float(v) for v in values]}


def summarize(header: dict, records: list) -> dict:
  """results.json's content from the header `bipft study` writes and the finished cells' records."""
  tuned = [r for r in records if r["kind"] == "finetune"]
  main = [r for r in tuned if r["learning_rate"] == header["learning_rate"]]
  methods = list(header["methods"])
  tasks = list(header["tasks"])
  table = {t: {m: _stats([r["score"] for r in main if (r["task"], r["method"]) == (t, m)])
               for m in methods if any((r["task"], r["method"]) == (t, m) for r in main)} for t in tasks}
  average = {m: float(np.mean([table[t][m]["mean"] for t in tasks])) for m in methods
             if all(m in table[t] for t in tasks)}
  differences = []
  for label, a, b in DIFFERENCES:
    per_task = {t: _difference(table[t][a], table[t][b]) for t in tasks if a in table[t] and b in table[t]}
    if per_task:
      differences.append({"label": label, "per_task": per_task,
                          "average": float(np.mean([d["mean"] for d in per_task.values()]))})
  sweep = {}
  for r in tuned:
    if r["task"] == header["sweep_task"]:
      sweep.setdefault(r["method"], {}).setdefault(r["learning_rate"], []).append(r["score"])
  sweep = {m: {f"{lr:g}": _stats(v) for lr, v in sorted(by_rate.items())} for m, by_rate in sweep.items()}
  curves = {t: {m: _mean_curve([r["curve"] for r in main if (r["task"], r["method"]) == (t, m)])
                for m in methods if m in table[t]} for t in tasks}
  majority = {t: next((r["majority"] for r in main if r["task"] == t), None) for t in tasks}
  kept = ("steps", "seconds", "mlm_accuracy", "hidden_mse", "held_out_mse")
  pretraining = {r["variant"]: {k: r.get(k) for k in kept} for r in records if r["kind"] == "pretrain"}
  return {**header, "table": table, "average": average, "differences": differences, "sweep": sweep,
          "curves": curves, "majority": majority, "pretraining": pretraining,
          "seconds": round(sum(r["seconds"] for r in records), 1), "cells": records}


def _difference(a: dict, b: dict) -> dict:
  """Difference of two cells' means, +- its standard error (each cell's seeds independent; None when a
  cell has one seed: no spread measured)."""
  one_seed = min(a["n"], b["n"]) < 2
  error = None if one_seed else float(np.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]))
  return {"mean": a["mean"] - b["mean"], "stderr": error}


def _mean_curve(curves: list) -> list:
  """[[step, mean score]] over the seeds' curves, at the steps they all have."""
  steps = sorted(set.intersection(*(set(s for s, _ in c) for c in curves))) if curves else []
  return [[s, float(np.mean([dict(map(tuple, c))[s] for c in curves]))] for s in steps]


def _pm(stats: dict) -> str:
  return f"{stats['mean']:.1f} ± {stats['std']:.1f}" if stats["n"] > 1 else f"{stats['mean']:.1f}"


def _pm_difference(difference: dict) -> str:
  error = difference["stderr"]
  return f"{difference['mean']:+.1f}" + (f" ± {error:.1f}" if error is not None else "")


def markdown(results: dict) -> str:
  """results.md: the tables, with what they were measured on."""
  names = results["methods"]
  tasks = list(results["tasks"])
  lines = [f"Host: {results['host']}; {results['date']}; config {results['config']}; cells' wall time "
           f"{results['seconds'] / 60:.0f} min. Dev accuracy (%), mean ± std over finetuning seeds (n per "
           f"cell in results.json), learning rate {results['learning_rate']:g}.", "",
           "| method | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
  for m, label in names.items():
    cells = [_pm(results["table"][t][m]) if m in results["table"][t] else "-" for t in tasks]
    average = f"{results['average'][m]:.1f}" if m in results["average"] else "-"
    lines.append(f"| {label} | " + " | ".join(cells) + f" | {average} |")
  majority = [f"{results['majority'][t]:.1f}" if results["majority"][t] is not None else "-" for t in tasks]
  lines.append("| (train's majority class, always) | " + " | ".join(majority) + " | |")
  if "dev_largest_class" in results:  # the best constant answer (absent from older studies' results)
    lines.append("| (dev's largest class, always) | " + " | ".join(
        f"{results['dev_largest_class'][t]:.1f}" for t in tasks) + " | |")
  if results["differences"]:
    lines += ["", "Differences (points; ± the standard error of a difference of means):", "",
              "| comparison | " + " | ".join(tasks) + " | average |", "|---" * (len(tasks) + 2) + "|"]
    for d in results["differences"]:
      cells = [_pm_difference(d["per_task"][t]) if t in d["per_task"] else "-" for t in tasks]
      lines.append(f"| {d['label']} | " + " | ".join(cells) + f" | {d['average']:+.1f} |")
  if results["sweep"]:
    rates = sorted({float(r) for by_rate in results["sweep"].values() for r in by_rate})
    lines += ["", f"Learning-rate sweep on {results['sweep_task']} (robustness: spread = best - worst mean):", "",
              "| method | " + " | ".join(f"lr {r:g}" for r in rates) + " | spread |", "|---" * (len(rates) + 2) + "|"]
    for m, by_rate in results["sweep"].items():
      cells = [_pm(by_rate[f"{r:g}"]) if f"{r:g}" in by_rate else "-" for r in rates]
      means = [s["mean"] for s in by_rate.values()]
      lines.append(f"| {names.get(m, m)} | " + " | ".join(cells) + f" | {max(means) - min(means):.1f} |")
  for t, by_method in results["curves"].items():
    steps = sorted({s for curve in by_method.values() for s, _ in curve})
    if len(steps) > 1:
      lines += ["", f"Dev accuracy after each epoch on {t} (mean over seeds; optimisation speed):", "",
                "| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
      for m, curve in by_method.items():
        at = dict(map(tuple, curve))
        lines.append(f"| {names.get(m, m)} | " + " | ".join(f"{at[s]:.1f}" if s in at else "-" for s in steps) + " |")
  if results["pretraining"]:
    lines += ["", "| pretraining | steps | held-out MLM accuracy | hidden-state MSE to the teacher (last step) | "
              "held out | minutes |", "|---|---|---|---|---|---|"]
    for variant, p in results["pretraining"].items():
      held_out = f"{p['held_out_mse']:.3f}" if p["held_out_mse"] is not None else "-"  # cells before 2026-12-04
      lines.append(f"| {variant} | {p['steps']} | {100 * p['mlm_accuracy']:.1f}% | {p['hidden_mse']:.3f} | "
                   f"{held_out} | {p['seconds'] / 60:.1f} |")
  return "\n".join(lines) + "\n"


def plot(results: dict, workdir: str) -> list:
  """The three PNG plots (those with data) in `workdir`; their file names."""
  import matplotlib
  matplotlib.use("Agg")  # files only: no display on a pod host or in CI
  import matplotlib.pyplot as plt
  names, tasks, written = results["methods"], list(results["tasks"]), []
  colors = {m: f"C{i}" for i, m in enumerate(names)}  # one colour per method in every plot
  outside = {"fontsize": 7, "loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}  # legends off the data

  def save(fig, key):
    with files.atomic_path(os.path.join(workdir, PLOTS[key])) as tmp:
      fig.savefig(tmp, dpi=80, bbox_inches="tight", format="png")
    plt.close(fig)
    written.append(PLOTS[key])

  fig, ax = plt.subplots(figsize=(2.2 + 1.6 * len(tasks), 3.6))
  width = 0.8 / max(len(names), 1)
  for i, (m, label) in enumerate(names.items()):
    xs = [j + (i - (len(names) - 1) / 2) * width for j, t in enumerate(tasks) if m in results["table"][t]]
    stats = [results["table"][t][m] for t in tasks if m in results["table"][t]]
    ax.bar(xs, [s["mean"] for s in stats], width, yerr=[s["std"] for s in stats], label=label, capsize=2,
           color=colors[m])
  constants = {":": results["majority"], "--": results.get("dev_largest_class", {})}
  for j, t in enumerate(tasks):
    for style, by_task in constants.items():
      if by_task.get(t) is not None:
        ax.hlines(by_task[t], j - 0.45, j + 0.45, colors="k", linestyles=style, linewidth=1)
  ax.set_xticks(range(len(tasks)), tasks)
  floor = [s["mean"] - s["std"] for by_method in results["table"].values() for s in by_method.values()]
  floor += [m for by_task in constants.values() for m in by_task.values() if m is not None]
  ax.set_ylim(bottom=max(0.0, min(floor, default=0.0) - 5))  # the differences, not the common base
  ax.set_ylabel("dev accuracy (%)")
  ax.set_title("per task and method\n(dotted: train's majority class; dashed: dev's largest class)", fontsize=9)
  ax.legend(**outside)
  save(fig, "by_task")

  if results["sweep"]:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for m, by_rate in results["sweep"].items():
      rates = sorted(by_rate, key=float)
      ax.errorbar([float(r) for r in rates], [by_rate[r]["mean"] for r in rates],
                  yerr=[by_rate[r]["std"] for r in rates], marker="o", capsize=2, label=names.get(m, m),
                  color=colors.get(m))
    ax.set_xscale("log")
    swept = sorted({float(r) for by_rate in results["sweep"].values() for r in by_rate})
    ax.set_xticks(swept, [f"{r:g}" for r in swept])
    ax.minorticks_off()  # the log axis' minor labels overlap at a 10x span
    ax.set_xlabel("finetuning learning rate")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(f"robustness on {results['sweep_task']}")
    ax.legend(**outside)
    save(fig, "sweep")

  if any(len(curve) > 1 for by_method in results["curves"].values() for curve in by_method.values()):
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, t in zip(axes[0], tasks):
      for m, curve in results["curves"][t].items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", label=names.get(m, m),
                color=colors.get(m))
      ax.set_title(t)
      ax.set_xlabel("finetuning steps")
    axes[0][0].set_ylabel("dev accuracy (%)")
    axes[0][-1].legend(**outside)
    save(fig, "curves")
  return written


def write(workdir: str, header: dict, records: list) -> dict:
  """results.json, results.md and the plots in `workdir` (each atomically); the results, with the
  markdown under "markdown"."""
  results = summarize(header, records)
  text = markdown(results)
  with files.atomic_write(os.path.join(workdir, MARKDOWN_FILE)) as f:
    f.write(text)
  files.write_json(os.path.join(workdir, RESULTS_FILE), results)
  plot(results, workdir)
  return {**results, "markdown": text}


def is_study(workdir: str) -> bool:
  """Whether `workdir` is a `bipft study` workdir (its results.json has the study's cells)."""
  path = os.path.join(workdir, RESULTS_FILE)
  if not os.path.isfile(path):
    return False
  try:
    with open(path) as f:
      return "cells" in json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError):
    return False


def read(workdir: str) -> str:
  """The study's tables, recomputed from the results.json in `workdir`; UserError if it is not one."""
  path = os.path.join(workdir, RESULTS_FILE)
  try:
    with open(path) as f:
      results = json.load(f)
    header = {k: results[k] for k in ("config", "host", "date", "tasks", "methods", "learning_rate", "sweep_task")}
    if "dev_largest_class" in results:  # absent from studies written before it
      header["dev_largest_class"] = results["dev_largest_class"]
    return markdown(summarize(header, results["cells"]))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
    raise UserError(f"{path} is not a study's results file ({type(e).__name__}: {e})") from None
