"""True 1-bit inference: bit-packed weights and activations, XOR/AND + popcount matmuls.

Every tensor the student binarizes (METHOD.md section 3) is stored as bit-planes packed along the
contracted (input) dimension into uint32 words: of K elements in W = ceil(K / 32) words, bit j of
word w is element j * W + w (see pack_bits for why interleaved).

How zeros stay exact. sign(0) = 0 in every binarizer, and zeros are real: BWN's sign(W - e) is 0
where W == e, and activations are 0 where x + move_bias == 0 (e.g. an attention-output input row
whose binarized probabilities are all 0 with a zero move bias). A ternary value t in {-1, 0, +1} is
therefore two planes: `sign` (t < 0) and `nonzero` (t != 0); the sign plane is already 0 wherever
t is. For t = x . y over K elements:
  sum_k x_k y_k = #(both nonzero) - 2 * #(both nonzero and signs differ)
Padding K up to whole words sets both planes to 0, so padded bits contribute nothing. Activations
always carry their nonzero plane; a weight matrix carries one only if it has an exact zero (then the
two-mask form is used), else the cheaper form `nnz(x) - 2 * popcount((x_sign ^ w_sign) & x_nonzero)`.
Binarized attention probabilities are {0, 1} bits p, so p . v = #(p & v_nonzero) - 2 * #(p & v_sign).
Integer counts are exact; each is scaled once by the product of the two binarizers' scales, as the
simulated model's fp32 products are, so the packed encoder gives the simulated logits up to fp32
summation order. The FP products (the estimators', the classifier's) follow the model's `precision`
as model.py's do: a student trained in "mixed" takes bf16 operands there in both (the rt_demo
classifier evaluated in "mixed" disagreed with its packed forward on 39 of 1,281 dev predictions
while that computed them in fp32; on 1 since, by summation order).

Which binarizer a Linear uses is the config's LinearOp (`model.policy_of(config).linear`): its
`weight_planes` give the weight's planes and scales (the release's BWN: one plane, one scale; a
dual-binarized weight: two planes, `kernel_sign` and `kernel_sign_1`, each with its scales), its
`activation_planes` the input's sign plane and scale at run time, from the layer's extras (kept as
they are). An operator whose weight or input is not scaled sign planes does not pack: pack_params
refuses it by name. Binarized kernels are found by their declared kind (`model_params.param_kinds`).

Kernels. "popcount" runs the matmuls above on the packed words as XLA loops; "native" runs every
binarized product's counts (the Linears and the two attention products) in C++ custom calls built
for the host on first use (`bipft_jax.native`: outputs kept in registers over the contracted axis,
which XLA's loops do not do; the operands packed in the call). "int8" expands the weight planes
once, at load (`prepare`), into int8 {-1, 0, 1} matrices and runs every binarized product (the
Linears and the two attention products) as an int8 matmul with int32 accumulation, on the int8 units
of the host (AMX, VNNI) or accelerator. All three give the same integer counts, so the same outputs
bit for bit; the file stays 1-bit, but int8's weights take one byte each in memory (8x the planes:
BERT-base's 85M binarized weights, 10.6 MB -> 85 MB). "auto" picks the fastest on this machine by a
one-time measurement of a one-layer encoder (precision.choose, cached per machine and version of the
kernels' code; a kernel that cannot be built or run here is skipped); `packed_file.load_packed`
prepares it by default. For native and int8, `prepare` also replaces each FFN's GELU: the output
Linear's input signs are a function of the input Linear's integer counts, channel by channel,
computed once for every count by the forward's own expressions and kept as step functions
(`ffn_steps`, 16 bytes a channel), so GELU never runs (the native call reads the counts through
them; int8 decodes them in XLA). popcount keeps GELU, the reference the other two equal bit for bit.

Shapes: as in model.py, plus W words along the contracted axis (ceil(K / 32)).
"""
import functools
import hashlib
import pathlib
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bipft_jax import binarize, kinds, native, precision
from bipft_jax.model import BertConfig, build, policy_of, pool_tokens
from bipft_jax.model_params import init_params, param_kinds
from bipft_jax.zoo.api import activation_signs

Array = jax.Array
WORD_BITS = 32
WORD_DTYPE = jnp.uint32
# The heads a packed model carries; a pretraining checkpoint exports its encoder (see pack_params).
PACKED_HEADS = ("encoder", "classification")
REMAINDER_DTYPES = {"float16": np.float16, "float32": np.float32}  # how an export stores the FP tensors
KERNELS = ("popcount", "int8", "native", "auto")
NATIVE_PREFIX = "native"  # prepare(..., "native") names the weight planes native_sign, native_nonzero...
FFN_STEPS = "ffn_steps"  # prepare (native, int8) adds the FFN's step functions to its output Linear


