"""BiBench's eight binarized Linear layers (htqin/BiBench, `bibench/models/layers/*.py`).

Each operator reproduces the released layer's forward and backward (`shared/zoo_vectors/manifest.json`
has the formulas as read from the code). Our kernels are (in, out): the authors' per-row (per output
channel) reductions of a (out, in) weight are reductions over axis 0 here (`api.per_output_mean`).
Activation scales are per token (the last axis is the feature axis).
"""
import jax
import jax.numpy as jnp
import numpy as np

from bipft_jax.zoo import api
from bipft_jax.zoo.ste import (fourier_sign, polynomial_sign, scaled_sign_clip, sign_identity, sign_ste,
                               triangle_sign)

_sg = jax.lax.stop_gradient


def _sign_planes(kernel, extras):
  return [api.unit_plane(jnp.sign(kernel))]


def _sign_activation(x, extras):
  return api.unit_plane(api.activation_signs(x))


# --- BNN ----------------------------------------------------------------------------------------

def _bnn_apply(x, kernel, bias, extras, *, train):
  return api.linear(sign_ste(x, True), sign_ste(kernel, True)) + bias


def bnn() -> api.LinearOp:
  """BNN: y = sign(x) @ sign(W) + b; both gradients pass where |v| <= 1 (+-1 included)."""
  return api.LinearOp("bnn", _bnn_apply, api.no_extras, weight_planes=_sign_planes,
                      activation_planes=_sign_activation, elementwise_activation=True, doc=bnn.__doc__)


# --- XNOR ---------------------------------------------------------------------------------------

def _token_scale(x):
  return _sg(jnp.mean(jnp.abs(x), axis=-1, keepdims=True))


def _xnor_apply(x, kernel, bias, extras, *, train):
  centred = api.centred_per_output(kernel)
  w_b = sign_ste(centred, True) * _sg(api.per_output_mean(jnp.abs(centred)))
  x_b = sign_ste(x, True) * _token_scale(x)
  return api.factored_linear(x_b, w_b, _xnor_activation(x, extras), *_xnor_planes(kernel, extras)) + bias


def _xnor_planes(kernel, extras):
  centred = api.centred_per_output(kernel)
  return [(api.per_output_mean(jnp.abs(centred))[0], jnp.sign(centred))]


def _xnor_activation(x, extras):
  return _token_scale(x), api.activation_signs(x)


def xnor() -> api.LinearOp:
  """XNOR-Net: x -> mean|x| (per token) * sign(x); W -> mean|Wc| * sign(Wc) per output channel with
  Wc = W - mean(W) per output channel. Scales detached; windows |v| <= 1; the weight gradient
  passes the centring. (The released layer's per-token scale only broadcasts for 2-D input; this
  is its evident intent.)"""
  return api.LinearOp("xnor", _xnor_apply, api.no_extras, weight_planes=_xnor_planes,
                      activation_planes=_xnor_activation, doc=xnor.__doc__)


# --- XNOR++ -------------------------------------------------------------------------------------

def _xnorpp_apply(x, kernel, bias, extras, *, train):
  return api.linear(sign_ste(x, False), sign_ste(kernel, False)) * extras["o_scale"] + bias


def _output_scale_extras(name, init):
  """One learned scale per output channel, applied to the product before the bias."""
  return lambda in_features, out_features: {
      name: api.Extra(init, (out_features,), api.WEIGHT_SCALE, (api.OUT,))}


def xnorplusplus() -> api.LinearOp:
  """XNOR-Net++ (output-channel factor only): y = (sign(x) @ sign(W)) * o_scale + b, o_scale learned
  (init 1); windows |v| < 1 (v = +-1 gets NO gradient)."""
  extras = _output_scale_extras("o_scale", jax.nn.initializers.ones)
  return api.LinearOp("xnorplusplus", _xnorpp_apply, extras,
                      weight_planes=lambda kernel, extras: [(extras["o_scale"], jnp.sign(kernel))],
                      activation_planes=_sign_activation, elementwise_activation=True, doc=xnorplusplus.__doc__)


# --- DoReFa -------------------------------------------------------------------------------------

def _abs_mean_scale(kernel):
  return _sg(api.per_output_mean(jnp.abs(kernel)))


