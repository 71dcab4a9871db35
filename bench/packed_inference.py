"""Packed 1-bit BERT-base encoder vs the CPU inference peers a user would pick, side by side in one run.

  PYTHONPATH=. python bench/packed_inference.py [--batches 8,1 --length 128 --repeats 5]
  PYTHONPATH=. python bench/packed_inference.py --quick   # fewer repeats, no fp32_xla: about 3 minutes

Contenders (BERT-base encoder forward, random weights, no padding), at each batch size:
  packed_popcount  bipft_jax.packed.forward from an exported 1-bit file: XOR/AND + popcount on words
                   in XLA's loops
  packed_native    the same products in bipft_jax.native's C++ custom calls, built for this host
                   (skipped with a note where it cannot be built); the FFN's GELU as step
                   functions of its integer counts (packed.prepare)
  packed_int8      the same file, its bit-planes expanded at load to int8 {-1, 0, 1}: int8 matmuls
                   with int32 accumulation for the Linears and the attention products, the FFN's
                   GELU as native's (packed.prepare); the same outputs bit for bit
  fp32_xla         the same student simulated in FP32 by model.py (not with --quick)
  torch_fp32       transformers' BertModel, PyTorch FP32
  torch_int8       the same after torch.ao.quantization.quantize_dynamic on its Linear layers (qint8)
  ort_fp32         ONNX Runtime on the BertModel's ONNX export (torch.onnx.export, TorchScript path)
  ort_int8         the same after onnxruntime.quantization.quantize_dynamic (QInt8 weights)
The ONNX Runtime pair needs the `bench` extra (`pip install -e '.[bench]'`: onnxruntime, onnx);
without it they are skipped with a note. `packed` in the ratios is the kernel `packed.prepare`'s
"auto" picks on this machine (measured once, cached; what load_packed prepares by default).

Kernel roofline: the exact int8 matmul (int8 operands, int32 accumulation), the popcount matmul
(XLA's loops) and the native one (from float signs, its packing included) alone on the FFN shapes,
in a process of their own in every round like the contenders (the fastest kept: the rates varied
by 1.4x between runs on the AMD host); the encoder's binary MACs at the fastest one's rate is
`roofline_s`.

Each contender runs in a process of its own, one after the other (in one process, the thread
pools of JAX, PyTorch and ONNX Runtime slow each other down: PyTorch at batch 1 took 20x longer).
The process imports its framework, records its RSS, loads the model as a user would (the packed
ones from the 1-bit file, the ONNX ones from theirs; torch_int8 builds the FP32 model and
quantizes it), then per batch size, ascending, warms up and times `--repeats` forwards. Peak
memory is the peak RSS after a batch size minus the RSS after the imports (VmHWM and VmRSS of
/proc/self/status; getrusage's ru_maxrss would carry the parent's peak over the exec). The
processes reuse the main run's XLA compilation cache. `--rounds` repeats the whole tour and keeps
each contender's fastest time: other processes share the CPU, and the fastest is the least
disturbed. The first line names the CPU and its flags; the last line is `RESULT {json}`.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bipft_jax import model as model_lib  # noqa: E402
from bipft_jax import model_params  # noqa: E402
from bipft_jax import native, packed, packed_file, precision  # noqa: E402

CONFIG = model_lib.BertConfig(binary=True)
PACKED = ("packed_popcount", "packed_int8", "packed_native")
TORCH = ("torch_fp32", "torch_int8")
ORT = ("ort_fp32", "ort_int8")
ROOFLINE = "roofline"  # the exact kernels timed alone, in a process of their own like the contenders


def _inputs(batch: int, length: int) -> dict:
  ids = np.random.default_rng(0).integers(1, CONFIG.vocab_size, (batch, length)).astype(np.int64)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def _student_params() -> dict:
  """A base-size student at its init, alphas calibrated on a fixed small batch."""
  module = model_lib.build(CONFIG, "encoder")
  batch = {k: jnp.asarray(v, jnp.int32) for k, v in _inputs(2, 16).items()}
  params = jax.jit(lambda key: model_params.init_params(module, key))(jax.random.key(0))
  return jax.jit(lambda p, b: model_params.calibrate_alphas(module, p, b))(params, batch)


def _torch_model():
  import torch
  import transformers
  hf_config = transformers.BertConfig(
      vocab_size=CONFIG.vocab_size, hidden_size=CONFIG.hidden_size, num_hidden_layers=CONFIG.num_layers,
      num_attention_heads=CONFIG.num_heads, intermediate_size=CONFIG.intermediate_size,
      max_position_embeddings=CONFIG.max_position_embeddings, attn_implementation="eager")
  torch.manual_seed(0)
  return transformers.BertModel(hf_config).eval()


def _encoder_module(torch_model):
  """The BertModel as (input_ids, attention_mask) -> last hidden state, for the ONNX export."""
  import torch

  class Encoder(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.bert = torch_model

    def forward(self, input_ids, attention_mask):
      return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

  return Encoder().eval()


def write_files(folder: str, with_ort: bool) -> dict:
  """The files the contenders load: the 1-bit packed encoder and the ONNX models. name -> path."""
  head, packed_params = packed.pack_params(CONFIG, "encoder", _student_params())
  paths = {"packed": os.path.join(folder, "encoder.safetensors")}
  packed_file.write_packed(paths["packed"], CONFIG, head, packed_params, "float32")
  if with_ort:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic
    paths["ort_fp32"], paths["ort_int8"] = (os.path.join(folder, f"bert_{k}.onnx") for k in ("fp32", "int8"))
    example = tuple(torch.from_numpy(v) for v in _inputs(2, 16).values())
    axes = {0: "batch", 1: "length"}
    torch.onnx.export(_encoder_module(_torch_model()), example, paths["ort_fp32"], dynamo=False,
                      input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes})
    quantize_dynamic(paths["ort_fp32"], paths["ort_int8"], weight_type=QuantType.QInt8)
  return paths


def build(name: str, paths: dict, batch: int, length: int):
  """A zero-argument callable running `name`'s forward on one batch; returns its output."""
  inputs = _inputs(batch, length)
  if name in PACKED or name == "fp32_xla":
    args = [jnp.asarray(v, jnp.int32) for v in (inputs["input_ids"], np.zeros_like(inputs["input_ids"]),
                                                 inputs["attention_mask"])]
    if name == "fp32_xla":  # the same student, simulated (its parameters are not in the 1-bit file)
      student = model_lib.build(CONFIG, "encoder")
      params = _student_params()
      run = jax.jit(lambda p, *x: student.apply({"params": p}, *x)["hidden_states"][-1])
    else:
      config, head, params = packed_file.load_packed(paths["packed"], kernel=name.removeprefix("packed_"))
      run = packed.jit(lambda p, *x: packed.forward(config, head, p, *x)["hidden_states"][-1])
    return lambda: jax.block_until_ready(run(params, *args))
  if name in TORCH:
    import torch
    model = _torch_model()
    if name == "torch_int8":
      model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    torch_inputs = {k: torch.from_numpy(v) for k, v in inputs.items()}

    def run_torch():
      with torch.inference_mode():
        return model(**torch_inputs).last_hidden_state.numpy()
    return run_torch
  import onnxruntime
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = os.cpu_count()
  session = onnxruntime.InferenceSession(paths[name], options, providers=["CPUExecutionProvider"])
  return lambda: session.run(None, inputs)[0]


