"""Converters: CompVis/LDM and legacy diffusers key formats give the same params as diffusers format;
any missing / unexpected / misshaped key is an error naming it; the CLI writes loadable msgpack."""
import importlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from flax import traverse_util

from mmldm_jax import config_lib
from mmldm_jax.convert import common
from mmldm_jax.convert import unet as convert_unet
from mmldm_jax.convert import vae as convert_vae

from conftest import CONFIGS, REPO_ROOT

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from test_unet import tiny_sd_layout_config, torch_unet  # noqa: E402  (after the importorskip)
from test_vae import randomise, torch_vae  # noqa: E402

TINY = os.path.join(CONFIGS, "aist.py:tiny")


@pytest.fixture(scope="module")
def config():
  return tiny_sd_layout_config()


@pytest.fixture(scope="module")
def vae_state_dict(config):
  return {k: v.numpy() for k, v in randomise(torch_vae(config.vae), seed=1).state_dict().items()}


@pytest.fixture(scope="module")
def unet_state_dict(config):
  return {k: v.numpy() for k, v in randomise(torch_unet(config.unet), seed=2).state_dict().items()}


def _assert_same_params(a, b):
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  assert flat_a.keys() == flat_b.keys()
  for path in flat_a:
    np.testing.assert_array_equal(flat_a[path], flat_b[path], err_msg="/".join(path))


# --- the test's own CompVis renaming (written from the LDM module layout, not from the converter) ---

def compvis_vae(state_dict, levels):
  """diffusers VAE state dict -> the LDM `AutoencoderKL` layout (decoder `up` numbered bottom-up,
  attention as 1x1 convs)."""
  attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
  out = {}
  for key, value in state_dict.items():
    new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    new = re.sub(r"down_blocks\.(\d)\.resnets\.", r"down.\1.block.", new)
    new = re.sub(r"down_blocks\.(\d)\.downsamplers\.0\.", r"down.\1.downsample.", new)
    new = re.sub(r"up_blocks\.(\d)\.resnets\.", lambda m: f"up.{levels - 1 - int(m[1])}.block.", new)
    new = re.sub(r"up_blocks\.(\d)\.upsamplers\.0\.",
                 lambda m: f"up.{levels - 1 - int(m[1])}.upsample.", new)
    new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1",
                                                                      "mid.block_2")
    match = re.match(r"(.*)mid_block\.attentions\.0\.(.*)\.(weight|bias)", new)
    if match:
      new = f"{match[1]}mid.attn_1.{attention[match[2]]}.{match[3]}"
      if match[3] == "weight" and match[2] != "group_norm":
        value = value[:, :, None, None]
    out[new] = value
  return out


