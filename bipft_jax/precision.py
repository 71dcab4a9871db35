"""Numeric policies: which units compute the exact sign products, and the FP matmuls' precision.

Sign products (`BertConfig.binary_matmul_dtype`): both operands are {-1, 0, 1} (or {0, 1}), so
float32, bfloat16 with fp32 accumulation and int8 with int32 accumulation all give the same
integers, exactly; only the speed differs, and it differs by machine (an AMX Xeon runs int8
fastest, an AVX-512 EPYC float32 or bfloat16). `auto` picks one: on TPU and GPU the first of
ACCELERATOR_ORDER the backend compiles (their matrix units take int8 and bf16 natively); on CPU
the fastest in a one-time micro-benchmark, cached per machine (CPU model, flags, jax and jaxlib
versions, XLA_FLAGS) in `assets.cache_dir()/matmul_choices.json`. Every candidate must equal the
float32 reference bit for bit before it may win; one that fails to compile or differs is skipped.
In a multi-host job every process takes process 0's choice (agreed in `distributed.initialize`).
The packed encoder chooses its kernel (popcount, native or int8) with the same `choose`.

Training precision (`BertConfig.precision`): `fp32` computes everything in float32 (the FP
matmuls at `matmul_precision`, "highest" by default: the parity tests' mode); `mixed` gives the FP
matmuls (the teacher's, the student's estimators and heads, and the backward products of the
sign products, whose cotangent is FP) bfloat16 operands with fp32 accumulation, forward and
backward, while parameters, activations, LayerNorm/softmax, gradients and the optimizer state
stay float32. The forward sign products are exact either way.
"""
import functools
import hashlib
import json
import math
import os
import platform
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from bipft_jax import files

SIGN_DTYPES = ("float32", "bfloat16", "int8")
BINARY_MATMUL_DTYPES = SIGN_DTYPES + ("auto",)
PRECISIONS = ("fp32", "mixed")
# Tried in this order on accelerators; the first that compiles and is exact wins.
ACCELERATOR_ORDER = ("int8", "bfloat16", "float32")
CACHE_FILE = "matmul_choices.json"


# --- the exact sign product ------------------------------------------------------------------

def sign_einsum(spec: str, x_s, y_s, dtype: str):
  """einsum of two {-1, 0, 1} operands (exactly: e.g. jnp.sign of a binarized tensor) as float32,
  computed in `dtype` (one of SIGN_DTYPES)."""
  x_s, y_s = (t.astype(dtype) for t in (x_s, y_s))
  if dtype == "int8":
    return int8_einsum(spec, x_s, y_s).astype(jnp.float32)
  return jnp.einsum(spec, x_s, y_s, preferred_element_type=jnp.float32)


def int8_einsum(spec: str, a_int8, b_int8):
  """Exact int32 einsum of int8 operands."""
  # The barrier keeps the sign/convert producing an operand out of the dot: fused into it, XLA CPU
  # leaves its int8 matmul routine for a slower loop (1024 x 768 x 3072: 3 ms -> 4.5-7.7 ms).
  a_int8, b_int8 = jax.lax.optimization_barrier((a_int8, b_int8))
  return jnp.einsum(spec, a_int8, b_int8, preferred_element_type=jnp.int32)


def sign_product_dtype(requested: str) -> str:
  """`requested` itself, or for "auto" this machine's fastest exact one (see the module docstring)."""
  if requested != "auto":
    return requested
  return _auto_sign_dtype(jax.default_backend())


@functools.lru_cache(maxsize=None)
def _auto_sign_dtype(backend: str) -> str:
  with jax.ensure_compile_time_eval():  # called while tracing a model: run the probes for real
    if backend == "cpu":
      return choose("sign_matmul", {dtype: _sign_probe(dtype) for dtype in SIGN_DTYPES})
    for dtype in ACCELERATOR_ORDER:
      if supported(_sign_probe(dtype, shape=(8, 33, 8))):
        return dtype
    return "float32"


def _sign_probe(dtype: str, shape: tuple = (512, 768, 768)) -> Callable:
  """A jitted sign product of `shape` (M, K, N) in `dtype`: zero-argument, returns its result."""
  m, k, n = shape
  rng = np.random.default_rng(0)
  x = rng.integers(-1, 2, (m, k)).astype(np.float32)
  y = rng.integers(-1, 2, (k, n)).astype(np.float32)
  product = jax.jit(functools.partial(sign_einsum, "mk,kn->mn", dtype=dtype))
  return lambda: product(x, y)


# --- choosing by measurement ---------------------------------------------------------------

def supported(probe: Callable) -> bool:
  """Whether `probe()` compiles and runs on this backend."""
  try:
    jax.block_until_ready(probe())
    return True
  except Exception:  # an unsupported dtype fails in lowering or compilation, differently per backend
    return False


