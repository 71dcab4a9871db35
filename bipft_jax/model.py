"""BERT in Flax: the full-precision teacher and the 1-bit BiPFT student (METHOD.md sections 3-5).

One set of modules serves both. The layers binarize through the `policy.Policy` of their config
(`policy_of`): the Linear layers METHOD.md section 3 names run its LinearOp (FP in the teacher,
the release's BiPFT Linear or a zoo operator in the student), the word table, Q/K/V and attention
probabilities its binarizers. `BertConfig.binary` itself adds only the student's architecture: the
low-rank residual estimators in self-attention and the pooler's LayerNorm. Every parameter declares
its kind where it is made (`kinds.declare`; `model_params.param_kinds` reads them).
The parameter tree is named like Hugging Face's BERT (`bert/encoder/layer/0/attention/self/query`),
so the student's tree is the teacher's plus a few extra leaves (`move_bias`, `*_alpha`, estimators).

Shapes: B batch, L length, D hidden, H heads, K head size (D/H), F FFN size, V vocab, R estimator rank.
"""
import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bipft_jax import binarize, kinds
from bipft_jax import policy as policy_lib
from bipft_jax import precision as precision_lib
from bipft_jax.zoo import api as zoo_api

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture and binarization settings; built from `configs/model.py` by `from_dict`."""
  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float = 0.1
  num_labels: int = 2            # 1 = regression (STS-B)
  pad_token_id: int = 0
  mlm_transform_act: str = "gelu"  # the release's student uses "relu" here (METHOD.md section 5)
  binary: bool = False
  estimator_rank: int = 1        # rank of the residual estimators; 0 = BiPFT-A
  weight_binarizer: str = "bwn"
  activation_binarizer: str = "elastic"
  linear_binarizer: str = "bipft"  # the binarized Linear layers' operator: policy.LINEAR_BINARIZERS
  attention_prob_binarizer: str = "elastic"  # zoo.ATTENTION_PROB_BINARIZERS: elastic (the release), bivit
  matmul_precision: str = "highest"  # reduced-precision fp32 matmuls flip signs
  binary_matmul_dtype: str = "auto"  # sign products: float32 | bfloat16 | int8 | auto (the fastest); exact
  precision: str = "fp32"        # "mixed": FP matmuls in bf16 with fp32 accumulation (precision.py)
  pooling: str = "cls"           # the pooler's input: "cls" (BERT, the release) | "mean" (over real tokens)
  # Each layer's activations recomputed from its input in the backward (jax.checkpoint per layer)
  # instead of kept from the forward: less memory for one more forward. The same arithmetic, but XLA
  # fuses the program otherwise, so gradients agree to rounding, not bit for bit.
  remat: bool = False

  @classmethod
  def from_dict(cls, values: Any) -> "BertConfig":
    values = dict(values)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"unknown model config fields {unknown}; known: {sorted(known)}")
    return cls(**values)

  def __post_init__(self):
    """Every field's type and range (ValueError): a bad value stops here, not inside a compile."""
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      allowed = (int, float) if field.type is float else field.type
      if not isinstance(value, allowed) or isinstance(value, bool) and field.type is not bool:
        raise ValueError(f"{field.name} must be {field.type.__name__}, got {value!r}")
    small = [f"{n}={getattr(self, n)}" for n in _AT_LEAST_ONE if getattr(self, n) < 1]
    small += [f"{n}={getattr(self, n)}" for n in ("estimator_rank", "pad_token_id") if getattr(self, n) < 0]
    if small:
      raise ValueError(f"{', '.join(small)} out of range (sizes >= 1, estimator_rank and pad_token_id >= 0)")
    if not all(0 <= getattr(self, n) < 1 for n in _DROPOUTS) or not 0 < self.layer_norm_eps < 1:
      raise ValueError(f"dropouts must be in [0, 1) and layer_norm_eps in (0, 1), got "
                       f"{[getattr(self, n) for n in _DROPOUTS]} and {self.layer_norm_eps}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
    for name, choices in (("pooling", POOLINGS), ("mlm_transform_act", ("gelu", "relu")),
                          ("binary_matmul_dtype", precision_lib.BINARY_MATMUL_DTYPES),
                          ("precision", precision_lib.PRECISIONS),
                          ("matmul_precision", _PRECISIONS)):
      if getattr(self, name) not in choices:
        raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
    policy_of(self)  # unknown binarizer names: a ValueError naming the known ones

  @property
  def head_size(self) -> int:
    return self.hidden_size // self.num_heads


def _dense_init():
  return nn.initializers.normal(stddev=0.02)


@functools.lru_cache(maxsize=None)
def policy_of(config: BertConfig) -> policy_lib.Policy:
  """The binarizers `config`'s layers use (built once per config)."""
  fp_product = precision_lib.mixed_einsum if config.precision == "mixed" else None
  return policy_lib.for_config(config, functools.partial(binary_einsum, config=config), fp_product)


def _layer_norm(config: BertConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, name=name,
                      scale_init=kinds.declare(nn.initializers.ones, ("embed",), kinds.NORM),
                      bias_init=kinds.declare(nn.initializers.zeros, ("embed",), kinds.NORM))


def _mixed_dot_general(x, kernel, dimension_numbers, precision=None, **_):
  """nn.Dense's product under precision "mixed" (Dense contracts x's last axis with kernel's first)."""
  assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())), dimension_numbers
  return precision_lib.mixed_einsum("...i,io->...o", x, kernel)


