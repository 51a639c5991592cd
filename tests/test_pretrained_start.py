"""Training stages start from converted public weights: the whole SD VAE for `vae`, the SD-1.5 U-Net
inside the multi-modal autoencoder for `autoencoder`; everything else keeps its fresh init."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mmldm_jax import config_lib
from mmldm_jax.convert import common
from mmldm_jax.convert import unet as convert_unet
from mmldm_jax.convert import vae as convert_vae
from mmldm_jax.train import loop
from mmldm_jax.train import tasks
from mmldm_jax.train import weights

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _state_and_shardings():
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  params = {"autoencoder": {"unet": {"w": jnp.zeros((2, 3))}, "encoder": {"b": jnp.ones(2)}}}
  state = {"params": params, "ema": jax.tree.map(jnp.copy, params)}
  return state, {"params": jax.tree.map(lambda _: replicated, params)}


def test_pretrained_values_replace_only_the_named_submodules():
  state, shardings = _state_and_shardings()
  new = loop._with_pretrained(state, {"autoencoder": {"unet": {"w": np.full((2, 3), 7.0)}}},
                              shardings)
  np.testing.assert_array_equal(new["params"]["autoencoder"]["unet"]["w"], 7.0)
  np.testing.assert_array_equal(new["params"]["autoencoder"]["encoder"]["b"], 1.0)
  np.testing.assert_array_equal(new["ema"]["autoencoder"]["unet"]["w"], 7.0)


def test_pretrained_values_must_fit_the_model():
  state, shardings = _state_and_shardings()
  with pytest.raises(ValueError, match=r"shape \(3, 3\), model expects \(2, 3\)"):
    loop._with_pretrained(state, {"autoencoder": {"unet": {"w": np.zeros((3, 3))}}}, shardings)
  with pytest.raises(ValueError, match="no such submodule"):
    loop._with_pretrained(state, {"autoencoder": {"decoder": {"w": np.zeros((2, 3))}}}, shardings)


@pytest.mark.slow
def test_converted_files_load_for_the_stages(tmp_path):
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  rng = np.random.default_rng(0)
  fill = lambda leaf: rng.normal(size=leaf.shape).astype(np.float32)  # noqa: E731
  vae_values = jax.tree.map(fill, common.unbox(convert_vae.vae_template(config)))
  unet_values = jax.tree.map(fill, common.unbox(convert_unet.unet_template(config)))
  common.save_params(str(tmp_path / "vae.msgpack"), vae_values)
  common.save_params(str(tmp_path / "unet.msgpack"), unet_values)
  with config.unlocked():
    config.vae.pretrained_path = str(tmp_path / "vae.msgpack")
    config.unet.pretrained_path = str(tmp_path / "unet.msgpack")
  loaded_vae = weights.pretrained_vae_params(config)
  loaded_unet = tasks._pretrained_unet(config)["unet"]
  for loaded, saved in ((loaded_vae, vae_values), (loaded_unet, unet_values)):
    jax.tree.map(np.testing.assert_array_equal, loaded, saved)
  # The U-Net sits under 'unet' in the autoencoder's parameters, with the same tree.
  system = weights.autoencoder_system(config, config.vae.scale_factor)
  abstract = jax.eval_shape(system.init, jax.random.key(0))
  ae_unet = common.unbox(abstract["autoencoder"]["unet"])
  assert jax.tree.structure(ae_unet) == jax.tree.structure(unet_values)
  assert jax.tree.map(lambda a: a.shape, ae_unet) == jax.tree.map(np.shape, unet_values)
