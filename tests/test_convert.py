"""`bipft convert`: orbax <-> PyTorch, parity of the exported PyTorch model, exact round trips, errors."""
import json
import os
import pathlib
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from bipft_jax import checkpointing, cli, convert, policy
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax import pytorch_io
from reference_data import VECTORS, needs_vectors

ATOL = 1e-4  # the suggested forward tolerance of the reference vectors


def tiny_config(**overrides) -> model_lib.BertConfig:
  values = dict(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                max_position_embeddings=40, binary=True, mlm_transform_act="relu")
  return model_lib.BertConfig(**{**values, **overrides})


def padded_two_segment_batch(vocab_size: int) -> dict:
  """Three rows: no padding, 5 and 11 padded positions; every row has a segment-B span."""
  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab_size, (3, 16))
  mask = np.ones_like(ids)
  mask[1, 11:], mask[2, 5:] = 0, 0
  types = np.zeros_like(ids)
  types[0, 7:], types[1, 6:11], types[2, 3:5] = 1, 1, 1
  return {"input_ids": ids * mask, "token_type_ids": types, "attention_mask": mask}


def realistic_params(config: model_lib.BertConfig, head: str, batch: dict, seed: int = 0) -> dict:
  """Random params with nonzero biases and LayerNorms and calibrated alphas.

  Zero biases make many binary pre-activations exact zeros whose sign depends on summation order
  (reference_vectors/README.md, choice 1); perturbing them keeps the parity check meaningful.
  """
  module = model_lib.build(config, head)
  flat = flax.traverse_util.flatten_dict(model_params.init_params(module, jax.random.key(seed)))
  for i, path in enumerate(sorted(flat)):
    if path[-1] in ("bias", "move_bias", "scale"):
      noise = 0.02 * jax.random.normal(jax.random.key(1000 + i), flat[path].shape)
      flat[path] = flat[path] + noise
  params = flax.traverse_util.unflatten_dict(flat)
  if config.binary:
    params = model_params.calibrate_alphas(module, params, jax.tree.map(jnp.asarray, batch))
  return params


def jax_forward(config, head, params, batch) -> dict:
  return model_lib.build(config, head).apply(
      {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])


def torch_forward(model, batch):
  with torch.no_grad():
    return model(**{k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}, output_hidden_states=True)


AUTO_CLASSES = {"pretraining": transformers.AutoModelForPreTraining,
                "classification": transformers.AutoModelForSequenceClassification,
                "encoder": transformers.AutoModel}


def load_export(directory, head: str):
  return AUTO_CLASSES[head].from_pretrained(str(directory), trust_remote_code=True).eval()


def bipft(capsys, *args) -> tuple:
  """Runs `bipft ARGS` in-process: (exit code, stderr)."""
  code = cli.main([str(a) for a in args])
  return code, capsys.readouterr().err


def assert_one_error_line(code: int, stderr: str) -> str:
  assert code == 2, stderr
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "error:" in lines[0], stderr
  return lines[0]


