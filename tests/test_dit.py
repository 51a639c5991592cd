"""The joint audio-video DiT: structure (parameter count, axis names), the conditioning paths,
training (overfitting a batch) and sampling, continuation, and the analytic FLOPs."""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import CONFIGS
from mmldm_jax import config_lib
from mmldm_jax.models import dit, flops

TABLES = 368_640          # fixed sin-cos entries the PyTorch module holds as frozen parameters
CONTEXT = 77 * 768        # the learnable context, in the reference's wrapper, here in the module


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


@pytest.fixture(scope="module")
def tiny_config():
  return config_lib.load(os.path.join(CONFIGS, "aist.py:tiny"))


@pytest.fixture(scope="module")
def tiny_model(tiny_config):
  return dit.build_dit(tiny_config)


@pytest.fixture(scope="module")
def tiny_params(tiny_model):
  return nn.unbox(dit.init_params(tiny_model, jax.random.PRNGKey(0)))


def rerandomise(params, seed=1, scale=0.1):
  """Replaces every all-zero leaf (adaLN-Zero, final layers, zero_layers, biases) by noise, so
  the network is not the identity / zero map it is at init."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  new = [scale * jax.random.normal(key, leaf.shape) if not np.any(np.asarray(leaf)) else leaf
         for key, leaf in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, new)


def latents(model, batch, seed=2):
  keys = jax.random.split(jax.random.PRNGKey(seed), 2)
  return {"audio": jax.random.normal(keys[0], (batch,) + model.audio_shape),
          "video": jax.random.normal(keys[1], (batch,) + model.video_shape)}


@pytest.mark.parametrize("depth, reference_total", [(28, 678_022_304), (4, 104_298_656)])
def test_parameter_count_matches_the_reference(depth, reference_total):
  config = config_lib.load(os.path.join(CONFIGS, "aist.py"))
  model = dit.build_dit(config, depth=depth)
  shapes = jax.eval_shape(lambda key: dit.init_params(model, key), jax.random.PRNGKey(0))
  assert count(nn.unbox(shapes)) == reference_total - TABLES + CONTEXT
  assert count(nn.unbox(shapes)["context_embedding"]) == CONTEXT
  assert model.audio_shape == (8, 8, 16) and model.video_shape == (16, 16, 16)


@pytest.mark.slow
def test_unrolled_layers_have_the_same_parameters_and_outputs(tiny_config, tiny_model, tiny_params):
  unrolled = dit.build_dit(tiny_config, scan_layers=False)
  shapes = jax.eval_shape(lambda key: dit.init_params(unrolled, key), jax.random.PRNGKey(0))
  assert count(nn.unbox(shapes)) == count(tiny_params)
  params = rerandomise(tiny_params)
  stacked = params["dit"]["blocks"]
  unrolled_params = {k: v for k, v in params.items() if k != "dit"}
  unrolled_params["dit"] = {f"blocks_{i}": jax.tree_util.tree_map(lambda a: a[i], stacked)
                            for i in range(tiny_model.depth)}
  x, t, cond = latents(tiny_model, 2), jnp.array([10, 900]), {"context_mask": jnp.ones(2)}
  # Jitted: op by op, the unrolled blocks compile a small program per operation and shape.
  ours = jax.jit(tiny_model.apply)({"params": params}, x, t, cond)
  theirs = jax.jit(unrolled.apply)({"params": unrolled_params}, x, t, cond)
  for name in ("audio", "video"):
    np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_stacked_layers_applied_unrolled_equal_the_scan(tiny_config, tiny_model, tiny_params):
  """`dit.unroll_scanned_layers`: the scanned layout's parameters, applied block by block without
  the loop, give the scan's outputs and gradients (the same products in another program; float32
  rounding may differ at the level of a few ulps of the values), main DiT and the continuation's
  previous-clip encoder alike."""
  config = tiny_config.copy_and_resolve_references()
  config.dit.continuation = True
  config.dit.unroll_scanned_layers = True
  straight = dit.build_dit(config)
  looped = dit.build_dit(config, unroll_stacked=False)
  params = rerandomise(nn.unbox(dit.init_params(looped, jax.random.PRNGKey(0))))
  shapes = jax.eval_shape(lambda key: dit.init_params(straight, key), jax.random.PRNGKey(0))
  assert (jax.tree_util.tree_structure(nn.unbox(shapes)) ==
          jax.tree_util.tree_structure(params))
  x, t = latents(looped, 2), jnp.array([10, 900])
  cond = {"context_mask": jnp.ones(2), "prev_audio": latents(looped, 2, seed=3)["audio"],
          "prev_video": latents(looped, 2, seed=3)["video"]}

  def loss(model, p):
    out = model.apply({"params": p}, x, t, cond)
    return sum(jnp.sum(jnp.square(out[name])) for name in ("audio", "video"))
  # No loop left in the program (the scan lowers to one while loop per block stack).
  assert "stablehlo.while" in jax.jit(functools.partial(loss, looped)).lower(params).as_text()
  assert "stablehlo.while" not in jax.jit(functools.partial(loss, straight)).lower(params).as_text()
  ours, ours_grads = jax.jit(jax.value_and_grad(functools.partial(loss, straight)))(params)
  theirs, their_grads = jax.jit(jax.value_and_grad(functools.partial(loss, looped)))(params)
  assert float(theirs) > 0
  np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(ours_grads), jax.tree_util.tree_leaves(their_grads)):
    scale = float(np.abs(np.asarray(b)).max()) or 1.0
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)
  assert any(np.any(np.asarray(leaf)) for leaf in jax.tree_util.tree_leaves(
      their_grads["prev_encoder"]))


def test_every_parameter_has_logical_axis_names(tiny_model):
  boxed = dit.init_params(tiny_model, jax.random.PRNGKey(0))
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in leaves)
  specs = nn.get_partition_spec(boxed)
  assert tuple(specs["dit"]["blocks"]["fc1"]["kernel"]) == ("layers", "embed", "mlp")
  assert tuple(specs["dit"]["blocks"]["qkv"]["kernel"]) == ("layers", "embed", "heads")


def test_dit_initialisation(tiny_model, tiny_params):
  x = latents(tiny_model, 2)
  out = tiny_model.apply({"params": tiny_params}, x, jnp.array([1, 500]))
  for name in ("audio", "video"):  # adaLN-Zero + zero final layers: eps = 0 at init
    assert out[name].shape == x[name].shape and not np.any(np.asarray(out[name]))
  blocks = tiny_params["dit"]["blocks"]
  assert not np.any(np.asarray(blocks["adaLN_modulation"]["kernel"]))
  qkv = np.asarray(blocks["qkv"]["kernel"][0]).reshape(64, 192)
  bound = np.sqrt(6.0 / (64 + 192))  # Xavier-uniform over the fused (H, 3H) qkv kernel
  assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound
  cond_kernel = np.asarray(tiny_params["cond_embedder_audio"]["kernel"])  # torch default conv init
  assert np.abs(cond_kernel).max() <= 0.5 and np.std(cond_kernel) > 0.2
  np.testing.assert_allclose(np.std(tiny_params["embed_video"]["mod_embed"]), 0.01, rtol=0.3)


def test_sincos_table_matches_mae_layout():
  table = dit.sincos_2d(8, 2, 3)
  assert table.shape == (6, 8)
  # token (row 1, col 2) is index 5; first half encodes the column, second half the row
  np.testing.assert_allclose(table[5, :4], np.concatenate([np.sin([2.0, 2.0 / 100]),
                                                           np.cos([2.0, 2.0 / 100])]), rtol=1e-6)
  np.testing.assert_allclose(table[5, 4:], np.concatenate([np.sin([1.0, 1.0 / 100]),
                                                           np.cos([1.0, 1.0 / 100])]), rtol=1e-6)


@pytest.fixture(scope="module")
def random_apply(tiny_model, tiny_params):
  params = rerandomise(tiny_params)
  return params, jax.jit(lambda p, x, t, c: tiny_model.apply({"params": p}, x, t, c))


def test_permuting_audio_tokens_changes_the_video_output(tiny_model, random_apply):
  params, apply = random_apply
  x, t = latents(tiny_model, 2), jnp.array([300, 300])
  cond = {"context_mask": jnp.ones(2)}
  base = apply(params, x, t, cond)
  flat = x["audio"].reshape(2, -1, x["audio"].shape[-1])
  permuted = dict(x, audio=flat[:, ::-1].reshape(x["audio"].shape))
  moved = apply(params, permuted, t, cond)
  assert float(jnp.max(jnp.abs(moved["video"] - base["video"]))) > 1e-3


def test_cross_modal_conditioning_path(tiny_model, random_apply):
  params, apply = random_apply
  x, t = latents(tiny_model, 2), jnp.array([300, 600])
  clean = latents(tiny_model, 2, seed=3)
  no_cond = {"context_mask": jnp.ones(2), "cond_audio": jnp.zeros_like(clean["audio"]),
             "cond_video": jnp.zeros_like(clean["video"])}
  a2v = dict(no_cond, cond_audio=clean["audio"])
  base, conditioned = apply(params, x, t, no_cond), apply(params, x, t, a2v)
  assert float(jnp.max(jnp.abs(conditioned["video"] - base["video"]))) > 1e-3
  # Zeroing the cond embedder removes the path: conditioning no longer changes anything, and the
  # output equals the unconditional one of a model that never had the path.
  zeroed = dict(params, cond_embedder_audio=jax.tree_util.tree_map(
      jnp.zeros_like, params["cond_embedder_audio"]))
  np.testing.assert_allclose(apply(zeroed, x, t, a2v)["video"], apply(zeroed, x, t, no_cond)["video"],
                             atol=1e-6)
  # Context dropout: a zero mask equals an all-zero context.
  dropped = apply(params, x, t, dict(no_cond, context_mask=jnp.zeros(2)))
  zero_context = dict(params, context_embedding=jnp.zeros_like(params["context_embedding"]))
  np.testing.assert_allclose(dropped["video"], apply(zero_context, x, t, no_cond)["video"],
                             atol=1e-6)


def test_time_tokens_split_the_video_latent_by_key_frame():
  """dit.time_tokens: block k of the per-key-frame video latent's channels becomes its own tokens,
  each carrying the time code of key frame k; the audio latent's columns carry the code of their
  moment, so a tone column and the key frame of the same moment share it; outputs keep the latent
  shapes."""
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  config.data.key_frames = (0, 2, 4, 6, 8, 10, 12, 14)
  config.autoencoder.update(video_z_channels=32, audio_z_channels=8)
  config.autoencoder.audio_encoder.channel_mult = (1, 2)
  config.dit.time_tokens = True
  config_lib.validate(config)
  model = dit.build_dit(config)
  assert model.video_shape == (4, 4, 32) and model.audio_shape == (4, 4, 8)
  video = jax.random.normal(jax.random.PRNGKey(0), (2,) + model.video_shape)
  tokens = dit.to_tokens(video, 8)
  assert tokens.shape == (2, 8 * 16, 4)
  # Token k*16 + p is key frame k at position p (row-major): channels 4k..4k+3 there.
  np.testing.assert_array_equal(tokens[:, 3 * 16 + 5], video[:, 1, 1, 12:16])
  np.testing.assert_array_equal(dit.from_tokens(tokens, model.video_shape, 8), video)
  video_times = model.token_layout("video")["times"]
  audio_times = model.token_layout("audio")["times"]
  assert video_times[3 * 16 + 5] == 6.0
  assert audio_times[:4] == (2.0, 6.0, 10.0, 14.0)    # the columns' centres, in frames
  params = rerandomise(nn.unbox(dit.init_params(model, jax.random.PRNGKey(1))))
  assert params["embed_video"]["x_embedder"]["kernel"].shape == (4, config.dit.hidden_size)
  assert params["embed_video"]["mod_embed"].shape == (128, config.dit.hidden_size)
  x = {"audio": jax.random.normal(jax.random.PRNGKey(2), (2,) + model.audio_shape), "video": video}
  out = model.apply({"params": params}, x, jnp.array([100, 700]), {"context_mask": jnp.ones(2)})
  assert out["video"].shape == video.shape and out["audio"].shape == x["audio"].shape
  # Moving the audio in time (its columns reversed) changes what the video tokens attend to.
  reversed_audio = dict(x, audio=x["audio"][:, :, ::-1])
  moved = model.apply({"params": params}, reversed_audio, jnp.array([100, 700]),
                      {"context_mask": jnp.ones(2)})
  assert float(jnp.max(jnp.abs(moved["video"] - out["video"]))) > 1e-3
  config.dit.continuation = True
  with pytest.raises(ValueError, match="config.dit.time_tokens=True: expected dit.continuation=False"):
    config_lib.validate(config)
  config.dit.continuation = False
  config.autoencoder.video_latent_per_key_frame = False
  with pytest.raises(ValueError, match="config.dit.time_tokens=True: expected "
                     "autoencoder.video_latent_per_key_frame=True"):
    config_lib.validate(config)


def test_frame_tokens_hold_a_whole_key_frame_and_an_audio_column():
  """dit.frame_tokens: one video token per key frame (its whole block of channels, every position)
  with that key frame's time code, one audio token per column (every row and channel) with the
  column's; the layouts invert exactly, the outputs keep the latent shapes, and the option needs
  time_tokens."""
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  config.data.key_frames = (0, 2, 4, 6, 8, 10, 12, 14)
  config.autoencoder.update(video_z_channels=32, audio_z_channels=8)
  config.autoencoder.audio_encoder.channel_mult = (1, 2)
  config.dit.update(time_tokens=True, frame_tokens=True)
  config_lib.validate(config)
  model = dit.build_dit(config)
  video = jax.random.normal(jax.random.PRNGKey(0), (2,) + model.video_shape)
  audio = jax.random.normal(jax.random.PRNGKey(2), (2,) + model.audio_shape)
  video_tokens = dit.to_tokens(video, 8, "block")
  audio_tokens = dit.to_tokens(audio, 1, "column")
  assert video_tokens.shape == (2, 8, 4 * 4 * 4) and model.token_shape("video") == (8, 64)
  assert audio_tokens.shape == (2, 4, 4 * 8) and model.token_shape("audio") == (4, 32)
  # Video token k holds channels 4k..4k+3 of every position (row-major); audio token c column c.
  np.testing.assert_array_equal(video_tokens[:, 3].reshape(2, 4, 4, 4), video[..., 12:16])
  np.testing.assert_array_equal(audio_tokens[:, 1].reshape(2, 4, 8), audio[:, :, 1])
  np.testing.assert_array_equal(dit.from_tokens(video_tokens, model.video_shape, 8, "block"), video)
  np.testing.assert_array_equal(dit.from_tokens(audio_tokens, model.audio_shape, 1, "column"),
                                audio)
  assert model.token_layout("video")["times"] == tuple(float(k) for k in range(0, 16, 2))
  assert model.token_layout("audio")["times"] == (2.0, 6.0, 10.0, 14.0)
  params = rerandomise(nn.unbox(dit.init_params(model, jax.random.PRNGKey(1))))
  assert params["embed_video"]["x_embedder"]["kernel"].shape == (64, config.dit.hidden_size)
  assert params["embed_video"]["mod_embed"].shape == (8, config.dit.hidden_size)
  assert params["final_layer_audio"]["linear"]["kernel"].shape == (config.dit.hidden_size, 32)
  x = {"audio": audio, "video": video}
  apply = jax.jit(lambda p, x: model.apply({"params": p}, x, jnp.array([100, 700]),
                                           {"context_mask": jnp.ones(2)}))
  out = apply(params, x)
  assert out["video"].shape == video.shape and out["audio"].shape == audio.shape
  # The key frames' order matters (their time codes): swapping two key frames' blocks changes
  # the prediction for the others.
  swapped = jnp.concatenate([video[..., 4:8], video[..., 0:4], video[..., 8:]], axis=-1)
  moved = apply(params, dict(x, video=swapped))
  assert float(jnp.max(jnp.abs(moved["video"][..., 8:] - out["video"][..., 8:]))) > 1e-3
  config.dit.time_tokens = False
  with pytest.raises(ValueError, match="config.dit.frame_tokens=True: expected False unless "
                     "dit.time_tokens=True"):
    config_lib.validate(config)


def test_training_conditioning_probabilities(tiny_config):
  size = 20000
  batch = {"audio_latent": jnp.ones((size, 2, 2, 4)), "video_latent": jnp.ones((size, 4, 4, 4))}
  cond = dit.training_conditioning(jax.random.PRNGKey(4), batch, tiny_config)
  dropped = np.asarray(cond["context_mask"]) == 0
  a2v = np.asarray(cond["cond_audio"][:, 0, 0, 0]) == 1
  v2a = np.asarray(cond["cond_video"][:, 0, 0, 0]) == 1
  assert abs(dropped.mean() - 0.1) < 0.01
  assert not np.any(a2v & v2a) and not np.any((a2v | v2a) & dropped)
  expected = 0.9 * 0.05 * 0.95  # kept context, this one drawn, the other not
  assert abs(a2v.mean() - expected) < 0.005 and abs(v2a.mean() - expected) < 0.005


@pytest.mark.slow
def test_overfits_a_batch_and_samples_it(tiny_config, tiny_model, tiny_params):
  """8 synthetic latent pairs; the loss falls 10x, and guided-1 DDIM samples land near the batch."""
  config = tiny_config
  # Each latent: a per-sample vector per modality, constant over the grid, plus 0.2 spatial detail.
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  data = {"audio": jax.random.normal(keys[0], (8, 1, 1, 4))
                   + 0.2 * jax.random.normal(keys[1], (8,) + tiny_model.audio_shape),
          "video": jax.random.normal(keys[2], (8, 1, 1, 4))
                   + 0.2 * jax.random.normal(keys[3], (8,) + tiny_model.video_shape)}
  # Each step sees the 8 pairs 4 times (different noise and timesteps): less gradient noise.
  batch = {"audio_latent": jnp.tile(data["audio"], (4, 1, 1, 1)),
           "video_latent": jnp.tile(data["video"], (4, 1, 1, 1))}
  optimizer = optax.adam(3e-3)
  loss_fn = functools.partial(dit.generator_loss, config=config, model=tiny_model)
  evaluate = jax.jit(lambda params: loss_fn(params, batch, jax.random.PRNGKey(99))[0])

  @jax.jit
  def train(params, rng):
    def step(carry, key):
      params, opt_state = carry
      (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, key)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss
    (params, _), history = jax.lax.scan(step, (params, optimizer.init(params)),
                                        jax.random.split(rng, 600))
    return params, history

  params, _ = train(tiny_params, jax.random.PRNGKey(6))
  before, after = float(evaluate(tiny_params)), float(evaluate(params))
  assert 1.8 < before < 2.2  # eps = 0 at init: E[eps^2] summed over the two modalities
  assert after < before / 10, (before, after)

  sample_config = config.copy_and_resolve_references()
  sample_config.unlock()
  sample_config.sample.update(steps=25, guidance_audio=1.0, guidance_video=1.0)
  samples = jax.jit(lambda p, key: dit.sample_latents(p, sample_config, key, 16,
                                                      model=tiny_model))(params, jax.random.PRNGKey(7))
  flat = lambda d: np.concatenate([np.asarray(d["audio"]).reshape(len(d["audio"]), -1),
                                   np.asarray(d["video"]).reshape(len(d["video"]), -1)], axis=1)
  ours, train_set = flat(samples), flat(data)
  nearest = np.median(np.min(np.linalg.norm(ours[:, None] - train_set[None], axis=-1), axis=1))
  between = np.linalg.norm(train_set[:, None] - train_set[None], axis=-1)
  typical = np.median(between[np.triu_indices(8, 1)])
  random = flat(latents(tiny_model, 16, seed=8))
  random_nearest = np.median(np.min(np.linalg.norm(random[:, None] - train_set[None], axis=-1), 1))
  # Measured: 0.27 x typical (2.9 vs 10.9) after 600 steps; 0.18 x after 1000.
  assert nearest < 0.35 * typical and nearest < 0.35 * random_nearest, (
      nearest, typical, random_nearest)


@pytest.fixture(scope="module")
def continuation_setup(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  config.unlock()
  config.dit.continuation = True
  config.lock()
  model = dit.build_dit(config)
  return config, model, nn.unbox(dit.init_params(model, jax.random.PRNGKey(8)))


@pytest.mark.slow
def test_continuation_side_dit(continuation_setup):
  config, model, params = continuation_setup
  assert set(params["prev_encoder"]["dit"]["blocks"]) >= {"zero_layer", "qkv"}
  assert params["prev_encoder"]["dit"]["blocks"]["qkv"]["kernel"].shape[0] == config.dit.prev_depth
  x, t = latents(model, 2), jnp.array([100, 700])
  prev = latents(model, 2, seed=9)
  cond = {"context_mask": jnp.ones(2), "prev_audio": prev["audio"], "prev_video": prev["video"]}
  apply = jax.jit(lambda p, c: model.apply({"params": p}, x, t, c))
  # Zero-initialised residuals: at init the side DiT's blocks do not reach the main DiT.
  main_random = rerandomise({k: v for k, v in params.items() if k != "prev_encoder"})
  at_init = dict(main_random, prev_encoder=params["prev_encoder"])
  side_random = dict(at_init, prev_encoder=dict(
      params["prev_encoder"], t_embedder=rerandomise(params["prev_encoder"]["t_embedder"], 10, 1.0),
      eos_audio=-params["prev_encoder"]["eos_audio"]))
  np.testing.assert_allclose(apply(at_init, cond)["video"], apply(side_random, cond)["video"],
                             atol=1e-6)
  # Once the zero layers are trained (re-randomised), the previous clip steers the output through them.
  trained = dict(at_init, prev_encoder=rerandomise(params["prev_encoder"]))
  shifted = dict(cond, prev_video=cond["prev_video"] + 1.0)
  assert float(jnp.max(jnp.abs(apply(trained, cond)["video"] - apply(trained, shifted)["video"]))) > 1e-3

  batch = {"audio_latent": x["audio"], "video_latent": x["video"],
           "prev_audio_latent": prev["audio"], "prev_video_latent": prev["video"]}
  loss, metrics = dit.generator_loss(params, batch, jax.random.PRNGKey(11), config, model)
  assert np.isfinite(float(loss)) and set(metrics) == {"loss_audio", "loss_video"}
  with pytest.raises(ValueError, match="prev_video_latent"):
    dit.generator_loss(params, {k: batch[k] for k in ("audio_latent", "video_latent",
                                                      "prev_audio_latent")},
                       jax.random.PRNGKey(11), config, model)


def test_continuation_sampling(continuation_setup):
  config, model, params = continuation_setup
  params = rerandomise(params)
  clips = dit.sample_continuation(params, config, jax.random.PRNGKey(12), 2, 3, model=model)
  assert len(clips) == 3
  for clip in clips:
    assert clip["audio"].shape == (2,) + model.audio_shape
    assert np.all(np.isfinite(np.asarray(clip["video"])))
  seed = {"audio": latents(model, 2, seed=13)["audio"], "video": jnp.zeros((2,) + model.video_shape)}
  audio_continued = dit.sample_continuation(params, config, jax.random.PRNGKey(12), 2, 1,
                                            model=model, seed=seed)
  assert float(jnp.max(jnp.abs(audio_continued[0]["video"] - clips[0]["video"]))) > 1e-3


@pytest.mark.slow
def test_class_conditional_continuation_keeps_the_first_clips_class(tiny_config):
  config = tiny_config.copy_and_resolve_references()
  with config.unlocked():
    config.dit.update(continuation=True, class_conditional=True)
  model = dit.build_dit(config)
  params = rerandomise(nn.unbox(dit.init_params(model, jax.random.PRNGKey(8))))
  clips = dit.sample_continuation(params, config, jax.random.PRNGKey(12), 8, 3, model=model)
  first = np.asarray(clips[0]["label"])
  assert len(set(first.tolist())) > 1   # the videos draw different classes ...
  for clip in clips[1:]:                # ... and each keeps its own through every clip
    np.testing.assert_array_equal(np.asarray(clip["label"]), first)


def test_a2v_returns_the_given_audio(tiny_config, tiny_model, random_apply):
  params, _ = random_apply
  audio = latents(tiny_model, 2, seed=14)["audio"]
  out = dit.sample_latents(params, tiny_config, jax.random.PRNGKey(15), 2, model=tiny_model,
                           mode="a2v", audio_latent=audio)
  np.testing.assert_array_equal(out["audio"], audio)
  with pytest.raises(ValueError, match="video_latent"):
    dit.sample_latents(params, tiny_config, jax.random.PRNGKey(15), 2, model=tiny_model, mode="v2a")


def test_joint_order_samples_one_modality_then_the_other_given_it(tiny_config, tiny_model,
                                                                   random_apply):
  """`sample.joint_order='video_first'`: the video of the one-pass joint sample, and the sound the
  V2A pass draws given it (same keys, so both parts are bitwise those). 'audio_first' is the same
  code with the modalities' roles swapped."""
  params, _ = random_apply
  key = jax.random.PRNGKey(19)

  def ordered(order):
    config = tiny_config.copy_and_resolve_references()
    config.sample.joint_order = order
    config_lib.validate(config)
    return config
  together = dit.sample_latents(params, tiny_config, key, 2, model=tiny_model)
  assert tiny_config.sample.joint_order == "together"
  video_first = dit.sample_latents(params, ordered("video_first"), key, 2, model=tiny_model)
  second = jax.random.fold_in(key, 1)
  v2a = dit.sample_latents(params, tiny_config, second, 2, model=tiny_model, mode="v2a",
                           video_latent=together["video"])
  np.testing.assert_array_equal(video_first["video"], together["video"])
  np.testing.assert_array_equal(video_first["audio"], v2a["audio"])
  # The second pass is a new draw: the sound is not the one-pass sample's.
  assert float(jnp.max(jnp.abs(video_first["audio"] - together["audio"]))) > 1e-3
  with pytest.raises(ValueError, match="sample.joint_order"):
    ordered("sound_first")
  without_conditioning = ordered("together")
  without_conditioning.dit.cond_prob = 0.0
  without_conditioning.sample.joint_order = "video_first"
  with pytest.raises(ValueError, match="dit.cond_prob"):
    config_lib.validate(without_conditioning)


