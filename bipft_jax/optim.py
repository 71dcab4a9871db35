"""AdamW with BERT's learning-rate schedule (METHOD.md sections 6 and 7).

The optimizer config has the fields learning_rate, warmup_steps, total_steps, schedule
("linear": linear warm-up then linear decay to 0 at total_steps; "constant": warm-up then flat),
weight_decay, b1, b2, eps, and optionally head_lr_multiplier (the heads, pretraining `cls` or the
finetuning `classifier`, learn that much faster: a fresh head on a short run). As in BERT, weight
decay skips biases, LayerNorms, and here also the binarizers' shifts (move biases) and scales
(alphas), which decay would drag towards zero: it applies to the weights, by their declared kind
(`kinds.DECAYED`, from `model_params.param_kinds`).
"""
from typing import Any

import flax
import jax
import optax

from bipft_jax import kinds as kinds_lib
from bipft_jax.errors import UserError

SCHEDULES = ("linear", "constant")


def learning_rate_schedule(config: Any) -> optax.Schedule:
  """The learning rate as a function of the optimizer step."""
  if config.schedule not in SCHEDULES:
    raise UserError(f"unknown optimizer schedule {config.schedule!r}; choose one of {', '.join(SCHEDULES)}")
  if config.learning_rate <= 0 or config.warmup_steps < 0:
    raise UserError(f"optimizer needs learning_rate > 0 and warmup_steps >= 0, got "
                    f"{config.learning_rate} and {config.warmup_steps}")
  warmup_steps = int(config.warmup_steps)
  if config.schedule == "linear":
    if config.total_steps <= warmup_steps:
      raise UserError(f"a linear schedule needs total_steps ({config.total_steps}) > warmup_steps "
                      f"({warmup_steps})")
    after = optax.linear_schedule(config.learning_rate, 0.0, int(config.total_steps) - warmup_steps)
  else:
    after = optax.constant_schedule(config.learning_rate)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, config.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(kinds: Any) -> Any:
  """True for the leaves weight decay applies to (kernels and embedding tables), from their kinds."""
  return jax.tree.map(lambda kind: kind in kinds_lib.DECAYED, kinds)


def head_mask(params: Any) -> Any:
  """True for the task heads' leaves: pretraining `cls/...`, the finetuning `classifier/...`."""
  flat = flax.traverse_util.flatten_dict(params)
  return flax.traverse_util.unflatten_dict({path: path[0] in ("cls", "classifier") for path in flat})


def make_optimizer(config: Any, kinds: Any) -> optax.GradientTransformation:
  """AdamW over the schedule above; `config` is the optimizer section of a job config, `kinds` the
  params' kinds (`model_params.param_kinds`)."""
  schedule = learning_rate_schedule(config)
  if config.weight_decay > 0:
    tx = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                     weight_decay=config.weight_decay, mask=decay_mask(kinds))
  else:
    tx = optax.adam(schedule, b1=config.b1, b2=config.b2, eps=config.eps)
  multiplier = config.get("head_lr_multiplier", 1.0)
  if multiplier != 1.0:
    tx = optax.chain(tx, optax.masked(optax.scale(multiplier), head_mask))
  return tx
