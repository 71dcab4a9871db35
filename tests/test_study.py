"""`bipft study` end to end on a micro grid (a tiny random teacher, two methods, one task, one seed):
the cells, the tables and plots, a rerun that skips finished cells; bad study configs."""
import json
import os
import shutil
import signal

import pytest
import torch
import transformers

from bipft_jax import cli, config_loading, study, study_results
from bipft_jax.errors import Stopped, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "study.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """A random BERT with heads, configs/model.py's tiny shape with one layer, a 128-token vocab."""
  folder = tmp_path_factory.mktemp("teacher")
  words = "the a of and to is was it this that film movie good bad story not but very with".split()
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
  vocab += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
  vocab += [f"w{i}" for i in range(128 - len(vocab))]
  (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=128, hidden_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=512, max_position_embeddings=512)
  transformers.BertForPreTraining(config).save_pretrained(str(folder))
  return folder


def _study(workdir, teacher, *extra) -> int:
  return cli.main(["study", "--config", f"{CONFIG}:micro", "--workdir", str(workdir),
                   f"--config.teacher={teacher}", *extra])


def test_micro_study_writes_tables_and_plots_and_a_rerun_skips_finished_cells(tiny_teacher, tmp_path, capsys):
  workdir = tmp_path / "study"
  assert _study(workdir, tiny_teacher) == 0
  out = capsys.readouterr().out
  assert "[1/3] pretrain bipft_b" in out and "[3/3] finetune rt bipft_b_kd lr 0.001 seed 42" in out
  results = json.loads((workdir / "results.json").read_text())
  kinds = sorted((c["kind"], c.get("method", c.get("variant"))) for c in results["cells"])
  assert kinds == [("finetune", "bipft_b_kd"), ("finetune", "fp"), ("pretrain", "bipft_b")]
  for method in ("fp", "bipft_b_kd"):
    cell = results["table"]["rt"][method]
    assert cell["n"] == 1 and 0 <= cell["mean"] <= 100
    finetuned = json.loads((workdir / "finetune/rt" / method / "lr0.001/seed42/results.json").read_text())
    assert cell["mean"] == finetuned["dev"]["dev"]["accuracy"]
    assert [s for s, _ in results["curves"]["rt"][method]] == [2, 4]  # 16 examples, batch 8, 2 epochs
  kd_metrics = (workdir / "finetune/rt/bipft_b_kd/lr0.001/seed42/metrics.jsonl").read_text()
  assert "logit_distill_loss" in kd_metrics  # distilled from the FP cell
  assert results["pretraining"]["bipft_b"]["steps"] == 3
  evaluated = [json.loads(line) for line in (workdir / "pretrain/bipft_b/metrics.jsonl").read_text().splitlines()
               if "eval_rep_dist_loss" in line]
  held_out = results["pretraining"]["bipft_b"]["held_out_mse"]
  assert held_out == evaluated[-1]["eval_rep_dist_loss"] and f"(held out {held_out:.3f})" in out
  dev_labels = [json.loads(line)["label"] for line in (workdir / "data/rt/dev.jsonl").read_text().splitlines()]
  assert len(dev_labels) == 64  # config.dev_examples
  largest = 100 * max(dev_labels.count(label) for label in set(dev_labels)) / 64
  assert results["dev_largest_class"] == {"rt": largest}
  assert f"| (dev's largest class, always) | {largest:.1f} | |" in (workdir / "results.md").read_text()
  markdown = (workdir / "results.md").read_text()
  assert "| FP teacher |" in markdown and "| BiPFT-B + KD |" in markdown and "majority class" in markdown
  for name in ("accuracy_by_task.png", "accuracy_vs_steps.png"):
    assert (workdir / name).read_bytes()[:8] == PNG_MAGIC
  assert not (workdir / "accuracy_vs_learning_rate.png").exists()  # micro has no sweep

  # A rerun skips every finished cell; a cell whose command ended but whose record was lost (an
  # interruption between the two) is recorded again without rerunning the command.
  fp_cell = workdir / "finetune/rt/fp/lr0.001/seed42"
  (fp_cell / "cell.json").unlink()
  stamp = os.path.getmtime(fp_cell / "results.json")
  assert _study(workdir, tiny_teacher) == 0
  out = capsys.readouterr().out
  assert "3 cells, 2 finished earlier" in out and "[2/3] finetune rt fp" in out and "[1/3]" not in out
  assert os.path.getmtime(fp_cell / "results.json") == stamp
  assert json.loads((workdir / "results.json").read_text())["table"] == results["table"]

  assert cli.main(["glue-report", "--workdirs", str(workdir)]) == 0
  report = capsys.readouterr().out
  assert "| BiPFT-B + KD |" in report and f"| (dev's largest class, always) | {largest:.1f} | |" in report

  # Another recipe in the same workdir is refused before anything runs; another grid is not.
  before = (workdir / "results.json").read_bytes()
  assert _study(workdir, tiny_teacher, "--config.finetune.overrides.epochs=3") == 2
  assert "holds a study run with another config.finetune" in capsys.readouterr().err
  assert (workdir / "results.json").read_bytes() == before
  assert _study(workdir, tiny_teacher, "--config.methods=fp") == 0
  assert "1 cells, 1 finished earlier" in capsys.readouterr().out


