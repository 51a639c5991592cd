"""The whole MM-LDM pipeline on the built-in synthetic sounding-video dataset, sized for a laptop CPU.

Run:
  python -m mmldm_jax.main --config=configs/demo.py --workdir=runs/demo

Cost: about 6 minutes on 2 idle CPU cores with an empty compile cache (4 with a filled one), most of
it XLA compiling the autoencoder's training step, 6.3 GB of memory and a few hundred MB of disk. The
step counts are a smoke run of the whole chain: the samples it writes are still noise; raise
`--config.train_*.num_steps` for real results. The synthetic
clips (coloured objects bouncing over a class-dependent background; every wall hit is a tone whose
pitch is the object's colour) are generated from a seed, so nothing is downloaded. Frames are 64x64
at 10 fps, audio 16 kHz; every network is the `tiny` size of the paper configs. Outputs:
`samples/joint/*.mp4|wav|png` and `metrics.json` (sync F1 of the samples, beside its chance level
`real_mismatched`, the samples' shuffled pairs and noise clips).

`--config.stages` picks stages (comma-separated, run in order). The default runs every stage this
version implements; `data` writes the shards plus `preview.mp4` and `preview.png` into the workdir.
Each training stage writes TensorBoard files to `<workdir>/<stage>/logs`
(`tensorboard --logdir <workdir>`); a stage whose input is missing runs the stage that makes it
(training stages run `data`, `generator` runs `latents`).
"""
from mmldm_jax import config_lib


def get_config(arg=None):
  preset = config_lib.parse_preset(arg)
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
  if preset.get("tiny"):
    config.synthetic.update(num_train_videos=8, num_validation_videos=2, num_heldout_videos=2)
  else:
    # Sized for a CPU, where compiling dominates (the autoencoder's step compiles for minutes).
    config.train_vae.update(num_steps=20, checkpoint_every=10, log_every=5, eval_every=10)
    config.train_autoencoder.update(num_steps=20, checkpoint_every=10, log_every=5)
    config.train_generator.update(num_steps=200, checkpoint_every=100, log_every=20, lr=1e-4)
  return config
