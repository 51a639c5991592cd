"""Audio transforms: ours (jitted JAX) vs the reference's tools (PyTorch + PIL, librosa), same run.

    python benchmarks/audio_image.py [--batch=16] [--repeats=3]

Rows (paper config: 1.6 s clips at 44.1 kHz, 80 x 275 log-mel, 256 x 256 audio image):
  1. waveform -> audio image for a batch. Ours: `audio.waveform_to_image` under jit. Peer: the
     reference's path, HiFi-GAN's torch.stft mel then, per clip, dB -> uint8 -> PIL bicubic resize.
  2. Griffin-Lim (32 iterations, momentum 0.99) from a log-mel to 1.6 s of audio for one clip.
     Ours: `audio.griffin_lim`. Peer: the same filterbank pseudo-inverse + `librosa.griffinlim`.
Each figure is the median of `--repeats` timed calls after a warm-up call (which compiles ours).
Prints Markdown table rows for benchmarks/README.md. About a minute on a 2-core CPU.
"""
import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmldm_jax import config_lib  # noqa: E402
from mmldm_jax import parallel  # noqa: E402
from mmldm_jax.data import audio  # noqa: E402
from timing import median_seconds  # noqa: E402


def reference_images(waveforms: np.ndarray, cfg, filterbank: torch.Tensor) -> np.ndarray:
  """The reference's audio images: HiFi-GAN mel (torch) then 8-bit PIL per clip."""
  pad = (cfg.n_fft - cfg.hop_length) // 2
  signal = torch.from_numpy(waveforms)[:, None]
  signal = torch.nn.functional.pad(signal, (pad, pad), mode="reflect").squeeze(1)
  spectrum = torch.stft(signal, cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                        window=torch.hann_window(cfg.win_length), center=False, normalized=False,
                        onesided=True, return_complex=True)
  magnitude = torch.sqrt(spectrum.real ** 2 + spectrum.imag ** 2 + 1e-9)
  log_mel = torch.log(torch.clamp(filterbank @ magnitude, min=1e-5)).numpy()
  images = []
  for clip in log_mel:
    level = np.clip((20 * np.log10(np.exp(clip)) - 20 + 100) / 100, 0, 1)
    picture = Image.fromarray((level * 255).astype(np.uint8)).convert("RGB")
    resized = picture.resize((cfg.image_size, cfg.image_size), Image.BICUBIC)
    images.append(np.asarray(resized, np.float32) / 127.5 - 1.0)
  return np.stack(images)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  parallel.set_cpu_xla_flags()  # the entry point's XLA:CPU flags, before the first computation

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = config_lib.load(os.path.join(root, "configs", "aist.py")).audio
  samples = int(round(1.6 * cfg.sample_rate))
  rng = np.random.default_rng(0)
  t = np.arange(samples) / cfg.sample_rate
  waveforms = (0.3 * np.sin(2 * np.pi * 440 * t)[None]
               + 0.05 * rng.standard_normal((args.batch, samples))).astype(np.float32)
  filterbank = torch.from_numpy(audio.mel_filterbank(
      cfg.filterbank_sample_rate, cfg.n_fft, cfg.num_mels, cfg.fmin, cfg.fmax).copy())

  to_image = jax.jit(lambda w: audio.waveform_to_image(w, cfg))
  device_waveforms = jnp.asarray(waveforms)
  ours_image = median_seconds(lambda: to_image(device_waveforms).block_until_ready(), args.repeats)
  peer_image = median_seconds(lambda: reference_images(waveforms, cfg, filterbank), args.repeats)

  log_mel = audio.log_mel(device_waveforms[0], cfg)
  iterations = int(cfg.griffin_lim_iters)
  ours_griffin = median_seconds(
      lambda: audio.griffin_lim(log_mel, cfg, iterations, samples).block_until_ready(), args.repeats)
  inverse_filterbank = np.linalg.pinv(filterbank.numpy().astype(np.float64)).astype(np.float32)
  pad = (cfg.n_fft - cfg.hop_length) // 2

  def peer_griffin():
    magnitude = np.maximum(0.0, inverse_filterbank @ np.exp(np.asarray(log_mel)))
    return librosa.griffinlim(magnitude, n_iter=iterations, hop_length=cfg.hop_length,
                              win_length=cfg.win_length, n_fft=cfg.n_fft, center=False,
                              length=samples + 2 * pad, momentum=0.99, random_state=0)

  peer_griffin_seconds = median_seconds(peer_griffin, args.repeats)

  memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
  device = "CPU (shared)" if jax.default_backend() == "cpu" else jax.devices()[0].device_kind
  machine = f"{os.cpu_count()}-core {platform.machine()} {device}, {memory_gib:.0f} GiB"
  date = time.strftime("%Y-%m-%d")
  command = "python benchmarks/audio_image.py"
  print(f"| waveform -> audio image, batch {args.batch} x 1.6 s @ 44.1 kHz (80x275 -> 256x256): time "
        f"| {command} | {machine} | {date} | {ours_image * 1e3:.1f} ms "
        f"| {peer_image * 1e3:.1f} ms (torch.stft HiFi-GAN mel + 8-bit PIL per clip) "
        f"| {ours_image / peer_image:.2f} |")
  print(f"| Griffin-Lim {iterations} iterations, 1.6 s @ 44.1 kHz from an 80x275 log-mel: time "
        f"| {command} | {machine} | {date} | {ours_griffin * 1e3:.1f} ms "
        f"| {peer_griffin_seconds * 1e3:.1f} ms (pinv + librosa.griffinlim) "
        f"| {ours_griffin / peer_griffin_seconds:.2f} |")


if __name__ == "__main__":
  main()
