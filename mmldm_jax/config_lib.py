"""Shared pieces of the experiment configs in `configs/`.

Every config file in `configs/` builds on `base_config()`: the paper-size model (MM-LDM, Sun et al.,
ACM Multimedia 2024, sized as its released code; "reference" below means that code) with one section
per concern. Dataset configs change the data section and the per-dataset loss weights; presets after
a colon (`configs/aist.py:tiny`) shrink the model for tests.

Sections (each a `ConfigDict`):
  data         clip geometry, frame selection, where the records live
  audio        waveform -> log-mel -> audio image
  synthetic    the procedural sounding-video dataset (the embedded default)
  vae          stage-0 image VAE (Stable-Diffusion KL-f8) and its training loss
  unet         the SD-1.5-shaped U-Net of the autoencoder's diffusion decoder
  autoencoder  the hierarchical multi-modal autoencoder (encoders, projectors, heads, discriminator)
  diffusion    noise schedule and prediction target
  dit          the joint audio-video DiT generator
  sample       generation (sampler, steps, guidance)
  train_*      optimisation per training stage (vae, autoencoder, generator)
  mesh         device mesh and logical-axis rules
"""
from __future__ import annotations

import ast
import json
import math
import os
from typing import Any

import ml_collections
from absl import logging

from mmldm_jax import workdir as workdir_lib

ConfigDict = ml_collections.ConfigDict

# Stages `main` knows, in the order they run.
ALL_STAGES = ("data", "vae", "autoencoder", "latents", "generator", "sample", "evaluate")
# What `config.sample.mode` may be (stages/sample.py documents each).
SAMPLE_MODES = ("joint", "a2v", "v2a", "continuation", "reconstruction")
# How joint samples are drawn (`models.dit.sample_latents`).
JOINT_ORDERS = ("together", "video_first", "audio_first")
# What the unconditional branch of a2v / v2a guidance drops (`models.dit.sample_latents`).
GUIDANCE_DROPS = ("context", "given")


def parse_preset(arg: str | None, known: tuple[str, ...] = ("tiny",)) -> dict[str, Any]:
  """Parses the text after the colon: `tiny`, `tiny,steps=10` -> {'tiny': True, 'steps': 10}.

  A key not in `known` (the presets the config file reads) is refused, naming the known ones: a
  typo such as `aist.py:tny` would otherwise load the paper-size models without a word."""
  result: dict[str, Any] = {}
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    if "=" in item:
      key, value = item.split("=", 1)
      try:
        result[key.strip()] = ast.literal_eval(value.strip())
      except (ValueError, SyntaxError):
        result[key.strip()] = value.strip()
    else:
      result[item] = True
  unknown = sorted(set(result) - set(known))
  if unknown:
    raise ValueError(f"config preset {', '.join(map(repr, unknown))} is not known: expected a "
                     f"comma-separated subset of {', '.join(known)} (as in configs/aist.py:tiny)")
  return result


def data_config() -> ConfigDict:
  return ConfigDict(dict(
      source="records",          # 'records' (ingested ArrayRecord shards) or 'synthetic'
      data_dir="",               # folder with the shards and index.json ('' = <workdir>/data for synthetic)
      num_frames=16,             # frames per clip
      fps=10.0,                  # frames per second the clip is sampled at
      image_size=256,            # frames are letterboxed to image_size x image_size
      max_video_seconds=600.0,   # ingestion rejects a file whose frame times span longer (a
                                 # timestamp jump would otherwise fill memory with held frames)
      key_frames=(0, 5, 10, 15),  # encoder input frames (reference: [0,5,10,15])
      num_target_frames=2,       # decoder targets per clip, drawn with replacement and sorted
      hflip_prob=0.5,            # horizontal flip probability (autoencoder training)
      generator_hflip_prob=0.0,  # horizontal flip when writing the generator's latents
      num_classes=0,             # 0 = no class labels
      shuffle_seed=0,
      worker_count=0,            # Grain worker processes (0 = in the main process)
      prefetch_buffer_size=4,
  ))


def audio_config() -> ConfigDict:
  return ConfigDict(dict(
      sample_rate=44100,              # waveform rate stored in the records
      filterbank_sample_rate=22050,   # rate the mel filterbank is built for (the reference's quirk)
      n_fft=1024,
      hop_length=256,
      win_length=1024,
      num_mels=80,
      fmin=0.0,
      fmax=8000.0,
      image_size=256,                 # the audio image is image_size x image_size x 3
      griffin_lim_iters=32,
  ))


def synthetic_config() -> ConfigDict:
  return ConfigDict(dict(
      num_train_videos=64,
      num_validation_videos=8,
      num_heldout_videos=8,
      video_seconds=3.2,          # length of each generated video (clips are cut from it)
      num_classes=4,              # scene classes (background look and sound)
      max_objects=2,
      seed=0,
      videos_per_shard=16,
      events_per_second=1.6,      # wall hits per second (all objects together)
      min_event_gap_seconds=0.45,  # any two hits at least this far apart (and >= 2.5 frames)
      object_radius=0.08,         # object radius as a fraction of the frame size
  ))


