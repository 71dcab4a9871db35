"""The binarization policy: every linear binarizer trains, packs (or is refused) and is summarised; kinds."""
import dataclasses
import functools
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bipft_jax import kinds, losses, optim, packed, packed_file, policy, pretraining, summary
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax.errors import UserError

from test_train import files, first_batch, tiny_config  # noqa: F401 (files is a fixture)

# Even fan-ins: sums of signs that are exactly 0 occur, and the packed count and the simulated product
# (zoo.api.factored_linear: the scales multiplied after the sum) must both give the exact 0.
TINY = model_lib.BertConfig(vocab_size=50, hidden_size=64, num_layers=1, num_heads=4, intermediate_size=96,
                            max_position_embeddings=16, num_labels=3, binary=True, hidden_dropout=0.0,
                            attention_dropout=0.0)
PACKABLE = policy.packable_binarizers()
TRAINED = [(name, "elastic") for name in policy.LINEAR_BINARIZERS] + [("bipft", "bivit")]
NOT_PACKABLE = sorted(set(policy.LINEAR_BINARIZERS) - set(PACKABLE))


def _batch(length=12):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, TINY.vocab_size, (3, length))
  mask = np.ones((3, length), np.int32)
  mask[1, 8:] = 0
  return {"input_ids": jnp.asarray(np.where(mask == 1, ids, 0), jnp.int32),
          "token_type_ids": jnp.zeros((3, length), jnp.int32), "attention_mask": jnp.asarray(mask)}


@functools.lru_cache(maxsize=None)
def _student(name, probs="elastic"):
  """A tiny calibrated classifier with binarizers `name` and `probs`, random non-zero biases and shifts."""
  config = dataclasses.replace(TINY, linear_binarizer=name, attention_prob_binarizer=probs)
  module = model_lib.build(config, "classification")
  params = jax.jit(lambda key: model_params.init_params(module, key))(jax.random.key(0))
  flat = flax.traverse_util.flatten_dict(params)
  param_kinds = flax.traverse_util.flatten_dict(model_params.param_kinds(module))
  for i, path in enumerate(sorted(flat)):
    if param_kinds[path] in (kinds.BIAS, kinds.SHIFT):
      flat[path] = 0.05 * jax.random.normal(jax.random.key(i), flat[path].shape)
  params = jax.jit(lambda p, b: model_params.calibrate_alphas(module, p, b))(
      flax.traverse_util.unflatten_dict(flat), _batch())
  return config, module, params


def test_default_is_the_release_linear():
  config = model_lib.BertConfig(binary=True)
  assert config.linear_binarizer == policy.BIPFT and model_lib.policy_of(config).linear.name == "bipft"
  assert model_lib.policy_of(dataclasses.replace(config, binary=False)).linear.name == "dense"


def test_unknown_linear_binarizer_names_the_choices():
  with pytest.raises(ValueError, match=r"unknown linear binarizer 'xnorr'; choose one of bipft, bnn, xnor"):
    model_lib.BertConfig.from_dict({"binary": True, "linear_binarizer": "xnorr"})


def test_kinds_are_declared_for_every_parameter():
  config, module, params = _student("react")
  param_kinds = flax.traverse_util.flatten_dict(model_params.param_kinds(module))
  assert param_kinds.keys() == flax.traverse_util.flatten_dict(params).keys()
  dense = ("bert", "encoder", "layer", "0", "intermediate", "dense")
  assert param_kinds[dense + ("kernel",)] == kinds.BINARY_WEIGHT
  assert param_kinds[dense + ("threshold",)] == kinds.FP
  assert param_kinds[("bert", "embeddings", "word_embeddings", "embedding")] == kinds.BINARY_EMBEDDING
  attention = ("bert", "encoder", "layer", "0", "attention", "self")
  assert param_kinds[attention + ("probs_alpha",)] == kinds.ACTIVATION_SCALE
  assert param_kinds[("classifier", "kernel")] == kinds.WEIGHT
  _, teacher, _ = _student_fp()
  assert kinds.paths_of_kind(model_params.param_kinds(teacher), *kinds.BINARY, *kinds.SCALES) == set()


def _student_fp():
  config = dataclasses.replace(TINY, binary=False)
  return config, model_lib.build(config, "classification"), None


@pytest.mark.parametrize("name, probs", TRAINED)
def test_every_binarizer_trains_the_tiny_pretraining_student(files, name, probs):  # noqa: F811
  """The tiny pretraining config's student, its MLM loss on one batch over and over: the loss falls."""
  config = tiny_config(files, **{"model.linear_binarizer": name, "model.attention_prob_binarizer": probs,
                                 "model.hidden_size": 32, "model.num_heads": 2,
                                 "model.intermediate_size": 64})
  student_config = pretraining.student_config(config)
  student = model_lib.build(student_config, "pretraining")
  batch = first_batch(config, files)
  params = model_params.calibrate_alphas(student, model_params.init_params(student, jax.random.key(0)), batch)
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-2, warmup_steps=0, total_steps=10, schedule="constant", weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-8)), model_params.param_kinds(student))

  def mlm_loss(params):
    out = student.apply({"params": params}, batch["input_ids"], batch["token_type_ids"],
                        batch["attention_mask"], mlm_positions_BxN=batch["mlm_positions"])
    return losses.cross_entropy(out["mlm_logits"], batch["mlm_labels"])

  @jax.jit
  def steps(params):
    def step(state, _):
      params, opt_state = state
      loss, grads = jax.value_and_grad(mlm_loss)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    return jax.lax.scan(step, (params, tx.init(params)), None, length=8)[1]

  history = np.asarray(steps(params))
  assert np.all(np.isfinite(history)) and history[-1] < 0.8 * history[0], history


