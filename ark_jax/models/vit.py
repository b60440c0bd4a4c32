"""Vision Transformer (Dosovitskiy et al. 2021) in Flax NNX, computing what timm computes.

Semantics are timm's `vit_{tiny,small,base,large}_patch16_224`: a patch conv
embed with bias, a class token, a learned position embedding over 1+N tokens,
pre-norm blocks (norm1 -> attention -> residual, norm2 -> MLP -> residual),
LayerNorm eps 1e-6, exact GELU, stochastic depth linear over blocks. Pooling
follows timm's `global_pool`: 'token' takes the class token after the final
`norm`; 'avg' averages the patch tokens and, as timm does for 'avg', replaces
`norm` by `fc_norm` applied after the pooling (so the state holds `fc_norm.*`
instead of `norm.*`, as timm's does).

Shape suffixes: B batch, S image side, N patch tokens, T tokens (1 + N),
D embedding width, h heads, d head dim, F pooled features (= D).
"""

import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp

from ark_jax.models import layers

LN_EPS = 1e-6
POOLS = ('token', 'avg')
# Embedding width, blocks, heads (timm's vit_<variant>_patch16_224).
VARIANTS = {
    'tiny': (192, 12, 3),
    'small': (384, 12, 6),
    'base': (768, 12, 12),
    'large': (1024, 24, 16),
}


@dataclasses.dataclass(frozen=True)
class VitConfig:
  """Hyperparameters of one ViT; `from_variant` fills the sizes."""
  img_size: int = 224
  patch_size: int = 16
  embed_dim: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0  # timm's default for ViT.
  global_pool: str = 'token'  # 'token' (class token, timm's default) or 'avg'.

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> 'VitConfig':
    if variant not in VARIANTS:
      raise ValueError(f'Unknown ViT variant {variant!r}; known: {sorted(VARIANTS)} '
                       "(or 'custom' with embed_dim, depth, num_heads).")
    embed_dim, depth, num_heads = VARIANTS[variant]
    return cls(**{'embed_dim': embed_dim, 'depth': depth, 'num_heads': num_heads, **overrides})

  @property
  def num_features(self) -> int:
    return self.embed_dim

  @property
  def grid(self) -> int:
    return self.img_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return 1 + self.grid**2  # Class token + patches.

  def validate(self):
    """Raises ValueError naming the size or option ViT cannot use."""
    if self.img_size % self.patch_size:
      raise ValueError(
          f'ViT img_size={self.img_size} must be divisible by patch_size={self.patch_size}; '
          f'e.g. {self.img_size // self.patch_size * self.patch_size} or '
          f'{(self.img_size // self.patch_size + 1) * self.patch_size}.')
    if self.embed_dim % self.num_heads:
      raise ValueError(f'ViT embed_dim={self.embed_dim} is not divisible by '
                       f'num_heads={self.num_heads}.')
    if self.global_pool not in POOLS:
      raise ValueError(f'ViT global_pool={self.global_pool!r}; known: {POOLS}.')

  def forward_macs(self) -> int:
    """Multiply-accumulates of one forward pass (matmuls only, as timm/fvcore count)."""
    n_patches, t, d = self.grid**2, self.num_tokens, self.embed_dim
    hidden = int(d * self.mlp_ratio)
    macs = n_patches * self.patch_size**2 * 3 * d  # patch embed
    per_block = t * (3 * d * d + d * d + 2 * d * hidden)  # qkv, proj, mlp
    per_block += 2 * t * t * d  # q@k^T and attn@v
    return macs + self.depth * per_block


