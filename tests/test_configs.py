"""configs/model.py: every named size builds a model config, variants switch the student on."""
import dataclasses
import pathlib

import pytest

from bipft_jax import config_loading, model, pytorch_io
from bipft_jax.errors import UserError

MODEL_CONFIG = str(pathlib.Path(__file__).resolve().parent.parent / "configs" / "model.py")
SIZES = {"tiny": (2, 128, 2, 512), "mini": (4, 256, 4, 1024), "small": (4, 512, 8, 2048),
         "medium": (8, 512, 8, 2048), "base": (12, 768, 12, 3072), "large": (24, 1024, 16, 4096),
         "minilm-l6": (6, 384, 12, 1536)}


def _load(arg: str, *overrides: str) -> model.BertConfig:
  return model.BertConfig.from_dict(config_loading.load_config(f"{MODEL_CONFIG}:{arg}", overrides))


def test_fields_are_exactly_bert_configs():
  fields = {f.name for f in dataclasses.fields(model.BertConfig)}
  assert set(config_loading.load_config(MODEL_CONFIG).keys()) == fields


@pytest.mark.parametrize("size", sorted(SIZES))
def test_sizes(size):
  config = _load(size)
  assert (config.num_layers, config.hidden_size, config.num_heads, config.intermediate_size) == SIZES[size]
  assert not config.binary and config.mlm_transform_act == "gelu"


def test_student_variants():
  student = _load("base,binary")
  assert student.binary and student.estimator_rank == 1 and student.mlm_transform_act == "relu"
  bipft_a = _load("tiny,bipft_a")
  assert bipft_a.binary and bipft_a.estimator_rank == 0 and bipft_a.hidden_size == 128
  assert _load("small,binary", "num_layers=2").num_layers == 2


def test_minilm_size_matches_the_real_checkpoint(minilm_dir):
  assert _load("minilm-l6") == pytorch_io.config_from_hf(pytorch_io.read_config(str(minilm_dir)))


def test_unknown_size_is_a_user_error():
  with pytest.raises(UserError, match="unknown model size or variant 'huge'"):
    config_loading.load_config(f"{MODEL_CONFIG}:huge")


def test_a_misspelt_override_names_the_field_meant():
  config = config_loading.load_config(MODEL_CONFIG)
  with pytest.raises(UserError, match=r"unknown config field 'num_layer' \(did you mean 'num_layers'\?\); fields here"):
    config_loading.apply_override(config, "num_layer=2")
  with pytest.raises(UserError, match=r"unknown config field 'zzz'; fields here"):  # nothing close: no guess
    config_loading.apply_override(config, "zzz=2")
  pretraining = config_loading.load_config(MODEL_CONFIG.replace("model.py", "pretrain.py"))
  with pytest.raises(UserError, match=r"unknown config field 'dat.paths' \(did you mean 'data'\?\)$"):
    config_loading.apply_override(pretraining, "dat.paths=x")