def test_v2a_guidance_can_drop_the_given_latent(tiny_config, tiny_model, random_apply,
                                               monkeypatch):
  """`sample.guidance_drops`: the unconditional branch of a v2a sample keeps the given video and
  drops the context ('context', the reference) or keeps the context and drops the video
  ('given')."""
  from mmldm_jax.diffusion import samplers
  params, _ = random_apply
  video = latents(tiny_model, 2, seed=21)["video"]
  seen = []
  original = samplers.guided_output

  def spy(model_fn, x, t, cond, uncond, guidance):
    seen.append((cond, uncond))
    return original(model_fn, x, t, cond, uncond, guidance)
  monkeypatch.setattr(samplers, "guided_output", spy)
  outputs = {}
  for drops in ("context", "given"):
    config = tiny_config.copy_and_resolve_references()
    config.sample.update(guidance_drops=drops, guidance_audio=3.0, steps=2)
    config_lib.validate(config)
    seen.clear()
    outputs[drops] = dit.sample_latents(params, config, jax.random.PRNGKey(22), 2,
                                        model=tiny_model, mode="v2a", video_latent=video)
    cond, uncond = seen[0]
    np.testing.assert_array_equal(cond["cond_video"], video)
    np.testing.assert_array_equal(cond["context_mask"], np.ones(2))
    if drops == "context":
      np.testing.assert_array_equal(uncond["cond_video"], video)
      np.testing.assert_array_equal(uncond["context_mask"], np.zeros(2))
    else:
      np.testing.assert_array_equal(uncond["cond_video"], np.zeros_like(video))
      np.testing.assert_array_equal(uncond["context_mask"], np.ones(2))
  assert float(jnp.max(jnp.abs(outputs["given"]["audio"] - outputs["context"]["audio"]))) > 1e-4
  config = tiny_config.copy_and_resolve_references()
  config.sample.guidance_drops = "video"
  with pytest.raises(ValueError, match="sample.guidance_drops"):
    config_lib.validate(config)