def cpu_description() -> tuple:
  """(CPU model name, sorted feature flags) of this machine, from /proc/cpuinfo where there is one."""
  info = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        name, _, value = line.partition(":")
        info.setdefault(name.strip(), value.strip())
  except OSError:
    pass
  model = info.get("model name") or platform.processor() or platform.machine()
  flags = info.get("flags") or info.get("Features", "")
  return model, " ".join(sorted(flags.split()))


def host_key() -> str:
  """What makes a measured choice valid: backend, device, CPU model and flags, versions, XLA_FLAGS."""
  model, flags = cpu_description()
  parts = [jax.default_backend(), jax.devices()[0].device_kind, model, flags, jax.__version__,
           jaxlib.__version__, os.environ.get("XLA_FLAGS", "")]
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:20]


def _cache_path():
  from bipft_jax import assets
  return assets.cache_dir() / CACHE_FILE


def _read_cache() -> dict:
  """The cached choices; an unreadable or malformed file counts as empty (it is measured again)."""
  try:
    data = json.loads(_cache_path().read_text())
  except (OSError, ValueError):
    return {}
  return data if isinstance(data, dict) else {}


def _write_cache(key: str, kind: str, record: dict) -> None:
  """Adds one record (written atomically)."""
  data = _read_cache()
  entry = data.get(key) if isinstance(data.get(key), dict) else {}
  data[key] = {**entry, kind: record}
  try:
    files.write_json(str(_cache_path()), data)
  except OSError:  # a read-only cache only costs a new measurement next time
    pass


def measure(candidates: dict, repeats: int = 5) -> dict:
  """name -> fastest seconds of each candidate that runs and equals the first one's result exactly.

  The candidates take turns, one run each per repeat, so that a spell of load from elsewhere
  slows them alike instead of deciding the choice.
  """
  reference, exact = None, {}
  for name, probe in candidates.items():
    try:
      result = np.asarray(jax.block_until_ready(probe()))  # compiles
    except Exception:  # unsupported here: not a candidate
      continue
    if reference is None:
      reference = result
    elif result.shape != reference.shape or not np.array_equal(result, reference):
      continue  # not exact: never chosen
    exact[name] = probe
  seconds = {name: float("inf") for name in exact}
  for _ in range(repeats):
    for name, probe in exact.items():
      start = time.perf_counter()
      jax.block_until_ready(probe())
      seconds[name] = min(seconds[name], time.perf_counter() - start)
  return seconds


def choose(kind: str, candidates: dict, repeats: int = 5) -> str:
  """The fastest exact candidate (name -> zero-argument probe) for `kind` on this machine.

  Measured once and cached per machine; a choice made among other candidates (a new kernel, one
  dropped), or a cache that cannot be read, is measured again. Falls back to the first candidate
  if none runs. In a multi-host job every process takes process 0's choice.
  """
  return _agreed(_choose_here(kind, candidates, repeats), sorted(candidates))


def _choose_here(kind: str, candidates: dict, repeats: int) -> str:
  """This process's choice: its machine's cache, else its own measurement (then cached)."""
  key = host_key()
  cached = _read_cache().get(key)
  record = cached.get(kind) if isinstance(cached, dict) else None
  if isinstance(record, dict) and record.get("candidates") == sorted(candidates):
    return record["choice"]
  seconds = measure(candidates, repeats)
  choice = min(seconds, key=seconds.get) if seconds else next(iter(candidates))
  _write_cache(key, kind, {"choice": choice, "seconds": seconds, "candidates": sorted(candidates)})
  return choice


def _agreed(choice: str, names: list) -> str:
  """Process 0's choice, on every process of a multi-host job.

  Each host measures (and caches) on its own, and a close race can go either way; processes that
  compiled different products ran different programs as one job: a 2-process finetuning whose
  hosts took bfloat16 and int8 logged losses 1.5% off one device's, without an error.
  """
  if jax.process_count() == 1:
    return choice
  from jax.experimental import multihost_utils
  try:
    index = multihost_utils.broadcast_one_to_all(np.int32(names.index(choice)))
  except ValueError as e:  # a collective cannot run inside a trace (jax raises ValueError there)
    raise RuntimeError("a multi-host job must agree on `auto`'s choices before tracing a model: start it with "
                       "bipft_jax.distributed.initialize(), not jax.distributed.initialize() alone") from e
  return names[int(index)]


# --- mixed-precision FP matmuls --------------------------------------------------------------

def _bf16(x):
  return x.astype(jnp.bfloat16)


def _bf16_einsum(spec: str, a, b):
  """einsum of bf16-rounded operands, summed in fp32.

  On CPU a product with batch indices (in both operands and the output: attention's) or a weight
  gradient (2-D operands contracting their first axis) is `_bf16_matmul_layout_product`: layouts
  XLA:CPU's bf16 dots do not take as they come.
  """
  inputs, out = spec.split("->")
  a_spec, b_spec = inputs.split(",")
  batched = set(a_spec) & set(b_spec) & set(out) - {"."}
  first_axes_contracted = (len(a_spec) == len(b_spec) == 2 and a_spec[0] == b_spec[0]
                           and sorted(out) == sorted(a_spec[1] + b_spec[1]))
  if jax.default_backend() == "cpu" and (batched or first_axes_contracted):
    return _bf16_matmul_layout_product(a_spec, b_spec, out, a, b)
  return jnp.einsum(spec, _bf16(a), _bf16(b), preferred_element_type=jnp.float32)


