"""`bipft summary`: parameters, memory and operations of a 1-bit BiPFT model, layer by layer.

  bipft summary --config configs/model.py:base --seq-len 128 [--head classification] [--json]

A larq-style table for one sequence of `--seq-len` tokens. A full-precision config is summarised
as its 1-bit student (binary=True, same size); every ratio compares against the FP model of the
same size. Counts come from the parameter tree (`model.init` under `jax.eval_shape`) and the
architecture, never from stored numbers.

Conventions. A multiply-accumulate (MAC) is 2 operations: 2 FLOPs in fp32, 2 BOPs (XNOR/AND +
popcount) when both operands are binarized; OPs = BOPs/64 + FLOPs. Elementwise work counts as the
DeepSpeed FLOPs profiler does: 1 per element for adds, multiplies, softmax, GELU, tanh and
comparisons, 5 per element for LayerNorm; embedding lookups are free.

Two accountings:
* The paper's (BiBERT/BiT/BiPFT tables: BERT-base at 128 tokens is 22.5 G FP and about 0.4 G
  binary, "56x"; 418 MB vs ~15 MB, "28x"): the backbone only (embeddings, encoder, pooler; no task
  head). The FP model: every matmul (Q/K/V/O, FFN, QK^T, PV, pooler) plus BERT's own elementwise
  ops (bias and residual adds, score scaling and mask, softmax, GELU, LayerNorm, tanh) = 22.39 G.
  The binary model: the same graph with every binarized product counted as BOPs/64 plus one FP
  multiply per output for its scale = 0.40 G. Pure matmul counting would give 64x; BERT's
  elementwise ops, which stay FP, are what brings the paper's figure to 56x. Memory: 1 bit per
  binarized weight (word embedding, Q/K/V/O, FFN, pooler), FP32 for position/type embeddings,
  LayerNorms and biases.
* Honest: everything the binary model really computes and stores, task head included: BiPFT's
  extra FP parameters (move biases, activation scales, residual estimators, the pooler's
  LayerNorm), the activation binarizations (1 comparison per element), move-bias adds and the
  estimators' matmuls; memory is `packed_size_bytes`, the size of a bit-packed export.

What a parameter is comes from its declared kind (`model_params.param_kinds`), what a binarized Linear
computes from the config's LinearOp (`model.policy_of(config).linear`, `--config.linear_binarizer`):
its weight is as many 1-bit planes as `weight_planes` returns (a dual-binarized weight is two, each
with its own scales), its products are binary MACs (one pass per plane) when its input is a sign
plane too (`activation_planes`), else FP MACs on the dequantized weight (weight-only binarizers:
dbllm_fdb, binarydm's 8-bit inputs); an operator whose weight is not sign planes (fda) is counted as
FP, which is how it runs at inference. A per-token activation scale (xnor) costs 2 ops per input
element.

Packed export (what `packed_size_bytes` predicts; `bipft_jax.packed` writes it): each binarized
weight plane as 1 bit per weight packed into uint32 words along its input dimension (each output
row padded to whole words; the word embedding packed along the hidden dimension per token row),
plus its fp32 scales (one per matrix for BWN, per row for the word embedding), the learned scales
(weight and activation) in fp32, every other parameter (the remainder) in fp32 or,
`--remainder float16`, fp16; no file-format overhead. A matrix with exact zeros after centring
needs a second (nonzero) bit plane; trained weights have none, so it is not predicted. A
pretraining head also needs the latent FP word embedding (its tied decoder).
"""
import argparse
import dataclasses
import json
from typing import Iterable, NamedTuple, Optional

import flax
import jax
import numpy as np

from bipft_jax import config_loading, kinds
from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax.errors import UserError
from bipft_jax.packed import REMAINDER_DTYPES, packable

CONFIG_KINDS = ("model", "pretrain")  # config_loading.KINDS this command takes

