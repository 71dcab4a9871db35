"""Packed 1-bit BERT-base encoder vs FP32 forwards on this CPU, measured side by side in one run.

  PYTHONPATH=. python bench/packed_inference.py [--batch 8 --length 128 --repeats 5]

Compares, on one batch (default 8 x 128, no padding):
  packed       bipft_jax.packed.forward: every binarized matmul as XOR/AND + popcount on uint32 words
  fp32_xla     the same student simulated in FP32 by model.py (binary=True), jitted XLA
  teacher_xla  the FP teacher of the same size (binary=False), jitted XLA
  torch_fp32   transformers' PyTorch BertModel (FP32, random init, same size)
and the packed matmul alone on the FFN shapes, in binary GOPS (2 ops per binary MAC).
Timings interleave the contenders and keep each one's fastest repeat: other processes share the
CPU, and the fastest repeat is the least disturbed one. The last line is `RESULT {json}`.
"""
import argparse
import json
import os
import time

# XLA reads its flags once, at backend start: 512-bit vectors let the popcount loops use AVX-512.
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_prefer_vector_width=512")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bipft_jax import model as model_lib  # noqa: E402
from bipft_jax import packed  # noqa: E402


def _student_params(config: model_lib.BertConfig, batch: dict) -> dict:
  """A base-size student at its init, alphas calibrated on `batch`."""
  module = model_lib.build(config, "encoder")
  params = jax.jit(lambda key: model_lib.init_params(module, key))(jax.random.key(0))
  return jax.jit(lambda p: model_lib.calibrate_alphas(module, p, batch))(params)


def _fastest(contenders: dict, repeats: int) -> dict:
  """Min wall time of each zero-argument callable (already warmed up), interleaved."""
  best = {name: float("inf") for name in contenders}
  for _ in range(repeats):
    for name, fn in contenders.items():
      start = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - start)
  return best


def _torch_model(config: model_lib.BertConfig):
  import torch
  import transformers
  hf_config = transformers.BertConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, intermediate_size=config.intermediate_size,
      max_position_embeddings=config.max_position_embeddings, attn_implementation="eager")
  torch.manual_seed(0)
  return transformers.BertModel(hf_config).eval()


def _ffn_matmuls(tokens: int, config: model_lib.BertConfig) -> dict:
  """Packed matmuls of the two FFN shapes on random planes: name -> (callable, binary ops).

  As the encoder runs them: activation sign and nonzero planes, weight signs (XOR, AND, popcount).
  """
  rng = np.random.default_rng(0)
  words = lambda *shape: jnp.asarray(rng.integers(0, 2**32, shape, dtype=np.uint32))
  out = {}
  for k, n in [(config.hidden_size, config.intermediate_size), (config.intermediate_size, config.hidden_size)]:
    w = packed.num_words(k)
    matmul = jax.jit(packed.signed_matmul)
    args = (words(tokens, w), words(tokens, w), words(w, n))
    matmul(*args).block_until_ready()
    out[f"ffn_{k}x{n}"] = (lambda args=args, matmul=matmul: matmul(*args).block_until_ready(), 2 * tokens * k * n)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--skip-torch", action="store_true")
  args = parser.parse_args()

  config = model_lib.BertConfig(binary=True)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, config.vocab_size, (args.batch, args.length)).astype(np.int32)
  batch = {"input_ids": jnp.asarray(ids), "token_type_ids": jnp.zeros_like(ids), "attention_mask": jnp.ones_like(ids)}
  inputs = (batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])

  print(f"BERT-base encoder, batch {args.batch} x {args.length}, devices {jax.devices()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
  params = _student_params(config, batch)
  head, packed_params = packed.pack_params(config, "encoder", params)
  student = model_lib.build(config, "encoder")
  teacher_config = model_lib.BertConfig(binary=False)
  teacher = model_lib.build(teacher_config, "encoder")
  teacher_params = jax.jit(lambda key: model_lib.init_params(teacher, key))(jax.random.key(0))

  last = lambda out: (out["hidden_states"][-1], out["pooled"])
  run_packed = jax.jit(lambda p, *x: last(packed.forward(config, head, p, *x)))
  run_simulated = jax.jit(lambda p, *x: last(student.apply({"params": p}, *x)))
  run_teacher = jax.jit(lambda p, *x: last(teacher.apply({"params": p}, *x)))

  start = time.perf_counter()
  ours = jax.block_until_ready(run_packed(packed_params, *inputs))
  print(f"packed compile+first run {time.perf_counter() - start:.1f}s", flush=True)
  simulated = jax.block_until_ready(run_simulated(params, *inputs))
  jax.block_until_ready(run_teacher(teacher_params, *inputs))
  hidden_diff = float(jnp.max(jnp.abs(ours[0] - simulated[0])))
  pooled_diff = float(jnp.max(jnp.abs(ours[1] - simulated[1])))
  print(f"packed vs simulated: max |diff| last hidden {hidden_diff:.2e}, pooled {pooled_diff:.2e}", flush=True)

  contenders = {
      "packed": lambda: jax.block_until_ready(run_packed(packed_params, *inputs)),
      "fp32_xla": lambda: jax.block_until_ready(run_simulated(params, *inputs)),
      "teacher_xla": lambda: jax.block_until_ready(run_teacher(teacher_params, *inputs)),
  }
  if not args.skip_torch:
    import torch
    torch_model = _torch_model(teacher_config)
    torch_inputs = {"input_ids": torch.from_numpy(ids).long(), "attention_mask": torch.ones(ids.shape, dtype=torch.long)}

    def run_torch():
      with torch.inference_mode():
        torch_model(**torch_inputs)

    run_torch()
    contenders["torch_fp32"] = run_torch
  matmuls = _ffn_matmuls(args.batch * args.length, config)
  contenders.update({name: fn for name, (fn, _) in matmuls.items()})
  times = _fastest(contenders, args.repeats)

  result = {"batch": args.batch, "length": args.length, "packed_s": times["packed"],
            "fp32_xla_s": times["fp32_xla"], "teacher_xla_s": times["teacher_xla"],
            "torch_fp32_s": times.get("torch_fp32"),
            "speedup_vs_fp32_xla": times["fp32_xla"] / times["packed"],
            "speedup_vs_teacher_xla": times["teacher_xla"] / times["packed"],
            "speedup_vs_torch": times["torch_fp32"] / times["packed"] if "torch_fp32" in times else None,
            "max_abs_diff_hidden": hidden_diff, "max_abs_diff_pooled": pooled_diff}
  for name, (_, ops) in matmuls.items():
    result[f"{name}_binary_gops"] = ops / times[name] / 1e9
  for name, seconds in times.items():
    print(f"{name:>22s} {seconds * 1e3:9.1f} ms")
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
