"""Building blocks shared by the backbones: Linear/LayerNorm/Conv with timm's
initialisation and logical axis names, the MLP, stochastic depth, and logical
sharding constraints on activations.

Attribute names follow timm (`fc1`, `norm1`, `qkv`, ...) so that an NNX state
path such as `layers.1.blocks.0.attn.qkv.kernel` is one transpose away from
timm's `layers.1.blocks.0.attn.qkv.weight` (see ark_jax/interop.py).

Parameters are float32 (`param_dtype`); `dtype` is the computation dtype
(bfloat16 on GPU/TPU). LayerNorm statistics and softmax always run in float32.

Logical parameter axes used by the sharding rules (ark_jax/sharding.py):
  'embed'  the residual width C       'mlp'   the hidden width of an MLP
  'heads'  the q/k/v/attention width  'patch' a flattened input patch
  'norm'   LayerNorm vectors          'proj'  the Ark projector width
  'dataset', 'classes'                the stacked Ark heads
"""

from collections.abc import Sequence
import functools

from flax import nnx
from flax.core import spmd as core_spmd
import jax
import jax.numpy as jnp

# timm initialises Linear weights with trunc_normal(std=0.02) and zero biases.
TRUNC_NORMAL_02 = nnx.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
ZEROS = nnx.initializers.zeros_init()
ONES = nnx.initializers.ones_init()


def torch_default_uniform(fan_in: int):
  """PyTorch's default Linear init, U(-1/sqrt(fan_in), +1/sqrt(fan_in)), for weights and biases."""
  bound = 1.0 / fan_in**0.5

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def linear(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
           use_bias: bool = True, dtype=jnp.float32, kernel_init=TRUNC_NORMAL_02,
           bias_init=ZEROS, rngs: nnx.Rngs) -> nnx.Linear:
  """nnx.Linear with float32 params, a compute dtype and logical axis names.

  Its matmul is `linear_dot_general` (a backward written for XLA on CPU).
  """
  return nnx.Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nnx.with_partitioning(kernel_init, axes),
      bias_init=nnx.with_partitioning(bias_init, (axes[1],)),
      precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None,
      dot_general=linear_dot_general, rngs=rngs)


def linear_dot_general(x, kernel_IxO, dimension_numbers, precision=None, out_sharding=None,
                       preferred_element_type=None):
  """nnx.Linear's `dot_general`: x [..., I] @ kernel [I, O], with `matmul`'s backward."""
  if (dimension_numbers != (((x.ndim - 1,), (0,)), ((), ()))
      or out_sharding is not None or preferred_element_type is not None):
    return jax.lax.dot_general(x, kernel_IxO, dimension_numbers, precision=precision,
                               out_sharding=out_sharding,
                               preferred_element_type=preferred_element_type)
  return matmul(x, kernel_IxO, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x, kernel_IxO, precision=None):
  """x [..., I] @ kernel [I, O] -> [..., O], with its own backward.

  Autodiff's weight gradient contracts the leading axes of rank-3/4
  activations directly, and XLA on CPU then copies and transposes the output
  gradient before a dot that its fast matmul library (YNNPACK) does not take.
  The backward here flattens both to [T, I] and [T, O] first: the Swin-T/128
  train step 11-15% faster (BENCHMARKS.md, closing the gap).
  """
  return _matmul_fwd(x, kernel_IxO, precision)[0]


def _matmul_fwd(x, kernel_IxO, precision):
  y = jax.lax.dot_general(x, kernel_IxO, (((x.ndim - 1,), (0,)), ((), ())),
                          precision=precision)
  return y, (x, kernel_IxO)