def _fastest(contenders: dict, repeats: int) -> dict:
  """Min wall time of each zero-argument callable (already warmed up), interleaved."""
  best = {name: float("inf") for name in contenders}
  for _ in range(repeats):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def packed_contenders() -> tuple:
  """The packed contenders this host runs, and why packed_native is not among them (None if it is)."""
  try:
    native.kernels()
    return list(PACKED), None
  except native.Unavailable as e:
    return [name for name in PACKED if name != "packed_native"], str(e)


def kernel_rates(tokens: int, repeats: int, kernels: tuple) -> dict:
  """Binary MACs per second of each exact matmul alone (int8, popcount, native), on the two FFN shapes."""
  rng = np.random.default_rng(0)
  rates = {}
  for kernel in kernels:
    calls = []
    d, f = CONFIG.hidden_size, CONFIG.intermediate_size
    for k, n in [(d, f), (f, d)]:
      if kernel == "int8":
        a, b = (jnp.asarray(rng.integers(-1, 2, s), jnp.int8) for s in [(tokens, k), (k, n)])
        fn = packed.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.int32))
      elif kernel == "native":  # from the float signs a Linear hands it
        a = jnp.asarray(rng.integers(-1, 2, (tokens, k)), jnp.float32)
        b = jnp.asarray(rng.integers(0, 2**32, (packed.num_words(k), n), dtype=np.uint32))
        fn = packed.jit(native.kernels().linear_counts)
      else:
        w = packed.num_words(k)
        a, b = (jnp.asarray(rng.integers(0, 2**32, s, dtype=np.uint32)) for s in [(tokens, w), (w, n)])
        fn = packed.jit(lambda a, b: packed.signed_matmul(a, a, b))
      fn(a, b).block_until_ready()
      calls.append(lambda fn=fn, a=a, b=b: fn(a, b).block_until_ready())
    seconds = _fastest({i: call for i, call in enumerate(calls)}, repeats)
    rates[kernel] = 2 * tokens * CONFIG.hidden_size * CONFIG.intermediate_size / sum(seconds.values())
  return rates


