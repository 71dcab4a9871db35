"""`bipft eval-pytorch`: the PyTorch export predicts what the JAX evaluation predicts, on a GLUE dev set."""
import dataclasses
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipft_jax import checkpointing, cli, convert, config_loading, eval_pytorch
from bipft_jax import model as model_lib
from bipft_jax.glue import predictions, splits, tasks
from bipft_jax.glue import metrics as metrics_lib
from test_convert import assert_one_error_line, padded_two_segment_batch, realistic_params, tiny_config

GLUE_CONFIG = str(pathlib.Path(__file__).resolve().parents[1] / "configs" / "glue.py")
WORDS = [f"w{i}" for i in range(90)]


def write_vocab(directory: pathlib.Path) -> int:
  directory.mkdir(parents=True, exist_ok=True)
  vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
  (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
  return len(vocab)


def write_sst2_dev(root: pathlib.Path, n: int = 400) -> pathlib.Path:
  """glue_data/SST-2/dev.tsv with random sentences of 3-40 words (several length buckets)."""
  rng = np.random.default_rng(1)
  rows = ["sentence\tlabel"]
  for _ in range(n):
    words = rng.choice(WORDS, rng.integers(3, 41))
    rows.append(f"{' '.join(words)}\t{rng.integers(0, 2)}")
  (root / "SST-2").mkdir(parents=True)
  (root / "SST-2" / "dev.tsv").write_text("\n".join(rows) + "\n")
  return root


@pytest.fixture(scope="module")
def exported_classifier(tmp_path_factory):
  """(JAX config, params, export folder) of a binary 2-class model whose checkpoint has a tokenizer."""
  root = tmp_path_factory.mktemp("eval")
  vocab_size = write_vocab(root / "ckpt")  # a workdir keeps its tokenizer beside the steps
  config = tiny_config(vocab_size=vocab_size, num_labels=2, max_position_embeddings=64)
  params = realistic_params(config, "classification", padded_two_segment_batch(vocab_size))
  # A random head at init scale predicts one class for every input; a unit-scale one does not.
  classifier = params["classifier"]
  classifier["kernel"] = jax.random.normal(jax.random.key(7), classifier["kernel"].shape)
  classifier["bias"] = jnp.zeros_like(classifier["bias"])
  checkpointing.save_params(str(root / "ckpt"), params, config, "classification")
  convert.to_pytorch(str(root / "ckpt"), str(root / "export"))
  return config, params, root / "export"


@pytest.mark.parametrize("precision", ["", "mixed"])  # empty: the export's own (fp32)
def test_eval_pytorch_agrees_with_the_jax_evaluation(tmp_path, capsys, exported_classifier, precision, monkeypatch):
  config, params, export = exported_classifier
  config = dataclasses.replace(config, precision=precision or config.precision)
  data_root = write_sst2_dev(tmp_path / "glue_data")
  overrides = [f"data.path={data_root}", "max_length=48", "eval_batch_size=32", f"precision={precision}"]
  loaded = []
  real_load = eval_pytorch.load_classifier
  monkeypatch.setattr(eval_pytorch, "load_classifier", lambda *args: loaded.append(real_load(*args)) or loaded[-1])
  code = cli.main(["eval-pytorch", "--model", str(export), "--config", f"{GLUE_CONFIG}:task=sst2",
                   "--predictions", str(tmp_path / "predictions.json")] + [f"--config.{o}" for o in overrides])
  out = capsys.readouterr().out
  assert code == 0
  assert loaded[0].classifier.precision == config.precision  # what the model's layers compute in
  torch_predictions = np.array(json.loads((tmp_path / "predictions.json").read_text())["dev"]["predictions"])

  # The JAX evaluation of the finetuning run, on the same checkpoint and data.
  glue = config_loading.load_config(f"{GLUE_CONFIG}:task=sst2", overrides)
  task = tasks.get_task("sst2")
  tokenizer = splits.load_tokenizer(glue, str(export), config)
  dev = tasks.encode(tokenizer, tasks.read_splits(task, glue.data, ("dev",))["dev"], glue.max_length)
  predict_step = predictions.make_predict_step(model_lib.build(config, "classification"))
  jax_predictions = predictions.predict(predict_step, params, dev, glue.eval_batch_size,
                                     tasks.length_buckets(glue.max_length), regression=False)

  assert len(torch_predictions) == len(dev) == 400
  assert len(set(dev.lengths.tolist())) > 10  # padding in several buckets
  assert 0 < jax_predictions.mean() < 1, "a constant classifier would make the comparison vacuous"
  assert np.mean(torch_predictions == jax_predictions) >= 0.999
  accuracy = metrics_lib.compute(task.metrics, dev.labels, jax_predictions)["accuracy"]
  assert f"sst2 dev: accuracy {accuracy:.2f}" in out


def test_eval_pytorch_rejects_a_model_with_the_wrong_number_of_labels(tmp_path, capsys, exported_classifier):
  _, _, export = exported_classifier
  line = assert_one_error_line(*_run(capsys, "eval-pytorch", "--model", export, "--config",
                                     f"{GLUE_CONFIG}:task=mnli", f"--config.data.path={tmp_path}"))
  assert "has 2 outputs but mnli needs 3" in line


def test_eval_pytorch_precision_is_for_bipft_exports(tmp_path, capsys, exported_classifier):
  _, _, export = exported_classifier
  plain = tmp_path / "plain"
  shutil.copytree(export, plain)
  hf = json.loads((plain / "config.json").read_text())
  hf.update(model_type="bert", architectures=["BertForSequenceClassification"])
  del hf["auto_map"]
  (plain / "config.json").write_text(json.dumps(hf))
  line = assert_one_error_line(*_run(capsys, "eval-pytorch", "--model", plain, "--config", f"{GLUE_CONFIG}:task=sst2",
                                     f"--config.data.path={tmp_path}", "--config.precision=mixed"))
  assert "is a bert model, which computes in fp32 only: leave precision empty" in line


def test_eval_pytorch_of_a_folder_without_a_model(tmp_path, capsys):
  line = assert_one_error_line(*_run(capsys, "eval-pytorch", "--model", tmp_path, "--config",
                                     f"{GLUE_CONFIG}:task=sst2", f"--config.data.path={tmp_path}"))
  assert "has no config.json" in line


def _run(capsys, *args) -> tuple:
  code = cli.main([str(a) for a in args])
  return code, capsys.readouterr().err
