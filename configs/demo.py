"""The whole MM-LDM pipeline on the built-in synthetic sounding-video dataset, sized for a laptop CPU.

Run:
  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo

Cost: measured 6 min 17 s on 2 CPU cores from a fresh clone (2026-12-07, commits 9f42bd4 and
52f9b04, install included, empty compile cache, a fast evening of the machine; 7 min 53 s on a
fast hour of 2026-12-06, 14 min 32 s on a slow hour of 2026-12-07; the README has the breakdown),
4.5 to 7 GB of memory and a few hundred MB of disk.
The samples show dark or muddy scene-class backgrounds with one to three sharp coloured objects
that mostly keep their colour and place through the clip, some of them moving, and quiet sound
with faint tones that do not follow the bounces (sync F1 0.17 against 0.17 for shuffled pairs in
the latest runs, 9f42bd4 and 52f9b04, and about the shuffled pairs' score in most earlier ones;
real clips 0.99). The synthetic clips
(coloured objects bouncing over a class-dependent background; every wall hit is a tone whose pitch
is the object's colour) are generated from a seed, so nothing is downloaded. Frames are 64x64 at 10
fps, audio 16 kHz; every network is the `tiny` size of the paper configs (the U-Net with two of its
four levels), trained from scratch without discriminators. Outputs: `samples/joint/*.mp4|wav|png`,
`metrics.json` (sync F1 of the samples, beside its chance level `real_mismatched`, the samples'
shuffled pairs and noise clips; distances with their real floor and noise ceiling) and each stage's
quality signals under `<stage>/logs` (`media/` holds them as PNG and WAV files).

The `quality` preset (`--config=configs/demo.py:quality`) trains the same chain longer, with 8 key
frames, z_a at 4x4, 192 training videos and a DiT whose tokens share a time axis (`apply_quality`).
Measured from a clean clone on this project's 2-core machine (2026-12-06, commit 9c35451, a fast
day): 1 h 29 min 31 s with the install, 6.3 GB peak (VAE 9 min, autoencoder 41 min, generator
37 min). Its autoencoders reconstruct in-sync clips (sync F1 0.66, shuffled pairs 0.27); its
samples show the class backgrounds and sharp coloured objects that keep their colour and place,
and tones in the sound, but the objects move too little and the tones do not follow the bounces
(32 samples: sync F1 0.31, shuffled pairs 0.29; video Frechet 2.6x the real floor, audio 3.1x).
docs/results/ holds that run's scores, contact
sheets and a sample; the README's "Results" has the tables.

`--config.stages` picks stages (comma-separated, run in order). The default runs every stage this
version implements; `data` writes the shards plus `preview.mp4` and `preview.png` into the workdir.
Each training stage writes TensorBoard files to `<workdir>/<stage>/logs`
(`tensorboard --logdir <workdir>`); a stage whose input is missing runs the stage that makes it
(training stages run `data`, `generator` runs `latents`).
"""
from mmldm_jax import config_lib


