"""Backbones by name: decode timm model names and config variants into modules.

Every backbone class takes `(cfg, *, dtype, remat, rngs)`, maps NHWC float
images [B, S, S, 3] to pooled features [B, F] with
`__call__(x, *, train=False, rng=None)`, and exposes `num_features`; every
config dataclass has `from_variant(variant, **overrides)`, `validate()` and
`forward_macs()` (analytic multiply-accumulates of one forward pass).
"""

import re

from flax import nnx
import jax
import jax.numpy as jnp

from ark_jax.models import convnext
from ark_jax.models import swin
from ark_jax.models import vit

FAMILIES = {
    'swin': (swin.SwinConfig, swin.SwinTransformer),
    'vit': (vit.VitConfig, vit.VisionTransformer),
    'convnext': (convnext.ConvNextConfig, convnext.ConvNeXt),
}

# timm names this project knows how to build, with the config fields they fix.
_TIMM_NAME_PATTERNS = (
    (re.compile(r'swin_(tiny|small|base|large)_patch4_window(\d+)_(\d+)(?:\..*)?$'),
     lambda m: ('swin', m[1], {'window_size': int(m[2]), 'img_size': int(m[3])})),
    (re.compile(r'vit_(tiny|small|base|large)_patch(\d+)_(\d+)(?:\..*)?$'),
     lambda m: ('vit', m[1], {'patch_size': int(m[2]), 'img_size': int(m[3])})),
    (re.compile(r'convnext_(tiny|small|base|large)(?:\..*)?$'),
     lambda m: ('convnext', m[1], {})),
)


def parse_timm_name(model_name: str) -> tuple[str, str, dict]:
  """'swin_base_patch4_window7_224' -> ('swin', 'base', {'window_size': 7, 'img_size': 224})."""
  for pattern, decode in _TIMM_NAME_PATTERNS:
    match = pattern.match(model_name)
    if match:
      return decode(match)
  raise ValueError(
      f'Unknown model_name {model_name!r}. Known timm names: '
      'swin_{tiny,small,base,large}_patch4_window<W>_<S> (e.g. swin_base_patch4_window7_224, '
      'swin_large_patch4_window12_384), vit_{tiny,small,base,large}_patch<P>_<S> '
      '(e.g. vit_base_patch16_224), convnext_{tiny,small,base,large}.')


def backbone_config(family: str, variant: str, **overrides):
  """The config dataclass of `family` at `variant` ('custom' takes every size from overrides)."""
  if family not in FAMILIES:
    raise ValueError(f'Unknown model.name {family!r}; known: {sorted(FAMILIES)}.')
  config_cls = FAMILIES[family][0]
  overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()
               if v is not None}
  cfg = config_cls(**overrides) if variant == 'custom' else config_cls.from_variant(variant, **overrides)
  cfg.validate()
  return cfg


def create_backbone(family: str, cfg, *, dtype=jnp.float32, remat: bool = False, rngs):
  """Builds the backbone module of `family` from its config dataclass."""
  return FAMILIES[family][1](cfg, dtype=dtype, remat=remat, rngs=rngs)


def materialize(create, *, out_shardings=None):
  """Runs a module constructor as one jitted program and returns the module.

  Eager NNX construction compiles every initialiser separately (one XLA program
  per parameter shape, ~70 for a Swin: 41 s on a busy 2-core CPU); one jitted
  program compiled without backend optimisation, which initialisers do not need,
  took 14 s there. The values are those of eager construction.

  Args:
    create: a no-argument callable building the module (with its own nnx.Rngs).
    out_shardings: optional shardings of the state, to create it already placed.
  """
  graphdef, _ = nnx.split(nnx.eval_shape(create))
  init = jax.jit(lambda: nnx.split(create())[1], out_shardings=out_shardings)
  state = init.lower().compile(compiler_options={'xla_backend_optimization_level': 0})()
  return nnx.merge(graphdef, state)


def family_of(backbone) -> str:
  for family, (_, module_cls) in FAMILIES.items():
    if isinstance(backbone, module_cls):
      return family
  raise TypeError(f'Not an ark_jax backbone: {type(backbone).__name__}')


# config.model keys that only variant='custom' reads.
CUSTOM_SIZE_KEYS = ('embed_dim', 'depths', 'depth', 'num_heads', 'dims')


def backbone_from_config(model_cfg, *, rngs):
  """The backbone a config's `model` section describes (no projector, no heads).

  Args:
    model_cfg: ConfigDict with name, variant, img_size, window_size, ... (configs/common.py).
    rngs: parameter initialisation.
  """
  family = model_cfg.name
  sizes = {
      'swin': ('img_size', 'window_size', 'embed_dim', 'depths', 'num_heads', 'drop_path_rate'),
      'vit': ('img_size', 'patch_size', 'embed_dim', 'depth', 'num_heads', 'drop_path_rate'),
      'convnext': ('img_size', 'depths', 'dims', 'drop_path_rate'),
  }
  if family not in sizes:
    raise ValueError(f'config.model.name={family!r} is unknown; use one of {sorted(sizes)}.')
  keys = sizes[family]
  if model_cfg.variant != 'custom':
    # A named variant fixes the widths and depths: `--config.model.variant=tiny`
    # on a config of custom sizes (the demo's) gives Swin-T, not a hybrid.
    keys = tuple(k for k in keys if k not in CUSTOM_SIZE_KEYS)
  cfg = backbone_config(family, model_cfg.variant, **{key: model_cfg.get(key) for key in keys})
  return create_backbone(family, cfg, dtype=jnp.dtype(model_cfg.dtype), remat=model_cfg.remat,
                         rngs=rngs)


def create_model(model_cfg, num_classes, *, rngs):
  """The Ark model (backbone, projector, heads) described by a config's `model` section.

  Args:
    model_cfg: ConfigDict with name, variant, img_size, window_size, ... (configs/common.py).
    num_classes: class count of each dataset head, in head order.
    rngs: parameter initialisation.
  """
  from ark_jax.models import ark  # pylint: disable=g-import-not-at-top
  backbone = backbone_from_config(model_cfg, rngs=rngs)
  return ark.ArkModel(backbone, num_classes, projector_dim=model_cfg.projector_dim,
                      projector_mlp=model_cfg.projector_mlp, dtype=jnp.dtype(model_cfg.dtype),
                      head_labels=model_cfg.get('head_labels'), rngs=rngs)
