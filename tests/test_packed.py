"""Packed 1-bit inference: bit packing, popcount matmuls, the packed encoder, the exported file."""
import functools
import pathlib
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bipft_jax import model as model_lib
from bipft_jax import model_params
from bipft_jax import native, packed, precision
from bipft_jax import packed_file
from bipft_jax.errors import UserError

TINY = dict(vocab_size=97, hidden_size=48, num_layers=2, num_heads=3, intermediate_size=72,
            max_position_embeddings=40, num_labels=3, binary=True, estimator_rank=1)


def ternary(rng, shape, zero_fraction=0.2):
  values = rng.choice([-1.0, 1.0], size=shape)
  return np.where(rng.random(shape) < zero_fraction, 0.0, values).astype(np.float32)


@pytest.mark.parametrize("k", [1, 31, 32, 33, 70, 96])
def test_pack_unpack_round_trip(k):
  rng = np.random.default_rng(k)
  bits = rng.random((3, 5, k)) < 0.5
  words = packed.pack_bits(jnp.asarray(bits))
  assert words.dtype == jnp.uint32 and words.shape == (3, 5, packed.num_words(k))
  np.testing.assert_array_equal(packed.unpack_bits(words, k), bits)
  t = ternary(rng, (4, k))
  np.testing.assert_array_equal(packed.unpack_signed(*packed.pack_signed(jnp.asarray(t)), k), t)


def test_bit_order_interleaves_elements_over_words():
  bits = np.zeros(40, bool)  # 2 words: element k is bit k // 2 of word k % 2
  bits[[0, 5, 33]] = True
  np.testing.assert_array_equal(packed.pack_bits(jnp.asarray(bits)), np.array([1, 4 + 2**16], np.uint32))


@pytest.mark.parametrize("m,k,n", [(5, 7, 3), (8, 32, 16), (6, 45, 9), (3, 100, 33)])
@pytest.mark.parametrize("weight_zeros", [False, True])
def test_signed_matmul_equals_integer_matmul(m, k, n, weight_zeros):
  rng = np.random.default_rng(m * k * n)
  x = ternary(rng, (2, m, k))  # activations with zeros, leading batch axis
  w = ternary(rng, (k, n), 0.2 if weight_zeros else 0.0)
  x_sign, x_nonzero = packed.pack_signed(jnp.asarray(x))
  w_sign, w_nonzero = (planes.T for planes in packed.pack_signed(jnp.asarray(w.T)))
  got = packed.signed_matmul(x_sign, x_nonzero, w_sign, w_nonzero if weight_zeros else None)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, np.einsum("bmk,kn->bmn", x.astype(np.int64), w.astype(np.int64)))


@pytest.mark.parametrize("m,k,n", [(4, 9, 5), (7, 64, 8), (5, 130, 3)])
def test_unsigned_signed_matmul_equals_integer_matmul(m, k, n):
  rng = np.random.default_rng(k)
  p = rng.random((m, k)) < 0.3
  v = ternary(rng, (k, n))
  v_sign, v_nonzero = (planes.T for planes in packed.pack_signed(jnp.asarray(v.T)))
  got = packed.unsigned_signed_matmul(packed.pack_bits(jnp.asarray(p)), v_sign, v_nonzero)
  np.testing.assert_array_equal(got, p.astype(np.int64) @ v.astype(np.int64))


@functools.lru_cache(maxsize=None)
def _student(head, estimator_rank, pooling="cls", precision="fp32"):
  """A tiny student with random non-zero biases, move biases and calibrated alphas (cached)."""
  config = model_lib.BertConfig.from_dict({**TINY, "estimator_rank": estimator_rank, "pooling": pooling,
                                           "precision": precision})
  module = model_lib.build(config, head)
  params = jax.jit(lambda key: model_params.init_params(module, key))(jax.random.key(0))
  flat = flax.traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.key(1), len(flat))
  for key, (path, value) in zip(keys, sorted(flat.items())):
    if path[-1] in ("bias", "move_bias"):
      flat[path] = 0.05 * jax.random.normal(key, value.shape)
  params = flax.traverse_util.unflatten_dict(flat)
  batch = _batch(config)
  params = jax.jit(lambda p, b: model_params.calibrate_alphas(module, p, b))(params, batch)
  return config, module, params, batch


