"""configs/meshes.py: what each shipped mesh shards at BERT-base size, the README's table, bad names."""
import functools
import os
import re

import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from bipft_jax import config_loading, engine, sharding
from bipft_jax import model as model_lib
from bipft_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(REPO, "configs", "pretrain.py")
QUERY = ("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel")  # embed x heads
FFN_IN = ("bert", "encoder", "layer", "0", "intermediate", "dense", "kernel")  # embed x mlp
WORDS = ("bert", "embeddings", "word_embeddings", "embedding")  # vocab x embed


@functools.lru_cache()
def _base_student():
  config = model_lib.BertConfig.from_dict(config_loading.load_config(f"{PRETRAIN}:base").model)
  return model_lib.build(config, "pretraining")


def _specs(mesh_name: str) -> dict:
  """The PartitionSpecs of a few BERT-base student parameters on the named mesh (no devices needed)."""
  config = config_loading.load_config(f"{PRETRAIN}:base,mesh={mesh_name}")
  sizes = [config.mesh.shape[axis] if config.mesh.shape[axis] != -1 else 8 for axis in sharding.MESH_AXES]
  mesh = AbstractMesh(tuple(sizes), sharding.MESH_AXES)
  shardings = engine.param_shardings(_base_student(), mesh, sharding.rules_from_config(config.mesh.rules))

  def effective(spec):  # an axis of size 1 splits nothing
    axes = [tuple(a for a in ((axis,) if isinstance(axis, str) else axis or ()) if mesh.shape[a] > 1)
            for axis in spec]
    return PartitionSpec(*[a if len(a) > 1 else (a[0] if a else None) for a in axes])

  leaf = lambda path: effective(functools.reduce(lambda tree, key: tree[key], path, shardings).spec)
  batch = sharding.batch_sharding(mesh, sharding.rules_from_config(config.mesh.rules)).spec
  return {"query": leaf(QUERY), "ffn_in": leaf(FFN_IN), "words": leaf(WORDS), "batch": effective(batch)}


@pytest.mark.parametrize("name, expected", [
    ("data", {"query": PartitionSpec(None, None), "words": PartitionSpec(None, None),
              "batch": PartitionSpec("data")}),
    ("v4-32", {"query": PartitionSpec(None, None), "words": PartitionSpec(None, None),
               "batch": PartitionSpec("data")}),
    ("v5e-256", {"query": PartitionSpec("fsdp", None), "ffn_in": PartitionSpec("fsdp", None),
                 "words": PartitionSpec(None, "fsdp"), "batch": PartitionSpec("fsdp")}),
    ("gpu-4x8", {"query": PartitionSpec("fsdp", None), "words": PartitionSpec(None, "fsdp")}),
    ("v4-32-tensor", {"query": PartitionSpec(None, "tensor"), "ffn_in": PartitionSpec(None, "tensor"),
                      "batch": PartitionSpec("data"),
                      "words": PartitionSpec(None, None)}),  # 4 does not divide the 30522 words: whole
    ("local-2x2", {"query": PartitionSpec("fsdp", None), "batch": PartitionSpec(("data", "fsdp"))}),
])
def test_each_mesh_shards_bert_base_as_its_rules_say(name, expected):
  specs = _specs(name)
  assert {key: specs[key] for key in expected} == expected


def test_readme_table_lists_exactly_the_shipped_meshes():
  import sys
  sys.path.insert(0, os.path.join(REPO, "configs"))
  import meshes
  readme = open(os.path.join(REPO, "README.md")).read().split("## Scaling out")[1]
  rows = re.findall(r"^\| `([\w-]+)`[^|]*\| ([-\d]+) x (\d+) x (\d+) \| ([^|]+) \|", readme, re.M)
  assert [row[0] for row in rows] == list(meshes.MESHES)
  for name, *sizes, rules in rows:
    mesh = meshes.get_config(name)
    assert [int(s) for s in sizes] == [mesh.shape[axis] for axis in sharding.MESH_AXES], name
    written = [(a, tuple(b.strip("()").split(", ")) if b.startswith("(") else b)
               for a, b in (rule.split(" -> ") for rule in re.split(r", (?=\w+ ->)", rules.strip()))]
    assert written == [tuple(rule) for rule in mesh.rules], name


@pytest.mark.parametrize("spec, message", [
    (":base,mesh=v9-9999", "unknown mesh 'v9-9999'"),
    (":base,pods=4", "unknown pretrain option 'pods=4'"),
])
def test_bad_mesh_names_are_user_errors(spec, message):
  with pytest.raises(UserError, match=re.escape(message)):
    config_loading.load_config(PRETRAIN + spec)