def compvis_unet(state_dict, unet_config):
  """diffusers U-Net state dict -> LDM `openaimodel` layout, by walking input/output blocks in order."""
  levels = len(unet_config.channel_mult)
  attention = [2 ** level in tuple(unet_config.attention_resolutions) for level in range(levels)]
  prefixes = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"}
  block = 1
  for level in range(levels):
    for j in range(unet_config.num_res_blocks):
      prefixes[f"down_blocks.{level}.resnets.{j}"] = f"input_blocks.{block}.0"
      if attention[level]:
        prefixes[f"down_blocks.{level}.attentions.{j}"] = f"input_blocks.{block}.1"
      block += 1
    if level < levels - 1:
      prefixes[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{block}.0.op"
      block += 1
  block = 0
  for up in range(levels):
    for j in range(unet_config.num_res_blocks + 1):
      prefixes[f"up_blocks.{up}.resnets.{j}"] = f"output_blocks.{block}.0"
      layer = 1
      if attention[levels - 1 - up]:
        prefixes[f"up_blocks.{up}.attentions.{j}"] = f"output_blocks.{block}.1"
        layer = 2
      if up < levels - 1 and j == unet_config.num_res_blocks:
        prefixes[f"up_blocks.{up}.upsamplers.0"] = f"output_blocks.{block}.{layer}"
      block += 1
  resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
  out = {}
  for key, value in state_dict.items():
    prefix = max((p for p in prefixes if key.startswith(p + ".")), key=len)
    rest = key[len(prefix) + 1:]
    if ".resnets." in prefix:
      head, _, leaf = rest.partition(".")
      rest = f"{resnet[head]}.{leaf}"
    out[f"{prefixes[prefix]}.{rest}"] = value
  return out


def test_vae_compvis_and_legacy_formats(config, vae_state_dict):
  expected, _ = convert_vae.convert_vae_state_dict(vae_state_dict, config)
  compvis = compvis_vae(vae_state_dict, len(config.vae.channel_mult))
  # Names and shapes as in the CompVis kl-f8 checkpoint (decoder up.0 is the full-resolution level).
  assert compvis["decoder.up.0.block.0.nin_shortcut.weight"].shape == (16, 32, 1, 1)
  assert compvis["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
  assert "encoder.down.2.downsample.conv.weight" in compvis and "decoder.up.3.upsample.conv.weight" \
      in compvis and "decoder.up.0.upsample.conv.weight" not in compvis
  # A full SD checkpoint: VAE under first_stage_model., plus other models and LDM loss weights.
  full = {"first_stage_model." + k: v for k, v in compvis.items()}
  full["first_stage_model.loss.discriminator.main.0.weight"] = np.zeros((2, 3, 4, 4), np.float32)
  full["cond_stage_model.transformer.embeddings.weight"] = np.zeros((3, 2), np.float32)
  params, report = convert_vae.convert_vae_state_dict(full, config)
  assert report == dict(format="compvis", tensors=len(vae_state_dict), skipped_other_models=1,
                        ignored_loss_keys=1)
  _assert_same_params(params, expected)
  legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for key, value in vae_state_dict.items():
    for new, old in legacy_names.items():
      key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
    legacy[key] = value
  params, report = convert_vae.convert_vae_state_dict(legacy, config)
  assert report["format"] == "diffusers_legacy"
  _assert_same_params(params, expected)


def test_unet_compvis_format(config, unet_state_dict):
  expected, _ = convert_unet.convert_unet_state_dict(unet_state_dict, config)
  compvis = compvis_unet(unet_state_dict, config.unet)
  assert len(compvis) == len(unet_state_dict)
  for key in ("input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight",
              "input_blocks.1.1.proj_in.weight", "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
              "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
              "output_blocks.8.2.conv.weight", "output_blocks.11.1.transformer_blocks.0.ff.net.2.bias",
              "time_embed.2.bias", "out.2.weight"):
    assert key in compvis, key  # SD-1.5 `model.diffusion_model.*` names
  full = {"model.diffusion_model." + k: v for k, v in compvis.items()}
  full["first_stage_model.encoder.conv_in.weight"] = np.zeros((2, 3, 3, 3), np.float32)
  params, report = convert_unet.convert_unet_state_dict(full, config)
  assert report == dict(format="compvis", tensors=len(unet_state_dict), skipped_other_models=1)
  _assert_same_params(params, expected)


def test_mismatched_checkpoints_list_every_bad_key(config, vae_state_dict, unet_state_dict):
  broken = dict(vae_state_dict)
  del broken["decoder.up_blocks.1.resnets.0.norm2.bias"]
  broken["encoder.bogus.weight"] = np.zeros((3,), np.float32)
  broken["decoder.conv_in.weight"] = np.zeros((32, 4, 1, 1), np.float32)
  with pytest.raises(common.ConversionError) as error:
    convert_vae.convert_vae_state_dict(broken, config, source="vae.safetensors")
  message = str(error.value)
  for text in ("vae.safetensors", "missing keys (1): decoder.up_blocks.1.resnets.0.norm2.bias",
               "unexpected keys (1): encoder.bogus.weight", "misshaped keys (1): decoder.conv_in"):
    assert text in message, message
  compvis = compvis_unet(unet_state_dict, config.unet)
  del compvis["input_blocks.1.1.proj_in.weight"]
  with pytest.raises(common.ConversionError, match=r"missing keys \(1\): input_blocks\.1\.1\.proj_in"):
    convert_unet.convert_unet_state_dict(compvis, config)


@pytest.mark.subprocess
def test_cli_writes_loadable_params(config, vae_state_dict, tmp_path):
  from safetensors.numpy import save_file
  cli = importlib.import_module("mmldm_jax.convert.__main__")
  # The command line names a config file, so its U-Net is the preset's own (two levels).
  tiny = config_lib.load(TINY)
  unet_state_dict = {k: v.numpy()
                     for k, v in randomise(torch_unet(tiny.unet), seed=2).state_dict().items()}
  src = str(tmp_path / "unet.safetensors")
  save_file(unet_state_dict, src)
  dst = str(tmp_path / "unet.msgpack")
  line = cli.run("unet", src, dst, TINY)
  assert "format=diffusers" in line and dst in line
  expected, _ = convert_unet.convert_unet_state_dict(unet_state_dict, tiny)
  _assert_same_params(convert_unet.load_unet_params(dst, tiny), expected)
  _assert_same_params(convert_unet.load_unet_params(src, tiny), expected)
  # A converted file that does not fit the configured model is refused, naming the parameters.
  wide = config_lib.load(TINY)
  wide.unlock()
  wide.unet.model_channels = 64
  with pytest.raises(common.ConversionError, match="misshaped parameters .*conv_in/kernel"):
    convert_unet.load_unet_params(dst, wide)
  # The program: flags, exit status, the missing-file message.
  vae_src = str(tmp_path / "vae.safetensors")
  save_file(vae_state_dict, vae_src)
  command = [sys.executable, "-m", "mmldm_jax.convert", "--kind=vae", f"--src={vae_src}",
             f"--dst={tmp_path / 'vae.msgpack'}", f"--config={TINY}"]
  done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert "format=diffusers" in done.stdout
  expected_vae, _ = convert_vae.convert_vae_state_dict(vae_state_dict, config)
  _assert_same_params(convert_vae.load_vae_params(str(tmp_path / "vae.msgpack"), config),
                      expected_vae)
  command[4] = f"--src={tmp_path / 'absent.safetensors'}"
  done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 1
  assert "absent.safetensors does not exist" in done.stderr and "sd-vae-ft-mse" in done.stderr
