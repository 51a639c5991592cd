"""The demo VAE's training step at two channel widths, measured in one process, alternating.

  python benchmarks/vae_widths.py [--config=configs/demo.py] [--repeats=6]
      [--peer_mult=1,2,2,2] [--append-readme]

Times the gradient of the VAE's training loss (`models.vae.generator_loss`, no discriminator, as
the demo trains it) on one batch of random images shaped like the demo's VAE batch (8 clips x (2
target frames + 1 audio image) = 24 images of 64x64), jitted, for the config's
`vae.channel_mult` ("ours") and for `--peer_mult` (the tiny preset's widths, what the demo used
before 2026-12-03). The two alternate `--repeats` times so that a noisy, shared machine slows both
alike; the figures are medians. Parameters are counted as well, since a narrower VAE is cheaper
because it is smaller.

Why this matters: on XLA:CPU the weight gradient of a 3x3 convolution with 32 or more channels at
64x64 or 32x32 takes 2 to 25 times its forward (and varies several-fold between calls of one
process), so the widths of the VAE's two outer levels decide most of its step time.

Cost: about 2 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = "2-core x86_64 CPU, 24 GiB"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--repeats", type=int, default=6)
  parser.add_argument("--peer_mult", default="1,2,2,2")
  parser.add_argument("--append-readme", action="store_true")
  args = parser.parse_args()

  sys.path.insert(0, REPO)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import numpy as np
  from mmldm_jax import config_lib, parallel
  from mmldm_jax.models import vae as vae_lib
  parallel.set_cpu_xla_flags()  # the entry point's XLA:CPU flags, before the first computation

  base = config_lib.load(os.path.join(REPO, args.config))
  try:
    peer_mult = tuple(int(x) for x in args.peer_mult.split(","))
  except ValueError:
    raise SystemExit(f"--peer_mult={args.peer_mult!r}: expected comma-separated integers, "
                     "e.g. 1,2,2,2") from None
  if len(peer_mult) != len(base.vae.channel_mult):
    raise SystemExit(f"--peer_mult={args.peer_mult!r}: expected {len(base.vae.channel_mult)} "
                     f"levels, as {args.config}'s vae.channel_mult {tuple(base.vae.channel_mult)}")
  ours_mult = tuple(base.vae.channel_mult)
  if ours_mult == peer_mult:
    raise SystemExit(f"{args.config}: vae.channel_mult is already {ours_mult}; pass another "
                     "--peer_mult to compare against")
  size = base.data.image_size
  frames_per_clip = base.vae.frames_per_clip or base.data.num_target_frames
  images_per_batch = base.train_vae.batch_size * (frames_per_clip + 1)
  images = np.random.default_rng(0).uniform(-1, 1, (images_per_batch, size, size, 3)
                                            ).astype(np.float32)

  steps = {}
  for name, mult in (("ours", ours_mult), ("peer", peer_mult)):
    config = config_lib.load(os.path.join(REPO, args.config))
    config.vae.channel_mult = mult
    vae = vae_lib.build_vae(config)
    params = vae.init(jax.random.key(0), images[:1])["params"]

    def gradient(params, images, config=config, vae=vae):
      loss = lambda p: vae_lib.generator_loss(p, None, images, jax.random.key(1), 0,
                                              config=config, vae=vae)[0]
      return jax.grad(loss)(params)
    step = jax.jit(gradient)
    jax.block_until_ready(step(params, images))   # compile
    count = sum(leaf.size for leaf in jax.tree.leaves(params))
    steps[name] = (step, params, count, [])

  for _ in range(args.repeats):
    for name, (step, params, _, times) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(params, images))
      times.append(time.perf_counter() - start)

  ours, peer = (float(np.median(steps[name][3])) for name in ("ours", "peer"))
  date = datetime.date.today().isoformat()
  command = f"`python benchmarks/vae_widths.py --config={args.config}`"
  row = (f"| VAE training step ({os.path.basename(args.config)}, {images_per_batch} images of "
         f"{size}x{size}, no discriminator), channel_mult {ours_mult} "
         f"({steps['ours'][2] / 1e6:.2f}M parameters) vs {peer_mult} "
         f"({steps['peer'][2] / 1e6:.2f}M), s (median of {args.repeats}, alternating) | "
         f"{command} | {MACHINE} | {date} | {ours:.3f} | {peer:.3f} | {ours / peer:.2f} |")
  print(row)
  if args.append_readme:
    with open(os.path.join(REPO, "benchmarks", "README.md"), "a") as readme:
      readme.write(row + "\n")


if __name__ == "__main__":
  main()
