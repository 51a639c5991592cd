"""Perceptual encoders of the multi-modal autoencoder and their decoder-side feature blocks.

What is here (the released code's `src/fm_ae/modules/video_enc.py` / `audio_enc.py`):
  * spatial / temporal / spatio-temporal self-attention with a zero-initialised output projection
    (the autoencoder's other blocks, N-d convolutions, gcd-group norms and the per-frame ResBlock
    resampling by 2^n, are `layers.ConvNd`, `layers.FittedGroupNorm`, `layers.FrameResBlock`);
  * `PerceptualEncoder`: video key-frame latents [B, T, h, w, 4] (or the audio image latent
    [B, h, w, 4]) -> the mean and log-variance of a diagonal Gaussian over the perceptual latent
    (video z_v [B, h/2, w/2, z], audio z_a [B, h/4, w/4, z]);
  * `FeatureInjector`: a perceptual latent -> one zero-initialised residual added after each of
    the U-Net's input blocks (12 in SD's layout; ControlNet-like), one resampling ResBlock + zero
    1x1 conv per block.

Layout is channels-last: video features are [B, T, H, W, C], images [B, H, W, C].

Limits / choices:
  * GroupNorm uses gcd(norm_groups, channels) groups (`layers.fitted_groups`), so that narrow
    layers (the 16-channel latent head) stay valid; the reference's 32-group norm over 16 channels
    cannot be built as written.
  * Resampling in the feature blocks is nearest-neighbour up / average-pool down (the reference's
    `Upsample`/`Downsample` without conv), applied to both branches of the residual block.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


from mmldm_jax.models import layers
from mmldm_jax.models.layers import ConvNd, FittedGroupNorm, FrameResBlock

Dtype = jnp.dtype


class SelfAttention(nn.Module):
  """GroupNorm -> multi-head self-attention over the sequence axis of [N, L, C] -> zero-initialised
  output projection -> residual. `head_channels` is the per-head width (the reference's
  num_head_channels); heads = C // head_channels."""
  head_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = x.shape[-1]
    if channels % self.head_channels:
      raise ValueError(f"attention width {channels} is not a multiple of head_channels "
                       f"{self.head_channels}")
    heads = channels // self.head_channels
    h = FittedGroupNorm(self.norm_groups, name="norm", **kw)(x)
    qkv = layers.Dense(3 * channels, kernel_axes=("embed", "heads"), name="qkv", **kw)(h)
    h = layers.dot_product_attention(*jnp.split(qkv, 3, axis=-1), num_heads=heads)
    return x + layers.Dense(channels, kernel_axes=("heads", "embed"), zero_init=True,
                            name="proj_out", **kw)(h)


class SpatialAttention(nn.Module):
  """Self-attention among the pixels of each frame ([B, T, H, W, C] or [B, H, W, C])."""
  head_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    attend = SelfAttention(self.head_channels, self.norm_groups, self.dtype, self.param_dtype)

    def frames(f):
      n, hgt, wid, ch = f.shape
      return attend(f.reshape(n, hgt * wid, ch)).reshape(f.shape)
    return layers.per_frame(frames, x)


class TemporalAttention(nn.Module):
  """Self-attention along T at each pixel of [B, T, H, W, C]; the norm's statistics are per pixel
  over (T, channel group), as in the reference's TemporalAttentionBlock."""
  head_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, t, hgt, wid, ch = x.shape
    seq = jnp.transpose(x, (0, 2, 3, 1, 4)).reshape(b * hgt * wid, t, ch)
    seq = SelfAttention(self.head_channels, self.norm_groups, self.dtype, self.param_dtype)(seq)
    return jnp.transpose(seq.reshape(b, hgt, wid, t, ch), (0, 3, 1, 2, 4))


class SpatioTemporalAttention(nn.Module):
  """Full self-attention over all T*H*W positions of [B, T, H, W, C]."""
  head_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    seq = SelfAttention(self.head_channels, self.norm_groups, self.dtype, self.param_dtype)(
        x.reshape(b, -1, x.shape[-1]))
    return seq.reshape(x.shape)


