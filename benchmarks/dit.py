"""DiT generator: training-step time against a plain-PyTorch DiT of the same shape, and sampler cost.

    python benchmarks/dit.py [--depth=4] [--batch=2] [--repeats=3] [--sample_steps=10]

Rows (paper width 1152, 16 heads, MLP 4x, 399 tokens: 77 context + EOS_a + 64 audio + EOS_v + 256
video; depth 4 so it fits this CPU; fp32; batch 2):
  1. one training step, forward + backward (gradients of the eps-MSE loss w.r.t. every parameter).
     Ours: `dit.generator_loss` under jax.jit (value_and_grad), no remat, layers scanned (the
     default, `dit.scan_layers=True`), the same stacked parameters applied block by block
     (`dit.unroll_scanned_layers=True`) and unrolled (`scan_layers=False`). Peer: a
     compact PyTorch DiT with the reference's structure (conv patch embeds, timm-style Attention with
     qkv bias and Mlp with tanh-GELU, adaLN-Zero, two FinalLayers), loss.backward().
  2. one DDIM sampler step with guidance (both branches batched, 2 x batch), ms/step: ours (the
     `lax.scan` sampler under jit, total / steps) vs a PyTorch loop doing the same guided DDIM step.
  3. one block's self-attention alone (the 399 tokens, 16 heads of 72), forward and forward +
     backward: ours (`layers.dot_product_attention`) against `jax.nn.dot_product_attention` (what
     ours called before 2026-12-07) and against torch's fused scaled_dot_product_attention.
Each figure is the median of `--repeats` timed calls after a warm-up call (which compiles ours); the
functions of a row take turns, call by call, so that a slow minute of a shared machine falls on
all of them. Prints Markdown rows for benchmarks/README.md. About 2 minutes on a 2-core CPU on a
fast evening (2026-12-07, matmul ~450 GFLOP/s), 8 minutes on that day's slow afternoon.
"""
import argparse
import functools
import math
import os
import sys
import time

import flax.linen as flax_nn
import jax
import numpy as np
import torch
from torch import nn as tnn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmldm_jax import config_lib  # noqa: E402
from mmldm_jax import parallel  # noqa: E402
from mmldm_jax.diffusion import samplers, schedules  # noqa: E402
from mmldm_jax.models import dit, layers  # noqa: E402
from timing import alternating_medians  # noqa: E402

MACHINE = "2-core x86_64 CPU (shared), 24 GiB"


# ------------------------------------------------------------------------------------------------
# The PyTorch peer: the reference DiT's computation in plain torch (timm is not installable here).


class TorchBlock(tnn.Module):
  def __init__(self, width, heads):
    super().__init__()
    self.heads = heads
    self.qkv, self.proj = tnn.Linear(width, 3 * width), tnn.Linear(width, width)
    self.fc1, self.fc2 = tnn.Linear(width, 4 * width), tnn.Linear(4 * width, width)
    self.ada = tnn.Linear(width, 6 * width)

  def forward(self, x, c):
    shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(tnn.functional.silu(c)).chunk(6, 1)
    norm = lambda h: tnn.functional.layer_norm(h, h.shape[-1:], eps=1e-6)
    h = norm(x) * (1 + scale1[:, None]) + shift1[:, None]
    b, n, w = h.shape
    q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
    h = tnn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
    x = x + gate1[:, None] * self.proj(h)
    h = norm(x) * (1 + scale2[:, None]) + shift2[:, None]
    return x + gate2[:, None] * self.fc2(tnn.functional.gelu(self.fc1(h), approximate="tanh"))


class TorchDiT(tnn.Module):
  def __init__(self, width, depth, heads, channels=16, context_dim=768, audio=64, video=256):
    super().__init__()
    self.audio, self.video = audio, video
    self.x_audio, self.x_video = tnn.Conv2d(channels, width, 1), tnn.Conv2d(channels, width, 1)
    self.c_audio, self.c_video = tnn.Conv2d(channels, width, 1), tnn.Conv2d(channels, width, 1)
    self.mod_audio = tnn.Parameter(torch.randn(1, audio, width) * 0.01)
    self.mod_video = tnn.Parameter(torch.randn(1, video, width) * 0.01)
    self.register_buffer("pos_audio", torch.randn(1, audio, width))
    self.register_buffer("pos_video", torch.randn(1, video, width))
    self.eos_audio, self.eos_video = (tnn.Parameter(torch.randn(1, 1, width)) for _ in range(2))
    self.c_embedder = tnn.Linear(context_dim, width)
    self.t_mlp = tnn.Sequential(tnn.Linear(256, width), tnn.SiLU(), tnn.Linear(width, width))
    self.blocks = tnn.ModuleList(TorchBlock(width, heads) for _ in range(depth))
    self.final = tnn.ModuleList(tnn.ModuleDict(dict(ada=tnn.Linear(width, 2 * width),
                                                    linear=tnn.Linear(width, channels)))
                                for _ in range(2))

  def forward(self, audio, video, t, context, cond_audio, cond_video):
    tokens = lambda conv, x: conv(x).flatten(2).transpose(1, 2)
    a = tokens(self.x_audio, audio) + tokens(self.c_audio, cond_audio) + self.pos_audio + self.mod_audio
    v = tokens(self.x_video, video) + tokens(self.c_video, cond_video) + self.pos_video + self.mod_video
    b = a.shape[0]
    ctx = self.c_embedder(context)
    x = torch.cat([ctx, self.eos_audio.expand(b, -1, -1), a, self.eos_video.expand(b, -1, -1), v], 1)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    c = self.t_mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))
    for block in self.blocks:
      x = block(x, c)
    x = x[:, ctx.shape[1]:]
    outs = []
    for final, hidden, side in ((self.final[0], x[:, 1:1 + self.audio], 8),
                                (self.final[1], x[:, -self.video:], 16)):
      shift, scale = final["ada"](tnn.functional.silu(c)).chunk(2, 1)
      h = tnn.functional.layer_norm(hidden, hidden.shape[-1:], eps=1e-6)
      h = final["linear"](h * (1 + scale[:, None]) + shift[:, None])
      outs.append(h.transpose(1, 2).reshape(b, -1, side, side))
    return outs