def vae_config() -> ConfigDict:
  return ConfigDict(dict(
      in_channels=3,
      channels=128,
      channel_mult=(1, 2, 4, 4),
      num_res_blocks=2,
      z_channels=4,
      embed_dim=4,
      double_z=True,
      norm_groups=32,
      scale_factor=0.18215,         # latents are z * scale_factor in every later stage (SD's)
      # True: the `vae` stage measures 1 / std of its latents when it finishes (LDM's scale_by_std)
      # into <workdir>/vae/scale_factor.json, and the stages that use the VAE read it from there.
      # For a VAE trained from scratch, whose latents are far from SD's scale.
      measure_scale_factor=False,
      pretrained_path="",           # SD VAE weights (diffusers or CompVis format); '' = random init
      # Stage-0 loss (reference: LPIPSWithDiscriminator, encoder frozen).
      kl_weight=1e-6,
      # Pixel term: 'l1' (LDM's) or 'l2'. Trained from scratch without LPIPS, L1 never rendered the
      # synthetic data's small objects, even overfitting one batch (object pixels stayed background,
      # L1 0.74 after 200 steps); squared error drew them (0.16, PSNR 21 -> 30 dB).
      pixel_loss="l1",
      disc_weight=0.5,              # 0 = no discriminator (no parameters, no update)
      disc_start=10001,
      disc_channels=64,
      disc_layers=3,
      lpips_path="",                # LPIPS weights file; '' = no perceptual term
      perceptual_weight=1.0,
      freeze_encoder=True,
      # How many of each clip's `data.num_target_frames` frames the vae stage trains on beside the
      # clip's audio image; 0 = all. 1 gives audio images half of every batch (a third with 2
      # target frames) at two thirds of the step's cost. The first ones are taken, and the targets
      # are sorted draws, so earlier frames of a clip are seen somewhat more often.
      frames_per_clip=0,
  ))


def unet_config() -> ConfigDict:
  return ConfigDict(dict(
      in_channels=4,
      out_channels=4,
      model_channels=320,
      channel_mult=(1, 2, 4, 4),
      num_res_blocks=2,
      attention_resolutions=(4, 2, 1),
      num_heads=8,
      transformer_depth=1,
      context_dim=768,
      norm_groups=32,
      pretrained_path="",           # SD-1.5 U-Net weights; '' = random init
      remat_policy="none",          # ResBlocks/transformers: a jax.checkpoint_policies name, or 'none'
  ))


def autoencoder_config() -> ConfigDict:
  return ConfigDict(dict(
      video_z_channels=16,          # z_v: 16 x (latent/2) x (latent/2)
      audio_z_channels=16,          # z_a: 16 x (latent/4) x (latent/4)
      video_encoder=ConfigDict(dict(
          model_channels=320, channel_mult=(1, 2), num_res_blocks=2,
          attention_resolutions=(1, 2), head_channels=64)),
      audio_encoder=ConfigDict(dict(
          model_channels=320, channel_mult=(1, 2, 4), num_res_blocks=2,
          attention_resolutions=(1, 2, 4), head_channels=64)),
      video_projector=ConfigDict(dict(
          model_channels=128, channel_mult=(1, 2, 4, 4), num_res_blocks=3, head_channels=32)),
      audio_projector=ConfigDict(dict(
          model_channels=128, channel_mult=(1, 2, 4), num_res_blocks=4, head_channels=32)),
      semantic_dim=768,             # width of the semantic tokens
      contrastive_dim=256,
      prompt_tokens=77,             # learnable per-modality prompt length
      index_embed_dim=320,          # sinusoidal frame-index embedding width
      # The frame index (f / num_frames, in [0, 1)) is multiplied by this before its sinusoidal
      # embedding. 1.0 is the reference: every frequency of a 10000-period embedding then turns
      # by at most one radian across the clip, so neighbouring frames get nearly equal codes.
      index_embed_scale=1.0,
      # Min-SNR-gamma weighting of the decoder's denoising loss (`diffusion.losses.min_snr_weights`);
      # 0 = plain MSE on eps or v (the reference).
      min_snr_gamma=0.0,
      # The feature injectors' ResBlocks zero-initialise their second conv as well as the 1x1 conv
      # after them (the reference). False: only the 1x1 conv starts at zero (outputs are still
      # zero at initialisation; see `perceptual.FeatureInjector`).
      injector_double_zero_init=True,
      # The frame-index embedding also goes (through a zero-initialised linear layer) into the
      # U-Net's time embedding for the video frames, so that every U-Net ResBlock, not only the
      # injectors' one block per level, knows which frame it draws. False: the reference.
      index_in_time_embedding=False,
      # z_v from a learnable content slot that attends to the key frames (False, the reference),
      # or stacked on channels from each key frame's own output (True; video_z_channels must be a
      # multiple of len(data.key_frames)). The shape of z_v is the same either way.
      video_latent_per_key_frame=False,
      cfg_dropout=0.1,              # per-sample prompt + encoder-input dropout for guidance
      # Encode every training frame (as stored, and mirrored if data.hflip_prob > 0) and every
      # clip window's audio image with the frozen VAE once, when the stage starts, and train
      # from those posteriors instead of VAE-encoding each batch (`train/posterior_cache.py`).
      # The same latent distribution, sampled per step; it costs host memory of (2 x frames, 1 x
      # without flips, + clip windows) x latent moments (for 64x64 frames at f8: 2 KiB each), so
      # it suits small datasets, not AudioSet.
      cache_vae_latents=False,
      # Encoders, feature injectors, projectors (the U-Net: unet.remat_policy): a
      # jax.checkpoint_policies name, or 'none'.
      remat_policy="none",
      # Loss weights (AIST++ / Landscape values differ only in kl_weight).
      kl_weight=1e-6,
      # The classification head over the semantic maps exists when this is True and
      # data.num_classes > 0 (its parameters are in the checkpoint); cls_weight > 0 needs it.
      classifier_head=True,
      cls_weight=0.1,
      contrastive_weight=0.03,
      gan_weight=0.1,               # 0 = no discriminator (no parameters, no update)
      discriminator=ConfigDict(dict(
          channels=32, channel_mult=(1, 2, 3, 4, 4, 6, 6), num_res_blocks=1, head_channels=32,
          spatial_attention_resolutions=(32,),           # full spatio-temporal attention
          temporal_attention_resolutions=(4, 8, 16))),
      # Decoding a perceptual latent (reference: DDIM 50 steps, CFG 2.5 both modalities).
      decode_steps=50,
      decode_guidance_audio=2.5,
      decode_guidance_video=2.5,
      # Every frame of a clip starts its decoding from the same noise: a weakly conditioned
      # decoder then draws one background for the whole clip instead of one per frame.
      decode_shared_frame_noise=True,
  ))