def flat_numpy(params) -> dict:
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def assert_bit_identical(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    assert np.array_equal(a[key], b[key]), key


# --- JAX -> PyTorch (hf): the exported model computes what ours does ------------------------

# "mixed": a model trained with precision=mixed computes its FP products on bf16 operands; its export must too.
@pytest.mark.parametrize("head,binary,pooling,precision", [
    ("pretraining", True, "cls", "fp32"), ("classification", True, "cls", "fp32"),
    ("pretraining", False, "cls", "fp32"), ("classification", True, "mean", "fp32"), ("classification", True, "cls", "mixed"),
    ("pretraining", False, "cls", "mixed")])
def test_hf_export_matches_jax(tmp_path, head, binary, pooling, precision):
  config = tiny_config(binary=binary, num_labels=3, mlm_transform_act="relu" if binary else "gelu",
                       pooling=pooling, precision=precision)
  batch = padded_two_segment_batch(config.vocab_size)
  params = realistic_params(config, head, batch)
  checkpointing.save_params(str(tmp_path / "ckpt"), params, config, head)
  convert.to_pytorch(str(tmp_path / "ckpt"), str(tmp_path / "hf"))

  model = load_export(tmp_path / "hf", head)
  ours, theirs = jax_forward(config, head, params, batch), torch_forward(model, batch)
  assert len(theirs.hidden_states) == config.num_layers + 1
  for ours_h, theirs_h in zip(ours["hidden_states"], theirs.hidden_states):
    np.testing.assert_allclose(theirs_h.numpy(), np.asarray(ours_h), rtol=0, atol=ATOL)
  masked_lm = json.loads((tmp_path / "hf" / "config.json").read_text())["auto_map"].get("AutoModelForMaskedLM")
  if head == "pretraining":
    np.testing.assert_allclose(theirs.prediction_logits.numpy(), np.asarray(ours["mlm_logits"]), rtol=0, atol=ATOL)
    np.testing.assert_allclose(theirs.seq_relationship_logits.numpy(), np.asarray(ours["nsp_logits"]),
                               rtol=0, atol=ATOL)
    # The same export as transformers' masked LM (fill-mask), every tensor used.
    model, loading = transformers.AutoModelForMaskedLM.from_pretrained(
        str(tmp_path / "hf"), trust_remote_code=True, output_loading_info=True)
    assert masked_lm and not loading["missing_keys"] and not loading["unexpected_keys"]
    np.testing.assert_allclose(torch_forward(model.eval(), batch).logits.numpy(), np.asarray(ours["mlm_logits"]),
                               rtol=0, atol=ATOL)
  else:
    np.testing.assert_allclose(theirs.logits.numpy(), np.asarray(ours["logits"]), rtol=0, atol=ATOL)
    assert masked_lm is None  # no MLM head to load: it would start random
  assert convert.read_pytorch_checkpoint(str(tmp_path / "hf"))[0].precision == precision


# --- exact round trips ----------------------------------------------------------------------

def reference_student_dir(directory: pathlib.Path) -> pathlib.Path:
  """The release's calibrated student (teacher.safetensors ∪ student_calibrated) as a checkpoint dir."""
  directory.mkdir()
  state = load_file(VECTORS / "teacher.safetensors")
  state.update(load_file(VECTORS / "student_calibrated.safetensors"))
  save_file(state, str(directory / "model.safetensors"))
  (directory / "config.json").write_text((VECTORS / "config.json").read_text())
  return directory


def tiny_release_dir(directory: pathlib.Path) -> pathlib.Path:
  """A tiny binary student in the release's layout (names, tie aliases, config): bad input to edit."""
  config = tiny_config()
  params = realistic_params(config, "pretraining", padded_two_segment_batch(config.vocab_size))
  directory.mkdir()
  save_file(convert.reference_state(params, "pretraining"), str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(convert.hf_config_dict(config, "pretraining")))
  return directory


@needs_vectors
def test_release_names_to_jax_to_reference_is_bit_identical(tmp_path, capsys):
  src = reference_student_dir(tmp_path / "release")
  assert bipft(capsys, "convert", "from-pytorch", "--src", src, "--out", tmp_path / "work")[0] == 0
  assert bipft(capsys, "convert", "to-pytorch", "--checkpoint", tmp_path / "work", "--out", tmp_path / "ref",
               "--format", "reference")[0] == 0
  original, exported = load_file(src / "model.safetensors"), load_file(tmp_path / "ref" / "model.safetensors")
  aliases = {alias: exported.pop(alias) for alias in pytorch_io.TIED_ALIASES}
  assert_bit_identical(original, exported)
  for alias, source in pytorch_io.TIED_ALIASES.items():  # the release's strict load_state_dict needs them
    assert np.array_equal(aliases[alias], original[source])
  config = json.loads((tmp_path / "ref" / "config.json").read_text())
  release = json.loads((src / "config.json").read_text())
  for field in ("weight_bits", "input_bits", "weight_quant_method", "input_quant_method", "hidden_act",
                "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size"):
    assert config[field] == release[field], field

  # The export, aliases included, as a torch.save'd pytorch_model.bin imports to the same params.
  (tmp_path / "bin").mkdir()
  torch.save({k: torch.from_numpy(v) for k, v in load_file(tmp_path / "ref" / "model.safetensors").items()},
             tmp_path / "bin" / "pytorch_model.bin")
  (tmp_path / "bin" / "config.json").write_text((tmp_path / "ref" / "config.json").read_text())
  convert.from_pytorch(str(tmp_path / "bin"), str(tmp_path / "work_from_bin"))
  first, again = (checkpointing.restore_params(str(tmp_path / w)) for w in ("work", "work_from_bin"))
  assert first[:2] == again[:2]
  assert_bit_identical(flat_numpy(first[2]), flat_numpy(again[2]))


def test_jax_to_pytorch_to_jax_is_bit_identical(tmp_path):
  config = tiny_config(num_labels=3, pooling="mean")  # our own switches survive the trip too
  batch = padded_two_segment_batch(config.vocab_size)
  for head in ("pretraining", "classification"):
    params = realistic_params(config, head, batch)
    checkpointing.save_params(str(tmp_path / head / "ckpt"), params, config, head)
    convert.to_pytorch(str(tmp_path / head / "ckpt"), str(tmp_path / head / "hf"))
    convert.from_pytorch(str(tmp_path / head / "hf"), str(tmp_path / head / "back"))
    back_config, back_head, back = checkpointing.restore_params(str(tmp_path / head / "back"))
    assert (back_config, back_head) == (config, head)
    assert_bit_identical(flat_numpy(params), flat_numpy(back))


def test_release_finetuning_model_skips_unused_prelu_tensors(tmp_path, capsys):
  config = tiny_config(num_labels=2)
  params = realistic_params(config, "classification", padded_two_segment_batch(config.vocab_size))
  state = convert.reference_state(params, "classification")
  state["bert.encoder.layer.0.attention.self.query.sa.weight"] = np.full((1,), 0.25, np.float32)
  src = tmp_path / "glue_release"
  src.mkdir()
  save_file(state, str(src / "model.safetensors"))
  (src / "config.json").write_text(json.dumps(convert.hf_config_dict(config, "classification")))
  code = cli.main(["convert", "from-pytorch", "--src", str(src), "--out", str(tmp_path / "work")])
  assert code == 0
  assert "skipped unused tensor bert.encoder.layer.0.attention.self.query.sa.weight" in capsys.readouterr().out
  _, head, back = checkpointing.restore_params(str(tmp_path / "work"))
  assert head == "classification"
  assert_bit_identical(flat_numpy(params), flat_numpy(back))


# --- the authors' reference vectors through from-pytorch -> to-pytorch (hf) ------------------

@needs_vectors
def test_reference_vectors_through_the_hf_export(tmp_path, capsys):
  src = reference_student_dir(tmp_path / "release")
  assert bipft(capsys, "convert", "from-pytorch", "--src", src, "--out", tmp_path / "work")[0] == 0
  assert bipft(capsys, "convert", "to-pytorch", "--checkpoint", tmp_path / "work", "--out", tmp_path / "hf")[0] == 0
  batch = dict(np.load(VECTORS / "batch.npz"))
  expected = dict(np.load(VECTORS / "outputs_forward.npz"))
  model = load_export(tmp_path / "hf", "pretraining")
  with torch.no_grad():
    out = model(input_ids=torch.as_tensor(batch["input_ids"]), attention_mask=torch.as_tensor(batch["attention_mask"]),
                token_type_ids=torch.as_tensor(batch["token_type_ids"]), labels=torch.as_tensor(batch["labels"]),
                next_sentence_label=torch.as_tensor(batch["next_sentence_label"]),
                output_hidden_states=True, output_attentions=True)
  np.testing.assert_allclose(out.prediction_logits.numpy(), expected["prediction_logits"], rtol=0, atol=ATOL)
  np.testing.assert_allclose(out.seq_relationship_logits.numpy(), expected["seq_relationship_logits"],
                             rtol=0, atol=ATOL)
  np.testing.assert_allclose(np.stack([h.numpy() for h in out.hidden_states]), expected["hidden_states"],
                             rtol=0, atol=ATOL)
  # Binarised attention patterns are exact: a flipped entry would differ by a whole clip_attn.
  np.testing.assert_allclose(np.stack([a.numpy() for a in out.attentions]), expected["attentions"], rtol=0, atol=1e-6)
  np.testing.assert_allclose(out.loss.item(), expected["loss"], rtol=0, atol=1e-5)


# --- full-precision teachers in Hugging Face layouts ----------------------------------------

def hf_bert(kind: str, directory: pathlib.Path):
  """A random transformers BERT of `kind` saved to `directory`; returns the (eval-mode) model."""
  torch.manual_seed(0)
  config = transformers.BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, max_position_embeddings=40, num_labels=3)
  model = getattr(transformers, kind)(config).eval()
  with torch.no_grad():  # HF's init zeroes biases and sets LayerNorms to 1: perturb them
    for name, tensor in model.named_parameters():
      if name.endswith("bias") or "LayerNorm" in name:
        tensor.add_(0.02 * torch.randn_like(tensor))
  model.save_pretrained(str(directory))
  return model


