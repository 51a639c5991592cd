"""FVD and KVD of the evaluate stage: I3D features of generated and real clips, the seeded draws of
real training clips, the scores with their protocol, and the memorisation check on I3D features.

What it is for: `stages/evaluate.py` feeds it clips one at a time (`ClipFeatures.add`) and asks
for the scores at the end; features are computed in batches of `evaluation.batch_size` clips, so at
most that many clips sit in memory, and each clip's feature vector is cached in its own small file
(`FeatureCache`) so that a rerun of an interrupted evaluation only computes what is missing.

Protocol (written beside every number, `protocol_of`): the I3D preprocessing preset, BatchNorm
epsilon and feature (`evaluation/i3d.py`), clip length and frame rate, the counts, and the KVD
definition (unbiased MMD^2, polynomial kernel degree 3, gamma 1 / d, coef0 1, unscaled). The paper
protocol (MM-Diffusion / MM-LDM) is 2048 generated vs 2048 random training clips, 16 frames at 10
fps, preset `mmdiffusion`, the 400 logits.

Real clips: the training pool is the training split cut into non-overlapping clips, thinned evenly
to `evaluation.train_pool_limit` (0 = draws x the number of generated clips). From it,
`num_reference_draws` draws of as many clips as there are generated clips are taken with
`evaluation.real_seed` (disjoint when the pool is large enough; `reference_draws.disjoint` says),
and the list is saved. FVD / KVD are against draw 0; the spread over the draws, the real-vs-real
floor (draw 0 vs draw 1) and the scores against held-out clips (never trained on) stand beside it.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable

import numpy as np

from mmldm_jax.evaluation import frechet
from mmldm_jax.evaluation import i3d

KVD_DEFINITION = "unbiased MMD^2, polynomial kernel (x.y / d + 1)^3 (sklearn defaults), unscaled"
REAL_CLIPS_FILE = "real_clips.json"


def check_config(config) -> None:
  """Every evaluation field with a fixed set of values or a range, checked before any work."""
  evaluation = config.evaluation
  choices = {"fvd": ("auto", "on", "off"), "i3d_preset": i3d.PRESETS,
             "i3d_feature": tuple(i3d.FEATURES), "mismatch": ("resample", "reject")}
  for field, allowed in choices.items():
    if evaluation[field] not in allowed:
      raise ValueError(f"evaluation.{field}={evaluation[field]!r}: expected one of {allowed}")
  for field, minimum in (("batch_size", 1), ("num_reference_draws", 1), ("train_pool_limit", 0)):
    if int(evaluation[field]) < minimum:
      raise ValueError(f"evaluation.{field}={evaluation[field]}: expected >= {minimum}")
  if not float(evaluation.i3d_epsilon) > 0:
    raise ValueError(f"evaluation.i3d_epsilon={evaluation.i3d_epsilon}: expected > 0")
  if int(config.data.num_frames) < i3d.MIN_FRAMES and evaluation.fvd != "off":
    raise ValueError(f"data.num_frames={config.data.num_frames}: I3D needs clips of >= "
                     f"{i3d.MIN_FRAMES} frames; set evaluation.fvd='off' for shorter clips")


def protocol_of(config) -> dict[str, Any]:
  """The FVD / KVD protocol of a config (without the counts, which the scores add)."""
  evaluation = config.evaluation
  if evaluation.i3d_feature not in i3d.FEATURES:
    raise ValueError(f"evaluation.i3d_feature={evaluation.i3d_feature!r}: expected one of "
                     f"{tuple(i3d.FEATURES)}")
  return dict(i3d.Protocol(preset=evaluation.i3d_preset,
                           epsilon=float(evaluation.i3d_epsilon)).as_dict(),
              feature=evaluation.i3d_feature, frames=int(config.data.num_frames),
              fps=float(config.data.fps), image_size=int(config.data.image_size),
              kvd=KVD_DEFINITION)


def load_extractor(config) -> tuple[i3d.I3DFeatures | None, str]:
  """(the I3D extractor, '') or, with evaluation.fvd 'off' or 'auto' without the metrics extra,
  (None, why). 'on' without the extra raises the loader's error (file name and install command)."""
  mode = config.evaluation.fvd
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"evaluation.fvd={mode!r}: expected 'auto', 'on' or 'off'")
  if mode == "off":
    return None, "evaluation.fvd='off'"
  protocol = protocol_of(config)
  try:
    return i3d.I3DFeatures(i3d.Protocol(preset=protocol["preset"],
                                        epsilon=protocol["epsilon"])), ""
  except i3d.I3DWeightsMissing as error:
    if mode == "on":
      raise
    return None, str(error)


class FeatureCache:
  """One .npz per clip in `<folder>/<digest of the protocol>/`, holding the feature and the key it
  was made for (the source file's identity, or the real clip's place); another key recomputes.
  folder None: no cache."""

  def __init__(self, folder: str | None, protocol: dict[str, Any]):
    self.folder = None
    if folder is not None:
      digest = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
      self.folder = os.path.join(folder, "features_" + digest)
      os.makedirs(self.folder, exist_ok=True)

  def _path(self, name: str) -> str:
    return os.path.join(self.folder, name + ".npz")

  def get(self, name: str, key: str) -> np.ndarray | None:
    if self.folder is None or not os.path.exists(self._path(name)):
      return None
    with np.load(self._path(name)) as stored:
      if str(stored["key"]) != key:
        return None
      return stored["feature"]

  def put(self, name: str, key: str, feature: np.ndarray) -> None:
    if self.folder is None:
      return
    path = self._path(name)
    with open(path + ".tmp", "wb") as handle:
      np.savez(handle, key=np.asarray(key), feature=feature)
    os.replace(path + ".tmp", path)


