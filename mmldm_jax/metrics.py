"""Training metrics: JSONL + TensorBoard (tensorboardX, no TensorFlow) + absl log lines with an ETA.

The train loop hands each step's metrics over as device arrays; `MetricsWriter.step` keeps them and
writes them ONE STEP LATE, when the next step has been dispatched, so reading them never stalls the
device queue. Throughput metrics come from host timers:
  steps_per_s, examples_per_s   over the steps since the last write
  data_wait_fraction            share of that wall time spent waiting for the input pipeline
  mfu                           model FLOPs utilisation, when the model's FLOPs per example are known and
                                the device kind is in `PEAK_FLOPS` (CPU is not: MFU is omitted there)
Sample images (uint8 HWC) and audio (float waveform) go to TensorBoard (process 0 only).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging

# Dense bf16 peak FLOP/s per device (one jax device), from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,        # v5p
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,   # Trillium (v6e)
    "TPU v6e": 918e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind; None when unknown (e.g. CPU)."""
  if device_kind in PEAK_FLOPS:
    return PEAK_FLOPS[device_kind]
  # Longest table key that prefixes the reported kind ("NVIDIA H100 80GB HBM3" variants).
  matches = [key for key in PEAK_FLOPS if device_kind.startswith(key)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


# PSNR's ceiling: the mean squared error is floored at this, so identical images score
# 10 log10(range^2 / 1e-10) (106 dB for images in [-1, 1]) instead of infinity.
PSNR_MIN_MSE = 1e-10


def psnr(images, references, data_range: float = 2.0):
  """Peak signal-to-noise ratio in dB of each image [N, ...] against its reference (same shape),
  for values spanning `data_range` (2 for [-1, 1]). Identical images give the documented ceiling
  (`PSNR_MIN_MSE`), not infinity. Works on numpy and jax arrays."""
  import jax.numpy as jnp
  axes = tuple(range(1, images.ndim))
  mse = jnp.mean(jnp.square(images.astype(jnp.float32) - references.astype(jnp.float32)), axis=axes)
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, PSNR_MIN_MSE))


def frame_order_accuracy(decoded, real, tolerance: int = 1):
  """Whether decoded clips put each frame's content in its own frame: for every decoded frame k
  of a clip, the real frame of the same clip nearest to it (mean squared error); the share of
  frames whose nearest real frame lies within `tolerance` frames of k.

  decoded, real: [N, F, H, W, C] (any value range, the same for both). Static parts (a background)
  are the same in every real frame, so only what moves decides the match: a decoder that ignores
  the frame index draws one picture for every k and scores about `frame_order_chance(F)`; one
  that places moving objects frame by frame scores near 1. Returns (accuracy, chance).
  NumPy on the host (F^2 image comparisons per clip)."""
  import numpy as np
  decoded = np.asarray(decoded, np.float32)
  real = np.asarray(real, np.float32)
  if decoded.shape != real.shape or decoded.ndim != 5:
    raise ValueError(f"frame_order_accuracy: decoded {decoded.shape} and real {real.shape} must "
                     f"both be [N, F, H, W, C]")
  frames = decoded.shape[1]
  flat_decoded = decoded.reshape(decoded.shape[:2] + (-1,))
  flat_real = real.reshape(real.shape[:2] + (-1,))
  # [N, F decoded, F real] squared distances, without an [N, F, F, H*W*C] temporary.
  distance = (np.sum(flat_decoded ** 2, -1)[:, :, None] + np.sum(flat_real ** 2, -1)[:, None, :]
              - 2.0 * np.einsum("nkd,njd->nkj", flat_decoded, flat_real))
  nearest = np.argmin(distance, axis=-1)
  hits = np.abs(nearest - np.arange(frames)[None, :]) <= tolerance
  return float(np.mean(hits)), frame_order_chance(frames, tolerance)