@pytest.mark.parametrize("name, probs", [(name, "elastic") for name in PACKABLE] + [("bipft", "bivit")])
def test_packed_equals_simulated(name, probs, exact_kernels):
  config, module, params = _student(name, probs)
  batch = _batch()
  inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  simulated = jax.jit(lambda p: module.apply({"params": p}, *inputs))(params)
  head, packed_params = packed.pack_params(config, "classification", params)
  ours = jax.jit(lambda p: packed.forward(config, head, p, *inputs))(packed_params)
  for got, want in zip(ours["hidden_states"], simulated["hidden_states"]):
    np.testing.assert_allclose(got, want, atol=1e-6)  # the same products: rounding of the fusions only
  np.testing.assert_allclose(ours["logits"], simulated["logits"], atol=1e-6)
  for kernel in exact_kernels:  # every plane as int8, or counted by the custom call: the same bits
    prepared = packed.prepare(config, packed_params, kernel)
    theirs = jax.jit(lambda p: packed.forward(config, head, p, *inputs))(prepared)
    for got, want in zip(jax.tree.leaves(theirs), jax.tree.leaves(ours)):
      np.testing.assert_array_equal(got, want)
  tensors = packed_file.file_tensors(config, head, packed_params, "float32")
  assert sum(t.nbytes for t in tensors.values()) == summary.packed_size_bytes(config, head)


@pytest.mark.parametrize("name", NOT_PACKABLE)
def test_a_binarizer_without_sign_planes_is_refused_by_name(name, tmp_path):
  config = dataclasses.replace(TINY, linear_binarizer=name)
  with pytest.raises(UserError, match=f"linear binarizer '{name}' does not pack.*needs one of bipft"):
    packed_file.export(config, "classification", {}, str(tmp_path / "m.safetensors"))  # refused first
  assert not (tmp_path / "m.safetensors").exists()


def test_summary_counts_planes_and_scales_of_the_operator():
  bipft = summary.summarize(TINY, 8)
  xnor = summary.summarize(dataclasses.replace(TINY, linear_binarizer="xnor"), 8)
  fda = summary.summarize(dataclasses.replace(TINY, linear_binarizer="fda"), 8)
  # 7 binarized Linears: xnor stores a scale per output channel (6D + F in all), bipft one scale, one
  # input alpha and a move bias per input channel (6D + F) each.
  assert bipft["packed_bytes"] - xnor["packed_bytes"] == 4 * (7 + 7)
  assert xnor["binary_params"] == bipft["binary_params"]
  table = TINY.vocab_size * TINY.hidden_size
  assert fda["binary_params"] == table  # the word table only: fda runs in FP
  dual = summary.summarize(dataclasses.replace(TINY, linear_binarizer="dbllm_fdb"), 8)
  assert dual["binary_params"] - table == 2 * (bipft["binary_params"] - table)  # two planes per weight
  assert dual["binary_memory_bytes"] > bipft["binary_memory_bytes"]
  assert fda["honest_binary_ops"] > 10 * bipft["honest_binary_ops"]


def test_calibration_runs_the_operators_first_call_init():
  _, _, params = _student("bivit_weight")  # BiViT's weight scales start at 0; calibration sets mean|W|
  query = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["query"]
  np.testing.assert_allclose(query["channel_scale"], np.mean(np.abs(np.asarray(query["kernel"])), axis=0),
                             rtol=1e-6)


def test_summary_command_takes_the_binarizer_by_name(capsys):
  from bipft_jax import cli
  config_file = pathlib.Path(__file__).resolve().parent.parent / "configs" / "model.py"
  args = ["summary", "--config", f"{config_file}:tiny,binary", "--seq-len", "8"]
  assert cli.main(args + ["--config.linear_binarizer=dbllm_fdb"]) == 0
  assert "linear binarizer dbllm_fdb" in capsys.readouterr().out
  assert cli.main(args + ["--config.linear_binarizer=xnr"]) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if line]
  assert len(err) == 1 and "unknown linear binarizer 'xnr'; choose one of bipft, bnn" in err[0]


def test_fda_below_64_features_makes_no_empty_parameter_and_checkpoints(tmp_path):
  """FDA's noise MLPs are in // 64 wide: below 64 input features none is made (the released width-0 MLP
  computes 0), so orbax, which cannot write zero-size arrays, saves and restores the student."""
  from bipft_jax import checkpointing
  config = dataclasses.replace(TINY, hidden_size=32, num_heads=2, intermediate_size=128,
                               linear_binarizer="fda")
  module = model_lib.build(config, "classification")
  params = jax.jit(lambda key: model_params.init_params(module, key))(jax.random.key(0))
  assert all(np.size(leaf) for leaf in jax.tree.leaves(params))
  layer = params["bert"]["encoder"]["layer"]["0"]
  assert set(layer["attention"]["self"]["query"]) == {"kernel", "bias"}  # 32 features: no noise MLP
  assert layer["output"]["dense"]["act_noise_fc1"].shape == (128, 2)  # the FFN's 128: width 2
  checkpointing.save_params(str(tmp_path / "fda"), params, config, "classification")
  _, _, restored = checkpointing.restore_params(str(tmp_path / "fda"))
  jax.tree.map(np.testing.assert_array_equal, restored, params)
  batch = _batch()
  logits = module.apply({"params": restored}, batch["input_ids"], batch["token_type_ids"],
                        batch["attention_mask"])["logits"]
  assert logits.shape == (3, TINY.num_labels) and bool(jnp.all(jnp.isfinite(logits)))
