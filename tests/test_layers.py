"""Shared layers: shapes, logical axis names, init options, and numerics against diffusers' blocks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmldm_jax.models import layers

pytestmark = pytest.mark.usefixtures("highest_matmul_precision")


def _boxed_leaves(variables):
  return jax.tree_util.tree_leaves(variables["params"], is_leaf=lambda a: hasattr(a, "names"))


@pytest.mark.slow
def test_every_parameter_has_logical_names():
  x = jnp.ones((2, 8, 8, 16))
  context = jnp.ones((2, 5, 12))
  modules = [
      (layers.ResBlock(32, use_temb=True, norm_groups=8), (x, jnp.ones((2, 20)))),
      (layers.AttentionBlock(8), (x,)),
      (layers.SpatialTransformer(2, 8, norm_groups=8), (x, context)),
      (layers.SpatialTransformer(2, 8, norm_groups=8, linear_projection=True), (x, context)),
      (layers.Downsample(16), (x,)),
      (layers.Upsample(16), (x,)),
      (layers.TimestepEmbedding(24), (jnp.ones((2, 8)),)),
  ]
  for module, args in modules:
    # Traced only: the names and shapes of the parameters, nothing computed.
    variables = jax.eval_shape(module.init, jax.random.key(0), *args)
    for leaf in _boxed_leaves(variables):
      assert hasattr(leaf, "names"), (type(module).__name__, leaf)
      assert len(leaf.names) == leaf.value.ndim
      assert set(leaf.names) <= {None, "embed", "mlp", "heads", "conv_in", "conv_out", "norm"}


def test_shapes_and_resampling():
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 16))
  cases = [
      (layers.Downsample(16), (2, 4, 4, 16)),
      (layers.Downsample(16, asymmetric_padding=True), (2, 4, 4, 16)),
      (layers.Upsample(8), (2, 16, 16, 8)),
      (layers.ResBlock(32, norm_groups=8, resample="down"), (2, 4, 4, 32)),
      (layers.ResBlock(32, norm_groups=8, resample="up"), (2, 16, 16, 32)),
  ]
  for module, shape in cases:
    variables = module.init(jax.random.key(0), x)
    assert module.apply(variables, x).shape == shape
  video = jnp.ones((2, 3, 8, 8, 4))  # [B, T, H, W, C], 3-D conv keeping T
  down = layers.Downsample(4, factors=(1, 2, 2))
  assert down.apply(down.init(jax.random.key(0), video), video).shape == (2, 3, 4, 4, 4)


def test_zero_init_resblock_is_identity():
  x = jax.random.normal(jax.random.key(2), (2, 8, 8, 16))
  block = layers.ResBlock(16, use_temb=True, norm_groups=8, zero_init_out=True)
  temb = jnp.ones((2, 12))
  variables = block.init(jax.random.key(0), x, temb)
  np.testing.assert_allclose(block.apply(variables, x, temb), x, atol=1e-6)
  with pytest.raises(ValueError, match="use_temb"):
    block.apply(variables, x)


@pytest.mark.parity
def test_group_norm_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).normal(size=(2, 5, 6, 16)).astype(np.float32) * 3 + 1
  ours = layers.GroupNorm(4, 1e-6)
  got = ours.apply(ours.init(jax.random.key(0), x), x)
  ref = torch.nn.functional.group_norm(torch.from_numpy(x).permute(0, 3, 1, 2), 4, eps=1e-6)
  np.testing.assert_allclose(got, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.parity
def test_timestep_embedding_matches_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers.models.embeddings import get_timestep_embedding
  steps = np.array([0, 1, 17.5, 999], np.float32)
  for dim, flip, shift in ((320, True, 0), (33, False, 1)):
    ref = get_timestep_embedding(torch.from_numpy(steps), dim, flip_sin_to_cos=flip,
                                 downscale_freq_shift=shift).numpy()
    got = layers.timestep_embedding(steps, dim, flip_sin_to_cos=flip, freq_shift=shift)
    # float32 angles up to ~1000 rad: exp() rounding differs by ~1 ulp, i.e. ~1e-4 after sin/cos.
    np.testing.assert_allclose(got, ref, atol=2e-4)


@pytest.mark.parametrize("strides, padding", [((1, 1, 1), ((1, 1), (1, 1), (1, 1))),
                                              ((2, 2, 2), ((0, 1), (1, 0), (2, 2)))])
def test_3d_convolution_as_2d_convolutions_equals_xla(strides, padding):
  """On CPU a 3-D convolution is a sum of 2-D ones over the temporal taps: the same value and
  gradients as XLA's 3-D convolution, up to float32 summation order (27 products per output
  channel and input channel here, so a few ulps of the largest term)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 7, 6, 3)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 3, 3, 4)), jnp.float32)
  ours = lambda x, k: layers.convolution(x, k, strides, padding)
  xla = lambda x, k: layers._native_convolution(x, k, strides, padding)  # noqa: SLF001
  np.testing.assert_allclose(ours(x, kernel), xla(x, kernel), rtol=0, atol=1e-5 * 27)
  loss = lambda conv: lambda x, k: jnp.sum(jnp.sin(conv(x, k)))
  for got, want in zip(jax.grad(loss(ours), (0, 1))(x, kernel),
                       jax.grad(loss(xla), (0, 1))(x, kernel)):
    scale = float(jnp.max(jnp.abs(want)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale * 27)


def test_every_model_options():
  """The options the DiT, the autoencoder's wrapped layers, the vocoder and LPIPS use."""
  rng = np.random.default_rng(0)
  # The DiT's timestep MLP: timm names, axes and init.
  embed = layers.TimestepEmbedding(24, layer_names=("mlp_0", "mlp_2"),
                                   kernel_axes=((None, "embed"), ("embed", "mlp")))
  params = embed.init(jax.random.key(0), jnp.ones((2, 8)))["params"]
  assert set(params) == {"mlp_0", "mlp_2"}
  assert params["mlp_0"]["kernel"].names == (None, "embed")
  assert params["mlp_2"]["bias"].names == ("mlp",)
  # layer_norm is LayerNorm without its (identity at init) affine parameters, in x's dtype.
  x = jnp.asarray(rng.normal(size=(2, 5, 16)) * 3 + 1, jnp.float32)
  norm = layers.LayerNorm(1e-6)
  np.testing.assert_array_equal(layers.layer_norm(x, 1e-6),
                                norm.apply(norm.init(jax.random.key(0), x), x))
  assert layers.layer_norm(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16
  # Dense initialisers: given, default (torch) and zero.
  dense = layers.Dense(4, kernel_init=jax.nn.initializers.ones,
                       bias_init=layers.torch_bias_init(16))
  params = dense.init(jax.random.key(0), x)["params"]
  np.testing.assert_array_equal(params["kernel"].value, np.ones((16, 4)))
  assert 0 < np.abs(params["bias"].value).max() <= 0.25
  # A dilated 1-D conv (HiFi-GAN's) is XLA's dilated convolution with torch's padding.
  wave = jnp.asarray(rng.normal(size=(2, 20, 3)), jnp.float32)
  conv = layers.Conv(5, (3,), dilation=3, init_std=0.01)
  variables = conv.init(jax.random.key(0), wave)
  kernel = variables["params"]["kernel"].value
  want = jax.lax.conv_general_dilated(wave, kernel, (1,), [(3, 3)], rhs_dilation=(3,),
                                      dimension_numbers=("NWC", "WIO", "NWC"))
  np.testing.assert_array_equal(conv.apply(variables, wave), want)
  # The autoencoder's wrapped layers keep their extra module level and fit the groups.
  frames = jnp.ones((2, 3, 8, 8, 16))
  for module, child in ((layers.FittedGroupNorm(32), "norm"), (layers.ConvNd(8), "conv"),
                        (layers.FrameResBlock(24, 32), "block")):
    params = jax.eval_shape(module.init, jax.random.key(0), frames)["params"]
    assert set(params) == {child}
  assert layers.fitted_groups(32, 16) == 16 and layers.fitted_groups(32, 48, 64) == 16


@pytest.mark.parametrize("score_scale", [1.0, 40.0])
def test_dot_product_attention_equals_jax_nn_with_its_gradients(score_scale):
  """Ours defers the softmax's normalisation to the output; jax.nn's normalises the weights. At
  score_scale 40 the scores reach the hundreds, where exp overflows float32 unless each row's
  maximum is taken off first, and the softmax is nearly one-hot."""
  batch, tokens, context_tokens, heads, head_dim = 2, 7, 5, 3, 4
  query_key, key_key, value_key, cotangent_key = jax.random.split(jax.random.key(3), 4)
  query = score_scale * jax.random.normal(query_key, (batch, tokens, heads * head_dim))
  key = jax.random.normal(key_key, (batch, context_tokens, heads * head_dim))
  value = jax.random.normal(value_key, (batch, context_tokens, heads * head_dim))
  cotangent = jax.random.normal(cotangent_key, (batch, tokens, heads * head_dim))

  def reference(query, key, value):
    split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, head_dim)
    return jax.nn.dot_product_attention(split(query), split(key), split(value)).reshape(
        batch, tokens, heads * head_dim)

  ours_out, ours_vjp = jax.vjp(lambda q, k, v: layers.dot_product_attention(q, k, v, heads),
                               query, key, value)
  ref_out, ref_vjp = jax.vjp(reference, query, key, value)
  assert np.isfinite(np.asarray(ours_out)).all()
  np.testing.assert_allclose(ours_out, ref_out, rtol=1e-5, atol=1e-5)
  for ours_grad, ref_grad in zip(ours_vjp(cotangent), ref_vjp(cotangent)):
    scale = float(jnp.abs(ref_grad).max())
    np.testing.assert_allclose(ours_grad, ref_grad, rtol=0, atol=1e-5 * max(scale, 1.0))
  half = layers.dot_product_attention(*(t.astype(jnp.bfloat16) for t in (query, key, value)), heads)
  assert half.dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="not divisible by 5 heads"):
    layers.dot_product_attention(query, key, value, 5)
