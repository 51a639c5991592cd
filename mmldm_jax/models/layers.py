"""Building blocks shared by the VAE, the U-Net and the multi-modal autoencoder (Flax Linen, NHWC).

Every block matches the computation of its diffusers counterpart, and its parameter names follow diffusers
(`norm1`, `conv1`, `time_emb_proj`, `to_q`, ...), so the checkpoint converters are plain renames.

  GroupNorm, LayerNorm       normalisation with 'norm' parameters; statistics in float32
  BatchStatNorm              BatchNorm with batch statistics only (the VAE's PatchGAN discriminator)
  layer_norm                 LayerNorm without parameters (the DiT's adaLN blocks)
  Conv                       1-, 2- or 3-D convolution (kernel (*k, in, out)), torch-style padding
  Dense                      linear layer with configurable logical axis names and initialisers
  ResBlock                   diffusers ResnetBlock2D (+ optional time embedding, LDM-style up/down)
  FittedGroupNorm, ConvNd,   the multi-modal autoencoder's wrapped layers (perceptual encoders,
  FrameResBlock              projectors, heads, discriminator): GroupNorm with gcd groups, a conv whose
                             rank follows the input, a per-frame ResBlock resampling by 2^n
  Downsample, Upsample       SD U-Net style (stride-2 conv pad 1 / nearest x2 + conv) and VAE style
                             (asymmetric pad (0, 1) + stride-2 conv)
  AttentionBlock             the VAE mid-block self-attention (GroupNorm, one head, residual)
  Attention                  multi-head (cross-)attention (`dot_product_attention`)
  TransformerBlock           LayerNorm -> self-attn -> LayerNorm -> cross-attn -> LayerNorm -> GEGLU FF
  SpatialTransformer         GroupNorm, proj_in, transformer blocks, proj_out, residual (SD-1.5 layout)
  timestep_embedding         sinusoidal embedding (diffusers `get_timestep_embedding` semantics; also
                             the DiT's frequency embedding)
  TimestepEmbedding          the time MLP (linear_1 -> SiLU -> linear_2; the DiT names them mlp_0, mlp_2)
  remat_policy               a `jax.checkpoint_policies` policy by name ('none' = no remat)
  rematerialised             a module class under that policy (same parameter names)

Layout: activations are channels-last, `[B, *spatial, C]`; the spatial rank (1, 2 or 3) is taken from the
input. Every module has `dtype` (computation) and `param_dtype` (storage) attributes; every parameter
carries logical axis names (see the working agreement): conv kernels `(None, ..., 'conv_in',
'conv_out')`, norm scales/biases `('norm',)`, dense kernels `kernel_axes` (default `('embed', 'mlp')`).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array


def torch_default_init(scale: float = 1.0):
  """PyTorch's default weight init for Linear/Conv (uniform with variance 1/(3 fan_in)), times `scale`.

  Using torch's init keeps freshly initialised models in the same numeric range as the PyTorch
  reference; `scale=0` gives a zero init.
  """
  if scale == 0.0:
    return nn.initializers.zeros
  return nn.initializers.variance_scaling(scale * scale / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int):
  """PyTorch's default Linear/Conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  def init(key, shape, dtype=jnp.float32):
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def remat_policy(name: str, field: str = "remat_policy"):
  """`jax.checkpoint_policies.<name>`, or None for 'none' (no rematerialisation). `field` names the
  config entry in the error (e.g. 'dit.remat_policy')."""
  if name == "none":
    return None
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None:
    raise ValueError(f"config.{field}={name!r}: expected 'none' or a "
                     f"jax.checkpoint_policies name (e.g. 'nothing_saveable', 'dots_saveable')")
  return policy


def rematerialised(module_cls, policy: str, field: str = "remat_policy", **kwargs):
  """`module_cls` under `nn.remat` with the policy named `policy` (kwargs: e.g. static_argnums),
  or `module_cls` itself for 'none'. Parameter names are unchanged either way."""
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=remat_policy(policy, field), **kwargs)


