"""The training losses: pretraining's distillation loss (METHOD.md section 6) and its parts,

total = softCE(student NSP, teacher NSP) + mean_l MSE(H_s^l, H_t^l) + CE_mlm + CE_nsp,
the hidden-state MSE over the embedding output and every layer output; the finetuning task loss;
and the terms of downstream (task-level) distillation from a finetuned teacher.
"""
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100


def cross_entropy(logits_NxC: jax.Array, labels_N: jax.Array) -> jax.Array:
  """Mean token cross entropy over labels != -100 (torch's CrossEntropyLoss)."""
  logits_NxC = logits_NxC.reshape(-1, logits_NxC.shape[-1])
  labels_N = labels_N.reshape(-1)
  valid_N = labels_N != IGNORE_INDEX
  log_probs_NxC = jax.nn.log_softmax(logits_NxC, axis=-1)
  picked_N = jnp.take_along_axis(log_probs_NxC, jnp.where(valid_N, labels_N, 0)[:, None], axis=-1)[:, 0]
  return -jnp.sum(jnp.where(valid_N, picked_N, 0.0)) / jnp.maximum(jnp.sum(valid_N), 1)


def soft_cross_entropy(student_logits_BxC: jax.Array, teacher_logits_BxC: jax.Array) -> jax.Array:
  """mean over B x C of -softmax(teacher) * log_softmax(student), as the release computes it."""
  teacher_probs = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits_BxC), axis=-1)
  return jnp.mean(-teacher_probs * jax.nn.log_softmax(student_logits_BxC, axis=-1))


def hidden_mse(student_states: Sequence[jax.Array], teacher_states: Sequence[jax.Array],
               attention_mask_BxL: Optional[jax.Array] = None) -> tuple:
  """(mean over layers, per-layer list) of the MSE between hidden states.

  With `attention_mask_BxL`, padded positions are left out of each mean; the release includes them.
  """
  if len(student_states) != len(teacher_states):
    raise ValueError(f"student has {len(student_states)} hidden states, teacher {len(teacher_states)}")
  per_layer = []
  for s_BxLxD, t_BxLxD in zip(student_states, teacher_states):
    sq_BxLxD = jnp.square(s_BxLxD - jax.lax.stop_gradient(t_BxLxD))
    if attention_mask_BxL is None:
      per_layer.append(jnp.mean(sq_BxLxD))
    else:
      w_BxLx1 = attention_mask_BxL.astype(sq_BxLxD.dtype)[..., None]
      per_layer.append(jnp.sum(sq_BxLxD * w_BxLx1) / (jnp.sum(w_BxLx1) * sq_BxLxD.shape[-1]))
  return sum(per_layer) / len(per_layer), per_layer


def distillation_loss(student_out: dict, teacher_out: dict, batch: dict, *, nsp_distill: bool = True,
                      mask_padding_in_mse: bool = False, mlm_labels: Optional[jax.Array] = None) -> tuple:
  """(total, metrics) for one batch.

  `student_out`/`teacher_out` are model outputs (`hidden_states`, `mlm_logits`, `nsp_logits`).
  `mlm_labels` defaults to `batch['labels']`; pass the gathered labels when the student's MLM
  logits were computed only at masked positions. `nsp_distill=False` drops the soft-CE term (a
  teacher without an NSP head).
  """
  labels = batch["labels"] if mlm_labels is None else mlm_labels
  mlm_loss = cross_entropy(student_out["mlm_logits"], labels)
  nsp_loss = cross_entropy(student_out["nsp_logits"], batch["next_sentence_label"])
  mask = batch["attention_mask"] if mask_padding_in_mse else None
  rep_loss, rep_layerwise = hidden_mse(student_out["hidden_states"], teacher_out["hidden_states"], mask)
  cls_loss = (soft_cross_entropy(student_out["nsp_logits"], teacher_out["nsp_logits"])
              if nsp_distill else jnp.zeros(()))
  total = cls_loss + rep_loss + mlm_loss + nsp_loss
  metrics = {"total_loss": total, "cls_dist_loss": cls_loss, "rep_dist_loss": rep_loss,
             "real_loss": mlm_loss + nsp_loss, "mlm_loss": mlm_loss, "nsp_loss": nsp_loss,
             "rep_dist_layerwise": jnp.stack(rep_layerwise)}
  return total, metrics


