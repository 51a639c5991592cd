"""Stable Diffusion 1.5 U-Net checkpoints (diffusers or CompVis/LDM format) -> `models.unet.UNet` params.

Formats read (detected from the keys):
  diffusers  `unet/diffusion_pytorch_model.safetensors`: `down_blocks.1.attentions.0.proj_in.weight`, ...
  CompVis    `input_blocks.1.0.in_layers.0.weight`, `middle_block.1...`, `output_blocks.5.2.conv...`,
             `time_embed.0`, `out.2`; inside a full SD checkpoint under `model.diffusion_model.` (the
             other models in such a file, e.g. VAE and text encoder, are skipped and counted)

The LDM `input_blocks` / `output_blocks` numbering is derived from `config.unet` (levels, res blocks,
attention levels), so any U-Net of this family converts, not only SD-1.5. Strict like every converter.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mmldm_jax.convert import common
from mmldm_jax.convert.vae import build_mapping, load_params_or_checkpoint, select_submodel

_RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                 "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _resnet_inner(rest: str) -> str:
  module, _, leaf = rest.partition(".")
  return f"{_RESNET_NAMES[module]}.{leaf}" if module in _RESNET_NAMES else rest


def compvis_unet_key(key: str, unet_config) -> str:
  """diffusers U-Net key -> CompVis/LDM `openaimodel` key for the U-Net sized by `unet_config`."""
  per_level = unet_config.num_res_blocks + 1
  levels = len(unet_config.channel_mult)
  simple = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
  for prefix, target in simple.items():
    if key.startswith(prefix):
      return target + key[len(prefix):]
  match = re.match(r"^down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)$", key)
  if match:
    level, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
    if kind == "downsamplers":
      return f"input_blocks.{1 + level * per_level + per_level - 1}.0.op.{rest.partition('.')[2]}"
    block = 1 + level * per_level + index
    return (f"input_blocks.{block}.0.{_resnet_inner(rest)}" if kind == "resnets"
            else f"input_blocks.{block}.1.{rest}")
  match = re.match(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.+)$", key)
  if match:
    kind, index, rest = match[1], int(match[2]), match[3]
    if kind == "attentions":
      return f"middle_block.1.{rest}"
    return f"middle_block.{2 * index}.{_resnet_inner(rest)}"
  match = re.match(r"^up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)$", key)
  if match:
    up_index, kind, index, rest = int(match[1]), match[2], int(match[3]), match[4]
    if kind == "upsamplers":
      level = levels - 1 - up_index
      has_attention = 2 ** level in tuple(unet_config.attention_resolutions)
      block = up_index * per_level + per_level - 1
      return f"output_blocks.{block}.{2 if has_attention else 1}.{rest}"
    block = up_index * per_level + index
    return (f"output_blocks.{block}.0.{_resnet_inner(rest)}" if kind == "resnets"
            else f"output_blocks.{block}.1.{rest}")
  return key


def detect_unet_format(state_dict: Mapping[str, np.ndarray]) -> str:
  """'compvis' or 'diffusers', from the key names."""
  if any(k.startswith(("input_blocks.", "middle_block.", "output_blocks.")) for k in state_dict):
    return "compvis"
  return "diffusers"


def unet_template(config) -> Any:
  """Abstract (shape-only) params of the U-Net sized by `config.unet`."""
  from mmldm_jax.models import unet as unet_lib
  model = unet_lib.build_unet(config)
  size = 2 ** (len(config.unet.channel_mult) - 1)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, config.unet.in_channels)), jnp.zeros((1,)),
      jnp.zeros((1, 1, config.unet.context_dim))))
  return shapes["params"]


def convert_unet_state_dict(state_dict: Mapping[str, np.ndarray], config, *,
                            source: str = "checkpoint") -> tuple[dict, dict]:
  """Converts a U-Net state dict (diffusers or CompVis) to Flax params; returns (params, report)."""
  state_dict, skipped = select_submodel(state_dict, "model.diffusion_model.")
  fmt = detect_unet_format(state_dict)
  rename = (lambda key: compvis_unet_key(key, config.unet)) if fmt == "compvis" else (lambda k: k)
  template = unet_template(config)
  mapping = build_mapping(template, rename)
  params = common.assign(template, mapping, state_dict, source=source)
  return params, dict(format=fmt, tensors=len(mapping), skipped_other_models=skipped)


def convert_unet_file(path: str, config) -> tuple[dict, dict]:
  """Reads a local U-Net checkpoint (safetensors, .bin, .ckpt) and converts it."""
  return convert_unet_state_dict(common.load_torch_state_dict(path, "unet"), config, source=path)


def load_unet_params(path: str, config) -> dict:
  """U-Net params for `config` from a converted `.msgpack` or a diffusers / CompVis checkpoint file."""
  return load_params_or_checkpoint(path, "unet", unet_template(config),
                                   lambda p: convert_unet_file(p, config))