def _fp_einsum(config: BertConfig, spec: str, a: Array, b: Array) -> Array:
  """einsum of full-precision operands under `config.precision`."""
  return precision_lib.fp_einsum(spec, a, b, config.precision, config.matmul_precision)


def _dense(config: BertConfig, features: int, axes: tuple, name: str) -> nn.Dense:
  """An FP Linear in teacher and student alike (estimators, heads)."""
  mixed = {"dot_general": _mixed_dot_general} if config.precision == "mixed" else {}
  return nn.Dense(features, name=name, precision=config.matmul_precision, **mixed,
                  kernel_init=kinds.declare(_dense_init(), axes, kinds.WEIGHT),
                  bias_init=kinds.declare(nn.initializers.zeros, axes[-1:], kinds.BIAS))


def binarize_activation(module: nn.Module, name: str, x: Array,
                        binarizer: Optional[binarize.ActivationBinarizer], calibrate: bool) -> Array:
  """Binarizes `x` with the learned scalar `module.<name>` (unchanged when `binarizer` is None: FP).

  With `calibrate=True` the scale is set from `x` itself (the release's lazy init, done once,
  deterministically) and recorded in the 'calibration' collection for `calibrate_alphas`.
  """
  if binarizer is None:
    return x
  alpha = module.param(name, kinds.declare(nn.initializers.ones, (), kinds.ACTIVATION_SCALE), ())
  if calibrate:
    alpha = jax.lax.stop_gradient(binarizer.initial_alpha(x))
    module.put_variable("calibration", name, alpha)
  return binarizer.apply(x, alpha)


def binary_einsum(spec: str, x_b: Array, y_b: Array, config: BertConfig) -> Array:
  """einsum of two binarized operands, each one scale times {-1, 0, 1} (or {0, 1}).

  The scales are factored out, so the product of the sign patterns sums small integers: exact in
  any summation order, in bf16 with fp32 accumulation and in int8 with int32 accumulation too
  (`binary_matmul_dtype`; "auto" takes this machine's fastest, see precision.py). Results then do
  not depend on the device layout, sharding or units, whose rounding differences the next sign
  threshold would otherwise amplify. Gradients are those of the plain product, in fp32 (with bf16
  operands under precision "mixed", as every FP product there).
  """
  dtype = precision_lib.sign_product_dtype(config.binary_matmul_dtype)
  return _binary_einsum(spec, x_b, y_b, dtype, config.precision)