@pytest.mark.parametrize("kind,head", [("BertForPreTraining", "pretraining"),
                                       ("BertForSequenceClassification", "classification")])
def test_hf_teacher_layouts_round_trip_through_jax(tmp_path, kind, head):
  original = hf_bert(kind, tmp_path / "teacher")
  report = convert.from_pytorch(str(tmp_path / "teacher"), str(tmp_path / "work"))
  assert (report["head"], report["binary"]) == (head, False)
  convert.to_pytorch(str(tmp_path / "work"), str(tmp_path / f"hf_{head}"))
  batch = padded_two_segment_batch(101)
  theirs, ours = torch_forward(original, batch), torch_forward(load_export(tmp_path / f"hf_{head}", head), batch)
  for t, o in zip(theirs.hidden_states, ours.hidden_states):
    np.testing.assert_allclose(o.numpy(), t.numpy(), rtol=0, atol=ATOL)
  logits = ("prediction_logits", "seq_relationship_logits") if head == "pretraining" else ("logits",)
  for name in logits:
    np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(theirs, name).numpy(), rtol=0, atol=ATOL)


def test_a_classifiers_class_names_survive_the_round_trip(tmp_path):
  """from-pytorch kept no id2label: the export named the classes LABEL_0, LABEL_1, LABEL_2."""
  hf_bert("BertForSequenceClassification", tmp_path / "named")
  config = json.loads((tmp_path / "named" / "config.json").read_text())
  names = {"0": "negative", "1": "neutral", "2": "positive"}
  (tmp_path / "named" / "config.json").write_text(json.dumps(dict(config, id2label=names,
                                                                   label2id={v: int(k) for k, v in names.items()})))
  convert.from_pytorch(str(tmp_path / "named"), str(tmp_path / "work"))
  assert checkpointing.read_run_config(str(tmp_path / "work"))["labels"] == ["negative", "neutral", "positive"]
  # hf_bert saves no tokenizer: none is shipped (MiniLM's was, for a conversion's record, in the session)
  assert convert.to_pytorch(str(tmp_path / "work"), str(tmp_path / "export"))["tokenizer"] == []
  exported = json.loads((tmp_path / "export" / "config.json").read_text())
  assert exported["id2label"] == names and exported["label2id"] == {"negative": 0, "neutral": 1, "positive": 2}
  hf_bert("BertForSequenceClassification", tmp_path / "default")  # transformers' own names: nothing kept
  convert.from_pytorch(str(tmp_path / "default"), str(tmp_path / "work_default"))
  assert "labels" not in checkpointing.read_run_config(str(tmp_path / "work_default"))


