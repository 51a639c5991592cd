"""PANNs Cnn14 embedding throughput (clips/s): ours, ours with XLA's convolution everywhere (before
`panns.conv3x3`), and a PyTorch Cnn14 of the same architecture and weights.

    python benchmarks/panns.py [--batch=8] [--seconds=1.0,1.6] [--repeats=3]

Random weights with measured BatchNorm statistics (tests/test_panns.py's `saved_torch_cnn14`,
loaded through `panns.load_cnn14` as a real `Cnn14_mAP=0.431.pth` would be); the input is a batch
of 32 kHz waveforms; the time is a call of `panns.Cnn14Embeddings` (the evaluate stage's embedder:
the waveforms to the device, the forward to the 2048-d embedding, the result back to NumPy),
median of `--repeats` timed calls after a warm-up call (which compiles ours). Cnn14's last block
sees a map of (frames / 32) x 2: 3 x 2 for 1 s clips, where XLA:CPU's convolution crawls (see
`conv3x3`), and 5 x 2 for the 1.6 s clips of the paper configs. The peer is plain PyTorch (eager,
float32, torch's CPU threads). Prints Markdown rows for benchmarks/README.md.

Cost: about 2 minutes on 2 cores (most of it the XLA-convolution runs on 1 s clips).
"""
import argparse
import datetime
import os
import sys
import tempfile
from unittest import mock

import jax
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
from mmldm_jax import parallel  # noqa: E402
from mmldm_jax.evaluation import panns  # noqa: E402
from test_panns import saved_torch_cnn14  # noqa: E402  (the parity test's Cnn14)
from timing import median_seconds  # noqa: E402

MACHINE = "2-core x86_64 CPU, 24 GiB"


def xla_conv3x3(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seconds", default="1.0,1.6")
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  parallel.set_cpu_xla_flags()
  model, path = saved_torch_cnn14(os.path.join(tempfile.mkdtemp(), panns.WEIGHTS_FILE))
  embed = panns.Cnn14Embeddings(path)          # what the evaluate stage runs
  date = datetime.date.today().isoformat()
  command = f"`python benchmarks/panns.py --batch={args.batch} --repeats={args.repeats}`"
  for seconds in (float(s) for s in args.seconds.split(",")):
    samples = int(round(seconds * panns.SAMPLE_RATE))
    rng = np.random.default_rng(0)
    waveforms = (0.3 * rng.standard_normal((args.batch, samples))).astype(np.float32)
    ours_out = embed(waveforms)
    ours = median_seconds(lambda: embed(waveforms), args.repeats)
    with mock.patch.object(panns, "conv3x3", xla_conv3x3):   # traced while patched
      before_embed = panns.Cnn14Embeddings(path)
      before = median_seconds(lambda: before_embed(waveforms), args.repeats)
    with torch.no_grad():
      peer_out = model(torch.from_numpy(waveforms))[0].numpy()
      peer = median_seconds(lambda: model(torch.from_numpy(waveforms)), args.repeats)
    difference = float(np.abs(ours_out - peer_out).max() / np.abs(peer_out).max())
    frames = samples // panns.HOP + 1
    for _ in range(len(panns.WIDTHS) - 1):   # the five 2x2 poolings
      frames //= 2
    last_map = f"{frames}x{panns.MEL_BINS // 2 ** (len(panns.WIDTHS) - 1)}"
    label = (f"PANNs Cnn14 embedding, batch {args.batch} x {seconds:g} s at 32 kHz (last block's "
             f"map {last_map}), fp32: clips/s (higher is better; ratio = ours / peer; largest "
             f"embedding difference to the peer {difference:.1e} of its largest entry)")
    for peer_name, peer_seconds in (
        ("PyTorch " + torch.__version__ + " eager Cnn14, same architecture and weights", peer),
        ("ours with XLA's convolution on every map (before `panns.conv3x3`)", before)):
      print(f"| {label} | {command} | {MACHINE} | {date} | {args.batch / ours:.3g} | "
            f"{args.batch / peer_seconds:.3g} ({peer_name}) | {peer_seconds / ours:.2f} |",
            flush=True)


if __name__ == "__main__":
  main()
