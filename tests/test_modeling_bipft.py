"""The exported PyTorch model's binarizers and gradients: the release's vectors and our JAX model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bipft_jax import binarize, pytorch_io
from bipft_jax import model as model_lib
from bipft_jax.pytorch_model import modeling_bipft as mb
from reference_data import VECTORS, needs_vectors, quantizer_cases
from test_convert import padded_two_segment_batch, realistic_params, tiny_config


@needs_vectors
@pytest.mark.parametrize("case", quantizer_cases())
def test_autograd_functions_match_the_release_quantizers(case):
  ref = np.load(VECTORS / "quantizers.npz")
  x = torch.tensor(ref[f"{case}.x"], requires_grad=True)
  if case.startswith("bwn"):
    y = mb.BWN.apply(x, case == "bwn_rowwise")
  else:
    # Exports carry calibrated scales, so the lazy-init cases run with the alpha the release set.
    alpha = torch.tensor(ref[f"{case}.alpha_after_forward"], requires_grad=True)
    y = (mb.SignedBinarize if case.startswith("signed") else mb.UnsignedBinarize).apply(x, alpha)
  y.backward(torch.tensor(ref[f"{case}.grad_out"]))
  np.testing.assert_allclose(y.detach().numpy(), ref[f"{case}.y"], rtol=1e-6, atol=0)
  np.testing.assert_array_equal(x.grad.numpy(), ref[f"{case}.grad_x"])
  if not case.startswith("bwn"):
    np.testing.assert_allclose(alpha.grad.numpy(), ref[f"{case}.grad_alpha"], rtol=1e-5, atol=1e-7)


def test_training_gradients_match_jax():
  """Every parameter's gradient of MLM + NSP cross entropy in PyTorch equals the JAX model's."""
  config = tiny_config()
  batch = padded_two_segment_batch(config.vocab_size)
  params = realistic_params(config, "pretraining", batch)
  rng = np.random.default_rng(3)
  labels = np.where(rng.random(batch["input_ids"].shape) < 0.3, batch["input_ids"], -100)
  labels[:, 1] = batch["input_ids"][:, 1]  # at least one MLM target per row
  next_sentence = np.array([0, 1, 1])
  module = model_lib.build(config, "pretraining")

  def loss_fn(p):
    out = module.apply({"params": p}, *(jnp.asarray(batch[k]) for k in ("input_ids", "token_type_ids",
                                                                       "attention_mask")))
    mlm = out["mlm_logits"].reshape(-1, config.vocab_size)
    keep = labels.reshape(-1) != -100
    log_probs = jax.nn.log_softmax(mlm[keep])
    mlm_loss = -jnp.mean(jnp.take_along_axis(log_probs, labels.reshape(-1)[keep][:, None], axis=1))
    nsp_loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out["nsp_logits"]), next_sentence[:, None], 1))
    return mlm_loss + nsp_loss

  jax_loss, jax_grads = jax.value_and_grad(loss_fn)(params)

  hf_config = mb.BiPFTConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                             num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                             intermediate_size=config.intermediate_size, hidden_act="relu",
                             max_position_embeddings=config.max_position_embeddings, weight_bits=1, input_bits=1,
                             estimator_rank=config.estimator_rank)
  model = mb.BiPFTForPreTraining(hf_config).eval()  # eval: dropout off, as in the JAX forward
  model.load_state_dict({k: torch.from_numpy(v) for k, v in pytorch_io.to_torch_state(params).items()})
  out = model(**{k: torch.as_tensor(v) for k, v in batch.items()}, labels=torch.as_tensor(labels),
              next_sentence_label=torch.as_tensor(next_sentence))
  out.loss.backward()
  np.testing.assert_allclose(out.loss.item(), float(jax_loss), rtol=0, atol=1e-5)

  torch_grads = dict(model.named_parameters())
  expected = pytorch_io.to_torch_state(jax_grads)
  assert sorted(torch_grads) == sorted(expected)
  for name, grad in expected.items():
    if name.endswith(("k_p.bias", "k_m.bias")):
      atol = 1e-6  # exactly zero in exact arithmetic (softmax shift invariance): only noise here
    else:
      atol = 1e-6 + 1e-4 * float(np.abs(grad).max())
    np.testing.assert_allclose(torch_grads[name].grad.numpy(), grad, rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("alpha_value", [0.3, 1e-7], ids=["alpha", "clamped_alpha"])
def test_activation_binarizers_match_jax(signed, alpha_value):
  """Forward and both gradients equal bipft_jax.binarize's, also for a scale below the clamp."""
  rng = np.random.default_rng(5)
  x = (rng.normal(size=(4, 6, 8)) if signed else rng.random((4, 6, 8)) * 0.6).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  jax_fn = binarize.signed_binarize if signed else binarize.unsigned_binarize
  y, vjp = jax.vjp(jax_fn, jnp.asarray(x), jnp.asarray(alpha_value, jnp.float32))
  jax_grad_x, jax_grad_alpha = vjp(jnp.asarray(g))
  x_t = torch.tensor(x, requires_grad=True)
  alpha_t = torch.tensor(alpha_value, dtype=torch.float32, requires_grad=True)
  y_t = (mb.SignedBinarize if signed else mb.UnsignedBinarize).apply(x_t, alpha_t)
  y_t.backward(torch.tensor(g))
  np.testing.assert_array_equal(y_t.detach().numpy(), np.asarray(y))
  np.testing.assert_array_equal(x_t.grad.numpy(), np.asarray(jax_grad_x))
  np.testing.assert_allclose(alpha_t.grad.numpy(), np.asarray(jax_grad_alpha), rtol=1e-5)
  assert float(alpha_t.grad) != 0.0
