"""The 3-D audio-video discriminator of the multi-modal autoencoder and its hinge losses.

Reference: `src/fm_ae/modules/discriminator.py` (ImageDiscriminator) and
`src/fm_ae/utils/adversarial_loss.py` (`disc_manager.audio_video`, `gan_loss('hinge')`) of the
released MM-LDM code.

The discriminator judges a 3-"frame" stack [audio image, first target frame, last target frame]
([N, 3, H, W, 3] in [-1, 1]). Its negatives teach it realism, audio-video match and frame order:
the all-fake triple, fake audio with a real last frame, fake audio with a real first frame, and
the fake triple with the two frames swapped. The generator is pushed to make its all-fake triple
score as real.

Architecture: a learnable per-position "frame embedding" [3, H, W, 3] (randn) is added to the
input; a 3-D input conv; per level `num_res_blocks` per-frame ResBlocks, followed at ds in
`spatial_attention_resolutions` by full spatio-temporal attention, else at ds in
`temporal_attention_resolutions` by temporal attention; a 3-D stride-(1, 2, 2) conv between
levels; head conv3 -> GroupNorm -> SiLU -> global average pool -> Dense to one logit.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from mmldm_jax.models import layers
from mmldm_jax.models.layers import ConvNd, FittedGroupNorm, FrameResBlock
from mmldm_jax.models.perceptual import SpatioTemporalAttention, TemporalAttention

Dtype = jnp.dtype


class Discriminator3D(nn.Module):
  """[N, 3, H, W, C] triples -> [N] logits (higher = judged real)."""
  channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  head_channels: int
  spatial_attention_resolutions: Sequence[int]
  temporal_attention_resolutions: Sequence[int]
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, triples):
    if triples.ndim != 5:
      raise ValueError(f"Discriminator3D expects [N, T, H, W, C] triples; got {triples.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    frame_embed = self.param("frame_embed", nn.with_logical_partitioning(
        nn.initializers.normal(1.0), (None, None, None, "conv_in")), triples.shape[1:],
        self.param_dtype)
    h = triples.astype(self.dtype) + frame_embed.astype(self.dtype)
    h = ConvNd(self.channels, name="conv_in", **kw)(h)
    ds = 1
    for level, mult in enumerate(self.channel_mult):
      for index in range(self.num_res_blocks):
        h = FrameResBlock(mult * self.channels, self.norm_groups, name=f"res_{level}_{index}",
                          **kw)(h)
        if ds in self.spatial_attention_resolutions:
          h = SpatioTemporalAttention(self.head_channels, self.norm_groups,
                                      name=f"attn_{level}_{index}", **kw)(h)
        elif ds in self.temporal_attention_resolutions:
          h = TemporalAttention(self.head_channels, self.norm_groups,
                                name=f"attn_{level}_{index}", **kw)(h)
      if level != len(self.channel_mult) - 1:
        h = ConvNd(h.shape[-1], stride=2, name=f"down_{level}", **kw)(h)
        ds *= 2
    h = ConvNd(self.channels, name="head_conv", **kw)(h)
    h = nn.silu(FittedGroupNorm(self.norm_groups, name="head_norm", **kw)(h))
    h = jnp.mean(h, axis=(1, 2, 3))
    return layers.Dense(1, kernel_axes=("embed", None), name="logit", **kw)(h)[:, 0].astype(
        jnp.float32)


def discriminator_from_config(config, dtype=jnp.float32) -> Discriminator3D:
  """The discriminator of `config.autoencoder.discriminator`."""
  disc = config.autoencoder.discriminator
  return Discriminator3D(
      channels=disc.channels, channel_mult=tuple(disc.channel_mult),
      num_res_blocks=disc.num_res_blocks, head_channels=disc.head_channels,
      spatial_attention_resolutions=tuple(disc.spatial_attention_resolutions),
      temporal_attention_resolutions=tuple(disc.temporal_attention_resolutions),
      norm_groups=config.unet.norm_groups, dtype=dtype)


def generator_triples(fake_audio, fake_frames):
  """The generator's sample: [fake audio, fake first frame, fake last frame] -> [B, 3, H, W, C].

  fake_audio: [B, H, W, C]; fake_frames: [B, K, H, W, C] (K >= 1 target frames in time order).
  """
  return jnp.stack([fake_audio, fake_frames[:, 0], fake_frames[:, -1]], axis=1)


def discriminator_triples(real_audio, real_frames, fake_audio, fake_frames):
  """(real [B, 3, H, W, C], fakes [4B, 3, H, W, C]) with the reference's four kinds of negatives:
  all fake; fake audio + fake first + REAL last; fake audio + REAL first + fake last; fake audio
  + fake frames in swapped time order."""
  real = jnp.stack([real_audio, real_frames[:, 0], real_frames[:, -1]], axis=1)
  fakes = [
      jnp.stack([fake_audio, fake_frames[:, 0], fake_frames[:, -1]], axis=1),
      jnp.stack([fake_audio, fake_frames[:, 0], real_frames[:, -1]], axis=1),
      jnp.stack([fake_audio, real_frames[:, 0], fake_frames[:, -1]], axis=1),
      jnp.stack([fake_audio, fake_frames[:, -1], fake_frames[:, 0]], axis=1),
  ]
  return real, jnp.concatenate(fakes, axis=0)


def discriminator_hinge_loss(real_logits, fake_logits):
  """relu(1 - D(real)) and relu(1 + D(fake)), averaged over ALL samples together (the reference
  concatenates the B reals and the 4B fakes and takes one mean)."""
  losses = jnp.concatenate([jnp.maximum(0.0, 1.0 - real_logits),
                            jnp.maximum(0.0, 1.0 + fake_logits)])
  return jnp.mean(losses)


def generator_hinge_loss(fake_logits):
  """relu(1 - D(fake triple)): the generator wants its fakes judged real."""
  return jnp.mean(jnp.maximum(0.0, 1.0 - fake_logits))