# ------------------------------------------------------------------------------------------------


def training_rows(config, model, batch_size, repeats):
  """Median training-step seconds: ours with scanned layers, with the stacked layers applied
  unrolled, with unrolled layers; the PyTorch peer."""
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  batch = {"audio_latent": jax.random.normal(keys[0], (batch_size,) + model.audio_shape),
           "video_latent": jax.random.normal(keys[1], (batch_size,) + model.video_shape)}

  def ours_with(variant):
    params = jax.jit(lambda key: flax_nn.unbox(dit.init_params(variant, key)))(jax.random.PRNGKey(0))
    grad_fn = jax.jit(jax.value_and_grad(
        functools.partial(dit.generator_loss, config=config, model=variant), has_aux=True))

    def step():
      (_, _), grads = grad_fn(params, batch, jax.random.PRNGKey(2))
      jax.block_until_ready(grads)
    return step, params

  ours_scanned, params = ours_with(model)
  ours_straight, _ = ours_with(model.clone(unroll_stacked=True))
  ours_unrolled, _ = ours_with(model.clone(scan_layers=False))

  torch.manual_seed(0)
  peer_model = TorchDiT(model.hidden_size, model.depth, model.num_heads)
  alphas = torch.from_numpy(np.array(schedules.make_schedule(config.diffusion).alphas_cumprod))
  audio = torch.randn(batch_size, 16, 8, 8)
  video = torch.randn(batch_size, 16, 16, 16)
  context = torch.randn(batch_size, 77, 768) * 0.1

  def peer():
    peer_model.zero_grad(set_to_none=True)
    t = torch.randint(0, 1000, (batch_size,))
    a = alphas[t].sqrt()[:, None, None, None]
    s = (1 - alphas[t]).sqrt()[:, None, None, None]
    noise_a, noise_v = torch.randn_like(audio), torch.randn_like(video)
    eps_a, eps_v = peer_model(a * audio + s * noise_a, a * video + s * noise_v, t, context,
                              torch.zeros_like(audio), torch.zeros_like(video))
    loss = ((eps_a - noise_a) ** 2).mean() + ((eps_v - noise_v) ** 2).mean()
    loss.backward()

  times = alternating_medians([ours_scanned, ours_straight, ours_unrolled, peer], repeats)
  return (*times, params, peer_model)


def sampler_rows(config, model, params, peer_model, batch_size, steps, repeats):
  sample_config = config.copy_and_resolve_references()
  sample_config.unlock()
  sample_config.sample.update(steps=steps, sampler="ddim", guidance_audio=9.0, guidance_video=9.0)
  run = jax.jit(lambda p, key: dit.sample_latents(p, sample_config, key, batch_size, model=model))

  def ours():
    jax.block_until_ready(run(params, jax.random.PRNGKey(3)))

  alphas = np.asarray(schedules.make_schedule(config.diffusion).alphas_cumprod, np.float64)
  grid = samplers.ddim_timesteps(1000, steps)[::-1]
  context = torch.randn(batch_size, 77, 768) * 0.1

  @torch.no_grad()
  def peer():
    audio, video = torch.randn(batch_size, 16, 8, 8), torch.randn(batch_size, 16, 16, 16)
    both_context = torch.cat([torch.zeros_like(context), context])
    zeros_a, zeros_v = torch.zeros(2 * batch_size, 16, 8, 8), torch.zeros(2 * batch_size, 16, 16, 16)
    for index, t in enumerate(grid):
      a_t = float(alphas[t])
      a_prev = float(alphas[grid[index + 1]]) if index + 1 < len(grid) else float(alphas[0])
      tt = torch.full((2 * batch_size,), int(t))
      eps_a, eps_v = peer_model(torch.cat([audio] * 2), torch.cat([video] * 2), tt, both_context,
                                zeros_a, zeros_v)
      outs = []
      for x, eps in ((audio, eps_a), (video, eps_v)):
        e_u, e_c = eps.chunk(2)
        e = e_u + 9.0 * (e_c - e_u)
        x0 = (x - math.sqrt(1 - a_t) * e) / math.sqrt(a_t)
        outs.append(math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * e)
      audio, video = outs

  ours_time, peer_time = alternating_medians([ours, peer], repeats)
  return ours_time / steps, peer_time / steps