WORD_BITS = 32
BOPS_PER_FLOP = 64
LAYER_NORM_FLOPS = 5  # per element: mean, centre, variance, normalise, affine (DeepSpeed's count)
FP32_BYTES = 4
HEAD_GROUPS = ("cls", "classifier")  # task heads: outside the paper's accounting


@dataclasses.dataclass
class Row:
  """Counts for one part of the model (one sequence). Params are leaves of the parameter tree."""
  name: str
  binary_params: int = 0      # 1-bit weights
  fp_params: int = 0          # fp32 parameters the FP BERT has too
  extra_fp_params: int = 0    # fp32 parameters only the binary model has (or needs, e.g. a tied decoder)
  scale_params: int = 0       # fp32 plane scales a packed export stores (not leaves: derived from weights)
  alpha_params: int = 0       # of extra_fp_params, the learned scales: fp32 in any packed export
  packed_bytes: int = 0       # the 1-bit weights packed into uint32 words
  binary_macs: int = 0        # both operands binarized
  fp_macs: int = 0            # fp32 matmuls the FP BERT has too
  extra_fp_macs: int = 0      # fp32 matmuls only the binary model has (residual estimators)
  base_flops: int = 0         # BERT's own elementwise ops
  scale_flops: int = 0        # one multiply per output of a binarized product
  extra_flops: int = 0        # binarizations, move-bias adds, estimator adds, pooler LN/residual

  @property
  def is_head(self) -> bool:
    return self.name.split("/")[0] in HEAD_GROUPS

  @property
  def bops(self) -> int:
    return 2 * self.binary_macs

  @property
  def paper_ops(self) -> float:
    return self.bops / BOPS_PER_FLOP + 2 * self.fp_macs + self.base_flops + self.scale_flops

  @property
  def honest_ops(self) -> float:
    return self.paper_ops + 2 * self.extra_fp_macs + self.extra_flops

  @property
  def paper_memory_bytes(self) -> float:
    return self.binary_params / 8 + FP32_BYTES * self.fp_params

  @property
  def honest_memory_bytes(self) -> int:
    return self.packed_memory_bytes("float32")

  def packed_memory_bytes(self, remainder: str) -> int:
    """Bytes in a packed export whose FP remainder (all but planes, scales, alphas) is `remainder`."""
    remainder_params = self.fp_params + self.extra_fp_params - self.alpha_params
    return (self.packed_bytes + FP32_BYTES * (self.scale_params + self.alpha_params)
            + np.dtype(REMAINDER_DTYPES[remainder]).itemsize * remainder_params)


