"""The distillation loss and its parts against straightforward torch / numpy computations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from bipft_jax import losses

jax.config.update("jax_default_matmul_precision", "highest")

RNG = np.random.default_rng(0)


def _labels(n, classes, ignored):
  labels = RNG.integers(0, classes, size=n)
  labels[RNG.permutation(n)[:ignored]] = -100
  return labels


@pytest.mark.parametrize("shape, classes, ignored", [((4, 8), 11, 20), ((6,), 2, 0), ((3, 5), 7, 14)])
def test_cross_entropy_matches_torch(shape, classes, ignored):
  n = int(np.prod(shape))
  logits = RNG.normal(size=(*shape, classes)).astype(np.float32) * 3
  labels = _labels(n, classes, ignored).reshape(shape)
  ours, grad = jax.value_and_grad(losses.cross_entropy)(jnp.asarray(logits), jnp.asarray(labels))
  logits_t = torch.tensor(logits.reshape(n, classes), requires_grad=True)
  ref = torch.nn.CrossEntropyLoss(ignore_index=-100)(logits_t, torch.tensor(labels.reshape(n)))
  ref.backward()
  np.testing.assert_allclose(ours, ref.item(), rtol=1e-6)
  np.testing.assert_allclose(grad.reshape(n, classes), logits_t.grad.numpy(), atol=1e-7)


def test_cross_entropy_with_every_label_ignored_is_zero_not_nan():
  # torch returns nan here; a batch without masked tokens must not poison training.
  logits = jnp.asarray(RNG.normal(size=(2, 3, 5)), jnp.float32)
  loss, grad = jax.value_and_grad(losses.cross_entropy)(logits, jnp.full((2, 3), -100))
  assert float(loss) == 0.0 and not np.any(grad)


def test_soft_cross_entropy_matches_torch_and_spares_the_teacher():
  student = RNG.normal(size=(5, 2)).astype(np.float32)
  teacher = RNG.normal(size=(5, 2)).astype(np.float32)
  s_t = torch.tensor(student, requires_grad=True)
  ref = (-torch.softmax(torch.tensor(teacher), -1) * torch.log_softmax(s_t, -1)).mean()
  ref.backward()
  ours, (grad_s, grad_t) = jax.value_and_grad(losses.soft_cross_entropy, argnums=(0, 1))(
      jnp.asarray(student), jnp.asarray(teacher))
  np.testing.assert_allclose(ours, ref.item(), rtol=1e-6)
  np.testing.assert_allclose(grad_s, s_t.grad.numpy(), atol=1e-7)
  assert not np.any(grad_t)
  # By hand: the mean over B x C, i.e. half the usual per-example soft CE for two classes.
  p = np.exp(teacher) / np.exp(teacher).sum(-1, keepdims=True)
  log_q = student - np.log(np.exp(student).sum(-1, keepdims=True))
  np.testing.assert_allclose(ours, np.mean(-p * log_q), rtol=1e-6)


def _states(n, shape):
  return [jnp.asarray(RNG.normal(size=shape), jnp.float32) for _ in range(n)]


def test_hidden_mse_without_mask_matches_torch():
  student, teacher = _states(3, (2, 6, 4)), _states(3, (2, 6, 4))
  mean, per_layer = losses.hidden_mse(student, teacher)
  ref = [torch.nn.functional.mse_loss(torch.tensor(np.asarray(s)), torch.tensor(np.asarray(t))).item()
         for s, t in zip(student, teacher)]
  np.testing.assert_allclose(per_layer, ref, rtol=1e-6)
  np.testing.assert_allclose(mean, np.mean(ref), rtol=1e-6)
  grads = jax.grad(lambda t: losses.hidden_mse(student, t)[0])(teacher)
  assert not any(np.any(g) for g in grads)  # the teacher is frozen


def test_hidden_mse_with_padding_mask():
  student, teacher = _states(2, (2, 5, 3)), _states(2, (2, 5, 3))
  mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
  mean, per_layer = losses.hidden_mse(student, teacher, jnp.asarray(mask))
  keep = mask.astype(bool)
  ref = [np.mean((np.asarray(s)[keep] - np.asarray(t)[keep]) ** 2) for s, t in zip(student, teacher)]
  np.testing.assert_allclose(per_layer, ref, rtol=1e-6)
  np.testing.assert_allclose(mean, np.mean(ref), rtol=1e-6)
  # Padded positions get no gradient and do not move the loss.
  grads = jax.grad(lambda s: losses.hidden_mse(s, teacher, jnp.asarray(mask))[0])(student)
  assert not any(np.any(np.asarray(g)[~keep]) for g in grads)
  changed = [s.at[1, 3].add(100.0) for s in student]
  np.testing.assert_allclose(losses.hidden_mse(changed, teacher, jnp.asarray(mask))[0], mean, rtol=1e-6)


def test_hidden_mse_layer_count_mismatch():
  with pytest.raises(ValueError, match="student has 2 hidden states, teacher 3"):
    losses.hidden_mse(_states(2, (1, 2, 2)), _states(3, (1, 2, 2)))


def _outputs(vocab=9, batch=2, length=5, hidden=3):
  return {"hidden_states": _states(3, (batch, length, hidden)),
          "mlm_logits": jnp.asarray(RNG.normal(size=(batch, length, vocab)), jnp.float32),
          "nsp_logits": jnp.asarray(RNG.normal(size=(batch, 2)), jnp.float32)}


def test_distillation_loss_is_the_sum_of_its_parts():
  student, teacher = _outputs(), _outputs()
  batch = {"labels": jnp.asarray(_labels(10, 9, 6).reshape(2, 5)), "next_sentence_label": jnp.array([0, 1]),
           "attention_mask": jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])}
  total, m = losses.distillation_loss(student, teacher, batch)
  mlm = losses.cross_entropy(student["mlm_logits"], batch["labels"])
  nsp = losses.cross_entropy(student["nsp_logits"], batch["next_sentence_label"])
  soft = losses.soft_cross_entropy(student["nsp_logits"], teacher["nsp_logits"])
  rep = losses.hidden_mse(student["hidden_states"], teacher["hidden_states"])[0]
  np.testing.assert_allclose([m["mlm_loss"], m["nsp_loss"], m["cls_dist_loss"], m["rep_dist_loss"]],
                             [mlm, nsp, soft, rep], rtol=1e-6)
  np.testing.assert_allclose(total, mlm + nsp + soft + rep, rtol=1e-6)
  np.testing.assert_allclose(m["real_loss"], mlm + nsp, rtol=1e-6)
  assert m["rep_dist_layerwise"].shape == (3,)

  masked_total, masked = losses.distillation_loss(student, teacher, batch, mask_padding_in_mse=True)
  rep_masked = losses.hidden_mse(student["hidden_states"], teacher["hidden_states"], batch["attention_mask"])[0]
  np.testing.assert_allclose(masked["rep_dist_loss"], rep_masked, rtol=1e-6)
  assert abs(float(masked["rep_dist_loss"]) - float(rep)) > 1e-4
  np.testing.assert_allclose(masked_total - masked["rep_dist_loss"], total - m["rep_dist_loss"], rtol=1e-6)

  no_soft, m = losses.distillation_loss(student, teacher, batch, nsp_distill=False)
  assert float(m["cls_dist_loss"]) == 0.0
  np.testing.assert_allclose(no_soft, total - soft, rtol=1e-6)


def test_distillation_loss_with_gathered_mlm_labels():
  # MLM logits computed only at 2 positions per row: their labels are passed in explicitly.
  student, teacher = _outputs(), _outputs()
  student["mlm_logits"] = student["mlm_logits"][:, :2]
  gathered = jnp.array([[3, -100], [7, 1]])
  batch = {"labels": jnp.full((2, 5), -100), "next_sentence_label": jnp.array([1, 0]),
           "attention_mask": jnp.ones((2, 5), jnp.int32)}
  _, m = losses.distillation_loss(student, teacher, batch, mlm_labels=gathered)
  np.testing.assert_allclose(m["mlm_loss"], losses.cross_entropy(student["mlm_logits"], gathered), rtol=1e-6)
  assert float(m["mlm_loss"]) > 0