def binary_macs(batch: int, length: int) -> int:
  """Binarized multiply-accumulates of one encoder forward: Q/K/V/O, FFN, Q.K^T, P.V, pooler."""
  d, f, layers = CONFIG.hidden_size, CONFIG.intermediate_size, CONFIG.num_layers
  return layers * (batch * length * (4 * d * d + 2 * d * f) + 2 * batch * length * length * d) + batch * d * d


def measure_in_subprocess(name: str, paths: dict, batches: list, length: int, repeats: int) -> dict:
  """`name` timed and its peak memory read in a fresh process: {batch: (fastest seconds, peak MiB)};
  for ROOFLINE, {batch: {kernel: binary MACs per second}}."""
  command = [sys.executable, os.path.abspath(__file__), "--child", name, "--paths", json.dumps(paths),
             "--batches", ",".join(map(str, batches)), "--length", str(length), "--repeats", str(repeats)]
  out = subprocess.run(command, capture_output=True, text=True)
  lines = [line for line in out.stdout.splitlines() if line.startswith("CHILD ")]
  if out.returncode or not lines:
    raise RuntimeError(f"{name} failed in its subprocess: {out.stderr.strip().splitlines()[-3:]}")
  return {int(batch): values if name == ROOFLINE else tuple(values)
          for batch, values in json.loads(lines[-1][len("CHILD "):]).items()}


def _child(name: str, paths: dict, batches: list, length: int, repeats: int) -> None:
  """Loads `name`, then per batch size (ascending: the peak after each is that batch's) times it."""
  if name == ROOFLINE:
    kernels = tuple(contender.removeprefix("packed_") for contender in packed_contenders()[0])
    print("CHILD " + json.dumps({batch: kernel_rates(batch * length, repeats, kernels) for batch in batches}))
    return
  if name in TORCH or name in ORT:
    import torch  # noqa: F401  (the framework's import is not the model's memory)
    if name in ORT:
      import onnxruntime  # noqa: F401
  jnp.zeros(1).block_until_ready()  # JAX's backend up
  before = _status_kib("VmRSS")
  result = {}
  for batch in sorted(batches):
    run = build(name, paths, batch, length)
    run()  # compiles (from the parent's cache) and warms up
    seconds = _fastest({name: run}, repeats)[name]
    result[batch] = (seconds, (_status_kib("VmHWM") - before) / 1024)
  print("CHILD " + json.dumps(result))


