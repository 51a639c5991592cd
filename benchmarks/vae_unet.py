"""Times our SD VAE and SD-1.5 U-Net against diffusers' on the same machine, in one run.

  python benchmarks/vae_unet.py                      # print the table rows
  python benchmarks/vae_unet.py --append             # also append them to benchmarks/README.md

Full-size models (SD KL-f8 VAE, SD-1.5 U-Net), fp32, random weights. Ours: `jax.jit`, timed after a
warm-up (compile) call; diffusers: eager PyTorch, also after a warm-up call. Each figure is the best of
`--repeats` timed calls. "fwd+bwd" is the gradient of the mean squared output with respect to every
parameter. The phases run one after another and free their models, so peak memory is one model's
parameters + gradients (about 7 GB for the U-Net).

Reference workload: 256x256 frames through the VAE, and the U-Net decoding 16 frames + 1 audio image =
17 items at 32x32 latents with 82 context tokens. The defaults are smaller (VAE 1x128x128, U-Net batch 1,
one timed call) because on the shared 2-core CPU even these took 11 minutes (4 min of CPU time, mostly
warm-up compiles and diffusers' fwd+bwd); each row names the sizes it used. On an accelerator, run
e.g. `--vae_size=256 --vae_batch=4 --unet_batch=17 --repeats=3`.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MACHINE = "2-core x86_64 CPU (shared), 24 GiB"


def random_params(model, *args):
  """Random params of the model's shapes, drawn on the host (values do not affect the timing, and
  compiling the full-size `init` is slow on a small CPU)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)["params"]
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * 0.02), nn.meta.unbox(shapes))


def best_time(fn, repeats: int) -> float:
  start = time.perf_counter()
  fn()  # warm-up: compile (ours) / allocator and kernel selection (torch)
  print(f"  warm-up {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def ours_vae(size: int, batch: int, repeats: int) -> dict:
  from mmldm_jax.models import vae as vae_lib
  model = vae_lib.AutoencoderKL()
  images = jax.random.uniform(jax.random.key(1), (batch, size, size, 3), minval=-1, maxval=1)
  params = random_params(model, images)
  forward = jax.jit(lambda p, x: model.apply({"params": p}, x)[0])
  grads = jax.jit(jax.grad(lambda p, x: jnp.mean(jnp.square(model.apply({"params": p}, x)[0]))))
  result = {"fwd": best_time(lambda: forward(params, images).block_until_ready(), repeats),
            "fwd+bwd": best_time(lambda: jax.block_until_ready(grads(params, images)), repeats)}
  del params
  return result


def torch_vae(size: int, batch: int, repeats: int) -> dict:
  import torch
  from diffusers import AutoencoderKL
  model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        latent_channels=4)
  images = torch.rand(batch, 3, size, size) * 2 - 1

  def forward():
    with torch.no_grad():
      model.decode(model.encode(images).latent_dist.mode())

  def forward_backward():
    model.zero_grad(set_to_none=True)
    out = model.decode(model.encode(images).latent_dist.mode()).sample
    out.square().mean().backward()

  result = {"fwd": best_time(forward, repeats), "fwd+bwd": best_time(forward_backward, repeats)}
  del model
  return result


def unet_inputs(batch: int, tokens: int = 82):
  rng = np.random.default_rng(0)
  return (rng.normal(size=(batch, 32, 32, 4)).astype(np.float32),
          rng.integers(0, 1000, batch).astype(np.float32),
          rng.normal(size=(batch, tokens, 768)).astype(np.float32))


def ours_unet(batch: int, repeats: int) -> dict:
  from mmldm_jax.models import unet as unet_lib
  model = unet_lib.UNet()
  x, t, context = (jnp.asarray(a) for a in unet_inputs(batch))
  params = random_params(model, x, t, context)
  forward = jax.jit(lambda p: model.apply({"params": p}, x, t, context))
  grads = jax.jit(jax.grad(lambda p: jnp.mean(jnp.square(model.apply({"params": p}, x, t, context)))))
  result = {"fwd": best_time(lambda: forward(params).block_until_ready(), repeats),
            "fwd+bwd": best_time(lambda: jax.block_until_ready(grads(params)), repeats)}
  del params
  return result


def torch_unet(batch: int, repeats: int) -> dict:
  import torch
  from diffusers import UNet2DConditionModel
  model = UNet2DConditionModel(sample_size=32, cross_attention_dim=768, attention_head_dim=8)
  x, t, context = (torch.from_numpy(a) for a in unet_inputs(batch))
  x = x.permute(0, 3, 1, 2).contiguous()

  def forward():
    with torch.no_grad():
      model(x, t, context)

  def forward_backward():
    model.zero_grad(set_to_none=True)
    model(x, t, context).sample.square().mean().backward()

  result = {"fwd": best_time(forward, repeats), "fwd+bwd": best_time(forward_backward, repeats)}
  del model
  return result


def rows(args) -> list[str]:
  date = datetime.date.today().isoformat()
  command = (f"python benchmarks/vae_unet.py --vae_size={args.vae_size} --vae_batch={args.vae_batch} "
             f"--unet_batch={args.unet_batch} --repeats={args.repeats}")
  lines = []
  phases = [("SD VAE encode+decode", f"{args.vae_batch}x{args.vae_size}x{args.vae_size}",
             lambda: ours_vae(args.vae_size, args.vae_batch, args.repeats),
             lambda: torch_vae(args.vae_size, args.vae_batch, args.repeats)),
            ("SD-1.5 U-Net", f"batch {args.unet_batch} x 32x32x4, context 82x768 (reference batch 17)",
             lambda: ours_unet(args.unet_batch, args.repeats),
             lambda: torch_unet(args.unet_batch, args.repeats))]
  for name, shape, ours_fn, peer_fn in phases:
    print(f"{name}: ours, then diffusers", file=sys.stderr, flush=True)
    ours = ours_fn()
    gc.collect()
    peer = peer_fn()
    gc.collect()
    for mode in ("fwd", "fwd+bwd"):
      lines.append(f"| {name} {mode}, {shape}, fp32, s/call (peer: diffusers 0.42.1, torch 2.13 "
                   f"eager) | `{command}` | {MACHINE} | {date} | {ours[mode]:.2f} | "
                   f"{peer[mode]:.2f} | {ours[mode] / peer[mode]:.2f} |")
      print(lines[-1], flush=True)
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vae_size", type=int, default=128)
  parser.add_argument("--vae_batch", type=int, default=1)
  parser.add_argument("--unet_batch", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("--append", action="store_true", help="append the rows to benchmarks/README.md")
  args = parser.parse_args()
  from mmldm_jax import parallel
  parallel.set_cpu_xla_flags()  # the entry point's XLA:CPU flags, before the first computation
  lines = rows(args)
  if args.append:
    readme = os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")
    with open(readme, "a") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