def test_conditioned_samples_can_train_at_high_noise(tiny_config):
  """`dit.cond_min_timestep`: the A2V / V2A samples' timesteps lie in [min, T), the others stay
  uniform in [0, T); 0 leaves the draw to the loss (None), as before the option."""
  config = tiny_config.copy_and_resolve_references()
  config.dit.cond_prob = 0.3
  size = 4000
  batch = {"audio_latent": jnp.ones((size, 2, 2, 4)), "video_latent": jnp.ones((size, 4, 4, 4))}
  key = jax.random.PRNGKey(23)
  cond = dit.training_conditioning(key, batch, config)
  assert dit.training_timesteps(key, cond, config) is None
  config.dit.cond_min_timestep = 600
  config_lib.validate(config)
  t = dit.training_timesteps(key, cond, config)
  np.testing.assert_array_equal(t["audio"], t["video"])
  t = np.asarray(t["audio"])
  given = (np.asarray(cond["cond_audio"][:, 0, 0, 0]) == 1) | (
      np.asarray(cond["cond_video"][:, 0, 0, 0]) == 1)
  assert given.sum() > 500
  assert t[given].min() >= 600 and t.max() <= 999
  assert abs(t[given].mean() - 799.5) < 10
  assert abs((t[~given] < 600).mean() - 0.6) < 0.03
  config.dit.cond_min_timestep = 1000
  with pytest.raises(ValueError, match="dit.cond_min_timestep"):
    config_lib.validate(config)
  config.dit.update(cond_min_timestep=500, cond_prob=0.0)
  with pytest.raises(ValueError, match="dit.cond_prob=0"):
    config_lib.validate(config)