def _dorefa_apply(x, kernel, bias, extras, *, train):
  w_b = sign_ste(kernel, False) * _abs_mean_scale(kernel)
  return api.factored_linear(sign_ste(x, False), w_b, _sign_activation(x, extras),
                             *_abs_mean_planes(kernel, extras)) + bias


def _abs_mean_planes(kernel, extras):
  return [(_abs_mean_scale(kernel)[0], jnp.sign(kernel))]


def dorefa() -> api.LinearOp:
  """BiBench's 1-bit DoReFa: y = sign(x) @ (mean|W| * sign(W)) + b, scale per output channel
  (detached); windows |v| < 1 (v = +-1 blocked); the weight gradient is times the scale."""
  return api.LinearOp("dorefa", _dorefa_apply, api.no_extras, weight_planes=_abs_mean_planes,
                      activation_planes=_sign_activation, elementwise_activation=True, doc=dorefa.__doc__)


# --- Bi-Real and ReAct --------------------------------------------------------------------------

def _bireal_product(x, kernel, shift):
  w_b = scaled_sign_clip(kernel, _abs_mean_scale(kernel))
  return api.factored_linear(polynomial_sign(x, shift), w_b, _sign_activation(x, None),
                             *_abs_mean_planes(kernel, None))


def _bireal_apply(x, kernel, bias, extras, *, train):
  return _bireal_product(x, kernel, jnp.zeros((), x.dtype))


def _react_apply(x, kernel, bias, extras, *, train):
  return _bireal_product(x, kernel, extras["threshold"])


def bireal() -> api.LinearOp:
  """Bi-Real: y = sign(x) @ (mean|W| * sign(W)), NO bias (the released layer owns one, never adds
  it). d/dx = p'(x) (2 + 2x on [-1, 0), 2 - 2x on [0, 1), else 0); d/dW = 1 on [-1, 1], not times
  the scale."""
  return api.LinearOp("bireal", _bireal_apply, api.no_extras, weight_planes=_abs_mean_planes,
                      activation_planes=_sign_activation, elementwise_activation=True, uses_bias=False,
                      doc=bireal.__doc__)


def _react_extras(in_features, out_features):
  return {"threshold": api.Extra(jax.nn.initializers.zeros, (in_features,), api.FP, (api.IN,))}


def react() -> api.LinearOp:
  """ReActNet: Bi-Real with a learned per-input-channel threshold t (init 0) that, as released,
  only shifts the gradient window: forward sign(x), backward p'(x + t); t gets sum g * p'(x + t)."""
  return api.LinearOp("react", _react_apply, _react_extras, weight_planes=_abs_mean_planes,
                      activation_planes=_sign_activation, elementwise_activation=True, uses_bias=False,
                      doc=react.__doc__)


# --- ReCU ---------------------------------------------------------------------------------------

def recu_schedule(max_epochs: int, epoch: int) -> dict:
  """{"tau": ...}, as BiBench's ReCU `model_params_update(max_epochs, epoch)` sets it (float32):
  tau = A e^(epoch/max_epochs) + B, running from 0.85 to 0.99. BiBench's BERT track never calls it
  (mmcv's IterBasedRunner fires no epoch hook), so tau stays the constructor's 1."""
  e, t_min, t_max = np.float32(np.e), np.float32(0.85), np.float32(0.99)
  a = (t_max - t_min) / (e - np.float32(1))
  return {"tau": float(a * np.float32(e ** np.float32(epoch / max_epochs)) + (t_min - a))}


def _recu_weight(kernel, tau):
  centred = api.centred_per_output(kernel)
  std = jnp.sqrt(jnp.var(centred, axis=0, ddof=1, keepdims=True) + 1e-5)
  standardised = centred / (std / 2 / np.sqrt(2))
  # Q_tau is a Python float in the release (.item()): no gradient; +inf for tau = 1 (no clamp).
  bound = _sg(-jnp.mean(jnp.abs(standardised)) * jnp.log(2 - 2 * jnp.asarray(tau, kernel.dtype)))
  # The clamp's gradient is 1 on the closed window [-Q, Q], as torch.clamp's.
  return jnp.where(standardised > bound, bound, jnp.where(standardised < -bound, -bound, standardised))