def _scale(b: Array) -> Array:
  s = jnp.max(jnp.abs(b))
  return jnp.where(s > 0, s, 1.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3, 4))
def _binary_einsum(spec: str, x_b: Array, y_b: Array, dtype: str, precision: str) -> Array:
  return _binary_einsum_fwd(spec, x_b, y_b, dtype, precision)[0]


def _binary_einsum_fwd(spec, x_b, y_b, dtype, precision):
  # sign(b) is b's pattern (b = scale * pattern, scale > 0): no division by the scale, no rounding.
  x_scale, y_scale = _scale(x_b), _scale(y_b)
  counts = precision_lib.sign_einsum(spec, jnp.sign(x_b), jnp.sign(y_b), dtype)
  return counts * (x_scale * y_scale), (x_b, y_b, x_scale, y_scale)


def _binary_einsum_bwd(spec, dtype, precision, residuals, g):
  # The cotangent is not a sign pattern: the backward products are FP ones.
  x_b, y_b, x_scale, y_scale = residuals
  if precision == "mixed":  # bf16 operands: the patterns exactly, the scaled cotangent rounded
    dx_s, dy_s = precision_lib.einsum_transposes(spec, jnp.sign(x_b), jnp.sign(y_b), g * (x_scale * y_scale))
    return dx_s / x_scale, dy_s / y_scale
  return precision_lib.fp32_transposes(spec, x_b, y_b, g)


_binary_einsum.defvjp(_binary_einsum_fwd, _binary_einsum_bwd)


class Linear(nn.Module):
  """A Linear that METHOD.md binarizes in the student: the policy's LinearOp on kernel, bias and extras.

  The extras (`move_bias` and `input_alpha` of the release's Linear, another operator's scales)
  are made here with the kinds and layer axes the operator declares. With `calibrate=True` the
  operator's data-dependent init runs and what it sets is recorded in the 'calibration' collection.
  """
  features: int
  config: BertConfig
  axes: tuple = ("embed", "mlp")

  @nn.compact
  def __call__(self, x: Array, calibrate: bool = False, deterministic: bool = True) -> Array:
    policy = policy_of(self.config)
    op = policy.linear
    in_features = x.shape[-1]
    kernel = self.param("kernel", kinds.declare(_dense_init(), self.axes, policy.kernel_kind),
                        (in_features, self.features))
    bias = self.param("bias", kinds.declare(nn.initializers.zeros, self.axes[-1:], kinds.BIAS),
                      (self.features,))
    layer_axes = {zoo_api.IN: self.axes[0], zoo_api.OUT: self.axes[-1]}
    extras = {}
    for name, extra in op.init_extras(in_features, self.features).items():
      axes = tuple(layer_axes.get(a) for a in extra.axes) if len(extra.axes) == len(extra.shape) else (
          (None,) * len(extra.shape))
      extras[name] = self.param(name, kinds.declare(extra.init, axes, extra.kind), extra.shape, jnp.float32)
    if calibrate and op.calibrate is not None:
      before, extras = extras, op.calibrate(x, kernel, extras)
      for name, value in extras.items():
        if value is not before[name]:
          self.put_variable("calibration", name, value)
    with jax.default_matmul_precision(self.config.matmul_precision):  # for operators that do not say
      return op.apply(x, kernel, bias, extras, train=not deterministic)