def test_generator_diffusion_overrides_only_the_generator(tiny_config, tiny_model, random_apply):
  """`dit.schedule` / `dit.prediction` give the DiT's loss and sampler what the same values in
  `diffusion` give them, and leave `diffusion` (the autoencoder's decoder reads it) as it was."""
  params, _ = random_apply
  def configured(**fields):
    config = tiny_config.copy_and_resolve_references()
    config.unlock()
    for field, value in fields.items():
      section, name = field.split("__")
      config[section][name] = value
    config.lock()
    config_lib.validate(config)
    return config
  default = configured()
  own = configured(dit__schedule="cosine", dit__prediction="v")
  shared = configured(diffusion__schedule="cosine", diffusion__prediction="v")
  assert own.diffusion.to_dict() == default.diffusion.to_dict()
  assert dit.generator_diffusion(own).to_dict() == shared.diffusion.to_dict()
  batch = {name + "_latent": value for name, value in latents(tiny_model, 2, seed=16).items()}
  loss = lambda config: float(dit.generator_loss(params, batch, jax.random.PRNGKey(17), config,
                                                 model=tiny_model)[0])
  assert loss(own) == loss(shared) != loss(default)
  sample = lambda config: dit.sample_latents(params, config, jax.random.PRNGKey(18), 2,
                                             model=tiny_model)["video"]
  np.testing.assert_array_equal(sample(own), sample(shared))
  assert np.abs(np.asarray(sample(own)) - np.asarray(sample(default))).max() > 1e-3
  with pytest.raises(ValueError, match="dit.prediction"):
    configured(dit__prediction="x0")


