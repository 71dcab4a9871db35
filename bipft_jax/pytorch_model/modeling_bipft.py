"""BiPFT binary BERT in PyTorch, for checkpoints exported by `bipft convert to-pytorch`.

Self-contained (torch + transformers >= 5 only): `bipft convert` copies this file next to
config.json and model.safetensors, and config.json's `auto_map` points here, so

  AutoModelForPreTraining.from_pretrained(DIR, trust_remote_code=True)
  AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)  # and pipeline("fill-mask", DIR, ...)
  AutoModelForSequenceClassification.from_pretrained(DIR, trust_remote_code=True)

load it without bipft-jax (the masked LM from a pretraining export, the classifier from a finetuned
one). `weight_bits == 1` in the config is the 1-bit student (BWN weights and word embedding,
elastic binary activations, low-rank residual estimators in self-attention); otherwise it is the
full-precision BERT teacher. The math is METHOD.md of bipft-jax, and every
binarizer is an autograd Function with the release's straight-through gradients, so the model
also trains in PyTorch. Parameter names are the original release's.

A student trained with another binarizer of bipft-jax's zoo (`linear_quant_method`: BiBench's bnn,
xnor, xnorplusplus, dorefa, bireal, react, recu, fda; BinaryDM's binarydm, binarydm1; DB-LLM's
dbllm_fdb; BiViT's bivit_weight; `attention_prob_quant_method`: bivit) computes its inference forward
here; its backward raises (those operators train in bipft-jax).

Shapes: B batch, L length, D hidden, H heads, K head size, R estimator rank, V vocab.
"""
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import (BaseModelOutputWithPooling, MaskedLMOutput, ModelOutput,
                                           SequenceClassifierOutput)

# The release clamps learned scales from below in the forward only: a clamped scale still gets
# its LSQ gradient (computed with the clamped value) and can grow back.
ALPHA_EPS = 1e-5


class BiPFTConfig(PreTrainedConfig):
  """A BERT config plus the release's binary switches; `hidden_act` reaches only the MLM transform."""
  model_type = "bipft"

  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = "gelu"
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  classifier_dropout: Optional[float] = None
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  pad_token_id: Optional[int] = 0
  weight_bits: int = 32          # 1: the binary student
  input_bits: int = 32
  weight_quant_method: str = "bwn"
  input_quant_method: str = "elastic"
  estimator_rank: int = 1        # rank of the residual estimators; 0 = BiPFT-A
  linear_quant_method: str = "bipft"  # the binarized Linears: the release's, or a zoo operator (ZOO_LINEARS)
  attention_prob_quant_method: str = "elastic"  # or "bivit" (softmax-aware)
  pooling: str = "cls"           # the pooler's input: "cls" (BERT) | "mean" over real tokens (bipft-jax)
  precision: str = "fp32"        # "mixed": FP products on bf16-rounded operands (bipft-jax's precision=mixed)

  @property
  def binary(self) -> bool:
    return self.weight_bits == 1


# --- binarizers (METHOD.md sections 1-2) -------------------------------------------

def _clamped(alpha: torch.Tensor) -> torch.Tensor:
  return torch.where(alpha > ALPHA_EPS, alpha, torch.full_like(alpha, ALPHA_EPS))


class BWN(torch.autograd.Function):
  """mean|W| * sign(W - mean(W)) (row-wise scale for the word embedding); identity gradient."""

  @staticmethod
  def forward(ctx, w: torch.Tensor, rowwise: bool) -> torch.Tensor:
    scale = w.abs().mean(dim=-1, keepdim=True) if rowwise else w.abs().mean()
    return scale * torch.sign(w - w.mean())

  @staticmethod
  def backward(ctx, g):
    return g, None


