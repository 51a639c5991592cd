"""The SD-1.5 U-Net (diffusers UNet2DConditionModel with the SD-1.5 config), NHWC, Flax Linen.

Structure for `config.unet` (SD-1.5: 320 channels, mult (1, 2, 4, 4), 2 res blocks, attention at ds
4, 2, 1, 8 heads at every level, context 768, GroupNorm 32, eps 1e-5):
  conv_in; per level a down block of `num_res_blocks` ResBlocks (each followed by a SpatialTransformer
  at attention levels) and a stride-2 conv downsampler (not on the last level); a mid block (ResBlock,
  SpatialTransformer, ResBlock); per level, bottom-up, an up block of `num_res_blocks + 1` ResBlocks on
  [h ; skip] (+ SpatialTransformer) and a nearest-x2 upsampler (not on the top level);
  GroupNorm, SiLU, conv_out. The time embedding is the sinusoidal embedding (flip_sin_to_cos, shift 0)
  of width model_channels through a 2-layer MLP to 4 * model_channels.

Parameter names are diffusers' flattened (`down_blocks_1_attentions_0`, `mid_block_resnets_1`), so
`mmldm_jax.convert.unet` maps diffusers and CompVis checkpoints by renaming.

Two entry points for MM-LDM's signal decoder (ControlNet-like conditioning):
  input_residuals  one array per input block (12 for SD: conv_in, every ResBlock(+attention) and every
                   downsampler, in LDM `input_blocks` order), added to h right after that block, so they
                   also flow into the skip connections;
  extra_embedding  `[B, 4 * model_channels]`, added to the time embedding after the time MLP.

Memory: `remat` (config.unet.remat_policy) names a `jax.checkpoint_policies` policy under which every
ResBlock and SpatialTransformer is rematerialised in the backward pass ('none': no remat). It changes
neither the parameters nor the function computed.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmldm_jax.models import layers

Array = jax.Array
Dtype = Any


def _attention_levels(channel_mult: Sequence[int], attention_resolutions: Sequence[int]) -> list[bool]:
  """Level i (downsample factor 2^i) carries attention when 2^i is in attention_resolutions."""
  return [2 ** level in tuple(attention_resolutions) for level in range(len(channel_mult))]


def input_block_geometry(unet_config) -> list[tuple[int, int]]:
  """(channels, downsample factor) after each U-Net input block, in LDM `input_blocks` order.

  SD-1.5: channels [320]*4 + [640]*3 + [1280]*5, factors [1]*3 + [2]*3 + [4]*3 + [8]*3. The multi-modal
  autoencoder builds one residual feature of this shape per block (`UNet(input_residuals=...)`).
  """
  width = unet_config.model_channels
  geometry = [(width, 1)]
  levels = len(unet_config.channel_mult)
  for level, mult in enumerate(unet_config.channel_mult):
    geometry += [(width * mult, 2 ** level)] * unet_config.num_res_blocks
    if level < levels - 1:
      geometry.append((width * mult, 2 ** (level + 1)))
  return geometry


class UNet(nn.Module):
  """SD-1.5-shaped conditional U-Net; see the module docstring. Built from config by `build_unet`."""
  in_channels: int = 4
  out_channels: int = 4
  model_channels: int = 320
  channel_mult: tuple[int, ...] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attention_resolutions: tuple[int, ...] = (4, 2, 1)
  num_heads: int = 8
  transformer_depth: int = 1
  context_dim: int = 768
  norm_groups: int = 32
  linear_projection: bool = False
  dropout: float = 0.0
  remat: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.model_channels

  def _kwargs(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def _remat(self, block_cls, **kwargs):
    """`block_cls`, rematerialised under the policy `self.remat` unless it is 'none'."""
    return layers.rematerialised(block_cls, self.remat, "unet.remat_policy", **kwargs)

  def _resblock(self, channels: int, name: str) -> layers.ResBlock:
    """Called as block(h, temb, deterministic): `deterministic` by position, static under remat."""
    block_cls = self._remat(layers.ResBlock, static_argnums=(3,))
    return block_cls(channels, use_temb=True, dropout=self.dropout, norm_groups=self.norm_groups,
                     epsilon=1e-5, name=name, **self._kwargs())

  def _transformer(self, channels: int, name: str) -> layers.SpatialTransformer:
    if channels % self.num_heads:
      raise ValueError(f"U-Net: {channels} channels are not divisible by num_heads={self.num_heads}")
    return self._remat(layers.SpatialTransformer)(
        self.num_heads, channels // self.num_heads, depth=self.transformer_depth,
        norm_groups=self.norm_groups, linear_projection=self.linear_projection, name=name,
        **self._kwargs())

  def _time_embedding(self, timesteps: Array, batch: int, extra_embedding: Array | None) -> Array:
    timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))
    sinusoid = layers.timestep_embedding(timesteps, self.model_channels).astype(self.dtype)
    temb = layers.TimestepEmbedding(self.time_embed_dim, name="time_embedding",
                                    **self._kwargs())(sinusoid)
    if extra_embedding is not None:
      if extra_embedding.shape != (batch, self.time_embed_dim):
        raise ValueError(f"extra_embedding has shape {extra_embedding.shape}; expected "
                         f"{(batch, self.time_embed_dim)}")
      temb = temb + extra_embedding.astype(temb.dtype)
    return temb

  @nn.compact
  def __call__(self, x: Array, timesteps: Array, context: Array, *,
               input_residuals: Sequence[Array] | None = None,
               extra_embedding: Array | None = None, train: bool = False) -> Array:
    """x `[B, H, W, in]`, timesteps `[B]` (or a scalar), context `[B, S, context_dim]` -> `[B, H, W, out]`.

    H and W must be multiples of 2^(levels - 1).
    """
    batch = x.shape[0]
    levels = len(self.channel_mult)
    attention = _attention_levels(self.channel_mult, self.attention_resolutions)
    expected_blocks = 1 + levels * self.num_res_blocks + levels - 1
    if input_residuals is not None and len(input_residuals) != expected_blocks:
      raise ValueError(f"input_residuals has {len(input_residuals)} arrays; the U-Net has "
                       f"{expected_blocks} input blocks")
    if context.ndim != 3 or context.shape[0] != batch or context.shape[-1] != self.context_dim:
      raise ValueError(f"context has shape {context.shape}; expected ({batch}, tokens, "
                       f"{self.context_dim})")
    factor = 2 ** (levels - 1)
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"U-Net input {x.shape}: H and W must be multiples of {factor}")
    deterministic = not train
    x = nn.with_logical_constraint(x, ("activation_batch", None, None, None))
    temb = self._time_embedding(timesteps, batch, extra_embedding)

    block_index = 0

    def add_residual(h):
      nonlocal block_index
      if input_residuals is not None:
        h = h + input_residuals[block_index].astype(h.dtype)
      block_index += 1
      return h

    h = add_residual(layers.Conv(self.model_channels, (3, 3), name="conv_in", **self._kwargs())(x))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      channels = self.model_channels * mult
      for index in range(self.num_res_blocks):
        h = self._resblock(channels, f"down_blocks_{level}_resnets_{index}")(
            h, temb, deterministic)
        if attention[level]:
          h = self._transformer(channels, f"down_blocks_{level}_attentions_{index}")(h, context)
        h = add_residual(h)
        skips.append(h)
      if level < levels - 1:
        h = layers.Downsample(channels, name=f"down_blocks_{level}_downsamplers_0",
                              **self._kwargs())(h)
        h = add_residual(h)
        skips.append(h)

    channels = h.shape[-1]
    h = self._resblock(channels, "mid_block_resnets_0")(h, temb, deterministic)
    h = self._transformer(channels, "mid_block_attentions_0")(h, context)
    h = self._resblock(channels, "mid_block_resnets_1")(h, temb, deterministic)

    for up_index, mult in enumerate(reversed(self.channel_mult)):
      level = levels - 1 - up_index
      channels = self.model_channels * mult
      for index in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = self._resblock(channels, f"up_blocks_{up_index}_resnets_{index}")(
            h, temb, deterministic)
        if attention[level]:
          h = self._transformer(channels, f"up_blocks_{up_index}_attentions_{index}")(h, context)
      if level > 0:
        h = layers.Upsample(channels, name=f"up_blocks_{up_index}_upsamplers_0", **self._kwargs())(h)

    h = nn.silu(layers.GroupNorm(self.norm_groups, 1e-5, name="conv_norm_out", **self._kwargs())(h))
    return layers.Conv(self.out_channels, (3, 3), name="conv_out", **self._kwargs())(h)


def build_unet(config, dtype: Dtype = jnp.float32, **overrides) -> UNet:
  """The U-Net sized by `config.unet` (remat policy `config.unet.remat_policy`)."""
  u = config.unet
  args = dict(in_channels=u.in_channels, out_channels=u.out_channels,
              model_channels=u.model_channels, channel_mult=tuple(u.channel_mult),
              num_res_blocks=u.num_res_blocks, attention_resolutions=tuple(u.attention_resolutions),
              num_heads=u.num_heads, transformer_depth=u.transformer_depth,
              context_dim=u.context_dim, norm_groups=u.norm_groups,
              remat=u.remat_policy, dtype=dtype)
  args.update(overrides)
  return UNet(**args)
