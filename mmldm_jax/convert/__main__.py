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


def _define_flags() -> None:
  """Flags exist only when this file runs as a program, so importing it (tests) defines none and
  cannot clash with other modules' flags (e.g. main's --config)."""
  flags.DEFINE_enum("kind", None, KINDS, "Which model the checkpoint holds.")
  flags.DEFINE_string("src", None, "Checkpoint file (.safetensors, .bin, .ckpt, .pth).")
  flags.DEFINE_string("dst", None, "Output file (Flax msgpack params).")
  flags.DEFINE_string("config", "configs/aist.py",
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


def run(kind: str, src: str, dst: str, config_path: str) -> str:
  """Converts `src` and writes `dst`; returns the one-line report. Raises on any problem."""
  config = config_lib.load(config_path)
  params, report = convert(kind, src, config)
  flat = traverse_util.flatten_dict(common.unbox(params))
  count = sum(int(np.prod(np.shape(v))) for v in flat.values())
  common.save_params(dst, params)
  details = ", ".join(f"{k}={v}" for k, v in report.items())
  return f"{src}: {details}; {len(flat)} arrays, {count:,} parameters -> {dst}"


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  values = flags.FLAGS
  for name in ("kind", "src", "dst"):
    if values[name].value is None:
      raise app.UsageError(f"--{name} is required")
  try:
    print(run(values.kind, values.src, values.dst, values.config))
  except (FileNotFoundError, common.ConversionError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  _define_flags()
  sys.exit(app.run(main))
