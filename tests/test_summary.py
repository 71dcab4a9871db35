"""`bipft summary`: the paper's ratios for BERT-base, hand-checked counts for a tiny model, the CLI."""
import dataclasses
import json
import pathlib

import jax
import pytest

from bipft_jax import cli, config_loading, model, model_params, summary

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE = "configs/model.py:base"

TINY = model.BertConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2, intermediate_size=8,
                        max_position_embeddings=6, type_vocab_size=2, num_labels=2, binary=True,
                        estimator_rank=1)


def _run_cli(args, capsys, monkeypatch):
  monkeypatch.chdir(REPO)
  code = cli.main(["summary", *args])
  out = capsys.readouterr()
  return code, out.out, out.err


@pytest.fixture(scope="module")
def base():
  config = summary.load_model_config(str(REPO / BASE), [])
  return summary.summarize(config, seq_len=128)


def test_bert_base_reproduces_the_papers_accounting(base):
  assert base["binary"] and base["estimator_rank"] == 1  # configs/model.py:base is the FP teacher
  assert 56 * 0.95 <= base["ops_ratio"] <= 56 * 1.05, base["ops_ratio"]
  assert 28 * 0.95 <= base["memory_ratio"] <= 28 * 1.05, base["memory_ratio"]
  assert abs(base["fp_ops"] / 22.5e9 - 1) < 0.01  # the paper's 22.5 G
  assert 0.35e9 < base["binary_ops"] < 0.45e9     # "about 0.4 G"
  assert abs(base["fp_memory_bytes"] / 2 ** 20 - 418) < 1  # the paper's 418 MB
  # Counting everything the binary model adds can only make it look worse.
  assert base["honest_ops_ratio"] < base["ops_ratio"] and base["honest_memory_ratio"] < base["memory_ratio"]
  assert base["honest_ops_ratio"] > 40 and base["honest_memory_ratio"] > 24


def test_counts_follow_the_parameter_tree(base):
  config = dataclasses.replace(summary.load_model_config(str(REPO / BASE), []), binary=True)
  params = jax.eval_shape(lambda: model_params.init_params(model.build(config, "classification"), jax.random.key(0)))
  assert base["binary_params"] + base["fp_params"] == sum(x.size for x in jax.tree.leaves(params))
  assert base["binary_params"] == 30522 * 768 + 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768 * 768
  assert base["fp_model_params"] == 109_482_240 + 768 * 2 + 2  # BERT-base + a 2-way classifier


