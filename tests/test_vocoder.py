"""HiFi-GAN V1 vocoder: parity with transformers' SpeechT5HifiGan (the original generator's structure
one to one), weight-norm checkpoints (both torch naming schemes), strict conversion errors, the
full-size parameter count, and `convert.hifigan.load_vocoder`."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from mmldm_jax import config_lib
from mmldm_jax.convert import common, hifigan
from mmldm_jax.models import vocoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
NUM_FRAMES = 12


def torch_config(config):
  section = config.vocoder
  return transformers.SpeechT5HifiGanConfig(
      model_in_dim=section.num_mels, upsample_initial_channel=section.upsample_initial_channel,
      upsample_rates=list(section.upsample_rates),
      upsample_kernel_sizes=list(section.upsample_kernel_sizes),
      resblock_kernel_sizes=list(section.resblock_kernel_sizes),
      resblock_dilation_sizes=[list(d) for d in section.resblock_dilation_sizes],
      normalize_before=False)


def randomise(module, seed):
  """Non-trivial weights (the default init is N(0, 0.01)-like and would make tanh nearly linear)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in module.parameters():
      param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


@pytest.fixture(scope="module")
def config():
  return config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))


@pytest.fixture(scope="module")
def apply_fn(config):
  model = vocoder.generator_from_config(config, precision=lax.Precision.HIGHEST)
  return jax.jit(lambda params, mel: model.apply({"params": params}, mel))


@pytest.fixture(scope="module")
def mel():
  return np.random.RandomState(0).randn(2, NUM_FRAMES, 80).astype(np.float32)


def run_torch(module, mel):
  with torch.no_grad():
    return module(torch.from_numpy(mel)).numpy()


def test_parity_with_speecht5_hifigan(config, apply_fn, mel):
  reference_model = transformers.SpeechT5HifiGan(torch_config(config)).eval()
  randomise(reference_model, seed=1)
  expected = run_torch(reference_model, mel)
  params = hifigan.convert_hifigan(reference_model.state_dict(), config)
  ours = np.asarray(apply_fn(params, mel))
  assert ours.shape == (2, NUM_FRAMES * 256) == expected.shape
  assert 0.01 < np.std(expected) < 0.9  # neither silent nor saturated by the tanh
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore:.*weight_norm.*is deprecated:FutureWarning")
def test_original_weight_norm_checkpoint(config, apply_fn, mel, tmp_path):
  """A jik876-style training checkpoint: {'generator': ...} with ups.{i} and weight_g / weight_v."""
  reference_model = transformers.SpeechT5HifiGan(torch_config(config)).eval()
  modules = ([reference_model.conv_pre, reference_model.conv_post] + list(reference_model.upsampler)
             + [conv for block in reference_model.resblocks for conv in [*block.convs1, *block.convs2]])
  for module in modules:  # the original's weight_norm(module), default dim=0
    torch.nn.utils.weight_norm(module)
  randomise(reference_model, seed=2)  # g no longer equals ||v||, so folding is really exercised
  expected = run_torch(reference_model, mel)
  state = {key.replace("upsampler.", "ups."): value
           for key, value in reference_model.state_dict().items() if key not in ("mean", "scale")}
  assert state["ups.0.weight_g"].shape == (32, 1, 1)  # dim 0 = input channels of ConvTranspose1d
  assert state["conv_pre.weight_g"].shape == (32, 1, 1)  # dim 0 = output channels of Conv1d
  path = tmp_path / "generator_v1"
  torch.save({"generator": state}, path)
  ours = np.asarray(apply_fn(hifigan.load_hifigan(str(path), config), mel))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_parametrizations_weight_norm_and_folding(config, apply_fn, mel):
  reference_model = transformers.SpeechT5HifiGan(torch_config(config)).eval()
  reference_model.apply_weight_norm()  # torch.nn.utils.parametrizations.weight_norm
  randomise(reference_model, seed=3)
  expected = run_torch(reference_model, mel)
  state = reference_model.state_dict()
  assert "upsampler.1.parametrizations.weight.original0" in state
  ours = np.asarray(apply_fn(hifigan.convert_hifigan(state, config), mel))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
  # The folded tensor itself equals torch's weight for a Conv1d and a ConvTranspose1d.
  for module in (reference_model.conv_pre, reference_model.upsampler[2]):
    folded = hifigan.fold_weight_norm(module.parametrizations.weight.original0.detach().numpy(),
                                      module.parametrizations.weight.original1.detach().numpy())
    np.testing.assert_allclose(folded, module.weight.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_transposed_conv_matches_torch_for_odd_padding():
  """k - stride odd: PyTorch floors the padding, output length (L-1)*s - 2p + k."""
  torch_conv = torch.nn.ConvTranspose1d(3, 5, kernel_size=5, stride=2, padding=1)
  randomise(torch_conv, seed=4)
  x = np.random.RandomState(1).randn(2, 7, 3).astype(np.float32)
  with torch.no_grad():
    expected = torch_conv(torch.from_numpy(x).transpose(1, 2)).transpose(1, 2).numpy()
  layer = vocoder.TransposedConv1d(5, kernel_size=5, stride=2, padding=1,
                                   precision=lax.Precision.HIGHEST)
  params = {"kernel": np.transpose(torch_conv.weight.detach().numpy(), (2, 0, 1)),
            "bias": torch_conv.bias.detach().numpy()}
  ours = np.asarray(layer.apply({"params": params}, x))
  assert ours.shape == expected.shape == (2, 15, 5)
  np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_full_size_parameter_count():
  config = config_lib.load(os.path.join(CONFIGS, "aist.py"))
  with torch.device("meta"):
    reference_model = transformers.SpeechT5HifiGan(torch_config(config))
  torch_count = sum(p.numel() for p in reference_model.parameters())
  ours = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(hifigan.param_template(config)))
  assert torch_count == ours == 13_926_017


