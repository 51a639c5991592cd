"""MM-LDM on AIST++ (dance videos with music), the paper's setting.

Run (paper scale, a TPU pod or a GPU cluster; the reference trained each stage on 8 GPUs for days):
  python -m mmldm_jax.data.ingest --src=/data/AIST++_crop --dst=/data/aist_rec --config=configs/aist.py
  python -m mmldm_jax.main --config=configs/aist.py --workdir=/mnt/bucket/aist \
      --config.data.data_dir=/data/aist_rec

Tests use `configs/aist.py:tiny` (a 64x64, few-channel version of every network; seconds per step on
one CPU core). Clips: 16 frames at 10 fps (1.6 s), 256x256 letterboxed; audio 44.1 kHz, 60 classes
(the music tracks). Loss weights from `aist_ae_v2` (KL 1e-9), generator from `aist_gen_v2`.
"""
from mmldm_jax import config_lib


def get_config(arg=None):
  preset = config_lib.parse_preset(arg)
  config = config_lib.base_config()
  config.name = "aist"
  config.data.fps = 10.0
  config.data.num_classes = 60
  config.data.hflip_prob = 0.5
  config.data.generator_hflip_prob = 0.0
  config.autoencoder.kl_weight = 1e-9
  config.train_generator.lr = 1e-5
  config.train_generator.batch_size = 224      # 28 per GPU x 8
  config.train_autoencoder.batch_size = 160    # 20 per GPU x 8
  if preset.get("tiny"):
    config_lib.apply_tiny(config)
    config.data.num_classes = 4
  return config