def test_tiny_model_counted_by_hand():
  rows = {r.name: r for r in summary.count_rows(TINY, seq_len=3)}
  assert list(rows) == ["embeddings", "encoder/layer/0/attention/self", "encoder/layer/0/attention/output",
                        "encoder/layer/0/intermediate", "encoder/layer/0/output", "pooler", "classifier"]
  # D=4, H=2, F=8, V=10, L=3 tokens, rank 1, 2 labels.
  # 1-bit: word embedding 10x4, Q/K/V/O 4x4 each, FFN 4x8 and 8x4, pooler 4x4.
  assert sum(r.binary_params for r in rows.values()) == 40 + 4 * 16 + 2 * 32 + 16
  # fp32 as in BERT: position 6x4, type 2x4, 3 LayerNorms of 2x4; biases 4*4 + 8 + 4 (layer) + 4 (pooler);
  # classifier 4x2 + 2.
  assert sum(r.fp_params for r in rows.values()) == 24 + 8 + 24 + 28 + 4 + 10
  # BiPFT's own: move biases (Q, K, V, O, FFN in: 4 each; FFN out 8; pooler 4), 11 alphas,
  # 5 estimators 4x1 + 1, the pooler's LayerNorm 2x4.
  assert sum(r.extra_fp_params for r in rows.values()) == 32 + 11 + 25 + 8
  # Packed: one uint32 word per row of <= 32 inputs: 10 + 4 * 4 + 8 + 4 + 4 rows; 10 + 7 fp32 scales.
  assert sum(r.packed_bytes for r in rows.values()) == 4 * (10 + 16 + 8 + 4 + 4)
  assert summary.packed_size_bytes(TINY) == 168 + 4 * ((24 + 8 + 24 + 28 + 4 + 10) + 76 + 17)

  attention = rows["encoder/layer/0/attention/self"]
  assert attention.binary_macs == 3 * 3 * 4 * 4 + 2 * 3 * 3 * 4        # Q, K, V; QK^T and PV
  assert attention.base_flops == 3 * 3 * 4 + 3 * 2 * 3 * 3              # Q/K/V biases; scale, mask, softmax
  assert attention.scale_flops == 3 * 3 * 4 + 3 * 4                     # Q/K/V and PV outputs
  assert attention.extra_fp_macs == 5 * 3 * 4 + 3 * 3 * 3 + 2 * 3 * 3   # projections; score terms; P v_p
  assert attention.extra_flops == (6 * 3 * 4 + 3 * 3 * 4 + 2 * 3 * 3     # move+binarize inputs; Q/K/V; P
                                   + 5 * 3 + 2 * 9 + 2 * 9 + 3 * 4)      # estimator biases and adds
  assert rows["encoder/layer/0/output"].base_flops == 3 * 4 + 3 * 4 + 5 * 3 * 4  # bias, residual, LayerNorm
  assert rows["pooler"].binary_macs == 16 and rows["pooler"].extra_flops == 2 * 4 + 5 * 4 + 4

  s = summary.summarize(TINY, seq_len=3)
  fp_ops = 2 * (216 + 48 + 96 + 96 + 16) + (84 + 90 + 84 + 48 + 84 + 8)  # matmuls + BERT's elementwise ops
  binary_ops = (96 + (432 / 64 + 90 + 48) + (96 / 64 + 84 + 12) + (192 / 64 + 48 + 24)
                + (192 / 64 + 84 + 12) + (32 / 64 + 8 + 4))
  assert s["fp_ops"] == fp_ops and s["binary_ops"] == binary_ops
  assert s["honest_fp_ops"] == fp_ops + 2 * 8 + 2
  assert s["honest_binary_ops"] == binary_ops + (72 + 54 + 2 * 105 + 15 + 48) + 24 + 24 + 48 + 32 + 18
  assert s["fp_memory_bytes"] == 4 * 272 and s["binary_memory_bytes"] == 184 / 8 + 4 * 88
  assert s["packed_bytes"] == summary.packed_size_bytes(TINY)


def test_bipft_a_and_fp_configs():
  a = summary.summarize(dataclasses.replace(TINY, estimator_rank=0), seq_len=3)
  b = summary.summarize(TINY, seq_len=3)
  assert a["fp_params"] == b["fp_params"] - 25 and a["honest_binary_ops"] < b["honest_binary_ops"]
  assert a["binary_ops"] == b["binary_ops"]  # the paper's way leaves the estimators out
  # A full-precision config is summarised as its 1-bit student.
  assert summary.summarize(dataclasses.replace(TINY, binary=False), seq_len=3) == b
  # Mean pooling adds the mean over L=3 tokens of D=4 to both models.
  mean = summary.summarize(dataclasses.replace(TINY, pooling="mean"), seq_len=3)
  assert (mean["fp_ops"], mean["binary_ops"]) == (b["fp_ops"] + 12, b["binary_ops"] + 12)


def test_pretraining_head_keeps_the_latent_embedding():
  with_mlm = summary.packed_size_bytes(TINY, head="pretraining")
  encoder = summary.packed_size_bytes(TINY, head="encoder")
  # transform 4x4 + 4, LayerNorm 8, decoder bias 10, NSP 4x2 + 2, and the FP 10x4 table for the decoder.
  assert with_mlm - encoder == 4 * (20 + 8 + 10 + 10 + 40)