def diffusion_config() -> ConfigDict:
  return ConfigDict(dict(
      num_timesteps=1000,
      schedule="scaled_linear",     # 'scaled_linear' (SD), 'linear' or 'cosine'
      beta_start=0.00085,
      beta_end=0.012,
      prediction="eps",             # 'eps' or 'v'
  ))


def dit_config() -> ConfigDict:
  return ConfigDict(dict(
      depth=28,
      hidden_size=1152,
      num_heads=16,
      mlp_ratio=4.0,
      context_tokens=77,
      context_dim=768,
      # A2V and V2A conditioning, each drawn with this p and both dropped where both hit, so
      # each is cond_prob (1 - cond_prob) of the samples that keep the context (at most 1/4).
      cond_prob=0.05,
      # The samples trained with A2V / V2A conditioning draw their timestep uniformly from
      # [cond_min_timestep, T) instead of [0, T) (not in the reference, 0). The given modality
      # settles the other's layout at high noise; at low noise the noisy latent itself does, so
      # uniform timesteps spend most conditioned samples where the condition teaches little.
      cond_min_timestep=0,
      context_dropout=0.1,          # classifier-free guidance dropout
      # The blocks as one `nn.scan` (parameters stacked on a 'layers' axis): one block to
      # compile whatever the depth. On XLA:CPU a scanned step copies each block's weights out of
      # the stack and its gradients into one; at paper width (depth 4, benchmarks/dit.py) the
      # training step took 1.18-1.26x the unrolled one's time. False unrolls the blocks
      # (`blocks_<i>` parameters, so checkpoints of the two layouts do not restore into each other).
      scan_layers=True,
      # With scan_layers: the stacked blocks applied one after another in straight-line code
      # instead of a loop; the same parameters, checkpoints and results. On XLA:CPU at paper
      # width, no remat, the training step took 0.94-0.96 of the scanned one's time (unrolled
      # blocks: 0.83-0.85; benchmarks/dit.py); it compiles like unrolled blocks, longer with depth.
      unroll_scanned_layers=False,
      remat_policy="nothing_saveable",  # a jax.checkpoint_policies name, or 'none'
      # Time-aligned tokens (not in the reference): the per-key-frame video latent
      # (autoencoder.video_latent_per_key_frame) becomes one token per key frame and position
      # instead of one per position, and video and audio tokens both carry a sin-cos code of their
      # moment in the clip (key frame index; the audio latent's column), so that attention can
      # pair a bounce with the tone of the same moment. Not with continuation.
      time_tokens=False,
      # With time_tokens (not in the reference): one token per key frame, holding its whole block
      # of the video latent, and one per audio latent column (every row and channel of that
      # moment), instead of one per grid position. Suits small latents (the quality preset's 4x4):
      # a token then sees a whole picture, and attention runs over moments, not positions. There
      # a step costs about a quarter; README "Results" has what it changed in the samples.
      frame_tokens=False,
      # Share of the training noise's variance common to the video latent's key-frame blocks
      # (not in the reference; `dit.key_frame_noise_fn`): with 0 the DiT learns from independent
      # noise per key frame; above 0 it learns the noise process that
      # `sample.shared_key_frame_noise` starts from, so set both alike. Needs
      # autoencoder.video_latent_per_key_frame and sample.eta=0 (DDIM's fresh noise is drawn
      # independently). On the quality preset's small DiT 0.9 made the samples worse (README,
      # "Results": video Frechet 233 against 37 for independent training and shared sampling).
      shared_key_frame_noise=0.0,
      # Class-conditional generation (not in the reference, whose AIST++ / Landscape DiTs are
      # unconditional): a learnable context vector per class of data.num_classes, dropped with
      # the context (context_dropout), so that joint guidance (sample.guidance_*) contrasts the
      # class with no class. Samples draw their classes uniformly; a2v / v2a take the given
      # clips' labels.
      class_conditional=False,
      # The generator's own noise schedule and prediction target ('' = `diffusion`'s, which the
      # autoencoder's decoder uses; the reference shares one). See `generator_diffusion`.
      schedule="",
      prediction="",
      # Long-video continuation (side DiT over [previous latent; current noisy latent]).
      continuation=False,
      prev_depth=14,
  ))


