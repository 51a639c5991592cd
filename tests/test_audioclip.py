"""AudioCLIP's audio head in Flax against a plain PyTorch ESResNeXt-fbsp written here from the
architecture (fbsp frontend, ResNeXt-50 32x4d with attention), random weights, saved as a whole
AudioCLIP state dict (`audio.*` plus keys of the other branches) like `AudioCLIP-Full-Training.pt`;
every `audio.*` key is used, the others are not read."""
import copy
import math

import numpy as np
import pytest
from scipy import signal

torch = pytest.importorskip("torch", reason="the parity test needs torch (the test extra)")
F = torch.nn.functional

from mmldm_jax.convert import common  # noqa: E402
from mmldm_jax.evaluation import audioclip  # noqa: E402


class TorchFBSP(torch.nn.Module):
  """The frequency-B-spline filterbank, parameters m, fb, fc per output bin (no bias)."""

  def __init__(self, bins):
    super().__init__()
    self.m = torch.nn.Parameter(torch.zeros(bins))
    self.fb = torch.nn.Parameter(torch.ones(bins))
    self.fc = torch.nn.Parameter(torch.arange(bins, dtype=torch.float32))

  def forward(self, frames):
    length = frames.shape[-1]
    t = math.pi * torch.linspace(-1.0, 1.0, length)[None, :] + 1e-8
    m, fb, fc = self.m[:, None], self.fb[:, None], self.fc[:, None]
    x = fb * t / (m + 1e-8)
    sinc = torch.where(x == 0, torch.ones_like(x), torch.sin(x) / x)
    # Complex power of a real base: polar form with the angle of the base (0 or pi).
    angle = torch.atan2(torch.zeros_like(sinc), sinc)
    modulus = (sinc ** 2) ** (0.5 * m)
    window = torch.complex(modulus * torch.cos(m * angle), modulus * torch.sin(m * angle))
    carrier = torch.complex(torch.cos(fc * t), -torch.sin(fc * t))
    weights = torch.sqrt(fb) * window * carrier / length ** 0.5
    return frames @ weights.real.T, frames @ weights.imag.T


