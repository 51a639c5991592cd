"""PANNs Cnn14 in Flax against a PyTorch Cnn14 of the same architecture (torchlibrosa front end, as
the PANNs code builds it) with random weights, loaded through a saved torch file like
`Cnn14_mAP=0.431.pth` ({"model": state_dict}); every key of the file is used."""
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the parity test needs torch (the test extra)")
torchlibrosa = pytest.importorskip("torchlibrosa.stft",
                                   reason="the parity test needs torchlibrosa (the test extra)")

from mmldm_jax.convert import common  # noqa: E402
from mmldm_jax.evaluation import panns  # noqa: E402


class TorchConvBlock(torch.nn.Module):
  def __init__(self, in_channels, out_channels):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
    self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(out_channels)
    self.bn2 = torch.nn.BatchNorm2d(out_channels)

  def forward(self, x, pool):
    x = torch.relu(self.bn1(self.conv1(x)))
    x = torch.relu(self.bn2(self.conv2(x)))
    return torch.nn.functional.avg_pool2d(x, pool)


class TorchCnn14(torch.nn.Module):
  """Cnn14 in evaluation mode, laid out as the PANNs code lays it out (its state-dict keys)."""

  def __init__(self):
    super().__init__()
    self.spectrogram_extractor = torchlibrosa.Spectrogram(
        n_fft=1024, hop_length=320, win_length=1024, window="hann", center=True,
        pad_mode="reflect", freeze_parameters=True)
    self.logmel_extractor = torchlibrosa.LogmelFilterBank(
        sr=32000, n_fft=1024, n_mels=64, fmin=50, fmax=14000, ref=1.0, amin=1e-10, top_db=None,
        freeze_parameters=True)
    self.bn0 = torch.nn.BatchNorm2d(64)
    widths = (1,) + panns.WIDTHS
    for index in range(1, 7):
      setattr(self, f"conv_block{index}", TorchConvBlock(widths[index - 1], widths[index]))
    self.fc1 = torch.nn.Linear(2048, 2048)
    self.fc_audioset = torch.nn.Linear(2048, 527)

  def forward(self, waveform):
    x = self.logmel_extractor(self.spectrogram_extractor(waveform))   # [B, 1, T, mel]
    x = self.bn0(x.transpose(1, 3)).transpose(1, 3)
    for index in range(1, 7):
      x = getattr(self, f"conv_block{index}")(x, (2, 2) if index < 6 else (1, 1))
    x = torch.mean(x, dim=3)
    x = torch.max(x, dim=2)[0] + torch.mean(x, dim=2)
    embedding = torch.relu(self.fc1(x))
    return embedding, torch.sigmoid(self.fc_audioset(embedding))


@pytest.fixture(scope="module")
def torch_model_and_file(tmp_path_factory):
  folder = tmp_path_factory.mktemp("panns")
  return saved_torch_cnn14(str(folder / panns.WEIGHTS_FILE))


def saved_torch_cnn14(path):
  """A random TorchCnn14 saved at `path` as the PANNs release saves it; returns (model, path).

  Its BatchNorm statistics are measured on a few sounds (as training would set them) and its affine
  terms random: every layer then passes on what the input changes, so a parity check has teeth.
  (benchmarks/panns.py times this model too.)"""
  torch.manual_seed(0)
  model = TorchCnn14()
  rng = np.random.default_rng(1)
  time = np.arange(32000) / 32000
  calibration = np.stack([0.3 * np.sin(2 * np.pi * f * time) + rng.normal(0, 0.02, 32000)
                          for f in (220, 880, 3000, 7000)]).astype(np.float32)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.momentum = None    # a plain average over the calibration pass
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
    model.train()
    model(torch.from_numpy(calibration))
  model.eval()
  torch.save({"model": model.state_dict(), "iteration": 0}, path)
  return model, path


