"""Importing PyTorch BERT checkpoints: parity with transformers on a real pretrained model, and
clear errors for checkpoints that do not fit."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipft_jax import checkpointing, model, model_params, pytorch_io
from bipft_jax.errors import UserError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# Different lengths (3 to ~30 WordPieces) so every batch row but the longest is padded.
SENTENCES = [
    "Hello!",
    "The cat sat on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank while the farmer watches.",
    "Binary neural networks replace floating-point weights and activations with single bits, "
    "which cuts memory by a factor of thirty-two.",
    "Where is the nearest train station?",
]
HIDDEN_TOLERANCE = 1e-4
MIN_COSINE = 0.99999


def _mean_pooled_unit(hidden_BxLxD: np.ndarray, mask_BxL: np.ndarray) -> np.ndarray:
  """sentence-transformers' embedding: the mean over real tokens, L2-normalised (in fp64)."""
  weights_BxLx1 = mask_BxL[..., None].astype(np.float64)
  mean_BxD = (hidden_BxLxD.astype(np.float64) * weights_BxLx1).sum(1) / weights_BxLx1.sum(1)
  return mean_BxD / np.linalg.norm(mean_BxD, axis=-1, keepdims=True)


def test_minilm_matches_transformers(minilm_dir):
  tokenizer = pytorch_io.load_tokenizer(str(minilm_dir))
  batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
  mask_BxL = batch["attention_mask"].astype(bool)
  assert not mask_BxL.all(), "the batch should exercise padding"

  config, params = pytorch_io.load_pretrained(str(minilm_dir), "encoder")
  ours = model.build(config, "encoder").apply(
      {"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
      deterministic=True)

  reference = transformers.BertModel.from_pretrained(
      str(minilm_dir), local_files_only=True, attn_implementation="eager").eval()
  with torch.no_grad():
    theirs = reference(**{k: torch.from_numpy(v) for k, v in batch.items()}, output_hidden_states=True)

  assert len(ours["hidden_states"]) == len(theirs.hidden_states) == config.num_layers + 1
  report = []
  for i, (ours_h, theirs_h) in enumerate(zip(ours["hidden_states"], theirs.hidden_states)):
    diff_BxLxD = np.abs(np.asarray(ours_h) - theirs_h.numpy())
    report.append((i, float(diff_BxLxD[mask_BxL].max()), float(diff_BxLxD.max())))
  print("\nhidden state: max abs diff on real tokens / on all positions")
  for i, valid, everywhere in report:
    print(f"  {i}: {valid:.2e} / {everywhere:.2e}")
  worst = max(valid for _, valid, _ in report)
  assert worst <= HIDDEN_TOLERANCE, report

  cosines = (_mean_pooled_unit(np.asarray(ours["hidden_states"][-1]), mask_BxL)
             * _mean_pooled_unit(theirs.hidden_states[-1].numpy(), mask_BxL)).sum(-1)
  print(f"sentence embedding cosine: min {cosines.min():.9f}")
  assert cosines.min() >= MIN_COSINE, cosines
  np.testing.assert_allclose(np.asarray(ours["pooled"]), theirs.pooler_output.numpy(), atol=HIDDEN_TOLERANCE)


def test_tokenizer_is_the_checkpoints(minilm_dir):
  tokenizer = pytorch_io.load_tokenizer(str(minilm_dir))
  assert tokenizer("Hello, WORLD")["input_ids"] == [101, 7592, 1010, 2088, 102]  # uncased WordPiece


# --- small checkpoints written here -----------------------------------------------------

TINY = model.BertConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                        max_position_embeddings=16)


def _tiny_state(head: str = "encoder") -> tuple:
  params = model_params.init_params(model.build(TINY, head), jax.random.key(0))
  return params, pytorch_io.to_torch_state(params)


def _write_checkpoint(directory: pathlib.Path, state: dict, *, as_bin: bool = False) -> pathlib.Path:
  """A Hugging Face style folder: config.json plus model.safetensors or pytorch_model.bin."""
  directory.mkdir(parents=True, exist_ok=True)
  hf_config = {theirs: getattr(TINY, ours) for theirs, ours in pytorch_io.HF_CONFIG_FIELDS.items()}
  hf_config.update(model_type="bert", hidden_act="gelu")
  (directory / "config.json").write_text(json.dumps(hf_config))
  if as_bin:
    torch.save({k: torch.tensor(v) for k, v in state.items()}, directory / "pytorch_model.bin")
  else:
    from safetensors.numpy import save_file
    save_file(state, str(directory / "model.safetensors"))
  return directory


