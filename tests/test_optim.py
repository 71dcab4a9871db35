"""AdamW and its schedule against torch.optim.AdamW + a LambdaLR of BERT's schedule."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bipft_jax import optim
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


def test_decay_mask_skips_biases_layernorms_and_alphas():
  params = {"dense": {"kernel": 0, "bias": 0, "move_bias": 0, "input_alpha": 0},
            "LayerNorm": {"scale": 0, "bias": 0}, "emb": {"embedding": 0}, "self": {"probs_alpha": 0}}
  assert optim.decay_mask(params) == {
      "dense": {"kernel": True, "bias": False, "move_bias": False, "input_alpha": False},
      "LayerNorm": {"scale": False, "bias": False}, "emb": {"embedding": True}, "self": {"probs_alpha": False}}


def test_matches_torch_adamw_with_bert_schedule():
  torch = pytest.importorskip("torch")
  config = _config()
  rng = np.random.default_rng(0)
  kernel, bias = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32)
  grads = [(rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32))
           for _ in range(5)]

  params = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  tx = optim.make_optimizer(config)
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
    optim.make_optimizer(_config(**overrides))


@pytest.mark.parametrize("head", ["cls", "classifier"])  # pretraining heads, the finetuning classifier
def test_head_lr_multiplier_scales_only_the_heads(head):
  params = {head: {"bias": jnp.zeros(3)}, "bert": {"bias": jnp.zeros(3)}}
  grads = {head: {"bias": jnp.array([1.0, -2.0, 3.0])}, "bert": {"bias": jnp.array([1.0, -2.0, 3.0])}}
  tx = optim.make_optimizer(_config(head_lr_multiplier=10.0, warmup_steps=0, schedule="constant"))
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates[head]["bias"], 10 * updates["bert"]["bias"], rtol=1e-6)
  assert float(jnp.abs(updates["bert"]["bias"]).max()) > 0