def num_words(k: int) -> int:
  return -(-k // WORD_BITS)


# --- bit packing -------------------------------------------------------------

def pack_bits(bits_xK: Array) -> Array:
  """Packs booleans along the last axis into uint32 words (zero-padded): [..., K] -> [..., W].

  Element k goes to word k % W, bit k // W (interleaved, not consecutive): packing is then a sum
  over a major axis of 32 contiguous rows, vectorized along the words; consecutive bits make it a
  32-wide reduction inside each word, 10x slower (8 x 128 x 3072 activations: 3.5 ms -> 0.33 ms).
  Any fixed bit order works for the matmuls, as long as both operands use the same.
  """
  k = bits_xK.shape[-1]
  words = num_words(k)
  bits_xK = jnp.pad(bits_xK, [(0, 0)] * (bits_xK.ndim - 1) + [(0, words * WORD_BITS - k)])
  bits_x32xW = bits_xK.reshape(*bits_xK.shape[:-1], WORD_BITS, words).astype(WORD_DTYPE)
  shifts_32x1 = jnp.arange(WORD_BITS, dtype=WORD_DTYPE)[:, None]
  # Distinct bits never carry, so the sum is the bitwise OR.
  return jnp.sum(bits_x32xW << shifts_32x1, axis=-2, dtype=WORD_DTYPE)


def unpack_bits(words_xW: Array, k: int) -> Array:
  """The inverse of `pack_bits`: [..., W] uint32 -> [..., k] bool."""
  bits_x32xW = (words_xW[..., None, :] >> jnp.arange(WORD_BITS, dtype=WORD_DTYPE)[:, None]) & 1
  return bits_x32xW.reshape(*words_xW.shape[:-1], -1)[..., :k].astype(bool)


def pack_signed(x_xK: Array) -> tuple:
  """The (sign, nonzero) planes of sign(x) along the last axis, each [..., W]."""
  return pack_bits(x_xK < 0), pack_bits(x_xK != 0)


def unpack_signed(sign_xW: Array, nonzero_xW: Array, k: int) -> Array:
  """sign(x) as float32 {-1, 0, +1} from its planes."""
  negative = unpack_bits(sign_xW, k)
  return jnp.where(unpack_bits(nonzero_xW, k), jnp.where(negative, -1.0, 1.0), 0.0).astype(jnp.float32)


# --- popcount matmuls ----------------------------------------------------------
# The word axis is summed by a Python loop of elementwise terms, not jnp.sum over an axis: XLA CPU
# then emits one loop fusion vectorized along the output columns N, with the running count in a
# register; a reduction over the word axis was 3-8x slower (bench/packed_inference.py history).

def _popcount(words: Array) -> Array:
  return jax.lax.population_count(words).astype(jnp.int32)


def _sum_over_words(num: int, term) -> Array:
  total = term(0)
  for i in range(1, num):
    total = total + term(i)
  return total


def signed_matmul(x_sign_xMxW: Array, x_nonzero_xMxW: Array, w_sign_xWxN: Array,
                  w_nonzero_xWxN: Optional[Array] = None) -> Array:
  """Exact int32 sum_k sign(x)_mk sign(w)_kn from packed planes (leading axes broadcast).

  `w_nonzero=None` means w has no zeros (no padding either: x's nonzero plane masks that).
  """
  num = x_sign_xMxW.shape[-1]
  xs = lambda i: x_sign_xMxW[..., :, i, None]
  xn = lambda i: x_nonzero_xMxW[..., :, i, None]
  ws = lambda i: w_sign_xWxN[..., i, None, :]
  if w_nonzero_xWxN is None:
    nnz_xMx1 = _sum_over_words(num, lambda i: _popcount(xn(i)))
    differ = _sum_over_words(num, lambda i: _popcount((xs(i) ^ ws(i)) & xn(i)))
    return nnz_xMx1 - 2 * differ
  both = lambda i: xn(i) & w_nonzero_xWxN[..., i, None, :]
  return (_sum_over_words(num, lambda i: _popcount(both(i)))
          - 2 * _sum_over_words(num, lambda i: _popcount((xs(i) ^ ws(i)) & both(i))))


def unsigned_signed_matmul(p_bits_xMxW: Array, v_sign_xWxN: Array, v_nonzero_xWxN: Array) -> Array:
  """Exact int32 sum_k p_mk sign(v)_kn for bits p in {0, 1} (binarized attention probabilities)."""
  num = p_bits_xMxW.shape[-1]
  p = lambda i: p_bits_xMxW[..., :, i, None]
  return (_sum_over_words(num, lambda i: _popcount(p(i) & v_nonzero_xWxN[..., i, None, :]))
          - 2 * _sum_over_words(num, lambda i: _popcount(p(i) & v_sign_xWxN[..., i, None, :])))


def _int8_signs(x: Array) -> Array:
  """sign(x) in {-1, 0, 1} as int8 (the planes pack_signed would make, unpacked)."""
  return activation_signs(x).astype(jnp.int8)


def _heads_first(x_BxLxHxK: Array) -> Array:
  return x_BxLxHxK.transpose(0, 2, 1, 3)


def _query_key_counts(q_BxLxHxK: Array, k_BxLxHxK: Array, kernel: str) -> Array:
  """Exact sum_k sign(q)_bqhk sign(k)_bshk per head, as float32 [B, H, L, L].

  The int8 kernel hands XLA the projections' own [B, L, H, K] layout and lets it place the
  transposes: given operands already transposed to [B, H, L, K], XLA:CPU ran these batched int8
  products on a fallback loop, about 10x slower (bench/packed_inference.py).
  """
  if kernel == "int8":
    return jnp.einsum("bqhk,bshk->bhqs", _int8_signs(q_BxLxHxK), _int8_signs(k_BxLxHxK),
                      preferred_element_type=jnp.int32).astype(jnp.float32)
  if kernel == "native":
    return native.kernels().query_key_counts(q_BxLxHxK, k_BxLxHxK)
  k_sign, k_nonzero = (jnp.swapaxes(planes, -1, -2) for planes in pack_signed(_heads_first(k_BxLxHxK)))
  return signed_matmul(*pack_signed(_heads_first(q_BxLxHxK)), k_sign, k_nonzero).astype(jnp.float32)


def _probs_value_counts(keep_BxHxLxL: Array, v_BxLxHxK: Array, kernel: str) -> Array:
  """Exact sum_s keep_bhqs sign(v)_bshk for booleans keep, as float32 [B, L, H, K] (layout: see above)."""
  if kernel == "int8":
    return jnp.einsum("bhqs,bshk->bqhk", keep_BxHxLxL.astype(jnp.int8), _int8_signs(v_BxLxHxK),
                      preferred_element_type=jnp.int32).astype(jnp.float32)
  if kernel == "native":
    return native.kernels().probs_value_counts(keep_BxHxLxL, v_BxLxHxK)
  # v packed along the contracted axis (positions): [B, H, W, K].
  v_sign, v_nonzero = (jnp.swapaxes(planes, -1, -2) for planes in pack_signed(v_BxLxHxK.transpose(0, 2, 3, 1)))
  return _heads_first(unsigned_signed_matmul(pack_bits(keep_BxHxLxL), v_sign, v_nonzero).astype(jnp.float32))


def jit(fn, **jit_options):
  """jax.jit for the packed kernels: on CPU, compiled for 512-bit vectors where the host has them.

  XLA:CPU prefers 256-bit vectors by default; the popcount loops then run at half the width of
  AVX-512 (VPOPCNTDQ): the popcount forward took 1.4x as long at batch 8 on the AMD EPYC (373 vs
  267 ms; the int8 forward was unchanged). Hosts without AVX-512 ignore the preference.
  """
  options = {"xla_cpu_prefer_vector_width": 512} if jax.default_backend() == "cpu" else None
  return jax.jit(fn, compiler_options=options, **jit_options)


def _kernel_probe(kernel: str, batch: int = 8, length: int = 128):
  """A one-layer BERT-base-wide packed encoder's forward on `kernel`, at batch x length: zero-argument,
  set up on its first call (which raises where the kernel is unavailable).

  A whole layer, not one matmul: on XLA:CPU the kernels' cost lies as much in what surrounds the
  products (packing the activations, the int8 conversions, the attention) as in the products.
  """
  @functools.lru_cache(maxsize=None)
  def set_up():
    config = BertConfig(binary=True, num_layers=1, vocab_size=128, max_position_embeddings=length)
    params = init_params(build(config, "encoder"), jax.random.key(0))
    head, packed = pack_params(config, "encoder", params)
    ids_BxL = jnp.asarray(np.random.default_rng(0).integers(1, config.vocab_size, (batch, length)), jnp.int32)
    run = jit(lambda p, ids: forward(config, head, p, ids)["hidden_states"][-1])
    return functools.partial(run, prepare(config, packed, kernel), ids_BxL)

  return lambda: set_up()()


def resolve_kernel(kernel: str) -> str:
  """`kernel` itself, or for "auto" the faster exact kernel on this machine (measured once, cached)."""
  if kernel not in KERNELS:
    raise ValueError(f"unknown packed kernel {kernel!r}; choose one of {', '.join(KERNELS)}")
  if kernel != "auto":
    return kernel
  return precision.choose(choice_kind(), {name: _kernel_probe(name) for name in KERNELS[:-1]})


@functools.lru_cache(maxsize=None)
def choice_kind() -> str:
  """The name `auto`'s choice is cached under: with a hash of the kernels' code (this module and
  the native source), so that a changed kernel is measured again rather than judged by old times."""
  code = pathlib.Path(__file__).read_bytes() + native.SOURCE.read_bytes()
  return "packed_kernel-" + hashlib.sha256(code).hexdigest()[:12]


def prepare(config: BertConfig, packed: dict, kernel: str = "auto") -> dict:
  """`packed` ready for `forward` on `kernel`: unchanged for popcount; for native the same planes
  under the names that select the custom call (`native_sign`, `native_nonzero`...); for int8 each
  binarized Linear's planes replaced by int8 {-1, 0, 1} kernels (`kernel_int8`, `kernel_int8_1`...:
  [K, N], 1 byte a weight); for both, each FFN's GELU as step functions of its counts (`FFN_STEPS`,
  see `ffn_steps`) where the binarizer allows. popcount keeps GELU: the reference the others equal.
  native.Unavailable (a UserError) where native cannot be built or run."""
  kernel = resolve_kernel(kernel)
  if kernel == "popcount":
    return packed
  if kernel == "native":
    native.kernels()  # built (or found) now, not while a forward is being traced

  def expand(tree: dict, path: tuple) -> dict:
    if "kernel_sign" not in tree:
      return {name: expand(v, path + (name,)) if isinstance(v, dict) else v for name, v in tree.items()}
    if kernel == "native":
      return {NATIVE_PREFIX + name[len("kernel"):] if name.startswith(("kernel_sign", "kernel_nonzero")) else name: v
              for name, v in tree.items()}
    # Only the FFN's output Linear contracts over the intermediate size.
    is_ffn_out = path[-2:] == ("output", "dense") and "attention" not in path[-3:]
    k = config.intermediate_size if is_ffn_out else config.hidden_size
    tree = dict(tree)
    for plane, leaf in enumerate(_plane_leaves(tree, "kernel_sign")):
      sign_WxN = tree.pop(leaf)
      nonzero_WxN = tree.pop(plane_leaf("kernel_nonzero", plane), None)
      if nonzero_WxN is None:
        nonzero_WxN = jnp.full_like(sign_WxN, jnp.iinfo(WORD_DTYPE).max)
      tree[plane_leaf("kernel_int8", plane)] = unpack_signed(sign_WxN.T, nonzero_WxN.T, k).T.astype(jnp.int8)
    return tree

  prepared = expand(packed, ())
  if steps_apply(config, packed):
    for layer in prepared["bert"]["encoder"]["layer"].values():
      ffn_in, ffn_out = layer["intermediate"]["dense"], layer["output"]["dense"]
      codes_ExF = _ffn_codes(policy_of(config).linear, config.hidden_size, config.intermediate_size, ffn_in, ffn_out)
      steps_4xF = ffn_steps(np.asarray(codes_ExF), -config.hidden_size)
      if steps_4xF is not None:  # else this layer's GELU stays in the graph
        ffn_out[FFN_STEPS] = jnp.asarray(steps_4xF)
  return prepared


def steps_apply(config: BertConfig, packed: dict) -> bool:
  """Whether `prepare` may replace the FFN's GELU (native and int8 kernels): a Linear binarizer with
  elementwise activation signs and an input-independent scale (then the output Linear's input signs
  are a function of the input Linear's counts, channel by channel), one weight plane."""
  ffn_in = packed["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]
  return policy_of(config).linear.elementwise_activation and len(_plane_leaves(ffn_in, "kernel_sign")) == 1


def _input_scale(op, p: dict, in_features: int) -> Array:
  """The activation scale of a Linear whose op has `elementwise_activation` (it does not depend on x)."""
  return op.activation_planes(jnp.zeros((in_features,)), _extras(op, p, in_features))[0]


@functools.partial(jit, static_argnums=(0, 1, 2))
def _ffn_codes(op, hidden: int, intermediate: int, ffn_in: dict, ffn_out: dict) -> Array:
  """The FFN output Linear's input signs as `op` binarizes GELU(ffn_in's output), for every count c in
  [-hidden, hidden] of ffn_in's products and every intermediate channel, coded (s < 0) | (s != 0) << 1:
  uint32 [2 hidden + 1, intermediate]. By the forward's own expressions (_scaled_counts, GELU,
  activation_planes), so exact by construction."""
  counts_ExF = jnp.broadcast_to(jnp.arange(-hidden, hidden + 1, dtype=jnp.int32)[:, None],
                                (2 * hidden + 1, intermediate))
  y_ExF = _scaled_counts(op, ffn_in, _input_scale(op, ffn_in, hidden), [counts_ExF])
  signs_ExF = op.activation_planes(jax.nn.gelu(y_ExF, approximate=False), _extras(op, ffn_out, intermediate))[1]
  return (signs_ExF < 0).astype(jnp.uint32) | ((signs_ExF != 0).astype(jnp.uint32) << 1)


def ffn_steps(codes_ExF: np.ndarray, lowest: int) -> Optional[np.ndarray]:
  """Per-channel step functions of count -> code (codes_ExF[e] is count lowest + e's) as the native
  kernel takes them: int32 [4, F], rows 0-2 the counts where a step starts (ascending; int32 max:
  unused), row 3 step i's code in bits 2 i, 2 i + 1. None if a channel has more than four steps."""
  codes_ExF = np.asarray(codes_ExF, np.uint32)
  channel, before = np.nonzero((codes_ExF[1:] != codes_ExF[:-1]).T)  # by channel, then count
  if len(channel) and np.bincount(channel).max() > 3:
    return None
  rank = np.arange(len(channel)) - np.searchsorted(channel, channel)  # change `rank` starts step rank + 1
  steps = np.full((4, codes_ExF.shape[1]), np.iinfo(np.int32).max, np.int64)
  steps[rank, channel] = lowest + before + 1
  steps[3] = codes_ExF[0]
  np.bitwise_or.at(steps[3], channel, codes_ExF[before + 1, channel].astype(np.int64) << (2 * (rank + 1)))
  return steps.astype(np.uint32).view(np.int32)


# --- packing a student's parameters ---------------------------------------------

def plane_leaf(base: str, k: int) -> str:
  """The name of plane k's `base` leaf (kernel_sign, kernel_nonzero, kernel_scale): kernel_sign_1..."""
  return base if k == 0 else f"{base}_{k}"


def base_leaf(leaf: str) -> str:
  """`plane_leaf`'s inverse: kernel_sign_1 -> kernel_sign (other names unchanged)."""
  head, _, tail = leaf.rpartition("_")
  return head if tail.isdigit() and head else leaf


def packable(config: BertConfig) -> None:
  """Raises ValueError, naming the operator, unless the config's binarizers run on sign planes."""
  policy = policy_of(config)
  if not policy.linear.packable:
    side = "weight" if policy.linear.weight_planes is None else "input"
    raise ValueError(f"linear binarizer {policy.linear.name!r} does not pack: its inference {side} is not "
                     "scaled sign planes")
  if policy.probs.planes is None:
    raise ValueError(f"attention-probability binarizer {policy.probs.name!r} does not pack")


@functools.partial(jax.jit, static_argnums=0)
def _kernel_planes(op, kernel_KxN: Array, extras: dict) -> list:
  """The op's weight planes of a Linear kernel, stored word-major [W, N] so the matmul vectorizes along N."""
  planes = []
  for k, (scale, signs_KxN) in enumerate(op.weight_planes(kernel_KxN, extras)):
    sign_NxW, nonzero_NxW = pack_signed(signs_KxN.T)
    planes.append({plane_leaf("kernel_sign", k): sign_NxW.T, plane_leaf("kernel_nonzero", k): nonzero_NxW.T,
                   plane_leaf("kernel_scale", k): scale, "has_zero": jnp.any(signs_KxN == 0)})
  return planes


def _kernel_of(p: dict) -> str:
  """The kernel `prepare` set a packed Linear's params up for, told by their names."""
  if plane_leaf("kernel_int8", 0) in p:
    return "int8"
  return "native" if plane_leaf(NATIVE_PREFIX + "_sign", 0) in p else "popcount"


def _weight_planes(p: dict, prefix: str = "kernel") -> list:
  """[(sign [W, N], nonzero [W, N] or None)] of a packed Linear, plane by plane."""
  return [(p[leaf], p.get(plane_leaf(f"{prefix}_nonzero", k)))
          for k, leaf in enumerate(_plane_leaves(p, f"{prefix}_sign"))]


def _weight_counts(p: dict, x_signs_xK: Array) -> list:
  """[exact int32 counts sign(x) . plane] of a packed Linear, plane by plane: int8 matmuls once
  `prepare` expanded its planes, else popcounts on the packed words (XLA's or the native call)."""
  kernel = _kernel_of(p)
  if kernel == "int8":
    x_int8 = x_signs_xK.astype(jnp.int8)  # already signs: {-1, 0, 1} convert exactly
    return [precision.int8_einsum("...k,kn->...n", x_int8, p[leaf]) for leaf in _plane_leaves(p, "kernel_int8")]
  if kernel == "native":  # the call packs x itself
    return [native.kernels().linear_counts(x_signs_xK, w_sign, w_nonzero)
            for w_sign, w_nonzero in _weight_planes(p, NATIVE_PREFIX)]
  x_sign, x_nonzero = pack_signed(x_signs_xK)
  return [signed_matmul(x_sign, x_nonzero, w_sign, w_nonzero) for w_sign, w_nonzero in _weight_planes(p)]


def _plane_leaves(p: dict, base: str) -> list:
  """The names of `base`'s planes present in `p`: base, base_1, ..."""
  leaves = []
  while plane_leaf(base, len(leaves)) in p:
    leaves.append(plane_leaf(base, len(leaves)))
  return leaves


@jax.jit
def _embedding_planes(table_VxD: Array) -> dict:
  """Row-wise BWN planes of the word embedding, packed along D (a lookup gathers whole rows)."""
  centred_VxD = table_VxD - jnp.mean(table_VxD)
  sign_VxW, nonzero_VxW = pack_signed(centred_VxD)
  return {"embedding_sign": sign_VxW, "embedding_nonzero": nonzero_VxW,
          "embedding_scale": jnp.mean(jnp.abs(table_VxD), axis=-1), "has_zero": jnp.any(centred_VxD == 0)}


def _keep_needed_planes(planes: dict, zero_planes: bool) -> dict:
  """Drops the nonzero plane unless the tensor has an exact zero (then the matmul needs it)."""
  has_zero = planes.pop("has_zero")
  if not (zero_planes and bool(has_zero)):
    planes = {k: v for k, v in planes.items() if not k.endswith("_nonzero")}
  return planes


def packed_param_kinds(config: BertConfig, head: str) -> dict:
  """The declared kinds of the params a packed model of `head` keeps, under the packed tree's names."""
  tree = param_kinds(build(config, head))
  return tree if head == "classification" else {"bert": tree}


def pack_params(config: BertConfig, head: str, params: dict, zero_planes: bool = True) -> tuple:
  """(packed head, packed params) of a binary student: binarized tensors as bit-planes + scales.

  A pretraining student packs its encoder only (head "encoder"): its MLM decoder is tied to the
  *latent* FP word embedding, which a 1-bit model cannot carry. FP leaves are kept as they are.
  `zero_planes=False` never adds nonzero planes (the required tree, e.g. under jax.eval_shape).
  ValueError for a teacher or a binarizer that does not pack.
  """
  if not config.binary:
    raise ValueError("only a binary student (config.binary=True) can be packed")
  packable(config)
  if head not in PACKED_HEADS + ("pretraining",):
    raise ValueError(f"unknown head {head!r}")
  if head == "pretraining":
    head, params = "encoder", {"bert": params["bert"]}
  elif head == "encoder":
    params = {"bert": params}
  op = policy_of(config).linear

  def pack(tree: dict, kinds_tree: dict) -> dict:
    out = {}
    for name, value in tree.items():
      kind = kinds_tree[name]
      if isinstance(value, dict):
        out[name] = pack(value, kind)
      elif kind == kinds.BINARY_WEIGHT:
        extras = {n: tree[n] for n in op.init_extras(*value.shape)}
        for planes in _kernel_planes(op, value, extras):
          out.update(_keep_needed_planes(planes, zero_planes))
      elif kind == kinds.BINARY_EMBEDDING:
        out.update(_keep_needed_planes(_embedding_planes(value), zero_planes))
      else:
        out[name] = value
    return out

  return head, pack(params, packed_param_kinds(config, head))


# --- the packed forward ------------------------------------------------------------

def _layer_norm(p: dict, x: Array, config: BertConfig) -> Array:
  return nn.LayerNorm(epsilon=config.layer_norm_eps).apply({"params": p}, x)


def _fp_einsum(config: BertConfig, spec: str, a: Array, b: Array) -> Array:
  """A product of FP operands (estimators, classifier) as the simulated model computes it: under
  precision "mixed", bf16 operands with fp32 accumulation (rounding that flips predictions if skipped)."""
  return precision.fp_einsum(spec, a, b, config.precision, config.matmul_precision)


def _fp_dense(p: dict, x: Array, config: BertConfig) -> Array:
  return _fp_einsum(config, precision.LINEAR_SPEC, x, p["kernel"]) + p["bias"]


def _unfused(fn, x: Array, always_true: Array) -> Array:
  """fn(x) as its own XLA computation, so XLA cannot fuse across its inputs and outputs.

  Left alone, XLA fuses a popcount matmul, or the GELU before one, into the bit packing that
  consumes it and recomputes it there in a strided, unvectorized loop (up to 40x slower). On CPU an
  optimization_barrier is dropped and a loop's invariant body is hoisted out, but the branch of a
  conditional on a runtime value stays a separate computation. `always_true` must be true at run
  time (XLA cannot know it); the other branch, never taken, gives zeros.
  """
  out = jax.eval_shape(fn, x)
  return jax.lax.cond(always_true, fn, lambda _: jax.tree.map(lambda o: jnp.zeros(o.shape, o.dtype), out), x)


def _step_signs(counts_xF: Array, steps_4xF: Array) -> Array:
  """The int8 signs {-1, 0, 1} that `ffn_steps`' step functions give the counts."""
  step_xF = sum((counts_xF >= steps_4xF[i]).astype(jnp.int32) for i in range(3))
  code_xF = (steps_4xF[3] >> (2 * step_xF)) & 3  # codes use bits 0-7: the shift never meets the sign bit
  return jnp.where(code_xF & 2, jnp.where(code_xF & 1, -1, 1), 0).astype(jnp.int8)


def _extras(op, p: dict, in_features: int) -> dict:
  return {name: p[name] for name in op.init_extras(in_features, p["bias"].shape[-1])}


def _binary_dense(op, p: dict, x_xK: Array) -> Array:
  """The LinearOp `op` on packed planes: sum over weight planes of (a_scale w_scale) counts (+ bias)."""
  extras = _extras(op, p, x_xK.shape[-1])
  counts = lambda x: _weight_counts(p, op.activation_planes(x, extras)[1])
  if _kernel_of(p) != "popcount":  # int8 products and custom calls are not fused into their neighbours
    counts_xN = counts(x_xK)
  else:  # only the integer counts: the scaling after them is the int8 kernel's, rounded alike
    counts_xN = _unfused(counts, x_xK, always_true=~jnp.isnan(x_xK.reshape(-1)[0]))  # true, but not to XLA
  x_scale = op.activation_planes(x_xK, extras)[0]  # the signs half of this call is unused, so dropped
  return _scaled_counts(op, p, x_scale, counts_xN)


def _scaled_counts(op, p: dict, x_scale: Array, counts_xN: list) -> Array:
  """A packed Linear's output from its planes' integer counts: sum of (x_scale w_scale) counts (+ bias)."""
  terms = [plane_counts_xN.astype(jnp.float32) * (x_scale * p[leaf])
           for leaf, plane_counts_xN in zip(_plane_leaves(p, "kernel_scale"), counts_xN)]
  y_xN = sum(terms[1:], terms[0])
  return y_xN + p["bias"] if op.uses_bias else y_xN


def _word_embeddings(p: dict, input_ids_BxL: Array, hidden_size: int) -> Array:
  sign_BxLxW = jnp.take(p["embedding_sign"], input_ids_BxL, axis=0)
  if "embedding_nonzero" in p:
    nonzero_BxLxW = jnp.take(p["embedding_nonzero"], input_ids_BxL, axis=0)
  else:
    nonzero_BxLxW = jnp.full_like(sign_BxLxW, jnp.iinfo(WORD_DTYPE).max)
  signs_BxLxD = unpack_signed(sign_BxLxW, nonzero_BxLxW, hidden_size)
  return jnp.take(p["embedding_scale"], input_ids_BxL, axis=0)[..., None] * signs_BxLxD


def _self_attention(p: dict, x_BxLxD: Array, mask_bias_Bx1x1xL: Array, config: BertConfig) -> Array:
  B, L, _ = x_BxLxD.shape
  H, K = config.num_heads, config.head_size

  kernel = _kernel_of(p["query"])

  def heads(name):
    """name(x) per head, [B, L, H, K] (its binarizer keeps only the signs), and its alpha."""
    y_BxLxD = _binary_dense(policy_of(config).linear, p[name], x_BxLxD)
    return y_BxLxD.reshape(B, L, H, K), binarize.clamped(p[f"{name}_alpha"])

  (q_BxLxHxK, q_alpha), (k_BxLxHxK, k_alpha) = heads("query"), heads("key")
  v_BxLxHxK, v_alpha = heads("value")
  counts_BxHxLxL = _query_key_counts(q_BxLxHxK, k_BxLxHxK, kernel)
  scores_BxHxLxL = counts_BxHxLxL * (q_alpha * k_alpha)
  estimate = config.estimator_rank > 0
  if estimate:
    q_p, k_p, q_m, k_m = (_fp_dense(p[n], x_BxLxD, config) for n in ("q_p", "k_p", "q_m", "k_m"))
    einsum = functools.partial(_fp_einsum, config, "bqr,bsr->bqs")
    scores_BxHxLxL = scores_BxHxLxL + (einsum(q_m, k_p) + einsum(q_p, k_m) + einsum(q_p, k_p))[:, None]
  scores_BxHxLxL = scores_BxHxLxL / jnp.sqrt(jnp.float32(K)) + mask_bias_Bx1x1xL
  probs_BxHxLxL = jax.nn.softmax(scores_BxHxLxL, axis=-1)
  prob_op = policy_of(config).probs
  p_scale, mask_BxHxLxL = prob_op.planes(probs_BxHxLxL, {n: p[f"probs_{n}"] for n in prob_op.init_extras()})
  keep_BxHxLxL = mask_BxHxLxL > 0
  context_BxLxHxK = _probs_value_counts(keep_BxHxLxL, v_BxLxHxK, kernel) * (p_scale * v_alpha)
  if estimate:
    v_p_BxLxR = _fp_dense(p["v_p"], x_BxLxD, config)
    if config.precision == "mixed":  # the simulated product's bf16 operands; each term stays exact in fp32
      v_p_BxLxR, p_scale = (t.astype(jnp.bfloat16).astype(jnp.float32) for t in (v_p_BxLxR, p_scale))
    # Sums of v_p over the kept positions, one rank at a time: a reduction XLA fuses into the
    # booleans' pass (as an einsum it was a product of [B, H, L, L] copied transposed first).
    keep_BxHxLxL = keep_BxHxLxL.astype(jnp.float32)
    residual_BxHxLxR = jnp.stack([jnp.sum(keep_BxHxLxL * v_p_BxLxR[:, None, None, :, r], -1)
                                  for r in range(config.estimator_rank)], -1) * p_scale
    residual_BxLxHxR = _heads_first(residual_BxHxLxR)
    context_BxLxHxK = context_BxLxHxK + jnp.tile(residual_BxLxHxR, (1, 1, 1, K // config.estimator_rank))
  return context_BxLxHxK.reshape(B, L, H * K)


def _layer(p: dict, x_BxLxD: Array, mask_bias_Bx1x1xL: Array, config: BertConfig) -> Array:
  attention, op = p["attention"], policy_of(config).linear
  context_BxLxD = _self_attention(attention["self"], x_BxLxD, mask_bias_Bx1x1xL, config)
  out = attention["output"]
  attended_BxLxD = _layer_norm(out["LayerNorm"], _binary_dense(op, out["dense"], context_BxLxD) + x_BxLxD,
                               config)
  ffn_in, ffn_out = p["intermediate"]["dense"], p["output"]["dense"]
  if FFN_STEPS in ffn_out:  # GELU and ffn_out's signs as step functions of ffn_in's counts (see prepare)
    extras = _extras(op, ffn_in, config.hidden_size)
    counts_BxLxF = _weight_counts(ffn_in, op.activation_planes(attended_BxLxD, extras)[1])[0]
    if _kernel_of(ffn_out) == "native":  # the call reads the counts through the steps itself
      counts_BxLxD = [native.kernels().steps_linear_counts(counts_BxLxF, ffn_out[FFN_STEPS], w_sign, w_nonzero)
                      for w_sign, w_nonzero in _weight_planes(ffn_out, NATIVE_PREFIX)]
    else:
      counts_BxLxD = _weight_counts(ffn_out, _step_signs(counts_BxLxF, ffn_out[FFN_STEPS]))
    dense_BxLxD = _scaled_counts(op, ffn_out, _input_scale(op, ffn_out, config.intermediate_size), counts_BxLxD)
  else:
    h_BxLxF = jax.nn.gelu(_binary_dense(op, ffn_in, attended_BxLxD), approximate=False)
    dense_BxLxD = _binary_dense(op, ffn_out, h_BxLxF)
  return _layer_norm(p["output"]["LayerNorm"], dense_BxLxD + attended_BxLxD, config)


def forward(config: BertConfig, head: str, packed: dict, input_ids_BxL: Array,
            token_type_ids_BxL: Optional[Array] = None, attention_mask_BxL: Optional[Array] = None) -> dict:
  """The student's inference forward on packed params; outputs as model.py's (no attentions).

  Returns `hidden_states` (embedding output first), `pooled`, and `logits` for a classifier.
  """
  if token_type_ids_BxL is None:
    token_type_ids_BxL = jnp.zeros_like(input_ids_BxL)
  if attention_mask_BxL is None:
    attention_mask_BxL = jnp.ones_like(input_ids_BxL)
  bert = packed["bert"]
  mask_bias_Bx1x1xL = ((1.0 - attention_mask_BxL.astype(jnp.float32))
                       * jnp.finfo(jnp.float32).min)[:, None, None, :]
  emb = bert["embeddings"]
  length = input_ids_BxL.shape[1]
  words_BxLxD = _word_embeddings(emb["word_embeddings"], input_ids_BxL, config.hidden_size)
  positions_LxD = emb["position_embeddings"]["embedding"][:length]
  types_BxLxD = jnp.take(emb["token_type_embeddings"]["embedding"], token_type_ids_BxL, axis=0)
  x_BxLxD = _layer_norm(emb["LayerNorm"], words_BxLxD + positions_LxD[None] + types_BxLxD, config)
  hidden_states = [x_BxLxD]
  for i in range(config.num_layers):
    x_BxLxD = _layer(bert["encoder"]["layer"][str(i)], x_BxLxD, mask_bias_Bx1x1xL, config)
    hidden_states.append(x_BxLxD)
  pooler = bert["pooler"]
  h_pool_BxD = pool_tokens(x_BxLxD, attention_mask_BxL, config.pooling)
  dense_BxD = _binary_dense(policy_of(config).linear, pooler["dense"], h_pool_BxD)
  pooled_BxD = jnp.tanh(_layer_norm(pooler["LayerNorm"], dense_BxD, config) + h_pool_BxD)
  out = {"hidden_states": hidden_states, "pooled": pooled_BxD}
  if head == "classification":
    out["logits"] = _fp_dense(packed["classifier"], pooled_BxD, config)
  return out


def cast_floats(packed: dict, dtype) -> dict:
  """`packed` with every floating leaf cast to `dtype` (bit-planes untouched)."""
  return jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v, packed)


def param_count(params: dict) -> int:
  """Number of scalars in a parameter tree."""
  return int(sum(np.prod(np.shape(v)) for v in jax.tree.leaves(params)))


def flatten(packed: dict) -> dict:
  """'/'-joined names -> leaves (the safetensors keys)."""
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(packed).items()}


def unflatten(flat: dict) -> dict:
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
