"""`bipft glue-report`: the markdown table with both GLUE averages, and the leaderboard files."""
import json
import os

import numpy as np
import pytest

from bipft_jax import checkpointing, cli
from bipft_jax import model as model_lib
from bipft_jax.errors import UserError
from bipft_jax.glue import predictions, tasks

DEV = {  # task -> reported dev numbers, as finetune writes them
    "mnli": {"dev_matched": {"accuracy": 70.0}, "dev_mismatched": {"accuracy": 71.0}},
    "qqp": {"dev": {"accuracy": 84.0, "f1": 80.0}}, "qnli": {"dev": {"accuracy": 82.0}},
    "sst2": {"dev": {"accuracy": 86.0}}, "cola": {"dev": {"matthews_corr": 23.0, "accuracy": 70.0}},
    "stsb": {"dev": {"pearson_spearman": 80.0, "pearson": 81.0, "spearman": 79.0}},
    "mrpc": {"dev": {"accuracy": 76.0, "f1": 84.0}}, "rte": {"dev": {"accuracy": 66.0}},
    "wnli": {"dev": {"accuracy": 56.3}},
}


def write_run(workdir, task, dev, model="bipft", seed=None):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({"task": task, "model": model, "dev": dev, "best_epoch": 1, "epochs": 1,
               **({} if seed is None else {"seed": seed})}, f)
  return str(workdir)


