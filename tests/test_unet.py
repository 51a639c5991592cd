"""SD-1.5 U-Net: parity with diffusers' UNet2DConditionModel (random weights, tiny preset), the two
conditioning entry points (input residuals, extra embedding), input-block geometry, parameter count."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmldm_jax import config_lib
from mmldm_jax.convert import unet as convert_unet
from mmldm_jax.models import unet as unet_lib

from conftest import CONFIGS

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from test_vae import randomise  # noqa: E402  (after the importorskip; one re-randomiser for parity)

SD15_UNET_PARAMS = 859_520_964
SIZE = 16  # latent size for the tiny parity runs (multiple of 2^3)


def torch_unet(unet_config, device=None, **extra):
  """diffusers' U-Net with our config's structure (`attention_head_dim` = number of heads, as SD-1.5)."""
  levels = len(unet_config.channel_mult)
  attention = [2 ** level in tuple(unet_config.attention_resolutions) for level in range(levels)]
  down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
  up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
  with torch.device(device or "cpu"):
    return diffusers.UNet2DConditionModel(
        sample_size=SIZE, in_channels=unet_config.in_channels, out_channels=unet_config.out_channels,
        down_block_types=down, up_block_types=up,
        block_out_channels=tuple(unet_config.model_channels * m for m in unet_config.channel_mult),
        layers_per_block=unet_config.num_res_blocks, attention_head_dim=unet_config.num_heads,
        cross_attention_dim=unet_config.context_dim, norm_num_groups=unet_config.norm_groups,
        **extra).eval()


def tiny_sd_layout_config():
  """The tiny preset with SD-1.5's four-level U-Net (the last level without attention) at the tiny
  width: the preset itself uses two levels, sized to its 8x8 latent; parity should cover SD's."""
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  config.unet.update(channel_mult=(1, 2, 2, 2), attention_resolutions=(4, 2, 1))
  return config


@pytest.fixture(scope="module")
def config():
  return tiny_sd_layout_config()


@pytest.fixture(scope="module")
def setup(config):
  # class_embed_type='identity' adds `class_labels` to the time embedding after the time MLP, which is
  # exactly our extra_embedding; it has no parameters, so the state dict is the plain U-Net's.
  reference = randomise(torch_unet(config.unet, class_embed_type="identity"))
  state_dict = {k: v.numpy() for k, v in reference.state_dict().items()}
  params, report = convert_unet.convert_unet_state_dict(state_dict, config)
  assert report["format"] == "diffusers"
  model = unet_lib.build_unet(config)
  apply = jax.jit(lambda p, x, t, c, residuals, extra: model.apply(
      {"params": p}, x, t, c, input_residuals=residuals, extra_embedding=extra))
  rng = np.random.default_rng(0)
  inputs = dict(x=rng.normal(size=(2, SIZE, SIZE, 4)).astype(np.float32),
                t=np.array([3.0, 711.0], np.float32),
                c=rng.normal(size=(2, 5, config.unet.context_dim)).astype(np.float32))
  zeros = [np.zeros((2, SIZE // f, SIZE // f, ch), np.float32)
           for ch, f in unet_lib.input_block_geometry(config.unet)]
  return dict(reference=reference, params=nn.meta.unbox(params), apply=apply, inputs=inputs,
              zeros=zeros, model=model)


def _reference(setup, extra):
  x, t, c = (torch.from_numpy(setup["inputs"][k]) for k in ("x", "t", "c"))
  with torch.no_grad():
    out = setup["reference"](x.permute(0, 3, 1, 2), t, c, class_labels=torch.from_numpy(extra))
  return out.sample.permute(0, 2, 3, 1).numpy()


def _ours(setup, params=None, residuals=None, extra=None):
  i = setup["inputs"]
  extra = np.zeros((2, 4 * setup["model"].model_channels), np.float32) if extra is None else extra
  return np.asarray(setup["apply"](params or setup["params"], i["x"], i["t"], i["c"],
                                   residuals or setup["zeros"], extra))


def test_matches_diffusers(setup):
  width = 4 * setup["model"].model_channels
  zero = np.zeros((2, width), np.float32)
  expected = _reference(setup, zero)
  assert np.abs(expected).max() > 0.5
  np.testing.assert_allclose(_ours(setup), expected, atol=1e-4, rtol=1e-4)
  # extra_embedding == adding to the time embedding after the MLP (diffusers' identity class path).
  extra = np.random.default_rng(1).normal(size=(2, width)).astype(np.float32)
  expected_extra = _reference(setup, extra)
  assert np.abs(expected_extra - expected).max() > 1e-2
  np.testing.assert_allclose(_ours(setup, extra=extra), expected_extra, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("block, module", [(0, "conv_in"),
                                           (1, "down_blocks_0_attentions_0/proj_out"),
                                           (3, "down_blocks_0_downsamplers_0/conv"),
                                           (9, "down_blocks_2_downsamplers_0/conv")])
def test_input_residual_is_added_after_its_block(setup, block, module):
  """A constant residual on input block k equals shifting the bias of block k's last layer: it is
  added to h right after the block and so reaches both the next block and the skip connection."""
  plain = _ours(setup)
  shift = np.random.default_rng(block).normal(size=(setup["zeros"][block].shape[-1],))
  shift = shift.astype(np.float32)
  residuals = list(setup["zeros"])
  residuals[block] = np.broadcast_to(shift, residuals[block].shape).copy()
  with_residual = _ours(setup, residuals=residuals)
  assert np.abs(with_residual - plain).max() > 1e-2
  params = jax.tree_util.tree_map(lambda a: a, setup["params"])
  node = params
  for name in module.split("/"):
    node = node[name]
  node["bias"] = node["bias"] + shift
  np.testing.assert_allclose(with_residual, _ours(setup, params=params), atol=1e-4, rtol=1e-4)


def test_bad_inputs_fail_loudly(setup):
  i = setup["inputs"]
  model, params = setup["model"], setup["params"]
  with pytest.raises(ValueError, match="input_residuals"):
    model.apply({"params": params}, i["x"], i["t"], i["c"], input_residuals=setup["zeros"][:11])
  with pytest.raises(ValueError, match="context"):
    model.apply({"params": params}, i["x"], i["t"], i["c"][..., :7])
  with pytest.raises(ValueError, match="multiples of 8"):
    model.apply({"params": params}, i["x"][:, :12, :12], i["t"], i["c"])


def test_input_block_geometry_sd15():
  geometry = unet_lib.input_block_geometry(config_lib.base_config().unet)
  assert [c for c, _ in geometry] == [320] * 4 + [640] * 3 + [1280] * 5
  assert [f for _, f in geometry] == [1] * 3 + [2] * 3 + [4] * 3 + [8] * 3


def test_full_size_parameter_count_equals_pytorch():
  unet_config = config_lib.base_config().unet
  reference = torch_unet(unet_config, device="meta")
  assert sum(p.numel() for p in reference.parameters()) == SD15_UNET_PARAMS
  model = unet_lib.build_unet(config_lib.base_config())
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)),
                                             jnp.zeros((1,)), jnp.zeros((1, 82, 768))))
  assert sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(shapes)) == SD15_UNET_PARAMS