def test_tf_converted_names_and_an_mlm_only_checkpoint(tmp_path, capsys):
  """LayerNorm gamma/beta in a pytorch_model.bin (bert-base-uncased's layout), no NSP head (BertForMaskedLM)."""
  original = hf_bert("BertForMaskedLM", tmp_path / "saved")
  (tmp_path / "legacy").mkdir()
  legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in original.state_dict().items()}
  assert any(k.endswith("LayerNorm.gamma") for k in legacy)
  torch.save(legacy, tmp_path / "legacy" / "pytorch_model.bin")
  (tmp_path / "legacy" / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
  code = cli.main(["convert", "from-pytorch", "--src", str(tmp_path / "legacy"), "--out", str(tmp_path / "work")])
  assert code == 0
  out = capsys.readouterr().out
  for name in ("cls.seq_relationship.weight", "bert.pooler.dense.weight"):
    assert f"{name} is not in the checkpoint" in out
  convert.to_pytorch(str(tmp_path / "work"), str(tmp_path / "mlm_hf"))
  batch = padded_two_segment_batch(101)
  theirs, ours = torch_forward(original, batch), torch_forward(load_export(tmp_path / "mlm_hf", "pretraining"), batch)
  np.testing.assert_allclose(ours.prediction_logits.numpy(), theirs.logits.numpy(), rtol=0, atol=ATOL)


def test_pretrained_bert_model_with_tokenizer(tmp_path, minilm_dir):
  """A real BertModel checkpoint (no `bert.` prefix, tokenizer files) -> JAX -> hf export."""
  report = convert.from_pytorch(str(minilm_dir), str(tmp_path / "work"))
  assert (report["head"], report["binary"]) == ("encoder", False)
  assert "vocab.txt" in report["tokenizer"] or "tokenizer.json" in report["tokenizer"]
  convert.to_pytorch(str(tmp_path / "work"), str(tmp_path / "minilm_hf"))
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "minilm_hf"))
  batch = dict(tokenizer(["a binary transformer", "one bit weights and activations, pretrained"],
                         padding=True, return_tensors="np"))
  original = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  theirs, ours = torch_forward(original, batch), torch_forward(load_export(tmp_path / "minilm_hf", "encoder"), batch)
  for t, o in zip(theirs.hidden_states, ours.hidden_states):
    np.testing.assert_allclose(o.numpy(), t.numpy(), rtol=0, atol=ATOL)
  np.testing.assert_allclose(ours.pooler_output.numpy(), theirs.pooler_output.numpy(), rtol=0, atol=ATOL)