def test_cli_table_and_json(capsys, monkeypatch):
  code, out, _ = _run_cli(["--config", BASE, "--seq-len", "128", "--json"], capsys, monkeypatch)
  assert code == 0
  lines = out.strip().splitlines()
  result = json.loads(lines[-1])
  for key in ("ops_ratio", "memory_ratio", "honest_ops_ratio", "honest_memory_ratio", "packed_bytes"):
    assert key in result
  assert "encoder/layer/11/output" in out and "paper's accounting" in out and "honest" in out
  config = summary.load_model_config(BASE, [])
  assert result["packed_bytes"] == summary.packed_size_bytes(config)
  assert result["packed_fp16_bytes"] == summary.packed_size_bytes(config, remainder="float16")
  # fp16 halves every remainder parameter except the activation scales: per layer the inputs of
  # Q, K, V, O, FFN in and out, Q, K, V themselves and the attention probabilities; the pooler's input.
  alphas = 10 * config.num_layers + 1
  assert result["packed_bytes"] - result["packed_fp16_bytes"] == 2 * (result["fp_params"] - alphas)


def test_cli_overrides_change_the_count(capsys, monkeypatch):
  code, out, _ = _run_cli(["--config", "configs/model.py:tiny,binary", "--config.num_layers=1", "--seq-len", "16",
                           "--json"], capsys, monkeypatch)
  assert code == 0
  rows = [r["name"] for r in json.loads(out.strip().splitlines()[-1])["rows"]]
  assert "encoder/layer/0/output" in rows and "encoder/layer/1/output" not in rows


def test_a_binarizer_export_packed_refuses_has_no_packed_size(capsys, monkeypatch):
  """The memory line gave FDA a packed export's size, though export-packed refuses it."""
  code, out, _ = _run_cli(["--config", "configs/model.py:tiny,binary", "--config.linear_binarizer=fda", "--json"],
                          capsys, monkeypatch)
  assert code == 0
  assert json.loads(out.strip().splitlines()[-1])["not_packed"] == (
      "linear binarizer 'fda' does not pack: its inference weight is not scaled sign planes")
  assert "no packed export (linear binarizer 'fda' does not pack" in out and "packed export 2" not in out
  code, out, _ = _run_cli(["--config", "configs/model.py:tiny,binary", "--json"], capsys, monkeypatch)
  assert json.loads(out.strip().splitlines()[-1])["not_packed"] == "" and "  packed export " in out


def test_cli_takes_a_pretraining_configs_student(capsys, monkeypatch):
  """The student a pretraining config trains is summarised as its model section, overrides included."""
  pretraining = ["--config", "configs/pretrain.py:tiny", "--config.model.num_layers=1", "--seq-len", "16", "--json"]
  code, out, _ = _run_cli(pretraining, capsys, monkeypatch)
  assert code == 0
  from_pretraining = json.loads(out.strip().splitlines()[-1])
  fields = [f"--config.{k}={v}" for k, v in config_loading.load_config("configs/pretrain.py:tiny").model.items()]
  code, out, _ = _run_cli(["--config", "configs/model.py:tiny", *fields, "--config.num_layers=1", "--seq-len", "16",
                           "--json"], capsys, monkeypatch)
  assert code == 0 and json.loads(out.strip().splitlines()[-1]) == from_pretraining
  assert [r["name"] for r in from_pretraining["rows"]].count("encoder/layer/0/output") == 1


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/missing.py"], "does not exist"),
    (["--config", "configs/glue.py:task=rte"], "is a GLUE config (configs/glue.py:task=NAME); this command takes a "
     "model config (configs/model.py:SIZE) or a pretraining config (configs/pretrain.py)"),
    (["--config", "configs/model.py:gigantic"], "unknown model size"),
    (["--config", BASE, "--config.hidden_size=100"], "not a multiple of num_heads"),
    (["--config", BASE, "--seq-len", "0"], "--seq-len 0"),
    (["--config", BASE, "--seq-len", "513"], "--seq-len 513"),
])
def test_cli_bad_input_exits_2(args, message, capsys, monkeypatch):
  code, out, err = _run_cli(args, capsys, monkeypatch)
  assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_cli_config_with_unknown_field(tmp_path, capsys, monkeypatch):
  bad = tmp_path / "bad.py"
  bad.write_text("import ml_collections\n"
                 "def get_config(arg=None):\n"
                 "  return ml_collections.ConfigDict({'hidden_size': 8, 'num_heads': 2, 'dropout_rate': 0.1})\n")
  code, _, err = _run_cli(["--config", str(bad)], capsys, monkeypatch)
  assert code == 2 and "dropout_rate" in err
