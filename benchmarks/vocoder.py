"""HiFi-GAN V1 forward time: ours (jitted Flax) vs transformers' SpeechT5HifiGan (PyTorch), same run.

    python benchmarks/vocoder.py [--frames=275] [--batch_sizes=1,8] [--repeats=1]

Full-size V1 generator (13.9 M parameters), random weights (speed does not depend on them), 275 mel
frames = 1.6 s of audio at hop 256 / 44.1 kHz (MM-LDM's clip). Both sides run fp32 on the default device
of their framework (CPU here); each figure is the median of `--repeats` timed calls after one untimed
call (`timing.median_seconds`); ours is compiled ahead of time (not timed). Prints one Markdown table
row per batch size for benchmarks/README.md. About a minute on an idle 2-core CPU on a fast evening
(2026-12-07), 3 minutes on slower days (PyTorch at batch 8 dominates).
"""
import argparse
import os
import platform
import sys
import time

import jax
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmldm_jax import config_lib  # noqa: E402
from mmldm_jax import parallel  # noqa: E402
from mmldm_jax.models import vocoder  # noqa: E402
from timing import median_seconds  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--frames", type=int, default=275)
  parser.add_argument("--batch_sizes", default="1,8")
  parser.add_argument("--repeats", type=int, default=1)
  args = parser.parse_args()
  parallel.set_cpu_xla_flags()  # the entry point's XLA:CPU flags, before the first computation

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config = config_lib.load(os.path.join(root, "configs", "aist.py"))
  section = config.vocoder
  reference_model = transformers.SpeechT5HifiGan(transformers.SpeechT5HifiGanConfig(
      model_in_dim=section.num_mels, upsample_initial_channel=section.upsample_initial_channel,
      upsample_rates=list(section.upsample_rates),
      upsample_kernel_sizes=list(section.upsample_kernel_sizes),
      resblock_kernel_sizes=list(section.resblock_kernel_sizes),
      resblock_dilation_sizes=[list(d) for d in section.resblock_dilation_sizes],
      normalize_before=False)).eval()
  model = vocoder.generator_from_config(config)
  params = vocoder.init_params(config, jax.random.key(0))
  apply_fn = jax.jit(lambda params, mel: model.apply({"params": params}, mel))

  memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  machine = (f"{os.cpu_count()}-core {platform.machine()} {jax.default_backend().upper()}, "
             f"{memory_gib:.0f} GiB")
  date = time.strftime("%Y-%m-%d")
  for batch in (int(b) for b in args.batch_sizes.split(",")):
    mel = np.random.RandomState(0).randn(batch, args.frames, section.num_mels).astype(np.float32)
    mel_torch = torch.from_numpy(mel)
    compiled = apply_fn.lower(params, mel).compile()
    ours = median_seconds(lambda: compiled(params, mel).block_until_ready(), args.repeats)

    def run_peer():
      with torch.inference_mode():
        reference_model(mel_torch)

    peer = median_seconds(run_peer, args.repeats)
    seconds = args.frames * vocoder.hop_length(config) / config.audio.sample_rate
    command = " ".join(["python", "benchmarks/vocoder.py"] + sys.argv[1:])
    print(f"| HiFi-GAN V1 forward, {args.frames} mel frames ({seconds:.1f} s at "
          f"{config.audio.sample_rate} Hz), batch {batch}, fp32 (peer: transformers SpeechT5HifiGan) | "
          f"`{command}` | {machine} | "
          f"{date} | {ours:.3f} s | {peer:.3f} s | {ours / peer:.2f} |", flush=True)


if __name__ == "__main__":
  main()