@pytest.mark.parametrize("zero_inputs", [False, True])
def test_binary_dense_equals_simulated_layer(zero_inputs):
  config = model_lib.BertConfig.from_dict(TINY)
  layer = model_lib.Linear(40, config)
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 5, 70)).astype(np.float32)
  if zero_inputs:  # e.g. an all-zero attention context row with a zero move bias
    x[0, 1] = 0.0
    x[1, 3, ::4] = 0.0
  params = {"kernel": jnp.asarray(rng.standard_normal((70, 40)), jnp.float32), "bias": jnp.full(40, 0.1),
            "move_bias": jnp.zeros(70), "input_alpha": jnp.float32(0.7)}
  want = layer.apply({"params": params}, jnp.asarray(x))
  op = model_lib.policy_of(config).linear
  [planes] = packed._kernel_planes(op, params["kernel"], params)
  tree = {**params, **packed._keep_needed_planes(planes, zero_planes=True)}
  got = jax.jit(functools.partial(packed._binary_dense, op))(tree, jnp.asarray(x))
  np.testing.assert_allclose(got, want, atol=1e-5)
  if zero_inputs:
    np.testing.assert_allclose(got[0, 1], params["bias"], atol=1e-6)  # zeros contribute nothing


def _trained_like_student(head="classification", estimator_rank=1, pooling="cls", precision="fp32"):
  return _student(head, estimator_rank, pooling, precision)


