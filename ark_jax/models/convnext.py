"""ConvNeXt (Liu et al. 2022) in Flax NNX, computing what timm computes.

Semantics are timm's `convnext_{tiny,small,base,large}` (channels-last MLP):
stem = Conv 4x4 stride 4 + LayerNorm2d; stages 1-3 start with a downsample
(LayerNorm2d + Conv 2x2 stride 2); blocks are depthwise Conv 7x7 -> LayerNorm
-> fc1 -> exact GELU -> fc2 -> layer scale `gamma` -> stochastic depth ->
residual; the head averages over space then applies `head.norm`. Every
LayerNorm has eps 1e-6. Stochastic depth is linear over all blocks.

Activations are NHWC throughout, so timm's LayerNorm2d (a LayerNorm over the
channel axis of NCHW) is the plain last-axis LayerNorm here.

Shape suffixes: B batch, S image side, H/W grid height/width, C channels,
F pooled features (the last stage's width).
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from ark_jax.models import layers

LN_EPS = 1e-6
STEM_PATCH = 4
KERNEL = 7  # Depthwise conv size; padded by 3 so the grid keeps its size.
# Blocks per stage, channels per stage (timm's convnext_<variant>).
VARIANTS = {
    'tiny': ((3, 3, 9, 3), (96, 192, 384, 768)),
    'small': ((3, 3, 27, 3), (96, 192, 384, 768)),
    'base': ((3, 3, 27, 3), (128, 256, 512, 1024)),
    'large': ((3, 3, 27, 3), (192, 384, 768, 1536)),
}


@dataclasses.dataclass(frozen=True)
class ConvNextConfig:
  """Hyperparameters of one ConvNeXt; `from_variant` fills the sizes."""
  img_size: int = 224
  depths: tuple[int, ...] = (3, 3, 9, 3)
  dims: tuple[int, ...] = (96, 192, 384, 768)
  drop_path_rate: float = 0.0
  ls_init_value: float | None = 1e-6  # Initial layer scale; None: no `gamma` (as timm).
  mlp_ratio: float = 4.0

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> 'ConvNextConfig':
    if variant not in VARIANTS:
      raise ValueError(f'Unknown ConvNeXt variant {variant!r}; known: {sorted(VARIANTS)} '
                       "(or 'custom' with depths, dims).")
    depths, dims = VARIANTS[variant]
    return cls(**{'depths': depths, 'dims': dims, **overrides})

  @property
  def num_features(self) -> int:
    return self.dims[-1]

  def stage_grids(self) -> list[int]:
    return [self.img_size // STEM_PATCH // 2**i for i in range(len(self.depths))]

  def validate(self):
    """Raises ValueError naming the size ConvNeXt cannot tile."""
    if len(self.depths) != len(self.dims):
      raise ValueError(f'ConvNeXt depths {self.depths} and dims {self.dims} differ in length.')
    layers.check_stride('ConvNeXt', self.img_size, STEM_PATCH * 2 ** (len(self.depths) - 1),
                        f'stem stride {STEM_PATCH} then {len(self.depths) - 1} stride-2 '
                        'downsamples')

  def forward_macs(self) -> int:
    """Multiply-accumulates of one forward pass (convs and matmuls, as timm/fvcore count)."""
    grids, dims = self.stage_grids(), self.dims
    macs = grids[0] ** 2 * STEM_PATCH**2 * 3 * dims[0]  # stem conv
    for i, depth in enumerate(self.depths):
      n, c = grids[i] ** 2, dims[i]
      if i > 0:  # 2x2 stride-2 conv
        macs += n * 4 * dims[i - 1] * c
      hidden = int(c * self.mlp_ratio)
      macs += depth * n * (KERNEL**2 * c + 2 * c * hidden)  # depthwise conv, fc1, fc2
    return macs


def _timm_conv(in_channels: int, out_channels: int, patch: int, *, dtype, rngs) -> layers.PatchConv:
  # timm's ConvNeXt re-initialises every conv: trunc_normal(0.02) weights, zero biases.
  return layers.PatchConv(in_channels, out_channels, patch, dtype=dtype,
                          kernel_init=layers.TRUNC_NORMAL_02, bias_init=layers.ZEROS, rngs=rngs)


class DepthwiseConv(nnx.Module):
  """7x7 depthwise conv with bias and 'same' padding; kernel HWIO [7, 7, 1, C]."""

  def __init__(self, channels: int, *, dtype, rngs: nnx.Rngs):
    self.kernel = nnx.Param(
        layers.TRUNC_NORMAL_02(rngs.params(), (KERNEL, KERNEL, 1, channels), jnp.float32),
        out_sharding=(None, None, None, 'embed'))
    self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32), out_sharding=('embed',))
    self.dtype = dtype

  def __call__(self, x_BxHxWxC):
    c = x_BxHxWxC.shape[-1]
    pad = KERNEL // 2
    y = jax.lax.conv_general_dilated(
        x_BxHxWxC.astype(self.dtype), self.kernel[...].astype(self.dtype),
        window_strides=(1, 1), padding=((pad, pad), (pad, pad)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=c,
        precision=layers._precision(self.dtype))
    return y + self.bias[...].astype(self.dtype).reshape(1, 1, 1, c)


class ConvNeXtBlock(nnx.Module):
  """conv_dw -> norm -> mlp -> gamma -> drop_path -> residual (timm's `blocks.j`)."""

  def __init__(self, dim: int, mlp_ratio: float, ls_init_value: float | None,
               drop_path: float, *, dtype, rngs: nnx.Rngs):
    self.conv_dw = DepthwiseConv(dim, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(dim, eps=LN_EPS, dtype=dtype, rngs=rngs)
    self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.gamma = (None if ls_init_value is None else
                  nnx.Param(jnp.full((dim,), ls_init_value, jnp.float32), out_sharding=('norm',)))
    self.drop_path = drop_path

  def __call__(self, x_BxHxWxC, key):
    y = self.mlp(self.norm(self.conv_dw(x_BxHxWxC)))
    if self.gamma is not None:
      y = y * self.gamma[...].astype(y.dtype).reshape(1, 1, 1, -1)
    x = x_BxHxWxC + layers.drop_path(y, self.drop_path, key)
    return layers.constrain(x, ('act_batch', 'act_height', 'act_width', 'act_emb'))


class ConvNeXtStage(nnx.Module):
  """Optional downsample (LayerNorm2d, Conv 2x2 s2) for stages 1.., then the blocks."""

  def __init__(self, cfg: ConvNextConfig, index: int, drop_paths: list[float], *, dtype, remat,
               rngs: nnx.Rngs):
    dim = cfg.dims[index]
    if index > 0:
      prev = cfg.dims[index - 1]
      self.downsample = nnx.List([
          layers.LayerNorm(prev, eps=LN_EPS, dtype=dtype, rngs=rngs),
          _timm_conv(prev, dim, 2, dtype=dtype, rngs=rngs)])
    else:
      self.downsample = None
    self.blocks = nnx.List([
        ConvNeXtBlock(dim, cfg.mlp_ratio, cfg.ls_init_value, drop_paths[j], dtype=dtype,
                      rngs=rngs)
        for j in range(cfg.depths[index])])
    self.remat = remat

  def __call__(self, x_BxHxWxC, keys):
    if self.downsample is not None:
      for layer in self.downsample:
        x_BxHxWxC = layer(x_BxHxWxC)
    for block, key in zip(self.blocks, keys):
      x_BxHxWxC = layers.remat_call(ConvNeXtBlock.__call__, block, x_BxHxWxC, key,
                                    enabled=self.remat)
    return x_BxHxWxC


class Head(nnx.Module):
  """timm's NormMlpClassifierHead without its classifier: the `head.norm` after pooling."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.norm = layers.LayerNorm(dim, eps=LN_EPS, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxHxWxC):
    return self.norm(x_BxHxWxC.astype(jnp.float32).mean(axis=(1, 2)))


class ConvNeXt(nnx.Module):
  """ConvNeXt backbone: NHWC float images [B, S, S, 3] -> pooled features [B, F]."""

  def __init__(self, cfg: ConvNextConfig, *, dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.stem = nnx.List([
        _timm_conv(3, cfg.dims[0], STEM_PATCH, dtype=dtype, rngs=rngs),
        layers.LayerNorm(cfg.dims[0], eps=LN_EPS, dtype=dtype, rngs=rngs)])
    rates = layers.drop_path_rates(cfg.drop_path_rate, cfg.depths)
    starts = np.cumsum((0,) + tuple(cfg.depths))
    self.stages = nnx.List([
        ConvNeXtStage(cfg, i, rates[starts[i]:starts[i + 1]], dtype=dtype, remat=remat,
                      rngs=rngs)
        for i in range(len(cfg.depths))])
    self.head = Head(cfg.num_features, dtype=dtype, rngs=rngs)
    self.num_features = cfg.num_features

  def __call__(self, x_BxSxSx3, *, train: bool = False, rng: jax.Array | None = None):
    """Pooled features. Stochastic depth is active only with train=True and an rng."""
    layers.check_images(x_BxSxSx3, self.cfg.img_size)
    key = rng if train else None
    x = x_BxSxSx3
    for layer in self.stem:
      x = layer(x)
    block = 0
    for stage in self.stages:
      keys = [layers.block_key(key, block + j) for j in range(len(stage.blocks))]
      x = stage(x, keys)
      block += len(stage.blocks)
    return self.head(x).astype(jnp.float32)

