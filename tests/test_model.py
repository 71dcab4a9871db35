"""Properties of the Flax BERT teacher and the 1-bit student on tiny configs."""
import dataclasses
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipft_jax import binarize, model, model_params

jax.config.update("jax_default_matmul_precision", "highest")

STUDENT = model.BertConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=32,
                           max_position_embeddings=16, binary=True, estimator_rank=1,
                           hidden_dropout=0.0, attention_dropout=0.0)
TEACHER = dataclasses.replace(STUDENT, binary=False)
ESTIMATORS = ("q_p", "k_p", "q_m", "k_m", "v_p")
ALPHAS = ("input_alpha", "query_alpha", "key_alpha", "value_alpha", "probs_alpha")


def _batch(batch=3, length=10, vocab=40, pads=(0, 3, 6), seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, size=(batch, length))
  mask = np.ones((batch, length), np.int32)
  for row, pad in enumerate(pads):
    if pad:
      ids[row, -pad:] = 0
      mask[row, -pad:] = 0
  types = np.zeros_like(ids)
  types[:, length // 2:] = 1
  types[mask == 0] = 0
  return {"input_ids": jnp.asarray(ids, jnp.int32), "token_type_ids": jnp.asarray(types, jnp.int32),
          "attention_mask": jnp.asarray(mask)}


def _forward(module, params, batch, **kwargs):
  return module.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"],
                      **kwargs)


def _randomized(params, seed=1):
  """Non-zero biases everywhere, so exact-zero ties do not hide anything."""
  flat = flax.traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for key, (path, value) in zip(keys, sorted(flat.items())):
    if path[-1] in ("bias", "move_bias"):
      flat[path] = 0.05 * jax.random.normal(key, value.shape)
  return flax.traverse_util.unflatten_dict(flat)


def _init(module, seed=0):
  return model_params.init_params(module, jax.random.key(seed))


def _student(config=STUDENT, head="pretraining", seed=0):
  module = model.build(config, head)
  params = _randomized(_init(module, seed))
  return module, model_params.calibrate_alphas(module, params, _batch())


def _paths(params):
  return set(flax.traverse_util.flatten_dict(params))


def test_bipft_a_has_no_estimators_and_runs():
  config = dataclasses.replace(STUDENT, estimator_rank=0)
  module, params = _student(config)
  assert not any(set(path) & set(ESTIMATORS) for path in _paths(params))
  out = _forward(module, params, _batch())
  assert out["mlm_logits"].shape == (3, 10, 40) and out["nsp_logits"].shape == (3, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(out))
  # The student's tree is the teacher's plus the extra leaves; BiPFT-B adds 5 estimators per layer.
  teacher_paths = _paths(_init(model.build(TEACHER)))
  assert teacher_paths < _paths(params)
  b_paths = _paths(_student()[1])
  assert len(b_paths - _paths(params)) == STUDENT.num_layers * 5 * 2


@pytest.mark.parametrize("heads, rank", [(4, 2), (2, 1), (8, 1)])
def test_estimators_work_for_any_head_count_and_rank(heads, rank):
  config = dataclasses.replace(STUDENT, num_heads=heads, estimator_rank=rank)
  module, params = _student(config)
  self_params = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]
  assert all(self_params[name]["kernel"].shape == (16, rank) for name in ESTIMATORS)
  out = _forward(module, params, _batch())
  assert out["attentions"][0].shape == (3, heads, 10, 10)
  # With zeroed estimators the model is exactly BiPFT-A with the same other weights.
  flat = flax.traverse_util.flatten_dict(params)
  zeroed = {p: (jnp.zeros_like(v) if set(p) & set(ESTIMATORS) else v) for p, v in flat.items()}
  without = {p: v for p, v in flat.items() if not set(p) & set(ESTIMATORS)}
  a_module = model.build(dataclasses.replace(config, estimator_rank=0))
  out_zeroed = _forward(module, flax.traverse_util.unflatten_dict(zeroed), _batch())
  out_a = _forward(a_module, flax.traverse_util.unflatten_dict(without), _batch())
  for x, y in zip(jax.tree.leaves(out_zeroed), jax.tree.leaves(out_a)):
    np.testing.assert_array_equal(x, y)
  # ...and the estimators do change it.
  assert not np.array_equal(out["hidden_states"][-1], out_zeroed["hidden_states"][-1])


def test_rank_must_divide_the_head_size():
  config = dataclasses.replace(STUDENT, estimator_rank=3)  # head size 4
  with pytest.raises(ValueError, match="estimator_rank 3 must divide the head size 4"):
    model_params.init_params(model.build(config), jax.random.key(0))


