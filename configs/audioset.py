"""MM-LDM on an AudioSet subset (about 100k clips), the paper's setting.

Run (paper scale; the reference used 4 nodes x 8 GPUs for the autoencoder, 2 x 8 for the DiT):
  python -m mmldm_jax.data.ingest --src=/data/audioset --dst=/data/audioset_rec \
      --config=configs/audioset.py --workers=32
  python -m mmldm_jax.main --config=configs/audioset.py --workdir=/mnt/bucket/audioset \
      --config.data.data_dir=/data/audioset_rec

Tests use `configs/audioset.py:tiny`. Clips: 16 frames at 4 fps (4.0 s), 256x256 letterboxed;
audio 44.1 kHz; no class head ("woclass"), KL 1e-7, no adversarial term, decoder guidance audio 1.5 /
video 3.0, generator lr 1e-4 with batch 24 x 8 x 2.
"""
from mmldm_jax import config_lib


def get_config(arg=None):
  preset = config_lib.parse_preset(arg)
  config = config_lib.base_config()
  config.name = "audioset"
  config.data.fps = 4.0
  config.data.num_classes = 0
  config.data.hflip_prob = 0.5
  config.data.generator_hflip_prob = 0.5
  config.autoencoder.kl_weight = 1e-7
  config.autoencoder.cls_weight = 0.0
  config.autoencoder.classifier_head = False
  config.autoencoder.gan_weight = 0.0
  config.autoencoder.decode_guidance_audio = 1.5
  config.autoencoder.decode_guidance_video = 3.0
  config.train_generator.lr = 1e-4
  config.train_generator.batch_size = 384      # 24 per GPU x 8 x 2 nodes
  config.train_autoencoder.batch_size = 768    # 24 per GPU x 8 x 4 nodes
  if preset.get("tiny"):
    config_lib.apply_tiny(config)
  return config