def test_table_has_both_averages(tmp_path, capsys):
  workdirs = [write_run(tmp_path / name, name, dev) for name, dev in DEV.items()]
  workdirs.append(write_run(tmp_path / "fp_rte", "rte", {"dev": {"accuracy": 72.0}}, model="fp"))
  demo = write_run(tmp_path / "demo", "rt_demo", {"dev": {"accuracy": 61.25}}, model="student")
  with open(os.path.join(demo, "results.json")) as f:
    demo_results = json.load(f)
  with open(os.path.join(demo, "results.json"), "w") as f:
    json.dump({**demo_results, "dev_majority_rate": 56.9}, f)
  workdirs.append(demo)
  assert cli.main(["glue-report", "--workdirs", *workdirs]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[:4] == ["model", "MNLI-m", "MNLI-mm", "QQP"] and header[-2:] == ["avg (8, MNLI-m)", "avg (9, +MNLI-mm)"]
  row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
  eight = [70.0, 84.0, 82.0, 86.0, 23.0, 80.0, 76.0, 66.0]
  assert row["model"] == "bipft" and row["CoLA"] == "23.0" and row["STS-B"] == "80.0" and row["WNLI"] == "56.3"
  assert row["avg (8, MNLI-m)"] == f"{np.mean(eight):.1f}"
  assert row["avg (9, +MNLI-mm)"] == f"{np.mean(eight + [71.0]):.1f}"
  fp = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|"))))
  assert fp["model"] == "fp" and fp["RTE"] == "72.0" and fp["QQP"] == "-" and fp["avg (8, MNLI-m)"].startswith("n/a")
  assert len(lines) == 8 and lines[-1] == "| student | rt_demo | accuracy 61.2 | 56.9 |"  # non-GLUE tasks apart


@pytest.mark.parametrize("task_name,split,name,predicted,expected", [
    ("cola", "test", "CoLA.tsv", [1, 0], ["1", "0"]),
    ("sst2", "test", "SST-2.tsv", [0, 1], ["0", "1"]),
    ("mrpc", "test", "MRPC.tsv", [1, 1], ["1", "1"]),
    ("qqp", "test", "QQP.tsv", [0, 1], ["0", "1"]),
    ("stsb", "test", "STS-B.tsv", [5.7, -0.2], ["5.000", "0.000"]),  # clipped to the 0..5 scale
    ("mnli", "test_matched", "MNLI-m.tsv", [0, 2], ["entailment", "contradiction"]),
    ("mnli", "test_mismatched", "MNLI-mm.tsv", [1, 0], ["neutral", "entailment"]),
    ("qnli", "test", "QNLI.tsv", [0, 1], ["entailment", "not_entailment"]),
    ("rte", "test", "RTE.tsv", [1, 0], ["not_entailment", "entailment"]),
    ("wnli", "test", "WNLI.tsv", [1, 0], ["1", "0"]),
    ("ax", "test", "AX.tsv", [2, 1], ["contradiction", "neutral"]),
])
def test_leaderboard_files(tmp_path, task_name, split, name, predicted, expected):
  path = predictions.write_submission(str(tmp_path), tasks.get_task(task_name), split, ["0", "1"], predicted)
  assert os.path.basename(path) == name
  assert open(path).read() == "index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in enumerate(expected))


def test_runs_of_several_seeds_are_averaged_and_the_best_ones_predictions_submitted(tmp_path, capsys):
  # A later run of a model and task used to replace the earlier ones in the table and in the
  # leaderboard files, without a word.
  workdirs = [write_run(tmp_path / name, name, dev) for name, dev in DEV.items() if name != "rte"]
  seeds = [write_run(tmp_path / f"rte-seed{seed}", "rte", {"dev": {"accuracy": score}})
           for seed, score in ((1, 66.0), (2, 70.0), (3, 62.0))]
  for run, label in zip(seeds, (0, 1, 0)):
    predictions.write_submission(os.path.join(run, "submission"), tasks.get_task("rte"), "test", ["0"], [label])
  out = tmp_path / "out"
  argv = ["glue-report", "--submission_dir", str(out), "--workdirs", *workdirs, *seeds, seeds[0]]  # one twice
  assert cli.main(argv) == 0
  printed, said = capsys.readouterr()
  lines = printed.strip().splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  row = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
  assert row["RTE"] == "66.0 ± 4.0 (3)" and row["SST-2"] == "86.0"
  assert row["avg (8, MNLI-m)"] == f"{np.mean([70.0, 84.0, 82.0, 86.0, 23.0, 80.0, 76.0, 66.0]):.1f}"
  assert "is their mean ± standard deviation (the number of runs)" in printed
  assert (out / "RTE.tsv").read_text() == "index\tprediction\n0\tnot_entailment\n"  # seed 2's, dev 70.0
  assert f"rte's leaderboard files come from {seeds[1]}, the best dev score of its 3 runs" in said
  other = write_run(tmp_path / "fp-rte", "rte", {"dev": {"accuracy": 72.0}}, model="fp")
  written = {name: (out / name).read_bytes() for name in os.listdir(out)}
  assert cli.main([*argv, other, "--overwrite"]) == 2
  assert "--submission_dir takes the runs of one model, these are of 2 (bipft, fp)" in capsys.readouterr().err
  assert {name: (out / name).read_bytes() for name in os.listdir(out)} == written


def test_runs_of_one_model_and_task_with_the_same_seed_are_named(tmp_path, capsys):
  # Averaged without a word, as if their seeds differed (every run of `glue.sh --seeds 1,2,3 --
  # --config.seed=7` had seed 7): a spread of nothing presented as a spread over seeds.
  runs = [write_run(tmp_path / name, "rte", {"dev": {"accuracy": 66.0}}, seed=seed)
          for name, seed in (("rte-a", 7), ("rte-b", 3), ("rte-c", 7))]
  fp = write_run(tmp_path / "fp-rte", "rte", {"dev": {"accuracy": 72.0}}, model="fp", seed=7)  # another model
  assert cli.main(["glue-report", "--workdirs", *runs, fp]) == 0
  warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
  assert warnings == [f"bipft glue-report: warning: {runs[0]}, {runs[2]} are runs of bipft on rte with the same "
                      "seed, 7: the table's mean ± standard deviation over them is not a spread over seeds"]


def test_submission_collection_and_bad_workdirs(tmp_path, capsys):
  run = write_run(tmp_path / "rte", "rte", DEV["rte"])
  predictions.write_submission(os.path.join(run, "submission"), tasks.get_task("rte"), "test", ["0"], [0])
  assert cli.main(["glue-report", "--workdirs", run, "--submission_dir", str(tmp_path / "out")]) == 0
  assert os.listdir(tmp_path / "out") == ["RTE.tsv"]
  assert "missing: AX.tsv, CoLA.tsv" in capsys.readouterr().out
  with pytest.raises(UserError, match="has no GLUE leaderboard file"):
    predictions.write_submission(str(tmp_path), tasks.get_task("rte"), "dev", ["0"], [0])
  assert cli.main(["glue-report", "--workdirs", str(tmp_path / "nothing")]) == 2
  assert "has no results.json" in capsys.readouterr().err
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / "results.json").write_text("{not json")
  assert cli.main(["glue-report", "--workdirs", str(tmp_path / "bad")]) == 2
  write_run(tmp_path / "no_dev", "rte", {})  # no score to pick the best of several runs by
  assert cli.main(["glue-report", "--workdirs", str(tmp_path / "no_dev")]) == 2
  assert "dev must map each dev split to its scores" in capsys.readouterr().err