def _spatial_rank(x: Array) -> int:
  if x.ndim < 3:
    raise ValueError(f"expected a channels-last array [B, *spatial, C], got shape {x.shape}")
  return x.ndim - 2


# ---------------------------------------------------------------------------------------------------
# Normalisation


def _norm_affine(module: nn.Module, features: int, scale_init=nn.initializers.ones):
  """A norm layer's per-channel `scale` and `bias` parameters (logical axis 'norm'), as float32."""
  scale = module.param("scale", nn.with_logical_partitioning(scale_init, ("norm",)), (features,),
                       module.param_dtype)
  bias = module.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      (features,), module.param_dtype)
  return scale.astype(jnp.float32), bias.astype(jnp.float32)


class GroupNorm(nn.Module):
  """Group normalisation over all non-batch axes (torch.nn.GroupNorm semantics), channels last.

  For `[B, T, H, W, C]` input the statistics cover T too; fold T into the batch for per-frame norms.
  Statistics are computed in float32 whatever the computation dtype.
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    if channels % self.num_groups:
      raise ValueError(f"GroupNorm: {channels} channels are not divisible by {self.num_groups} groups")
    scale, bias = _norm_affine(self, channels)
    grouped = x.astype(jnp.float32).reshape(
        x.shape[:-1] + (self.num_groups, channels // self.num_groups))
    axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
    mean = jnp.mean(grouped, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
    normed = ((grouped - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (normed * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
  """Layer normalisation over the last axis (torch.nn.LayerNorm semantics), float32 statistics."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale, bias = _norm_affine(self, x.shape[-1])
    normed = layer_norm(x.astype(jnp.float32), self.epsilon)
    return (normed * scale + bias).astype(self.dtype)


