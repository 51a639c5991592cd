"""The synthetic sounding-video dataset: procedural clips in which sound and picture are tied by design.

One video shows 1 to `config.synthetic.max_objects` coloured objects (discs or squares) moving over a
background whose look (colours, pattern) is set by the scene class (the label). Each object travels in
straight lines from wall to wall; every time it touches a wall it makes a short percussive tone
(2 ms attack, exponential decay, gone after ~0.2 s) whose pitch is set by the object's colour
(`PALETTE`) and whose loudness by its speed. Each scene class also has a quiet, steady background sound
(a filtered noise band or a hum). Every video carries its ground truth: the event times in frames
(sub-frame precise), the object, its colour and the tone's pitch.

How the motion is built: event times are drawn first (a renewal process with a minimum gap, so that
events are separable at a +-1 frame tolerance), each event is given to an object and a wall, and the
object's path is the polyline through its wall contact points. Velocities change only at contacts, so
a reversal of a velocity component in the picture happens exactly at an event time. The same object
never bounces twice within 3.5 frames, so straight-line fits on two frames either side of a bounce
recover its time exactly (what `mmldm_jax.evaluation.sync` does).

Time convention: frame k shows the scene at time k / fps; audio sample n plays at n / sample_rate; an
event at frame position f (float) sounds at f / fps seconds.

Everything is NumPy and deterministic from a seed; a 64x64, 32-frame video renders in milliseconds.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
from typing import Any

import numpy as np

from mmldm_jax.data import records

# (name, RGB, pitch in Hz). Saturated, bright colours far from every background (backgrounds are dark
# and desaturated), pitches a musical fifth apart (A3 E4 B4 F#5 C#6 G#6): well separated on a log axis,
# all below 2 kHz so fundamental and 2nd harmonic stay under 8 kHz (the mel fmax) and Nyquist at 8 kHz.
PALETTE = (
    ("red", (235, 40, 40), 220.0),
    ("green", (40, 215, 60), 329.63),
    ("blue", (50, 95, 255), 493.88),
    ("yellow", (245, 225, 30), 739.99),
    ("magenta", (230, 45, 230), 1108.73),
    ("cyan", (40, 220, 230), 1661.22),
)
PALETTE_RGB = np.array([rgb for _, rgb, _ in PALETTE], np.uint8)
PALETTE_PITCH_HZ = np.array([pitch for _, _, pitch in PALETTE], np.float32)

_WALLS = 4                  # 0 left, 1 right, 2 top, 3 bottom
_SAME_OBJECT_GAP_FRAMES = 3.5
_ANY_EVENT_GAP_FRAMES = 2.5
_TONE_ATTACK_SECONDS = 0.002
_TONE_DECAY_SECONDS = 0.04  # e^-1 time; the tone is 30 dB down after ~0.14 s
_SPEED_RANGE = (0.5, 1.4)   # arena widths per second (sets the desired path length per segment)
_BACKGROUND_RMS = 0.02
_GENERATOR_VERSION = 1


def num_video_frames(config: Any, seconds: float | None = None) -> int:
  """Frames in one generated video: `seconds` (default `config.synthetic.video_seconds`) at data.fps."""
  seconds = config.synthetic.video_seconds if seconds is None else seconds
  return max(1, int(round(seconds * config.data.fps)))


# ----------------------------------------------------------------------------------------------------
# Motion: event times, wall contacts, per-object polylines.

def _event_times(rng: np.random.Generator, start: float, stop: float, rate: float,
                 min_gap: float) -> np.ndarray:
  """A renewal process on [start, stop): gaps are min_gap plus an exponential tail (mean 1/rate)."""
  tail = max(1.0 / rate - min_gap, 0.05)
  times = []
  t = start + rng.uniform(0.0, min_gap + tail)
  while t < stop:
    times.append(t)
    t += min_gap + rng.exponential(tail)
  return np.array(times)


def _assign_objects(rng: np.random.Generator, times: np.ndarray, num_objects: int,
                    any_gap: float, same_gap: float) -> tuple[np.ndarray, np.ndarray]:
  """Gives each event to an object that has been quiet for `same_gap`, delaying events when needed
  so that consecutive events stay `any_gap` apart."""
  last = np.full(num_objects, -np.inf)
  owners, kept = [], []
  for t in times:
    if kept:
      t = max(t, kept[-1] + any_gap)
    free = np.flatnonzero(last <= t - same_gap)
    if free.size == 0:
      owner = int(np.argmin(last))
      t = last[owner] + same_gap
    else:
      owner = int(rng.choice(free))
    last[owner] = t
    owners.append(owner)
    kept.append(t)
  return np.array(kept), np.array(owners, np.int64)


def _wall_point(wall: int, along: float, low: float, high: float) -> tuple[float, float]:
  """(x, y) of an object's centre touching `wall` at tangential coordinate `along`."""
  if wall == 0:
    return low, along
  if wall == 1:
    return high, along
  if wall == 2:
    return along, low
  return along, high


