"""The packed encoder's binarized products as C++ XLA custom calls (popcount), built here on first use.

XLA:CPU runs packed.signed_matmul's loops one output element at a time, reloading the weight's
words for every row. popcount_matmul.cc keeps a block of outputs in registers over the whole
contracted axis instead (AVX-512 VPOPCNTDQ where the host has it, else plain loops for the
compiler to vectorize), packs the float activations itself, and splits the work over XLA's
intra-op threads. Same integer counts, exactly. Attention's two products get calls of their own,
one (batch, head) per work item: per head they are small (K = 64 is one 64-bit word), so their
operands are packed in natural bit order into 64-bit words, read row by row for every head at
once (head by head, the strided reads missed the caches), and the counts come back as float32
in the layout the graph continues with. The FFN's output Linear can also take its input as the
previous Linear's integer counts and per-channel step functions of them (GELU and its binarizer,
tabulated by packed.prepare). `packed.prepare(..., "native")` selects the calls, and
"auto" measures them against the other kernels like any of them.

Built with the host's C++ compiler (`$CXX`, else c++, g++ or clang++; -O3 -march=native against
jaxlib's FFI headers) into `assets.cache_dir()/native/`, once per source, compiler, CPU and jax
version: a few seconds. Without a compiler, or off CPU, `kernels()` raises Unavailable (a
UserError) saying why; `auto` then skips the kernel.
"""
import ctypes
import functools
import hashlib
import json
import math
import os
import pathlib
import shutil
import subprocess
from typing import Optional

import jax
import jax.numpy as jnp
import jaxlib

from bipft_jax import files, precision
from bipft_jax.errors import UserError

Array = jax.Array
SOURCE = pathlib.Path(__file__).with_name("popcount_matmul.cc")
COMPILERS = ("c++", "g++", "clang++")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
# The handlers the library exports: a Linear whose weight has no exact zero (sign planes only) or has
# some, from float signs or from step functions of the previous Linear's counts; attention's two
# products per head.
HANDLERS = {"linear": "BipftPopcountLinear", "linear_masked": "BipftPopcountLinearMasked",
            "linear_steps": "BipftPopcountLinearSteps", "linear_steps_masked": "BipftPopcountLinearStepsMasked",
            "query_key": "BipftPopcountQueryKey", "probs_value": "BipftPopcountProbsValue"}


class Unavailable(UserError):
  """The native kernel cannot be built or run here (the message says why)."""


def _compiler() -> str:
  for candidate in ([os.environ["CXX"]] if os.environ.get("CXX") else []) + list(COMPILERS):
    path = shutil.which(candidate)
    if path:
      return path
  raise Unavailable("the native packed kernel needs a C++ compiler (c++, g++ or clang++; or set CXX): none found")