class SignedBinarize(torch.autograd.Function):
  """alpha * sign(x); dx = g inside |x/alpha| <= 1, dalpha = sum(sign(x) g) / sqrt(N)."""

  @staticmethod
  def forward(ctx, x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    ctx.save_for_backward(x, alpha)
    return _clamped(alpha) * torch.sign(x)

  @staticmethod
  def backward(ctx, g):
    x, alpha = ctx.saved_tensors
    ratio = x / _clamped(alpha)
    grad_x = torch.where((ratio >= -1) & (ratio <= 1), g, torch.zeros_like(g))
    grad_alpha = (torch.sign(x) * g).sum() / math.sqrt(x.numel())
    return grad_x, grad_alpha.reshape(alpha.shape)


class UnsignedBinarize(torch.autograd.Function):
  """alpha * clip(round(P/alpha), 0, 1) (round half to even) for attention probabilities."""

  @staticmethod
  def forward(ctx, p: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    ctx.save_for_backward(p, alpha)
    a = _clamped(alpha)
    return a * torch.clamp(torch.round(p / a), 0, 1)

  @staticmethod
  def backward(ctx, g):
    p, alpha = ctx.saved_tensors
    ratio = p / _clamped(alpha)
    inside = (ratio >= 0) & (ratio <= 1)
    grad_p = torch.where(inside, g, torch.zeros_like(g))
    step = (ratio > 1).to(g.dtype) + torch.where(inside, torch.round(ratio) - ratio, torch.zeros_like(ratio))
    grad_alpha = (step * g).sum() / math.sqrt(p.numel())
    return grad_p, grad_alpha.reshape(alpha.shape)


class InferenceOnly(torch.autograd.Function):
  """fn(*inputs) forward; the backward raises: bipft-jax's zoo operators train in bipft-jax only."""

  @staticmethod
  def forward(ctx, fn, name: str, *inputs):
    ctx.name = name
    return fn(*inputs)

  @staticmethod
  def backward(ctx, *grads):
    raise NotImplementedError(f"modeling_bipft runs binarizer {ctx.name!r} for inference only; train it "
                              "in bipft-jax")


def _row_abs_mean(w_OxI: torch.Tensor) -> torch.Tensor:
  return w_OxI.abs().mean(dim=1, keepdim=True)


def _centred(w_OxI: torch.Tensor) -> torch.Tensor:
  return w_OxI - w_OxI.mean(dim=1, keepdim=True)


def _abs_mean_signs(w_OxI: torch.Tensor) -> torch.Tensor:
  return torch.sign(w_OxI) * _row_abs_mean(w_OxI)


def _xnor(layer, x):
  w_c = _centred(layer.weight)
  return F.linear(torch.sign(x) * x.abs().mean(dim=-1, keepdim=True), torch.sign(w_c) * _row_abs_mean(w_c),
                  layer.bias)


FDA_ALPHA, FDA_BOTTLENECK = 0.1, 64  # bipft-jax's fda: alpha 0.1, noise MLPs in // 64 wide


def _fda_noise(layer, v_NxI: torch.Tensor, side: str) -> torch.Tensor:
  """FDA's noise adaption fc2(relu(fc1(v))) + 0.1 sin(v) over the last axis (no MLP below 64 inputs)."""
  noise = 0.1 * torch.sin(v_NxI)
  if not hasattr(layer, f"{side}_noise_fc1"):
    return noise
  return F.relu(v_NxI @ getattr(layer, f"{side}_noise_fc1")) @ getattr(layer, f"{side}_noise_fc2") + noise


def _fda(layer, x):
  w = layer.weight
  w_b = (torch.sign(w) + FDA_ALPHA * _fda_noise(layer, w, "weight")) * _row_abs_mean(w)
  return F.linear(torch.sign(x) + FDA_ALPHA * _fda_noise(layer, x, "act"), w_b, layer.bias)


def _fda_extras(i: int, o: int) -> dict:
  width = i // FDA_BOTTLENECK
  if width == 0:
    return {}
  return {f"{side}_noise_{fc}": shape for side in ("weight", "act")
          for fc, shape in (("fc1", (i, width)), ("fc2", (width, i)))}


BINARYDM_ACTIVATION_LEVELS = (-128, 127)  # its 8-bit LSQ activations


def _binarydm(layer, x):
  """LSQ(x) @ (s1 sign(W) [+ s2 sign(W - s1 sign(W))])^T + b; the LSQ step is re-derived from each call's
  input, 2 mean|x| / sqrt(127), as the release (and bipft-jax) does, clamped from below at ALPHA_EPS."""
  qn, qp = BINARYDM_ACTIVATION_LEVELS
  step = _clamped(2 * x.abs().mean() / math.sqrt(qp))
  x_q = torch.round(torch.clamp(x / step, qn, qp)) * step
  first = torch.sign(layer.weight) * layer.scale_1[:, None]
  if hasattr(layer, "scale_2"):  # order 2
    return F.linear(x_q, first + torch.sign(layer.weight - first) * layer.scale_2[:, None], layer.bias)
  return F.linear(x_q, first, layer.bias)


def _dbllm_fdb(layer, x):
  """x @ (alpha1 w_b1 + alpha2 w_b2)^T + b, w_b1 = [w >= (alpha1 + alpha2) / 2], w_b2 = [w <= alpha1 w_b1 +
  alpha2 / 2] (DB-LLM's Flexible Dual Binarization as bipft-jax's zoo/dbllm.py; FP inputs)."""
  a1, a2, w = layer.alpha1[:, None], layer.alpha2[:, None], layer.weight
  plane1 = (w - (a1 + a2) / 2 >= 0).to(w.dtype)
  plane2 = (-(w - a1 * plane1 - a2 / 2) >= 0).to(w.dtype)
  return F.linear(x, a1 * plane1 + a2 * plane2, layer.bias)


_out = lambda *names: (lambda i, o: {name: (o,) for name in names})  # noqa: E731
_none = lambda i, o: {}  # noqa: E731

# bipft-jax's zoo Linear layers at inference (bipft_jax/zoo; weights here are out x in): method ->
# (forward(layer, x), extras(in_features, out_features) -> {parameter: shape}, as bipft-jax makes them).
ZOO_LINEARS = {
    "bnn": (lambda layer, x: F.linear(torch.sign(x), torch.sign(layer.weight), layer.bias), _none),
    "xnor": (_xnor, _none),
    "xnorplusplus": (lambda layer, x: F.linear(torch.sign(x), torch.sign(layer.weight)) * layer.o_scale
                     + layer.bias, _out("o_scale")),
    "dorefa": (lambda layer, x: F.linear(torch.sign(x), _abs_mean_signs(layer.weight), layer.bias), _none),
    "bireal": (lambda layer, x: F.linear(torch.sign(x), _abs_mean_signs(layer.weight)), _none),
    # ReAct's released forward ignores its threshold (it only moves the gradient window).
    "react": (lambda layer, x: F.linear(torch.sign(x), _abs_mean_signs(layer.weight)),
              lambda i, o: {"threshold": (i,)}),
    # ReCU with BiBench's BERT-track tau = 1: the clamp bound is +inf, the standardisation keeps signs.
    "recu": (lambda layer, x: F.linear(torch.sign(x), torch.sign(_centred(layer.weight))) * layer.alpha
             + layer.bias, _out("alpha")),
    "fda": (_fda, _fda_extras),
    "binarydm": (_binarydm, lambda i, o: {"scale_1": (o,), "scale_2": (o,), "act_step": ()}),
    "binarydm1": (_binarydm, lambda i, o: {"scale_1": (o,), "act_step": ()}),
    "dbllm_fdb": (_dbllm_fdb, _out("alpha1", "alpha2")),
    # BiViT's learned channel scales on the centred weight's signs.
    "bivit_weight": (lambda layer, x: F.linear(torch.sign(x), torch.sign(_centred(layer.weight))
                                               * layer.channel_scale[:, None], layer.bias),
                     _out("channel_scale")),
}


def _check_supported(config: BiPFTConfig) -> None:
  if config.pooling not in ("cls", "mean"):
    raise ValueError(f"pooling must be 'cls' or 'mean', not {config.pooling!r}")
  if config.precision not in ("fp32", "mixed"):
    raise ValueError(f"precision must be 'fp32' or 'mixed', not {config.precision!r}")
  if config.binary and config.linear_quant_method not in ("bipft", *ZOO_LINEARS):
    raise ValueError(f"linear_quant_method {config.linear_quant_method!r} is not implemented here; "
                     f"choose one of bipft, {', '.join(ZOO_LINEARS)}")
  if config.binary and config.attention_prob_quant_method not in ("elastic", "bivit"):
    raise ValueError(f"attention_prob_quant_method {config.attention_prob_quant_method!r} is not implemented "
                     "here; choose elastic or bivit")
  if config.binary and (config.weight_quant_method, config.input_quant_method) != ("bwn", "elastic"):
    raise ValueError("modeling_bipft implements weight_quant_method='bwn' with input_quant_method='elastic' "
                     f"only, not {config.weight_quant_method!r}/{config.input_quant_method!r}")


# --- layers ------------------------------------------------------------------------

def _fp_operands(precision: str, *tensors: torch.Tensor) -> tuple:
  """The operands of a full-precision product (the teacher's, the estimators', the heads'): under
  precision "mixed" rounded to bf16, then multiplied and summed in fp32, as bipft-jax's mixed
  precision computes them (the binarized products are exact either way); the gradients pass the
  rounding unchanged. The rt_demo classifier evaluated so in bipft-jax and exported: run here in fp32,
  40 of its 1,281 dev predictions differed; with this, 1."""
  if precision != "mixed":
    return tensors
  return tuple(t.to(torch.bfloat16).to(t.dtype) for t in tensors)


class FPLinear(nn.Linear):
  """nn.Linear whose operands follow `precision` (`_fp_operands`)."""

  def __init__(self, config: BiPFTConfig, in_features: int, out_features: int):
    super().__init__(in_features, out_features)
    self.precision = config.precision

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.linear(*_fp_operands(self.precision, x, self.weight), self.bias)


class LearnableBias(nn.Module):
  """The release's `move`: a learned per-channel shift before binarization."""

  def __init__(self, features: int):
    super().__init__()
    self.bias = nn.Parameter(torch.zeros(features))


class BinaryLinear(nn.Module):
  """out = B_s(x + move.bias; input_clip_val) @ BWN(weight)^T + bias (METHOD.md section 3)."""

  def __init__(self, in_features: int, out_features: int):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(out_features, in_features))
    self.bias = nn.Parameter(torch.zeros(out_features))
    self.move = LearnableBias(in_features)
    self.input_clip_val = nn.Parameter(torch.tensor(1.0))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x_b = SignedBinarize.apply(x + self.move.bias, self.input_clip_val)
    return F.linear(x_b, BWN.apply(self.weight, False), self.bias)


class ZooLinear(nn.Module):
  """A zoo operator's binarized Linear (ZOO_LINEARS), inference only; parameters named as bipft-jax's."""

  def __init__(self, method: str, in_features: int, out_features: int):
    super().__init__()
    self.method = method
    self.weight = nn.Parameter(torch.empty(out_features, in_features))
    self.bias = nn.Parameter(torch.zeros(out_features))
    for name, shape in ZOO_LINEARS[method][1](in_features, out_features).items():
      self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    forward = ZOO_LINEARS[self.method][0]
    return InferenceOnly.apply(lambda x, *_: forward(self, x), self.method, x, *self.parameters())


def _linear(config: BiPFTConfig, in_features: int, out_features: int) -> nn.Module:
  """A Linear that METHOD.md binarizes in the student."""
  if config.binary and config.linear_quant_method != "bipft":
    return ZooLinear(config.linear_quant_method, in_features, out_features)
  if config.binary:
    return BinaryLinear(in_features, out_features)
  return FPLinear(config, in_features, out_features)


def _gelu(x: torch.Tensor) -> torch.Tensor:
  """erf-GELU with an accurate negative tail, as XLA's: F.gelu's 1 + erf(x/sqrt 2) rounds to 0 below
  x = -6, where a binarizer without a move bias then reads sign 0 instead of -1. Subnormal results
  (x < -13) are flushed to 0, as XLA on CPU does."""
  y = 0.5 * x * torch.special.erfc(-x * math.sqrt(0.5))
  return torch.where(y.abs() < torch.finfo(y.dtype).tiny, torch.zeros_like(y), y)


def _softmax_aware(p: torch.Tensor) -> torch.Tensor:
  """BiViT's binarized attention probabilities: 1[p >= max_row(p) / 4]."""
  return (p >= 0.25 * p.max(dim=-1, keepdim=True).values).to(p.dtype)


class WordEmbeddings(nn.Module):
  """Token lookup; the student looks up the row-wise BWN table. padding_idx: row 0 gets no gradient."""

  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.binary, self.padding_idx = config.binary, config.pad_token_id
    self.weight = nn.Parameter(torch.empty(config.vocab_size, config.hidden_size))

  def forward(self, input_ids_BxL: torch.Tensor) -> torch.Tensor:
    table_VxD = BWN.apply(self.weight, True) if self.binary else self.weight
    return F.embedding(input_ids_BxL, table_VxD, padding_idx=self.padding_idx)


class Embeddings(nn.Module):
  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.word_embeddings = WordEmbeddings(config)
    self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
    self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
    self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.dropout = nn.Dropout(config.hidden_dropout_prob)

  def forward(self, input_ids_BxL, token_type_ids_BxL):
    positions_L = torch.arange(input_ids_BxL.shape[1], device=input_ids_BxL.device)
    x_BxLxD = (self.word_embeddings(input_ids_BxL) + self.position_embeddings(positions_L)[None]
               + self.token_type_embeddings(token_type_ids_BxL))
    return self.dropout(self.LayerNorm(x_BxLxD))


class SelfAttention(nn.Module):
  """Multi-head attention; the student binarizes Q/K/V/P and adds the low-rank residual estimators."""

  def __init__(self, config: BiPFTConfig):
    super().__init__()
    D, self.H = config.hidden_size, config.num_attention_heads
    self.K, self.binary = D // self.H, config.binary
    self.precision = config.precision
    self.query, self.key, self.value = (_linear(config, D, D) for _ in range(3))
    self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
    self.rank = config.estimator_rank if config.binary else 0
    self.probs_method = config.attention_prob_quant_method if self.binary else None
    if self.binary:
      self.clip_query, self.clip_key, self.clip_value = (nn.Parameter(torch.tensor(1.0)) for _ in range(3))
    if self.probs_method == "elastic":
      self.clip_attn = nn.Parameter(torch.tensor(1.0))
    if self.rank:
      if self.K % self.rank:
        raise ValueError(f"estimator_rank {self.rank} must divide the head size {self.K}")
      self.q_p, self.k_p, self.q_m, self.k_m, self.v_p = (FPLinear(config, D, self.rank) for _ in range(5))

  def _heads(self, linear: nn.Module, alpha, x_BxLxD):
    B, L, _ = x_BxLxD.shape
    y_BxHxLxK = linear(x_BxLxD).view(B, L, self.H, self.K).transpose(1, 2)
    return SignedBinarize.apply(y_BxHxLxK, alpha) if self.binary else y_BxHxLxK

  def forward(self, x_BxLxD, mask_bias_Bx1x1xL):
    B, L, _ = x_BxLxD.shape
    q_BxHxLxK = self._heads(self.query, getattr(self, "clip_query", None), x_BxLxD)
    k_BxHxLxK = self._heads(self.key, getattr(self, "clip_key", None), x_BxLxD)
    v_BxHxLxK = self._heads(self.value, getattr(self, "clip_value", None), x_BxLxD)
    fp_operands = functools.partial(_fp_operands, self.precision)
    product = torch.matmul if self.binary else (lambda a, b: torch.matmul(*fp_operands(a, b)))
    scores_BxHxLxL = product(q_BxHxLxK, k_BxHxLxK.transpose(-1, -2))
    if self.rank:
      # Qh dK^T ~ q_m k_p^T, dQ Kh^T ~ q_p k_m^T, dQ dK^T ~ q_p k_p^T; one correction for all heads.
      q_p, k_p, q_m, k_m = fp_operands(*(f(x_BxLxD) for f in (self.q_p, self.k_p, self.q_m, self.k_m)))
      correction_BxLxL = q_m @ k_p.transpose(-1, -2) + q_p @ k_m.transpose(-1, -2) + q_p @ k_p.transpose(-1, -2)
      scores_BxHxLxL = scores_BxHxLxL + correction_BxLxL[:, None]
    # The mask goes on after the estimators and the scaling: masked probabilities are exactly 0.
    scores_BxHxLxL = scores_BxHxLxL / math.sqrt(self.K) + mask_bias_Bx1x1xL
    probs_BxHxLxL = self.dropout(torch.softmax(scores_BxHxLxL, dim=-1))
    if self.probs_method == "elastic":
      probs_BxHxLxL = UnsignedBinarize.apply(probs_BxHxLxL, self.clip_attn)
    elif self.probs_method == "bivit":
      probs_BxHxLxL = InferenceOnly.apply(_softmax_aware, "bivit", probs_BxHxLxL)
    context_BxHxLxK = product(probs_BxHxLxL, v_BxHxLxK)
    if self.rank:
      # The value residual dV ~ v_p(X), tiled over each head's channels.
      residual_BxHxLxR = torch.matmul(*fp_operands(probs_BxHxLxL, self.v_p(x_BxLxD)[:, None]))
      context_BxHxLxK = context_BxHxLxK + residual_BxHxLxR.repeat(1, 1, 1, self.K // self.rank)
    return context_BxHxLxK.transpose(1, 2).reshape(B, L, self.H * self.K), probs_BxHxLxL


class ResidualOutput(nn.Module):
  """LN(residual + dropout(Linear(x)))."""

  def __init__(self, config: BiPFTConfig, in_features: int):
    super().__init__()
    self.dense = _linear(config, in_features, config.hidden_size)
    self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
    self.dropout = nn.Dropout(config.hidden_dropout_prob)

  def forward(self, x, residual_BxLxD):
    return self.LayerNorm(self.dropout(self.dense(x)) + residual_BxLxD)


class Attention(nn.Module):
  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.self = SelfAttention(config)
    self.output = ResidualOutput(config, config.hidden_size)

  def forward(self, x_BxLxD, mask_bias_Bx1x1xL):
    context_BxLxD, probs_BxHxLxL = self.self(x_BxLxD, mask_bias_Bx1x1xL)
    return self.output(context_BxLxD, x_BxLxD), probs_BxHxLxL


class Intermediate(nn.Module):
  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.dense = _linear(config, config.hidden_size, config.intermediate_size)

  def forward(self, x_BxLxD):
    return _gelu(self.dense(x_BxLxD))  # erf-GELU in teacher and student alike


class Layer(nn.Module):
  """Post-LN transformer layer."""

  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.attention = Attention(config)
    self.intermediate = Intermediate(config)
    self.output = ResidualOutput(config, config.intermediate_size)

  def forward(self, x_BxLxD, mask_bias_Bx1x1xL):
    attended_BxLxD, probs_BxHxLxL = self.attention(x_BxLxD, mask_bias_Bx1x1xL)
    return self.output(self.intermediate(attended_BxLxD), attended_BxLxD), probs_BxHxLxL


class Encoder(nn.Module):
  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.layer = nn.ModuleList(Layer(config) for _ in range(config.num_hidden_layers))


def pool_tokens(h_BxLxD: torch.Tensor, attention_mask_BxL: torch.Tensor, pooling: str) -> torch.Tensor:
  """The pooler's input: the [CLS] state, or the mean over real (unpadded) tokens."""
  if pooling == "cls":
    return h_BxLxD[:, 0]
  weights_BxLx1 = attention_mask_BxL.to(h_BxLxD.dtype)[:, :, None]
  return (h_BxLxD * weights_BxLx1).sum(dim=1) / weights_BxLx1.sum(dim=1).clamp(min=1.0)


class Pooler(nn.Module):
  """FP: tanh(Dense(h)). Student: tanh(LN(BinLinear(h)) + h); h from pool_tokens."""

  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.dense = _linear(config, config.hidden_size, config.hidden_size)
    if config.binary:
      self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

  def forward(self, h_BxD):
    y_BxD = self.dense(h_BxD)
    if hasattr(self, "LayerNorm"):
      y_BxD = self.LayerNorm(y_BxD) + h_BxD
    return torch.tanh(y_BxD)


class MlmTransform(nn.Module):
  def __init__(self, config: BiPFTConfig):
    super().__init__()
    if config.hidden_act not in ("gelu", "relu"):
      raise ValueError(f"hidden_act {config.hidden_act!r} is not supported (gelu or relu)")
    self.act = F.gelu if config.hidden_act == "gelu" else F.relu
    self.dense = FPLinear(config, config.hidden_size, config.hidden_size)
    self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

  def forward(self, h):
    return self.LayerNorm(self.act(self.dense(h)))


class MlmPredictions(nn.Module):
  """The transform, then a decoder tied to the *latent* FP word embedding, plus a bias."""

  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.transform = MlmTransform(config)
    self.bias = nn.Parameter(torch.zeros(config.vocab_size))
    self.precision = config.precision

  def forward(self, h_BxLxD, word_embeddings_VxD):
    return F.linear(*_fp_operands(self.precision, self.transform(h_BxLxD), word_embeddings_VxD), self.bias)


class PretrainingHeads(nn.Module):
  def __init__(self, config: BiPFTConfig):
    super().__init__()
    self.predictions = MlmPredictions(config)
    self.seq_relationship = FPLinear(config, config.hidden_size, 2)


# --- Hugging Face models -------------------------------------------------------------

class BiPFTPreTrainedModel(PreTrainedModel):
  config_class = BiPFTConfig
  base_model_prefix = "bert"
  _no_split_modules = ["Embeddings", "Layer"]

  @torch.no_grad()
  def _init_weights(self, module):
    """BERT's init; the student's own leaves start at move bias 0, scales 1 (calibrate before training)."""
    std = self.config.initializer_range
    if isinstance(module, BinaryLinear):
      init.normal_(module.weight, mean=0.0, std=std)
      init.zeros_(module.bias)
      init.ones_(module.input_clip_val)
    elif isinstance(module, LearnableBias):
      init.zeros_(module.bias)
    elif isinstance(module, WordEmbeddings):
      init.normal_(module.weight, mean=0.0, std=std)
      if module.padding_idx is not None:
        init.zeros_(module.weight[module.padding_idx])
    elif isinstance(module, ZooLinear):
      init.normal_(module.weight, mean=0.0, std=std)
      init.zeros_(module.bias)  # its extras keep their zeros: checkpoints set them
    elif isinstance(module, SelfAttention) and module.binary:
      alphas = (module.clip_query, module.clip_key, module.clip_value, getattr(module, "clip_attn", None))
      for alpha in alphas:
        if alpha is not None:
          init.ones_(alpha)
    elif isinstance(module, MlmPredictions):
      init.zeros_(module.bias)
    else:
      super()._init_weights(module)


class BiPFTModel(BiPFTPreTrainedModel):
  """Embeddings, encoder and pooler. HF conventions: attention_mask 1 = attend, 0 = padding."""

  def __init__(self, config: BiPFTConfig):
    super().__init__(config)
    _check_supported(config)
    self.embeddings = Embeddings(config)
    self.encoder = Encoder(config)
    self.pooler = Pooler(config)
    self.post_init()

  def get_input_embeddings(self):
    return self.embeddings.word_embeddings

  def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              token_type_ids: Optional[torch.Tensor] = None, output_attentions: Optional[bool] = None,
              output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None):
    if attention_mask is None:
      attention_mask = torch.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = torch.zeros_like(input_ids)
    if attention_mask.dim() != 2:
      raise ValueError(f"attention_mask must be (batch, length) with 1 = attend, 0 = padding; "
                       f"got shape {tuple(attention_mask.shape)}")
    dtype = self.embeddings.position_embeddings.weight.dtype
    mask_bias_Bx1x1xL = ((1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min)[:, None, None, :]
    x_BxLxD = self.embeddings(input_ids, token_type_ids)
    hidden_states, attentions = [x_BxLxD], []
    for layer in self.encoder.layer:
      x_BxLxD, probs_BxHxLxL = layer(x_BxLxD, mask_bias_Bx1x1xL)
      hidden_states.append(x_BxLxD)
      attentions.append(probs_BxHxLxL)
    want_hidden = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
    want_attentions = self.config.output_attentions if output_attentions is None else output_attentions
    out = BaseModelOutputWithPooling(
        last_hidden_state=x_BxLxD,
        pooler_output=self.pooler(pool_tokens(x_BxLxD, attention_mask, self.config.pooling)),
        hidden_states=tuple(hidden_states) if want_hidden else None,
        attentions=tuple(attentions) if want_attentions else None)
    return out if _return_dict(self.config, return_dict) else out.to_tuple()


def _return_dict(config, return_dict: Optional[bool]) -> bool:
  return config.return_dict if return_dict is None else return_dict


@dataclass
class BiPFTForPreTrainingOutput(ModelOutput):
  loss: Optional[torch.Tensor] = None
  prediction_logits: Optional[torch.Tensor] = None
  seq_relationship_logits: Optional[torch.Tensor] = None
  hidden_states: Optional[tuple] = None
  attentions: Optional[tuple] = None


class BiPFTForPreTraining(BiPFTPreTrainedModel):
  """`bert` + MLM and NSP heads; the loss is CE_mlm + CE_nsp when both label sets are given."""

  def __init__(self, config: BiPFTConfig):
    super().__init__(config)
    self.bert = BiPFTModel(config)
    self.cls = PretrainingHeads(config)
    self.post_init()

  def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
              next_sentence_label: Optional[torch.Tensor] = None, output_attentions: Optional[bool] = None,
              output_hidden_states: Optional[bool] = None, return_dict: Optional[bool] = None):
    out = self.bert(input_ids, attention_mask, token_type_ids, output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states, return_dict=True)
    mlm_logits_BxLxV = self.cls.predictions(out.last_hidden_state, self.bert.embeddings.word_embeddings.weight)
    nsp_logits_Bx2 = self.cls.seq_relationship(out.pooler_output)
    loss = None
    if labels is not None and next_sentence_label is not None:
      loss = (F.cross_entropy(mlm_logits_BxLxV.reshape(-1, self.config.vocab_size), labels.reshape(-1))
              + F.cross_entropy(nsp_logits_Bx2, next_sentence_label.reshape(-1)))
    result = BiPFTForPreTrainingOutput(loss=loss, prediction_logits=mlm_logits_BxLxV,
                                       seq_relationship_logits=nsp_logits_Bx2,
                                       hidden_states=out.hidden_states, attentions=out.attentions)
    return result if _return_dict(self.config, return_dict) else result.to_tuple()


class BiPFTForMaskedLM(BiPFTForPreTraining):
  """The pretraining model as transformers' masked LM (AutoModelForMaskedLM, the fill-mask pipeline):
  its MLM logits, and their cross entropy where `labels` are given (-100: not a masked position)."""

  def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
              output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
              return_dict: Optional[bool] = None):
    out = super().forward(input_ids, attention_mask, token_type_ids, output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states, return_dict=True)
    logits_BxLxV = out.prediction_logits
    loss = None if labels is None else F.cross_entropy(logits_BxLxV.reshape(-1, self.config.vocab_size),
                                                       labels.reshape(-1))
    result = MaskedLMOutput(loss=loss, logits=logits_BxLxV, hidden_states=out.hidden_states, attentions=out.attentions)
    return result if _return_dict(self.config, return_dict) else result.to_tuple()