class WordEmbeddings(nn.Module):
  """Token lookup; the student looks up the row-wise BWN binarized table (METHOD.md section 1)."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids_BxL) -> Array:
    cfg = self.config
    policy = policy_of(cfg)
    table_VxD = self.param("embedding",
                           kinds.declare(_dense_init(), ("vocab", "embed"), policy.embedding_kind),
                           (cfg.vocab_size, cfg.hidden_size))
    words_BxLxD = policy.embedding(table_VxD, input_ids_BxL)
    # torch's padding_idx: the padding token's lookup sends no gradient to its row.
    is_pad_BxLx1 = (input_ids_BxL == cfg.pad_token_id)[..., None]
    return jnp.where(is_pad_BxLx1, jax.lax.stop_gradient(words_BxLxD), words_BxLxD)


class Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids_BxL, deterministic: bool) -> Array:
    cfg = self.config
    words_BxLxD = WordEmbeddings(cfg, name="word_embeddings")(input_ids_BxL)
    length = input_ids_BxL.shape[1]
    table_init = kinds.declare(_dense_init(), (None, "embed"), kinds.WEIGHT)
    positions_LxD = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, name="position_embeddings",
                             embedding_init=table_init)(jnp.arange(length))
    types_BxLxD = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, name="token_type_embeddings",
                           embedding_init=table_init)(token_type_ids_BxL)
    x_BxLxD = _layer_norm(cfg, "LayerNorm")(words_BxLxD + positions_LxD[None] + types_BxLxD)
    return nn.Dropout(cfg.hidden_dropout)(x_BxLxD, deterministic=deterministic)


class SelfAttention(nn.Module):
  """Multi-head self-attention; in the student with binarized Q/K/V/P and residual estimators."""
  config: BertConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_bias_Bx1x1xL, deterministic: bool, calibrate: bool):
    cfg, policy = self.config, policy_of(self.config)
    B, L, _ = x_BxLxD.shape
    H, K = cfg.num_heads, cfg.head_size

    def heads(name):
      y_BxLxD = Linear(cfg.hidden_size, cfg, ("embed", "heads"), name=name)(x_BxLxD, calibrate, deterministic)
      return binarize_activation(self, f"{name}_alpha", y_BxLxD.reshape(B, L, H, K), policy.qkv, calibrate)

    q_BxLxHxK, k_BxLxHxK, v_BxLxHxK = heads("query"), heads("key"), heads("value")
    scores_BxHxLxL = policy.product("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK)
    estimate = cfg.binary and cfg.estimator_rank > 0
    if estimate:
      # Low-rank estimates of the three terms a binary Q K^T drops (METHOD.md section 4):
      # Qh dK^T ~ q_m k_p^T, dQ Kh^T ~ q_p k_m^T, dQ dK^T ~ q_p k_p^T; one correction for all heads.
      def project(name):
        return _dense(cfg, cfg.estimator_rank, ("embed", None), name)(x_BxLxD)
      q_p, k_p, q_m, k_m = (project(n) for n in ("q_p", "k_p", "q_m", "k_m"))
      correction_BxLxL = (_fp_einsum(cfg, "bqr,bsr->bqs", q_m, k_p)
                          + _fp_einsum(cfg, "bqr,bsr->bqs", q_p, k_m)
                          + _fp_einsum(cfg, "bqr,bsr->bqs", q_p, k_p))
      scores_BxHxLxL = scores_BxHxLxL + correction_BxLxL[:, None]
    scores_BxHxLxL = scores_BxHxLxL / jnp.sqrt(jnp.float32(K)) + mask_bias_Bx1x1xL
    probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
    probs_BxHxLxL = nn.Dropout(cfg.attention_dropout)(probs_BxHxLxL, deterministic=deterministic)
    probs_BxHxLxL = self.binarize_probs(probs_BxHxLxL, policy.probs, calibrate, deterministic)
    context_BxLxHxK = policy.product("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK)
    if estimate:
      # The value residual dV ~ v_p(X), tiled over each head's channels (R = 1: the release's broadcast).
      v_p_BxLxR = _dense(cfg, cfg.estimator_rank, ("embed", None), "v_p")(x_BxLxD)
      if K % cfg.estimator_rank:
        raise ValueError(f"estimator_rank {cfg.estimator_rank} must divide the head size {K}")
      residual_BxLxHxR = _fp_einsum(cfg, "bhqs,bsr->bqhr", probs_BxHxLxL, v_p_BxLxR)
      context_BxLxHxK = context_BxLxHxK + jnp.tile(residual_BxLxHxR, (1, 1, 1, K // cfg.estimator_rank))
    return context_BxLxHxK.reshape(B, L, H * K), probs_BxHxLxL

  def binarize_probs(self, probs_BxHxLxL, op: Optional[zoo_api.ProbOp], calibrate: bool, deterministic: bool):
    """The policy's probability binarizer, its extras made here as `probs_<name>` (the release's alpha:
    `probs_alpha`); calibration as in `Linear`. Unchanged when `op` is None (FP)."""
    if op is None:
      return probs_BxHxLxL
    extras = {name: self.param(f"probs_{name}",
                               kinds.declare(extra.init, (None,) * len(extra.shape), extra.kind),
                               extra.shape, jnp.float32)
              for name, extra in op.init_extras().items()}
    if calibrate and op.calibrate is not None:
      extras = jax.lax.stop_gradient(op.calibrate(probs_BxHxLxL, extras))
      for name, value in extras.items():
        self.put_variable("calibration", f"probs_{name}", value)
    return op.apply(probs_BxHxLxL, extras, train=not deterministic)


class ResidualOutput(nn.Module):
  """LN(residual + dropout(Linear(x))): the `output` block after attention and after the FFN."""
  config: BertConfig
  axes: tuple = ("mlp", "embed")

  @nn.compact
  def __call__(self, x, residual_BxLxD, deterministic: bool, calibrate: bool):
    cfg = self.config
    y_BxLxD = Linear(cfg.hidden_size, cfg, self.axes, name="dense")(x, calibrate, deterministic)
    y_BxLxD = nn.Dropout(cfg.hidden_dropout)(y_BxLxD, deterministic=deterministic)
    return _layer_norm(cfg, "LayerNorm")(y_BxLxD + residual_BxLxD)


class Attention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_bias_Bx1x1xL, deterministic: bool, calibrate: bool):
    context_BxLxD, probs_BxHxLxL = SelfAttention(self.config, name="self")(
        x_BxLxD, mask_bias_Bx1x1xL, deterministic, calibrate)
    out_BxLxD = ResidualOutput(self.config, ("heads", "embed"), name="output")(
        context_BxLxD, x_BxLxD, deterministic, calibrate)
    return out_BxLxD, probs_BxHxLxL


class Intermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool, calibrate: bool):
    cfg = self.config
    dense = Linear(cfg.intermediate_size, cfg, ("embed", "mlp"), name="dense")
    h_BxLxF = dense(x_BxLxD, calibrate, deterministic)
    return jax.nn.gelu(h_BxLxF, approximate=False)


class Layer(nn.Module):
  """Post-LN transformer layer."""
  config: BertConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_bias_Bx1x1xL, deterministic: bool, calibrate: bool):
    x_BxLxD = nn.with_logical_constraint(x_BxLxD, ("batch", "length", "embed"))
    attended_BxLxD, probs_BxHxLxL = Attention(self.config, name="attention")(
        x_BxLxD, mask_bias_Bx1x1xL, deterministic, calibrate)
    h_BxLxF = Intermediate(self.config, name="intermediate")(attended_BxLxD, deterministic, calibrate)
    h_BxLxF = nn.with_logical_constraint(h_BxLxF, ("batch", "length", "mlp"))
    out_BxLxD = ResidualOutput(self.config, name="output")(h_BxLxF, attended_BxLxD, deterministic, calibrate)
    return out_BxLxD, probs_BxHxLxL


# model.remat's layer: the same parameters, its activations recomputed in the backward. Static:
# deterministic and calibrate (arguments 3 and 4, counting self).
RematLayer = nn.remat(Layer, static_argnums=(3, 4))


POOLINGS = ("cls", "mean")
_AT_LEAST_ONE = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                 "max_position_embeddings", "type_vocab_size", "num_labels")
_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")  # jax.lax.Precision
_DROPOUTS = ("hidden_dropout", "attention_dropout", "classifier_dropout")


def pool_tokens(h_BxLxD: Array, attention_mask_BxL: Array, pooling: str) -> Array:
  """The pooler's input: the [CLS] state, or the mean over real (unpadded) tokens."""
  if pooling == "cls":
    return h_BxLxD[:, 0]
  weights_BxLx1 = attention_mask_BxL.astype(h_BxLxD.dtype)[:, :, None]
  return jnp.sum(h_BxLxD * weights_BxLx1, axis=1) / jnp.maximum(jnp.sum(weights_BxLx1, axis=1), 1.0)