def recu(tau: float = 1.0) -> api.LinearOp:
  """ReCU: y = (sign(x) @ sign(clamp(W', -Q, Q))) * alpha + b with W' = (W - mean) * 2 sqrt(2) / std
  per output channel (unbiased variance), Q = -mean|W'| log(2 - 2 tau) (no gradient), alpha learned
  per output channel (init U[0, 1)). Weight STE: identity (then the clamp and the standardisation
  Jacobian). Activations: in training x / sqrt(var_unbiased(x) + 1e-5) per token, then sign with
  the backward max(0, 2 - |2v|); in eval the normalisation is skipped (same forward, other dL/dx)."""
  def apply(x, kernel, bias, extras, *, train):
    a = x / jnp.sqrt(jnp.var(x, axis=-1, ddof=1, keepdims=True) + 1e-5) if train else x
    return api.linear(triangle_sign(a), sign_identity(_recu_weight(kernel, tau))) * extras["alpha"] + bias

  return api.LinearOp("recu", apply, _output_scale_extras("alpha", jax.nn.initializers.uniform(1.0)),
                      weight_planes=lambda kernel, extras: [
                          (extras["alpha"], jnp.sign(_recu_weight(kernel, tau)))],
                      activation_planes=_sign_activation, elementwise_activation=True, doc=recu.__doc__)


# --- FDA ----------------------------------------------------------------------------------------

def fda_schedule(max_epochs: int, epoch: int) -> dict:
  """{"n": ..., "alpha": ...} as FDA's `model_params_update(max_epochs, epoch)` sets them: alpha =
  0.05 (1 + cos(pi (epoch + 1)/max_epochs)) (float32), n = 9 + int(9 epoch / max_epochs). Never
  called in BiBench's BERT track (n = 9, alpha = 0.1 hold)."""
  angle = np.float32((epoch + 1) / max_epochs) * np.float32(np.pi)
  alpha = np.float32(0.05) * (np.float32(1) + np.cos(angle))
  return {"n": 9 + int(epoch / max_epochs * 9), "alpha": float(alpha)}


FDA_BOTTLENECK = 64  # the noise MLP's width is in_features // 64


def _torch_linear_init(key, shape, dtype):
  """nn.Linear's default weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with fan_in = shape[0]."""
  bound = 1 / np.sqrt(max(shape[0], 1))
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _fda_extras(in_features, out_features):
  """The two noise MLPs' weights; none below 64 input features, where the released MLP has width 0 and
  computes 0 (zero-size arrays, which orbax cannot checkpoint, are never made)."""
  width = in_features // FDA_BOTTLENECK
  if width == 0:
    return {}
  return {f"{side}_noise_{fc}": api.Extra(_torch_linear_init, shape, api.FP, axes)
          for side in ("weight", "act")
          for fc, shape, axes in (("fc1", (in_features, width), (api.IN, None)),
                                  ("fc2", (width, in_features), (None, api.IN)))}


def _noise_adaption(v_NxI, extras, side):
  """NA(v) = fc2(relu(fc1(v))) + 0.1 sin(v) over the last axis, with `side`'s MLP (0 without one)."""
  noise = 0.1 * jnp.sin(v_NxI)
  if f"{side}_noise_fc1" not in extras:
    return noise
  return jax.nn.relu(v_NxI @ extras[f"{side}_noise_fc1"]) @ extras[f"{side}_noise_fc2"] + noise


def fda(n: int = 9, alpha: float = 0.1) -> api.LinearOp:
  """FDA: y = (sign(x) + alpha NA_a(x)) @ ((sign(W) + alpha NA_w(W)) * mean|W|) + b, the scale per
  output channel (detached, applied to the noise term too). sign's backward: the square wave's
  Fourier series with n + 1 terms (`ste.fourier_sign`); the noise MLPs NA (width in//64, applied to
  each token and to each output channel's weight vector; none below 64 features) train by autodiff.
  Not sign planes."""
  def apply(x, kernel, bias, extras, *, train):
    noise_w = _noise_adaption(kernel.T, extras, "weight").T
    w_b = (fourier_sign(kernel, n) + alpha * noise_w) * _abs_mean_scale(kernel)
    x_b = fourier_sign(x, n) + alpha * _noise_adaption(x, extras, "act")
    return api.linear(x_b, w_b) + bias

  return api.LinearOp("fda", apply, _fda_extras, doc=fda.__doc__)
