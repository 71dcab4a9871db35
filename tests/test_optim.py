"""AdamW and its schedule against torch.optim.AdamW + a LambdaLR of BERT's schedule."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bipft_jax import kinds, model, model_params, optim
from bipft_jax.errors import UserError


def _config(**overrides):
  c = ml_collections.ConfigDict(dict(learning_rate=1e-2, warmup_steps=2, total_steps=6, schedule="linear",
                                     weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, head_lr_multiplier=1.0))
  c.update(overrides)
  return c


def test_schedules():
  linear = optim.learning_rate_schedule(_config())
  np.testing.assert_allclose([linear(s) for s in range(7)], [0, 5e-3, 1e-2, 7.5e-3, 5e-3, 2.5e-3, 0], atol=1e-9)
  constant = optim.learning_rate_schedule(_config(schedule="constant", warmup_steps=0))
  np.testing.assert_allclose([constant(s) for s in (0, 100)], [1e-2, 1e-2])


KINDS = {"kernel": kinds.WEIGHT, "bias": kinds.BIAS}


def test_decay_mask_skips_biases_layernorms_and_alphas():
  config = model.BertConfig(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=16,
                            max_position_embeddings=8, binary=True)
  mask = optim.decay_mask(model_params.param_kinds(model.build(config, "classification")))
  layer = mask["bert"]["encoder"]["layer"]["0"]
  assert layer["attention"]["self"]["query"] == {"kernel": True, "bias": False, "move_bias": False,
                                                 "input_alpha": False}
  assert not any((layer["attention"]["self"]["probs_alpha"], layer["output"]["LayerNorm"]["scale"],
                  layer["output"]["LayerNorm"]["bias"]))
  assert layer["attention"]["self"]["q_p"] == {"kernel": True, "bias": False}  # FP estimators
  assert mask["bert"]["embeddings"]["word_embeddings"]["embedding"]
  assert mask["bert"]["embeddings"]["position_embeddings"]["embedding"]
  assert mask["classifier"] == {"kernel": True, "bias": False}


def test_matches_torch_adamw_with_bert_schedule():
  torch = pytest.importorskip("torch")
  config = _config()
  rng = np.random.default_rng(0)
  kernel, bias = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)
  grads = [(rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32))
           for _ in range(5)]

  params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  tx = optim.make_optimizer(config, KINDS)
  state = tx.init(params)
  for g_kernel, g_bias in grads:
    updates, state = tx.update({"kernel": jnp.asarray(g_kernel), "bias": jnp.asarray(g_bias)}, state, params)
    params = optax.apply_updates(params, updates)

  t_kernel, t_bias = torch.tensor(kernel, requires_grad=True), torch.tensor(bias, requires_grad=True)
  opt = torch.optim.AdamW([{"params": [t_kernel], "weight_decay": 0.1}, {"params": [t_bias], "weight_decay": 0.0}],
                          lr=config.learning_rate, betas=(0.9, 0.999), eps=1e-8)
  schedule = optim.learning_rate_schedule(config)
  lr_lambda = lambda step: float(schedule(step)) / config.learning_rate
  scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
  for g_kernel, g_bias in grads:
    t_kernel.grad, t_bias.grad = torch.tensor(g_kernel), torch.tensor(g_bias)
    opt.step()
    scheduler.step()
  np.testing.assert_allclose(params["kernel"], t_kernel.detach().numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(params["bias"], t_bias.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overrides, match", [
    (dict(schedule="cosine"), "unknown optimizer schedule"),
    (dict(total_steps=2), "total_steps"),
    (dict(learning_rate=0.0), "learning_rate > 0"),
])
def test_bad_optimizer_configs(overrides, match):
  with pytest.raises(UserError, match=match):
    optim.make_optimizer(_config(**overrides), KINDS)


@pytest.mark.parametrize("head", ["cls", "classifier"])  # pretraining heads, the finetuning classifier
def test_head_lr_multiplier_scales_only_the_heads(head):
  params = {head: {"bias": jnp.zeros(3)}, "bert": {"bias": jnp.zeros(3)}}
  grads = {head: {"bias": jnp.array([1.0, -2.0, 3.0])}, "bert": {"bias": jnp.array([1.0, -2.0, 3.0])}}
  tx = optim.make_optimizer(_config(head_lr_multiplier=10.0, warmup_steps=0, schedule="constant"),
                            {head: {"bias": kinds.BIAS}, "bert": {"bias": kinds.BIAS}})
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates[head]["bias"], 10 * updates["bert"]["bias"], rtol=1e-6)
  assert float(jnp.abs(updates["bert"]["bias"]).max()) > 0
