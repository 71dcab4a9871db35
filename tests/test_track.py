"""`bipft track`: the whole track on the tiny config, its table, and a rerun that skips finished rows."""
import json
import os
import signal

import pytest

import glue_fixtures
from bipft_jax import cli, config_loading, distributed, policy, summary, track
from bipft_jax import model as model_lib
from test_train import REPO, files  # noqa: F401 (files is a fixture)

CONFIG = os.path.join(REPO, "configs", "track.py")


def _track_args(files, glue_dir, workdir, rows="bipft,dbllm_fdb"):  # noqa: F811
  return ["track", "--config", f"{CONFIG}:tiny", "--workdir", str(workdir), f"--config.rows={rows}",
          f"--config.pretrain.overrides.data.paths={files['corpus']}",
          f"--config.pretrain.overrides.data.eval_paths={files['corpus']}",
          f"--config.pretrain.overrides.tokenizer={files['vocab']}",
          f"--config.finetune.overrides.data.path={glue_dir}",
          f"--config.finetune.overrides.data.tokenizer={files['vocab']}"]


def _summary(linear):
  config = config_loading.load_config(f"{REPO}/configs/model.py:tiny,binary", [f"linear_binarizer={linear}"])
  return summary.summarize(model_lib.BertConfig.from_dict(config.to_dict()), 32)


def test_track_runs_every_row_writes_the_table_and_skips_finished_rows(files, tmp_path, capsys,  # noqa: F811
                                                                      monkeypatch):
  glue_dir = glue_fixtures.write_glue(tmp_path / "glue_data", n=8)
  workdir = tmp_path / "track"
  args = _track_args(files, glue_dir, workdir)
  # A SIGTERM at step 2 of the first row's 3 pretraining steps: the step is saved, the pretraining exits
  # 143 and the track stops with it, the row unsaved (it finetuned a 2-step pretraining and saved the row
  # as done, which every rerun then skipped, when a stopped run exited 0).
  monkeypatch.setattr(distributed.StopSignals, "stop_at", lambda self, step: signal.SIGTERM if step == 2 else None)
  assert cli.main(args) == 143
  out = capsys.readouterr().out
  assert "bipft track: SIGTERM: stopped during row bipft (not recorded); rerun the same command to resume" in out
  assert json.loads((workdir / "track.json").read_text())["rows"] == []
  assert not (workdir / "bipft" / "row.json").exists() and not (workdir / "bipft" / "finetune").exists()
  monkeypatch.undo()
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "from step 2" in out  # the row's pretraining resumed
  table = json.loads((workdir / "track.json").read_text())
  packs, refused = table["rows"]
  assert [r["row"] for r in table["rows"]] == ["bipft", "dbllm_fdb"]
  for row in table["rows"]:
    assert 0 <= row["dev_score"] <= 100 and row["dev_metric"] == "accuracy"
    assert row["finetune_steps"] == 2 and row["train_tokens_per_second"] > 0 and row["hidden_mse"] > 0
    evaluated = [json.loads(line) for line in open(workdir / row["row"] / "pretrain" / "metrics.jsonl")
                 if "eval_rep_dist_loss" in line]
    assert row["held_out_mse"] == evaluated[-1]["eval_rep_dist_loss"]  # the final held-out evaluation's
    expected = _summary(row["linear"])  # the summary command's numbers for the row's binarizer
    assert row["ops_ratio"] == pytest.approx(expected["ops_ratio"])
    assert row["memory_ratio"] == pytest.approx(expected["memory_ratio"])
    assert row == json.loads((workdir / row["row"] / "row.json").read_text())
  # The packable row's packed file is the finetuned classifier (same logits) and its size is predicted.
  assert packs["packed_file_bytes"] == os.path.getsize(workdir / "bipft" / "model.bipft.safetensors")
  assert packs["packed_max_logit_difference"] < 1e-4 and packs["packed_ms"] > 0
  assert packs["packed_dev_score"] == packs["dev_score"]  # the file, run 1-bit by `bipft evaluate`
  assert "packed_dev_score" not in refused
  assert refused["packed"].startswith("refused: linear binarizer 'dbllm_fdb' does not pack")
  assert not (workdir / "dbllm_fdb" / "model.bipft.safetensors").exists()
  markdown = (workdir / "track.md").read_text()
  assert markdown.count("\n| bipft | bipft | elastic |") == 1 and "| dbllm_fdb | dbllm_fdb |" in markdown
  assert f"| {packs['hidden_mse']:.3f} | {packs['held_out_mse']:.3f} |" in markdown
  older = {k: v for k, v in packs.items() if k != "held_out_mse"}  # a row recorded before 2026-12-04
  assert f"| {packs['hidden_mse']:.3f} |  | {packs['ops_ratio']:.1f}x |" in track.format_table([older])
  assert markdown.split("\n\n", 1)[1] in out  # the same table printed

  # A rerun skips finished rows; a row without row.json (interrupted after its finetuning) is
  # completed from its files, without training again.
  metrics = (workdir / "dbllm_fdb" / "pretrain" / "metrics.jsonl").read_text()
  os.remove(workdir / "dbllm_fdb" / "row.json")
  assert cli.main(args) == 0
  out = capsys.readouterr().out
  assert "bipft: finished earlier, skipped" in out and "dbllm_fdb: finished earlier" not in out
  again = json.loads((workdir / "track.json").read_text())["rows"]
  assert again[0] == packs
  assert {k: v for k, v in again[1].items() if k != "row_seconds"} == {
      k: v for k, v in refused.items() if k != "row_seconds"}
  trained = lambda text: [r for r in map(json.loads, text.splitlines()) if "total_loss" in r]
  assert trained((workdir / "dbllm_fdb" / "pretrain" / "metrics.jsonl").read_text()) == trained(metrics)


def test_an_unknown_row_is_one_error_line_before_any_work(files, tmp_path, capsys):  # noqa: F811
  workdir = tmp_path / "track"
  assert cli.main(_track_args(files, tmp_path, workdir, rows="bipft,xnr+bivit")) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line]
  assert err == ["bipft track: error: row 'xnr+bivit': unknown linear binarizer 'xnr'; choose one of "
                 + ", ".join(policy.LINEAR_BINARIZERS)]
  assert not workdir.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_sigterm_or_hangup_between_commands_lets_the_row_end_then_stops_the_track(  # noqa: F811
    files, tmp_path, monkeypatch, capsys, signum):
  from bipft_jax import track

  def row_then_signal(config, row_dir, linear, probs):  # a signal landing outside any training loop
    os.kill(os.getpid(), signum)
    return {"error": "finetune: a failure of the row's own"}
  monkeypatch.setattr(track, "run_row", row_then_signal)
  workdir = tmp_path / "track"
  assert cli.main(_track_args(files, tmp_path, workdir)) == 128 + signum
  out = capsys.readouterr().out
  assert f"bipft track: {signum.name}: stopped after row bipft; rerun the same command to resume" in out
  assert [r["row"] for r in json.loads((workdir / "track.json").read_text())["rows"]] == ["bipft"]  # not dbllm_fdb