def _status_kib(field: str) -> int:
  """A memory figure of this process from /proc/self/status, in KiB (Linux)."""
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", default="8,1", help="comma-separated batch sizes")
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5, help="timed runs per contender and round")
  parser.add_argument("--rounds", type=int, default=2, help="rounds over all contenders; fastest kept")
  parser.add_argument("--quick", action="store_true", help="1 round of 3 repeats, no fp32_xla (about 3 min)")
  parser.add_argument("--skip-torch", action="store_true")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--paths", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if min(args.repeats, args.rounds) < 1:
    parser.error("--repeats and --rounds must be at least 1")
  batches = [int(b) for b in args.batches.split(",")]
  cache = os.path.join(tempfile.gettempdir(), "bipft_bench_xla_cache")
  jax.config.update("jax_compilation_cache_dir", cache)  # shared with the subprocesses
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  if args.child:
    _child(args.child, json.loads(args.paths), batches, args.length, args.repeats)
    return
  if args.quick:
    args.repeats, args.rounds = 3, 1

  cpu, flags = precision.cpu_description()
  print(f"host: {cpu}; flags: {flags}", flush=True)
  print(f"BERT-base encoder, batches {batches} x {args.length}; jax {jax.__version__}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; load {os.getloadavg()}", flush=True)
  try:
    import onnx  # noqa: F401
    import onnxruntime  # noqa: F401
    with_ort = not args.skip_torch
  except ImportError:
    with_ort = False
    print("note: onnxruntime/onnx not installed (pip install -e '.[bench]'): ONNX Runtime skipped",
          flush=True)
  packed_names, why_not_native = packed_contenders()
  if why_not_native:
    print(f"note: {why_not_native}: packed_native skipped", flush=True)
  names = packed_names + ([] if args.quick else ["fp32_xla"])
  names += [] if args.skip_torch else list(TORCH) + (list(ORT) if with_ort else [])
  auto_kernel = packed.resolve_kernel("auto")
  print(f"packed.prepare(kernel='auto') picks {auto_kernel} on this host", flush=True)

  result = {"cpu": cpu, "length": args.length, "auto_kernel": auto_kernel,
            "int8_expanded_weight_bytes": binary_weights(), "packed_weight_bytes": binary_weights() // 8}
  with tempfile.TemporaryDirectory() as folder:
    started = time.perf_counter()
    paths = write_files(folder, with_ort)
    checks = {}
    for batch in batches:  # outputs compared here; compiles for the subprocesses' cache
      outputs = {name: np.asarray(build(name, paths, batch, args.length)()) for name in names
                 if name in PACKED or name == "fp32_xla"}
      popcount = outputs["packed_popcount"]
      checks[batch] = {f"{name}_equals_popcount": bool(np.array_equal(outputs[name], popcount))
                       for name in packed_names[1:]}
      if "fp32_xla" in outputs:
        diff = np.abs(outputs["packed_popcount"] - outputs["fp32_xla"])
        checks[batch]["max_abs_diff_vs_simulated"] = float(np.max(diff))
    print(f"files written and compiled in {time.perf_counter() - started:.0f} s", flush=True)
    best, best_rates = {}, {batch: {} for batch in batches}
    for _ in range(args.rounds):  # one process per contender and round, one after the other
      for name in names:
        for batch, (seconds, peak) in measure_in_subprocess(name, paths, batches, args.length,
                                                            args.repeats).items():
          old = best.get((name, batch), (float("inf"), peak))
          best[name, batch] = (min(old[0], seconds), old[1])
      for batch, rates in measure_in_subprocess(ROOFLINE, paths, batches, args.length, args.repeats).items():
        for kernel, rate in rates.items():
          best_rates[batch][kernel] = max(rate, best_rates[batch].get(kernel, 0.0))
  for batch in batches:
    rates = best_rates[batch]
    roofline_s = binary_macs(batch, args.length) / max(rates.values())
    times = {name: best[name, batch][0] for name in names}
    ours = times[f"packed_{auto_kernel}"]
    record = {**checks[batch], "roofline_s": roofline_s, "packed_over_roofline": ours / roofline_s,
              **{f"{name}_s": seconds for name, seconds in times.items()},
              **{f"{name}_peak_mib": best[name, batch][1] for name in names},
              **{f"speedup_vs_{name}": t / ours for name, t in times.items() if name not in PACKED},
              **{f"{k}_binary_gops": 2 * v / 1e9 for k, v in rates.items()}}
    print(f"batch {batch} x {args.length} (load {os.getloadavg()[0]:.1f}); packed = packed_{auto_kernel}; "
          f"{checks[batch]}", flush=True)
    for name in names:
      ratio = "" if name == f"packed_{auto_kernel}" else f"  packed {times[name] / ours:5.2f}x faster"
      print(f"  {name:>16s} {times[name] * 1e3:9.1f} ms  peak +{best[name, batch][1]:7.1f} MiB{ratio}",
            flush=True)
    fastest = max(rates, key=rates.get)
    print(f"  roofline (binary MACs at the best exact kernel, {fastest} {2 * rates[fastest] / 1e9:.0f} "
          f"GOPS): {roofline_s * 1e3:.1f} ms; packed at {ours / roofline_s:.2f}x of it", flush=True)
    result[f"batch_{batch}"] = record
  print("RESULT " + json.dumps(result))


def binary_weights() -> int:
  """Binarized weights of the encoder's Linear layers (each one byte once expanded to int8)."""
  d, f = CONFIG.hidden_size, CONFIG.intermediate_size
  return CONFIG.num_layers * (4 * d * d + 2 * d * f) + d * d


if __name__ == "__main__":
  main()