def _object_path(rng: np.random.Generator, times: np.ndarray, low: float, high: float,
                 arena_pixels: float) -> tuple[np.ndarray, np.ndarray]:
  """Wall-contact polyline through `times`: returns walls [K] and contact points [K, 2].

  Each next contact lies on another wall, away from corners, with both velocity components at least
  15% of the speed (a clear direction in x and y), and at the distance closest to a random speed
  times the segment's duration. `arena_pixels` is the arena width in pixels.
  """
  margin = 0.12 * (high - low)
  walls = np.zeros(len(times), np.int64)
  points = np.zeros((len(times), 2))
  walls[0] = rng.integers(_WALLS)
  points[0] = _wall_point(walls[0], rng.uniform(low + margin, high - margin), low, high)
  for k in range(1, len(times)):
    wanted = rng.uniform(*_SPEED_RANGE) * arena_pixels * (times[k] - times[k - 1])
    candidate_walls = rng.choice([w for w in range(_WALLS) if w != walls[k - 1]], size=48)
    alongs = rng.uniform(low + margin, high - margin, size=48)
    candidates = np.array([_wall_point(w, a, low, high) for w, a in zip(candidate_walls, alongs)])
    step = candidates - points[k - 1]
    length = np.hypot(step[:, 0], step[:, 1])
    valid = np.all(np.abs(step) >= 0.15 * length[:, None], axis=1)
    cost = np.abs(length - wanted) + np.where(valid, 0.0, 1e9)
    best = int(np.argmin(cost))
    walls[k], points[k] = candidate_walls[best], candidates[best]
  return walls, points