def vocoder_config() -> ConfigDict:
  """HiFi-GAN V1 generator (jik876/hifi-gan config_v1): log-mel -> waveform, hop = prod(rates)."""
  return ConfigDict(dict(
      upsample_rates=(8, 8, 2, 2),
      upsample_kernel_sizes=(16, 16, 4, 4),
      upsample_initial_channel=512,
      resblock_kernel_sizes=(3, 7, 11),
      resblock_dilation_sizes=((1, 3, 5), (1, 3, 5), (1, 3, 5)),
      num_mels=80,
      sample_rate=22050,            # the rate the vocoder's mel filterbank was built for
      pretrained_path="",           # generator_v1 / UNIVERSAL_V1 checkpoint; '' = Griffin-Lim
  ))


def sample_config() -> ConfigDict:
  return ConfigDict(dict(
      sampler="ddim",               # 'ddim' or 'dpm_solver++'
      steps=50,
      eta=0.0,
      guidance_audio=9.0,           # reference CLI default (--ucgs_audio)
      guidance_video=9.0,           # reference CLI default (--ucgs_video)
      num_samples=16,
      batch_size=4,
      mode="joint",                 # 'joint', 'a2v', 'v2a', 'continuation' or 'reconstruction'
      joint_order="together",       # joint samples: 'together' (one pass, the reference) or
                                    # 'video_first' / 'audio_first' (that modality jointly, then
                                    # the other given it, by the DiT's V2A / A2V conditioning)
      guidance_drops="context",     # a2v / v2a: what the unconditional branch of guidance drops:
                                    # 'context' (the reference; the given latent stays) or 'given'
                                    # (the given latent; the context stays), which guides the
                                    # sampled modality towards the given one
      num_clips=1,                  # > 1: autoregressive continuation
      seed=23,
      shared_key_frame_noise=0.0,   # share of the DiT's starting video noise common to all key
                                    # frames (diffusion/samplers.py `share_across_groups`): 0 =
                                    # independent (the reference), 1 = one draw; > 0 needs
                                    # autoencoder.video_latent_per_key_frame
  ))


def evaluation_config() -> ConfigDict:
  """The evaluate stage's FVD / KVD / FAD protocol (see mmldm_jax/stages/evaluate.py)."""
  return ConfigDict(dict(
      fvd="auto",                   # I3D FVD / KVD: 'auto' (when the metrics extra is installed,
                                    # else "not computed" in metrics.json), 'on' (required), 'off'
      i3d_preset="mmdiffusion",     # 'mmdiffusion' (letterbox 64 -> 224, MM-LDM's) or 'tf_fvd'
      i3d_epsilon=1e-3,             # BatchNorm epsilon: 1e-3 TF-Hub, 1e-5 the PyTorch evaluators
      i3d_feature="logits",         # 'logits' (400, as papers) or 'mixed_5c_pool' (1024)
      batch_size=8,                 # clips per I3D call
      real_seed=0,                  # draws of the real training clips (the list is saved)
      num_reference_draws=3,        # disjoint draws of real training clips (mean and spread)
      train_pool_limit=0,           # training clips (evenly spaced) the draws and the memorisation
                                    # check use; 0 = draws x the number of generated clips
      samples_folder="",            # '' = the sample stage's folder; else a folder of mp4 files
      mismatch="resample",          # samples of another fps / size / sample rate: 'resample' or
                                    # 'reject' (too few frames are always rejected)
      audioclip_path="",            # AudioCLIP-Full-Training.pt for fad_audioclip_x1e4
      panns_cnn14_path="",          # Cnn14_mAP=0.431.pth for fad_panns_cnn14
  ))


