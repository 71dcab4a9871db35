"""`--config configs/x.py:arg --config.field=value`, as big_vision and ml_collections users expect.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`. Overrides are
typed by the field they replace (ConfigDict's own type-safety); unknown fields and unparsable
values are UserErrors.
"""
import ast
import difflib
import importlib.util
import os
from typing import Iterable, Optional

import ml_collections

from bipft_jax.errors import UserError

OVERRIDE_PREFIX = "--config."
# What each kind of config file is called in errors, and the file that makes one.
KINDS = {"pretrain": "a pretraining config (configs/pretrain.py)",
         "glue": "a GLUE config (configs/glue.py:task=NAME)",
         "track": "a track config (configs/track.py)",
         "study": "a study config (configs/study.py)",
         "model": "a model config (configs/model.py:SIZE)"}


def load_config(spec: str, overrides: Iterable[str] = (), kinds: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and applies `field.sub=value` overrides; with `kinds` (of KINDS), a config of
  another kind is a UserError naming what it is and what the command takes."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} has no get_config(arg) function")
  try:
    config = module.get_config(arg or None)
  except (ValueError, KeyError) as e:
    raise UserError(f"{spec}: {e}") from None
  kind = config_kind(config)
  if kinds and kind not in kinds:
    raise UserError(f"{spec} is {KINDS[kind] if kind else 'no config of bipft'}; this command takes "
                    f"{' or '.join(KINDS[k] for k in kinds)}")
  for item in overrides:
    apply_override(config, item)
  return config


def config_kind(config) -> Optional[str]:
  """Which of KINDS `config` is, by the fields only that kind has; None for none of them."""
  if "task" in config:
    return "glue"
  if "teacher" in config and "max_predictions" in config.get("data", {}):
    return "pretrain"
  if "rows" in config:
    return "track"
  if "methods" in config:
    return "study"
  if "hidden_size" in config:
    return "model"
  return None


def load_module(path: str):
  """The Python config file at `path`, executed as a module (not added to sys.modules)."""
  if not os.path.isfile(path):
    raise UserError(f"config file {path} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"bipft_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:
    raise UserError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
  return module


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare string such as a path


def _did_you_mean(name: str, node) -> str:
  """` (did you mean 'x'?)` for the field of `node` closest to a misspelt `name`, else ""."""
  close = difflib.get_close_matches(name, [k for k in node.keys() if isinstance(k, str)], n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `field.sub=value` (without the --config. prefix)."""
  key, sep, text = item.partition("=")
  if not sep:
    raise UserError(f"config override {item!r} needs the form --config.field=value")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise UserError(f"unknown config field {key!r}{_did_you_mean(part, node)}")
    node = node[part]
  if leaf not in node:
    raise UserError(f"unknown config field {key!r}{_did_you_mean(leaf, node)}; fields here: {sorted(node.keys())}")
  value = _parse_value(text)
  current = node[leaf]
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, str) and not isinstance(value, str):
    value = text
  try:
    node[leaf] = value
  except TypeError as e:
    raise UserError(f"bad value for config field {key!r}: {e}") from None


def add_config_argument(parser, kinds: Iterable[str], default: Optional[str] = None) -> None:
  """Adds --config, naming the KINDS of config the command takes (plus free-form --config.field=value
  overrides, see `split_overrides`)."""
  parser.add_argument("--config", default=default, required=default is None,
                      help=f"{' or '.join(KINDS[k] for k in kinds)}, FILE.py:ARG; override fields with "
                           "--config.field=value")


def split_overrides(argv: Iterable[str]) -> tuple:
  """(other args, overrides) where overrides are the `--config.x=y` items without the prefix."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(OVERRIDE_PREFIX):
      item = arg[len(OVERRIDE_PREFIX):]
      if "=" not in item and i + 1 < len(argv):  # --config.field value
        item, i = f"{item}={argv[i + 1]}", i + 1
      overrides.append(item)
    else:
      rest.append(arg)
    i += 1
  return rest, overrides