def write_custom_run(workdir, dev, train_file, majority=None, seed=42):
  """A custom task's run: results.json, its best/ checkpoint (recording the run's config) and its
  test predictions."""
  workdir = write_run(workdir, "custom", dev)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump({**results, "seed": seed, **({"dev_majority_rate": majority} if majority else {})}, f)
  config = model_lib.BertConfig(vocab_size=8, hidden_size=4, num_layers=1, num_heads=1, intermediate_size=4,
                                max_position_embeddings=8)
  checkpointing.save_params(os.path.join(workdir, "best"), {"w": np.zeros(2, np.float32)}, config, "classification",
                            run_config={"task": "custom", "data": {"train_file": train_file}})
  predictions.write_submission(os.path.join(workdir, "submission"), tasks.custom_task("neg,pos", 1), "test",
                               ["0"], [1])
  return workdir


def test_custom_runs_are_averaged_per_training_file_and_have_no_leaderboard_files(tmp_path, capsys):
  # Each custom run used to be a row of its own named `custom`, whatever its data; --submission_dir
  # named the last run given as the best of its task and listed every GLUE file as missing.
  seeds = [write_custom_run(tmp_path / f"ft_s{seed}", {"dev": {"accuracy": score, "f1": score - 10}}, "sent/train.csv",
                            majority=50.0, seed=seed) for seed, score in ((1, 60.0), (2, 70.0), (3, 65.0))]
  scores = write_custom_run(tmp_path / "scores", {"dev": {"pearson_spearman": 40.0}}, "scores/train.jsonl")
  out = tmp_path / "out"
  assert cli.main(["glue-report", "--workdirs", *seeds, scores, "--submission_dir", str(out)]) == 0
  printed, said = capsys.readouterr()
  assert printed.strip().splitlines()[2:4] == [
      "| bipft | custom (sent/train.csv) | accuracy 65.0 ± 5.0 (3), f1 55.0 ± 5.0 (3) | 50.0 |",
      "| bipft | custom (scores/train.jsonl) | pearson_spearman 40.0 | - |"]
  assert "is their mean ± standard deviation (the number of runs)" in printed
  assert "leaderboard" not in printed and "come from" not in said
  assert "bipft: custom runs have no GLUE leaderboard files" in said
  assert not out.exists() or not os.listdir(out)
  # The files come from the GLUE runs alone: one model's, whatever model the custom runs are of.
  rte = write_run(tmp_path / "rte", "rte", DEV["rte"], model="fp")
  predictions.write_submission(os.path.join(rte, "submission"), tasks.get_task("rte"), "test", ["0"], [0])
  assert cli.main(["glue-report", "--workdirs", *seeds, rte, "--submission_dir", str(out)]) == 0
  assert os.listdir(out) == ["RTE.tsv"] and "wrote 1 leaderboard files" in capsys.readouterr().out