def train_config(*, lr: float, batch_size: int, num_steps: int) -> ConfigDict:
  """Optimisation of one stage. The reference uses torch AdamW defaults and no LR schedule."""
  return ConfigDict(dict(
      num_steps=num_steps,
      batch_size=batch_size,        # global batch
      lr=lr,
      b1=0.9,
      b2=0.999,
      weight_decay=0.01,
      grad_clip=0.0,                # 0 = off
      warmup_steps=0,
      decay="constant",             # 'constant' or 'cosine'
      ema_decay=0.0,                # 0 = no EMA
      log_every=50,
      checkpoint_every=1000,
      keep_checkpoints=3,
      # Quality signals on fixed validation clips every this many steps (and at the last step),
      # to metrics.jsonl, TensorBoard and <stage>/logs/media; 0 = off.
      eval_every=1000,
      nan_policy="stop",            # 'stop' or 'skip'
  ))


def mesh_config() -> ConfigDict:
  return ConfigDict(dict(
      # Axis sizes inside a slice; -1 fills the remaining devices.
      shape=(("data", -1), ("fsdp", 1), ("tensor", 1)),
      # Axis sizes across slices (DCN); all 1 for a single slice.
      dcn_shape=(("data", 1), ("fsdp", 1), ("tensor", 1)),
      # Logical axis -> mesh axes, per model family. A dimension that the mesh axes do not divide
      # stays replicated.
      rules=ConfigDict(dict(
          dit=(("activation_batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"),
               ("heads", "tensor"), ("layers", None)),
          conv=(("activation_batch", ("data", "fsdp")), ("conv_out", "fsdp"), ("embed", "fsdp"),
                ("mlp", "tensor"), ("heads", "tensor"), ("conv_in", None), ("layers", None)),
      )),
      min_sharded_bytes=0,          # parameters smaller than this stay replicated
  ))


def base_config() -> ConfigDict:
  """The paper-size MM-LDM with AIST++-like data settings; dataset configs adjust it."""
  config = ConfigDict()
  config.name = "base"
  config.seed = 0
  config.stages = "data,vae,autoencoder,latents,generator,sample,evaluate"
  config.workdir = ""
  config.precision = "auto"         # 'auto' = bf16 activations on accelerators, fp32 on CPU
  config.distributed = "auto"       # 'auto' (detect Cloud TPU / SLURM), 'on' or 'off'
  # Persistent XLA compilation cache: a rerun, a resumed run and a later stage that jits the same
  # function load the compiled program instead of compiling it again. 'auto' = $XDG_CACHE_HOME (or
  # ~/.cache)/mmldm_jax/xla, a path = that folder, '' = off.
  config.compilation_cache_dir = "auto"
  config.data = data_config()
  config.audio = audio_config()
  config.synthetic = synthetic_config()
  config.vae = vae_config()
  config.unet = unet_config()
  config.autoencoder = autoencoder_config()
  config.diffusion = diffusion_config()
  config.dit = dit_config()
  config.sample = sample_config()
  config.evaluation = evaluation_config()
  config.vocoder = vocoder_config()
  config.train_vae = train_config(lr=1e-5, batch_size=80, num_steps=100_000)
  config.train_autoencoder = train_config(lr=1e-4, batch_size=160, num_steps=200_000)
  config.train_generator = train_config(lr=1e-5, batch_size=224, num_steps=400_000)
  config.mesh = mesh_config()
  return config


def apply_tiny(config: ConfigDict) -> ConfigDict:
  """Shrinks every model to a CPU-test size while keeping every structural feature.

  Geometry: 64x64 frames and audio image, VAE f8 (8x8 latents), z_v 4x4x4, z_a 4x2x2,
  a 6-input-block U-Net at 32 channels and a 2-block DiT at width 64.

  The U-Net is sized to the 8x8 VAE latent: two levels (8x8 at 32 channels, 4x4 at 64) with
  attention at both and a 4x4 mid block. SD's four levels would go down to a 1x1 mid block whose
  self-attention sees a single token, and compile half again as long (this preset's autoencoder
  train step: 116 s against 175 s in one run, benchmarks/README.md). SD's four-level layout, with
  its last level without attention, stays covered where it matters: the U-Net parity and
  converter tests set it explicitly.
  """
  config.data.image_size = 64
  config.audio.image_size = 64
  config.vae.update(channels=16, channel_mult=(1, 2, 2, 2), num_res_blocks=1, norm_groups=8,
                    disc_channels=8, disc_layers=2)
  config.unet.update(model_channels=32, channel_mult=(1, 2), num_res_blocks=2,
                     attention_resolutions=(1, 2), num_heads=2, context_dim=32, norm_groups=8)
  ae = config.autoencoder
  ae.video_z_channels = 4
  ae.audio_z_channels = 4
  ae.video_encoder.update(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, head_channels=8)
  ae.audio_encoder.update(model_channels=16, channel_mult=(1, 2, 2), num_res_blocks=1,
                          head_channels=8)
  ae.video_projector.update(model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                            head_channels=8)
  ae.audio_projector.update(model_channels=8, channel_mult=(1,), num_res_blocks=1, head_channels=8)
  ae.semantic_dim = 32
  ae.contrastive_dim = 16
  ae.prompt_tokens = 4
  ae.index_embed_dim = 16
  ae.discriminator.update(channels=4, channel_mult=(1, 2, 2), num_res_blocks=1, head_channels=4,
                          spatial_attention_resolutions=(4,), temporal_attention_resolutions=(2,))
  ae.decode_steps = 4
  config.dit.update(depth=2, hidden_size=64, num_heads=4, context_tokens=4, context_dim=32,
                    prev_depth=1)
  config.sample.update(steps=4, num_samples=2, batch_size=2)
  config.vocoder.upsample_initial_channel = 32
  for stage in ("train_vae", "train_autoencoder", "train_generator"):
    config[stage].update(batch_size=8, num_steps=4, log_every=1, checkpoint_every=2)
  return config