class ClipFeatures:
  """Feature vectors of named clips (frames for I3D, sound for an audio embedding), computed in
  batches by `compute` (stacked clips -> [B, d]), cached per clip; `features[name]` after
  `flush()`. `add` takes a function that returns the clip, so a cached clip is never decoded."""

  def __init__(self, compute: Callable[[np.ndarray], np.ndarray], batch_size: int,
               cache: FeatureCache, progress: Any = None):
    if batch_size < 1:
      raise ValueError(f"evaluation.batch_size={batch_size}: expected >= 1")
    self.compute, self.batch_size = compute, int(batch_size)
    self.cache, self.progress = cache, progress
    self.features: dict[str, np.ndarray] = {}
    self.computed = 0
    self._pending: list[tuple[str, str, np.ndarray]] = []

  def add(self, name: str, key: str, clip: Callable[[], np.ndarray]) -> None:
    cached = self.cache.get(name, key)
    if cached is not None:
      self.features[name] = cached
      return
    self._pending.append((name, key, np.asarray(clip())))
    if len(self._pending) >= self.batch_size:
      self.flush()

  def flush(self) -> None:
    if not self._pending:
      return
    values = self.compute(np.stack([clip for _, _, clip in self._pending]))
    for (name, key, _), value in zip(self._pending, values):
      self.features[name] = value
      self.cache.put(name, key, value)
    self.computed += len(self._pending)
    if self.progress is not None:
      self.progress.update(len(self._pending))
    self._pending = []

  def stack(self, names: list[str]) -> np.ndarray:
    self.flush()
    return np.stack([self.features[name] for name in names])


def draw_reference(pool_size: int, per_draw: int, draws: int, seed: int
                   ) -> tuple[list[np.ndarray], bool]:
  """`draws` index sets of `per_draw` clips out of `pool_size` (disjoint when the pool holds them
  all, else each drawn on its own without replacement, or with it when the pool is smaller than
  one draw), and whether they are disjoint."""
  if pool_size < 1 or per_draw < 1 or draws < 1:
    raise ValueError(f"draw_reference: pool {pool_size}, per draw {per_draw}, draws {draws}; all "
                     f"must be >= 1")
  rng = np.random.default_rng(seed)
  if pool_size >= per_draw * draws:
    order = rng.permutation(pool_size)
    return [np.sort(order[d * per_draw:(d + 1) * per_draw]) for d in range(draws)], True
  return [np.sort(rng.choice(pool_size, per_draw, replace=per_draw > pool_size))
          for _ in range(draws)], False


def memorisation(generated: np.ndarray, train: np.ndarray, heldout: np.ndarray) -> dict[str, Any]:
  """Nearest-neighbour check on I3D features. Per generated clip: the distance to its nearest
  training clip. Per real held-out clip (never trained on): the same. `memorised_fraction`: the
  fraction of generated clips closer to a training clip than every held-out clip is (an honest
  generator: about 1 / (held-out clips + 1); one that copies its training set: 1)."""
  to_train = frechet.nearest_distances(generated, train)
  heldout_to_train = frechet.nearest_distances(heldout, train)
  return {"memorised_fraction": float(np.mean(to_train < heldout_to_train.min())),
          "fraction_below_heldout_median": float(np.mean(to_train < np.median(heldout_to_train))),
          "median_distance_to_train": float(np.median(to_train)),
          "heldout_median_distance_to_train": float(np.median(heldout_to_train)),
          "heldout_min_distance_to_train": float(heldout_to_train.min()),
          "num_train": len(train), "num_heldout": len(heldout),
          "per_sample_distance_to_train": [float(d) for d in to_train]}


def scores(generated: np.ndarray, pool: np.ndarray, heldout: np.ndarray, protocol: dict[str, Any],
           draws: list[np.ndarray], disjoint: bool, seed: int, list_file: str | None,
           names: dict[str, str], multiplier: float = 1.0) -> dict[str, Any]:
  """metrics.json entries, one per `names` item (key -> 'frechet' or 'kernel', e.g. {"fvd":
  "frechet", "kvd": "kernel"}): the score against draw 0 of the training pool, with its protocol,
  the scores against every draw (mean, spread), the real floor (draw 0 vs draw 1) and the score
  against the held-out clips; every number times `multiplier` (1e4 for the AudioCLIP FAD, whose
  published values are scaled so)."""
  def distances(a, b):
    return {kind: None if value is None else value * multiplier
            for kind, value in frechet.set_distances(a, b).items()}
  per_draw = [distances(generated, pool[indices]) for indices in draws]
  floor = (distances(pool[draws[0]], pool[draws[1]]) if len(draws) > 1
           else {"frechet": None, "kernel": None})
  against_heldout = distances(generated, heldout)
  counts = {"num_generated": len(generated), "num_real": len(draws[0]),
            "real_split": "train", "num_train_pool": len(pool)}
  result = {}
  for key, distance in names.items():
    values = [scores_[distance] for scores_ in per_draw]
    known = [v for v in values if v is not None]
    result[key] = {
        "value": values[0],
        "protocol": dict(protocol, **counts),
        "reference_draws": {"values": values, "mean": float(np.mean(known)) if known else None,
                            "std": float(np.std(known)) if known else None,
                            "count": len(draws), "disjoint": disjoint, "seed": seed,
                            "list_file": list_file},
        "real_floor": {"value": floor[distance], "what": "training draw 0 vs draw 1, same counts"},
        "heldout": {"value": against_heldout[distance], "num_real": len(heldout),
                    "what": "generated vs held-out clips (never trained on)"},
    }
  return result


def not_computed(reason: str) -> dict[str, Any]:
  return {"value": None, "not_computed": reason}
