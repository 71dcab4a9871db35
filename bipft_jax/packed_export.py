"""`bipft export-packed`: a 1-bit student as a bit-packed safetensors file (packed_file.py: the format).

  bipft export-packed --checkpoint WORKDIR [--step N] --out model.bipft.safetensors \\
      [--remainder auto|float16|float32] [--overwrite]

An existing --out file is replaced only with --overwrite, and then whole (temporary name, rename).
The FP remainder is stored in float16 when that keeps the model's predictions on 256 random
sequences (`--remainder auto`; packed_file.py says why a binary model often needs float32). A
finetuned checkpoint's record of its run goes into the file's metadata, the fields that say how the
model reads text (task, labels, max_length, tokenizer; not its data or init paths), so that `bipft
evaluate` and `predict` check a packed classifier against its task as they check the checkpoint; a
converted checkpoint's file keeps the folder of its tokenizer.
"""
import argparse
import os

from bipft_jax import files, packed, packed_file, saved_models
from bipft_jax.glue import splits


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--checkpoint", required=True, help="workdir (or step folder) of a binary student")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--out", required=True, help="path of the .safetensors file to write")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
  parser.add_argument("--remainder", choices=["auto", *packed.REMAINDER_DTYPES], default="auto",
                      help="dtype of the FP remainder; auto: float16 if 256 probe predictions are unchanged")


def run(args) -> int:
  from bipft_jax import checkpointing
  files.check_output_file(args.out, "--out", args.overwrite)
  config, head, params = checkpointing.restore_params(args.checkpoint, args.step)
  run = checkpointing.read_run_config(args.checkpoint, args.step)
  folder = splits.saved_tokenizer(args.checkpoint, run)  # the file's readers find it from anywhere
  record = saved_models.reading_record(run, os.path.abspath(folder) if folder else "")
  result = packed_file.export(config, head, params, args.out, args.remainder, record)
  if head == "pretraining":
    print("note: exported the encoder; the pretraining heads (MLM decoder tied to the latent FP "
          "word embedding, NSP) are not part of a 1-bit model")
  changed, probes = result["float16_changed_probes"], packed_file.PROBE_SEQUENCES
  why = ""  # --remainder given
  if changed is not None:
    why = f" (auto: float16 changed {changed} of {probes} probe predictions)" if changed else \
        f" (auto: float16 kept all {probes} probe predictions)"
  print(f"wrote {args.out}: head {result['head']}, FP remainder in {result['remainder_dtype']}{why}")
  print(f"packed file      {result['packed_bytes']:>14,} bytes ({result['packed_bytes'] / 2**20:.2f} MiB)")
  print(f"fp32 checkpoint  {result['fp32_bytes']:>14,} bytes ({result['fp32_bytes'] / 2**20:.2f} MiB)")
  print(f"ratio            {result['ratio']:>14.1f}x smaller")
  return 0
