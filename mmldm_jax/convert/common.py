"""Loading PyTorch checkpoints and assigning them to Flax parameters, strictly.

Every converter (SD VAE, SD U-Net, HiFi-GAN, LPIPS) does the same three things: read a state dict from a
local file without running any pickled code, rename and re-layout each tensor, and place it into a Flax
parameter tree whose shapes are known in advance. This module does the first and the last; a converter
supplies the mapping. Anything that does not line up (a key the mapping expects but the file lacks, a key
in the file the mapping never uses, a tensor of the wrong shape) is collected and raised together, so a
user sees every problem at once and a partial load never happens.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping

import numpy as np
from flax import traverse_util

# Where users get the public weights each converter reads (shown when a file is missing).
WHERE_TO_GET = {
    "vae": "the Stable Diffusion VAE, e.g. `vae/diffusion_pytorch_model.safetensors` of "
           "stabilityai/sd-vae-ft-mse or of a Stable Diffusion 1.5 repository, or the CompVis "
           "`kl-f8` / SD-1.5 `.ckpt`",
    "unet": "the Stable Diffusion 1.5 U-Net, `unet/diffusion_pytorch_model.safetensors` of a "
            "Stable Diffusion 1.5 repository, or the CompVis SD-1.5 `.ckpt`",
    "hifigan": "a HiFi-GAN V1 generator checkpoint (`generator_v1` or `UNIVERSAL_V1/g_02500000`) from "
               "the jik876/hifi-gan releases",
    "lpips": "a state dict combining torchvision's VGG16 `features.*` weights with the `lin*` heads of "
             "the lpips package's `weights/v0.1/vgg.pth`",
}


class ConversionError(ValueError):
  """A checkpoint that does not match the model it is loaded into."""


def load_torch_state_dict(path: str, kind: str = "") -> dict[str, np.ndarray]:
  """Reads a state dict from safetensors or a torch file (weights_only=True) as float32 NumPy arrays.

  Nested layouts are unwrapped: `{'state_dict': ...}` (CompVis/Lightning) and `{'generator': ...}`
  (HiFi-GAN training checkpoints). A missing file is an error naming it and where to get it.
  """
  if not os.path.exists(path):
    hint = f" Get {WHERE_TO_GET[kind]}." if kind in WHERE_TO_GET else ""
    raise FileNotFoundError(f"checkpoint file {path} does not exist.{hint} Nothing is downloaded "
                            "at run time: place the file locally and pass its path.")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types; re-raise with the path.
      raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  try:
    import torch
  except ImportError as e:
    raise ImportError(f"reading {path} needs torch; install the `convert` extra "
                      "(pip install -e '.[convert]') or convert the file to safetensors") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises many error types for bad files; name the file.
    raise ConversionError(f"{path}: not a readable torch checkpoint with weights_only=True ({e})") \
        from e
  for wrapper in ("state_dict", "generator", "model"):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
      break
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}")
  return {k: v.detach().to(torch.float32).numpy() for k, v in obj.items() if hasattr(v, "detach")}


def read_weight_file(path: str, what: str, file_name: str, source: str) -> dict[str, np.ndarray]:
  """The state dict of a user-supplied weight file (`load_torch_state_dict`); a missing file is an
  error naming it, the file users need (`file_name`) and where it is published (`source`)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{what} {path} not found: get {file_name} from {source} (nothing is "
                            f"downloaded at run time)")
  return load_torch_state_dict(path)


def batch_norm_counters(state_dict: Mapping[str, Any]) -> list[str]:
  """The PyTorch BatchNorm step counters of a state dict: present in files, never needed."""
  return [key for key in state_dict if key.endswith("num_batches_tracked")]


# A mapping entry: flax path (tuple of names) -> (torch key, function turning the torch array into the
# flax array). Several flax entries may read the same torch key.
Mapping_ = dict[tuple[str, ...], tuple[str, Callable[[np.ndarray], np.ndarray]]]


def conv_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Conv (O, I, *k) -> Flax (*k, I, O)."""
  return np.transpose(weight, tuple(range(2, weight.ndim)) + (1, 0))


def dense_kernel(weight: np.ndarray) -> np.ndarray:
  """torch Linear (O, I), or a 1x1 conv (O, I, 1, 1), -> Flax Dense (I, O)."""
  return weight.reshape(weight.shape[0], weight.shape[1]).T


def identity(weight: np.ndarray) -> np.ndarray:
  return weight


def unbox(tree: Any) -> Any:
  """Strips flax partitioning boxes so the tree holds plain arrays / ShapeDtypeStructs."""
  import flax.linen as nn
  return nn.meta.unbox(tree)


def assign(template: Any, mapping: Mapping_, state_dict: Mapping[str, np.ndarray], *,
           source: str = "checkpoint", ignore: Iterable[str] = ()) -> dict:
  """Builds a Flax parameter tree shaped like `template` from `state_dict` through `mapping`.

  `template` is a (possibly boxed) tree of arrays or ShapeDtypeStructs, e.g. from `jax.eval_shape`.
  Raises ConversionError listing every missing, unexpected and misshaped key. `ignore` names torch keys
  that may be present without being used (e.g. buffers such as `num_batches_tracked`).
  """
  flat_template = traverse_util.flatten_dict(unbox(template))
  missing_flax = sorted(set(flat_template) - set(mapping))
  if missing_flax:
    raise ConversionError(
        f"{source}: the converter has no mapping for these model parameters (a converter bug): "
        + ", ".join("/".join(p) for p in missing_flax))
  ignore = set(ignore)
  missing, misshaped, used = [], [], set()
  flat_out = {}
  for path, (key, transform) in mapping.items():
    if path not in flat_template:
      continue
    if key not in state_dict:
      missing.append(key)
      continue
    used.add(key)
    value = transform(np.asarray(state_dict[key], np.float32))
    expected = tuple(flat_template[path].shape)
    if tuple(value.shape) != expected:
      misshaped.append(f"{key}: file {tuple(state_dict[key].shape)} -> {tuple(value.shape)}, "
                       f"model {'/'.join(path)} expects {expected}")
      continue
    flat_out[path] = value.astype(np.float32)
  unexpected = sorted(k for k in state_dict if k not in used and k not in ignore)
  problems = []
  if missing:
    problems.append(f"missing keys ({len(missing)}): " + ", ".join(sorted(set(missing))))
  if unexpected:
    problems.append(f"unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
  if misshaped:
    problems.append(f"misshaped keys ({len(misshaped)}): " + "; ".join(misshaped))
  if problems:
    raise ConversionError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat_out)


def save_params(path: str, params: Any) -> None:
  """Writes params as Flax msgpack (atomic)."""
  from flax import serialization
  tmp = path + ".tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(unbox(params)))
  os.replace(tmp, path)


def load_params(path: str, kind: str = "") -> dict:
  """Reads params written by `save_params` (or the convert CLI)."""
  from flax import serialization
  if not os.path.exists(path):
    hint = (f" Convert {WHERE_TO_GET[kind]} with `python -m mmldm_jax.convert --kind={kind}`."
            if kind in WHERE_TO_GET else "")
    raise FileNotFoundError(f"parameter file {path} does not exist.{hint}")
  with open(path, "rb") as f:
    return serialization.msgpack_restore(f.read())