class BiPFTForSequenceClassification(BiPFTPreTrainedModel):
  """`bert` + dropout + an FP classifier on the pooled output; num_labels = 1 is regression (MSE)."""

  def __init__(self, config: BiPFTConfig):
    super().__init__(config)
    self.bert = BiPFTModel(config)
    dropout = config.hidden_dropout_prob if config.classifier_dropout is None else config.classifier_dropout
    self.dropout = nn.Dropout(dropout)
    self.classifier = FPLinear(config, config.hidden_size, config.num_labels)
    self.post_init()

  def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
              token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
              output_attentions: Optional[bool] = None, output_hidden_states: Optional[bool] = None,
              return_dict: Optional[bool] = None):
    out = self.bert(input_ids, attention_mask, token_type_ids, output_attentions=output_attentions,
                    output_hidden_states=output_hidden_states, return_dict=True)
    logits_BxC = self.classifier(self.dropout(out.pooler_output))
    loss = None
    if labels is not None:
      if self.config.num_labels == 1:
        loss = F.mse_loss(logits_BxC.squeeze(-1), labels.to(logits_BxC.dtype).reshape(-1))
      else:
        loss = F.cross_entropy(logits_BxC, labels.reshape(-1))
    result = SequenceClassifierOutput(loss=loss, logits=logits_BxC, hidden_states=out.hidden_states,
                                      attentions=out.attentions)
    return result if _return_dict(self.config, return_dict) else result.to_tuple()


__all__ = ["BiPFTConfig", "BiPFTModel", "BiPFTForPreTraining", "BiPFTForMaskedLM", "BiPFTForSequenceClassification"]