def _matmul_bwd(precision, residuals, dy):
  x, kernel_IxO = residuals
  dx = jax.lax.dot_general(dy, kernel_IxO, (((dy.ndim - 1,), (1,)), ((), ())),
                           precision=precision)
  x_TxI = x.reshape(-1, x.shape[-1])
  dy_TxO = dy.reshape(-1, dy.shape[-1])
  dkernel_IxO = jax.lax.dot_general(x_TxI, dy_TxO, (((0,), (0,)), ((), ())),
                                    precision=precision)
  return dx.astype(x.dtype), dkernel_IxO.astype(kernel_IxO.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis, statistics in float32, timm's eps by default."""

  def __init__(self, features: int, *, eps: float = 1e-5, dtype=jnp.float32, rngs: nnx.Rngs):
    del rngs  # Deterministic init: ones and zeros.
    self.scale = nnx.Param(ONES(None, (features,), jnp.float32), out_sharding=('norm',))
    self.bias = nnx.Param(ZEROS(None, (features,), jnp.float32), out_sharding=('norm',))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    return layer_norm(x.astype(jnp.float32), self.scale[...], self.bias[...],
                      self.eps).astype(self.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale_F, bias_F, eps: float):
  """(x - mean) / sqrt(var + eps) * scale + bias over the last axis, float32.

  With its own backward: autodiff of the forward left XLA on CPU several
  reductions and a recomputed residual stream per LayerNorm; the closed form
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * scale, is one
  pass. The Swin-T/128 train step: 6% faster (BENCHMARKS.md, closing the gap).
  """
  return _layer_norm_fwd(x, scale_F, bias_F, eps)[0]


def _layer_norm_fwd(x, scale_F, bias_F, eps):
  mean = x.mean(-1, keepdims=True)
  rstd = jax.lax.rsqrt(jnp.square(x - mean).mean(-1, keepdims=True) + eps)
  y = (x - mean) * rstd * expand_to(scale_F, x.ndim) + expand_to(bias_F, x.ndim)
  return y, (x, mean, rstd, scale_F)


def _layer_norm_bwd(eps, residuals, dy):
  del eps
  x, mean, rstd, scale_F = residuals
  xhat = (x - mean) * rstd
  g = dy * expand_to(scale_F, x.ndim)
  dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
  leading = tuple(range(x.ndim - 1))
  return dx, (dy * xhat).sum(leading), dy.sum(leading)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class PatchConv(nnx.Module):
  """A Conv2d whose stride equals its kernel (patch embedding, downsampling).

  The kernel is stored HWIO like a Flax conv; since patches do not overlap the
  conv is a reshape and one matmul (as fast as a conv on CPU, faster to
  compile), with the flattened patch ordered (kh, kw, c_in) like the kernel.
  """

  def __init__(self, in_channels: int, out_channels: int, patch: int, *, dtype=jnp.float32,
               kernel_init=None, bias_init=None, rngs: nnx.Rngs, axes=('patch', 'embed')):
    # PyTorch's default Conv2d init unless told otherwise (timm keeps it for
    # Swin and ViT, re-initialises ConvNeXt's convs).
    default = torch_default_uniform(in_channels * patch * patch)
    kernel_init, bias_init = kernel_init or default, bias_init or default
    self.kernel = nnx.Param(kernel_init(rngs.params(), (patch, patch, in_channels, out_channels)),
                            out_sharding=(None, None, None, axes[1]))
    self.bias = nnx.Param(bias_init(rngs.params(), (out_channels,)), out_sharding=(axes[1],))
    self.patch = patch
    self.dtype = dtype

  def __call__(self, x_BxHxWxC):
    b, h, w, c = x_BxHxWxC.shape
    p = self.patch
    x = x_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, h // p, w // p, p * p * c).astype(self.dtype)
    kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
    y = matmul(x, kernel, _precision(self.dtype))
    return y + expand_to(self.bias[...].astype(self.dtype), y.ndim)


def gelu(x):
  """Exact GELU in PyTorch's form, x/2 * (1 + erf(x/sqrt(2))).

  jax.nn.gelu(approximate=False) goes through erfc, whose float32 lowering on
  CPU (exp, a division and branch selects) made the Swin-T/128 train step 3.5%
  slower than erf's polynomial (BENCHMARKS.md, closing the gap).
  """
  return x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))


class Mlp(nnx.Module):
  """fc1 -> exact GELU -> fc2 (timm's Mlp; dropout is 0 in every Ark config)."""

  def __init__(self, dim: int, hidden: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.fc1 = linear(dim, hidden, ('embed', 'mlp'), dtype=dtype, rngs=rngs)
    self.fc2 = linear(hidden, dim, ('mlp', 'embed'), dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(gelu(self.fc1(x)))


def check_images(x, img_size: int, hint: str = ''):
  """Raises a clear error unless `x` is an NHWC batch [B, img_size, img_size, 3]."""
  if x.ndim != 4 or x.shape[1:] != (img_size, img_size, 3):
    raise ValueError(f'Expected NHWC images [B, {img_size}, {img_size}, 3], got {x.shape}.{hint}')


def check_stride(family: str, img_size: int, stride: int, why: str):
  """Raises ValueError unless img_size is a multiple of the network's total stride."""
  if img_size % stride:
    raise ValueError(
        f'{family} img_size={img_size} must be divisible by {stride} ({why}); e.g. '
        f'{img_size // stride * stride} or {(img_size // stride + 1) * stride}.')


def expand_to(v, ndim: int):
  """Leading unit axes so `v` broadcasts against a rank-`ndim` array without rank promotion."""
  return v.reshape((1,) * (ndim - v.ndim) + v.shape)


def drop_path(x, rate: float, key: jax.Array | None):
  """Stochastic depth: drop the whole residual branch of an example with prob `rate`."""
  if rate == 0.0 or key is None:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


def drop_path_rates(rate: float, depths: Sequence[int]) -> list[float]:
  """timm's linear rule: 0 at the first block to `rate` at the last."""
  n = sum(depths)
  return [rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]


def block_key(key: jax.Array | None, index: int) -> jax.Array | None:
  """The drop-path key of block `index` (None when not training)."""
  return None if key is None else jax.random.fold_in(key, index)


def constrain(x, logical_axes: tuple[str | None, ...]):
  """Logical sharding constraint on an activation.

  A no-op unless a mesh and logical axis rules are active (nnx.logical_axis_rules
  under jax.set_mesh), so models run unchanged in tests and on one device.
  Logical names without a rule are left unsharded.
  """
  rules = core_spmd.get_logical_axis_rules()
  mesh = jax.sharding.get_abstract_mesh()
  if not rules or mesh is None or mesh.empty:
    return x
  mapping = dict(rules)
  spec = jax.sharding.PartitionSpec(*(mapping.get(name) for name in logical_axes))
  return jax.lax.with_sharding_constraint(x, spec)


@functools.cache
def _precision(dtype):
  # Exact float32 matmuls, so parity tests against timm hold to 1e-4 on every
  # backend (TPUs otherwise run f32 dots in bf16 passes).
  return jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None


def remat_call(fn, module, *args, enabled: bool, **kwargs):
  """Calls `fn(module, *args, **kwargs)`, under per-block rematerialisation if `enabled`."""
  if not enabled:
    return fn(module, *args, **kwargs)
  return nnx.remat(functools.partial(fn, **kwargs))(module, *args)