def frame_order_chance(frames: int, tolerance: int = 1) -> float:
  """`frame_order_accuracy` when the nearest real frame is drawn uniformly at random."""
  window = sum(min(frames - 1, k + tolerance) - max(0, k - tolerance) + 1 for k in range(frames))
  return window / frames ** 2


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  hours, rest = divmod(seconds, 3600)
  return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsWriter:
  """Writes one stage's metrics under `log_dir` (metrics.jsonl and TensorBoard event files).

  Args:
    log_dir: folder for `metrics.jsonl` and the event files (process 0 writes; others only log).
    total_steps: the stage's final step, for the ETA.
    global_batch_size: examples per step, for examples/s and MFU.
    log_every: write every this many steps (and the last step).
    flops_per_example: training FLOPs (forward + backward) per example, or None (no MFU).
  """

  def __init__(self, log_dir: str, *, total_steps: int, global_batch_size: int, log_every: int,
               flops_per_example: float | None = None):
    self.log_dir = log_dir
    self.total_steps = total_steps
    self.global_batch_size = global_batch_size
    self.log_every = max(1, int(log_every))
    self.is_writer = jax.process_index() == 0
    peak = peak_flops(jax.devices()[0].device_kind)
    self.peak_flops_total = peak * jax.device_count() if peak else None
    self.flops_per_example = flops_per_example
    self._pending: tuple[int, Any] | None = None
    self._window_start = time.perf_counter()
    self._window_steps = 0
    self._window_wait = 0.0
    self._jsonl = None
    self._tb = None
    if self.is_writer:
      os.makedirs(log_dir, exist_ok=True)
      import tensorboardX  # imported here: only the writing process needs it
      self._jsonl = open(os.path.join(log_dir, "metrics.jsonl"), "a", encoding="utf-8")
      self._tb = tensorboardX.SummaryWriter(log_dir)

  # --- the per-step entry point ---------------------------------------------------------------------
  def step(self, step: int, device_metrics: Mapping[str, Any], *, data_wait_s: float,
           extra: Mapping[str, float] | None = None) -> None:
    """Records step `step` (its metrics still on the device) and writes the previous step if due."""
    self._window_steps += 1
    self._window_wait += data_wait_s
    self._flush_pending()
    if step % self.log_every == 0 or step == self.total_steps:
      self._pending = (step, dict(device_metrics), dict(extra or {}))

  def flush(self) -> None:
    """Writes the step still held back (call at the end of training)."""
    self._flush_pending()
    if self._tb is not None:
      self._tb.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def _flush_pending(self) -> None:
    if self._pending is None:
      return
    step, device_metrics, extra = self._pending
    self._pending = None
    values = {name: float(np.asarray(value)) for name, value in jax.device_get(device_metrics).items()}
    values.update(extra)
    now = time.perf_counter()
    elapsed = max(now - self._window_start, 1e-9)
    steps_per_s = self._window_steps / elapsed
    if self._window_steps:  # (none at the final flush: no throughput to report)
      values["steps_per_s"] = steps_per_s
      values["examples_per_s"] = steps_per_s * self.global_batch_size
      values["data_wait_fraction"] = min(1.0, self._window_wait / elapsed)
      if self.flops_per_example and self.peak_flops_total:
        values["mfu"] = values["examples_per_s"] * self.flops_per_example / self.peak_flops_total
    self._window_start, self._window_steps, self._window_wait = now, 0, 0.0
    self.scalars(step, values)
    eta = (_format_duration((self.total_steps - step) / steps_per_s) if steps_per_s > 0 else "?")
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
    logging.info("step %d/%d %s eta %s", step, self.total_steps, shown, eta)

  # --- direct writers -------------------------------------------------------------------------------
  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if not self.is_writer:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)

  def images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """uint8 images, each [H, W, 3] or a batch [N, H, W, 3] (shown as a row); to TensorBoard and,
    to look at without it, as `<log_dir>/media/<name>_<step>.png`."""
    if not self.is_writer:
      return
    from PIL import Image
    for name, image in images.items():
      image = np.asarray(image)
      if image.ndim == 4:
        image = np.concatenate(list(image), axis=1)
      self._tb.add_image(name, image, step, dataformats="HWC")
      Image.fromarray(image).save(self._media_path(name, step, "png"))

  def audio(self, step: int, clips: Mapping[str, np.ndarray], sample_rate: int) -> None:
    """Float waveforms in [-1, 1], each [N] (one mono clip); to TensorBoard and as
    `<log_dir>/media/<name>_<step>.wav`."""
    if not self.is_writer:
      return
    from mmldm_jax.data import video as video_lib
    for name, waveform in clips.items():
      waveform = np.clip(np.asarray(waveform, np.float32), -1, 1)
      self._tb.add_audio(name, waveform[:, None], step, sample_rate=sample_rate)
      video_lib.write_wav(self._media_path(name, step, "wav"), waveform, sample_rate)

  def _media_path(self, name: str, step: int, extension: str) -> str:
    folder = os.path.join(self.log_dir, "media")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f"{name.replace('/', '_')}_{step}.{extension}")

  def close(self) -> None:
    self.flush()
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
