"""LPIPS (VGG16, v0.1) weights: one PyTorch state dict -> `mmldm_jax.models.lpips` Flax params.

The file holds torchvision's ImageNet VGG16 conv weights `features.{i}.weight` / `.bias` (i in 0, 2, 5,
7, 10, 12, 14, 17, 19, 21, 24, 26, 28) and the lpips v0.1 heads `lin{k}.model.1.weight` (k = 0..4,
shape (1, C, 1, 1)). Two ways to assemble it on a machine with network access:

    # a) from torchvision + the lpips repository's weights/v0.1/vgg.pth (only the heads)
    import torch, torchvision
    vgg = torchvision.models.vgg16(weights="IMAGENET1K_V1").features.state_dict()
    heads = torch.load("lpips/weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    torch.save({**{f"features.{k}": v for k, v in vgg.items()}, **heads}, "lpips_vgg16.pth")

    # b) from the lpips package (it fetches the same VGG16 weights through torchvision)
    import lpips, torch
    torch.save(lpips.LPIPS(net="vgg").state_dict(), "lpips_vgg16.pth")

Also accepted: a whole torchvision `vgg16().state_dict()` merged with the heads (`classifier.*` is
ignored), and the lpips module's own naming (`net.slice{n}.{i}.*` is torchvision's `features.{i}.*`,
`lins.{k}.*` repeats `lin{k}.*`, the `scaling_layer.shift` / `.scale` buffers must hold the standard
constants). Conversion is strict:
missing, unexpected and misshaped keys are listed together in one `ConversionError`.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from mmldm_jax.convert import common
from mmldm_jax.models import lpips as lpips_model


def normalised_state_dict(state_dict: Mapping[str, Any], source: str = "checkpoint"
                          ) -> dict[str, np.ndarray]:
  """The state dict in `features.{i}` / `lin{k}.model.1` naming, without the scaling buffers."""
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value, np.float32)
    if key.startswith("classifier."):
      continue
    if key in ("scaling_layer.shift", "scaling_layer.scale"):
      expected = lpips_model.SHIFT if key.endswith("shift") else lpips_model.SCALE
      if value.size != 3 or not np.allclose(value.reshape(3), expected, atol=1e-6):
        raise common.ConversionError(f"{source}: {key}={value.reshape(-1).tolist()} differs from "
                                     f"lpips' ScalingLayer constants {list(expected)}")
      continue
    # lpips.LPIPS also registers its heads in a ModuleList `lins`, so its state dict has each twice.
    name = re.sub(r"^lins\.(\d)\.", r"lin\1.", re.sub(r"^net\.slice\d\.", "features.", key))
    if name in out and not np.array_equal(out[name], value):
      raise common.ConversionError(f"{source}: {key} and {name} name the same weight but differ")
    out[name] = value
  return out


def param_template() -> Any:
  """Shapes of the LPIPS parameters (no computation)."""
  return common.unbox(jax.eval_shape(lambda: lpips_model.init_params(jax.random.key(0))))


def _mapping(template: Any) -> common.Mapping_:
  mapping = {}
  for path in traverse_util.flatten_dict(template):
    module, leaf = path[-2], path[-1]
    if module.startswith("lin"):
      key = f"{module}.model.1.weight"
    else:
      key = module.replace("features_", "features.") + (".weight" if leaf == "kernel" else ".bias")
    mapping[path] = (key, common.conv_kernel if leaf == "kernel" else common.identity)
  return mapping


def convert_lpips(state_dict: Mapping[str, Any], config=None, source: str = "checkpoint") -> dict:
  """LPIPS params (plain float32 arrays) from a state dict; `config` is unused (fixed architecture)."""
  del config
  template = param_template()
  return common.assign(template, _mapping(template), normalised_state_dict(state_dict, source),
                       source=source)


def load_lpips(path: str, config=None) -> dict:
  """Reads the LPIPS weights file (torch or safetensors) and converts it."""
  return convert_lpips(common.load_torch_state_dict(path, kind="lpips"), config, source=path)


def check_params(params: Any, source: str = "params") -> None:
  """Fails listing the differences when a Flax param tree does not fit the LPIPS network."""
  expected = {p: tuple(v.shape) for p, v in traverse_util.flatten_dict(param_template()).items()}
  actual = {p: tuple(np.shape(v))
            for p, v in traverse_util.flatten_dict(common.unbox(params)).items()}
  differences = sorted(
      ["missing " + "/".join(p) for p in set(expected) - set(actual)]
      + ["unexpected " + "/".join(p) for p in set(actual) - set(expected)]
      + [f"misshaped {'/'.join(p)}: {actual[p]} != {expected[p]}"
         for p in set(expected) & set(actual) if actual[p] != expected[p]])
  if differences:
    raise common.ConversionError(f"{source} does not match the LPIPS network: "
                                 + "; ".join(differences))


def load_lpips_distance(config, dtype: Any = jnp.float32
               ) -> tuple[Callable[[Any, jax.Array, jax.Array], jax.Array], dict]:
  """The perceptual distance for the VAE loss as `(distance_fn, params)`, from `config.vae.lpips_path`.

  `distance_fn(params, images_a, images_b) -> [B]` (NHWC in [-1, 1]) is a pure function to call inside
  a jitted loss; it stops the gradient into `params`, so only the images get gradients. The path may be
  a torch / safetensors state dict (module doc) or Flax msgpack written by
  `mmldm_jax.convert.common.save_params`. Raises when the path is unset or the file is missing.
  """
  path = config.vae.lpips_path
  if not path:
    raise ValueError("config.vae.lpips_path is empty: set it to "
                     f"{common.WHERE_TO_GET['lpips']} (see mmldm_jax/convert/lpips.py)")
  if path.endswith(".msgpack"):
    params = common.load_params(path, kind="lpips")
    params = params.get("params", params)
    check_params(params, source=path)
  else:
    params = load_lpips(path)
  model = lpips_model.LPIPS(dtype=dtype)

  def distance_fn(params, images_a, images_b):
    return model.apply({"params": lax.stop_gradient(params)}, images_a, images_b)

  return distance_fn, jax.tree.map(jnp.asarray, params)
