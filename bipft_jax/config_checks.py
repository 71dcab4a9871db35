"""Every field of a job config checked (type and range) before anything is read, compiled, written
or deleted: one function per config type, called first by each command that consumes it.

  check_pretrain   configs/pretrain.py (bipft pretrain, bipft evaluate of a pretraining checkpoint)
  check_glue       configs/glue.py (bipft finetune, evaluate, eval-pytorch)

The `model` section is checked by `model.BertConfig` itself (its `__post_init__`).
"""
import math

from bipft_jax import optim
from bipft_jax.errors import UserError


def _value(config, name: str):
  for part in name.split("."):
    config = config[part]
  return config


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def ints_at_least(config, minimum: int, *names: str) -> None:
  """UserError unless each field is an int >= minimum."""
  for name in names:
    value = _value(config, name)
    if not _is_int(value) or value < minimum:
      raise UserError(f"config field {name} must be an integer >= {minimum}, got {value!r}")


def numbers_in(config, low: float, high: float, *names: str, open_low: bool = False,
               open_high: bool = False) -> None:
  """UserError unless each field is a finite number in [low, high] (open ends: `open_low`, `open_high`)."""
  for name in names:
    value = _value(config, name)
    if not (_is_number(value) and (low < value if open_low else low <= value)
            and (value < high if open_high else value <= high)):
      interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
      raise UserError(f"config field {name} must be a finite number in {interval}, got {value!r}")


def one_of(config, name: str, choices) -> None:
  value = _value(config, name)
  if value not in choices:
    raise UserError(f"unknown {name} {value!r}; choose one of {', '.join(map(str, choices))}")


def check_optimizer(config) -> None:
  """The `optimizer` section: a finite positive learning rate, Adam's betas in [0, 1), ..."""
  one_of(config, "optimizer.schedule", optim.SCHEDULES)
  numbers_in(config, 0, math.inf, "optimizer.learning_rate", "optimizer.eps", open_low=True)
  numbers_in(config, 0, math.inf, "optimizer.weight_decay", "optimizer.max_grad_norm")
  numbers_in(config, 0, 1, "optimizer.b1", "optimizer.b2", open_high=True)
  ints_at_least(config, 0, "optimizer.warmup_steps", "optimizer.total_steps")
  if "head_lr_multiplier" in config.optimizer:
    numbers_in(config, 0, math.inf, "optimizer.head_lr_multiplier", open_low=True)


def check_model(model_fields: dict) -> None:
  """The model section, as `model.BertConfig` checks it."""
  from bipft_jax import model as model_lib
  try:
    model_lib.BertConfig.from_dict(model_fields)
  except (TypeError, ValueError) as e:
    raise UserError(f"bad model config: {e}") from None


def check_pretrain(config) -> None:
  """A configs/pretrain.py config."""
  from bipft_jax.data import pipeline, sources
  ints_at_least(config, 1, "batch_size", "grad_accum_steps", "total_steps", "checkpoint_every",
                "keep_checkpoints", "log_every", "eval_every", "eval_batches", "eval_batch_size",
                "data.max_predictions")
  ints_at_least(config, 0, "seed", "data.shards", "keep_every")
  ints_at_least(config, -1, "data.workers")  # -1: auto
  ints_at_least(config, 8, "data.max_seq_length")
  if config.keep_every % config.checkpoint_every:
    raise UserError(f"keep_every ({config.keep_every}) must be a multiple of checkpoint_every "
                    f"({config.checkpoint_every}): only the steps saved can be kept")
  numbers_in(config, 0, 1, "data.mask_prob", open_low=True)
  numbers_in(config, 0, 1, "data.short_seq_prob")
  one_of(config, "data.source", sources.SOURCES)
  one_of(config, "data.shard_by", sources.SHARD_BY)
  if config.data.shard_by == "files" and config.data.source not in sources.FILE_SOURCES:
    raise UserError(f"data.shard_by=files deals files to the data shards: data.source {config.data.source!r} has "
                    f"none (use it with {' or '.join(sources.FILE_SOURCES)}, or set data.shard_by=documents)")
  if config.data.source not in sources.FILE_SOURCES:
    named = [f"data.{field}" for field in ("paths", "eval_paths") if config.data[field]]
    if named:  # they would be ignored: the run would train on the source's own corpus
      raise UserError(f"{' and '.join(named)} {'are' if len(named) > 1 else 'is'} set, but data.source="
                      f"{config.data.source!r} reads no files: set --config.data.source=text (or jsonl) to train "
                      "on them")
  one_of(config, "data.masking", pipeline.MASKING)
  check_optimizer(config)
  check_profile(config)
  check_model(config.model.to_dict())


def check_glue(config) -> None:
  """A configs/glue.py config (the model section with the task-independent fields it sets)."""
  from bipft_jax import model as model_lib
  from bipft_jax import precision
  from bipft_jax.glue import tasks
  ints_at_least(config, 1, "epochs", "batch_size", "eval_batch_size", "min_bucket", "log_every")
  ints_at_least(config, 0, "seed", "steps_per_epoch", "max_train_examples", "data.split_seed", "checkpoint_every",
                "early_stop_patience")
  ints_at_least(config, -1, "init.step")  # -1: the latest
  ints_at_least(config, 3, "max_length")  # [CLS] a [SEP]: nothing shorter holds a token
  numbers_in(config, 0, 1, "dropout", open_high=True)
  numbers_in(config, 0, 1, "data.dev_fraction", open_low=True, open_high=True)
  numbers_in(config, 0, math.inf, "early_stop_min_delta")
  one_of(config, "pooling", model_lib.POOLINGS)
  if config.precision:  # empty: the init's
    one_of(config, "precision", precision.PRECISIONS)
  one_of(config, "init.kind", ("checkpoint", "teacher", "scratch"))
  one_of(config, "data.format", tasks.FORMATS)
  check_distill(config)
  check_optimizer(config)
  check_profile(config)
  check_model({**config.model.to_dict(), "pooling": config.pooling, "hidden_dropout": config.dropout,
               "attention_dropout": config.dropout, "classifier_dropout": config.dropout})


def check_profile(config) -> None:
  """The `profile` section: a step to start a trace at (0: none) and how many steps it takes."""
  ints_at_least(config, 0, "profile.first_step")
  ints_at_least(config, 1, "profile.steps")


def check_distill(config) -> None:
  """The `distill` section of a GLUE config: non-negative weights, a positive temperature, and with a
  teacher at least one term that uses it."""
  numbers_in(config, 0, math.inf, "distill.temperature", open_low=True)
  weights = ("distill.label_weight", "distill.logit_weight", "distill.hidden_weight", "distill.attention_weight")
  numbers_in(config, 0, math.inf, *weights)
  if config.distill.teacher and not any(_value(config, w) for w in weights[1:]):
    raise UserError("distill.teacher is set but distill.logit_weight, hidden_weight and attention_weight are "
                    "all 0: set one of them, or leave distill.teacher empty")
