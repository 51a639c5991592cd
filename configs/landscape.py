"""MM-LDM on Landscape (nature scenes with their sound), the paper's setting.

Run (paper scale, a TPU pod or a GPU cluster):
  python -m mmldm_jax.data.ingest --src=/data/landscape --dst=/data/landscape_rec \
      --config=configs/landscape.py
  python -m mmldm_jax.main --config=configs/landscape.py --workdir=/mnt/bucket/landscape \
      --config.data.data_dir=/data/landscape_rec

Tests use `configs/landscape.py:tiny`. Clips: 16 frames at 10 fps (1.6 s), 256x256 letterboxed;
audio 44.1 kHz; 9 scene classes. Loss weights from `landscape_ae_v13` (KL 1e-6), generator from
`landscape_gen_v2`.
"""
from mmldm_jax import config_lib


def get_config(arg=None):
  preset = config_lib.parse_preset(arg)
  config = config_lib.base_config()
  config.name = "landscape"
  config.data.fps = 10.0
  config.data.num_classes = 9
  config.data.hflip_prob = 0.5
  config.data.generator_hflip_prob = 0.0
  config.autoencoder.kl_weight = 1e-6
  config.train_generator.lr = 1e-5
  config.train_generator.batch_size = 224      # 28 per GPU x 8
  config.train_autoencoder.batch_size = 160    # 20 per GPU x 8
  if preset.get("tiny"):
    config_lib.apply_tiny(config)
    config.data.num_classes = 4
  return config