@pytest.mark.parametrize("override,message", [
    ("--config.methods=fp,bogus", "config.methods: unknown bogus"),
    ("--config.methods=binary_kd", "distil from the FP cells; add fp"),
    ("--config.tasks=nope", "config.tasks: unknown nope"),
    ("--config.seeds=1,x", "config.seeds must be comma-separated numbers"),
    ("--config.sweep.task=elsewhere", "config.sweep.task 'elsewhere' is not one of config.tasks"),
    ("--config.dev_examples=-1", "config.dev_examples must be a whole number >= 0"),
])
def test_bad_study_config_is_one_error_line(tiny_teacher, tmp_path, capsys, override, message):
  assert _study(tmp_path / "study", tiny_teacher, override) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("bipft study: error: ") and message in err[0], err
  assert not (tmp_path / "study").exists()


@pytest.mark.parametrize("code", [143, 130])
def test_a_cell_a_signal_stopped_is_not_recorded_and_stops_the_study(tiny_teacher, tmp_path, monkeypatch, capsys,
                                                                     code):
  # A SIGTERM or Ctrl-C makes pretrain and finetune save and exit 143 or 130 before their end: the study must
  # not take that cell as finished (its cell.json would mark a short pretraining as done) and stops with
  # that code.
  from bipft_jax import study

  def stopped_early(argv):  # what a stopped pretraining leaves: a checkpoint before its last step
    os.makedirs(os.path.join(argv[argv.index("--workdir") + 1], "2"))
    raise Stopped(code)  # what runs.run_command raises for its exit code (test_track: the whole chain)
  monkeypatch.setattr(study, "run_command", stopped_early)
  assert _study(tmp_path / "study", tiny_teacher) == code
  out = capsys.readouterr().out
  what = {143: "SIGTERM", 130: "Ctrl-C"}[code]
  assert f"{what}: stopped during pretrain/bipft_b (not recorded); rerun the same command to resume" in out
  assert not (tmp_path / "study/pretrain/bipft_b/cell.json").exists()
  assert not (tmp_path / "study/finetune").exists()  # no later cell ran


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_sigterm_or_hangup_outside_a_training_loop_lets_the_cell_finish_then_stops_the_study(
    tiny_teacher, tmp_path, monkeypatch, capsys, signum):
  def fail(*_):
    raise AssertionError("the signal reached the handler the study was given, not the study's")

  def cell_then_signal(config, cell, workdir):  # a signal landing between a cell's steps and its record
    os.kill(os.getpid(), signum)
    return {"mlm_accuracy": 0.1, "hidden_mse": 0.2, "steps": 3, "seconds": 1.0}
  monkeypatch.setattr(study, "run_cell", cell_then_signal)
  previous = signal.signal(signum, fail)
  try:
    assert _study(tmp_path / "study", tiny_teacher) == 128 + signum
    assert signal.getsignal(signum) is fail  # given back after the study
  finally:
    signal.signal(signum, previous)
  out = capsys.readouterr().out
  assert f"{signum.name}: stopped after pretrain/bipft_b (recorded); rerun the same command to resume" in out
  record = json.loads((tmp_path / "study/pretrain/bipft_b/cell.json").read_text())
  assert record["mlm_accuracy"] == 0.1 and (tmp_path / "study/results.json").exists()
  assert not (tmp_path / "study/finetune").exists()  # no later cell ran


