"""`--config configs/x.py:arg --config.field=value`, as big_vision and ml_collections users expect.

A config file defines `get_config(arg: str | None) -> ml_collections.ConfigDict`. Overrides are
typed by the field they replace (ConfigDict's own type-safety); unknown fields and unparsable
values are UserErrors.
"""
import ast
import importlib.util
import os
from typing import Iterable, Optional

import ml_collections

from bipft_jax.errors import UserError

OVERRIDE_PREFIX = "--config."


def load_config(spec: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]` and applies `field.sub=value` overrides."""
  path, _, arg = spec.partition(":")
  module = load_module(path)
  if not hasattr(module, "get_config"):
    raise UserError(f"config file {path} has no get_config(arg) function")
  try:
    config = module.get_config(arg or None)
  except (ValueError, KeyError) as e:
    raise UserError(f"{spec}: {e}") from None
  for item in overrides:
    apply_override(config, item)
  return config


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


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `field.sub=value` (without the --config. prefix)."""
  key, sep, text = item.partition("=")
  if not sep:
    raise UserError(f"config override {item!r} needs the form --config.field=value")
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise UserError(f"unknown config field {key!r}")
    node = node[part]
  if leaf not in node:
    raise UserError(f"unknown config field {key!r}; fields here: {sorted(node.keys())}")
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


def add_config_argument(parser, default: Optional[str] = None) -> None:
  """Adds --config (plus free-form --config.field=value overrides, see `split_overrides`)."""
  parser.add_argument("--config", default=default, required=default is None,
                      help="config file and argument, e.g. configs/pretrain.py:demo; override fields "
                           "with --config.field=value")


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
