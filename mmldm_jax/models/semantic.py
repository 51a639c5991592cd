"""The shared semantic space of the multi-modal autoencoder (reference section 2.3).

  * `Projector`: a perceptual latent (z_v or z_a, given stop-gradient by the caller) -> a small map
    of `semantic_dim` features, read as tokens (2x2 = 4 tokens per modality at paper size).
  * `ClassificationHead`: both modalities' tokens -> class logits.
  * `ContrastiveHead`: per-modality pooled embeddings (L2-normalised) and two learnable
    temperatures (v2a, a2v, both initialised at 0.07) -> `info_nce`.

Choice where the reference code is missing: the reference's `projector_v8` is not in its
repository (the `projector.py` that is there pools to 1x1 and cannot feed the heads, which need a
map). Our projector is a small U-Net-encoder-like stack: 3x3 input conv to `model_channels`, per
level `num_res_blocks` ResBlocks each followed by spatial self-attention (the config says
attention at every level), a stride-2 conv between levels, and GroupNorm-SiLU-3x3 conv to
`semantic_dim`. With the paper's channel_mult of length 4 (video, 16x16 in) and 3 (audio, 8x8 in)
both end at 2x2, which matches the 2x2 token grids drawn in the paper's AutoEncoder figure.

The classification and contrastive heads follow the reference's `heads.py` (the configured
`heads_v11` is missing; `heads.py` is its closest available relative).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import optax

from mmldm_jax.models import layers
from mmldm_jax.models.layers import ConvNd, FittedGroupNorm, FrameResBlock
from mmldm_jax.models.perceptual import SpatialAttention

Dtype = jnp.dtype
MIN_TEMPERATURE = 0.01


class Projector(nn.Module):
  """Perceptual latent [B, h, w, z] -> semantic map [B, h / 2^(levels-1), w / ..., semantic_dim]."""
  semantic_dim: int
  model_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  head_channels: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat: str = "none"   # config.autoencoder.remat_policy: ResBlocks and attention blocks

  @nn.compact
  def __call__(self, z):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    remat = lambda cls: layers.rematerialised(cls, self.remat, "autoencoder.remat_policy")
    h = ConvNd(self.model_channels, name="conv_in", **kw)(z)
    for level, mult in enumerate(self.channel_mult):
      for index in range(self.num_res_blocks):
        h = remat(FrameResBlock)(mult * self.model_channels, self.norm_groups,
                                 name=f"res_{level}_{index}", **kw)(h)
        h = remat(SpatialAttention)(self.head_channels, self.norm_groups,
                                    name=f"attn_{level}_{index}", **kw)(h)
      if level != len(self.channel_mult) - 1:
        h = ConvNd(h.shape[-1], stride=2, name=f"down_{level}", **kw)(h)
    h = nn.silu(FittedGroupNorm(self.norm_groups, name="norm_out", **kw)(h))
    return ConvNd(self.semantic_dim, name="conv_out", **kw)(h)


def tokens(semantic_map):
  """[B, h, w, D] -> [B, h*w, D] (row-major)."""
  b, hgt, wid, dim = semantic_map.shape
  return semantic_map.reshape(b, hgt * wid, dim)


class ClassificationHead(nn.Module):
  """Per modality conv3x3-SiLU-conv3x3; the audio then video tokens are concatenated and go
  through Dense (the reference's 1x1 conv1d), GroupNorm, SiLU, mean over tokens, Dense to the
  class logits [B, num_classes]."""
  num_classes: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, video_map, audio_map):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dim = video_map.shape[-1]

    def branch(x, name):
      x = nn.silu(ConvNd(dim, name=f"{name}_conv1", **kw)(x))
      return tokens(ConvNd(dim, name=f"{name}_conv2", **kw)(x))
    h = jnp.concatenate([branch(audio_map, "audio"), branch(video_map, "video")], axis=1)
    h = layers.Dense(dim, kernel_axes=("embed", "mlp"), name="mix", **kw)(h)
    h = nn.silu(FittedGroupNorm(self.norm_groups, name="norm", **kw)(h))
    return layers.Dense(self.num_classes, kernel_axes=("mlp", "classes"), name="logits",
                        **kw)(jnp.mean(h, axis=1))


class ContrastiveHead(nn.Module):
  """Per modality conv3x3-GN-SiLU-conv3x3, global average pool, Dense to `contrastive_dim`,
  L2-normalise. Returns (video_embedding, audio_embedding, temperature_v2a, temperature_a2v)."""
  contrastive_dim: int
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, video_map, audio_map):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def branch(x, name):
      dim = x.shape[-1]
      x = ConvNd(dim, name=f"{name}_conv1", **kw)(x)
      x = nn.silu(FittedGroupNorm(self.norm_groups, name=f"{name}_norm", **kw)(x))
      x = jnp.mean(ConvNd(dim, name=f"{name}_conv2", **kw)(x), axis=(1, 2))
      x = layers.Dense(self.contrastive_dim, kernel_axes=("embed", "mlp"), name=f"{name}_proj",
                       **kw)(x)
      x = x.astype(jnp.float32)
      return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    def temperature(name):
      return self.param(name, nn.with_logical_partitioning(
          nn.initializers.constant(0.07), (None,)), (1,), self.param_dtype)[0]
    return (branch(video_map, "video"), branch(audio_map, "audio"),
            temperature("temperature_v2a"), temperature("temperature_a2v"))


def info_nce(video_embedding, audio_embedding, temperature_v2a, temperature_a2v):
  """Symmetric InfoNCE over the batch: row i of each modality is the positive of row i of the
  other; every other row is a negative. The logits are divided directly by the learnable
  temperatures, as in the reference, after the clamp described below.

  The reference all-gathers the embeddings across GPUs so the negatives come from the GLOBAL
  batch. Here the function sees whatever array it is given: under `jax.jit` with the batch sharded
  over devices (the project's training setup) the arrays ARE the global batch and XLA inserts the
  gathers, so no explicit collective is needed. Inside `shard_map`/`pmap` you would have to
  all-gather first.

  The temperatures are clamped at `MIN_TEMPERATURE` (0.01, CLIP's bound) before use. The reference
  divides by the raw parameters; under Adam a temperature falls by about lr per step while the pairs
  are ranked right, so it would cross zero (after ~700 steps at lr 1e-4) and flip every logit.

  Returns (loss, accuracy), where accuracy is the fraction of audio items whose most similar video
  is their own clip.
  """
  temperature_v2a = jnp.maximum(temperature_v2a, MIN_TEMPERATURE)
  temperature_a2v = jnp.maximum(temperature_a2v, MIN_TEMPERATURE)
  targets = jnp.arange(video_embedding.shape[0])
  similarity = video_embedding @ audio_embedding.T                  # [video, audio]
  logits_v2a = similarity / temperature_v2a
  logits_a2v = similarity.T / temperature_a2v
  loss = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits_a2v, targets).mean() +
                optax.softmax_cross_entropy_with_integer_labels(logits_v2a, targets).mean())
  accuracy = jnp.mean(jnp.argmax(logits_a2v, axis=-1) == targets)
  return loss, accuracy


def classification_loss(logits, labels):
  """Cross-entropy against integer labels, plus the accuracy."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)