def test_params_carry_logical_axis_names(config):
  boxed = jax.eval_shape(lambda: vocoder.init_params(config, jax.random.key(0)))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct) or
                           hasattr(x, "names"))
  assert leaves and all(tuple(leaf.names)[-1] == "conv_out" for leaf in leaves)


def test_strict_conversion_lists_every_problem(config):
  reference_model = transformers.SpeechT5HifiGan(torch_config(config))
  state = {key: value.numpy() for key, value in reference_model.state_dict().items()}
  del state["resblocks.5.convs2.1.bias"]
  state["ups.9.weight"] = np.zeros((1, 1, 1), np.float32)
  state["conv_post.weight"] = np.zeros((1, 3, 7), np.float32)
  with pytest.raises(common.ConversionError) as error:
    hifigan.convert_hifigan(state, config, source="bad.pt")
  message = str(error.value)
  assert "bad.pt" in message
  assert "missing keys (1): resblocks.5.convs2.1.bias" in message
  assert "unexpected keys (1): ups.9.weight" in message
  assert "misshaped keys (1): conv_post.weight" in message


def test_unpaired_weight_norm_and_input_normalisation_are_refused(config):
  with pytest.raises(common.ConversionError, match="conv_pre.weight_v"):
    hifigan.folded_state_dict({"conv_pre.weight_g": np.ones((4, 1, 1), np.float32)})
  with pytest.raises(common.ConversionError, match="normalize_before"):
    hifigan.folded_state_dict({"scale": np.full((80,), 2.0, np.float32)})


def test_load_vocoder(mel, tmp_path):
  config = config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))
  reference_model = transformers.SpeechT5HifiGan(torch_config(config)).eval()
  randomise(reference_model, seed=5)
  path = str(tmp_path / "hifigan.pt")
  torch.save(reference_model.state_dict(), path)
  with config.unlocked():
    config.vocoder.pretrained_path = path
    apply_fn, params = hifigan.load_vocoder(config)
    np.testing.assert_allclose(np.asarray(apply_fn(params, mel)), run_torch(reference_model, mel),
                               atol=1e-4, rtol=0)
    # Converter CLI output (msgpack) and the [B, mels, frames] layout of mmldm_jax.data.audio.
    common.save_params(str(tmp_path / "hifigan.msgpack"), params)
    config.vocoder.pretrained_path = str(tmp_path / "hifigan.msgpack")
    apply_fn, params = hifigan.load_vocoder(config, layout="mels_frames")
    np.testing.assert_allclose(np.asarray(apply_fn(params, np.swapaxes(mel, 1, 2))),
                               run_torch(reference_model, mel), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"\[batch, mels, frames\] with 80 mels"):
      apply_fn(params, mel)
    config.vocoder.pretrained_path = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="absent.*jik876/hifi-gan"):
      hifigan.load_vocoder(config)
    config.vocoder.pretrained_path = path
    config.audio.filterbank_sample_rate = 16000
    with pytest.raises(ValueError, match="config.audio.filterbank_sample_rate=16000"):
      hifigan.load_vocoder(config)