class Attention(nnx.Module):
  """Global multi-head self-attention over all tokens (timm's `attn.{qkv,proj}`)."""

  def __init__(self, dim: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.qkv = layers.linear(dim, 3 * dim, ('embed', 'heads'), dtype=dtype, rngs=rngs)
    self.proj = layers.linear(dim, dim, ('heads', 'embed'), dtype=dtype, rngs=rngs)
    self.num_heads = num_heads
    self.dtype = dtype

  def __call__(self, x_BxTxD):
    b, t, d = x_BxTxD.shape
    h = self.num_heads
    # timm splits qkv as (3, heads, head_dim) along the output features.
    qkv = self.qkv(x_BxTxD).reshape(b, t, 3, h, d // h)
    q_BxTxhxd, k_BxTxhxd, v_BxTxhxd = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q_BxTxhxd = q_BxTxhxd * (d // h) ** -0.5
    logits_BxhxTxT = jnp.einsum('bnhd,bmhd->bhnm', q_BxTxhxd, k_BxTxhxd,
                                precision=layers._precision(self.dtype))
    attn_BxhxTxT = jax.nn.softmax(logits_BxhxTxT.astype(jnp.float32), axis=-1).astype(self.dtype)
    out_BxTxhxd = jnp.einsum('bhnm,bmhd->bnhd', attn_BxhxTxT, v_BxTxhxd,
                             precision=layers._precision(self.dtype))
    return self.proj(out_BxTxhxd.reshape(b, t, d))


class Block(nnx.Module):
  """norm1 -> attention -> residual; norm2 -> MLP -> residual (timm's `blocks.j`)."""

  def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, *, dtype,
               rngs: nnx.Rngs):
    self.norm1 = layers.LayerNorm(dim, eps=LN_EPS, dtype=dtype, rngs=rngs)
    self.attn = Attention(dim, num_heads, dtype=dtype, rngs=rngs)
    self.norm2 = layers.LayerNorm(dim, eps=LN_EPS, dtype=dtype, rngs=rngs)
    self.mlp = layers.Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
    self.drop_path = drop_path

  def __call__(self, x_BxTxD, key):
    keys = (None, None) if key is None else jax.random.split(key)
    x = x_BxTxD + layers.drop_path(self.attn(self.norm1(x_BxTxD)), self.drop_path, keys[0])
    x = x + layers.drop_path(self.mlp(self.norm2(x)), self.drop_path, keys[1])
    return layers.constrain(x, ('act_batch', 'act_len', 'act_emb'))


class PatchEmbed(nnx.Module):
  """Conv PxP stride P (3 -> D) with bias, timm's `patch_embed.proj` (no norm)."""

  def __init__(self, patch: int, dim: int, *, dtype, rngs: nnx.Rngs):
    self.proj = layers.PatchConv(3, dim, patch, dtype=dtype, rngs=rngs)

  def __call__(self, x_BxSxSx3):
    x = self.proj(x_BxSxSx3)
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d)  # Row-major patches, as timm's flatten(2).


class VisionTransformer(nnx.Module):
  """ViT backbone: NHWC float images [B, S, S, 3] -> pooled features [B, F]."""

  def __init__(self, cfg: VitConfig, *, dtype=jnp.float32, remat: bool = False,
               rngs: nnx.Rngs):
    cfg.validate()
    self.cfg = cfg
    d = cfg.embed_dim
    self.patch_embed = PatchEmbed(cfg.patch_size, d, dtype=dtype, rngs=rngs)
    # timm: cls_token ~ N(0, 1e-6), pos_embed ~ trunc_normal(0.02).
    self.cls_token = nnx.Param(
        1e-6 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32),
        out_sharding=(None, None, 'embed'))
    self.pos_embed = nnx.Param(
        layers.TRUNC_NORMAL_02(rngs.params(), (1, cfg.num_tokens, d), jnp.float32),
        out_sharding=(None, None, 'embed'))
    rates = layers.drop_path_rates(cfg.drop_path_rate, (cfg.depth,))
    self.blocks = nnx.List([
        Block(d, cfg.num_heads, cfg.mlp_ratio, rates[j], dtype=dtype, rngs=rngs)
        for j in range(cfg.depth)])
    # timm moves the final norm after the pooling for 'avg' and renames it fc_norm.
    final_norm = layers.LayerNorm(d, eps=LN_EPS, dtype=dtype, rngs=rngs)
    if cfg.global_pool == 'avg':
      self.fc_norm = final_norm
    else:
      self.norm = final_norm
    self.num_features = cfg.num_features
    self.remat = remat
    self.dtype = dtype

  def __call__(self, x_BxSxSx3, *, train: bool = False, rng: jax.Array | None = None):
    """Pooled features. Stochastic depth is active only with train=True and an rng."""
    layers.check_images(x_BxSxSx3, self.cfg.img_size,
                        ' ViT position embeddings fix the image size; set img_size in the config.')
    key = rng if train else None
    x_BxNxD = self.patch_embed(x_BxSxSx3)
    b, _, d = x_BxNxD.shape
    cls_Bx1xD = jnp.broadcast_to(self.cls_token[...].astype(self.dtype), (b, 1, d))
    x_BxTxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
    x_BxTxD = x_BxTxD + self.pos_embed[...].astype(self.dtype)
    for j, block in enumerate(self.blocks):
      x_BxTxD = layers.remat_call(Block.__call__, block, x_BxTxD, layers.block_key(key, j),
                                  enabled=self.remat)
    if self.cfg.global_pool == 'avg':
      x_BxF = x_BxTxD[:, 1:].astype(jnp.float32).mean(axis=1)
      return self.fc_norm(x_BxF).astype(jnp.float32)
    # LayerNorm is per token, so normalising only the class token equals timm's
    # norm-then-select.
    return self.norm(x_BxTxD[:, 0]).astype(jnp.float32)