def _batch(config, batch_size=4, length=24):
  rng = np.random.default_rng(7)
  ids = rng.integers(1, config.vocab_size, (batch_size, length))
  mask = np.ones((batch_size, length), np.int32)
  mask[1, 15:] = 0  # padding: masked keys binarize to 0
  mask[3, 5:] = 0
  ids = np.where(mask == 1, ids, config.pad_token_id)
  types = (np.arange(length)[None] >= length // 2).astype(np.int32) * mask
  return {"input_ids": jnp.asarray(ids), "token_type_ids": jnp.asarray(types), "attention_mask": jnp.asarray(mask)}


def _run_packed(config, head, packed_params, batch):
  fn = jax.jit(lambda p, b: packed.forward(config, head, p, b["input_ids"], b["token_type_ids"], b["attention_mask"]))
  return fn(packed_params, batch)


# "mixed": a student trained in mixed precision computes its FP products (estimators, classifier) on
# bf16 operands; its packed forward must too, or it is not the model the checkpoint's evaluation scored.
@pytest.mark.parametrize("estimator_rank,pooling,precision",
                         [(1, "cls", "fp32"), (0, "cls", "fp32"), (1, "mean", "fp32"), (1, "cls", "mixed")])
def test_packed_encoder_equals_simulated_student(estimator_rank, pooling, precision):
  config, module, params, batch = _trained_like_student(estimator_rank=estimator_rank, pooling=pooling,
                                                        precision=precision)
  simulated = jax.jit(lambda p, b: module.apply({"params": p}, b["input_ids"], b["token_type_ids"],
                                                b["attention_mask"]))(params, batch)
  head, packed_params = packed.pack_params(config, "classification", params)
  ours = _run_packed(config, head, packed_params, batch)
  for got, want in zip(ours["hidden_states"], simulated["hidden_states"]):
    np.testing.assert_allclose(got, want, atol=1e-4)
  np.testing.assert_allclose(ours["logits"], simulated["logits"], atol=1e-4)
  np.testing.assert_array_equal(jnp.argmax(ours["logits"], -1), jnp.argmax(simulated["logits"], -1))
  # Random weights have no exact zeros after centring: sign planes only.
  assert "kernel_nonzero" not in packed_params["bert"]["pooler"]["dense"]


def _with_exact_zeros(params):
  """`params` with some weights of layer 0's FFN and the word embedding at their tensor's mean."""
  flat = flax.traverse_util.flatten_dict(params)
  # Make some weights equal to their tensor's mean: BWN gives them sign 0.
  for path in [("bert", "encoder", "layer", "0", "intermediate", "dense", "kernel"),
               ("bert", "embeddings", "word_embeddings", "embedding")]:
    # On a dyadic grid every fp32 sum is exact, so a zero total makes mean(W) exactly 0 and the
    # zeroed entries exactly W == mean(W): BWN gives them sign 0.
    w = np.round(np.array(flat[path]) * 1024) / 1024
    w[::3, ::2] = 0.0
    w[-1, -1] -= w.sum()
    flat[path] = jnp.asarray(w, jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


def test_exact_zeros_in_weights_and_embedding_stay_exact():
  config, module, params, batch = _trained_like_student()
  params = _with_exact_zeros(params)
  head, packed_params = packed.pack_params(config, "classification", params)
  assert "kernel_nonzero" in packed_params["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]
  assert "embedding_nonzero" in packed_params["bert"]["embeddings"]["word_embeddings"]
  simulated = module.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  ours = _run_packed(config, head, packed_params, batch)
  np.testing.assert_allclose(ours["logits"], simulated["logits"], atol=1e-4)


def _in_gelu_dip(params):
  """`params` with every FFN's counts scaled up (x20) and positive move biases after its GELU, so that
  sign(GELU(y) + m) is +, -, + along y: GELU dips below -m only for y between about -2 and 0."""
  flat = flax.traverse_util.flatten_dict(params)
  for path in list(flat):
    if path[-3:] == ("intermediate", "dense", "kernel"):
      flat[path] = 20 * flat[path]
    if path[-3:] == ("output", "dense", "move_bias") and "attention" not in path:
      flat[path] = 0.02 + jnp.abs(flat[path])
  return flax.traverse_util.unflatten_dict(flat)


@pytest.mark.parametrize("variant", ["plain", "zeros", "gelu_dip"])
def test_kernels_equal_popcount_exactly(variant, exact_kernels):
  config, _, params, batch = _trained_like_student()
  params = {"plain": lambda p: p, "zeros": _with_exact_zeros, "gelu_dip": _in_gelu_dip}[variant](params)
  zeros = variant == "zeros"
  head, packed_params = packed.pack_params(config, "classification", params)
  assert packed.prepare(config, packed_params, "popcount") is packed_params
  original = packed_params["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]
  popcount = _run_packed(config, head, packed_params, batch)
  for kernel in exact_kernels:
    prepared = packed.prepare(config, packed_params, kernel)
    dense = prepared["bert"]["encoder"]["layer"]["0"]["intermediate"]["dense"]
    assert "kernel_sign" not in dense and "kernel_nonzero" not in dense
    if kernel == "int8":
      assert dense["kernel_int8"].dtype == jnp.int8 and dense["kernel_int8"].shape == (TINY["hidden_size"], 72)
      assert (0 in np.asarray(dense["kernel_int8"])) == zeros
    else:  # the same planes under the names that select the custom call
      assert dense["native_sign"] is original["kernel_sign"] and ("native_nonzero" in dense) == zeros
    # Both replace the FFN's GELU by step functions of its counts; popcount keeps it.
    steps = np.asarray(prepared["bert"]["encoder"]["layer"]["0"]["output"]["dense"][packed.FFN_STEPS])
    if variant == "gelu_dip":  # some channel's signs go +, -, + as its count rises
      assert np.any((steps[3] & 0b111111) == 0b10_11_10)
    for got, want in zip(jax.tree.leaves(_run_packed(config, head, prepared, batch)), jax.tree.leaves(popcount)):
      np.testing.assert_array_equal(got, want)


def test_ffn_steps_encode_every_count():
  """Step functions of count -> (sign, nonzero) code decode to the codes they were made from, for
  every count; a channel with more than four steps has no encoding (its layer keeps GELU)."""
  rng = np.random.default_rng(5)
  entries, channels, lowest = 97, 300, -48
  codes = np.zeros((entries, channels), np.uint32)
  for channel in range(channels):
    starts = np.sort(rng.choice(np.arange(1, entries), rng.integers(0, 4), replace=False))
    values = rng.choice([0, 2, 3], len(starts) + 1)  # zero, positive, negative
    codes[:, channel] = values[np.searchsorted(starts, np.arange(entries), side="right")]
  steps = packed.ffn_steps(codes, lowest)
  assert steps.dtype == np.int32 and steps.shape == (4, channels)
  counts = np.arange(lowest, lowest + entries)[:, None]
  step = (counts >= steps[None, 0]).astype(int) + (counts >= steps[None, 1]) + (counts >= steps[None, 2])
  np.testing.assert_array_equal((steps[3].view(np.uint32)[None] >> (2 * step)) & 3, codes)
  codes[[10, 20, 30, 40], 7] = 3 - codes[[10, 20, 30, 40], 7]  # channel 7: at least five steps now
  assert packed.ffn_steps(codes, lowest) is None


def test_a_layer_whose_steps_do_not_fit_keeps_its_gelu(exact_kernels, monkeypatch):
  config, _, params, batch = _trained_like_student()
  head, packed_params = packed.pack_params(config, "classification", params)
  encode = packed.ffn_steps
  popcount = _run_packed(config, head, packed_params, batch)
  for kernel in exact_kernels:
    calls = []
    monkeypatch.setattr(packed, "ffn_steps", lambda *a: calls.append(1) or (None if len(calls) == 2 else encode(*a)))
    prepared = packed.prepare(config, packed_params, kernel)
    layers = prepared["bert"]["encoder"]["layer"]
    assert packed.FFN_STEPS in layers["0"]["output"]["dense"]
    assert packed.FFN_STEPS not in layers["1"]["output"]["dense"]
    for got, want in zip(jax.tree.leaves(_run_packed(config, head, prepared, batch)), jax.tree.leaves(popcount)):
      np.testing.assert_array_equal(got, want)


def test_int8_kernel_compiles_to_int8_products_and_no_branches():
  """The int8 kernel's compiled forward: every binarized product an s8 x s8 -> s32 dot (the two
  attention products included) and no conditional (the popcount kernel's fusion guard, which
  cost the int8 kernel a quarter of its time)."""
  config, _, params, batch = _trained_like_student()
  head, packed_params = packed.pack_params(config, "classification", params)
  expanded = packed.prepare(config, packed_params, "int8")
  forward = jax.jit(lambda p, ids: packed.forward(config, head, p, ids)["logits"])
  hlo = forward.lower(expanded, batch["input_ids"]).compile().as_text()
  int8_dots = [line for line in hlo.splitlines() if " dot(" in line and line.split("=")[1].lstrip().startswith("s32")]
  # Per layer: Q, K, V, attention output, FFN in and out, Q.K^T and P.V; plus the pooler.
  assert len(int8_dots) == TINY["num_layers"] * 8 + 1, int8_dots
  assert " conditional(" not in hlo
  assert " conditional(" in forward.lower(packed_params, batch["input_ids"]).compile().as_text()  # popcount


@pytest.fixture
def small_kernel_probe(tmp_path, monkeypatch):
  """`auto` measures into a fresh cache, on a short probe batch (the choice, not its speed, is tested)."""
  monkeypatch.setenv("BIPFT_CACHE", str(tmp_path))
  monkeypatch.setattr(packed, "_kernel_probe", functools.partial(packed._kernel_probe, batch=1, length=16))


def test_load_packed_prepares_the_kernel_it_is_given(exported, small_kernel_probe, exact_kernels):
  path, _, _, batch = exported
  kernels = ("popcount", *exact_kernels, "auto")
  loaded = {kernel: packed_file.load_packed(path, kernel)[2] for kernel in kernels}
  ffn = lambda p: p["bert"]["encoder"]["layer"]["1"]["intermediate"]["dense"]
  assert "kernel_sign" in ffn(loaded["popcount"]) and "kernel_sign" not in ffn(loaded["int8"])
  assert ffn(loaded["int8"])["kernel_int8"].dtype == jnp.int8
  assert "native" not in loaded or "native_sign" in ffn(loaded["native"])
  assert sorted(ffn(loaded["auto"])) == sorted(ffn(loaded[packed.resolve_kernel("auto")]))
  config, head, _ = packed_file.load_packed(path, "popcount")
  outputs = [_run_packed(config, head, loaded[kernel], batch) for kernel in kernels]
  for theirs in outputs[1:]:
    for got, want in zip(jax.tree.leaves(outputs[0]), jax.tree.leaves(theirs)):
      np.testing.assert_array_equal(got, want)
  with pytest.raises(UserError, match="unknown packed kernel 'int4'"):
    packed_file.load_packed(path, "int4")


def test_auto_kernel_is_measured_once_per_machine(small_kernel_probe, monkeypatch):
  choice = packed.resolve_kernel("auto")
  assert choice in ("popcount", "int8", "native")
  monkeypatch.setattr(precision, "measure", lambda *a, **k: pytest.fail("measured again despite the cache"))
  assert packed.resolve_kernel("auto") == choice
  # Changed kernel code is measured again: the choice is cached under a hash of it.
  monkeypatch.setattr(packed.native, "SOURCE", pathlib.Path(packed.__file__))
  packed.choice_kind.cache_clear()
  with pytest.raises(pytest.fail.Exception, match="measured again"):
    packed.resolve_kernel("auto")
  packed.choice_kind.cache_clear()
  with pytest.raises(ValueError, match="unknown packed kernel 'int4'"):
    packed.resolve_kernel("int4")


def test_without_the_native_kernel_auto_picks_among_the_others(exported, small_kernel_probe, monkeypatch):
  def unavailable(portable=False):
    raise native.Unavailable("the native packed kernel needs a C++ compiler: none found")

  monkeypatch.setattr(native, "kernels", unavailable)
  assert packed.resolve_kernel("auto") in ("popcount", "int8")
  record = precision._read_cache()[precision.host_key()][packed.choice_kind()]
  assert "native" not in record["seconds"] and "native" in record["candidates"]
  path, *_ = exported
  with pytest.raises(UserError, match="needs a C\\+\\+ compiler"):
    packed_file.load_packed(path, "native")


def test_pretraining_student_packs_its_encoder():
  config, module, params, batch = _trained_like_student()
  pretraining_params = {"bert": params["bert"], "cls": {"predictions": {"bias": jnp.zeros(config.vocab_size)}}}
  head, packed_params = packed.pack_params(config, "pretraining", pretraining_params)
  assert head == "encoder" and set(packed_params) == {"bert"}
  simulated = module.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  ours = _run_packed(config, head, packed_params, batch)
  np.testing.assert_allclose(ours["pooled"], simulated["pooled"], atol=1e-4)


def test_teacher_cannot_be_packed():
  config = model_lib.BertConfig.from_dict({**TINY, "binary": False})
  with pytest.raises(ValueError, match="binary"):
    packed.pack_params(config, "classification", {})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  config, module, params, batch = _trained_like_student()
  path = str(tmp_path_factory.mktemp("packed") / "tiny.safetensors")
  result = packed_file.export(config, "classification", params, path, remainder="float32")
  simulated = module.apply({"params": params}, batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
  return path, result, simulated, batch


def test_exported_file_reloads_with_the_same_logits(exported):
  path, result, simulated, batch = exported
  config, head, packed_params = packed_file.load_packed(path)
  assert head == "classification" and config.num_labels == 3
  ours = _run_packed(config, head, packed_params, batch)
  np.testing.assert_allclose(ours["logits"], simulated["logits"], atol=1e-4)
  np.testing.assert_array_equal(jnp.argmax(ours["logits"], -1), jnp.argmax(simulated["logits"], -1))
  with open(path, "rb") as f:
    assert f.read(8)  # a real file; its size is what export reports
  assert result["packed_bytes"] == len(open(path, "rb").read())
  assert result["fp32_bytes"] == 4 * packed.param_count(model_params.init_params(
      model_lib.build(config, "classification"), jax.random.key(0)))


@pytest.mark.parametrize("remainder", ["float32", "float16"])
def test_summary_predicts_the_exported_tensor_bytes(remainder):
  from bipft_jax import summary
  config, _, params, _ = _trained_like_student()
  head, packed_params = packed.pack_params(config, "classification", params)
  tensors = packed_file.file_tensors(config, head, packed_params, remainder)
  assert sum(t.nbytes for t in tensors.values()) == summary.packed_size_bytes(config, head, remainder)


def test_export_stores_one_bit_per_binarized_weight(exported):
  path, _, _, _ = exported
  config, _, packed_params = packed_file.load_packed(path, kernel="popcount")
  ffn = packed_params["bert"]["encoder"]["layer"]["1"]["intermediate"]["dense"]
  assert ffn["kernel_sign"].dtype == jnp.uint32
  assert ffn["kernel_sign"].shape == (packed.num_words(config.hidden_size), config.intermediate_size)
  assert packed_params["bert"]["embeddings"]["word_embeddings"]["embedding_scale"].shape == (config.vocab_size,)


def test_export_cli_prints_sizes(tmp_path, capsys):
  from bipft_jax import checkpointing, cli
  config, _, params, _ = _trained_like_student(estimator_rank=0)
  checkpointing.save_params(str(tmp_path / "run"), params, config, "classification", step=3)
  out = tmp_path / "model.safetensors"
  assert cli.main(["export-packed", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  assert f"{out.stat().st_size:,} bytes" in printed and "ratio" in printed
  assert re.search(r"FP remainder in float(16|32) \(auto: float16 (kept all|changed \d+ of) 256 probe predictions\)",
                   printed), printed
  assert packed_file.load_packed(str(out))[0] == config


@pytest.mark.parametrize("case", ["float16 flips a tie", "float16 exact"])
def test_auto_remainder_keeps_float16_only_when_no_probe_prediction_changes(case, tmp_path):
  config, _, params, _ = _trained_like_student()
  if case == "float16 exact":  # every FP parameter already a float16 value: storing it so changes nothing
    params = jax.tree.map(lambda x: x.astype(jnp.float16).astype(jnp.float32), params)
  else:  # logits = the bias: class 1 by 2^-20 in float32, a tie (argmax 0) once the bias is float16
    params["classifier"] = {"kernel": jnp.zeros_like(params["classifier"]["kernel"]),
                            "bias": jnp.array([1.0, 1.0 + 2.0**-20, 0.0], jnp.float32)}
  result = packed_file.export(config, "classification", params, str(tmp_path / "m.safetensors"), remainder="auto")
  if case == "float16 exact":
    assert (result["remainder_dtype"], result["float16_changed_probes"]) == ("float16", 0)
  else:
    assert (result["remainder_dtype"], result["float16_changed_probes"]) == ("float32", packed_file.PROBE_SEQUENCES)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flipped_bit", "drop_tensor", "wrong_shape", "no_metadata"])
def test_bad_packed_file_is_a_user_error(exported, tmp_path, damage):
  path = exported[0]
  bad = tmp_path / "bad.safetensors"
  if damage == "truncate":
    bad.write_bytes(open(path, "rb").read()[:-100])
  elif damage == "garbage":
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
  elif damage == "flipped_bit":
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0x10  # inside the last tensor's bytes: the header stays valid
    bad.write_bytes(bytes(data))
  else:
    import safetensors
    import safetensors.numpy
    with safetensors.safe_open(path, framework="numpy") as f:
      metadata, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    name = "bert/encoder/layer/0/output/dense/kernel_sign"
    if damage == "drop_tensor":
      del tensors[name]
    elif damage == "wrong_shape":
      tensors[name] = tensors[name][:-1]
    else:
      metadata = {}
    safetensors.numpy.save_file(tensors, str(bad), metadata=metadata)
  reason = {"truncate": "not a readable", "garbage": "not a readable", "flipped_bit": "sha256",
            "drop_tensor": "lacks 1 tensors", "wrong_shape": "expected uint32", "no_metadata": "not a bipft-packed"}
  with pytest.raises(UserError, match=reason[damage]):
    packed_file.load_packed(str(bad))
  with pytest.raises(UserError, match="does not exist"):
    packed_file.load_packed(str(tmp_path / "missing.safetensors"))


def test_export_refuses_a_teacher(tmp_path):
  config = model_lib.BertConfig.from_dict({**TINY, "binary": False})
  with pytest.raises(UserError, match="full-precision"):
    packed_file.export(config, "classification", {}, str(tmp_path / "x.safetensors"))