@pytest.mark.parametrize("config", [TEACHER, STUDENT], ids=["teacher", "student"])
def test_padded_keys_get_exactly_zero_probability(config):
  module = model.build(config)
  params = _randomized(model_params.init_params(module, jax.random.key(0)))
  if config.binary:
    params = model_params.calibrate_alphas(module, params, _batch())
  batch = _batch()
  out = _forward(module, params, batch)
  padded_keys = np.asarray(batch["attention_mask"] == 0)[:, None, None, :]
  for probs in out["attentions"]:
    probs = np.asarray(probs)
    assert np.all(probs[np.broadcast_to(padded_keys, probs.shape)] == 0.0)
    assert np.any(probs[np.broadcast_to(~padded_keys, probs.shape)] > 0)
  if config.binary:  # binarized probabilities take two values: 0 and that layer's alpha
    for i, probs in enumerate(out["attentions"]):
      alpha = params["bert"]["encoder"]["layer"][str(i)]["attention"]["self"]["probs_alpha"]
      assert set(np.unique(np.asarray(probs)).tolist()) == {0.0, float(alpha)}


@pytest.mark.parametrize("config", [TEACHER, STUDENT], ids=["teacher", "student"])
def test_padding_row_gets_no_lookup_gradient_but_the_decoder_updates_it(config):
  batch = _batch()
  assert np.any(batch["input_ids"] == 0)
  encoder = model.build(config, "encoder")
  params = _randomized(_init(encoder))

  def hidden_loss(p):
    return jnp.sum(_forward(encoder, p, batch)["hidden_states"][-1] ** 2)

  table_grad = jax.grad(hidden_loss)(params)["embeddings"]["word_embeddings"]["embedding"]
  assert not np.any(table_grad[0])
  used = np.unique(np.asarray(batch["input_ids"]))
  assert np.all(np.abs(table_grad[used[used > 0]]).sum(-1) > 0)

  pretraining = model.build(config)
  params = _randomized(_init(pretraining))

  def mlm_loss(p):
    return jnp.sum(_forward(pretraining, p, batch)["mlm_logits"])

  table_grad = jax.grad(mlm_loss)(params)["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert np.all(np.abs(table_grad[0]) > 0)


def test_k_p_and_k_m_biases_get_no_gradient():
  module, params = _student()
  batch = _batch()
  target = jax.random.normal(jax.random.key(5), (3, 10, 16))
  grads = jax.grad(lambda p: jnp.sum(_forward(module, p, batch)["hidden_states"][-1] * target))(params)
  for i in range(STUDENT.num_layers):
    g = grads["bert"]["encoder"]["layer"][str(i)]["attention"]["self"]
    for name in ("k_p", "k_m"):
      assert np.max(np.abs(g[name]["bias"])) < 1e-5 * np.max(np.abs(g["q_p"]["bias"])), (i, name)
    assert np.max(np.abs(g["q_p"]["bias"])) > 1e-4 and np.max(np.abs(g["v_p"]["bias"])) > 1e-4


@pytest.mark.parametrize("num_labels", [3, 1])
@pytest.mark.parametrize("binary", [False, True], ids=["teacher", "student"])
def test_classification_head(num_labels, binary):
  config = dataclasses.replace(STUDENT, binary=binary, num_labels=num_labels, classifier_dropout=0.1)
  module = model.build(config, "classification")
  params = model_params.init_params(module, jax.random.key(0))
  assert params["classifier"]["kernel"].shape == (16, num_labels)
  batch = _batch()
  out = _forward(module, params, batch)
  assert out["logits"].shape == (3, num_labels) and out["pooled"].shape == (3, 16)
  # Dropout 0.1 on the pooled output only in training.
  train = _forward(module, params, batch, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(train["logits"], out["logits"])
  np.testing.assert_array_equal(_forward(module, params, batch)["logits"], out["logits"])


@pytest.mark.parametrize("binary", [False, True], ids=["teacher", "student"])
def test_mean_pooling_averages_the_real_tokens_only(binary):
  config = dataclasses.replace(STUDENT, binary=binary, pooling="mean")
  module = model.build(config, "classification")
  params = _randomized(_init(module))
  batch = _batch()
  out = _forward(module, params, batch)
  last_BxLxD, mask_BxL = np.asarray(out["hidden_states"][-1]), np.asarray(batch["attention_mask"])
  for row in range(3):
    mean_D = last_BxLxD[row, mask_BxL[row] == 1].mean(axis=0)
    pooled_D = model.pool_tokens(out["hidden_states"][-1], batch["attention_mask"], "mean")[row]
    np.testing.assert_allclose(pooled_D, mean_D, rtol=1e-5, atol=1e-6)
  # The CLS-pooled model differs only in the pooler's input, with the same parameters.
  cls_out = _forward(model.build(dataclasses.replace(config, pooling="cls"), "classification"), params, batch)
  np.testing.assert_array_equal(cls_out["hidden_states"][-1], out["hidden_states"][-1])
  assert not np.allclose(cls_out["pooled"], out["pooled"], atol=1e-3)
  # More padding leaves a row's mean pooling unchanged (real tokens attend only to real tokens).
  longer = {k: jnp.pad(v, ((0, 0), (0, 4))) for k, v in batch.items()}
  np.testing.assert_allclose(_forward(module, params, longer)["logits"], out["logits"], atol=1e-5)


def test_unknown_pooling_is_refused():
  with pytest.raises(ValueError, match="unknown pooling 'max'"):
    model.BertConfig.from_dict({"pooling": "max"})


def test_mlm_positions_give_the_gathered_logits():
  module, params = _student()
  batch = _batch()
  positions = jnp.array([[0, 4, 9], [1, 2, 3], [6, 6, 0]])
  full = _forward(module, params, batch)["mlm_logits"]
  picked = _forward(module, params, batch, mlm_positions_BxN=positions)["mlm_logits"]
  expected = np.take_along_axis(np.asarray(full), np.asarray(positions)[..., None], axis=1)
  assert picked.shape == (3, 3, 40)
  np.testing.assert_allclose(picked, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("detach", [False, True])
def test_detached_heads_learn_without_moving_the_encoder(detach):
  module, params = _student()
  batch = _batch()

  def head_loss(p):
    out = _forward(module, p, batch, detach_heads=detach)
    return jnp.sum(out["mlm_logits"] ** 2) + jnp.sum(out["nsp_logits"] ** 2)

  grads = jax.grad(head_loss)(params)
  encoder_norm = _global_norm(grads["bert"])
  assert _global_norm(grads["cls"]) > 0
  assert (encoder_norm == 0) if detach else (encoder_norm > 0)
  # The forward pass is the same either way.
  np.testing.assert_array_equal(_forward(module, params, batch, detach_heads=detach)["mlm_logits"],
                                _forward(module, params, batch)["mlm_logits"])


def _global_norm(tree) -> float:
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def test_calibration_changes_only_alphas():
  module = model.build(STUDENT)
  params = _randomized(model_params.init_params(module, jax.random.key(0)))
  calibrated = model_params.calibrate_alphas(module, params, _batch())
  before, after = flax.traverse_util.flatten_dict(params), flax.traverse_util.flatten_dict(calibrated)
  assert before.keys() == after.keys()
  n_alphas = 0
  for path, value in before.items():
    if path[-1] in ALPHAS:
      n_alphas += 1
      assert value == 1.0 and after[path] != 1.0 and after[path] > 0, path
    else:
      np.testing.assert_array_equal(after[path], value, err_msg="/".join(path))
  assert n_alphas == STUDENT.num_layers * (6 + 4) + 1
  # Deterministic, and a second calibration from calibrated alphas gives the same values.
  again = flax.traverse_util.flatten_dict(model_params.calibrate_alphas(module, calibrated, _batch()))
  for path in before:
    np.testing.assert_array_equal(again[path], after[path])


def test_calibrated_probs_alpha_is_four_over_length_without_padding():
  module = model.build(STUDENT)
  params = model_params.calibrate_alphas(module, model_params.init_params(module, jax.random.key(0)), _batch(pads=(0, 0, 0)))
  alpha = params["bert"]["encoder"]["layer"]["0"]["attention"]["self"]["probs_alpha"]
  np.testing.assert_allclose(alpha, 4 / 10, rtol=1e-5)  # softmax rows sum to 1: mean P = 1/L


def test_binarized_word_embedding_uses_row_scales():
  table = jax.random.normal(jax.random.key(3), (40, 16)) * jnp.linspace(0.1, 2.0, 40)[:, None]
  ids = jnp.array([[3, 39, 0, 20]])
  out = model.WordEmbeddings(STUDENT).apply({"params": {"embedding": table}}, ids)
  t = np.asarray(table)
  expected = np.abs(t).mean(1, keepdims=True) * np.sign(t - t.mean())
  np.testing.assert_allclose(out[0], expected[[3, 39, 0, 20]], rtol=1e-6)
  magnitudes = np.abs(np.asarray(out[0]))
  assert magnitudes[1].max() > 3 * magnitudes[0].max()  # rows 3 and 39 have their own scales
  fp = model.WordEmbeddings(TEACHER).apply({"params": {"embedding": table}}, ids)
  np.testing.assert_array_equal(fp[0], t[[3, 39, 0, 20]])
  np.testing.assert_array_equal(out, jnp.take(binarize.bwn_rowwise(table), ids, axis=0))


def test_jit_agrees_with_eager():
  module, params = _student()
  batch = _batch()
  eager = _forward(module, params, batch)
  jitted = jax.jit(lambda p, b: _forward(module, p, b))(params, batch)
  for x, y in zip(eager["attentions"], jitted["attentions"]):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
    np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_remat_recomputes_each_layer_and_gives_the_gradients_to_rounding(binary):
  # model.remat wraps each layer in jax.checkpoint: the same parameters, the same loss and gradients up
  # to rounding (XLA fuses the recomputing program otherwise), dropout included.
  config = dataclasses.replace(STUDENT if binary else TEACHER, num_layers=3, hidden_dropout=0.1, attention_dropout=0.1)
  module, remat = (model.build(dataclasses.replace(config, remat=on), "pretraining") for on in (False, True))
  params = _randomized(_init(module))
  assert _paths(_init(remat)) == _paths(params)
  if binary:  # the activation scales, calibrated through either
    params, by_remat = (model_params.calibrate_alphas(m, params, _batch()) for m in (module, remat))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(y, x, rtol=1e-6), params, by_remat)
  batch = _batch()

  def loss(m, p):
    out = _forward(m, p, batch, deterministic=False, rngs={"dropout": jax.random.key(3)})
    return sum(jnp.sum(jnp.square(h)) for h in out["hidden_states"][1:]) + jnp.sum(jnp.square(out["mlm_logits"]))

  jaxprs = [str(jax.make_jaxpr(lambda p: loss(m, p))(params)) for m in (module, remat)]
  assert [j.count("remat2[") for j in jaxprs] == [0, config.num_layers]
  (plain, plain_grads), (recomputed, recomputed_grads) = (
      jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params) for m in (module, remat))
  np.testing.assert_allclose(recomputed, plain, rtol=1e-6)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(plain_grads))
  for g, h in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(recomputed_grads)):
    np.testing.assert_allclose(h, g, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("teacher_head, student_head", [
    ("encoder", "pretraining"),  # the demo: MiniLM has no MLM/NSP heads
    ("pretraining", "pretraining"),
    ("classification", "classification"),
    ("pretraining", "encoder"),
])
def test_student_from_teacher_takes_every_encoder_tensor(teacher_head, student_head):
  teacher = _randomized(_init(model.build(TEACHER, teacher_head), seed=3))
  student = model_params.merge_params(model.build(STUDENT, student_head), teacher, jax.random.key(0))
  under = lambda tree: tree.get("bert", tree)
  teacher_flat = flax.traverse_util.flatten_dict(under(teacher))
  student_flat = flax.traverse_util.flatten_dict(under(student))
  for path, value in teacher_flat.items():
    np.testing.assert_array_equal(student_flat[path], value, err_msg="/".join(path))
  if teacher_head == student_head == "pretraining":  # heads with the same names are copied too
    np.testing.assert_array_equal(student["cls"]["predictions"]["bias"], teacher["cls"]["predictions"]["bias"])


def test_student_from_teacher_refuses_a_teacher_tensor_without_place():
  teacher = _init(model.build(TEACHER, "encoder"))
  teacher["encoder"]["layer"]["9"] = teacher["encoder"]["layer"]["0"]
  with pytest.raises(ValueError, match="no place in the model.*encoder/layer/9"):
    model_params.merge_params(model.build(STUDENT), teacher, jax.random.key(0))


def test_merge_params_with_complete_refuses_a_source_missing_a_kept_tensor():
  source = _init(model.build(STUDENT, "pretraining"))
  merged = model_params.merge_params(model.build(STUDENT, "classification"), source, jax.random.key(0), complete=("bert",))
  np.testing.assert_array_equal(merged["bert"]["pooler"]["dense"]["kernel"], source["bert"]["pooler"]["dense"]["kernel"])
  del source["bert"]["pooler"]
  with pytest.raises(ValueError, match="tensors of the model are missing.*bert/pooler"):
    model_params.merge_params(model.build(STUDENT, "classification"), source, jax.random.key(0), complete=("bert",))
