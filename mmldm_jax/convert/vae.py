"""Stable Diffusion VAE checkpoints (diffusers or CompVis/LDM format) -> `models.vae.AutoencoderKL` params.

Formats read (detected from the keys):
  diffusers          `encoder.down_blocks.0.resnets.0.conv1.weight`, attention `to_q`/`to_out.0` (Linear)
  diffusers (legacy) the same with attention `query`/`key`/`value`/`proj_attn` (e.g. sd-vae-ft-mse)
  CompVis / LDM      `encoder.down.0.block.0.conv1.weight`, `mid.attn_1.q` (1x1 convs), `nin_shortcut`,
                     decoder `up.{i}` numbered bottom-up; inside a full SD checkpoint under
                     `first_stage_model.` (the rest of such a file is not VAE and is skipped, and counted)

Our parameter names are diffusers' flattened (`down_blocks_0_resnets_1`), so each Flax path has one
diffusers key (`diffusers_key`) and, for CompVis files, one CompVis key (`compvis_vae_key`). Loading is
strict through `convert.common.assign`: every missing, unexpected or misshaped key is listed in one error.
The helpers `diffusers_key`, `leaf_transform`, `build_mapping` and `select_submodel` are shared with the
U-Net converter.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mmldm_jax.convert import common

_FLAT_BLOCKS = re.compile(r"(resnets|attentions|downsamplers|upsamplers|transformer_blocks)_(\d+)")
_LEVEL_BLOCKS = re.compile(r"(down_blocks|up_blocks)_(\d+)_")


def diffusers_key(path: tuple[str, ...]) -> str:
  """Flax param path -> diffusers state-dict key, e.g. ('encoder', 'down_blocks_0_resnets_1', 'conv1',
  'kernel') -> 'encoder.down_blocks.0.resnets.1.conv1.weight'."""
  *modules, leaf = path
  name = ".".join(modules)
  name = _LEVEL_BLOCKS.sub(r"\1.\2.", name)
  name = name.replace("mid_block_", "mid_block.")
  name = _FLAT_BLOCKS.sub(r"\1.\2", name)
  name = re.sub(r"(^|\.)to_out$", r"\1to_out.0", name)  # diffusers wraps it in a ModuleList
  name = name.replace(".ff.geglu", ".ff.net.0.proj").replace(".ff.out", ".ff.net.2")
  return f"{name}.{'bias' if leaf == 'bias' else 'weight'}"


def leaf_transform(leaf: str, template_ndim: int) -> Callable[[np.ndarray], np.ndarray]:
  """The torch -> Flax layout change for one parameter. Arrays that cannot be laid out are passed on
  unchanged, so `common.assign` reports them as misshaped instead of failing inside a reshape."""
  if leaf != "kernel":
    return common.identity
  if template_ndim == 2:  # Dense: torch Linear (O, I) or a 1x1 conv (O, I, 1, 1)
    def dense(weight):
      if weight.ndim == 4 and weight.shape[2:] == (1, 1):
        weight = weight[:, :, 0, 0]
      return weight.T if weight.ndim == 2 else weight
    return dense

  def conv(weight):
    return common.conv_kernel(weight) if weight.ndim == template_ndim else weight
  return conv


def build_mapping(template: Any, rename: Callable[[str], str] = lambda key: key) -> common.Mapping_:
  """Mapping for `common.assign`: every Flax path -> (rename(diffusers_key(path)), layout transform)."""
  flat = traverse_util.flatten_dict(common.unbox(template))
  return {path: (rename(diffusers_key(path)), leaf_transform(path[-1], len(value.shape)))
          for path, value in flat.items()}


def select_submodel(state_dict: Mapping[str, np.ndarray], prefix: str) -> tuple[dict, int]:
  """Keys under `prefix` with the prefix removed, and how many other keys were skipped.

  Without any key under `prefix` the dict is returned whole (a file holding only this model)."""
  inside = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
  if not inside:
    return dict(state_dict), 0
  return inside, len(state_dict) - len(inside)


def check_against_template(params: Any, template: Any, source: str) -> None:
  """Fails listing every missing, unexpected and misshaped parameter of an already converted tree."""
  expected = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(common.unbox(template)).items()}
  actual = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(common.unbox(params)).items()}
  problems = []
  missing = sorted("/".join(p) for p in set(expected) - set(actual))
  unexpected = sorted("/".join(p) for p in set(actual) - set(expected))
  misshaped = sorted(f"{'/'.join(p)}: {actual[p]} != model {expected[p]}"
                     for p in set(expected) & set(actual) if actual[p] != expected[p])
  for label, items in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
    if items:
      problems.append(f"{label} parameters ({len(items)}): " + ", ".join(items))
  if problems:
    raise common.ConversionError(f"{source} does not match the model:\n  " + "\n  ".join(problems))


def load_params_or_checkpoint(path: str, kind: str, template: Any, convert_file) -> dict:
  """Params from a converted `.msgpack` (checked against `template`) or any checkpoint `convert_file`
  reads (safetensors / torch)."""
  if path.endswith(".msgpack"):
    params = common.load_params(path, kind)
    check_against_template(params, template, path)
    return params
  return convert_file(path)[0]


# ---------------------------------------------------------------------------------------------------
# VAE key formats

_COMPVIS_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v",
                      "to_out.0": "proj_out"}
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def compvis_vae_key(key: str, num_levels: int) -> str:
  """diffusers VAE key -> CompVis/LDM key (decoder levels are numbered bottom-up there)."""
  key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
  key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.",
               key)
  key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
               lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.block.", key)
  key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
               lambda m: f"decoder.up.{num_levels - 1 - int(m.group(1))}.upsample.", key)
  key = key.replace("mid_block.resnets.0.", "mid.block_1.").replace("mid_block.resnets.1.",
                                                                     "mid.block_2.")
  match = re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key)
  if match:
    key = f"{match.group(1)}.mid.attn_1.{_COMPVIS_ATTENTION[match.group(2)]}.{match.group(3)}"
  key = key.replace(".conv_shortcut.", ".nin_shortcut.").replace(".conv_norm_out.", ".norm_out.")
  return key


def legacy_diffusers_vae_key(key: str) -> str:
  """diffusers VAE key -> the pre-0.14 diffusers attention names (`query`, ..., `proj_attn`)."""
  match = re.match(r"^(.+\.mid_block\.attentions\.0)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)$",
                   key)
  if match:
    return f"{match.group(1)}.{_LEGACY_ATTENTION[match.group(2)]}.{match.group(3)}"
  return key


def detect_vae_format(state_dict: Mapping[str, np.ndarray]) -> str:
  """'compvis', 'diffusers_legacy' or 'diffusers', from the key names."""
  keys = set(state_dict)
  if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.mid.")) for k in keys):
    return "compvis"
  if any(".mid_block.attentions.0.query." in k for k in keys):
    return "diffusers_legacy"
  return "diffusers"


def vae_template(config) -> Any:
  """Abstract (shape-only) params of the VAE sized by `config.vae`."""
  from mmldm_jax.models import vae as vae_lib
  model = vae_lib.build_vae(config)
  size = 2 ** len(config.vae.channel_mult)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, size, size, config.vae.in_channels))))
  return shapes["params"]


def convert_vae_state_dict(state_dict: Mapping[str, np.ndarray], config, *,
                           source: str = "checkpoint") -> tuple[dict, dict]:
  """Converts a VAE state dict (any supported format) to Flax params; returns (params, report)."""
  state_dict, skipped = select_submodel(state_dict, "first_stage_model.")
  fmt = detect_vae_format(state_dict)
  ignore = ()
  if fmt == "compvis":
    # LDM autoencoder training checkpoints also carry their loss modules (LPIPS, discriminator).
    ignore = tuple(k for k in state_dict if k.startswith("loss."))
    levels = len(config.vae.channel_mult)
    rename = lambda key: compvis_vae_key(key, levels)
  elif fmt == "diffusers_legacy":
    rename = legacy_diffusers_vae_key
  else:
    rename = lambda key: key
  template = vae_template(config)
  mapping = build_mapping(template, rename)
  params = common.assign(template, mapping, state_dict, source=source, ignore=ignore)
  report = dict(format=fmt, tensors=len(mapping), skipped_other_models=skipped,
                ignored_loss_keys=len(ignore))
  return params, report


def convert_vae_file(path: str, config) -> tuple[dict, dict]:
  """Reads a local VAE checkpoint (safetensors, .bin, .ckpt/.pth) and converts it."""
  return convert_vae_state_dict(common.load_torch_state_dict(path, "vae"), config, source=path)


def load_vae_params(path: str, config) -> dict:
  """VAE params for `config` from a converted `.msgpack` or a diffusers / CompVis checkpoint file."""
  return load_params_or_checkpoint(path, "vae", vae_template(config),
                                   lambda p: convert_vae_file(p, config))