def _build(portable: bool) -> pathlib.Path:
  """The compiled library for this machine (built now unless cached); Unavailable if it cannot be."""
  from bipft_jax import assets
  compiler = _compiler()
  flags = list(FLAGS) + (["-DBIPFT_PORTABLE"] if portable else [])
  try:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise Unavailable(f"the C++ compiler {compiler} does not run ({e})") from None
  key = hashlib.sha256(json.dumps([SOURCE.read_text(), compiler, version, flags, precision.cpu_description(),
                                   jax.__version__, jaxlib.__version__]).encode()).hexdigest()[:20]
  path = assets.cache_dir() / "native" / f"popcount_matmul-{key}.so"
  if path.exists():
    return path
  with files.atomic_path(str(path)) as tmp:  # other processes building it at once each rename a whole file
    command = [compiler, *flags, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
      first_error = next((line for line in done.stderr.splitlines() if "error" in line), done.stderr[-300:])
      raise Unavailable(f"building the native packed kernel failed: {first_error.strip()}")
  return path


class Kernels:
  """The custom calls of one build of popcount_matmul.cc, registered with XLA under names of their own."""

  def __init__(self, path: pathlib.Path):
    self.library = ctypes.CDLL(str(path))
    self.vectorized = bool(self.library.bipft_vectorized())  # the AVX-512 blocks, not plain loops
    self._targets = {}
    for product, symbol in HANDLERS.items():
      self._targets[product] = f"bipft_popcount_{product}_{path.stem.rsplit('-', 1)[-1]}"
      jax.ffi.register_ffi_target(self._targets[product], jax.ffi.pycapsule(getattr(self.library, symbol)),
                                  platform="cpu")

  def _call(self, product: str, out_shape: tuple, *operands: Array, dtype=jnp.int32) -> Array:
    return jax.ffi.ffi_call(self._targets[product], jax.ShapeDtypeStruct(out_shape, dtype))(*operands)

  def linear_counts(self, x_signs_xK: Array, w_sign_WxN: Array, w_nonzero_WxN: Optional[Array] = None) -> Array:
    """Exact int32 [..., N] counts sign(x) . w of a Linear from x's float32 signs (packed in the
    call as packed.pack_signed would) and the weight's planes [W, N] (packed.signed_matmul's)."""
    lead, k = x_signs_xK.shape[:-1], x_signs_xK.shape[-1]
    x_MxK = x_signs_xK.astype(jnp.float32).reshape(math.prod(lead), k)
    out_shape = (x_MxK.shape[0], w_sign_WxN.shape[-1])
    if w_nonzero_WxN is None:
      out = self._call("linear", out_shape, x_MxK, w_sign_WxN)
    else:
      out = self._call("linear_masked", out_shape, x_MxK, w_sign_WxN, w_nonzero_WxN)
    return out.reshape(*lead, -1)

  def steps_linear_counts(self, counts_xK: Array, steps_4xK: Array, w_sign_WxN: Array,
                          w_nonzero_WxN: Optional[Array] = None) -> Array:
    """Exact int32 [..., N] counts s . w of a Linear whose input signs s are step functions of the
    previous Linear's int32 counts c, channel by channel: with steps[0..2, k] the counts where a step
    starts (ascending; int32 max: unused), s_k(c) is step i = #(steps[:3, k] <= c), whose sign bit
    (s < 0) is bit 2 i of steps[3, k] and nonzero bit (s != 0) bit 2 i + 1."""
    lead, k = counts_xK.shape[:-1], counts_xK.shape[-1]
    counts_MxK = counts_xK.astype(jnp.int32).reshape(math.prod(lead), k)
    out_shape = (counts_MxK.shape[0], w_sign_WxN.shape[-1])
    if w_nonzero_WxN is None:
      out = self._call("linear_steps", out_shape, counts_MxK, steps_4xK, w_sign_WxN)
    else:
      out = self._call("linear_steps_masked", out_shape, counts_MxK, steps_4xK, w_sign_WxN, w_nonzero_WxN)
    return out.reshape(*lead, -1)

  def query_key_counts(self, q_BxLxHxK: Array, k_BxSxHxK: Array) -> Array:
    """Exact sum_k sign(q)_bihk sign(k)_bjhk per head, as float32 [B, H, L, S]."""
    (B, L, H, _), S = q_BxLxHxK.shape, k_BxSxHxK.shape[1]
    return self._call("query_key", (B, H, L, S), q_BxLxHxK.astype(jnp.float32), k_BxSxHxK.astype(jnp.float32),
                      dtype=jnp.float32)

  def probs_value_counts(self, keep_BxHxLxS: Array, v_BxSxHxK: Array) -> Array:
    """Exact sum_j keep_bhij sign(v)_bjhk for booleans keep, as float32 [B, L, H, K]."""
    B, H, L, _ = keep_BxHxLxS.shape
    return self._call("probs_value", (B, L, H, v_BxSxHxK.shape[-1]), keep_BxHxLxS.astype(bool),
                      v_BxSxHxK.astype(jnp.float32), dtype=jnp.float32)


def kernels(portable: bool = False) -> Kernels:
  """This machine's build (`portable`: the plain-loop blocks even where AVX-512 is there; for tests)."""
  return _kernels(bool(portable))  # one key per build: XLA takes each target name once per process


@functools.lru_cache(maxsize=None)
def _kernels(portable: bool) -> Kernels:
  if jax.default_backend() != "cpu":
    raise Unavailable(f"the native packed kernel runs on CPU only, not {jax.default_backend()}")
  return Kernels(_build(portable))
