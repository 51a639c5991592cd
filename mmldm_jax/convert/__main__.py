"""Converts a PyTorch checkpoint into Flax msgpack params for one of the pretrained models.

  python -m mmldm_jax.convert --kind=vae --src=vae/diffusion_pytorch_model.safetensors \\
      --dst=sd_vae.msgpack [--config=configs/aist.py]
  python -m mmldm_jax.convert --kind=unet --src=unet/diffusion_pytorch_model.safetensors --dst=unet.msgpack
  python -m mmldm_jax.convert --kind=hifigan --src=generator_v1 --dst=hifigan.msgpack

`--kind`: vae (SD KL-f8 VAE: diffusers, legacy diffusers or CompVis, also inside a full SD `.ckpt`),
unet (SD-1.5 U-Net: diffusers or CompVis), hifigan (HiFi-GAN V1 generator). The model sizes come from the
config (`config.vae`, `config.unet`, `config.vocoder`). Nothing is downloaded: a missing `--src` is an
error saying where the file comes from. Any missing, unexpected or misshaped key fails the conversion
with every such key listed. The output loads with `mmldm_jax.convert.common.load_params`.
"""
from __future__ import annotations

import sys

import numpy as np
from absl import app
from absl import flags
from flax import traverse_util

from mmldm_jax import config_lib
from mmldm_jax.convert import common

KINDS = ("vae", "unet", "hifigan")

_KIND = flags.DEFINE_enum("kind", None, KINDS, "Which model the checkpoint holds.")
_SRC = flags.DEFINE_string("src", None, "Checkpoint file (.safetensors, .bin, .ckpt, .pth).")
_DST = flags.DEFINE_string("dst", None, "Output file (Flax msgpack params).")
_CONFIG = flags.DEFINE_string("config", "configs/aist.py",
                              "Config file (and preset) that sizes the model, e.g. configs/aist.py.")


def convert(kind: str, src: str, config) -> tuple[dict, dict]:
  """(params, report) for a checkpoint of `kind`."""
  if kind == "vae":
    from mmldm_jax.convert import vae
    return vae.convert_vae_file(src, config)
  if kind == "unet":
    from mmldm_jax.convert import unet
    return unet.convert_unet_file(src, config)
  if kind == "hifigan":
    from mmldm_jax.convert import hifigan
    params = hifigan.load_hifigan(src, config)
    return params, dict(format="hifigan", tensors=len(traverse_util.flatten_dict(params)))
  raise ValueError(f"--kind={kind!r}: expected one of {', '.join(KINDS)}")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  for flag in (_KIND, _SRC, _DST):
    if flag.value is None:
      raise app.UsageError(f"--{flag.name} is required")
  config = config_lib.load(_CONFIG.value)
  try:
    params, report = convert(_KIND.value, _SRC.value, config)
  except (FileNotFoundError, common.ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  flat = traverse_util.flatten_dict(common.unbox(params))
  count = sum(int(np.prod(np.shape(v))) for v in flat.values())
  common.save_params(_DST.value, params)
  details = ", ".join(f"{k}={v}" for k, v in report.items())
  print(f"{_SRC.value}: {details}; {len(flat)} arrays, {count:,} parameters -> {_DST.value}")
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