def _packed_row_bytes(fan_in: int) -> int:
  """One row of 1-bit weights packed along its input dimension into whole uint32 words."""
  return -(-fan_in // WORD_BITS) * WORD_BITS // 8


def _abstract_params(config: model_lib.BertConfig, head: str) -> dict:
  module = model_lib.build(config, head)
  return jax.eval_shape(lambda: model_params.init_params(module, jax.random.key(0)))


class PlaneLayout(NamedTuple):
  """How a binarized Linear of one shape runs: its weight planes' scale sizes, whether its input is a
  sign plane too (binary products) and whether that plane's scale is per token (computed at run time)."""
  weight_scales: tuple
  binary_products: bool
  token_scale: bool


def plane_layout(op, fan_in: int, fan_out: int) -> Optional[PlaneLayout]:
  """The PlaneLayout of LinearOp `op` on a fan_in x fan_out kernel; None if its weight is no sign planes."""
  if op.weight_planes is None:
    return None
  f32 = lambda shape: jax.ShapeDtypeStruct(shape, np.float32)
  extras = {name: f32(extra.shape) for name, extra in op.init_extras(fan_in, fan_out).items()}
  planes = jax.eval_shape(op.weight_planes, f32((fan_in, fan_out)), extras)
  token_scale = op.packable and jax.eval_shape(op.activation_planes, f32((2, fan_in)), extras)[0].size > 1
  return PlaneLayout(tuple(int(np.prod(scale.shape)) for scale, _ in planes), op.packable, token_scale)


def _group(path: tuple) -> tuple:
  """The table row of a parameter: a layer's part (attention/self, intermediate...), or a top module."""
  if path[0] == "encoder":
    return path[:5] if path[3] == "attention" else path[:4]
  return path[:2] if path[0] == "cls" else path[:1]


def count_rows(config: model_lib.BertConfig, seq_len: int, head: str = "classification") -> list:
  """Per-part counts for `config` (as given, binary or not) on one sequence of `seq_len` tokens."""
  params = flax.traverse_util.flatten_dict(_abstract_params(config, head))
  param_kinds = flax.traverse_util.flatten_dict(model_params.param_kinds(model_lib.build(config, head)))
  op = model_lib.policy_of(config).linear
  # A leaf the FP model of the same size lacks is one of BiPFT's extras.
  fp_paths = set(flax.traverse_util.flatten_dict(
      _abstract_params(dataclasses.replace(config, binary=False), head)))
  L, D, H, F = seq_len, config.hidden_size, config.num_heads, config.intermediate_size
  modules = {}
  for path, leaf in params.items():
    modules.setdefault(path[:-1], {})[path[-1]] = leaf
  rows = {}
  for module_path, leaves in modules.items():
    name = "/".join(_group(module_path[1:] if module_path[0] == "bert" else module_path))
    r = rows.setdefault(name, Row(name))
    leaf_kinds = {leaf_name: param_kinds[module_path + (leaf_name,)] for leaf_name in leaves}
    layout = None
    if leaf_kinds.get("kernel") == kinds.BINARY_WEIGHT:
      layout = plane_layout(op, *leaves["kernel"].shape)
    for leaf_name, leaf in leaves.items():
      n, kind = leaf.size, leaf_kinds[leaf_name]
      if kind == kinds.BINARY_EMBEDDING:
        vocab, hidden = leaf.shape
        r.binary_params += n
        r.packed_bytes += vocab * _packed_row_bytes(hidden)
        r.scale_params += vocab  # row-wise BWN
      elif kind == kinds.BINARY_WEIGHT and layout is not None:
        fan_in, fan_out = leaf.shape
        planes = len(layout.weight_scales)
        r.binary_params += planes * n
        r.packed_bytes += planes * fan_out * _packed_row_bytes(fan_in)
        r.scale_params += sum(layout.weight_scales)
      elif module_path + (leaf_name,) in fp_paths:
        r.fp_params += n
      else:
        r.extra_fp_params += n
        r.alpha_params += n if kind in kinds.SCALES else 0
    extra_module = not any(module_path + (leaf_name,) in fp_paths for leaf_name in leaves)
    _count_module_ops(r, leaves, leaf_kinds, layout, op.uses_bias, extra_module, L)

  for key, r in rows.items():
    _count_architecture_ops(r, key, config, L, D, H, F)
  return sorted(rows.values(), key=lambda r: _forward_order(r.name))


LAYER_PARTS = ("attention/self", "attention/output", "intermediate", "output")


def _forward_order(name: str) -> tuple:
  """Rows in forward order (the tree's keys sort layer 10 before layer 2)."""
  part = name.split("/")
  if part[0] == "encoder":
    return (1, int(part[2]), LAYER_PARTS.index("/".join(part[3:])))
  return ({"embeddings": 0, "pooler": 2}.get(part[0], 3), 0, 0)


def _tokens(row: Row, seq_len: int) -> int:
  """The pooler, NSP head and classifier see only the [CLS] position."""
  return 1 if row.name.split("/")[0] in ("pooler", "classifier") or row.name == "cls/seq_relationship" else seq_len


def _count_module_ops(r: Row, leaves: dict, leaf_kinds: dict, layout: Optional[PlaneLayout], uses_bias: bool,
                      extra: bool, L: int) -> None:
  """Ops of the Dense / binarized Linear / LayerNorm a module holds, from its leaves' shapes and kinds."""
  tokens = _tokens(r, L)
  if "kernel" in leaves:
    fan_in, fan_out = leaves["kernel"].shape
    macs = tokens * fan_in * fan_out
    bias_adds = tokens * fan_out
    if layout is not None and layout.binary_products:
      planes = len(layout.weight_scales)
      shifts = sum(kind == kinds.SHIFT for kind in leaf_kinds.values())
      r.binary_macs += planes * macs
      r.scale_flops += planes * tokens * fan_out
      # the input's binarization, its shifts (move bias), a per-token scale (|x| summed)
      r.extra_flops += (1 + shifts + 2 * layout.token_scale) * tokens * fan_in
      r.base_flops += bias_adds if uses_bias else 0
    elif extra:
      r.extra_fp_macs += macs
      r.extra_flops += bias_adds
    else:
      r.fp_macs += macs
      r.base_flops += bias_adds
  elif "scale" in leaves:  # LayerNorm
    flops = LAYER_NORM_FLOPS * tokens * leaves["scale"].size
    if extra:
      r.extra_flops += flops
    else:
      r.base_flops += flops


def _count_architecture_ops(r: Row, key: str, config, L: int, D: int, H: int, F: int) -> None:
  """Ops that hold no parameters: lookups' adds, attention products, softmax, activations, residuals."""
  part = key.split("/")
  binary = config.binary
  if part[0] == "embeddings":
    r.base_flops += 2 * L * D  # word + position + type
    if binary:
      r.scale_flops += L * D  # row scale times the looked-up signs
  elif part[-1] == "self":
    scores = H * L * L
    attention_macs = 2 * L * L * D  # QK^T and PV over all heads
    r.base_flops += 3 * scores  # 1/sqrt(d), mask, softmax
    if binary:
      r.binary_macs += attention_macs
      r.scale_flops += L * D  # PV's scale (QK^T's folds into 1/sqrt(d))
      r.extra_flops += 3 * L * D + scores  # binarizing Q, K, V and the probabilities
      rank = config.estimator_rank
      if rank:
        r.extra_fp_macs += 3 * L * L * rank + H * L * L * rank  # q_m k_p^T + q_p k_m^T + q_p k_p^T, P v_p
        r.extra_flops += 2 * L * L + scores + L * D  # sum the corrections, add them, add P v_p
    else:
      r.fp_macs += attention_macs
  elif part[-1] == "output":  # attention/output and output: the residual add
    r.base_flops += L * D
  elif part[-1] == "intermediate":
    r.base_flops += L * F  # GELU
  elif part[0] == "pooler":
    r.base_flops += D + (L * D if config.pooling == "mean" else 0)  # tanh; the mean over the tokens
    if binary:
      r.extra_flops += D  # the residual around the new LayerNorm
  elif key == "cls/predictions":
    V = config.vocab_size
    r.fp_macs += L * D * V  # decoder tied to the word embedding
    r.base_flops += L * D + L * V  # transform activation, decoder bias
    if binary:
      r.extra_fp_params += V * D  # the tied decoder needs the latent FP table besides the packed one


def _binary_counterpart(config: model_lib.BertConfig) -> model_lib.BertConfig:
  return config if config.binary else dataclasses.replace(config, binary=True)


def packed_size_bytes(config: model_lib.BertConfig, head: str = "classification",
                      remainder: str = "float32") -> int:
  """Bytes of a bit-packed export of the 1-bit model (see the module docstring for the format)."""
  rows = count_rows(_binary_counterpart(config), seq_len=1, head=head)
  return int(sum(r.packed_memory_bytes(remainder) for r in rows))


def summarize(config: model_lib.BertConfig, seq_len: int, head: str = "classification") -> dict:
  """Rows of the binary model and FP model of the same size, totals and ratios."""
  binary_rows = count_rows(_binary_counterpart(config), seq_len, head)
  fp_rows = count_rows(dataclasses.replace(config, binary=False), seq_len, head)
  backbone = lambda rows: [r for r in rows if not r.is_head]

  def total(rows: Iterable[Row], attr: str) -> float:
    return float(sum(getattr(r, attr) for r in rows))

  fp_ops = total(backbone(fp_rows), "paper_ops")
  binary_ops = total(backbone(binary_rows), "paper_ops")
  fp_memory = total(backbone(fp_rows), "paper_memory_bytes")
  binary_memory = total(backbone(binary_rows), "paper_memory_bytes")
  honest_fp_ops = total(fp_rows, "honest_ops")
  honest_binary_ops = total(binary_rows, "honest_ops")
  honest_fp_memory = total(fp_rows, "honest_memory_bytes")
  packed = int(total(binary_rows, "honest_memory_bytes"))
  packed_fp16 = int(sum(r.packed_memory_bytes("float16") for r in binary_rows))
  fp_ops_by_name = {r.name: r.honest_ops for r in fp_rows}
  try:
    packable(_binary_counterpart(config))
    not_packed = ""
  except ValueError as e:  # export-packed refuses it: the sizes are of sign planes it does not have
    not_packed = str(e)
  return {
      "seq_len": seq_len, "head": head, "binary": _binary_counterpart(config).binary,
      "estimator_rank": config.estimator_rank, "linear_binarizer": config.linear_binarizer,
      "binary_params": int(total(binary_rows, "binary_params")),
      "fp_params": int(total(binary_rows, "fp_params") + total(binary_rows, "extra_fp_params")),
      "fp_model_params": int(total(fp_rows, "fp_params")),
      "fp_ops": fp_ops, "binary_ops": binary_ops, "ops_ratio": fp_ops / binary_ops,
      "fp_memory_bytes": fp_memory, "binary_memory_bytes": binary_memory,
      "memory_ratio": fp_memory / binary_memory,
      "honest_fp_ops": honest_fp_ops, "honest_binary_ops": honest_binary_ops,
      "honest_ops_ratio": honest_fp_ops / honest_binary_ops,
      "honest_fp_memory_bytes": honest_fp_memory, "packed_bytes": packed,
      "honest_memory_ratio": honest_fp_memory / packed,
      "packed_fp16_bytes": packed_fp16, "honest_memory_ratio_fp16": honest_fp_memory / packed_fp16,
      "not_packed": not_packed,
      "rows": [dict(dataclasses.asdict(r), ops=r.honest_ops, memory_bytes=r.honest_memory_bytes,
                    fp_model_ops=fp_ops_by_name[r.name])
               for r in binary_rows],
  }


# --- printing --------------------------------------------------------------------

COLUMNS = ("layer", "1-bit params", "32-bit params", "memory KiB", "binary MACs M", "FP MACs M",
           "OPs M", "FP-model OPs M")


def _table_line(cells) -> str:
  return f"{cells[0]:<36}" + "".join(f"{c:>15}" for c in cells[1:])


def format_table(summary: dict) -> str:
  lines = [_table_line(COLUMNS), "-" * (36 + 15 * (len(COLUMNS) - 1))]
  totals = [0.0] * (len(COLUMNS) - 1)
  for r in summary["rows"]:
    values = [r["binary_params"], r["fp_params"] + r["extra_fp_params"], r["memory_bytes"] / 1024,
              r["binary_macs"] / 1e6, (r["fp_macs"] + r["extra_fp_macs"]) / 1e6, r["ops"] / 1e6,
              r["fp_model_ops"] / 1e6]
    totals = [t + v for t, v in zip(totals, values)]
    lines.append(_table_line([r["name"], f"{values[0]:,}", f"{values[1]:,}"]
                             + [f"{v:,.1f}" for v in values[2:]]))
  lines.append("-" * len(lines[1]))
  lines.append(_table_line(["total", f"{int(totals[0]):,}", f"{int(totals[1]):,}"]
                           + [f"{v:,.1f}" for v in totals[2:]]))
  return "\n".join(lines)


def format_ratios(s: dict) -> str:
  mib = 1024 ** 2
  return "\n".join([
      "paper's accounting (backbone only: embeddings, encoder, pooler; no task head; FP matmuls + "
      "BERT's elementwise ops; binarized products as BOPs/64 + one scale multiply per output):",
      f"  OPs    FP {s['fp_ops'] / 1e9:.2f} G (paper: 22.5 G for BERT-base at 128)  binary "
      f"{s['binary_ops'] / 1e9:.3f} G (paper: ~0.4 G)  ratio {s['ops_ratio']:.1f}x (paper: 56x)",
      f"  memory FP {s['fp_memory_bytes'] / mib:.1f} MiB (paper: 418 MB)  binary "
      f"{s['binary_memory_bytes'] / mib:.2f} MiB (1-bit word embedding and linear weights; position/type "
      f"embeddings, LayerNorms, biases fp32)  ratio {s['memory_ratio']:.1f}x (paper: 28x)",
      f"honest (head '{s['head']}' included; move biases, activation scales, estimators, pooler LayerNorm, "
      f"binarization ops, BWN scales, packing):",
      f"  OPs    FP {s['honest_fp_ops'] / 1e9:.2f} G  binary {s['honest_binary_ops'] / 1e9:.3f} G  "
      f"ratio {s['honest_ops_ratio']:.1f}x",
      f"  memory FP {s['honest_fp_memory_bytes'] / mib:.1f} MiB  "
      + (f"no packed export ({s['not_packed']}); as sign planes " if s["not_packed"] else "packed export ")
      + f"{s['packed_bytes']:,} bytes "
      f"({s['packed_bytes'] / mib:.2f} MiB)  ratio {s['honest_memory_ratio']:.1f}x; with a float16 "
      f"remainder {s['packed_fp16_bytes']:,} bytes, ratio {s['honest_memory_ratio_fp16']:.1f}x",
  ])


# --- command line ----------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
  config_loading.add_config_argument(parser, CONFIG_KINDS)
  parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
  parser.add_argument("--head", choices=("classification", "encoder", "pretraining"), default="classification",
                      help="task head counted in the honest totals (default classification)")
  parser.add_argument("--json", action="store_true", help="end with one line of JSON (totals, ratios, rows)")


def load_model_config(spec: str, overrides: Iterable[str]) -> model_lib.BertConfig:
  """BertConfig from a model config such as configs/model.py:base, or the student of a pretraining
  config (its `model` section; a UserError if it does not fit)."""
  config = config_loading.load_config(spec, overrides, kinds=CONFIG_KINDS)
  if config_loading.config_kind(config) == "pretrain":
    config = config.model
  try:
    return model_lib.BertConfig.from_dict(config.to_dict())
  except (ValueError, TypeError) as e:
    raise UserError(f"{spec} is not a model config: {e}") from None


def run(args: argparse.Namespace) -> int:
  config = load_model_config(args.config, args.config_overrides)
  if not 1 <= args.seq_len <= config.max_position_embeddings:
    raise UserError(f"--seq-len {args.seq_len} must be between 1 and max_position_embeddings "
                    f"({config.max_position_embeddings})")
  summary = summarize(config, args.seq_len, args.head)
  kind = "" if config.binary else " (a full-precision config: summarising its 1-bit student)"
  rank = config.estimator_rank
  print(f"BiPFT-{'B' if rank else 'A'} summary for {args.config}{kind}, {args.seq_len} tokens, "
        f"estimator rank {rank}, linear binarizer {config.linear_binarizer}, head {args.head}")
  print(format_table(summary))
  print(format_ratios(summary))
  if args.json:
    print(json.dumps(summary))
  return 0