# --- devices --------------------------------------------------------------------------------

def test_checkpoint_sharded_over_8_devices_converts_on_one(tmp_path):
  assert len(jax.devices()) >= 8, "conftest gives the tests 8 CPU devices"
  config = tiny_config(vocab_size=104)
  params = realistic_params(config, "pretraining", padded_two_segment_batch(config.vocab_size))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))

  def place(x):
    spec = jax.sharding.PartitionSpec("data") if x.ndim and x.shape[0] % 8 == 0 else jax.sharding.PartitionSpec()
    return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

  sharded = jax.tree.map(place, params)
  table = sharded["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert len(table.sharding.device_set) == 8 and not table.sharding.is_fully_replicated
  checkpointing.save_params(str(tmp_path / "ckpt"), sharded, config, "pretraining")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[1]))
  subprocess.run([sys.executable, "-c", "import jax, sys; from bipft_jax import cli; "
                  "assert len(jax.devices()) == 1; sys.exit(cli.main(sys.argv[1:]))",
                  "convert", "to-pytorch", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")],
                 check=True, env=env, timeout=300)
  assert_bit_identical(pytorch_io.to_torch_state(params), load_file(tmp_path / "hf" / "model.safetensors"))


# --- bad input: one clear line, exit 2, nothing left behind ---------------------------------

def test_unknown_tensor_is_named(tmp_path, capsys):
  src = tiny_release_dir(tmp_path / "release")
  state = load_file(src / "model.safetensors")
  state["bert.encoder.layer.1.attention.self.lora_q.weight"] = np.zeros((4, 32), np.float32)
  save_file(state, str(src / "model.safetensors"))
  line = assert_one_error_line(*bipft(capsys, "convert", "from-pytorch", "--src", src, "--out", tmp_path / "work"))
  assert "unexpected tensor bert.encoder.layer.1.attention.self.lora_q.weight" in line
  assert not (tmp_path / "work").exists()


def test_config_that_disagrees_with_the_tensors_names_the_tensor(tmp_path, capsys):
  src = tiny_release_dir(tmp_path / "release")
  config = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps(dict(config, intermediate_size=48)))
  line = assert_one_error_line(*bipft(capsys, "convert", "from-pytorch", "--src", src, "--out", tmp_path / "work"))
  assert "shape mismatch for bert.encoder.layer.0.intermediate.dense.weight: checkpoint (64, 32)" in line