def vae_factor(config: ConfigDict) -> int:
  """Spatial downsampling factor of the stage-0 VAE."""
  return 2 ** (len(config.vae.channel_mult) - 1)


def encoder_factor(config: ConfigDict, modality: str) -> int:
  """Spatial downsampling of the autoencoder's `modality` ('audio' or 'video') encoder relative to
  the VAE latent: z is the VAE latent's side / this."""
  return 2 ** (len(config.autoencoder[f"{modality}_encoder"].channel_mult) - 1)


def validate(config: ConfigDict) -> None:
  """Fails with a message naming the field and the value when the config cannot work."""
  def fail(field: str, value: Any, expected: str) -> None:
    raise ValueError(f"config.{field}={value!r}: expected {expected}")

  factor = vae_factor(config)
  for field, size in (("data.image_size", config.data.image_size),
                      ("audio.image_size", config.audio.image_size)):
    if size <= 0 or size % factor:
      fail(field, size, f"a positive multiple of the VAE factor {factor} "
           f"(2 ** (len(vae.channel_mult) - 1))")
  latent = config.data.image_size // factor
  for modality in ("video", "audio"):
    down = encoder_factor(config, modality)
    if latent % down:
      fail("data.image_size", config.data.image_size,
           f"a multiple of {down * factor} (the {modality} encoder downsamples the "
           f"{latent}x{latent} VAE latent {down}x: autoencoder.{modality}_encoder.channel_mult)")
  if config.data.num_frames <= 0:
    fail("data.num_frames", config.data.num_frames, "a positive frame count")
  for index in config.data.key_frames:
    if not 0 <= index < config.data.num_frames:
      fail("data.key_frames", tuple(config.data.key_frames),
           f"frame indices in [0, data.num_frames={config.data.num_frames})")
  if config.data.fps <= 0:
    fail("data.fps", config.data.fps, "a positive frame rate")
  if config.data.source not in ("records", "synthetic"):
    fail("data.source", config.data.source, "'records' or 'synthetic'")
  if config.data.source == "synthetic":
    synthetic_frames = int(round(config.synthetic.video_seconds * config.data.fps))
    if synthetic_frames < config.data.num_frames:
      fail("synthetic.video_seconds", config.synthetic.video_seconds,
           f"videos of at least one clip: data.num_frames={config.data.num_frames} frames at "
           f"data.fps={config.data.fps} is {config.data.num_frames / config.data.fps:g} s, these "
           f"videos have {synthetic_frames} frames")
  if config.audio.win_length > config.audio.n_fft:
    fail("audio.win_length", config.audio.win_length, f"<= audio.n_fft={config.audio.n_fft}")
  if config.audio.fmax > config.audio.filterbank_sample_rate / 2:
    fail("audio.fmax", config.audio.fmax,
         f"<= audio.filterbank_sample_rate / 2 = {config.audio.filterbank_sample_rate / 2}")
  if config.dit.hidden_size % config.dit.num_heads:
    fail("dit.hidden_size", config.dit.hidden_size,
         f"a multiple of dit.num_heads={config.dit.num_heads}")
  if config.diffusion.schedule not in ("scaled_linear", "linear", "cosine"):
    fail("diffusion.schedule", config.diffusion.schedule, "'scaled_linear', 'linear' or 'cosine'")
  if config.diffusion.prediction not in ("eps", "v"):
    fail("diffusion.prediction", config.diffusion.prediction, "'eps' or 'v'")
  if config.dit.schedule not in ("", "scaled_linear", "linear", "cosine"):
    fail("dit.schedule", config.dit.schedule,
         "'' (diffusion.schedule), 'scaled_linear', 'linear' or 'cosine'")
  if config.dit.prediction not in ("", "eps", "v"):
    fail("dit.prediction", config.dit.prediction, "'' (diffusion.prediction), 'eps' or 'v'")
  if config.sample.sampler not in ("ddim", "dpm_solver++"):
    fail("sample.sampler", config.sample.sampler, "'ddim' or 'dpm_solver++'")
  def one_of(field: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
      fail(field, value, "one of " + ", ".join(map(repr, allowed)))

  def at_least(field: str, value: Any, low: float) -> None:
    if not value >= low:
      fail(field, value, f">= {low}")

  one_of("precision", config.precision, ("auto", "float32", "bfloat16"))
  one_of("vae.pixel_loss", config.vae.pixel_loss, ("l1", "l2"))
  if config.dit.time_tokens and not config.autoencoder.video_latent_per_key_frame:
    fail("dit.time_tokens", True, "autoencoder.video_latent_per_key_frame=True (the video "
         "latent's channels must be one block per key frame)")
  if config.dit.frame_tokens and not config.dit.time_tokens:
    fail("dit.frame_tokens", True, "False unless dit.time_tokens=True (frame tokens are a layout "
         "of the time-aligned tokens)")
  if config.dit.unroll_scanned_layers and not config.dit.scan_layers:
    fail("dit.unroll_scanned_layers", True, "False unless dit.scan_layers=True (unrolled layers "
         "have no stack of parameters to apply block by block)")
  if config.dit.time_tokens and config.dit.continuation:
    fail("dit.time_tokens", True, "dit.continuation=False (the continuation side DiT reads the "
         "reference's token layout)")
  if not 0 <= config.vae.frames_per_clip <= config.data.num_target_frames:
    fail("vae.frames_per_clip", config.vae.frames_per_clip,
         f"0 (all) to data.num_target_frames={config.data.num_target_frames}")
  one_of("distributed", config.distributed, ("auto", "on", "off"))
  for stage in ("train_vae", "train_autoencoder", "train_generator"):
    section = config[stage]
    one_of(f"{stage}.decay", section.decay, ("constant", "cosine"))
    one_of(f"{stage}.nan_policy", section.nan_policy, ("stop", "skip"))
    for field in ("num_steps", "batch_size", "log_every"):
      at_least(f"{stage}.{field}", section[field], 1)
    at_least(f"{stage}.eval_every", section.eval_every, 0)
    at_least(f"{stage}.warmup_steps", section.warmup_steps, 0)
  one_of("sample.mode", config.sample.mode, SAMPLE_MODES)
  one_of("sample.joint_order", config.sample.joint_order, JOINT_ORDERS)
  one_of("sample.guidance_drops", config.sample.guidance_drops, GUIDANCE_DROPS)
  if not 0 <= config.dit.cond_min_timestep < config.diffusion.num_timesteps:
    fail("dit.cond_min_timestep", config.dit.cond_min_timestep,
         f"an integer in [0, diffusion.num_timesteps={config.diffusion.num_timesteps})")
  if config.dit.cond_min_timestep > 0 and config.dit.cond_prob <= 0:
    fail("dit.cond_min_timestep", config.dit.cond_min_timestep,
         "0 with dit.cond_prob=0 (it sets the timesteps of the A2V / V2A samples, and there are "
         "none)")
  if config.sample.joint_order != "together" and config.dit.cond_prob <= 0:
    fail("sample.joint_order", config.sample.joint_order,
         "'together' with dit.cond_prob=0 (the second pass needs the DiT's A2V / V2A "
         "conditioning, which it learns only with dit.cond_prob > 0)")
  for field in ("num_clips", "steps", "num_samples", "batch_size"):
    at_least(f"sample.{field}", config.sample[field], 1)
  if not 0.0 <= config.sample.eta <= 1.0:
    fail("sample.eta", config.sample.eta, "a DDIM eta in [0, 1]")
  for field in ("sample.shared_key_frame_noise", "dit.shared_key_frame_noise"):
    section, name = field.split(".")
    shared_noise = config[section][name]
    if not 0.0 <= shared_noise <= 1.0:
      fail(field, shared_noise, "a share from 0 to 1")
    if shared_noise > 0 and not config.autoencoder.video_latent_per_key_frame:
      fail(field, shared_noise,
           "0 unless autoencoder.video_latent_per_key_frame=True (only then does the video "
           "latent hold one block of channels per key frame)")
  train_shared = config.dit.shared_key_frame_noise
  if train_shared > 0 and config.sample.eta > 0:
    fail("sample.eta", config.sample.eta,
         f"0 with dit.shared_key_frame_noise={train_shared} (the DiT learned correlated noise; "
         "DDIM with eta > 0 adds independent noise at every step)")
  import jax  # the remat policy names are jax's
  for section in ("dit", "unet", "autoencoder"):
    policy = config[section].remat_policy
    if policy != "none" and not hasattr(jax.checkpoint_policies, policy):
      fail(f"{section}.remat_policy", policy,
           "'none' or a jax.checkpoint_policies name (e.g. 'nothing_saveable', 'dots_saveable')")
  if config.audio.image_size != config.data.image_size:
    fail("audio.image_size", config.audio.image_size,
         f"data.image_size={config.data.image_size} (the audio image and the frames share the VAE "
         f"batch and the discriminator's 3-frame stack)")
  if config.unet.context_dim != config.autoencoder.semantic_dim:
    fail("unet.context_dim", config.unet.context_dim,
         f"autoencoder.semantic_dim={config.autoencoder.semantic_dim} (the decoder cross-attends "
         f"to semantic tokens)")
  at_least("autoencoder.min_snr_gamma", config.autoencoder.min_snr_gamma, 0.0)
  if (config.autoencoder.video_latent_per_key_frame
      and config.autoencoder.video_z_channels % len(config.data.key_frames)):
    fail("autoencoder.video_z_channels", config.autoencoder.video_z_channels,
         f"a multiple of len(data.key_frames)={len(config.data.key_frames)} with "
         f"autoencoder.video_latent_per_key_frame=True")
  if not config.autoencoder.index_embed_scale > 0:
    fail("autoencoder.index_embed_scale", config.autoencoder.index_embed_scale,
         "a positive factor for the frame index before its embedding")
  if config.autoencoder.cls_weight > 0 and not config.autoencoder.classifier_head:
    fail("autoencoder.cls_weight", config.autoencoder.cls_weight,
         "0 with autoencoder.classifier_head=False (the classification loss needs the head)")
  if config.dit.continuation and config.data.generator_hflip_prob > 0:
    fail("data.generator_hflip_prob", config.data.generator_hflip_prob,
         "0 with dit.continuation=True (clips flipped independently would disagree with the "
         "clips they continue)")
  if config.dit.class_conditional and config.data.num_classes < 1:
    fail("dit.class_conditional", config.dit.class_conditional,
         f"False with data.num_classes={config.data.num_classes} (a class-conditional DiT needs "
         f"the clips' classes)")
  unknown = [s for s in stage_list(config) if s not in ALL_STAGES]
  if unknown:
    fail("stages", config.stages, f"a comma-separated subset of {', '.join(ALL_STAGES)}; "
         f"unknown: {', '.join(unknown)}")


def compilation_cache_folder(config: ConfigDict) -> str | None:
  """The folder `config.compilation_cache_dir` names ('auto' = the user's cache folder), or None
  when the cache is off ('')."""
  setting = str(config.compilation_cache_dir)
  if not setting:
    return None
  if setting == "auto":
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmldm_jax", "xla")
  return os.path.abspath(os.path.expanduser(setting))


def enable_compilation_cache(config: ConfigDict) -> str | None:
  """Turns on JAX's persistent compilation cache in `compilation_cache_folder(config)` for every
  program, however quick its compile (the many small ones add up on a CPU). Returns the folder."""
  import jax
  folder = compilation_cache_folder(config)
  if folder is None:
    return None
  os.makedirs(folder, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return folder


def read_scale_factor(path: str) -> float:
  """The factor in a `vae` stage's scale_factor.json; a clear error for a damaged file."""
  try:
    with open(path) as f:
      body = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: not valid JSON ({error}); delete it and rerun the `vae` stage, "
                     f"which measures the factor again") from error
  factor = body.get("scale_factor") if isinstance(body, dict) else None
  if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) \
      or factor <= 0:
    raise ValueError(f"{path}: field 'scale_factor' is {factor!r}; expected a positive number")
  return float(factor)


