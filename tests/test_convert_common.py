"""Strict checkpoint assignment: every mismatch is reported by name; nothing loads partially."""
import numpy as np
import pytest

from mmldm_jax.convert import common


def _template():
  return {"conv": {"kernel": np.zeros((3, 3, 2, 4), np.float32), "bias": np.zeros(4, np.float32)},
          "dense": {"kernel": np.zeros((4, 5), np.float32)}}


def _mapping():
  return {("conv", "kernel"): ("conv.weight", common.conv_kernel),
          ("conv", "bias"): ("conv.bias", common.identity),
          ("dense", "kernel"): ("fc.weight", common.dense_kernel)}


def _state_dict(rng):
  return {"conv.weight": rng.normal(size=(4, 2, 3, 3)).astype(np.float32),
          "conv.bias": rng.normal(size=4).astype(np.float32),
          "fc.weight": rng.normal(size=(5, 4)).astype(np.float32)}


def test_assign_relayouts_tensors():
  state = _state_dict(np.random.default_rng(0))
  params = common.assign(_template(), _mapping(), state)
  np.testing.assert_array_equal(params["conv"]["kernel"][1, 2, 0, 3], state["conv.weight"][3, 0, 1, 2])
  np.testing.assert_array_equal(params["dense"]["kernel"], state["fc.weight"].T)


def test_assign_lists_missing_unexpected_and_misshaped_keys():
  state = _state_dict(np.random.default_rng(0))
  del state["conv.bias"]
  state["extra.weight"] = np.zeros(3, np.float32)
  state["fc.weight"] = np.zeros((6, 4), np.float32)
  with pytest.raises(common.ConversionError) as error:
    common.assign(_template(), _mapping(), state, source="ckpt.safetensors")
  message = str(error.value)
  assert "ckpt.safetensors" in message
  assert "missing keys (1): conv.bias" in message
  assert "unexpected keys (1): extra.weight" in message
  assert "misshaped keys (1): fc.weight" in message


def test_safetensors_round_trip_and_missing_file(tmp_path):
  from safetensors.numpy import save_file
  state = _state_dict(np.random.default_rng(1))
  path = str(tmp_path / "w.safetensors")
  save_file(state, path)
  loaded = common.load_torch_state_dict(path)
  np.testing.assert_array_equal(loaded["fc.weight"], state["fc.weight"])
  with pytest.raises(FileNotFoundError, match="hifi-gan"):
    common.load_torch_state_dict(str(tmp_path / "nope.pt"), kind="hifigan")


def test_torch_file_loads_with_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  path = str(tmp_path / "g.pt")
  torch.save({"generator": {"w": torch.ones(2, 3)}}, path)
  assert common.load_torch_state_dict(path)["w"].shape == (2, 3)
