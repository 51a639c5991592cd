"""LPIPS (VGG16, v0.1): parity with a plain-torch re-implementation of lpips' forward pass (random
weights), both checkpoint namings, strict conversion errors, and the loader the VAE loss uses."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mmldm_jax import config_lib
from mmldm_jax.convert import common
from mmldm_jax.convert import lpips as lpips_convert
from mmldm_jax.models import lpips as lpips_model

torch = pytest.importorskip("torch")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3 in torchvision's `features`
WIDTHS = (64, 128, 256, 512, 512)


class Head(torch.nn.Module):
  """lpips.NetLinLayer: Dropout then a bias-free 1x1 conv to one channel."""

  def __init__(self, channels):
    super().__init__()
    self.model = torch.nn.Sequential(torch.nn.Dropout(), torch.nn.Conv2d(channels, 1, 1, bias=False))


class ScalingLayer(torch.nn.Module):
  def __init__(self):
    super().__init__()
    self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
    self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])


class TorchLPIPS(torch.nn.Module):
  """lpips.LPIPS(net='vgg', version='0.1') forward in plain torch, NCHW, torchvision key names."""

  def __init__(self):
    super().__init__()
    layers, channels = [], 3
    for item in VGG16_LAYOUT:
      if item == "M":
        layers.append(torch.nn.MaxPool2d(2, 2))
      else:
        layers += [torch.nn.Conv2d(channels, item, 3, padding=1), torch.nn.ReLU()]
        channels = item
    self.features = torch.nn.Sequential(*layers)
    self.scaling_layer = ScalingLayer()
    for index, width in enumerate(WIDTHS):
      setattr(self, f"lin{index}", Head(width))

  def taps(self, x):
    x = (x - self.scaling_layer.shift) / self.scaling_layer.scale
    out = []
    for index, layer in enumerate(self.features[:TAPS[-1] + 1]):
      x = layer(x)
      if index in TAPS:
        out.append(x)
    return out

  def forward(self, images_a, images_b):
    total = 0
    for index, (tap_a, tap_b) in enumerate(zip(self.taps(images_a), self.taps(images_b))):
      tap_a = tap_a / (torch.sqrt(torch.sum(tap_a ** 2, dim=1, keepdim=True)) + 1e-10)
      tap_b = tap_b / (torch.sqrt(torch.sum(tap_b ** 2, dim=1, keepdim=True)) + 1e-10)
      head = getattr(self, f"lin{index}").model
      total = total + head((tap_a - tap_b) ** 2).mean(dim=(2, 3), keepdim=True)
    return total.reshape(-1)


@pytest.fixture(scope="module")
def reference():
  generator = torch.Generator().manual_seed(0)
  model = TorchLPIPS().eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.startswith("lin"):  # lpips' heads are non-negative
        param.copy_(torch.rand(param.shape, generator=generator) * 0.2)
      elif name.endswith("weight"):  # He init keeps the 13 conv layers' activations O(1)
        fan_in = param[0].numel()
        param.copy_(torch.randn(param.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
      else:
        param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
  return model


@pytest.fixture(scope="module")
def images():
  state = np.random.RandomState(0)
  images_a = np.tanh(state.randn(2, 32, 32, 3)).astype(np.float32)
  images_b = np.clip(images_a + 0.3 * state.randn(2, 32, 32, 3), -1, 1).astype(np.float32)
  return images_a, images_b


@pytest.fixture(scope="module")
def distance():
  model = lpips_model.LPIPS(precision=lax.Precision.HIGHEST)
  return jax.jit(lambda params, a, b: model.apply({"params": params}, a, b))


def torch_distance(model, images_a, images_b):
  nchw = lambda x: torch.from_numpy(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    return model(nchw(images_a), nchw(images_b)).numpy()


def test_parity_with_torch_lpips(reference, images, distance):
  expected = torch_distance(reference, *images)
  params = lpips_convert.convert_lpips(reference.state_dict())
  ours = np.asarray(distance(params, *images))
  assert ours.shape == (2,) and np.all(expected > 1e-3)
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-7)
  # Swapping the pair gives the same distance; an image is at distance 0 from itself.
  np.testing.assert_allclose(np.asarray(distance(params, images[1], images[0])), ours, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(distance(params, images[0], images[0])), 0.0, atol=1e-7)


def test_lpips_module_naming_is_accepted(reference):
  """lpips.LPIPS().state_dict(): net.slice{n}.{i}, lin{k} and its duplicate lins.{k}."""
  slice_of = {index: 1 + sum(index > tap for tap in TAPS) for index in range(30)}
  state = {}
  for key, value in reference.state_dict().items():
    if key.startswith("features."):
      index = int(key.split(".")[1])
      key = f"net.slice{slice_of[index]}." + key[len("features."):]
    elif key.startswith("lin"):
      state["lins." + key[3] + key[4:]] = value
    state[key] = value
  assert "net.slice2.5.weight" in state and "lins.4.model.1.weight" in state
  converted = lpips_convert.convert_lpips(state)
  plain = lpips_convert.convert_lpips(reference.state_dict())
  jax.tree.map(np.testing.assert_array_equal, converted, plain)


def test_strict_conversion_lists_every_problem(reference):
  state = {key: value.numpy() for key, value in reference.state_dict().items()}
  del state["lin3.model.1.weight"]
  state["features.30.weight"] = np.zeros((1,), np.float32)
  state["features.7.bias"] = np.zeros((3,), np.float32)
  with pytest.raises(common.ConversionError) as error:
    lpips_convert.convert_lpips(state, source="lpips.pth")
  message = str(error.value)
  assert "missing keys (1): lin3.model.1.weight" in message
  assert "unexpected keys (1): features.30.weight" in message
  assert "misshaped keys (1): features.7.bias" in message
  state = reference.state_dict()
  state["scaling_layer.scale"] = torch.ones(1, 3, 1, 1)
  with pytest.raises(common.ConversionError, match="scaling_layer.scale"):
    lpips_convert.convert_lpips(state)


def test_vae_loss_can_use_it(reference, images, tmp_path):
  """What the VAE loss does: load from config.vae.lpips_path, differentiate w.r.t. the reconstruction."""
  path = str(tmp_path / "lpips_vgg16.pth")
  torch.save(reference.state_dict(), path)
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  with config.unlocked():
    config.vae.lpips_path = path
  distance_fn, params = lpips_convert.load_lpips_distance(config)
  targets, reconstructions = images

  @jax.jit
  def perceptual_loss(reconstructions, params):
    return config.vae.perceptual_weight * jnp.mean(distance_fn(params, targets, reconstructions))

  loss, (image_grad, param_grad) = jax.value_and_grad(perceptual_loss, argnums=(0, 1))(
      reconstructions, params)
  np.testing.assert_allclose(loss, torch_distance(reference, *images).mean(), rtol=1e-4)
  assert np.all(np.isfinite(image_grad)) and np.abs(image_grad).max() > 0
  assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(param_grad))  # weights stay frozen
  with config.unlocked():
    config.vae.lpips_path = str(tmp_path / "absent.pth")
  with pytest.raises(FileNotFoundError, match="absent.pth.*VGG16"):
    lpips_convert.load_lpips_distance(config)