def resolve_scale_factor(config: ConfigDict, workdir: str) -> float:
  """The VAE scale factor a run uses: the one the `vae` stage measured into
  `<workdir>/vae/scale_factor.json` when config.vae.measure_scale_factor, else
  config.vae.scale_factor. Reads only; fails naming the file when the `vae` stage has not written
  it. The stages that build the VAE (autoencoder, latents, sample) pass the value on to it."""
  if not config.vae.measure_scale_factor:
    return float(config.vae.scale_factor)
  path = workdir_lib.scale_factor_file(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"config.vae.measure_scale_factor=True but {path} does not exist: run the `vae` stage "
        f"first (it writes the file when it finishes), or set --config.vae.scale_factor and "
        f"--config.vae.measure_scale_factor=False")
  factor = read_scale_factor(path)
  # Once per process: every stage that builds the VAE resolves it.
  logging.log_first_n(logging.INFO, "vae.scale_factor: %.6g measured by the vae stage (%s)", 1,
                      factor, path)
  return factor


def stage_list(config: ConfigDict) -> list[str]:
  """The stages to run, in the order given in `config.stages`."""
  return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def clip_samples(config: ConfigDict) -> int:
  """Audio samples in one clip: num_frames / fps seconds at the waveform rate."""
  return int(round(config.data.num_frames / config.data.fps * config.audio.sample_rate))


def load(path_with_preset: str) -> ConfigDict:
  """Loads `configs/X.py[:preset]` the way the `--config` flag does (for tests and tools)."""
  import importlib.util
  import os
  path, _, arg = path_with_preset.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(
      "mmldm_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.lock()
  return config
