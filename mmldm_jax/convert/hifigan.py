"""HiFi-GAN V1 generator weights: PyTorch state dict -> `mmldm_jax.models.vocoder` Flax params.

Accepted inputs (all as a name -> array mapping, e.g. from `common.load_torch_state_dict`):
- an original jik876/hifi-gan training checkpoint (`{'generator': state_dict}`, e.g. `generator_v1`,
  `UNIVERSAL_V1/g_02500000`), whose convs carry weight-norm pairs `X.weight_g` / `X.weight_v`;
- the same with the newer `torch.nn.utils.parametrizations.weight_norm` naming
  (`X.parametrizations.weight.original0` = g, `.original1` = v);
- an already folded state dict with plain `X.weight`, in the original naming (`ups.{i}`) or in
  transformers' `SpeechT5HifiGan` naming (`upsampler.{i}`; its `mean` / `scale` buffers must be the
  identity, since the V1 generator does not normalise its input).

Weight norm is folded as w = g * v / ||v||, the norm taken over every axis on which g has size 1. That
is the axis convention of whatever `dim` the checkpoint was made with: the original applies
`weight_norm(module)` with its default dim=0 to every layer, which is the output-channel axis of a
Conv1d weight (out, in, k) but the INPUT-channel axis of a ConvTranspose1d weight (in, out, k); reading
the axis off g's shape handles both. Loading is strict: missing, unexpected and misshaped keys are all
listed in one `ConversionError`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmldm_jax.convert import common
from mmldm_jax.models import vocoder

_GAIN_SUFFIXES = ((".weight_g", ".weight_v"),
                  (".parametrizations.weight.original0", ".parametrizations.weight.original1"))


def fold_weight_norm(gain: np.ndarray, direction: np.ndarray, name: str = "weight") -> np.ndarray:
  """w = g * v / ||v||, the norm over the axes where g has size 1 (torch's `_weight_norm`)."""
  gain = np.asarray(gain, np.float64)
  direction = np.asarray(direction, np.float64)
  if gain.ndim == 0:
    gain = gain.reshape((1,) * direction.ndim)
  if gain.ndim != direction.ndim or any(g not in (1, v) for g, v in zip(gain.shape, direction.shape)):
    raise common.ConversionError(f"{name}: weight-norm gain {gain.shape} does not broadcast against "
                                 f"its direction {direction.shape}")
  axes = tuple(a for a, size in enumerate(gain.shape) if size == 1)
  norm = np.sqrt(np.sum(direction * direction, axis=axes, keepdims=True))
  return (gain * direction / norm).astype(np.float32)


def folded_state_dict(state_dict: Mapping[str, Any], source: str = "checkpoint"
                      ) -> dict[str, np.ndarray]:
  """The state dict in the original naming with plain `.weight` tensors (weight norm folded)."""
  if "generator" in state_dict and isinstance(state_dict["generator"], Mapping):
    state_dict = state_dict["generator"]
  arrays = {key: np.asarray(value, np.float32) for key, value in state_dict.items()}
  folded: dict[str, np.ndarray] = {}
  paired = set()
  for gain_suffix, direction_suffix in _GAIN_SUFFIXES:
    for key in arrays:
      if key.endswith(gain_suffix):
        stem = key[:-len(gain_suffix)]
        if stem + direction_suffix not in arrays:
          raise common.ConversionError(f"{source}: {key} has no matching {stem + direction_suffix}")
        folded[stem + ".weight"] = fold_weight_norm(arrays[key], arrays[stem + direction_suffix],
                                                    name=f"{source}: {stem}")
        paired.update((key, stem + direction_suffix))
      elif key.endswith(direction_suffix) and key[:-len(direction_suffix)] + gain_suffix not in arrays:
        raise common.ConversionError(f"{source}: {key} has no matching weight-norm gain "
                                     f"{key[:-len(direction_suffix)] + gain_suffix}")
  for key, value in arrays.items():
    if key in paired:
      continue
    if key in ("mean", "scale"):
      _check_identity_normalisation(key, value, source)
      continue
    folded[key] = value
  return {re.sub(r"^upsampler\.", "ups.", key): value for key, value in folded.items()}


def _check_identity_normalisation(key: str, value: np.ndarray, source: str) -> None:
  identity = 0.0 if key == "mean" else 1.0
  if not np.all(value == identity):
    raise common.ConversionError(
        f"{source}: `{key}` is not all {identity}: this checkpoint normalises its input mel "
        "(SpeechT5HifiGan normalize_before=True), which the HiFi-GAN V1 generator does not do")


def _torch_key(flax_path: tuple[str, ...]) -> str:
  """('resblocks_3', 'convs1_2', 'kernel') -> 'resblocks.3.convs1.2.weight'."""
  modules = [re.sub(r"_(\d+)$", r".\1", name) for name in flax_path[:-1]]
  leaf = {"kernel": "weight", "bias": "bias"}[flax_path[-1]]
  return ".".join(modules + [leaf])


def _transposed_conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch ConvTranspose1d (in, out, k) -> our TransposedConv1d (k, in, out)."""
  return np.transpose(weight, (2, 0, 1))


def param_template(config) -> Any:
  """Shapes of the generator's parameters for `config` (no computation)."""
  return common.unbox(jax.eval_shape(lambda: vocoder.init_params(config, jax.random.key(0))))


def _mapping(template: Any) -> common.Mapping_:
  mapping = {}
  for path in traverse_util.flatten_dict(template):
    transform = common.identity
    if path[-1] == "kernel":
      transform = _transposed_conv_kernel if path[0].startswith("ups_") else common.conv_kernel
    mapping[path] = (_torch_key(path), transform)
  return mapping


def convert_hifigan(state_dict: Mapping[str, Any], config, source: str = "checkpoint") -> dict:
  """Generator params (plain float32 arrays, `model.apply({'params': params}, mel)`) from a state dict.

  Raises `common.ConversionError` listing every missing, unexpected or misshaped key.
  """
  template = param_template(config)
  return common.assign(template, _mapping(template), folded_state_dict(state_dict, source),
                       source=source)


def load_hifigan(path: str, config) -> dict:
  """Reads a HiFi-GAN checkpoint file (torch or safetensors) and converts it for `config.vocoder`."""
  return convert_hifigan(common.load_torch_state_dict(path, kind="hifigan"), config, source=path)


def check_params(params: Any, config, source: str = "params") -> None:
  """Fails listing the differences when a Flax param tree does not fit the generator of `config`."""
  expected = {path: tuple(leaf.shape)
              for path, leaf in traverse_util.flatten_dict(param_template(config)).items()}
  actual = {path: tuple(np.shape(leaf))
            for path, leaf in traverse_util.flatten_dict(common.unbox(params)).items()}
  problems = []
  missing = sorted("/".join(p) for p in set(expected) - set(actual))
  unexpected = sorted("/".join(p) for p in set(actual) - set(expected))
  misshaped = sorted(f"{'/'.join(p)}: {actual[p]} != {expected[p]}"
                     for p in set(expected) & set(actual) if actual[p] != expected[p])
  if missing:
    problems.append(f"missing ({len(missing)}): " + ", ".join(missing))
  if unexpected:
    problems.append(f"unexpected ({len(unexpected)}): " + ", ".join(unexpected))
  if misshaped:
    problems.append(f"misshaped ({len(misshaped)}): " + "; ".join(misshaped))
  if problems:
    raise common.ConversionError(f"{source} does not match config.vocoder:\n  " +
                                 "\n  ".join(problems))


LAYOUTS = ("frames_mels", "mels_frames")


def load_vocoder(config, dtype: Any = jnp.float32, layout: str = "frames_mels"
                 ) -> tuple[Callable[[Any, jax.Array], jax.Array], dict]:
  """The pretrained vocoder as `(apply_fn, params)`; `apply_fn(params, mel) -> wave [B, T * hop]`.

  `layout` names the mel's axes: 'frames_mels' = [B, T, num_mels] (the module's own layout) or
  'mels_frames' = [B, num_mels, T] (what `mmldm_jax.data.audio.log_mel` / `image_to_mel` return, and
  what the original HiFi-GAN takes). Reads `config.vocoder.pretrained_path`: an original HiFi-GAN
  checkpoint (`generator_v1` or `UNIVERSAL_V1/g_02500000` from the jik876/hifi-gan releases), a folded
  torch / safetensors state dict, or Flax msgpack written by `python -m mmldm_jax.convert
  --kind=hifigan` (`.msgpack`). `apply_fn` is jitted. Raises when the path is unset or missing (naming
  it and where to get the weights) and when the audio config does not produce the mel the vocoder
  expects.
  """
  if layout not in LAYOUTS:
    raise ValueError(f"load_vocoder: layout={layout!r}, expected one of {LAYOUTS}")
  path = config.vocoder.pretrained_path
  if not path:
    raise ValueError("config.vocoder.pretrained_path is empty: set it to "
                     f"{common.WHERE_TO_GET['hifigan']}, or use Griffin-Lim (mmldm_jax/data/audio.py)")
  vocoder.check_mel_matches(config)
  if path.endswith(".msgpack"):
    params = common.load_params(path, kind="hifigan")
    params = params.get("params", params)
    check_params(params, config, source=path)
  else:
    params = load_hifigan(path, config)
  model = vocoder.generator_from_config(config, dtype=dtype)
  num_mels = config.vocoder.num_mels

  @jax.jit
  def apply_fn(params, mel):
    mel_axis = -1 if layout == "frames_mels" else -2
    if mel.ndim != 3 or mel.shape[mel_axis] != num_mels:
      raise ValueError(f"vocoder: expected a log-mel [batch, {layout.replace('_', ', ')}] with "
                       f"{num_mels} mels, got shape {mel.shape}")
    if layout == "mels_frames":
      mel = jnp.swapaxes(mel, -1, -2)
    return model.apply({"params": params}, mel)

  return apply_fn, jax.tree.map(jnp.asarray, params)