class TorchAttention(torch.nn.Module):
  def __init__(self, channels_in, channels_out, kernel):
    super().__init__()
    padding = tuple(k // 2 for k in kernel)
    self.conv_depth = torch.nn.Conv2d(channels_in, channels_in, kernel, padding=padding,
                                      groups=channels_in)
    self.conv_point = torch.nn.Conv2d(channels_in, channels_out, 1)
    self.bn = torch.nn.BatchNorm2d(channels_out)

  def forward(self, x, size):
    return torch.sigmoid(self.bn(self.conv_point(self.conv_depth(F.adaptive_max_pool2d(x, size)))))


class TorchBlock(torch.nn.Module):
  def __init__(self, channels_in, planes, stride, project):
    super().__init__()
    width = planes // 64 * 4 * 32
    self.conv1 = torch.nn.Conv2d(channels_in, width, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(width)
    self.conv2 = torch.nn.Conv2d(width, width, 3, stride, 1, groups=32, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(width)
    self.conv3 = torch.nn.Conv2d(width, planes * 4, 1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(planes * 4)
    self.downsample = (torch.nn.Sequential(torch.nn.Conv2d(channels_in, planes * 4, 1, stride,
                                                           bias=False),
                                           torch.nn.BatchNorm2d(planes * 4))
                       if project else None)

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class TorchAudioHead(torch.nn.Module):
  """ESResNeXt-fbsp in evaluation mode with the key layout of AudioCLIP's `audio` module."""

  def __init__(self):
    super().__init__()
    window = np.asarray(signal.get_window("blackmanharris", audioclip.WINDOW_LENGTH, fftbins=True),
                        np.float32)
    self.register_buffer("window", torch.from_numpy(window))
    self.fbsp = TorchFBSP(audioclip.BINS)
    self.conv1 = torch.nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(64)
    channels = 64
    kernels = audioclip.ATTENTION_KERNELS
    for stage, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
      layer = [TorchBlock(channels if b == 0 else planes * 4, planes,
                          2 if stage > 1 and b == 0 else 1, b == 0) for b in range(blocks)]
      setattr(self, f"layer{stage}", torch.nn.Sequential(*layer))
      setattr(self, f"att{stage}", TorchAttention(channels, planes * 4, kernels[stage - 1]))
      channels = planes * 4
    self.att5 = TorchAttention(2048, 2048, kernels[4])
    self.fc = torch.nn.Linear(2048, 1024)

  def forward(self, waveform):
    # The model's int16 scaling, in float32 as the released model runs (it rounds the signal to
    # steps of 2 ** -8), also when the rest runs in float64.
    x = ((waveform.float() + 32768.0) * 2.0 / 65535.0 - 1.0).to(self.window.dtype)
    hop, length = audioclip.HOP, audioclip.WINDOW_LENGTH
    count = 1 + math.ceil((x.shape[-1] - length) / hop)
    extra = (count - 1) * hop + length - x.shape[-1]
    x = F.pad(x, (extra // 2, extra - extra // 2))
    frames = x.unfold(-1, length, hop) * self.window
    side = (audioclip.N_FFT - length) // 2
    frames = F.pad(frames, (side, audioclip.N_FFT - length - side))
    real, imag = self.fbsp(frames)                                   # [B, frames, bins]
    power = (real ** 2 + imag ** 2).transpose(1, 2)                  # [B, bins, frames]
    band = power.shape[1] // 3
    power = power[:, :3 * band].reshape(power.shape[0], 3, band, power.shape[-1])
    power = torch.where(power > 0, power, torch.full_like(power, 1e-18))
    x = 10.0 * torch.log10(power)
    x = F.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 3, 2, 1)
    for stage in range(1, 5):
      out = getattr(self, f"layer{stage}")(x)
      x = out * getattr(self, f"att{stage}")(x, out.shape[-2:])
    pooled = F.adaptive_avg_pool2d(x, 1) * self.att5(x, (1, 1))
    return self.fc(pooled.flatten(1))


def _test_sounds(count, seed):
  """`count` 1.6 s sounds at 44.1 kHz in [-1, 1]: a tone, a click train or a chirp over noise loud
  enough to fill every frequency bin (a float32 network is only defined to its rounding in bins
  holding almost nothing, see the parity test)."""
  rng = np.random.default_rng(seed)
  time = np.arange(audioclip.CLIP_SAMPLES) / audioclip.SAMPLE_RATE
  sounds = [0.5 * np.sin(2 * np.pi * 440 * time), (np.sin(2 * np.pi * 4 * time) > 0.99) * 0.6,
            0.4 * np.sin(2 * np.pi * (200 + 2000 * time) * time)]
  return np.stack([sounds[i % len(sounds)] + rng.uniform(-0.3, 0.3, len(time))
                   for i in range(count)]).astype(np.float32)


@pytest.fixture(scope="module")
def torch_model_and_file(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchAudioHead()
  with torch.no_grad():
    # A trained-looking filterbank: window exponents, bandwidths and centres away from the
    # initial values, so the complex power (negative sinc lobes) and the bandwidth terms matter.
    model.fbsp.m.uniform_(0.5, 2.0)
    model.fbsp.fb.uniform_(0.5, 3.0)
    model.fbsp.fc.add_(torch.empty(audioclip.BINS).uniform_(-0.5, 0.5))
    # BatchNorm statistics measured on sounds (as training sets them) and random affine terms, so
    # every layer passes on what the input changes.
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.momentum = None
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.2, 0.2)
    model.train()
    model(torch.from_numpy(_test_sounds(4, 1)))
  model.eval()
  state = {f"audio.{key}": value for key, value in model.state_dict().items()}
  # Keys of the image and text branches and the logit scales: present in the real file, not read.
  state.update({"visual.conv1.weight": torch.zeros(32, 3, 3, 3),
                "token_embedding.weight": torch.zeros(8, 4),
                "logit_scale_ai": torch.tensor(4.6), "logit_scale_at": torch.tensor(4.6)})
  path = str(tmp_path_factory.mktemp("audioclip") / audioclip.WEIGHTS_FILE)
  torch.save(state, path)
  return model, path


def test_embedding_equals_pytorch(torch_model_and_file):
  """The port against the PyTorch network run in float64 (the exact value of these weights),
  within three times the PyTorch float32 network's own distance from it: log power amplifies
  rounding in weak frequency bins, so float32 is only defined to that level (about 0.4 % of the
  embedding's scale here; 2 % for pure tones whose other bins hold almost nothing)."""
  model, path = torch_model_and_file
  sounds = torch.from_numpy(_test_sounds(3, 0))
  with torch.no_grad():
    float32 = model(sounds).numpy()
    exact = copy.deepcopy(model).double()(sounds).numpy()
  scale = float(np.abs(exact).max())
  tolerance = 3 * float(np.abs(float32 - exact).max())
  assert tolerance < 0.02 * scale, (tolerance, scale)
  # The sounds embed apart by far more than the tolerance, so the check has teeth.
  assert float(np.abs(exact[0] - exact[1]).max()) > 10 * tolerance
  embedder = audioclip.AudioCLIPEmbeddings(path)
  got = embedder(sounds.numpy())
  np.testing.assert_allclose(got, exact, rtol=0, atol=tolerance)
  # The protocol's length: a longer sound is cut to its first 1.6 s, a shorter one zero-padded.
  longer = np.concatenate([sounds.numpy(), sounds.numpy()[:, :1000]], axis=1)
  np.testing.assert_allclose(embedder(longer), got, rtol=0, atol=1e-6 * scale)
  shorter = sounds.numpy()[:, :50000]
  padded = np.pad(shorter, ((0, 0), (0, audioclip.CLIP_SAMPLES - 50000)))
  np.testing.assert_allclose(embedder(shorter), embedder(padded), rtol=0, atol=1e-6 * scale)
  assert float(np.abs(embedder(shorter) - got).max()) > 10 * tolerance


def test_every_audio_key_is_used_and_leftovers_are_refused(torch_model_and_file):
  model, path = torch_model_and_file
  state = {f"audio.{key}": value.numpy() for key, value in model.state_dict().items()}
  audioclip.convert_audio_head(dict(state, logit_scale_ai=np.ones(()), **{
      "visual.conv1.weight": np.zeros((1,), np.float32)}))   # other branches: not read
  with pytest.raises(common.ConversionError, match=r"unexpected keys.*audio\.att6\.bn\.weight"):
    audioclip.convert_audio_head(dict(state, **{"audio.att6.bn.weight": np.ones(3, np.float32)}))
  missing = dict(state)
  del missing["audio.layer3.5.bn2.running_var"], missing["audio.window"]
  with pytest.raises(common.ConversionError,
                     match=r"missing keys.*audio\.layer3\.5\.bn2\.running_var.*audio\.window"):
    audioclip.convert_audio_head(missing)
  misshaped = dict(state, **{"audio.fbsp.fc": np.zeros(1024, np.float32)})
  with pytest.raises(common.ConversionError, match=r"misshaped keys.*audio\.fbsp\.fc"):
    audioclip.convert_audio_head(misshaped)
  with pytest.raises(common.ConversionError, match="no `audio.\\*` keys"):
    audioclip.convert_audio_head({"visual.conv1.weight": np.zeros(1, np.float32)})
  with pytest.raises(FileNotFoundError, match=r"AudioCLIP-Full-Training\.pt.*AudioCLIP"):
    audioclip.load_audio_head("/nonexistent/AudioCLIP-Full-Training.pt")


def test_adaptive_max_pool_matches_pytorch():
  x = np.random.default_rng(0).normal(size=(2, 31, 9, 3)).astype(np.float32)
  for size in ((16, 5), (31, 9), (1, 1), (7, 4)):
    expected = F.adaptive_max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), size)
    np.testing.assert_array_equal(audioclip.adaptive_max_pool(x, size),
                                  expected.permute(0, 2, 3, 1).numpy())