def attention_rows(batch_size, width, heads, repeats):
  """Median ms of one self-attention, forward and forward + backward: ours, jax.nn's, torch's."""
  tokens, head_dim = 399, width // heads
  keys = jax.random.split(jax.random.PRNGKey(4), 4)
  query, key, value, cotangent = (jax.random.normal(k, (batch_size, tokens, width)) for k in keys)

  def jax_nn(q, k, v):
    split = lambda t: t.reshape(batch_size, tokens, heads, head_dim)
    return jax.nn.dot_product_attention(split(q), split(k), split(v)).reshape(q.shape)

  def timed(attention):
    forward = jax.jit(attention)
    both = jax.jit(lambda q, k, v, g: jax.vjp(attention, q, k, v)[1](g))
    return (lambda: jax.block_until_ready(forward(query, key, value)),
            lambda: jax.block_until_ready(both(query, key, value, cotangent)))

  ours_forward, ours_both = timed(lambda q, k, v: layers.dot_product_attention(q, k, v, heads))
  nn_forward, nn_both = timed(jax_nn)
  torch_inputs = [torch.randn(batch_size, heads, tokens, head_dim, requires_grad=True)
                  for _ in range(3)]
  torch_cotangent = torch.randn(batch_size, heads, tokens, head_dim)
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def torch_forward():
    with torch.no_grad():
      sdpa(*torch_inputs)

  def torch_both():
    for tensor in torch_inputs:   # fresh gradients each call, as the training peer's zero_grad
      tensor.grad = None
    sdpa(*torch_inputs).backward(torch_cotangent)

  times = alternating_medians([ours_forward, nn_forward, torch_forward, ours_both, nn_both,
                               torch_both], repeats)
  return [1e3 * t for t in times]


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--depth", type=int, default=4)
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sample_steps", type=int, default=10)
  parser.add_argument("--xla_defaults", action="store_true",
                      help="run ours with XLA:CPU's default flags instead of the ones the entry "
                           "point sets (parallel.CPU_XLA_FLAGS)")
  args = parser.parse_args()
  # Before JAX's first computation, as in the entry point.
  added = [] if args.xla_defaults else parallel.set_cpu_xla_flags()
  ours_with = ("XLA:CPU's defaults" if args.xla_defaults else
               " ".join(added) or f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}")
  command = "python benchmarks/dit.py" + (" --xla_defaults" if args.xla_defaults else "")
  torch.set_num_threads(os.cpu_count() or 1)
  config = config_lib.load("configs/aist.py")
  model = dit.build_dit(config, depth=args.depth, remat="none")
  scanned, straight, unrolled, peer, params, peer_model = training_rows(config, model, args.batch,
                                                                         args.repeats)
  date = time.strftime("%Y-%m-%d")
  for layout, ours in (("layers scanned (the default)", scanned),
                       ("stacked layers applied unrolled (dit.unroll_scanned_layers=True)",
                        straight),
                       ("layers unrolled (dit.scan_layers=False)", unrolled)):
    print(f"| DiT training step fwd+bwd, width 1152 / 16 heads / depth {args.depth}, 399 tokens, "
          f"fp32, batch {args.batch}, {layout}, ours with {ours_with}: time | {command} | "
          f"{MACHINE} | {date} | {ours:.2f} s | {peer:.2f} s (plain-PyTorch DiT, same shape) | "
          f"{ours / peer:.2f} |")
  ours, peer = sampler_rows(config, model, params, peer_model, args.batch, args.sample_steps,
                            args.repeats)
  print(f"| DDIM step with guidance (2 x batch {args.batch} through the depth-{args.depth} DiT), "
        f"ours with {ours_with}: ms/step | {command} | {MACHINE} | {date} | {1e3 * ours:.0f} ms | "
        f"{1e3 * peer:.0f} ms (PyTorch loop, same step) | {ours / peer:.2f} |")
  (ours_forward, nn_forward, torch_forward, ours_both, nn_both,
   torch_both) = attention_rows(args.batch, model.hidden_size, model.num_heads, 3 * args.repeats)
  for what, ours, nn_time, torch_time in (("forward", ours_forward, nn_forward, torch_forward),
                                          ("forward + backward", ours_both, nn_both, torch_both)):
    shape = (f"{args.batch} x 399 tokens, {model.num_heads} heads of "
             f"{model.hidden_size // model.num_heads}")
    for peer_name, peer in (("jax.nn.dot_product_attention, same flags", nn_time),
                            ("torch scaled_dot_product_attention", torch_time)):
      print(f"| one DiT block's self-attention ({shape}), {what}, fp32, ours with {ours_with}: "
            f"ms | {command} | {MACHINE} | {date} | {ours:.1f} ms | {peer:.1f} ms ({peer_name}) | "
            f"{ours / peer:.2f} |")


if __name__ == "__main__":
  main()