def test_unsupported_binarization_switch(tmp_path, capsys):
  src = tiny_release_dir(tmp_path / "release")
  config = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps(dict(config, weight_layerwise=False)))
  line = assert_one_error_line(*bipft(capsys, "convert", "from-pytorch", "--src", src, "--out", tmp_path / "work"))
  assert "weight_layerwise=False" in line


def test_existing_output_is_never_overwritten(tmp_path, capsys):
  src = tiny_release_dir(tmp_path / "release")
  (tmp_path / "work").mkdir()
  (tmp_path / "work" / "notes.txt").write_text("keep me")
  line = assert_one_error_line(*bipft(capsys, "convert", "from-pytorch", "--src", src, "--out", tmp_path / "work"))
  assert "already exists" in line
  assert (tmp_path / "work" / "notes.txt").read_text() == "keep me"


def test_to_pytorch_of_a_directory_without_checkpoint(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  line = assert_one_error_line(*bipft(capsys, "convert", "to-pytorch", "--checkpoint", tmp_path / "empty",
                                      "--out", tmp_path / "hf"))
  assert "no checkpoint in" in line
  assert not (tmp_path / "hf").exists()


def test_a_pretraining_export_fills_masks_in_the_transformers_pipeline(tmp_path, minilm_dir):
  # A pretrained student's first check in the PyTorch world; the export had no AutoModelForMaskedLM,
  # so pipeline("fill-mask") could not load it.
  config = tiny_config(vocab_size=30522)
  params = realistic_params(config, "pretraining", padded_two_segment_batch(config.vocab_size))
  checkpointing.save_params(str(tmp_path / "ckpt"), params, config, "pretraining")
  convert.to_pytorch(str(tmp_path / "ckpt"), str(tmp_path / "hf"), tokenizer=str(minilm_dir))
  text = "the cat sat on the [MASK] ."
  filled = transformers.pipeline("fill-mask", model=str(tmp_path / "hf"), trust_remote_code=True, top_k=3)(text)
  ids = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))(text, return_tensors="np")["input_ids"]
  batch = {"input_ids": ids, "token_type_ids": np.zeros_like(ids), "attention_mask": np.ones_like(ids)}
  logits_V = np.asarray(jax_forward(config, "pretraining", params, batch)["mlm_logits"][0, list(ids[0]).index(103)])
  top = np.argsort(-logits_V)[:3]
  assert [f["token"] for f in filled] == top.tolist()
  probs_V = np.exp(logits_V - logits_V.max()) / np.exp(logits_V - logits_V.max()).sum()
  np.testing.assert_allclose([f["score"] for f in filled], probs_V[top], rtol=1e-4)