def _assert_same_tree(a: dict, b: dict) -> None:
  flat_a, flat_b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (a, b))
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("as_bin", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_checkpoint_round_trip(tmp_path, as_bin):
  params, state = _tiny_state()
  directory = _write_checkpoint(tmp_path / "ckpt", state, as_bin=as_bin)
  config, loaded = pytorch_io.load_pretrained(str(directory), "encoder", seed=1)  # another init
  assert config == TINY
  _assert_same_tree(loaded, params)


@pytest.mark.parametrize("head", ["encoder", "classification"])
def test_a_checkpoint_without_pooler_loads_with_a_fresh_one(tmp_path, capsys, head):
  """BertForMaskedLM has no pooler: as a pretraining teacher (encoder) or a classifier's start, the rest
  loads exactly and the pooler keeps its init, as transformers does, with a note."""
  params, state = _tiny_state("pretraining")
  state = {k: v for k, v in state.items() if ".pooler." not in k and not k.startswith("cls.seq_relationship.")}
  directory = _write_checkpoint(tmp_path / "mlm", state)
  _, loaded = pytorch_io.load_pretrained(str(directory), head, allow_missing=("classifier",), drop=("cls.",), seed=1)
  fresh = model_params.init_params(model.build(TINY, head), jax.random.key(1))
  encoder = loaded.get("bert", loaded)
  _assert_same_tree(encoder["pooler"], fresh.get("bert", fresh)["pooler"])
  _assert_same_tree({k: v for k, v in encoder.items() if k != "pooler"},
                    {k: v for k, v in params["bert"].items() if k != "pooler"})
  assert capsys.readouterr().err == f"bipft: note: {directory} has no pooler (a BertForMaskedLM, say): it starts " \
                                    "from a fresh init\n"


@pytest.mark.parametrize("as_bin", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_sharded_checkpoint_loads_like_one_file(tmp_path, as_bin):
  """Hugging Face's layout for large models: shards plus a `.index.json` weight map."""
  params, state = _tiny_state()
  directory = _write_checkpoint(tmp_path / "ckpt", {}, as_bin=as_bin)
  (directory / ("pytorch_model.bin" if as_bin else "model.safetensors")).unlink()
  names = sorted(state)
  shards = {"part-00001-of-00002": names[::2], "part-00002-of-00002": names[1::2]}
  weight_map = {}
  for shard, shard_names in shards.items():
    if as_bin:
      torch.save({k: torch.tensor(state[k]) for k in shard_names}, directory / shard)
    else:
      from safetensors.numpy import save_file
      save_file({k: state[k] for k in shard_names}, str(directory / shard))
    weight_map.update({k: shard for k in shard_names})
  index = directory / ("pytorch_model.bin.index.json" if as_bin else "model.safetensors.index.json")
  index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  _, loaded = pytorch_io.load_pretrained(str(directory), "encoder", seed=1)
  _assert_same_tree(loaded, params)
  (directory / "part-00002-of-00002").unlink()
  with pytest.raises(UserError, match="lists 1 shard.*not there, first part-00002-of-00002"):
    pytorch_io.read_weights(str(directory))
  index.write_text("{not json")
  with pytest.raises(UserError, match="is not a shard index"):
    pytorch_io.read_weights(str(directory))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_checkpoint_loads_as_float32(tmp_path, dtype):
  import safetensors.flax
  params, state = _tiny_state()
  directory = _write_checkpoint(tmp_path / "ckpt", {})
  half = {k: jnp.asarray(v, dtype if np.issubdtype(v.dtype, np.floating) else None) for k, v in state.items()}
  safetensors.flax.save_file(half, str(directory / "model.safetensors"))
  _, loaded = pytorch_io.load_pretrained(str(directory), "encoder")
  rounded = jax.tree.map(lambda x: np.asarray(jnp.asarray(x, dtype), np.float32), params)
  _assert_same_tree(loaded, rounded)
  assert all(np.asarray(x).dtype == np.float32 for x in jax.tree.leaves(loaded))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rounded), jax.tree.leaves(params)))


