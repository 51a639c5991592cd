"""The hierarchical multi-modal autoencoder of MM-LDM (the released code's
`src/fm_ae/autoencoder_vid_aud_v13.py`).

Encoding: the frozen stage-0 VAE turns the key frames and the audio image into 4-channel latents;
`PerceptualEncoder`s turn those into compact perceptual latents (video z_v [B, h/2, w/2, 16] from
4 key frames, audio z_a [B, h/4, w/4, 16]), diagonal Gaussians trained with a KL term.
Decoding is a diffusion model: the SD-1.5-shaped U-Net regenerates each target frame's and the
audio image's VAE latent from noise, conditioned on the perceptual latents three ways:
  (a) ControlNet-like residuals after each U-Net input block (12 in SD's layout) (`FeatureInjector`;
      the video's are conditioned on the frame index embedding, sinusoidal -> MLP);
  (b) the flattened perceptual latent through an MLP, added to the timestep embedding;
  (c) cross-attention over [learnable modality prompt ; class token ; the OTHER modality's
      semantic tokens through an MLP]. The semantic tokens come from projectors over the
      stop-gradient perceptual latents, trained with classification and contrastive losses.
One U-Net pass handles cat[audio items (B), video target frames (B*K)] with independent timesteps.

Public API (all pure functions of parameter pytrees; jit them):
  `AutoencoderSystem(config)`: builds the modules and the noise schedule;
    `.init(rng)` -> {'autoencoder': ..., 'discriminator': ...} parameters (boxed with logical axes);
    `.generator_loss(params, disc_params, vae_params, batch, rng)` -> (loss, metrics);
    `.discriminator_loss(disc_params, params, vae_params, batch, rng)` -> (loss, metrics);
    `.encode(params, vae_params, batch)` -> (audio latent mode, video latent mode);
    `.decode(params, vae_params, audio_latent, video_latent, rng, labels=None, num_frames=None)`
        -> (frames [B, F, H, W, 3], audio image [B, H, W, 3]) in [-1, 1].
  The batch is the Grain pipeline's: key_frames [B, K, H, W, 3], target_frames [B, Kt, H, W, 3],
  target_indices [B, Kt] (index / num_frames), audio (waveform) [B, N], label [B].

Deliberate differences from the reference, and choices where its code is missing:
  * The U-Net's time-embedding MLP is TRAINED. The reference computes the timestep embedding under
    `torch.no_grad()` (a quirk: its time MLP never learns).
  * Zero initialisation: the reference zero-initialises the WHOLE content/context MLPs
    (Linear-SiLU-Linear). As silu(0) = 0 that leaves both weight matrices with zero gradient
    forever (only the last bias can move), so the other modality's semantic tokens and the
    flattened latent could never reach the decoder. We zero only the LAST Linear: the paths are
    still exactly zero at initialisation, and trainable.
  * The adversarial term reaches the generator through the (frozen but differentiable) VAE
    decoder: the x0 predictions are decoded with stop-gradient VAE parameters, not under
    no-grad. (In the reference this depends on a missing file; its visible `decode_first_stage`
    runs under no_grad, which would make the generator GAN term a constant.)
  * Class at inference (the reference's `heads_v11.predict` is missing): the class token uses the
    argmax of the classification head over the semantic tokens of the latents being decoded. With
    no classification head (autoencoder.classifier_head False) but classes configured, `decode` needs `labels`.
    With data.num_classes == 0 there is no class token and no head.
  * The encoders' log-variance starts at -6 (std 0.05) rather than 0 (std 1): see
    `perceptual.PerceptualEncoder`.
  * The contrastive temperatures are clamped at 0.01 where they are used (the reference divides by
    the raw parameters, which Adam drives through zero; see `semantic.info_nce`).
  * Contrastive negatives come from the GLOBAL batch: under jit with the batch sharded over the
    mesh the arrays are global, so no explicit all-gather is needed (see `semantic.info_nce`).
  * The discriminator sees only the two target frames it uses (first and last), so only those
    and the audio image are VAE-decoded (the reference decodes every target frame).
  * Unconditional branch for guidance at decode time: zero prompts and the perceptual latents
    (and hence residuals, content embeddings, semantic tokens) of encoding all-zero VAE latents,
    as the reference's `unconditional_version`; the class token is the conditional branch's.

Options that change the reference's decoder where a small model must learn fast (all off in the
paper configs; the demo turns them on). Measured on the demo's data (objects of radius 0.12, VAE of
800 steps): with the reference's content slot the decoded frames of a clip stayed identical
through 1000 autoencoder steps (`frame_order_accuracy` at its chance, 0.18) even with the other
three options and v-prediction; with `video_latent_per_key_frame` as well it read 0.33 at 500
steps and 0.50 at 1000:
  * `video_latent_per_key_frame`: z_v stacks each key frame's encoder output on channels instead
    of reading a content slot (see `perceptual.PerceptualEncoder`); which channels hold which
    moment is then fixed, and the decoder only has to learn to pick them by frame index.
  * `index_embed_scale`: the frame index f / F is scaled before its sinusoidal embedding (at 1,
    every frequency turns by under a radian across the clip).
  * `injector_double_zero_init=False`: one zero-initialised layer per injector path, not two in a
    row (the second starves the frame index of gradient).
  * `index_in_time_embedding`: the index also enters the U-Net's time embedding of video items.
  * `min_snr_gamma`: min-SNR weighting of the denoising loss.

Parameter count at paper size (configs/aist.py, 60 classes; jax.eval_shape): 1,328,112,130 in
the autoencoder (859.5 M of them the SD-1.5 U-Net) plus 5,376,545 in the discriminator; see
`PAPER_PARAMETER_COUNT`.

Memory: config.autoencoder.remat_policy rematerialises the ResBlocks and attention blocks of the
encoders, feature injectors and projectors, config.unet.remat_policy those of the U-Net (a
jax.checkpoint_policies name, or 'none'); neither changes the parameters or the function.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmldm_jax import config_lib
from mmldm_jax.data import audio as audio_lib
from mmldm_jax.diffusion import losses, samplers, schedules
from mmldm_jax.models import discriminator as disc_lib
from mmldm_jax.models import layers, perceptual, semantic
from mmldm_jax.models import unet as unet_lib
from mmldm_jax.models import vae as vae_lib

Array = jax.Array

# Trainable parameters at paper size (configs/aist.py, 60 classes), counted with jax.eval_shape and
# re-checked by `tests/test_autoencoder.py`: 1.328 B for the autoencoder, of which the SD-1.5 U-Net
# is 859.5 M, the two encoders 28.4 M (video) + 91.5 M (audio), the two feature injectors 112.2 M +
# 99.9 M, the projectors 45.4 M + 33.3 M, the heads 43.5 M; plus the discriminator's 5.4 M.
PAPER_PARAMETER_COUNT = 1_328_112_130
PAPER_DISCRIMINATOR_PARAMETER_COUNT = 5_376_545


class MultiModalAutoencoder(nn.Module):
  """All trainable parts except the discriminator. Methods (use `apply(..., method=...)`):
  `encode`, `semantics`, `heads`, `condition`, `denoise`; `__call__` runs them in a row (the
  training forward, also used by init)."""
  config: Any          # a FrozenConfigDict of the whole experiment config
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def setup(self):
    config, ae = self.config, self.config.autoencoder
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups = config.unet.norm_groups
    latent_size = config.data.image_size // config_lib.vae_factor(config)
    self.video_factor = config_lib.encoder_factor(config, "video")
    self.audio_factor = config_lib.encoder_factor(config, "audio")
    if latent_size % self.video_factor or latent_size % self.audio_factor:
      raise ValueError(f"config.data.image_size={config.data.image_size}: the {latent_size}-pixel "
                       f"VAE latent must be divisible by the encoders' downsampling "
                       f"{self.video_factor} (video) and {self.audio_factor} (audio)")

    def encoder(section, z_channels, video):
      return perceptual.PerceptualEncoder(
          z_channels=z_channels, model_channels=section.model_channels,
          channel_mult=tuple(section.channel_mult), num_res_blocks=section.num_res_blocks,
          attention_resolutions=tuple(section.attention_resolutions),
          head_channels=section.head_channels, video=video, norm_groups=groups,
          remat=ae.remat_policy, per_key_frame=video and ae.video_latent_per_key_frame, **kw)
    self.video_encoder = encoder(ae.video_encoder, ae.video_z_channels, True)
    self.audio_encoder = encoder(ae.audio_encoder, ae.audio_z_channels, False)

    geometry = unet_lib.input_block_geometry(config.unet)
    block_channels = [channels for channels, _ in geometry]
    block_factors = [factor for _, factor in geometry]
    self.video_features = perceptual.FeatureInjector(
        tuple(block_channels), tuple(block_factors), self.video_factor, groups,
        remat=ae.remat_policy, zero_init_block_out=ae.injector_double_zero_init, **kw)
    self.audio_features = perceptual.FeatureInjector(
        tuple(block_channels), tuple(block_factors), self.audio_factor, groups,
        remat=ae.remat_policy, zero_init_block_out=ae.injector_double_zero_init, **kw)
    self.index_embed = layers.TimestepEmbedding(4 * ae.index_embed_dim, **kw)
    if ae.index_in_time_embedding:
      self.index_to_time = layers.Dense(4 * config.unet.model_channels, kernel_axes=("mlp", "embed"),
                                        zero_init=True, **kw)

    def projector(section):
      return semantic.Projector(
          ae.semantic_dim, section.model_channels, tuple(section.channel_mult),
          section.num_res_blocks, section.head_channels, groups, remat=ae.remat_policy, **kw)
    self.video_projector = projector(ae.video_projector)
    self.audio_projector = projector(ae.audio_projector)
    if use_classifier(config):
      self.classifier = semantic.ClassificationHead(config.data.num_classes, groups, **kw)
    self.contrastive = semantic.ContrastiveHead(ae.contrastive_dim, groups, **kw)

    time_embed_dim = 4 * config.unet.model_channels
    self.video_content_mlp = ZeroOutMLP(time_embed_dim, time_embed_dim, **kw)
    self.audio_content_mlp = ZeroOutMLP(time_embed_dim, time_embed_dim, **kw)
    self.video_context_mlp = ZeroOutMLP(ae.semantic_dim, ae.semantic_dim, **kw)
    self.audio_context_mlp = ZeroOutMLP(ae.semantic_dim, ae.semantic_dim, **kw)
    prompt_init = nn.with_logical_partitioning(nn.initializers.normal(0.1), (None, "embed"))
    shape = (ae.prompt_tokens, ae.semantic_dim)
    self.video_prompt = self.param("video_prompt", prompt_init, shape, self.param_dtype)
    self.audio_prompt = self.param("audio_prompt", prompt_init, shape, self.param_dtype)
    if config.data.num_classes > 0:
      self.class_embed = nn.Embed(
          config.data.num_classes, ae.semantic_dim, param_dtype=self.param_dtype,
          embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                      ("classes", "embed")))
    self.unet = unet_lib.build_unet(config, dtype=self.dtype)

  # -------------------------------------------------------------------------------------------
  def encode(self, audio_latent, key_latents):
    """VAE latents -> (audio posterior, video posterior) as `vae.DiagonalGaussian`s.

    audio_latent [B, h, w, c]; key_latents [B, T, h, w, c]."""
    posteriors = []
    for enc, x in ((self.audio_encoder, audio_latent), (self.video_encoder, key_latents)):
      mean, logvar = enc(x)
      posteriors.append(vae_lib.DiagonalGaussian(
          mean=mean.astype(jnp.float32),
          logvar=jnp.clip(logvar.astype(jnp.float32), -30.0, 20.0)))
    return tuple(posteriors)

  def semantics(self, z_audio, z_video):
    """Projector maps of the stop-gradient latents: (audio map, video map) [B, 2, 2, D]-like."""
    return (self.audio_projector(jax.lax.stop_gradient(z_audio)),
            self.video_projector(jax.lax.stop_gradient(z_video)))

  def heads(self, audio_map, video_map):
    """(class logits or None, contrastive outputs (video emb, audio emb, t_v2a, t_a2v))."""
    logits = self.classifier(video_map, audio_map) if use_classifier(self.config) else None
    return logits, self.contrastive(video_map, audio_map)

  def condition(self, z_audio, z_video, frame_index, labels, keep_audio_prompt,
                keep_video_prompt, semantic_maps=None):
    """Everything the decoder needs, as a pytree whose leaves lead with the batch B.

    frame_index [B, F] floats in [0, 1); labels int [B] (ignored without classes);
    keep_*_prompt [B] in {0, 1} (0 zeroes that item's prompt: the CFG-dropped branch).
    Video leaves are [B, F, ...] (one entry per decoded frame)."""
    batch, frames = frame_index.shape
    ae = self.config.autoencoder
    if semantic_maps is None:
      semantic_maps = self.semantics(z_audio, z_video)
    audio_tokens, video_tokens = (semantic.tokens(m) for m in semantic_maps)
    if audio_tokens.shape[1] != video_tokens.shape[1]:
      raise ValueError(
          f"the projectors give {audio_tokens.shape[1]} audio and {video_tokens.shape[1]} video "
          f"semantic tokens; config.autoencoder.{{audio,video}}_projector.channel_mult must bring "
          f"z_a and z_v to the same grid")
    # (c) cross-attention context: prompt ; class ; other modality's tokens.
    prompt_a = self.audio_prompt[None].astype(self.dtype) * keep_audio_prompt[:, None, None]
    prompt_v = self.video_prompt[None].astype(self.dtype) * keep_video_prompt[:, None, None]
    context_a = [jnp.broadcast_to(prompt_a, (batch,) + prompt_a.shape[1:])]
    context_v = [jnp.broadcast_to(prompt_v, (batch,) + prompt_v.shape[1:])]
    if self.config.data.num_classes > 0:
      class_token = self.class_embed(labels)[:, None].astype(self.dtype)
      context_a.append(class_token)
      context_v.append(class_token)
    context_a.append(self.audio_context_mlp(video_tokens))
    context_v.append(self.video_context_mlp(audio_tokens))
    context_a = jnp.concatenate(context_a, axis=1)
    context_v = jnp.concatenate(context_v, axis=1)
    # (b) content embeddings added to the timestep embedding.
    emb_a = self.audio_content_mlp(z_audio.reshape(batch, -1))
    emb_v = self.video_content_mlp(z_video.reshape(batch, -1))
    # (a) input-block residuals; video: z_v repeated per frame, conditioned on the frame index.
    index_emb = self.index_embed(layers.timestep_embedding(
        frame_index.reshape(-1) * ae.index_embed_scale, ae.index_embed_dim))
    z_frames = jnp.repeat(z_video, frames, axis=0)
    res_v = self.video_features(z_frames.astype(self.dtype), index_emb)
    res_v = [r.reshape((batch, frames) + r.shape[1:]) for r in res_v]
    res_a = self.audio_features(z_audio.astype(self.dtype))
    per_frame = lambda x: jnp.broadcast_to(x[:, None], (batch, frames) + x.shape[1:])
    emb_v = per_frame(emb_v)
    if ae.index_in_time_embedding:   # the U-Net's every ResBlock learns which frame it draws
      emb_v = emb_v + self.index_to_time(index_emb).reshape(emb_v.shape)
    return dict(audio=dict(context=context_a, embedding=emb_a, residuals=res_a),
                video=dict(context=per_frame(context_v), embedding=emb_v, residuals=res_v))

  def denoise(self, x, t, cond):
    """One U-Net pass over cat[audio (B), video frames (B*F)].

    x: {'audio': [B, h, w, c], 'video': [B, F, h, w, c]}; t: {'audio': [B], 'video': [B, F]};
    cond: from `condition`. Returns the U-Net outputs in the same layout as x."""
    batch, frames = x["video"].shape[:2]
    flat = lambda v: v.reshape((batch * frames,) + v.shape[2:])
    join = lambda a, v: jnp.concatenate([a, flat(v)], axis=0)
    audio, video = cond["audio"], cond["video"]
    out = self.unet(
        join(x["audio"], x["video"]), join(t["audio"], t["video"]),
        join(audio["context"], video["context"]),
        input_residuals=[join(a, v) for a, v in zip(audio["residuals"], video["residuals"])],
        extra_embedding=join(audio["embedding"], video["embedding"]))
    return dict(audio=out[:batch], video=out[batch:].reshape(x["video"].shape))

  def __call__(self, audio_latent, key_latents, x_noisy, t, frame_index, labels,
               keep_audio_prompt, keep_video_prompt, sample_rng=None):
    """The training forward: posteriors, latents (sampled with `sample_rng`, else the mode),
    heads and the U-Net output. Returns a dict of everything the losses need."""
    audio_post, video_post = self.encode(audio_latent, key_latents)
    if sample_rng is None:
      z_audio, z_video = audio_post.mode(), video_post.mode()
    else:
      rng_a, rng_v = jax.random.split(sample_rng)
      z_audio, z_video = audio_post.sample(rng_a), video_post.sample(rng_v)
    maps = self.semantics(z_audio, z_video)
    class_logits, contrast = self.heads(*maps)
    cond = self.condition(z_audio, z_video, frame_index, labels, keep_audio_prompt,
                          keep_video_prompt, semantic_maps=maps)
    return dict(output=self.denoise(x_noisy, t, cond), kl_audio=audio_post.kl(),
                kl_video=video_post.kl(), class_logits=class_logits, contrast=contrast)


class ZeroOutMLP(nn.Module):
  """Linear -> SiLU -> Linear with the LAST Linear zero-initialised (output 0 at init, trainable;
  see the module docstring for why not the reference's fully zeroed MLP)."""
  hidden: int
  features: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Dense(self.hidden, kernel_axes=("embed", "mlp"), name="linear_1", **kw)(x)
    return layers.Dense(self.features, kernel_axes=("mlp", "embed"), zero_init=True,
                        name="linear_2", **kw)(nn.silu(h))


def use_classifier(config) -> bool:
  """The classification head exists when config.autoencoder.classifier_head is set and classes
  are configured (config_lib.validate: cls_weight > 0 needs the head)."""
  return config.data.num_classes > 0 and bool(config.autoencoder.classifier_head)


class AutoencoderSystem:
  """The autoencoder, its discriminator, the frozen VAE and the noise schedule, with the pure
  training losses and the encode / decode functions (see the module docstring)."""

  def __init__(self, config, dtype=jnp.float32):
    if config.audio.image_size != config.data.image_size:
      raise ValueError(
          f"config.audio.image_size={config.audio.image_size} must equal config.data.image_size="
          f"{config.data.image_size}: the audio image and the frames share the VAE batch and the "
          f"discriminator's 3-frame stack")
    if config.unet.context_dim != config.autoencoder.semantic_dim:
      raise ValueError(f"config.unet.context_dim={config.unet.context_dim}: expected "
                       f"config.autoencoder.semantic_dim={config.autoencoder.semantic_dim} (the "
                       f"decoder cross-attends to semantic tokens)")
    self.config = ml_collections.FrozenConfigDict(config)
    self.model = MultiModalAutoencoder(self.config, dtype=dtype)
    self.vae = vae_lib.build_vae(config, dtype=dtype)
    self.discriminator = disc_lib.discriminator_from_config(config, dtype=dtype)
    self.schedule = schedules.make_schedule(config.diffusion)
    self.latent_size = config.data.image_size // config_lib.vae_factor(config)
    self.latent_channels = config.vae.embed_dim
    self._decode_jit = jax.jit(self._decode, static_argnames=("num_frames",))
    self._init_jit = jax.jit(self._init)

  # -------------------------------------------------------------------------------------------
  # Initialisation

  def _latent(self, *lead):
    return jnp.zeros(lead + (self.latent_size, self.latent_size, self.latent_channels))

  def init(self, rng) -> dict:
    """Fresh parameters {'autoencoder': ..., 'discriminator': ...} (LogicallyPartitioned boxes;
    `flax.linen.unbox` them, or map them to shardings with the config's rule table). Jitted;
    use `jax.eval_shape(system.init, rng)` for shapes only."""
    return self._init_jit(rng)

  def _init(self, rng) -> dict:
    data = self.config.data
    batch, keys, targets = 1, len(data.key_frames), data.num_target_frames
    ae_rng, disc_rng = jax.random.split(rng)
    ae_vars = self.model.init(
        ae_rng, self._latent(batch), self._latent(batch, keys),
        dict(audio=self._latent(batch), video=self._latent(batch, targets)),
        dict(audio=jnp.zeros((batch,), jnp.int32), video=jnp.zeros((batch, targets), jnp.int32)),
        jnp.zeros((batch, targets)), jnp.zeros((batch,), jnp.int32), jnp.ones((batch,)),
        jnp.ones((batch,)))
    size = data.image_size
    disc_vars = self.discriminator.init(disc_rng, jnp.zeros((batch, 3, size, size, 3)))
    return dict(autoencoder=ae_vars["params"], discriminator=disc_vars["params"])

  # -------------------------------------------------------------------------------------------
  # Shared forward

  def _vae_encode(self, vae_params, images, rng):
    return jax.lax.stop_gradient(self.vae.apply(
        {"params": jax.lax.stop_gradient(vae_params)}, images, rng, method="encode_scaled"))

  def _vae_decode(self, vae_params, latents):
    """Differentiable in `latents`; the VAE parameters stay frozen."""
    return self.vae.apply({"params": jax.lax.stop_gradient(vae_params)}, latents,
                          method="decode_scaled")

  def batch_latents(self, vae_params, batch, rng):
    """The batch's VAE latents (posterior samples times scale_factor), no gradient:
    {'audio': [B, h, w, c], 'keys': [B, K, h, w, c], 'targets': [B, Kt, h, w, c]}.
    From pixels (key_frames, target_frames, audio), or from the posterior moments of
    `train/posterior_cache.py` (key_moments, target_moments, audio_moments); with the same `rng`
    both draw the same sample."""
    if "key_moments" in batch:
      return self._cached_latents(batch, rng)
    audio_image = audio_lib.waveform_to_image(batch["audio"], self.config.audio)
    keys, targets = batch["key_frames"], batch["target_frames"]
    b, k, kt = keys.shape[0], keys.shape[1], targets.shape[1]
    frame_shape = keys.shape[2:]
    if audio_image.shape[1:] != frame_shape or targets.shape[2:] != frame_shape:
      raise ValueError(f"batch: audio image {audio_image.shape[1:]}, key_frames {frame_shape} and "
                       f"target_frames {targets.shape[2:]} must share one [H, W, 3] shape")
    images = jnp.concatenate([audio_image, keys.reshape((b * k,) + frame_shape),
                              targets.reshape((b * kt,) + frame_shape)], axis=0)
    z = self._vae_encode(vae_params, images.astype(jnp.float32), rng)
    return dict(audio=z[:b], keys=z[b:b + b * k].reshape((b, k) + z.shape[1:]),
                targets=z[b + b * k:].reshape((b, kt) + z.shape[1:]))

  def _cached_latents(self, batch, rng):
    keys, targets = batch["key_moments"], batch["target_moments"]
    b, k, kt = keys.shape[0], keys.shape[1], targets.shape[1]
    moments_shape = keys.shape[2:]
    moments = jnp.concatenate([batch["audio_moments"], keys.reshape((b * k,) + moments_shape),
                               targets.reshape((b * kt,) + moments_shape)], axis=0)
    posterior = vae_lib.DiagonalGaussian.from_moments(moments.astype(jnp.float32))
    z = posterior.sample(rng) * self.vae.scale_factor
    return dict(audio=z[:b], keys=z[b:b + b * k].reshape((b, k) + z.shape[1:]),
                targets=z[b + b * k:].reshape((b, kt) + z.shape[1:]))

  def _labels(self, batch, size):
    if self.config.data.num_classes > 0:
      return batch["label"].astype(jnp.int32)
    return jnp.zeros((size,), jnp.int32)

  def _forward(self, params, vae_params, batch, rng):
    """Latents, CFG dropout, noising and the model forward; returns what the losses need."""
    vae_rng, drop_rng, sample_rng, t_rng, noise_rng = jax.random.split(rng, 5)
    latents = self.batch_latents(vae_params, batch, vae_rng)
    b, kt = latents["targets"].shape[:2]
    # CFG dropout: per sample, separately per modality, zero the prompt AND the encoder input.
    keep_audio, keep_video = (jax.random.uniform(drop_rng, (2, b)) >=
                              self.config.autoencoder.cfg_dropout).astype(jnp.float32)
    audio_in = latents["audio"] * keep_audio[:, None, None, None]
    keys_in = latents["keys"] * keep_video[:, None, None, None, None]
    x0 = dict(audio=latents["audio"], video=latents["targets"])
    num_t = self.schedule.num_timesteps
    t_audio_rng, t_video_rng = jax.random.split(t_rng)
    t = dict(audio=jax.random.randint(t_audio_rng, (b,), 0, num_t, jnp.int32),
             video=jax.random.randint(t_video_rng, (b, kt), 0, num_t, jnp.int32))
    noise_a, noise_v = jax.random.split(noise_rng)
    noise = dict(audio=jax.random.normal(noise_a, x0["audio"].shape),
                 video=jax.random.normal(noise_v, x0["video"].shape))
    x_noisy = {m: schedules.q_sample(self.schedule, x0[m], t[m], noise[m]) for m in x0}
    out = self.model.apply(
        {"params": params}, audio_in, keys_in, x_noisy, t,
        batch["target_indices"].astype(jnp.float32), self._labels(batch, b), keep_audio,
        keep_video, sample_rng)
    prediction = self.config.diffusion.prediction
    x0_pred = {m: schedules.output_to_x0_eps(x_noisy[m], out["output"][m],
                                             self.schedule.alphas_cumprod[t[m]], prediction)[0]
               for m in x0}
    return dict(latents=latents, x0=x0, noise=noise, t=t, x0_pred=x0_pred, **out)

  def _triple_images(self, vae_params, audio_latent, target_latents):
    """VAE-decodes the audio latent and the first and last target frames:
    (audio image [B, H, W, 3], frames [B, 2, H, W, 3])."""
    b = audio_latent.shape[0]
    ends = jnp.stack([target_latents[:, 0], target_latents[:, -1]], axis=1)
    images = self._vae_decode(vae_params, jnp.concatenate(
        [audio_latent, ends.reshape((2 * b,) + ends.shape[2:])], axis=0))
    return images[:b], images[b:].reshape((b, 2) + images.shape[1:])

  # -------------------------------------------------------------------------------------------
  # Losses

  def generator_loss(self, params, disc_params, vae_params, batch, rng):
    """Total autoencoder loss (differentiate w.r.t. `params`; the discriminator and VAE
    parameters are stop-gradient here):
      eps-MSE(audio) + eps-MSE(video) + kl_weight * (KL_a + KL_v) + cls_weight * CE
      + contrastive_weight * InfoNCE + gan_weight * relu(1 - D(fake triple)).
    Returns (loss, metrics)."""
    ae = self.config.autoencoder
    f = self._forward(params, vae_params, batch, rng)
    mse = losses.modality_losses(self.schedule, f["x0"], f["noise"], f["t"], f["output"],
                                 self.config.diffusion.prediction, ae.min_snr_gamma)
    kl_audio, kl_video = jnp.mean(f["kl_audio"]), jnp.mean(f["kl_video"])
    contrastive, contrastive_acc = semantic.info_nce(*f["contrast"])
    loss = (mse["audio"] + mse["video"] + ae.kl_weight * (kl_audio + kl_video)
            + ae.contrastive_weight * contrastive)
    metrics = dict(loss_audio=mse["audio"], loss_video=mse["video"], kl_audio=kl_audio,
                   kl_video=kl_video, contrastive_loss=contrastive,
                   contrastive_accuracy=contrastive_acc,
                   temperature_v2a=f["contrast"][2], temperature_a2v=f["contrast"][3])
    if f["class_logits"] is not None:
      cls_loss, cls_acc = semantic.classification_loss(
          f["class_logits"], self._labels(batch, f["class_logits"].shape[0]))
      loss = loss + ae.cls_weight * cls_loss
      metrics.update(class_loss=cls_loss, class_accuracy=cls_acc)
    if ae.gan_weight > 0:
      fake_audio, fake_frames = self._triple_images(vae_params, f["x0_pred"]["audio"],
                                                    f["x0_pred"]["video"])
      logits = self.discriminator.apply({"params": jax.lax.stop_gradient(disc_params)},
                                        disc_lib.generator_triples(fake_audio, fake_frames))
      gan = disc_lib.generator_hinge_loss(logits)
      loss = loss + ae.gan_weight * gan
      metrics.update(generator_gan_loss=gan)
    metrics["loss"] = loss
    return loss, metrics

  def discriminator_loss(self, disc_params, params, vae_params, batch, rng):
    """Hinge loss of the discriminator on the real triple (label real) and the four kinds of
    negatives (label fake), from a fresh autoencoder forward with stop-gradient `params`.
    Differentiate w.r.t. `disc_params`. Returns (loss, metrics)."""
    f = self._forward(jax.lax.stop_gradient(params), vae_params, batch, rng)
    fake_audio, fake_frames = jax.lax.stop_gradient(self._triple_images(
        vae_params, f["x0_pred"]["audio"], f["x0_pred"]["video"]))
    real_audio, real_frames = jax.lax.stop_gradient(self._triple_images(
        vae_params, f["x0"]["audio"], f["x0"]["video"]))
    real, fakes = disc_lib.discriminator_triples(real_audio, real_frames, fake_audio, fake_frames)
    logits = self.discriminator.apply({"params": disc_params},
                                      jnp.concatenate([real, fakes], axis=0))
    b = real.shape[0]
    loss = disc_lib.discriminator_hinge_loss(logits[:b], logits[b:])
    return loss, dict(discriminator_loss=loss, real_logit=jnp.mean(logits[:b]),
                      fake_logit=jnp.mean(logits[b:]))

  # -------------------------------------------------------------------------------------------
  # Encode / decode

  def encode(self, params, vae_params, batch):
    """The perceptual latents' posterior modes for the `latents` stage:
    (audio latent [B, h/4, w/4, z], video latent [B, h/2, w/2, z]). The VAE also uses its
    posterior mode here (deterministic latents for the generator)."""
    audio_image = audio_lib.waveform_to_image(batch["audio"], self.config.audio)
    keys = batch["key_frames"]
    b, k = keys.shape[:2]
    images = jnp.concatenate([audio_image, keys.reshape((b * k,) + keys.shape[2:])], axis=0)
    z = self.vae.apply({"params": vae_params}, images.astype(jnp.float32), None,
                       method="encode_scaled")
    audio_post, video_post = self.model.apply(
        {"params": params}, z[:b], z[b:].reshape((b, k) + z.shape[1:]), method="encode")
    return audio_post.mode(), video_post.mode()

  def decode(self, params, vae_params, audio_latent, video_latent, rng, labels=None,
             num_frames=None):
    """Perceptual latents -> (frames [B, F, H, W, 3], audio image [B, H, W, 3]) in [-1, 1].

    DDIM with `config.autoencoder.decode_steps` steps (eta 0) and classifier-free guidance
    (`decode_guidance_audio` / `decode_guidance_video`); F = num_frames (default
    config.data.num_frames) frames at indices f / F, all decoded in one batch per step."""
    return self._decode_jit(params, vae_params, audio_latent, video_latent, rng, labels,
                            num_frames=int(num_frames or self.config.data.num_frames))

  def lower_decode(self, params, vae_params, audio_latent, video_latent, rng, labels=None,
                   num_frames=None):
    """`decode`'s program lowered for these arguments (arrays, or `jax.ShapeDtypeStruct`s with
    shardings) to compile ahead of time (`sampling.Chain.compile_ahead`). The compiled program
    takes (params, vae_params, audio_latent, video_latent, rng, labels)."""
    return self._decode_jit.lower(params, vae_params, audio_latent, video_latent, rng, labels,
                                  num_frames=int(num_frames or self.config.data.num_frames))

  def _decode(self, params, vae_params, audio_latent, video_latent, rng, labels, *, num_frames):
    ae = self.config.autoencoder
    b = audio_latent.shape[0]
    apply = functools.partial(self.model.apply, {"params": params})
    index = jnp.broadcast_to(jnp.arange(num_frames, dtype=jnp.float32) / num_frames,
                             (b, num_frames))
    maps = apply(audio_latent, video_latent, method="semantics")
    if self.config.data.num_classes > 0 and labels is None:
      if not use_classifier(self.config):
        raise ValueError("decode: the decoder has a class token but no classification head "
                         "(config.autoencoder.classifier_head=False); pass `labels`")
      labels = jnp.argmax(apply(*maps, method="heads")[0], axis=-1)
    labels = jnp.zeros((b,), jnp.int32) if labels is None else labels.astype(jnp.int32)
    ones, zeros = jnp.ones((b,)), jnp.zeros((b,))
    cond = apply(audio_latent, video_latent, index, labels, ones, ones, maps, method="condition")
    # Unconditional branch: zero prompts + the latents of encoding all-zero inputs.
    keys = len(self.config.data.key_frames)
    null_audio, null_video = apply(self._latent(b), self._latent(b, keys), method="encode")
    uncond = apply(null_audio.mode(), null_video.mode(), index, labels, zeros, zeros,
                   method="condition")

    def model_fn(x, t, c):
      frames_t = jnp.broadcast_to(t[:, None], (t.shape[0], num_frames))
      return apply(x, dict(audio=t, video=frames_t), c, method="denoise")
    noise_rng, sample_rng = jax.random.split(rng)
    x_init = samplers.initial_noise(noise_rng, dict(
        audio=self._latent(b).shape, video=self._latent(b, num_frames).shape))
    if ae.decode_shared_frame_noise:
      x_init["video"] = jnp.broadcast_to(x_init["video"][:, :1], x_init["video"].shape)
    x = samplers.ddim_sample(
        model_fn, self.schedule, x_init, sample_rng, steps=ae.decode_steps, eta=0.0, cond=cond,
        uncond=uncond, guidance=dict(audio=ae.decode_guidance_audio,
                                     video=ae.decode_guidance_video),
        prediction=self.config.diffusion.prediction)
    latents = jnp.concatenate([x["audio"], x["video"].reshape((b * num_frames,) +
                                                              x["video"].shape[2:])], axis=0)
    images = self._vae_decode(vae_params, latents)
    return images[b:].reshape((b, num_frames) + images.shape[1:]), images[:b]


def parameter_count(tree) -> int:
  """Number of scalars in a (possibly boxed / abstract) parameter pytree."""
  leaves = jax.tree_util.tree_leaves(nn.unbox(tree))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))