def test_training_noise_shared_by_the_key_frames(tiny_config, tiny_model, random_apply):
  """`dit.shared_key_frame_noise`: the video noise's key-frame blocks get a common draw (audio's
  noise untouched) and the loss sees it; 0 keeps the reference's independent noise."""
  params, _ = random_apply
  assert dit.key_frame_noise_fn(tiny_config, 0.0) is None
  noise = latents(tiny_model, 2, seed=19)
  correlate = dit.key_frame_noise_fn(tiny_config, 1.0)
  shared = correlate(noise, jax.random.PRNGKey(20))
  np.testing.assert_array_equal(shared["audio"], noise["audio"])
  groups = len(tiny_config.data.key_frames)
  blocks = np.asarray(shared["video"]).reshape(2, -1, groups, tiny_model.video_shape[-1] // groups)
  np.testing.assert_array_equal(blocks, np.broadcast_to(blocks[:, :, :1], blocks.shape))
  config = tiny_config.copy_and_resolve_references()
  with config.unlocked():
    config.dit.shared_key_frame_noise = 1.0
  batch = {name + "_latent": value for name, value in latents(tiny_model, 2, seed=21).items()}
  loss = lambda config: dit.generator_loss(params, batch, jax.random.PRNGKey(22), config,
                                           model=tiny_model)[1]
  independent, correlated = loss(tiny_config), loss(config)
  assert np.isfinite(float(correlated["loss_video"]))
  assert float(independent["loss_video"]) != float(correlated["loss_video"])


def test_class_conditional_dit(tiny_config, tiny_params):
  """The label moves the output through the context, and nothing when the context is dropped;
  training passes the batch's labels; sampling draws them, or takes the given ones."""
  config = tiny_config.copy_and_resolve_references()
  with config.unlocked():
    config.dit.class_conditional = True
  model = dit.build_dit(config)
  assert model.num_classes == config.data.num_classes == 4
  params = rerandomise(nn.unbox(dit.init_params(model, jax.random.PRNGKey(0))))
  assert params["class_embedding"].shape == (4, model.context_dim)
  apply = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
  x, t = latents(model, 2), jnp.array([500, 500])
  outputs = {}
  for mask in (1.0, 0.0):
    for label in (0, 3):
      cond = {"context_mask": jnp.full((2,), mask), "label": jnp.full((2,), label)}
      outputs[mask, label] = apply(params, x, t, cond)["video"]
  assert float(jnp.max(jnp.abs(outputs[1.0, 0] - outputs[1.0, 3]))) > 1e-3
  np.testing.assert_array_equal(outputs[0.0, 0], outputs[0.0, 3])
  with pytest.raises(ValueError, match="needs cond\\['label'\\]"):
    model.apply({"params": params}, x, t, {"context_mask": jnp.ones(2)})

  batch = {name + "_latent": value for name, value in x.items()}
  with pytest.raises(ValueError, match="the batch needs 'label'"):
    dit.training_conditioning(jax.random.PRNGKey(1), batch, config)
  batch["label"] = jnp.array([1, 2])
  cond = dit.training_conditioning(jax.random.PRNGKey(1), batch, config)
  np.testing.assert_array_equal(cond["label"], [1, 2])
  loss = dit.generator_loss(params, batch, jax.random.PRNGKey(2), config, model=model)[0]
  assert np.isfinite(float(loss))

  drawn = dit.sample_latents(params, config, jax.random.PRNGKey(3), 2, model=model)
  given = [dit.sample_latents(params, config, jax.random.PRNGKey(3), 2, model=model,
                              labels=jnp.array([label, label])) for label in (0, 3)]
  assert all(np.all(np.isfinite(np.asarray(out["video"]))) for out in [drawn] + given)
  assert float(jnp.max(jnp.abs(given[0]["video"] - given[1]["video"]))) > 1e-3
  np.testing.assert_array_equal(given[1]["label"], [3, 3])     # the classes come back with them
  assert set(np.asarray(drawn["label"]).tolist()) <= set(range(4))
  assert "label" not in dit.sample_latents(tiny_params, tiny_config, jax.random.PRNGKey(3), 2)
  with pytest.raises(ValueError, match="not class-conditional"):
    dit.sample_latents(params, tiny_config, jax.random.PRNGKey(3), 2, labels=jnp.array([0, 1]))


@pytest.mark.parametrize("continuation, time_tokens", [(False, ""), (True, ""),
                                                        (False, "positions"), (False, "frames")])
def test_analytic_flops_match_xla(continuation, time_tokens):
  config = config_lib.load(os.path.join(CONFIGS, "aist.py"))
  # Time-aligned tokens: the 16 video channels as 4 key frames' blocks -> 4x the video tokens, or
  # (frame tokens) one token per key frame and audio column.
  layout = {}
  if time_tokens:
    layout = dict(key_frame_times=(0.0, 5.0, 10.0, 15.0), clip_frames=16,
                  frame_tokens=time_tokens == "frames")
  # Unrolled layers: XLA's cost analysis counts a scanned (while-loop) body once, not depth times.
  model = dit.build_dit(config, depth=2, prev_depth=1, continuation=continuation, remat="none",
                        scan_layers=False, **layout)
  params = jax.eval_shape(lambda key: nn.unbox(dit.init_params(model, key)), jax.random.PRNGKey(0))
  x, t, cond = dit.dummy_inputs(model, 1)
  if continuation:
    cond = dict(cond, prev_audio=x["audio"], prev_video=x["video"])
  compiled = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c)).lower(
      params, x, t, cond).compile()
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  ours = flops.dit_forward_flops(model)
  assert 0.85 < ours / analysis["flops"] < 1.05, (ours, analysis["flops"])


def test_flops_per_sample_for_the_trainer():
  config = config_lib.load(os.path.join(CONFIGS, "aist.py"))
  forward = flops.dit_flops_per_sample(config, training=False)
  assert flops.dit_flops_per_sample(config) == 3 * forward
  # DiT-XL/2's published 118.6 "GFLOPs" at 256 tokens are multiply-adds (fvcore), i.e. 237 GFLOPs;
  # 399 tokens with the same blocks: about 1.6x that.
  assert 350e9 < forward < 400e9