def get_config(arg=None):
  preset = config_lib.parse_preset(arg, known=("tiny", "quality"))
  config = config_lib.base_config()
  config_lib.apply_tiny(config)
  config.name = "demo"
  config.stages = "data,vae,autoencoder,latents,generator,sample,evaluate"
  config.data.source = "synthetic"
  config.data.fps = 10.0
  config.data.num_frames = 16
  config.data.num_classes = config.synthetic.num_classes
  config.data.generator_hflip_prob = 0.0
  # No SD weights offline: the VAE trains from scratch, encoder included, and measures its own
  # latent scale factor for the later stages.
  config.vae.update(freeze_encoder=False, measure_scale_factor=True)
  # 16 kHz audio: a 1.6 s clip is 25600 samples -> 200 mel frames of 128 samples.
  config.audio.update(sample_rate=16000, filterbank_sample_rate=16000, n_fft=512, hop_length=128,
                      win_length=512, num_mels=64, fmin=0.0, fmax=8000.0)
  # No adversarial terms on a CPU budget: the VAE's discriminator would start at step 10001 (its
  # update still costs a VAE forward every step before that) and the autoencoder's needs a
  # decoder that already reconstructs; without them a step costs about a third.
  config.vae.disc_weight = 0.0
  # Squared pixel error: with LDM's L1 the VAE leaves the 10-pixel objects at the background
  # colour (their pixels are the outliers L1 discounts); with l2 it draws them.
  config.vae.pixel_loss = "l2"
  # The VAE sees both target frames of each clip beside its audio image (vae.frames_per_clip=0).
  # With one frame per clip its 400 steps reconstructed frames and audio images as well or better
  # (PSNR 24.2 / 27.7 dB against 23.2 / 26.9), but two fresh-clone runs of the whole demo then had
  # nearly silent samples (0.2 tone onsets per second against 1.1 with both frames, audio Frechet
  # 144 against 68, floor 11), though they were 6 minutes faster. The quality preset, whose VAE
  # trains 1200 steps, keeps one.
  # A VAE whose two outer levels keep 16 channels (the tiny preset doubles them at 32x32): its
  # training step costs 0.62 of the tiny widths' (benchmarks/vae_widths.py: the weight gradients
  # of 32-channel 3x3 convolutions at 64x64 and 32x32 are the slowest ops of the step on XLA:CPU).
  # Measured on the whole demo (2026-12-03, same machine, different hours, so the ratio above is
  # the firmer figure): the VAE stage took 7 min 27 s against 10 min 51 s, its reconstructions
  # scored 24.0 / 26.7 dB PSNR (frames / audio image) against 23.2 / 26.9, and the samples'
  # distances were video 96 / audio 51 against 102 / 68.
  config.vae.channel_mult = (1, 1, 2, 2)
  # The paper's 16 channels for z_v, not the tiny preset's 4: measured on this demo, the samples'
  # distances were video 70 / audio 204 with 4 channels and 60 / 97 with 16.
  config.autoencoder.video_z_channels = 16
  # The diffusion decoder is the tiny preset's two-level U-Net, sized to the 8x8 VAE latent
  # (config_lib.apply_tiny). Against SD's four levels (down to a 1x1 mid block) on this demo,
  # measured in one run (benchmarks/README.md, 2026-12-06): train step compile 40 s against 60 s,
  # step 0.17 s against 0.22 s; its 600 steps decoded frames at 17.5 dB PSNR (four levels: 18.2),
  # audio images at 24.0 dB (24.2), and the samples scored video Frechet 108 (104), audio 58 (74).
  config.autoencoder.gan_weight = 0.0
  # The frozen VAE's posteriors of the training clips, encoded once when the stage starts instead
  # of every step (train/posterior_cache.py; a few MB here).
  config.autoencoder.cache_vae_latents = True
  # Objects of radius 0.12 (15 px) rather than 0.08 (10 px): a 400-step VAE at f8 blurs the small
  # ones into the background, and every later stage can only draw what the VAE keeps.
  config.synthetic.object_radius = 0.12
  # A decoder that places the objects frame by frame within a few hundred steps (see the
  # autoencoder module docstring: on an 800-step VAE, frame_order_accuracy 0.18 = chance through
  # 1000 steps with the reference's content slot, 0.33 at 500 and 0.50 at 1000 with these; this
  # demo, on its 400-step VAE, reaches 0.27 at its 600 steps).
  config.autoencoder.update(video_latent_per_key_frame=True, index_embed_scale=1000.0,
                            injector_double_zero_init=False, index_in_time_embedding=True)
  # v-prediction weighs the clean-latent error of the noisiest steps ~200x more than eps does, and
  # those are the steps where the decoder must take the picture from its latents (audio image
  # PSNR 19.3 -> 24.6 dB at 500 autoencoder steps). The DiT shares the diffusion section, so it
  # predicts v too.
  config.diffusion.prediction = "v"
  # From scratch, not fine-tuning: the paper's learning rates (1e-5 / 1e-4 / 1e-5) are for
  # pretrained starts and long runs.
  config.train_vae.lr = 1e-3
  config.train_autoencoder.lr = 5e-4
  config.train_generator.lr = 3e-4
  config.autoencoder.decode_steps = 10
  # Joint sampling guides towards the DiT's learnable context, against the zeroed one; the
  # reference's 9.0 pushes a small, briefly trained DiT off its latent distribution.
  config.sample.update(steps=20, num_samples=8, batch_size=8, guidance_audio=1.0,
                       guidance_video=1.0)
  # Every key frame's block of the video latent starts from the same noise: from independent
  # noise the DiT drew key frames whose objects changed colour and place, and the decoded clips
  # jumped between them. The same trained models sampled both ways (2026-12-06): the quality
  # preset's 32 samples (its run at c60eb29) scored video Frechet 37 against 174 (real floor 14),
  # audio 30 against 31, sync F1 0.32 against 0.25 (shuffled pairs 0.31 and 0.30), and kept each
  # object's colour and place through the clip, though the objects move less than real ones; this
  # demo's 8 samples (its run at 1630b69) scored video 104 against 115 (floor 22), audio 74 against
  # 74. Another draw of the shared noise gave 41 and 80 (audio 103).
  config.sample.shared_key_frame_noise = 1.0
  # Quality signals once, at the end of each training stage (the loop always scores the last
  # step): a mid-run one cost the autoencoder about 60 s (a guided decode of the validation clips,
  # compiled the first time) and the generator about 55 s (the whole sampling chain), a tenth of
  # the demo. The quality preset scores its longer stages along the way.
  config.train_vae.update(num_steps=400, checkpoint_every=200, log_every=50, eval_every=400)
  config.train_autoencoder.update(num_steps=600, checkpoint_every=200, log_every=50,
                                  eval_every=600)
  config.train_generator.update(num_steps=1000, checkpoint_every=500, log_every=100,
                                eval_every=1000)
  if preset.get("quality"):
    apply_quality(config)
  if preset.get("tiny"):   # tests: few videos, a few steps of each stage, small sampling
    config.synthetic.update(num_train_videos=8, num_validation_videos=2, num_heldout_videos=2)
    for stage in ("train_vae", "train_autoencoder", "train_generator"):
      config[stage].update(num_steps=4, log_every=1, checkpoint_every=2, eval_every=1000)
    config.autoencoder.decode_steps = 4
    config.sample.update(steps=4, num_samples=2, batch_size=2)
  return config


