"""Meshes from config, logical-axis rules to shardings, optimizer-state shardings derived from the boxed
parameters (8 CPU devices)."""
import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from bipft_jax import engine, model, model_params, optim, sharding
from bipft_jax.errors import UserError

CONFIG = model.BertConfig(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                          max_position_embeddings=16, binary=True)


def _shardings(shape, rules=sharding.DEFAULT_RULES):
  module = model.build(CONFIG, "pretraining")
  mesh = sharding.make_mesh(shape)
  return mesh, engine.param_shardings(module, mesh, rules)


def test_default_mesh_is_data_parallel_over_all_devices():
  mesh, shardings = _shardings({"data": -1})
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  # with fsdp = tensor = 1 every parameter is whole on every device
  assert all(s.is_fully_replicated for s in jax.tree.leaves(shardings))
  assert sharding.batch_divisor(mesh, sharding.DEFAULT_RULES) == 8


def test_fsdp_and_tensor_rules_split_parameters():
  mesh, shardings = _shardings({"data": 2, "fsdp": 2, "tensor": 2})
  layer = shardings["bert"]["encoder"]["layer"]["0"]
  assert layer["attention"]["self"]["query"]["kernel"].spec == P("fsdp", "tensor")
  assert layer["output"]["dense"]["kernel"].spec == P("tensor", "fsdp")
  assert shardings["bert"]["embeddings"]["word_embeddings"]["embedding"].spec == P("tensor", "fsdp")
  # rank-1 estimators: the rank dimension is not divisible, so it stays whole
  assert layer["attention"]["self"]["q_p"]["kernel"].spec == P("fsdp", None)
  assert layer["attention"]["self"]["query_alpha"].spec == P()
  assert sharding.batch_divisor(mesh, sharding.DEFAULT_RULES) == 4
  # the arrays really are split: each device holds a quarter of the query kernel
  kernel = jax.device_put(jax.numpy.zeros((16, 16)), layer["attention"]["self"]["query"]["kernel"])
  assert {s.data.shape for s in kernel.addressable_shards} == {(8, 8)}


def test_optimizer_state_follows_parameter_shardings():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  tx = optim.make_optimizer(ml_collections.ConfigDict(dict(
      learning_rate=1e-3, warmup_steps=1, total_steps=10, schedule="linear", weight_decay=0.01,
      b1=0.9, b2=0.999, eps=1e-8)), model_params.param_kinds(model.build(CONFIG, "pretraining")))
  opt_shardings = engine.state_shardings(model.build(CONFIG, "pretraining"), tx, mesh, sharding.DEFAULT_RULES)
  opt_shardings = opt_shardings["opt_state"]
  kernel = ("bert", "encoder", "layer", "0", "attention", "self", "query", "kernel")
  found = []
  for path, s in jax.tree_util.tree_flatten_with_path(opt_shardings)[0]:
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    if keys == kernel:
      found.append(s.spec)
    elif not keys:
      assert s.spec == P()  # step counters are replicated
  assert found == [P("fsdp", "tensor")] * 2  # Adam's mu and nu


@pytest.mark.parametrize("shape, message", [
    ({"data": 16}, "needs 16 devices"),
    ({"data": -1, "fsdp": -1}, "at most one -1"),
    ({"data": -1, "fsdp": 3}, "does not divide"),
    ({"pipeline": 2}, "unknown mesh axes"),
])
def test_bad_meshes(shape, message):
  with pytest.raises(UserError, match=message):
    sharding.make_mesh(shape)


def test_rules_are_checked():
  assert sharding.rules_from_config([["batch", ["data", "fsdp"]], ["embed", None]]) == (
      ("batch", ("data", "fsdp")), ("embed", None))
  with pytest.raises(UserError, match="unknown mesh axis 'model'"):
    sharding.rules_from_config([("mlp", "model")])
  with pytest.raises(UserError, match="logical name"):
    sharding.rules_from_config([("mlp",)])