def test_differences_carry_a_standard_error_only_where_both_cells_have_seeds():
  header = {"config": "x", "host": "h", "date": "d", "learning_rate": 1e-4, "sweep_task": "",
            "methods": {"binary": "task-specific binary", "bipft_a": "BiPFT-A", "bipft_b": "BiPFT-B"},
            "tasks": {"rt": "", "trec": ""}}
  scores = {("rt", "binary"): [50.0, 54.0], ("rt", "bipft_a"): [60.0, 66.0, 63.0], ("rt", "bipft_b"): [70.0],
            ("trec", "binary"): [20.0], ("trec", "bipft_a"): [30.0]}
  records = [{"kind": "finetune", "task": t, "method": m, "learning_rate": 1e-4, "seed": i, "score": s,
              "majority": 10.0, "curve": [[8, s]], "seconds": 1.0}
             for (t, m), values in scores.items() for i, s in enumerate(values)]
  results = study_results.summarize(header, records)
  a_vs_binary = results["differences"][0]
  assert a_vs_binary["label"].startswith("BiPFT-A - task-specific")
  assert a_vs_binary["per_task"]["rt"]["mean"] == pytest.approx(63.0 - 52.0)
  # std 2.828 over 2 seeds, 3.0 over 3: sqrt(8/2 + 9/3)
  assert a_vs_binary["per_task"]["rt"]["stderr"] == pytest.approx(7 ** 0.5)
  assert a_vs_binary["per_task"]["trec"]["stderr"] is None  # one seed each: no spread measured
  assert a_vs_binary["average"] == pytest.approx((11.0 + 10.0) / 2)
  b_vs_a = results["differences"][1]
  assert b_vs_a["per_task"] == {"rt": {"mean": pytest.approx(7.0), "stderr": None}}
  markdown = study_results.markdown(results)
  assert "| BiPFT-A - task-specific (binary pretraining) | +11.0 ± 2.6 | +10.0 | +10.5 |" in markdown
  assert "| BiPFT-A | 63.0 ± 3.0 | 30.0 | 46.5 |" in markdown


def test_a_recipe_resumes_from_another_clone_of_the_same_configs_and_not_from_edited_ones(tmp_path):
  config = config_loading.load_config(f"{CONFIG}:full")
  workdir = tmp_path / "study"
  workdir.mkdir()
  study.check_recipe(config, str(workdir))  # the first run records it
  recorded = json.loads((workdir / "recipe.json").read_text())
  assert recorded["pretrain"]["config"] == os.path.join(ROOT, "configs", "pretrain.py:demo")
  # The same study started from a clone elsewhere: its configs are byte for byte ours.
  clone = tmp_path / "elsewhere" / "configs"
  shutil.copytree(os.path.join(ROOT, "configs"), clone)
  moved = {**recorded, "pretrain": {**recorded["pretrain"], "config": f"{clone}/pretrain.py:demo"},
           "finetune": {**recorded["finetune"], "config": f"{clone}/glue.py:task=custom"}}
  del moved["dev_examples"]  # a recipe from before the field: whole dev sets
  (workdir / "recipe.json").write_text(json.dumps(moved))
  study.check_recipe(config, str(workdir))
  (clone / "pretrain.py").write_text((clone / "pretrain.py").read_text() + "\n# edited\n")
  with pytest.raises(UserError, match="another config.pretrain"):
    study.check_recipe(config, str(workdir))
  (workdir / "recipe.json").write_text("[1, 2]")
  with pytest.raises(UserError, match="is not a study recipe file"):
    study.check_recipe(config, str(workdir))