def task_loss(logits_BxC: jax.Array, labels_B: jax.Array, weights_B: jax.Array, regression: bool) -> jax.Array:
  """Finetuning's loss: the weighted mean of MSE (regression, one output) or cross entropy over the
  real rows (`weights_B` > 0; padding rows have 0)."""
  if regression:
    squared_B = (logits_BxC[:, 0] - labels_B) ** 2
    return jnp.sum(squared_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)
  return cross_entropy(logits_BxC, jnp.where(weights_B > 0, labels_B, IGNORE_INDEX))


# ----------------------------------------------------------------------------------------------
# Downstream (task-level) distillation from a finetuned teacher, as BiT does it on GLUE


def layer_map(student_layers: int, teacher_layers: int) -> list:
  """Teacher layer (1-based) each student layer 1..S learns from: TinyBERT's uniform map, k -> k T / S."""
  if teacher_layers % student_layers:
    raise ValueError(f"the teacher's {teacher_layers} layers are not a multiple of the student's {student_layers}")
  return [k * teacher_layers // student_layers for k in range(1, student_layers + 1)]


def _row_mean(per_row_B: jax.Array, weights_B: jax.Array) -> jax.Array:
  return jnp.sum(per_row_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)


def _mse_B(s: jax.Array, t: jax.Array) -> jax.Array:
  """Per-row mean squared difference to the (stopped) teacher, over every other axis."""
  return jnp.mean(jnp.square(s - jax.lax.stop_gradient(t)).reshape(s.shape[0], -1), axis=-1)


def task_distillation(student_out: dict, teacher_out: dict, weights_B: jax.Array, *, temperature: float,
                      logit_weight: float, hidden_weight: float, attention_weight: float) -> tuple:
  """(weighted sum, terms) of the task-level distillation terms over the real rows (`weights_B` > 0):

  - logits: soft cross entropy -sum_c softmax(t/T) log softmax(s/T), averaged over classes as BiT's
    `soft_cross_entropy` does (MSE between the outputs for a regression task);
  - hidden: the sum over the embedding output and each student layer k of the MSE to teacher layer
    k T / S (`layer_map`), as BiT's rep loss sums its layers;
  - attention: the same sum over the layers' attention probabilities.
  A term with weight 0 is not computed (its shapes need not match)."""
  terms, total = {}, jnp.zeros(())
  if logit_weight:
    s_BxC, t_BxC = student_out["logits"], jax.lax.stop_gradient(teacher_out["logits"])
    if s_BxC.shape[-1] == 1:
      per_row_B = _mse_B(s_BxC, t_BxC)
    else:
      per_row_B = jnp.mean(-jax.nn.softmax(t_BxC / temperature) * jax.nn.log_softmax(s_BxC / temperature), -1)
    terms["logit_distill_loss"] = _row_mean(per_row_B, weights_B)
    total += logit_weight * terms["logit_distill_loss"]
  student_layers = len(student_out["attentions"])
  mapped = layer_map(student_layers, len(teacher_out["attentions"]))
  if hidden_weight:
    pairs = [(0, 0)] + list(zip(range(1, student_layers + 1), mapped))
    student_states, teacher_states = student_out["hidden_states"], teacher_out["hidden_states"]
    terms["hidden_distill_loss"] = sum(_row_mean(_mse_B(student_states[s], teacher_states[t]), weights_B)
                                       for s, t in pairs)
    total += hidden_weight * terms["hidden_distill_loss"]
  if attention_weight:
    terms["attention_distill_loss"] = sum(
        _row_mean(_mse_B(student_out["attentions"][s - 1], teacher_out["attentions"][t - 1]), weights_B)
        for s, t in zip(range(1, student_layers + 1), mapped))
    total += attention_weight * terms["attention_distill_loss"]
  return total, terms
