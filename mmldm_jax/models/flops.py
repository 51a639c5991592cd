"""Analytic FLOPs of the DiT generator, for the trainer's MFU figure.

Counts the matrix multiplications (2 FLOPs per multiply-add) and the two attention matmuls
(scores and weighted values); element-wise work (norms, GELU, softmax, modulation) is left out, so
XLA's `cost_analysis()['flops']`, which counts it, is a few percent higher at paper size. A training
step is about 3x the forward (backward = 2x forward); rematerialisation adds recomputed forward work
that this figure deliberately does not count (MFU convention).
"""
from __future__ import annotations

from mmldm_jax.models import dit as dit_lib


def _block_flops(tokens: int, width: int, mlp_width: int) -> int:
  projections = 2 * tokens * width * (3 * width + width + 2 * mlp_width)  # qkv, proj, fc1, fc2
  attention = 2 * 2 * tokens * tokens * width                             # q k^T and p v
  modulation = 2 * width * 6 * width                                      # adaLN (once per sample)
  return projections + attention + modulation


def dit_forward_flops(model: dit_lib.MMDiT, text_tokens: int | None = None) -> int:
  """Forward FLOPs per sample of `model` (an `MMDiT`)."""
  width, mlp_width = model.hidden_size, int(model.hidden_size * model.mlp_ratio)
  grids = {"audio": model.audio_shape, "video": model.video_shape}
  # Time-aligned tokens (`MMDiT.token_layout`) split the video latent's channels into one block
  # per key frame, each its own set of h*w tokens or one token (frame tokens).
  latent_tokens, channels = {}, {}
  for name in grids:
    latent_tokens[name], channels[name] = model.token_shape(name)
  context = text_tokens or model.context_tokens
  prev_context = sum(latent_tokens.values()) if model.continuation else 0
  tokens = context + prev_context + 2 + sum(latent_tokens.values())

  def embed_flops(in_channels: int) -> int:
    return sum(2 * latent_tokens[name] * in_channels[name] * width for name in grids)

  time_mlp = 2 * (256 * width + width * width)
  flops = (embed_flops(channels) * 2                                     # x and cond embedders
           + 2 * (context + prev_context) * model.context_dim * width   # c_embedder
           + time_mlp
           + model.depth * _block_flops(tokens, width, mlp_width)
           + sum(2 * width * 2 * width + 2 * latent_tokens[name] * width * channels[name]
                 for name in grids))                                     # final layers
  if model.continuation:
    flops += (sum(2 * latent_tokens[name] * channels[name] * model.context_dim for name in grids)
              + embed_flops({name: 2 * channels[name] for name in grids})
              + 2 * (context + prev_context) * model.context_dim * width + time_mlp
              + model.prev_depth * (_block_flops(tokens, width, mlp_width)
                                    + 2 * tokens * width * width))      # + zero_layer
  return int(flops)


def dit_flops_per_sample(config, training: bool = True) -> int:
  """FLOPs per sample of the configured DiT: 3x forward for a training step, else one forward."""
  forward = dit_forward_flops(dit_lib.build_dit(config))
  return 3 * forward if training else forward