def test_embedding_equals_pytorch(torch_model_and_file):
  model, path = torch_model_and_file
  time = np.arange(32000) / 32000   # 1 s: a 440 Hz tone and quiet noise
  waveform = np.stack([0.5 * np.sin(2 * np.pi * 440 * time),
                       np.random.default_rng(0).uniform(-0.05, 0.05, 32000)]).astype(np.float32)
  with torch.no_grad():
    expected_embedding, expected_tags = model(torch.from_numpy(waveform))
  # The two sounds embed apart by far more than the tolerance below, so the check has teeth.
  spread = float((expected_embedding[0] - expected_embedding[1]).abs().max())
  assert spread > 100 * 1e-4 * float(expected_embedding.abs().max()), spread
  variables = panns.load_cnn14(path)
  outputs = jax.jit(panns.Cnn14().apply)(variables, waveform)
  np.testing.assert_allclose(outputs["embedding"], expected_embedding.numpy(), rtol=1e-4,
                             atol=1e-4 * float(expected_embedding.abs().max()))
  np.testing.assert_allclose(outputs["clipwise"], expected_tags.numpy(), atol=1e-3)
  embedder = panns.Cnn14Embeddings(path)
  np.testing.assert_allclose(embedder(waveform), expected_embedding.numpy(), rtol=1e-4,
                             atol=1e-4 * float(expected_embedding.abs().max()))


@pytest.mark.parametrize("height,width", [(1, 1), (3, 2), (2, 5), (4, 4)])
def test_conv3x3_is_the_convolution_on_small_and_larger_maps(height, width):
  """Maps with a side under 3 take the matmul path (`panns.conv3x3`), the others XLA's
  convolution: both are the float64 convolution up to float32 rounding of sums of 9 x 64 terms."""
  rng = np.random.default_rng(height * 10 + width)
  x = rng.normal(size=(3, height, width, 64))
  kernel = rng.normal(size=(3, 3, 64, 32)) / 24.0
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  expected = sum(np.einsum("bhwc,co->bhwo", padded[:, dy:dy + height, dx:dx + width],
                           kernel[dy, dx]) for dy in range(3) for dx in range(3))
  got = jax.jit(panns.conv3x3)(x.astype(np.float32), kernel.astype(np.float32))
  assert got.shape == (3, height, width, 32)
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_every_key_is_used_and_leftovers_are_refused(torch_model_and_file):
  model, path = torch_model_and_file
  state = {key: value.numpy() for key, value in model.state_dict().items()}
  panns.convert_cnn14(state)   # uses all but num_batches_tracked, or raises
  with pytest.raises(common.ConversionError, match="unexpected keys.*spec_extra"):
    panns.convert_cnn14(dict(state, spec_extra=np.zeros(3, np.float32)))
  del state["conv_block3.bn2.running_var"]
  with pytest.raises(common.ConversionError, match=r"missing keys.*conv_block3\.bn2\.running_var"):
    panns.convert_cnn14(state)
  with pytest.raises(FileNotFoundError, match=r"Cnn14_mAP=0\.431\.pth.*zenodo"):
    panns.load_cnn14("/nonexistent/Cnn14_mAP=0.431.pth")


def test_sharded_cnn14_equals_one_device(torch_model_and_file):
  """The stage's batches split over the 8 forced CPU devices (evaluation/devices.py) give the
  embeddings of one device."""
  _, path = torch_model_and_file       # a random Cnn14 with measured BatchNorm statistics
  sharded = panns.Cnn14Embeddings(path)
  single = panns.Cnn14Embeddings(path, devices=jax.devices()[:1])
  time = np.arange(panns.MIN_SAMPLES) / panns.SAMPLE_RATE
  rng = np.random.default_rng(0)
  waveforms = np.stack([0.4 * np.sin(2 * np.pi * (200 + 500 * i) * time) +
                        rng.normal(0, 0.01, len(time)) for i in range(11)]).astype(np.float32)
  expected = single(waveforms)
  got = sharded(waveforms)            # 11 clips: padded to 16, two per device
  assert sharded._embed.placement(8)[0].mesh.devices.size == 8
  scale = np.abs(expected).max()
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * scale)
  assert np.abs(expected[0] - expected[5]).max() > 1e-2 * scale   # the check has teeth