def apply_quality(config):
  """The `quality` preset: the same chain trained longer and with the settings that the quality
  signals showed keep more of the clips' timing (configs/demo.py:quality, see the module doc)."""
  # Key frames every other frame and z_a at 4x4: on the demo's 600-step autoencoder the decoded
  # picture kept the bounces of the real sound at sync F1 0.29-0.34 against 0.09 with the 4 key
  # frames (0.5 s apart) and the decoded sound the real picture's at 0.41-0.49 against 0.16 with
  # z_a at 2x2 (0.8 s per column); shuffled pairs score 0.17.
  config.data.key_frames = (0, 2, 4, 6, 8, 10, 12, 14)
  config.autoencoder.video_z_channels = 32          # 4 per key frame
  config.autoencoder.audio_z_channels = 8
  config.autoencoder.audio_encoder.channel_mult = (1, 2)
  config.autoencoder.audio_projector.channel_mult = (1, 2)
  # Three times the training videos: the DiT learns from the latents of every clip window, and 64
  # videos give it 1,088 heavily overlapping ones.
  config.synthetic.num_train_videos = 192
  config.vae.frames_per_clip = 1     # a third less per VAE step (see get_config)
  config.vae.channel_mult = (1, 2, 2, 2)   # the VAE docs/results was made with (see get_config)
  # ... and SD's four-level U-Net, which docs/results was also made with (see get_config).
  config.unet.update(channel_mult=(1, 2, 2, 2), attention_resolutions=(4, 2, 1))
  config.train_vae.update(num_steps=1200, checkpoint_every=400, eval_every=400)
  config.train_autoencoder.update(num_steps=7000, checkpoint_every=1000, eval_every=2000,
                                  decay="cosine", warmup_steps=100)
  # A DiT with room to relate the modalities, whose tokens put both on one time axis, and A2V /
  # V2A conditioning often enough to be sampled from.
  config.dit.update(depth=4, hidden_size=128, num_heads=4, time_tokens=True, cond_prob=0.15)
  config.train_generator.update(num_steps=16000, checkpoint_every=2000, log_every=200,
                                eval_every=4000, ema_decay=0.999)
  config.sample.update(num_samples=32, batch_size=8)