def _design_motion(rng: np.random.Generator, config: Any, num_frames: int, size: int,
                   extents: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(contact times, walls, contact points) per object, virtual contacts outside the video
  included (they shape the paths that enter and leave the picture). `extents` are the objects'
  half-widths: a contact puts the shape's edge on the frame's edge (pixel centres are integers,
  the frame spans [-0.5, size - 0.5])."""
  fps = config.data.fps
  seconds = num_frames / fps
  syn = config.synthetic
  any_gap = max(syn.min_event_gap_seconds, _ANY_EVENT_GAP_FRAMES / fps)
  same_gap = max(syn.min_event_gap_seconds, _SAME_OBJECT_GAP_FRAMES / fps)
  lead = 2.0 * same_gap + 1.0 / syn.events_per_second
  times = _event_times(rng, -lead, seconds + lead, syn.events_per_second, any_gap)
  times, owners = _assign_objects(rng, times, len(extents), any_gap, same_gap)
  paths = []
  for obj, extent in enumerate(extents):
    low, high = extent - 0.5, size - 0.5 - extent
    own = times[owners == obj]
    # Every object needs a contact before the first frame and after the video's end.
    if own.size == 0 or own[0] >= 0.0:
      first = own[0] if own.size else seconds
      own = np.concatenate([[min(first - same_gap, -0.5 / fps) - rng.exponential(0.2)], own])
    if own[-1] <= seconds:
      own = np.concatenate([own, [max(own[-1] + same_gap, seconds + 0.5 / fps)
                                  + rng.exponential(0.2)]])
    walls, points = _object_path(rng, own, low, high, high - low)
    paths.append((own, walls, points))
  return paths


def _positions(paths, frame_times: np.ndarray) -> np.ndarray:
  """Object centres [num_objects, T, 2] at `frame_times` (seconds), linear between contacts."""
  return np.stack([np.stack([np.interp(frame_times, times, points[:, axis]) for axis in (0, 1)], -1)
                   for times, _, points in paths])


def _overlaps(centres: np.ndarray, radius: float) -> bool:
  """Whether two objects come closer than their bounding circles (checked at 4x the frame rate)."""
  if centres.shape[0] < 2:
    return False
  diff = centres[:, None] - centres[None, :]
  dist = np.hypot(diff[..., 0], diff[..., 1])
  dist[np.arange(len(centres)), np.arange(len(centres))] = np.inf
  return bool(dist.min() < 2.0 * math.sqrt(2.0) * radius + 1.0)


# ----------------------------------------------------------------------------------------------------
# Picture.

def _background(rng: np.random.Generator, label: int, num_classes: int, size: int) -> np.ndarray:
  """Class-dependent background [size, size, 3] float in [0, 255]: hue from the class, pattern from
  the class (vertical gradient, radial gradient, soft stripes, blotches), details jittered per video.
  Dark and desaturated (value <= 0.45, saturation <= 0.4) so the palette colours stand out."""
  hue = (label % max(num_classes, 1)) / max(num_classes, 1)
  dark = np.array(colorsys.hsv_to_rgb(hue, 0.4, 0.18))
  light = np.array(colorsys.hsv_to_rgb((hue + 0.07) % 1.0, 0.3, 0.45))
  grid = (np.arange(size) + 0.5) / size
  y, x = np.meshgrid(grid, grid, indexing="ij")
  kind = label % 4
  if kind == 0:
    mix = y + rng.uniform(-0.2, 0.2)
  elif kind == 1:
    cx, cy = rng.uniform(0.2, 0.8, size=2)
    mix = 1.0 - 1.4 * np.hypot(x - cx, y - cy)
  elif kind == 2:
    angle = rng.uniform(0.0, np.pi)
    mix = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * (x * np.cos(angle) + y * np.sin(angle))
                             + rng.uniform(0, 2 * np.pi))
  else:
    coarse = rng.uniform(0.0, 1.0, size=(5, 5))
    index = np.minimum((grid * 4.0), 3.999)
    i0, frac = index.astype(int), index - index.astype(int)
    rows = coarse[i0] * (1 - frac)[:, None] + coarse[i0 + 1] * frac[:, None]
    mix = rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]
  mix = np.clip(mix, 0.0, 1.0)[..., None]
  return 255.0 * (dark * (1.0 - mix) + light * mix)


def _extent(shape: int, radius: float) -> float:
  """Half-width of a disc (shape 0) or of the square with the disc's area (shape 1)."""
  return radius if shape == 0 else radius * math.sqrt(math.pi) / 2.0


def _render(background: np.ndarray, centres: np.ndarray, colours: np.ndarray, shapes: np.ndarray,
            radius: float) -> np.ndarray:
  """Composites anti-aliased objects over the background: frames uint8 [T, H, W, 3]."""
  num_frames = centres.shape[1]
  size = background.shape[0]
  frames = np.broadcast_to(background, (num_frames,) + background.shape).astype(np.float32)
  pixel = np.arange(size, dtype=np.float32)
  for obj in range(centres.shape[0]):
    dx = pixel[None, None, :] - centres[obj, :, 0, None, None]    # [T, 1, W]
    dy = pixel[None, :, None] - centres[obj, :, 1, None, None]    # [T, H, 1]
    if shapes[obj] == 0:   # disc: coverage from the distance to the rim
      alpha = np.clip(radius + 0.5 - np.sqrt(dx * dx + dy * dy), 0.0, 1.0)
    else:                  # square with the disc's area: box coverage per axis
      half = _extent(1, radius)
      alpha = np.clip(half + 0.5 - np.abs(dx), 0, 1) * np.clip(half + 0.5 - np.abs(dy), 0, 1)
    alpha = alpha[..., None].astype(np.float32)
    frames = frames * (1.0 - alpha) + PALETTE_RGB[colours[obj]].astype(np.float32) * alpha
  return np.clip(np.round(frames), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Sound.

def _background_sound(rng: np.random.Generator, label: int, num_samples: int,
                      sample_rate: int) -> np.ndarray:
  """Quiet, steady class sound: even classes a noise band, odd classes a hum, both class-tuned."""
  if num_samples == 0:
    return np.zeros(0, np.float32)
  nyquist = sample_rate / 2.0
  if label % 2 == 0:
    centre = min(300.0 * 1.9 ** (label // 2 % 5), 0.6 * nyquist)
    spectrum = np.fft.rfft(rng.standard_normal(num_samples))
    freqs = np.fft.rfftfreq(num_samples, 1.0 / sample_rate)
    with np.errstate(divide="ignore"):
      octaves = np.log2(np.maximum(freqs, 1.0) / centre)
    sound = np.fft.irfft(spectrum * np.exp(-0.5 * (octaves / 0.35) ** 2), num_samples)
  else:
    base = 70.0 + 13.0 * (label // 2 % 7) + rng.uniform(-2.0, 2.0)
    t = np.arange(num_samples) / sample_rate
    sound = sum(np.sin(2 * np.pi * h * base * t + rng.uniform(0, 2 * np.pi)) / h
                for h in range(1, 6) if h * base < 0.45 * sample_rate)
    sound = sound + 0.3 * rng.standard_normal(num_samples)
  rms = np.sqrt(np.mean(sound ** 2)) + 1e-12
  return (sound * (_BACKGROUND_RMS * rng.uniform(0.8, 1.2) / rms)).astype(np.float32)


def _tone(sample_rate: int, onset: float, pitch: float, amplitude: float, num_samples: int,
          waveform: np.ndarray) -> None:
  """Adds one percussive tone starting at `onset` seconds (sub-sample exact) into `waveform`."""
  first = max(int(math.ceil(onset * sample_rate)), 0)
  last = min(int(math.ceil((onset + 8 * _TONE_DECAY_SECONDS) * sample_rate)), num_samples)
  if last <= first:
    return
  t = np.arange(first, last) / sample_rate - onset
  envelope = np.minimum(t / _TONE_ATTACK_SECONDS, 1.0) * np.exp(-t / _TONE_DECAY_SECONDS)
  tone = np.sin(2 * np.pi * pitch * t)
  if 2 * pitch < 0.45 * sample_rate:
    tone = tone + 0.25 * np.sin(2 * np.pi * 2 * pitch * t)
  waveform[first:last] += (amplitude * envelope * tone).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# One video.

def generate_video(seed: int, label: int, config: Any, *, seconds: float | None = None,
                   video_id: str | None = None) -> dict[str, Any]:
  """One synthetic sounding video as a record (`mmldm_jax.data.records` schema) with ground truth.

  Geometry comes from the config: frames are data.image_size square at data.fps, audio is at
  audio.sample_rate, the duration is `seconds` (default synthetic.video_seconds). The same seed,
  label and config always give identical bytes.
  """
  syn = config.synthetic
  if not 0 <= label < max(syn.num_classes, 1):
    raise ValueError(f"label={label}: expected a class in [0, config.synthetic.num_classes="
                     f"{syn.num_classes})")
  if not 1 <= syn.max_objects <= len(PALETTE):
    raise ValueError(f"config.synthetic.max_objects={syn.max_objects}: expected 1 to {len(PALETTE)} "
                     "(one palette colour per object)")
  sample_rate = int(config.audio.sample_rate)
  if PALETTE_PITCH_HZ.max() >= min(0.5 * sample_rate, config.audio.fmax):
    raise ValueError(f"config.audio.sample_rate={sample_rate} / fmax={config.audio.fmax}: the "
                     f"palette's pitches reach {PALETTE_PITCH_HZ.max():.0f} Hz; expected a Nyquist "
                     "rate and fmax above that")
  fps = float(config.data.fps)
  size = int(config.data.image_size)
  num_frames = num_video_frames(config, seconds)
  num_samples = int(round(num_frames / fps * sample_rate))
  rng = np.random.default_rng(seed)
  num_objects = int(rng.integers(1, syn.max_objects + 1))
  colours = rng.choice(len(PALETTE), size=num_objects, replace=False)
  shapes = rng.integers(0, 2, size=num_objects)
  radius = syn.object_radius * size
  frame_times = np.arange(num_frames) / fps
  check_times = np.arange(4 * num_frames) / (4 * fps)
  extents = np.array([_extent(shape, radius) for shape in shapes])
  for _ in range(50):  # redraw the motion while objects would overlap (occlusion blurs tracking)
    paths = _design_motion(rng, config, num_frames, size, extents)
    if not _overlaps(_positions(paths, check_times), radius):
      break
  background = _background(rng, label, syn.num_classes, size)
  frames = _render(background, _positions(paths, frame_times), colours, shapes, radius)

  waveform = _background_sound(rng, label, num_samples, sample_rate)
  seconds_total = num_frames / fps
  events = []
  for obj, (times, _, points) in enumerate(paths):
    for k in range(1, len(times)):
      if not 0.0 <= times[k] < seconds_total:
        continue  # virtual contacts outside the video shape the path but make no sound
      arena = size - 2 * extents[obj]
      speed = np.hypot(*(points[k] - points[k - 1])) / (times[k] - times[k - 1]) / arena
      loudness = 0.2 + 0.45 * np.clip((speed - 0.3) / 1.4, 0.0, 1.0)
      pitch = float(PALETTE_PITCH_HZ[colours[obj]])
      _tone(sample_rate, times[k], pitch, loudness, num_samples, waveform)
      events.append((times[k] * fps, obj, pitch, int(colours[obj])))
  events.sort()
  waveform = np.clip(waveform, -1.0, 1.0).astype(np.float32)
  return {
      "video_id": video_id or f"synthetic-{seed}",
      "frames": frames,
      "audio": waveform,
      "label": int(label),
      "source": "synthetic",
      "fps": fps,
      "sample_rate": sample_rate,
      "events": {
          "frame": np.array([e[0] for e in events], np.float32),
          "object": np.array([e[1] for e in events], np.int32),
          "pitch_hz": np.array([e[2] for e in events], np.float32),
          "colour": np.array([e[3] for e in events], np.int32),
      },
  }


# ----------------------------------------------------------------------------------------------------
# Datasets.

def video_seed(config: Any, number: int) -> int:
  """Seed of video `number` (counted over all splits) of the dataset with seed synthetic.seed."""
  return int(np.random.SeedSequence([int(config.synthetic.seed), number]).generate_state(1)[0])


def dataset_meta(config: Any) -> dict[str, Any]:
  """What determines the dataset's bytes; stored in `synthetic.json` and, with the geometry
  readers check (`index_meta`), in index.json."""
  return {
      "source": "synthetic",
      "generator_version": _GENERATOR_VERSION,
      "synthetic": config.synthetic.to_dict(),
      "image_size": int(config.data.image_size),
      "fps": float(config.data.fps),
      "sample_rate": int(config.audio.sample_rate),
      "num_frames": num_video_frames(config),
      "num_classes": int(config.synthetic.num_classes),
      "palette": [{"name": name, "rgb": list(rgb), "pitch_hz": pitch} for name, rgb, pitch in PALETTE],
  }


def _plan(config: Any) -> list[tuple[str, str, list[int]]]:
  """(split, shard file, video numbers) for every shard, in writing order."""
  syn = config.synthetic
  counts = {"train": syn.num_train_videos, "validation": syn.num_validation_videos,
            "heldout": syn.num_heldout_videos}
  if syn.videos_per_shard <= 0:
    raise ValueError(f"config.synthetic.videos_per_shard={syn.videos_per_shard}: expected > 0")
  plan, first = [], 0
  for split in records.SPLITS:
    count = int(counts[split])
    num_shards = -(-count // syn.videos_per_shard)
    for shard in range(num_shards):
      start = first + shard * syn.videos_per_shard
      numbers = list(range(start, min(start + syn.videos_per_shard, first + count)))
      plan.append((split, records.shard_name(split, shard, num_shards), numbers))
    first += count
  return plan


def _video_id(config: Any, number: int) -> str:
  return f"synthetic-{config.synthetic.seed}-{number:06d}"


def _check_folder_meta(folder: str, meta: dict[str, Any]) -> None:
  """Refuses to mix shards of different settings in one folder (resuming needs the same config)."""
  path = os.path.join(folder, "synthetic.json")
  if os.path.exists(path):
    with open(path) as f:
      existing = json.load(f)
    if existing != meta:
      changed = sorted(k for k in set(existing) | set(meta) if existing.get(k) != meta.get(k))
      raise ValueError(f"{path}: the folder holds a synthetic dataset written with different "
                       f"settings ({', '.join(changed)} differ); use another data_dir or delete it")
  else:
    with open(path + ".tmp", "w") as f:
      json.dump(meta, f, indent=1)
    os.replace(path + ".tmp", path)


def index_meta(config: Any) -> dict[str, Any]:
  """index.json's meta: `dataset_meta` plus the geometry every reader checks (records.geometry)."""
  return json.loads(json.dumps(dict(dataset_meta(config), **{
      records.GEOMETRY_KEY: records.geometry(config)})))   # JSON-normalised (tuples -> lists)


def is_complete(config: Any, folder: str) -> bool:
  """Whether `folder` holds this config's finished dataset (index written, same settings).

  An index of the format without a geometry is not complete: `write_dataset` keeps the shards
  (same bytes) and rewrites it.
  """
  if not os.path.exists(os.path.join(folder, records.INDEX_FILE)):
    return False
  _, meta = records.read_index(folder)
  return meta == index_meta(config)


def write_dataset(config: Any, folder: str, progress: bool = True) -> list[records.VideoEntry]:
  """Writes the synthetic dataset of `config` as ArrayRecord shards plus index.json into `folder`.

  Split sizes, classes and seed come from config.synthetic, geometry from config.data / audio.
  Deterministic (same config -> same bytes) and resumable: shards already on disk are kept, the
  index is written last. Returns the index entries.
  """
  from tqdm import tqdm
  os.makedirs(folder, exist_ok=True)
  meta = json.loads(json.dumps(dataset_meta(config)))   # JSON-normalised (tuples -> lists)
  _check_folder_meta(folder, meta)
  plan = _plan(config)
  num_frames = num_video_frames(config)
  num_classes = max(int(config.synthetic.num_classes), 1)
  entries = []
  todo = sum(len(numbers) for _, shard, numbers in plan
             if not os.path.exists(os.path.join(folder, shard)))
  with tqdm(total=todo, desc=f"synthetic videos -> {folder}", unit="video",
            disable=not progress or todo == 0) as bar:
    for split, shard, numbers in plan:
      path = os.path.join(folder, shard)
      write = not os.path.exists(path)
      videos = []
      for position, number in enumerate(numbers):
        label = number % num_classes
        entries.append(records.VideoEntry(
            video_id=_video_id(config, number), shard=shard, position=position,
            num_frames=num_frames, label=label, split=split, source="synthetic"))
        if write:
          videos.append(generate_video(video_seed(config, number), label, config,
                                       video_id=_video_id(config, number)))
          bar.update(1)
      if write:
        records.write_shard(path, videos)
  records.write_index(folder, entries, index_meta(config))
  return entries


def write_mp4_files(config: Any, folder: str, count: int, seconds: float | None = None,
                    first: int = 0) -> list[str]:
  """Writes `count` synthetic videos as mp4 files with sound (H.264 + AAC), one folder per class
  (`<folder>/class_<label>/<video_id>.mp4`, so `ingest --labels=folders` recovers the labels).
  Returns the paths. Videos are numbered from `first` like the dataset's (same seeds)."""
  from mmldm_jax.data import video
  num_classes = max(int(config.synthetic.num_classes), 1)
  paths = []
  for number in range(first, first + count):
    label = number % num_classes
    record = generate_video(video_seed(config, number), label, config, seconds=seconds,
                            video_id=_video_id(config, number))
    path = os.path.join(folder, f"class_{label}", record["video_id"] + ".mp4")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    video.write_mp4(path, record["frames"], record["fps"], record["audio"], record["sample_rate"])
    paths.append(path)
  return paths
