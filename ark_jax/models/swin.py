"""Swin Transformer (Liu et al. 2021) in Flax NNX, computing what timm computes.

Semantics are timm's (current layout, PatchMerging at the start of stages 1-3;
the 0.5.4 layout used by the Ark reference differs only in names, handled by
ark_jax/interop.py): patch 4 conv embed + LayerNorm, window attention with a
relative position bias, shifted windows (W/2 on odd blocks) with a -100 mask,
window and shift clamped when a stage's grid is not larger than the window,
LayerNorm eps 1e-5, exact GELU, stochastic depth linear over blocks, final
LayerNorm and a mean over tokens.

Shape suffixes: B batch, H/W grid height/width, C channels, nW windows per
image, N tokens per window (ws*ws), h heads, d head dim, F pooled features.
"""

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from ark_jax.models import layers

PATCH_SIZE = 4
# Residual width of stage 0, blocks per stage, heads per stage (timm's names).
VARIANTS = {
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    'small': (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    'large': (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """Hyperparameters of one Swin; `from_variant` fills the sizes."""
  img_size: int = 224
  window_size: int = 7
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.1

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> 'SwinConfig':
    if variant not in VARIANTS:
      raise ValueError(f'Unknown Swin variant {variant!r}; known: {sorted(VARIANTS)} '
                       "(or 'custom' with embed_dim, depths, num_heads).")
    embed_dim, depths, num_heads = VARIANTS[variant]
    return cls(**{'embed_dim': embed_dim, 'depths': depths, 'num_heads': num_heads, **overrides})

  @property
  def num_features(self) -> int:
    return self.embed_dim * 2 ** (len(self.depths) - 1)

  def stage_grids(self) -> list[int]:
    return [self.img_size // PATCH_SIZE // 2**i for i in range(len(self.depths))]

  def stage_windows(self) -> list[tuple[int, int]]:
    """(window, shift) per stage after timm's clamping to small grids."""
    out = []
    for grid in self.stage_grids():
      if grid <= self.window_size:
        out.append((grid, 0))
      else:
        out.append((self.window_size, self.window_size // 2))
    return out

  def validate(self):
    """Raises ValueError naming the size that Swin cannot tile."""
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f'Swin depths {self.depths} and num_heads {self.num_heads} differ in length.')
    layers.check_stride('Swin', self.img_size, PATCH_SIZE * 2 ** (len(self.depths) - 1),
                        f'patch {PATCH_SIZE} then {len(self.depths) - 1} patch mergings')
    for i, (grid, (window, _)) in enumerate(zip(self.stage_grids(), self.stage_windows())):
      if grid % window:
        raise ValueError(
            f'Swin img_size={self.img_size}, window_size={self.window_size}: stage {i} grid '
            f'{grid}x{grid} is not divisible by the window {window}. Choose img_size/4/2^i '
            'divisible by the window at every stage (224/7, 256/8, 384/12, 768/12, ...).')
    for i, (c, h) in enumerate(zip(self.stage_dims(), self.num_heads)):
      if c % h:
        raise ValueError(f'Swin stage {i}: width {c} is not divisible by {h} heads.')

  def stage_dims(self) -> list[int]:
    return [self.embed_dim * 2**i for i in range(len(self.depths))]

  def forward_macs(self) -> int:
    """Multiply-accumulates of one forward pass (matmuls only, as timm/fvcore count)."""
    grids, dims, windows = self.stage_grids(), self.stage_dims(), self.stage_windows()
    macs = grids[0] ** 2 * PATCH_SIZE**2 * 3 * dims[0]  # patch embed
    for i, depth in enumerate(self.depths):
      n_tokens, c, (ws, _) = grids[i] ** 2, dims[i], windows[i]
      if i > 0:  # patch merging: Linear(4C' -> 2C') with C' = c/2
        macs += n_tokens * (2 * c) * c
      hidden = int(c * self.mlp_ratio)
      per_block = n_tokens * (3 * c * c + c * c + 2 * c * hidden)  # qkv, proj, mlp
      per_block += 2 * n_tokens * ws * ws * c  # q@k^T and attn@v
      macs += depth * per_block
    return macs


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
  """[N, N] index into the ((2w-1)^2, heads) bias table, as timm builds it."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing='ij')).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0) + (window - 1)
  return rel[..., 0] * (2 * window - 1) + rel[..., 1]


@functools.cache
def shifted_window_mask(grid: int, window: int, shift: int) -> np.ndarray:
  """[nW, N, N] additive mask (0 or -100) that keeps attention inside shifted regions."""
  region = np.zeros((grid, grid), np.int32)
  bounds = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  label = 0
  for hs in bounds:
    for ws in bounds:
      region[hs, ws] = label
      label += 1
  region_windows = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # [nW, N]
  diff = region_windows[:, None, :] - region_windows[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def window_partition(x_BxHxWxC, window: int):
  """[B, H, W, C] -> [B, nW, N, C], windows in row-major order (timm's order)."""
  b, h, w, c = x_BxHxWxC.shape
  x = x_BxHxWxC.reshape(b, h // window, window, w // window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // window) * (w // window), window * window, c)


def window_reverse(x_BxnWxNxC, window: int, h: int, w: int):
  """Inverse of window_partition."""
  b, c = x_BxnWxNxC.shape[0], x_BxnWxNxC.shape[-1]
  x = x_BxnWxNxC.reshape(b, h // window, w // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


class WindowAttention(nnx.Module):
  """Multi-head self-attention inside each window, with the relative position bias."""

  def __init__(self, dim: int, num_heads: int, window: int, *, dtype, rngs: nnx.Rngs):
    self.qkv = layers.linear(dim, 3 * dim, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.proj = layers.linear(dim, dim, ('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.relative_position_bias_table = nnx.Param(
        layers.TRUNC_NORMAL_02(rngs.params(), ((2 * window - 1) ** 2, num_heads), jnp.float32),
        out_sharding=(None, None))
    self.num_heads = num_heads
    self.window = window
    self.dtype = dtype

  def __call__(self, x_BxnWxNxC, mask_nWxNxN):
    b, nw, n, c = x_BxnWxNxC.shape
    h = self.num_heads
    qkv = self.qkv(x_BxnWxNxC).reshape(b, nw, n, 3, h, c // h)
    q_BxnWxNxhxd, k_BxnWxNxhxd, v_BxnWxNxhxd = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    q_BxnWxNxhxd = q_BxnWxNxhxd * (c // h) ** -0.5
    logits_BxnWxhxNxN = jnp.einsum('bwnhd,bwmhd->bwhnm', q_BxnWxNxhxd, k_BxnWxNxhxd,
                                   precision=layers._precision(self.dtype))
    # Bias (+ shift mask) is one [nW|1, h, N, N] constant added without a batch copy.
    index_NxN = relative_position_index(self.window)
    bias_hxNxN = self.relative_position_bias_table[...][index_NxN.reshape(-1)].reshape(n, n, h)
    bias_1x1xhxNxN = bias_hxNxN.transpose(2, 0, 1)[None, None]
    if mask_nWxNxN is not None:
      bias_1x1xhxNxN = bias_1x1xhxNxN + jnp.asarray(mask_nWxNxN)[None, :, None]
    logits_BxnWxhxNxN = logits_BxnWxhxNxN.astype(jnp.float32) + bias_1x1xhxNxN
    attn_BxnWxhxNxN = jax.nn.softmax(logits_BxnWxhxNxN, axis=-1).astype(self.dtype)
    out_BxnWxNxhxd = jnp.einsum('bwhnm,bwmhd->bwnhd', attn_BxnWxhxNxN, v_BxnWxNxhxd,
                                precision=layers._precision(self.dtype))
    return self.proj(out_BxnWxNxhxd.reshape(b, nw, n, c))


class SwinBlock(nnx.Module):
  """norm1 -> (shifted) window attention -> residual; norm2 -> MLP -> residual."""

  def __init__(self, dim: int, num_heads: int, grid: int, window: int, shift: int,
               drop_path: float, mlp_ratio: float, *, dtype, rngs: nnx.Rngs):
    self.norm1 = layers.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.attn = WindowAttention(dim, num_heads, window, dtype=dtype, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.grid, self.window, self.shift = grid, window, shift
    self.drop_path = drop_path

  def __call__(self, x_BxHxWxC, key):
    _, h, w, _ = x_BxHxWxC.shape
    s = self.shift
    y = self.norm1(x_BxHxWxC)
    if s:
      y = jnp.roll(y, (-s, -s), axis=(1, 2))
    mask = shifted_window_mask(self.grid, self.window, s) if s else None
    y = self.attn(window_partition(y, self.window), mask)
    y = window_reverse(y, self.window, h, w)
    if s:
      y = jnp.roll(y, (s, s), axis=(1, 2))
    keys = (None, None) if key is None else jax.random.split(key)
    x = x_BxHxWxC + layers.drop_path(y, self.drop_path, keys[0])
    x = x + layers.drop_path(self.mlp(self.norm2(x)), self.drop_path, keys[1])
    return layers.constrain(x, ('act_batch', 'act_height', 'act_width', 'act_emb'))


class PatchMerging(nnx.Module):
  """2x2 neighbours concatenated (0,0),(1,0),(0,1),(1,1) -> LayerNorm(4C) -> Linear(4C->2C)."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.norm = layers.LayerNorm(4 * dim, dtype=dtype, rngs=rngs)
    self.reduction = layers.linear(4 * dim, 2 * dim, ('mlp', 'embed'), use_bias=False,
                                   dtype=dtype, rngs=rngs)

  def __call__(self, x_BxHxWxC):
    b, h, w, c = x_BxHxWxC.shape
    x = x_BxHxWxC.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
    return self.reduction(self.norm(x.reshape(b, h // 2, w // 2, 4 * c)))


class SwinStage(nnx.Module):
  """Optional PatchMerging (stages 1..), then the blocks."""

  def __init__(self, cfg: SwinConfig, index: int, drop_paths: list[float], *, dtype, remat,
               rngs: nnx.Rngs):
    dim = cfg.stage_dims()[index]
    grid = cfg.stage_grids()[index]
    window, shift = cfg.stage_windows()[index]
    self.downsample = (PatchMerging(dim // 2, dtype=dtype, rngs=rngs) if index > 0 else None)
    self.blocks = nnx.List([
        SwinBlock(dim, cfg.num_heads[index], grid, window, shift if j % 2 else 0, drop_paths[j],
                  cfg.mlp_ratio, dtype=dtype, rngs=rngs)
        for j in range(cfg.depths[index])])
    self.remat = remat

  def __call__(self, x_BxHxWxC, keys):
    if self.downsample is not None:
      x_BxHxWxC = self.downsample(x_BxHxWxC)
    for block, key in zip(self.blocks, keys):
      x_BxHxWxC = layers.remat_call(SwinBlock.__call__, block, x_BxHxWxC, key, enabled=self.remat)
    return x_BxHxWxC


class SwinTransformer(nnx.Module):
  """Swin backbone: NHWC float images [B, S, S, 3] -> pooled features [B, F]."""

  def __init__(self, cfg: SwinConfig, *, dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    self.patch_embed = PatchEmbed(cfg.embed_dim, dtype=dtype, rngs=rngs)
    rates = layers.drop_path_rates(cfg.drop_path_rate, cfg.depths)
    starts = np.cumsum((0,) + tuple(cfg.depths))
    self.layers = nnx.List([
        SwinStage(cfg, i, rates[starts[i]:starts[i + 1]], dtype=dtype, remat=remat, rngs=rngs)
        for i in range(len(cfg.depths))])
    self.norm = layers.LayerNorm(cfg.num_features, dtype=dtype, rngs=rngs)
    self.num_features = cfg.num_features

  def __call__(self, x_BxSxSx3, *, train: bool = False, rng: jax.Array | None = None):
    """Pooled features. Stochastic depth is active only with train=True and an rng."""
    layers.check_images(x_BxSxSx3, self.cfg.img_size)
    key = rng if train else None
    x = self.patch_embed(x_BxSxSx3)
    block = 0
    for stage in self.layers:
      keys = [layers.block_key(key, block + j) for j in range(len(stage.blocks))]
      x = stage(x, keys)
      block += len(stage.blocks)
    x_BxHxWxF = self.norm(x)
    return x_BxHxWxF.astype(jnp.float32).mean(axis=(1, 2))


class PatchEmbed(nnx.Module):
  """Conv 4x4 stride 4 (3 -> C) then LayerNorm, timm's `patch_embed.{proj,norm}`."""

  def __init__(self, dim: int, *, dtype, rngs: nnx.Rngs):
    self.proj = layers.PatchConv(3, dim, PATCH_SIZE, dtype=dtype, rngs=rngs)
    self.norm = layers.LayerNorm(dim, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxSxSx3):
    return self.norm(self.proj(x_BxSxSx3))