def test_bin_with_pickled_code_is_refused(tmp_path):
  """torch.load(weights_only=True): a pickle that would run code is an error, and nothing runs."""
  marker = tmp_path / "pwned"
  _, state = _tiny_state()
  directory = _write_checkpoint(tmp_path / "ckpt", state, as_bin=True)
  torch.save({"payload": _RunsCodeWhenUnpickled(str(marker))}, directory / "pytorch_model.bin")
  with pytest.raises(UserError, match="would run pickled code"):
    pytorch_io.read_weights(str(directory))
  assert not marker.exists()


class _RunsCodeWhenUnpickled:
  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return (pathlib.Path.touch, (pathlib.Path(self.path),))


def _load_error(state: dict, head: str = "encoder") -> str:
  template, _ = _tiny_state(head)
  with pytest.raises(UserError) as error:
    pytorch_io.from_torch_state(state, template)
  message = str(error.value)
  assert "\n" not in message
  return message


def test_missing_unexpected_and_misshaped_tensors_are_each_named():
  _, state = _tiny_state()
  del state["encoder.layer.0.attention.self.query.weight"]
  state["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((16, 16), np.float32)
  state["embeddings.position_embeddings.weight"] = np.zeros((8, 16), np.float32)
  message = _load_error(state)
  assert "missing tensor encoder.layer.0.attention.self.query.weight" in message
  assert "unexpected tensor encoder.layer.0.attention.self.rotary.weight" in message
  assert "shape mismatch for embeddings.position_embeddings.weight: checkpoint (8, 16), model (16, 16)" in message


def test_transposed_kernel_shape_is_reported_in_torch_layout():
  _, state = _tiny_state()
  state["encoder.layer.0.intermediate.dense.weight"] = np.zeros((32, 8), np.float32)
  assert ("shape mismatch for encoder.layer.0.intermediate.dense.weight: checkpoint (32, 8), model (32, 16)"
          in _load_error(state))


def test_untied_mlm_decoder_is_refused():
  params, state = _tiny_state("pretraining")
  state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"] + 1
  assert "cls.predictions.decoder.weight should be tied" in _load_error(state, "pretraining")
  state["cls.predictions.decoder.weight"] = state["bert.embeddings.word_embeddings.weight"]
  loaded, _ = pytorch_io.from_torch_state(state, params)
  _assert_same_tree(loaded, params)


def test_directory_without_config_or_weights(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    pytorch_io.load_pretrained(str(tmp_path / "nowhere"))
  (tmp_path / "model.safetensors").write_bytes(b"")
  with pytest.raises(UserError, match="config.json is missing"):
    pytorch_io.load_pretrained(str(tmp_path))
  (tmp_path / "model.safetensors").unlink()
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(UserError, match="no weights in"):
    pytorch_io.load_pretrained(str(tmp_path))
  with pytest.raises(UserError, match="no tokenizer in"):
    pytorch_io.load_tokenizer(str(tmp_path))
  params, _ = _tiny_state()
  checkpointing.save_params(str(tmp_path / "workdir"), params, TINY, "encoder")  # `convert from-pytorch`'s output
  with pytest.raises(UserError, match="workdir is a bipft workdir \\(orbax checkpoints\\), not a PyTorch checkpoint "
                                      "folder: `bipft convert to-pytorch --checkpoint .*workdir --out FOLDER`"):
    pytorch_io.load_pretrained(str(tmp_path / "workdir"))


def test_a_tokenizer_larger_than_the_model_vocab_is_refused(minilm_dir):
  assert len(pytorch_io.load_tokenizer(str(minilm_dir), vocab_size=30522)) == 30522
  with pytest.raises(UserError, match="has 30522 tokens but the model's vocab_size is 100: set --config.tokenizer"):
    pytorch_io.load_tokenizer(str(minilm_dir), vocab_size=100, fix="set --config.tokenizer")


def test_a_null_pad_token_id_reads_as_berts_zero_and_other_nulls_are_refused():
  hf = {"vocab_size": 16, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": 8, "pad_token_id": None}
  assert pytorch_io.config_from_hf(hf).pad_token_id == 0
  with pytest.raises(UserError, match="hidden_size must be int, got None"):
    pytorch_io.config_from_hf({**hf, "hidden_size": None})