class Pooler(nn.Module):
  """FP: tanh(Dense(h)). Student: tanh(LN(BinDense(h)) + h) with a new LayerNorm; h from pool_tokens."""
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxD, deterministic: bool, calibrate: bool):
    cfg = self.config
    dense = Linear(cfg.hidden_size, cfg, ("embed", "embed_out"), name="dense")
    y_BxD = dense(h_BxD, calibrate, deterministic)
    if cfg.binary:
      y_BxD = _layer_norm(cfg, "LayerNorm")(y_BxD) + h_BxD
    return jnp.tanh(y_BxD)


class LayerStack(nn.Module):
  """The layers, named 0..n-1 so parameter paths read encoder/layer/<i>/..., as in Hugging Face."""
  config: BertConfig

  @nn.compact
  def __call__(self, x_BxLxD, mask_bias_Bx1x1xL, deterministic: bool, calibrate: bool):
    hidden_states, attentions = [x_BxLxD], []
    layer = RematLayer if self.config.remat else Layer
    for i in range(self.config.num_layers):
      x_BxLxD, probs_BxHxLxL = layer(self.config, name=str(i))(
          x_BxLxD, mask_bias_Bx1x1xL, deterministic, calibrate)
      hidden_states.append(x_BxLxD)
      attentions.append(probs_BxHxLxL)
    return hidden_states, attentions


class Encoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, *args):
    return LayerStack(self.config, name="layer")(*args)


class BertModel(nn.Module):
  """Embeddings, encoder and pooler; returns every hidden state (the embedding output first)."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None, *,
               deterministic: bool = True, calibrate: bool = False) -> dict:
    if token_type_ids_BxL is None:
      token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
    if attention_mask_BxL is None:
      attention_mask_BxL = jnp.ones_like(input_ids_BxL)
    # Added after the scaled scores (and estimator terms): masked probabilities become exactly 0.
    mask_bias_Bx1x1xL = ((1.0 - attention_mask_BxL.astype(jnp.float32))
                         * jnp.finfo(jnp.float32).min)[:, None, None, :]
    x_BxLxD = Embeddings(self.config, name="embeddings")(input_ids_BxL, token_type_ids_BxL, deterministic)
    hidden_states, attentions = Encoder(self.config, name="encoder")(
        x_BxLxD, mask_bias_Bx1x1xL, deterministic, calibrate)
    pooled_BxD = Pooler(self.config, name="pooler")(
        pool_tokens(hidden_states[-1], attention_mask_BxL, self.config.pooling), deterministic, calibrate)
    return {"hidden_states": hidden_states, "attentions": attentions, "pooled": pooled_BxD}


class MlmTransform(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD):
    cfg = self.config
    h_BxNxD = _dense(cfg, cfg.hidden_size, ("embed", "embed_out"), "dense")(h_BxNxD)
    act = {"gelu": lambda y: jax.nn.gelu(y, approximate=False), "relu": jax.nn.relu}[cfg.mlm_transform_act]
    return _layer_norm(cfg, "LayerNorm")(act(h_BxNxD))


class MlmPredictions(nn.Module):
  """The transform, then the decoder tied to the latent FP word embedding, plus a bias."""
  config: BertConfig

  @nn.compact
  def __call__(self, h_BxNxD, word_embeddings_VxD):
    cfg = self.config
    h_BxNxD = MlmTransform(cfg, name="transform")(h_BxNxD)
    bias_V = self.param("bias", kinds.declare(nn.initializers.zeros, ("vocab",), kinds.BIAS),
                        (cfg.vocab_size,))
    # On the tokens flattened: the gradient of the table then contracts one axis (no transposed copy).
    logits_BNxV = _fp_einsum(cfg, "nd,vd->nv", h_BxNxD.reshape(-1, h_BxNxD.shape[-1]), word_embeddings_VxD)
    return logits_BNxV.reshape(*h_BxNxD.shape[:-1], -1) + bias_V


class PretrainingHeads(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, sequence_BxNxD, pooled_BxD, word_embeddings_VxD):
    mlm_logits_BxNxV = MlmPredictions(self.config, name="predictions")(sequence_BxNxD, word_embeddings_VxD)
    nsp_logits_Bx2 = _dense(self.config, 2, ("embed", None), "seq_relationship")(pooled_BxD)
    return mlm_logits_BxNxV, nsp_logits_Bx2


def _gather_positions(x_BxLxD, positions_BxN):
  return jnp.take_along_axis(x_BxLxD, positions_BxN[..., None], axis=1)


class BertForPreTraining(nn.Module):
  """`bert` + `cls` heads. With `mlm_positions_BxN` the MLM decoder runs only at those positions;
  `detach_heads` lets the heads learn on the encoder's features without sending gradients into it."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None, *,
               mlm_positions_BxN=None, deterministic: bool = True, calibrate: bool = False,
               detach_heads: bool = False) -> dict:
    bert = BertModel(self.config, name="bert")
    out = bert(input_ids_BxL, token_type_ids_BxL, attention_mask_BxL,
               deterministic=deterministic, calibrate=calibrate)
    sequence_BxNxD = out["hidden_states"][-1]
    if mlm_positions_BxN is not None:
      sequence_BxNxD = _gather_positions(sequence_BxNxD, mlm_positions_BxN)
    word_embeddings_VxD = nn.meta.unbox(bert.variables["params"]["embeddings"]["word_embeddings"]["embedding"])
    head_inputs = (sequence_BxNxD, out["pooled"], word_embeddings_VxD)
    if detach_heads:
      head_inputs = jax.lax.stop_gradient(head_inputs)
    out["mlm_logits"], out["nsp_logits"] = PretrainingHeads(self.config, name="cls")(*head_inputs)
    return out


class BertForSequenceClassification(nn.Module):
  """`bert` + dropout + an FP `classifier` on the pooled output (num_labels = 1: regression)."""
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids_BxL, token_type_ids_BxL=None, attention_mask_BxL=None, *,
               deterministic: bool = True, calibrate: bool = False) -> dict:
    cfg = self.config
    out = BertModel(cfg, name="bert")(input_ids_BxL, token_type_ids_BxL, attention_mask_BxL,
                                      deterministic=deterministic, calibrate=calibrate)
    pooled_BxD = nn.Dropout(cfg.classifier_dropout)(out["pooled"], deterministic=deterministic)
    out["logits"] = _dense(cfg, cfg.num_labels, ("embed", None), "classifier")(pooled_BxD)
    return out


HEADS = {"pretraining": BertForPreTraining, "classification": BertForSequenceClassification,
         "encoder": BertModel}


def build(config: BertConfig, head: str = "pretraining") -> nn.Module:
  """The Flax module for `config` with the named head: pretraining, classification or encoder."""
  if head not in HEADS:
    raise ValueError(f"unknown head {head!r}; choose one of {sorted(HEADS)}")
  return HEADS[head](config)


MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")  # a batch's fields every head reads