class BatchStatNorm(nn.Module):
  """BatchNorm as PyTorch computes it in training mode: batch statistics (biased variance), no running
  averages; scale initialised N(1, 0.02^2) (pix2pix). The VAE's PatchGAN discriminator only runs
  inside the training loss, so running statistics are never used."""
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    init_scale = lambda key, shape, dtype: 1.0 + 0.02 * jax.random.normal(key, shape, dtype)
    scale, bias = _norm_affine(self, x.shape[-1], init_scale)
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x32, axis=axes)
    var = jnp.mean(jnp.square(x32 - mean), axis=axes)
    return ((x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias).astype(self.dtype)


def layer_norm(x: Array, epsilon: float = 1e-5) -> Array:
  """Layer normalisation over the last axis without affine parameters (torch
  `LayerNorm(elementwise_affine=False)`); statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + epsilon)).astype(x.dtype)


# ---------------------------------------------------------------------------------------------------
# Linear layers


def _native_convolution(x: Array, kernel: Array, strides: tuple[int, ...],
                        padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...] | None = None,
                        precision: Any = None) -> Array:
  rank = kernel.ndim - 2
  spatial = "DHW"[-rank:]
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding, rhs_dilation=dilation,
      dimension_numbers=("N" + spatial + "C", spatial + "IO", "N" + spatial + "C"),
      precision=precision)


def convolution(x: Array, kernel: Array, strides: tuple[int, ...],
                padding: tuple[tuple[int, int], ...], dilation: tuple[int, ...] | None = None,
                precision: Any = None) -> Array:
  """Channels-last N-D convolution `[N, *spatial, C] x [*k, C, O] -> [N, *out, O]`, optionally with
  kernel `dilation` (torch's `dilation=`) and a `jax.lax.Precision`.

  On CPU an undilated 3-D convolution runs as 2-D convolutions of time-shifted frames summed over
  the temporal taps: XLA:CPU's 3-D convolution (Eigen's volume patches) took about 30% of the demo
  autoencoder's step time, and the step went from 3.7 s to 2.6 s without it. Same products, another
  summation order. Elsewhere it is XLA's convolution.
  """
  dilated = dilation is not None and any(d != 1 for d in dilation)
  if kernel.ndim == 5 and jax.default_backend() == "cpu" and not dilated:
    return _convolution_3d_as_2d(x, kernel, strides, padding, precision)
  return _native_convolution(x, kernel, strides, padding, dilation, precision)


def _convolution_3d_as_2d(x: Array, kernel: Array, strides: tuple[int, ...],
                          padding: tuple[tuple[int, int], ...], precision: Any = None) -> Array:
  """A 3-D convolution as the sum over the temporal taps of 2-D convolutions of time-shifted
  frames (time folded into the batch)."""
  taps = kernel.shape[0]
  padded = jax.lax.pad(x, jnp.zeros((), x.dtype),
                       [(0, 0, 0), (padding[0][0], padding[0][1], 0)] + [(0, 0, 0)] * 3)
  frames_out = (padded.shape[1] - taps) // strides[0] + 1
  total = None
  for tap in range(taps):
    frames = jax.lax.slice_in_dim(padded, tap, tap + (frames_out - 1) * strides[0] + 1,
                                  strides[0], axis=1)
    y = convolution(frames.reshape((-1,) + frames.shape[2:]), kernel[tap], strides[1:],
                    padding[1:], precision=precision)
    total = y if total is None else total + y
  return total.reshape((x.shape[0], frames_out) + total.shape[1:])


class Conv(nn.Module):
  """N-D convolution, channels last, kernel `(*kernel_size, in, out)` (torch `(out, in, *k)` transposed).

  `padding`: an int (same on every side of every spatial axis, as torch's `padding=`), or one
  `(low, high)` pair per spatial axis. The default pads `dilation * (k - 1) // 2` (`k // 2` without
  dilation), which keeps the size of odd kernels at stride 1. `dilation`: torch's `dilation=`.
  `zero_init=True` zero-initialises kernel and bias (ControlNet-style zero convs, zeroed last convs);
  `init_std` > 0 draws the kernel from N(0, init_std^2) (e.g. 0.02 for PatchGAN discriminators);
  `kernel_init` sets another initialiser; otherwise the kernel gets PyTorch's default init.
  `precision`: the `jax.lax.Precision` of the convolution (None: the backend default).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] | int = 1
  padding: int | Sequence[tuple[int, int]] | None = None
  dilation: Sequence[int] | int = 1
  use_bias: bool = True
  zero_init: bool = False
  init_std: float = 0.0
  kernel_init: Callable | None = None
  precision: Any = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    rank = len(self.kernel_size)
    if _spatial_rank(x) != rank:
      raise ValueError(f"Conv with kernel {tuple(self.kernel_size)} got input of shape {x.shape}")
    kernel_axes = (None,) * rank + ("conv_in", "conv_out")
    if self.zero_init:
      kernel_init = nn.initializers.zeros
    elif self.init_std > 0:
      kernel_init = nn.initializers.normal(self.init_std)
    else:
      kernel_init = self.kernel_init or torch_default_init()
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(kernel_init, kernel_axes),
        tuple(self.kernel_size) + (x.shape[-1], self.features), self.param_dtype)
    strides = (self.strides,) * rank if isinstance(self.strides, int) else tuple(self.strides)
    dilation = (self.dilation,) * rank if isinstance(self.dilation, int) else tuple(self.dilation)
    if self.padding is None:
      padding = [(d * (k - 1) // 2 if d > 1 else k // 2,) * 2
                 for k, d in zip(self.kernel_size, dilation)]
    elif isinstance(self.padding, int):
      padding = [(self.padding, self.padding)] * rank
    else:
      padding = [tuple(p) for p in self.padding]
    y = convolution(x.astype(self.dtype), kernel.astype(self.dtype), strides,
                    tuple(tuple(p) for p in padding),
                    dilation if any(d != 1 for d in dilation) else None, self.precision)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Dense(nn.Module):
  """Linear layer `x @ kernel + bias` with logical axis names `kernel_axes` (input, output).

  Initialisation: PyTorch's default kernel init and a zero bias, unless `kernel_init` / `bias_init`
  are given (e.g. Xavier for the DiT, as timm); `zero_init=True` zeroes both.
  """
  features: int
  kernel_axes: tuple[str | None, str | None] = ("embed", "mlp")
  use_bias: bool = True
  zero_init: bool = False
  kernel_init: Callable | None = None
  bias_init: Callable | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.zero_init:
      kernel_init, bias_init = nn.initializers.zeros, nn.initializers.zeros
    else:
      kernel_init = self.kernel_init or torch_default_init()
      bias_init = self.bias_init or nn.initializers.zeros
    kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init, self.kernel_axes),
                        (x.shape[-1], self.features), self.param_dtype)
    # Leading axes flattened into one: the kernel's gradient is then a plain [in, N] x [N, out]
    # product. With [B, L, in] kept, XLA:CPU contracts two axes for it, 68 ms against 52 ms at
    # the paper DiT's fc1 (2 x 399 tokens, 1152 -> 4608; 2026-12-07); the unrolled DiT training
    # step at paper width went from 1.17x PyTorch's time to 0.97-1.05x (benchmarks/README.md).
    flat = x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
    y = jnp.dot(flat.astype(self.dtype), kernel.astype(self.dtype))
    y = y.reshape(x.shape[:-1] + (self.features,))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(bias_init, (self.kernel_axes[1],)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


# ---------------------------------------------------------------------------------------------------
# Resampling


def upsample_nearest(x: Array, factors: Sequence[int]) -> Array:
  """Nearest-neighbour upsampling of the spatial axes of `[B, *spatial, C]` by integer factors."""
  for axis, factor in enumerate(factors, start=1):
    if factor != 1:
      x = jnp.repeat(x, factor, axis=axis)
  return x


def avg_pool(x: Array, factors: Sequence[int]) -> Array:
  """Average pooling with window = stride = `factors` over the spatial axes (LDM's non-conv Downsample)."""
  window = (1,) + tuple(factors) + (1,)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / math.prod(factors)


class Downsample(nn.Module):
  """Halves the spatial size with a stride-2 3x3 conv (name `conv`).

  `asymmetric_padding=False`: SD U-Net / LDM style, padding 1 on every side.
  `asymmetric_padding=True`: SD VAE style, zero pad (0, 1) (bottom/right only), then padding 0.
  `factors`: per-spatial-axis strides, default 2 on every axis (e.g. (1, 2, 2) for a 3-D conv that keeps T).
  """
  channels: int
  asymmetric_padding: bool = False
  factors: Sequence[int] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    rank = _spatial_rank(x)
    factors = tuple(self.factors) if self.factors is not None else (2,) * rank
    if self.asymmetric_padding:
      pads = [(0, 1) if f > 1 else (1, 1) for f in factors]
    else:
      pads = [(1, 1)] * rank
    return Conv(self.channels, (3,) * rank, strides=factors, padding=pads, dtype=self.dtype,
                param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 (per `factors`) followed by a 3x3 conv (name `conv`), as diffusers Upsample2D."""
  channels: int
  factors: Sequence[int] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    rank = _spatial_rank(x)
    factors = tuple(self.factors) if self.factors is not None else (2,) * rank
    x = upsample_nearest(x, factors)
    return Conv(self.channels, (3,) * rank, dtype=self.dtype, param_dtype=self.param_dtype,
                name="conv")(x)


# ---------------------------------------------------------------------------------------------------
# Residual block


class ResBlock(nn.Module):
  """diffusers ResnetBlock2D (any spatial rank): the residual unit of the VAE, U-Net and autoencoder.

  h = conv1(SiLU(norm1(x)));  h += time_emb_proj(SiLU(temb)) when temb is given;
  h = conv2(dropout(SiLU(norm2(h))));  out = conv_shortcut(x) + h   (1x1 shortcut when channels change)

  `resample='up'|'down'` gives LDM's ResBlock(up=True / down=True): after SiLU(norm1(x)) both the
  branch and the input are resampled by x2 nearest / 2x2 average pooling (per `resample_factors`).
  `zero_init_out=True` zero-initialises conv2 (LDM's zero_module; the block starts as the shortcut).
  `use_temb=True` creates `time_emb_proj`; then `temb` must be passed. `deterministic` (dropout
  off) may be passed by position, so that `nn.remat(ResBlock, static_argnums=(3,))` keeps it static.
  """
  out_channels: int | None = None
  use_temb: bool = False
  dropout: float = 0.0
  norm_groups: int = 32
  epsilon: float = 1e-5
  zero_init_out: bool = False
  resample: str = "none"
  resample_factors: Sequence[int] | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array | None = None, deterministic: bool = True) -> Array:
    rank = _spatial_rank(x)
    in_channels = x.shape[-1]
    out_channels = self.out_channels or in_channels
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.use_temb != (temb is not None):
      raise ValueError(f"ResBlock(use_temb={self.use_temb}) called with temb="
                       f"{None if temb is None else temb.shape}")
    h = nn.silu(GroupNorm(self.norm_groups, self.epsilon, name="norm1", **kwargs)(x))
    if self.resample != "none":
      factors = tuple(self.resample_factors or (2,) * rank)
      if self.resample == "up":
        h, x = upsample_nearest(h, factors), upsample_nearest(x, factors)
      elif self.resample == "down":
        h, x = avg_pool(h, factors), avg_pool(x, factors)
      else:
        raise ValueError(f"ResBlock.resample={self.resample!r}: expected 'none', 'up' or 'down'")
    h = Conv(out_channels, (3,) * rank, name="conv1", **kwargs)(h)
    if temb is not None:
      emb = Dense(out_channels, kernel_axes=("embed", "conv_out"), name="time_emb_proj",
                  **kwargs)(nn.silu(temb))
      h = h + emb.reshape(emb.shape[:1] + (1,) * rank + emb.shape[1:])
    h = nn.silu(GroupNorm(self.norm_groups, self.epsilon, name="norm2", **kwargs)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = Conv(out_channels, (3,) * rank, zero_init=self.zero_init_out, name="conv2", **kwargs)(h)
    if in_channels != out_channels:
      x = Conv(out_channels, (1,) * rank, name="conv_shortcut", **kwargs)(x)
    return x.astype(self.dtype) + h


# ---------------------------------------------------------------------------------------------------
# The multi-modal autoencoder's wrapped layers. Its perceptual encoders, feature injectors,
# projectors, heads and discriminator hold these layers one module level deeper than the calls
# above (`conv_in/conv/kernel`, `norm_out/norm/scale`, `res_0_0/block/conv1/kernel`); the wrappers
# keep that checkpoint layout.


def fitted_groups(norm_groups: int, *channels: int) -> int:
  """Groups for GroupNorms over `channels`: the configured count when it divides, else the gcd (so
  that narrow layers, e.g. a 16-channel latent head under 32 groups, stay valid)."""
  return math.gcd(norm_groups, *channels)


def per_frame(fn, x: Array) -> Array:
  """Applies a function of [N, H, W, C] to every frame of [B, T, H, W, C] (4-D input: directly)."""
  if x.ndim == 4:
    return fn(x)
  batch, frames = x.shape[:2]
  y = fn(x.reshape((batch * frames,) + x.shape[2:]))
  return y.reshape((batch, frames) + y.shape[1:])


class FittedGroupNorm(nn.Module):
  """`GroupNorm` (child 'norm') with fitted_groups(norm_groups, channels) groups. Statistics cover
  every non-batch axis of the input ([B*T, H, W, C] normalises per frame, [B, T, H, W, C] per clip)."""
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return GroupNorm(fitted_groups(self.norm_groups, x.shape[-1]), dtype=self.dtype,
                     param_dtype=self.param_dtype, name="norm")(x)


class ConvNd(nn.Module):
  """`Conv` (child 'conv') whose rank follows the input: 5-D [B, T, H, W, C] -> 3-D conv with kernel
  (temporal_kernel, kernel, kernel) and stride (1, stride, stride) (time is never strided);
  4-D -> 2-D conv. Padding is symmetric (kernel // 2), as in PyTorch."""
  features: int
  kernel: int = 3
  stride: int = 1
  temporal_kernel: int = 3
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if x.ndim == 5:
      kernel = (self.temporal_kernel, self.kernel, self.kernel)
      strides = (1, self.stride, self.stride)
    elif x.ndim == 4:
      kernel = (self.kernel, self.kernel)
      strides = (self.stride, self.stride)
    else:
      raise ValueError(f"ConvNd expects [B, H, W, C] or [B, T, H, W, C]; got shape {x.shape}")
    return Conv(self.features, kernel, strides=strides, zero_init=self.zero_init,
                dtype=self.dtype, param_dtype=self.param_dtype, name="conv")(x)


class FrameResBlock(nn.Module):
  """Per-frame `ResBlock` (child 'block'): GN-SiLU-conv3x3 (+ embedding), GN-SiLU-zero-init conv3x3,
  1x1 skip when the width changes, fitted GroupNorm groups. `resample_steps` = n != 0 resizes by
  2^|n| (nearest up for n > 0, average-pool down for n < 0) on both branches: MM-LDM's ResBlock /
  ResBlock2n. 5-D input [B, T, H, W, C] is run frame by frame (2-D convs), as its ResBlockwoEmb."""
  out_channels: int
  norm_groups: int = 32
  resample_steps: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  zero_init_out: bool = True   # the second conv starts at zero (SD / LDM ResBlocks)

  @nn.compact
  def __call__(self, x: Array, emb: Array | None = None) -> Array:
    factor = 2 ** abs(self.resample_steps)
    block = ResBlock(
        self.out_channels, use_temb=emb is not None,
        norm_groups=fitted_groups(self.norm_groups, x.shape[-1], self.out_channels),
        zero_init_out=self.zero_init_out,
        resample="none" if self.resample_steps == 0 else (
            "up" if self.resample_steps > 0 else "down"),
        resample_factors=(factor, factor), dtype=self.dtype, param_dtype=self.param_dtype,
        name="block")
    if x.ndim == 5:
      if emb is not None:
        raise ValueError("FrameResBlock: an embedding needs 4-D input [N, H, W, C] (one per item)")
      return per_frame(block, x)
    return block(x, emb)


# ---------------------------------------------------------------------------------------------------
# Attention


def dot_product_attention(query: Array, key: Array, value: Array, num_heads: int) -> Array:
  """Multi-head softmax attention on fused-head arrays `[B, L, heads * head_dim]`.

  The heads are moved in front of the tokens (`[B, N, L, H]`) so that both products are plain
  batched matrix products, and the query is scaled by 1/sqrt(head_dim) before its product with the
  keys. The softmax runs in float32 and its normalisation is deferred, as in flash attention:
  the exponentials of the scores (less each row's maximum) multiply the values, and the
  `[B, N, L, H]` result is divided by the rows' sums, instead of dividing the `[B, N, L, L]`
  weights. That saves a pass over the largest array forward and, through autodiff, the softmax
  backward's row reduction over it; the result equals `jax.nn.dot_product_attention` to float32
  rounding. On XLA:CPU (benchmarks/dit.py, two runs: one paper-width DiT block's self-attention,
  2 x 399 tokens, 16 heads of 72) forward + backward took 0.78 and 0.87 of the time of the
  normalised form it replaced, and 0.97-0.98 of torch's fused scaled_dot_product_attention's
  (forward alone 1.06-1.14 of torch's).
  """
  batch, q_len, width = query.shape
  if width % num_heads:
    raise ValueError(f"attention width {width} is not divisible by {num_heads} heads")
  head_dim = width // num_heads
  heads_first = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, head_dim).transpose(0, 2, 1, 3)
  scale = jnp.asarray(1.0 / math.sqrt(head_dim), query.dtype)
  scores = jnp.matmul(heads_first(query) * scale, heads_first(key).swapaxes(-1, -2))
  scores = scores.astype(jnp.float32)
  # Softmax is unchanged by a shift of each row, so the maximum carries no gradient.
  row_max = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))
  exponentials = jnp.exp(scores - row_max)
  unnormalised = jnp.matmul(exponentials.astype(value.dtype), heads_first(value))
  row_sums = exponentials.sum(axis=-1, keepdims=True)
  out = (unnormalised.astype(jnp.float32) / row_sums).astype(value.dtype)
  return out.transpose(0, 2, 1, 3).reshape(batch, q_len, width)


class Attention(nn.Module):
  """diffusers Attention for transformer blocks: to_q/to_k/to_v (no bias) and to_out (with bias).

  `context=None` gives self-attention; otherwise keys and values come from `context` `[B, S, D_ctx]`.
  """
  num_heads: int
  head_dim: int
  qkv_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.num_heads * self.head_dim
    context = x if context is None else context
    dense = lambda name: Dense(inner, kernel_axes=("embed", "heads"), use_bias=self.qkv_bias,
                               name=name, **kwargs)
    out = dot_product_attention(dense("to_q")(x), dense("to_k")(context), dense("to_v")(context),
                                self.num_heads)
    return Dense(x.shape[-1], kernel_axes=("heads", "embed"), name="to_out", **kwargs)(out)


class AttentionBlock(nn.Module):
  """The VAE mid-block self-attention: GroupNorm, single-head attention over all pixels, residual.

  diffusers `Attention(heads=1, dim_head=C, norm_num_groups=..., residual_connection=True)`; CompVis's
  AttnBlock (q/k/v/proj_out as 1x1 convs) computes the same function.
  """
  norm_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    batch, channels = x.shape[0], x.shape[-1]
    h = GroupNorm(self.norm_groups, self.epsilon, dtype=self.dtype, param_dtype=self.param_dtype,
                  name="group_norm")(x)
    h = h.reshape(batch, -1, channels)
    dense = lambda name, axes: Dense(channels, kernel_axes=axes, name=name, dtype=self.dtype,
                                     param_dtype=self.param_dtype)
    qkv = [dense(name, ("embed", "heads"))(h) for name in ("to_q", "to_k", "to_v")]
    h = dot_product_attention(*qkv, num_heads=1)
    h = dense("to_out", ("heads", "embed"))(h)
    return x.astype(self.dtype) + h.reshape(x.shape)


class GEGLUFeedForward(nn.Module):
  """diffusers FeedForward with GEGLU: proj (D -> 2*mult*D), hidden * gelu(gate) (exact), out (-> D)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.mult * x.shape[-1]
    hidden, gate = jnp.split(Dense(2 * inner, kernel_axes=("embed", "mlp"), name="geglu",
                                   **kwargs)(x), 2, axis=-1)
    hidden = hidden * nn.gelu(gate, approximate=False)
    return Dense(x.shape[-1], kernel_axes=("mlp", "embed"), name="out", **kwargs)(hidden)


class TransformerBlock(nn.Module):
  """diffusers BasicTransformerBlock (SD-1.5): pre-LayerNorm self-attn, cross-attn, GEGLU FF, residuals."""
  num_heads: int
  head_dim: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = lambda name: Attention(self.num_heads, self.head_dim, name=name, **kwargs)
    norm = lambda name: LayerNorm(self.epsilon, name=name, **kwargs)
    x = x + attn("attn1")(norm("norm1")(x))
    x = x + attn("attn2")(norm("norm2")(x), context)
    return x + GEGLUFeedForward(name="ff", **kwargs)(norm("norm3")(x))


class SpatialTransformer(nn.Module):
  """diffusers Transformer2DModel / LDM SpatialTransformer over `[B, H, W, C]` with a residual.

  GroupNorm (eps 1e-6) -> proj_in (1x1 conv; a Dense when `linear_projection`, as SD-2) -> `depth`
  TransformerBlocks over the H*W tokens, cross-attending to `context` `[B, S, D_ctx]` -> proj_out.
  The inner width is `num_heads * head_dim` (= C in SD).
  """
  num_heads: int
  head_dim: int
  depth: int = 1
  norm_groups: int = 32
  linear_projection: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    kwargs = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, channels = x.shape[0], x.shape[-1]
    inner = self.num_heads * self.head_dim
    h = GroupNorm(self.norm_groups, 1e-6, name="norm", **kwargs)(x)
    if self.linear_projection:
      h = Dense(inner, kernel_axes=("embed", "heads"), name="proj_in", **kwargs)(h.reshape(
          batch, -1, channels))
    else:
      h = Conv(inner, (1, 1), name="proj_in", **kwargs)(h).reshape(batch, -1, inner)
    h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_embed"))
    for index in range(self.depth):
      h = TransformerBlock(self.num_heads, self.head_dim, name=f"transformer_blocks_{index}",
                           **kwargs)(h, context)
    if self.linear_projection:
      h = Dense(channels, kernel_axes=("heads", "embed"), name="proj_out", **kwargs)(h)
      h = h.reshape(x.shape)
    else:
      h = Conv(channels, (1, 1), name="proj_out", **kwargs)(h.reshape(x.shape[:-1] + (inner,)))
    return x.astype(self.dtype) + h


# ---------------------------------------------------------------------------------------------------
# Timestep embeddings


def timestep_embedding(timesteps: Array, dim: int, *, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0.0, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding `[B] -> [B, dim]` (diffusers `get_timestep_embedding`; SD uses the defaults).

  Frequencies exp(-log(max_period) * i / (dim/2 - freq_shift)); output [cos, sin] when
  `flip_sin_to_cos` (SD / LDM openaimodel), else [sin, cos]; odd `dim` is zero-padded. Timesteps may be
  fractional. Always float32.
  """
  timesteps = jnp.asarray(timesteps, jnp.float32)
  if timesteps.ndim != 1:
    raise ValueError(f"timesteps must be 1-D [B], got shape {timesteps.shape}")
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  """The time MLP: linear_1 (-> features) -> SiLU -> linear_2 (-> features), diffusers naming.

  The DiT's `t_embedder` is the same MLP with timm's names and init: `layer_names=('mlp_0',
  'mlp_2')`, `kernel_axes=((None, 'embed'), ('embed', 'mlp'))`, `kernel_init=normal(0.02)`.
  """
  features: int
  zero_init_out: bool = False
  layer_names: tuple[str, str] = ("linear_1", "linear_2")
  kernel_axes: tuple[tuple[str | None, str | None], ...] = (("embed", "mlp"), ("mlp", "embed"))
  kernel_init: Callable | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kwargs = dict(kernel_init=self.kernel_init, dtype=self.dtype, param_dtype=self.param_dtype)
    h = Dense(self.features, kernel_axes=self.kernel_axes[0], name=self.layer_names[0],
              **kwargs)(x)
    return Dense(self.features, kernel_axes=self.kernel_axes[1], zero_init=self.zero_init_out,
                 name=self.layer_names[1], **kwargs)(nn.silu(h))
