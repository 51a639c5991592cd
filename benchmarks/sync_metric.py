"""Onset detection of the synthetic-sync metric vs librosa's onset detector (what AV-Align uses).

    python benchmarks/sync_metric.py [--clips=64] [--repeats=3]

Clips: the demo geometry's synthetic videos, 1.6 s at 16 kHz, 10 fps (ground-truth events known).
Row 1: time to find the onsets of all clips. Ours: `sync.detect_onsets` (NumPy spectral flux with a
background-relative threshold, plus the pitch of every onset). Peer: `librosa.onset.onset_detect`
(spectral flux on a mel spectrogram, hop 512; onsets only).
Row 2: onset F1 against the ground truth within +-1 frame (one-to-one matching), ours vs librosa
(ratio = ours / peer, higher is better for us).
Each time is the median of `--repeats` timed passes after a warm-up pass (numba compiles librosa).
Prints Markdown table rows for benchmarks/README.md. Well under a minute on a 2-core CPU.
"""
import argparse
import datetime
import os
import sys

import librosa
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmldm_jax import config_lib  # noqa: E402
from mmldm_jax.data import synthetic  # noqa: E402
from mmldm_jax.evaluation import sync  # noqa: E402
from timing import median_seconds  # noqa: E402

MACHINE = "2-core x86_64 CPU (shared), 24 GiB"


def onset_f1(found: list[np.ndarray], clips: list[dict], fps: float) -> float:
  total = sync.SyncScore()
  for onsets, clip in zip(found, clips):
    truth = clip["events"]["frame"].astype(np.float64)
    pairs = sync.match(truth, onsets * fps, 1.0)
    total = total + sync.SyncScore(len(pairs), len(onsets) - len(pairs), len(truth) - len(pairs))
  return total.f1


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--clips", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  config = config_lib.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                        "configs", "demo.py"))
  fps, rate = config.data.fps, config.audio.sample_rate
  clips = [synthetic.generate_video(900 + n, n % config.synthetic.num_classes, config, seconds=1.6)
           for n in range(args.clips)]

  def ours():
    return [sync.detect_onsets(clip["audio"], rate)[0] for clip in clips]

  def peer():
    return [librosa.onset.onset_detect(y=clip["audio"], sr=rate, units="time") for clip in clips]

  ours_time, peer_time = median_seconds(ours, args.repeats), median_seconds(peer, args.repeats)
  ours_f1, peer_f1 = onset_f1(ours(), clips, fps), onset_f1(peer(), clips, fps)
  date = datetime.date.today().isoformat()
  command = "python benchmarks/sync_metric.py"
  what = f"onset detection, {args.clips} synthetic clips 1.6 s @ 16 kHz"
  print(f"| {what}: time | {command} | {MACHINE} | {date} | {ours_time * 1e3:.1f} ms | "
        f"{peer_time * 1e3:.1f} ms (librosa.onset.onset_detect) | {ours_time / peer_time:.2f} |")
  print(f"| {what}: F1 vs ground truth within +-1 frame at 10 fps (higher is better) | {command} | "
        f"{MACHINE} | {date} | {ours_f1:.3f} | {peer_f1:.3f} (librosa.onset.onset_detect) | "
        f"{ours_f1 / peer_f1:.2f} |")


if __name__ == "__main__":
  main()