def test_to_pytorch_ships_the_tokenizer_it_is_given(tmp_path, capsys, minilm_dir):
  config = tiny_config(binary=False, vocab_size=30522)
  params = model_params.init_params(model_lib.build(config, "classification"), jax.random.key(0))
  checkpointing.save_params(str(tmp_path / "ckpt"), params, config, "classification", step=3)
  code, _ = bipft(capsys, "convert", "to-pytorch", "--checkpoint", tmp_path / "ckpt" / "3", "--out", tmp_path / "hf",
                  "--tokenizer", minilm_dir)
  assert code == 0
  assert (tmp_path / "hf" / "vocab.txt").read_bytes() == (minilm_dir / "vocab.txt").read_bytes()
  line = assert_one_error_line(*bipft(capsys, "convert", "to-pytorch", "--checkpoint", tmp_path / "ckpt",
                                      "--out", tmp_path / "hf2", "--tokenizer", tmp_path / "ckpt"))
  assert "has none of vocab.txt" in line


# --- the binarizer zoo ------------------------------------------------------------------------

ZOO_EXPORTS = [(name, "elastic") for name in convert.PYTORCH_LINEAR_BINARIZERS[1:]] + [("bipft", "bivit")]


@pytest.mark.parametrize("linear, probs", ZOO_EXPORTS)
def test_zoo_binarizers_export_to_pytorch(tmp_path, linear, probs):
  # Odd fan-ins: an exact-zero sum of signs would leave summation-order residues to the next sign. A
  # hidden size of 9 keeps unscaled sums (bnn, xnorplusplus) above -13, where XLA's GELU flushes
  # results near 1e-38 to 0 and torch's does not (modeling_bipft._gelu matches it elsewhere).
  config = tiny_config(linear_binarizer=linear, attention_prob_binarizer=probs, hidden_size=9, num_heads=3,
                       intermediate_size=65, num_layers=1)
  batch = padded_two_segment_batch(config.vocab_size)
  params = realistic_params(config, "encoder", batch)
  checkpointing.save_params(str(tmp_path / "ckpt"), params, config, "encoder")
  convert.to_pytorch(str(tmp_path / "ckpt"), str(tmp_path / "hf"))
  model = load_export(tmp_path / "hf", "encoder")
  ours, theirs = jax_forward(config, "encoder", params, batch), torch_forward(model, batch)
  for ours_h, theirs_h in zip(ours["hidden_states"], theirs.hidden_states):
    np.testing.assert_allclose(theirs_h.numpy(), np.asarray(ours_h), rtol=0, atol=ATOL)
  np.testing.assert_allclose(theirs.pooler_output.numpy(), np.asarray(ours["pooled"]), rtol=0, atol=ATOL)
  out = model(**{k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()})
  with pytest.raises(NotImplementedError, match="inference only"):
    out.last_hidden_state.sum().backward()


def test_every_binarizer_exports_and_the_release_format_refuses_the_zoo_by_name(tmp_path, capsys):
  from bipft_jax.pytorch_model import modeling_bipft
  assert set(convert.PYTORCH_LINEAR_BINARIZERS) == {"bipft", *modeling_bipft.ZOO_LINEARS}
  assert set(convert.PYTORCH_LINEAR_BINARIZERS) == set(policy.LINEAR_BINARIZERS)
  config = tiny_config(linear_binarizer="fda", num_layers=1, hidden_size=64)  # noise MLP width 64 // 64
  module = model_lib.build(config, "encoder")
  checkpointing.save_params(str(tmp_path / "ckpt"), model_params.init_params(module, jax.random.key(0)), config,
                            "encoder")
  code, err = bipft(capsys, "convert", "to-pytorch", "--checkpoint", tmp_path / "ckpt",
                    "--out", tmp_path / "ref", "--format", "reference")
  assert "linear binarizer 'fda' has no PyTorch implementation in the reference format" in (
      assert_one_error_line(code, err))
  assert not (tmp_path / "ref").exists()