class PerceptualEncoder(nn.Module):
  """Encodes VAE latents into the posterior of a compact perceptual latent.

  Video (`video=True`): input [B, T, h, w, c] key-frame latents; a learnable content slot
  ([h, w, c], randn init) is prepended along T; 3-D input conv; per level `num_res_blocks`
  per-frame ResBlocks, each followed (at ds in `attention_resolutions`) by spatial then temporal
  self-attention; a 3-D stride-(1, 2, 2) conv between levels; a 3-D head gives the mean and a
  parallel head with a zero-initialised last conv gives the log-variance; only T-slot 0 (the
  content slot) is returned.
  Audio (`video=False`): input [B, h, w, c]; the learnable content tensor is concatenated on
  channels (2c in); 2-D convs; spatial attention only.

  Returns (mean, logvar), each [B, h / 2^(levels-1), w / 2^(levels-1), z_channels].

  Deviation: the log-variance is offset by `initial_logvar` (-6: std 0.05 at initialisation). The
  reference's zero-initialised branch starts at std 1, which buries the (small) initial mean in
  unit noise, so nothing downstream can tell clips apart until the variance has been learned
  (its KL weight, 1e-9 to 1e-6, exerts almost no pull either way).
  """
  z_channels: int
  model_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attention_resolutions: Sequence[int]
  head_channels: int
  video: bool
  norm_groups: int = 32
  initial_logvar: float = -6.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"   # config.autoencoder.remat_policy: ResBlocks and attention blocks
  # Video only. False (the reference): z is the content slot's output. True: no content slot;
  # each key frame's own output gets z_channels / T channels and z stacks them on channels, in
  # key-frame order, so that which part of z belongs to which moment is fixed by construction
  # rather than learned (see config.autoencoder.video_latent_per_key_frame).
  per_key_frame: bool = False

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    remat = lambda cls: layers.rematerialised(cls, self.remat, "autoencoder.remat_policy")
    key_frames = x.shape[1] if self.video else 1
    per_key_frame = self.video and self.per_key_frame
    if per_key_frame and self.z_channels % key_frames:
      raise ValueError(f"a per-key-frame video latent of {self.z_channels} channels cannot be "
                       f"split over {key_frames} key frames")
    if per_key_frame:
      h = x
    else:
      content = self.param("content", nn.with_logical_partitioning(
          nn.initializers.normal(1.0), (None, None, "conv_in")), x.shape[-3:], self.param_dtype)
      content = jnp.broadcast_to(content.astype(x.dtype), (x.shape[0],) + x.shape[-3:])
      if self.video:
        h = jnp.concatenate([content[:, None], x], axis=1)
      else:
        h = jnp.concatenate([x, content], axis=-1)
    h = ConvNd(self.model_channels, name="conv_in", **kw)(h)
    ds = 1
    for level, mult in enumerate(self.channel_mult):
      for index in range(self.num_res_blocks):
        h = remat(FrameResBlock)(mult * self.model_channels, self.norm_groups,
                                 name=f"res_{level}_{index}", **kw)(h)
        if ds in self.attention_resolutions:
          h = remat(SpatialAttention)(self.head_channels, self.norm_groups,
                                      name=f"spatial_attn_{level}_{index}", **kw)(h)
          if self.video:
            h = remat(TemporalAttention)(self.head_channels, self.norm_groups,
                                         name=f"temporal_attn_{level}_{index}", **kw)(h)
      if level != len(self.channel_mult) - 1:
        h = ConvNd(h.shape[-1], stride=2, name=f"down_{level}", **kw)(h)
        ds *= 2
    out_channels = self.z_channels // key_frames if per_key_frame else self.z_channels
    mean = self._head(h, out_channels, zero_last=False, name="mean_head")
    logvar = self._head(h, out_channels, zero_last=True, name="logvar_head") + self.initial_logvar
    if per_key_frame:   # [B, T, h, w, z/T] -> [B, h, w, T * z/T], key frame by key frame
      stack = lambda v: jnp.moveaxis(v, 1, -2).reshape(v.shape[:1] + v.shape[2:4] + (-1,))
      mean, logvar = stack(mean), stack(logvar)
    elif self.video:
      mean, logvar = mean[:, 0], logvar[:, 0]
    return mean, logvar

  def _head(self, h, out_channels: int, *, zero_last: bool, name: str):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ConvNd(out_channels, name=f"{name}_conv", **kw)(h)
    h = nn.silu(FittedGroupNorm(self.norm_groups, name=f"{name}_norm", **kw)(h))
    return ConvNd(out_channels, kernel=1, temporal_kernel=1, zero_init=zero_last,
                  name=f"{name}_out", **kw)(h)


class FeatureInjector(nn.Module):
  """Perceptual latent -> the residual features added after each U-Net input block.

  For block i (width `block_channels[i]`, downsample factor `block_factors[i]` relative to the VAE
  latent): a ResBlock from z's channels to that width, resampling from `latent_factor` (z's own
  downsample factor) to the block's factor, conditioned on `emb` when given (the video frame
  index embedding), then a zero-initialised 1x1 conv. At initialisation every output is zero.
  """
  block_channels: Sequence[int]
  block_factors: Sequence[int]
  latent_factor: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"   # config.autoencoder.remat_policy: the ResBlocks
  # Whether each ResBlock's second conv also starts at zero (the reference: SD's ResBlock). The
  # zero 1x1 conv after it already makes every output zero at initialisation; a second zero in
  # series leaves the block's own branch, the only path of the frame index, without gradient
  # until the 1x1 conv has grown.
  zero_init_block_out: bool = True

  @nn.compact
  def __call__(self, z, emb=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_cls = layers.rematerialised(FrameResBlock, self.remat, "autoencoder.remat_policy")
    features = []
    for index, (channels, factor) in enumerate(zip(self.block_channels, self.block_factors)):
      steps = int(round(math.log2(self.latent_factor / factor)))
      h = block_cls(channels, self.norm_groups, resample_steps=steps, name=f"block_{index}",
                    zero_init_out=self.zero_init_block_out, **kw)(z, emb)
      features.append(ConvNd(channels, kernel=1, zero_init=True, name=f"zero_conv_{index}",
                             **kw)(h))
    return features