def _bf16_matmul_layout_product(a_spec: str, b_spec: str, out: str, a, b):
  """einsum(a_spec,b_spec->out) of bf16-rounded operands (no ellipsis), summed in fp32, on CPU.

  Each operand is copied into the batched-matmul layout [batch, rows, contracted] and [batch,
  contracted, columns]; the barrier keeps XLA from folding the copies back into the dot. Folded, a
  dot contracting the first axis of its left operand (the mixed backward's weight gradients, half
  its FLOPs) runs as an fp32 dot, 2-4x slower than in bf16 at BERT-base shapes, and some of
  attention's batched layouts go to a loop that rejects bf16 (UNIMPLEMENTED: DotThunk). A result
  the dot would write transposed is not a layout those dots take either: the operands swap roles.
  """
  batch = [i for i in a_spec if i in b_spec and i in out]
  contracted = [i for i in a_spec if i in b_spec and i not in out]
  rows, cols = [i for i in a_spec if i not in b_spec], [i for i in b_spec if i not in a_spec]
  if rows and cols and [i for i in out if i not in batch] == cols + rows:
    return _bf16_matmul_layout_product(b_spec, a_spec, out, b, a)
  size = dict(zip(a_spec, a.shape)) | dict(zip(b_spec, b.shape))
  count = lambda indices: math.prod(size[i] for i in indices)

  def laid_out(t, spec, order, shape):
    return _bf16(t).transpose([spec.index(i) for i in order]).reshape(shape)

  a_BxMxK = laid_out(a, a_spec, batch + rows + contracted, (count(batch), count(rows), count(contracted)))
  b_BxKxN = laid_out(b, b_spec, batch + contracted + cols, (count(batch), count(contracted), count(cols)))
  a_BxMxK, b_BxKxN = jax.lax.optimization_barrier((a_BxMxK, b_BxKxN))
  c_BxMxN = jnp.einsum("bmk,bkn->bmn", a_BxMxK, b_BxKxN, preferred_element_type=jnp.float32)
  order = batch + rows + cols
  c = c_BxMxN.reshape([size[i] for i in order])
  return c.transpose([order.index(i) for i in out])


LINEAR_SPEC = "...i,io->...o"


def product_transposes(spec: str, a, b, g, einsum: Callable) -> tuple:
  """(d a, d b) of einsum(spec, a, b) at cotangent g, each product computed by `einsum(spec, x, y)`.

  Every index of an operand must appear in the other operand or the output. A Linear's product
  (LINEAR_SPEC) is taken on 2-D operands, the tokens flattened: its weight gradient then contracts
  one axis, and XLA:CPU no longer writes the cotangent transposed for it (a binary FFN block's
  backward at BERT-base shapes took 1.7-2x less time, bit-identical).
  """
  if spec == LINEAR_SPEC:
    a_MxI, g_MxO = a.reshape(-1, a.shape[-1]), g.reshape(-1, g.shape[-1])
    return einsum("mo,io->mi", g_MxO, b).reshape(a.shape), einsum("mi,mo->io", a_MxI, g_MxO)
  inputs, out = spec.split("->")
  a_spec, b_spec = inputs.split(",")
  return einsum(f"{out},{b_spec}->{a_spec}", g, b), einsum(f"{a_spec},{out}->{b_spec}", a, g)


def einsum_transposes(spec: str, a, b, g) -> tuple:
  """(d a, d b) of einsum(spec, a, b) at cotangent g: bf16 operands, fp32 accumulation and result."""
  return product_transposes(spec, a, b, g, _bf16_einsum)


def fp32_transposes(spec: str, a, b, g) -> tuple:
  """(d a, d b) of einsum(spec, a, b) at cotangent g in fp32 ("highest")."""
  return product_transposes(spec, a, b, g, lambda s, x, y: jnp.einsum(s, x, y, precision="highest"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def mixed_einsum(spec: str, a, b):
  """einsum with bfloat16 operands and fp32 accumulation and result; its gradients likewise (the
  cotangent rounded to bf16 before the backward products, as autocast does)."""
  return _bf16_einsum(spec, a, b)


def _mixed_einsum_fwd(spec, a, b):
  return mixed_einsum(spec, a, b), (a, b)


def _mixed_einsum_bwd(spec, residuals, g):
  return einsum_transposes(spec, *residuals, g)


mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


def fp_einsum(spec: str, a, b, precision: str, matmul_precision: Optional[str]):
  """einsum of full-precision operands under the training precision policy (see the docstring)."""
  if precision == "mixed":
    return mixed_einsum(spec, a, b)
  return jnp.einsum(spec, a, b, precision=matmul_precision)
