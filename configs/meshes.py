"""Named device meshes: mesh axis sizes and the logical-axis rules that go with them.

Picked with `configs/pretrain.py:VARIANT,mesh=NAME`, e.g.
  bipft pretrain --config configs/pretrain.py:base,mesh=v4-32 --workdir gs://BUCKET/bipft_base
  launch/local.sh -- pretrain --config configs/pretrain.py:tiny,mesh=local-2x2 --workdir /tmp/bipft_local
The mesh axes are data, fsdp and tensor (bipft_jax/sharding.py); -1 takes all remaining devices.
Rules map the logical names of parameters and activations (batch, embed, heads, mlp, vocab) to
mesh axes; unlisted names are replicated, and a dimension an axis does not divide stays whole.
"""
import ml_collections

DATA_PARALLEL = (("batch", "data"),)
# ZeRO-3 style: examples over data and fsdp, weights and optimizer moments split on `embed` over fsdp.
FSDP = (("batch", ("data", "fsdp")), ("embed", "fsdp"))
# Megatron style on top of FSDP: heads, FFN and vocabulary split over tensor.
FSDP_TENSOR = FSDP + (("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))

MESHES = {
    # name: (axis sizes, rules, hosts (processes) of the slice, what it is for)
    "data": ({"data": -1}, FSDP_TENSOR, 1, "every device on data: pure data parallelism (the default)"),
    "v4-32": ({"data": 16}, DATA_PARALLEL, 4, "TPU v4-32 slice: 16 chips on 4 hosts, data parallel"),
    "v5e-256": ({"fsdp": 256}, FSDP, 64, "TPU v5e-256 pod: 256 chips on 64 hosts, fully sharded"),
    "gpu-4x8": ({"data": 4, "fsdp": 8}, FSDP, 4, "4 nodes of 8 GPUs: fsdp inside a node, data across nodes"),
    "v4-32-tensor": ({"data": 4, "tensor": 4}, FSDP_TENSOR, 4,
                     "TPU v4-32: tensor parallel over each host's 4 chips"),
    "local-2x2": ({"data": 2, "fsdp": 2}, FSDP, 2,
                  "2 processes x 2 CPU devices on one machine (tests, local.sh)"),
}


def get_config(name: str) -> ml_collections.ConfigDict:
  """The `mesh` field of a training config: {shape: {data, fsdp, tensor}, rules}."""
  if name not in MESHES:
    raise ValueError(f"unknown mesh {name!r}; choose one of {', '.join(MESHES)}")
  sizes, rules, _, _ = MESHES[name]
  mesh = ml_collections.ConfigDict()
  mesh.shape = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **sizes})
  mesh.rules = rules
  return mesh


def hosts(name: str) -> int:
  """How many hosts (JAX processes) the mesh's machine has: what `bipft simulate-mesh` starts."""
  get_config(name)  # the unknown-name error
  return MESHES[name][2]
