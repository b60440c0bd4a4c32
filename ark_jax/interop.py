"""PyTorch <-> JAX weights: timm (current), timm 0.5.4 / Ark reference, Microsoft Swin.

NNX attribute names mirror timm's, so the canonical mapping is generic: the
NNX path `layers.1.blocks.0.attn.qkv.kernel` is timm's
`layers.1.blocks.0.attn.qkv.weight` transposed ([in, out] -> [out, in]; conv
kernels HWIO -> OIHW), a LayerNorm `scale` is timm's `weight`, every other leaf
keeps its name. Older layouts are renamed into the current timm layout before
that mapping (and back out of it on export):

- timm 0.5.4 = the Ark reference = Microsoft's Swin release: PatchMerging sits at
  the end of stages 0-2 (`layers.i.downsample`, i.e. current `layers.{i+1}`),
  and the `relative_position_index` / `attn_mask` buffers are saved.
- Ark checkpoints add `projector.*` (`projector.{0,2}.*` for the MLP variant) and
  `omni_heads.k.*`, one Linear per dataset; DataParallel may prefix `module.`.

Any mismatch (missing, unexpected, wrongly shaped or non-float tensors) raises
WeightsMismatchError listing every offending name: never a silent partial load,
never an integer, boolean or float64 tensor cast into a float parameter.
"""

from collections.abc import Mapping, Sequence
import re

from flax import nnx
import jax.numpy as jnp
import numpy as np

from ark_jax.models import ark
from ark_jax.models import registry
from ark_jax.models import swin

# Keys that a backbone load skips on purpose, per family: classifier heads
# (ImageNet's or the Ark heads, which the backbone has no use for) and buffers
# that are recomputed from the config.
_SKIPPED_ON_BACKBONE_LOAD = {
    'swin': re.compile(r'^(head\.|head_dist\.|projector\.|omni_heads\.)|'
                       r'\.(relative_position_index|attn_mask|relative_coords_table)$'),
    'vit': re.compile(r'^(head\.|head_dist\.|projector\.|omni_heads\.)'),
    'convnext': re.compile(r'^(head\.fc\.|projector\.|omni_heads\.)'),
}
_IMAGENET_CLASSES = 1000  # the unused `head` that the reference's timm Swin carries


# The dtypes a parameter may come in, each exact in float32: PyTorch's parameter
# dtypes (a .safetensors bfloat16 reads as ml_dtypes' bfloat16). An integer or
# boolean tensor is not a weight (a buffer, or a file that is not what it
# claims); float64 is refused too rather than rounded silently.
_WEIGHT_DTYPES = ('float16', 'bfloat16', 'float32')


class WeightsMismatchError(ValueError):
  """A state dict does not fit the model: lists missing, unexpected and misshapen tensors."""


def _dtype_error(name: str, value: np.ndarray) -> str | None:
  """'NAME: checkpoint DTYPE, ...' when `value` may not fill a float parameter, else None."""
  dtype = np.dtype(value.dtype).name
  if dtype in _WEIGHT_DTYPES:
    return None
  return f'{name}: checkpoint {dtype}, model wants one of {", ".join(_WEIGHT_DTYPES)}'


# ----------------------------------------------------------------------------- arrays


def to_numpy(value) -> np.ndarray:
  """A torch tensor, jax array or numpy array as a numpy array (on the host)."""
  if hasattr(value, 'detach'):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def read_state_dict(path: str, key: str | None = None) -> dict[str, np.ndarray]:
  """A PyTorch checkpoint file as name -> numpy array, loaded safely.

  Args:
    path: `.safetensors`, or a torch file (`.pth`, `.pth.tar`, `.bin`) read with
      `torch.load(weights_only=True)`, which refuses pickles that would run code.
    key: the entry of a dict checkpoint to use; by default the first present of
      'teacher' (Ark+: downstream uses the teacher), 'state_dict', 'model'
      (Microsoft's Swin release), or the dict itself when it is flat.

  Raises:
    ValueError: the file is not a state dict, or `key` is not in it.
  """
  if path.endswith('.safetensors'):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'Reading {path} needs PyTorch (pip install torch); safetensors files '
                      'do not.') from e
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... by version
    message = str(e)
    # A pickle naming a class or function (not a tensor or container) would run
    # its code on a full unpickle; torch refused it and nothing was executed.
    found = re.search(r'unsupported global:? (?:GLOBAL )?(\S+)', message, re.IGNORECASE)
    if found:
      raise ValueError(
          f'{path}: refused for safety: the pickle names {found[1]}, not only tensors, and a '
          'full unpickle would execute it. Nothing was executed. Re-save the weights as a '
          'plain state dict (torch.save(model.state_dict(), ...)) or as .safetensors.') from e
    detail = re.search(r'WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)',
                       message, re.S)
    detail = ' '.join((detail[1] if detail else message).split())[:200]
    raise ValueError(f'{path}: not a PyTorch checkpoint that weights-only loading accepts '
                     f'(torch.load(weights_only=True): {type(e).__name__}: {detail}). Nothing '
                     'in it was executed.') from e
  if not isinstance(checkpoint, Mapping):
    raise ValueError(f'{path}: expected a dict of tensors, got {type(checkpoint).__name__}.')
  candidates = [key] if key else ['teacher', 'state_dict', 'model']
  for name in candidates:
    if name in checkpoint and isinstance(checkpoint[name], Mapping):
      checkpoint = checkpoint[name]
      break
  else:
    if key:
      raise ValueError(f'{path}: no entry {key!r}; entries: {sorted(checkpoint)[:20]}.')
  tensors = {k: to_numpy(v) for k, v in checkpoint.items() if hasattr(v, 'shape')}
  if not tensors:
    raise ValueError(f'{path}: no tensors found (entries: {sorted(checkpoint)[:20]}).')
  return tensors


def strip_module_prefix(state_dict: Mapping) -> dict:
  """Drops DataParallel's `module.` prefix; keeps only prefixed keys if any have it.

  (The Ark+ zero-shot notebook does the same: a DataParallel checkpoint may also
  hold unprefixed bookkeeping entries.)
  """
  if any(k.startswith('module.') for k in state_dict):
    return {k[len('module.'):]: v for k, v in state_dict.items() if k.startswith('module.')}
  return dict(state_dict)


def _to_torch_array(path: tuple, value: np.ndarray) -> tuple[str, np.ndarray]:
  leaf = path[-1]
  # Leaves directly on the root module (ViT's cls_token) have no module prefix.
  name = ''.join(f'{p}.' for p in path[:-1])
  if leaf == 'kernel':
    if value.ndim == 2:
      return f'{name}weight', np.ascontiguousarray(value.T)
    if value.ndim == 4:
      return f'{name}weight', np.ascontiguousarray(value.transpose(3, 2, 0, 1))
    raise ValueError(f'Unexpected kernel rank {value.ndim} at {name}')
  if leaf == 'scale':
    return f'{name}weight', value
  return f'{name}{leaf}', value


def _from_torch_array(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] == 'kernel':
    return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)
  return value


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  if path[-1] == 'kernel':
    return tuple(reversed(shape)) if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


# ----------------------------------------------------------------------------- layouts


def _swin_old_to_timm(state_dict: dict) -> dict:
  """timm 0.5.4 / Ark / Microsoft layout -> current timm: PatchMerging moves to the next stage."""
  out = {}
  for key, value in state_dict.items():
    match = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', key)
    out[f'layers.{int(match[1]) + 1}.downsample.{match[2]}' if match else key] = value
  return out


def _swin_timm_to_old(state_dict: dict, cfg: swin.SwinConfig) -> dict:
  """Current timm -> timm 0.5.4 / Ark layout, with the buffers 0.5.4 saves."""
  out = {}
  for key, value in state_dict.items():
    match = re.match(r'^layers\.(\d+)\.downsample\.(.*)$', key)
    out[f'layers.{int(match[1]) - 1}.downsample.{match[2]}' if match else key] = value
  grids, windows = cfg.stage_grids(), cfg.stage_windows()
  for i, depth in enumerate(cfg.depths):
    window, shift = windows[i]
    for j in range(depth):
      prefix = f'layers.{i}.blocks.{j}'
      out[f'{prefix}.attn.relative_position_index'] = (
          swin.relative_position_index(window).astype(np.int64))
      if j % 2 and shift:
        out[f'{prefix}.attn_mask'] = swin.shifted_window_mask(grids[i], window, shift)
  return out


def _is_old_swin_layout(state_dict: Mapping) -> bool:
  return any(k.startswith('layers.0.downsample.') for k in state_dict)


def _canonical(state_dict: Mapping, family: str) -> dict:
  """Any supported layout -> numpy arrays in the current timm layout."""
  sd = {k: to_numpy(v) for k, v in strip_module_prefix(state_dict).items()}
  if family == 'swin' and _is_old_swin_layout(sd):
    sd = _swin_old_to_timm(sd)
  return sd


# ----------------------------------------------------------------------------- loading


def _assign(abstract_state: nnx.State, tensors: dict[str, np.ndarray], prefix: str = '',
            rename=None) -> tuple[nnx.State, list[str], list[str], set[str]]:
  """Fills the abstract NNX state from torch-named tensors.

  Returns (state, missing, misshapen, used keys); `misshapen` also lists
  tensors of a dtype that is not a float weight's.
  """
  missing, misshapen, used, leaves = [], [], set(), []
  for path, var in nnx.to_flat_state(abstract_state):
    name, _ = _to_torch_array(path, np.empty((1,) * len(var.shape)))
    name = rename(prefix + name) if rename else prefix + name
    expected = _torch_shape(path, var.shape)
    if name not in tensors:
      missing.append(f'{name} {list(expected)}')
      leaves.append((path, var))
      continue
    used.add(name)
    value = tensors[name]
    if tuple(value.shape) != expected:
      misshapen.append(f'{name}: checkpoint {list(value.shape)}, model {list(expected)}')
      leaves.append((path, var))
      continue
    if wrong := _dtype_error(name, value):
      misshapen.append(wrong)
      leaves.append((path, var))
      continue
    leaves.append((path, var.replace(jnp.asarray(_from_torch_array(path, value), var.dtype))))
  return nnx.from_flat_state(leaves), missing, misshapen, used


def _raise_if_mismatched(what: str, missing, misshapen, unexpected):
  if not (missing or misshapen or unexpected):
    return
  lines = [f'State dict does not fit {what}:']
  for title, items in (('missing', missing), ('wrong shape or dtype', misshapen),
                       ('unexpected', unexpected)):
    if items:
      lines.append(f'  {len(items)} {title}:')
      lines += [f'    {item}' for item in sorted(items)[:40]]
      if len(items) > 40:
        lines.append(f'    ... and {len(items) - 40} more')
  raise WeightsMismatchError('\n'.join(lines))


def load_backbone(state_dict: Mapping, model_name: str, img_size: int | None = None,
                  window_size: int | None = None, *, dtype=jnp.float32, remat: bool = False,
                  drop_path_rate: float | None = None):
  """An NNX backbone of timm's `model_name` carrying the weights of `state_dict`.

  Args:
    state_dict: name -> numpy array or torch tensor, in the current timm layout,
      the timm 0.5.4 / Ark reference layout or Microsoft's Swin layout (detected
      from the keys), with or without a `module.` prefix. Classifier heads
      (`head.*`, and Ark's `projector.*` / `omni_heads.*`) and Swin's saved
      buffers are skipped; everything else must match.
    model_name: a timm name, e.g. 'swin_base_patch4_window7_224',
      'swin_large_patch4_window12_384', 'vit_base_patch16_224', 'convnext_base'.
    img_size, window_size: override the name's sizes (e.g. Swin-L/w12 at 768).
    dtype: computation dtype; parameters stay float32.
    remat: rematerialise each block in the backward pass.
    drop_path_rate: stochastic depth; the family default when None.

  Returns:
    The backbone module: `backbone(x_BxSxSx3)` gives the pooled features [B, F].

  Raises:
    ValueError: unknown model name or sizes the architecture cannot tile.
    WeightsMismatchError: missing, unexpected or wrongly shaped tensors.
  """
  family, variant, fixed = registry.parse_timm_name(model_name)
  overrides = dict(fixed, img_size=img_size or fixed.get('img_size'),
                   drop_path_rate=drop_path_rate)
  if window_size is not None:
    if family != 'swin':
      raise ValueError(f'window_size applies to Swin only, not {model_name!r}.')
    overrides['window_size'] = window_size
  cfg = registry.backbone_config(family, variant, **overrides)
  tensors = _canonical(state_dict, family)
  abstract = nnx.eval_shape(
      lambda: registry.create_backbone(family, cfg, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  state, missing, misshapen, used = _assign(abstract_state, tensors)
  skipped = _SKIPPED_ON_BACKBONE_LOAD[family]
  unexpected = [f'{k} {list(v.shape)}' for k, v in tensors.items()
                if k not in used and not skipped.search(k)]
  _raise_if_mismatched(f'{model_name} (img_size={cfg.img_size})', missing, misshapen, unexpected)
  return nnx.merge(graphdef, state)


def backbone_state_dict(backbone, layout: str = 'timm') -> dict[str, np.ndarray]:
  """The backbone's weights as a PyTorch state dict of numpy arrays.

  Args:
    backbone: a Swin, ViT or ConvNeXt module of ark_jax.models.
    layout: 'timm' loads with strict=True into the current
      `timm.create_model(name, num_classes=0, img_size=S, window_size=W)`;
      'ark' (Swin only) is the timm 0.5.4 / Ark reference key set, buffers
      (`relative_position_index`, `attn_mask`) included.
  """
  _, state = nnx.split(backbone)
  sd = dict(_to_torch_array(path, np.array(var.get_value()))
            for path, var in nnx.to_flat_state(state))
  if layout == 'timm':
    return sd
  if layout == 'ark':
    if registry.family_of(backbone) != 'swin':
      raise ValueError("layout='ark' exists for Swin backbones only (the reference's layout).")
    return _swin_timm_to_old(sd, backbone.cfg)
  raise ValueError(f"Unknown layout {layout!r}; use 'timm' or 'ark'.")


# ----------------------------------------------------------------------------- Ark model


def _ark_projector_name(mlp: bool):
  """Our `projector.fc1/fc2` <-> the reference's `projector` or `projector.{0,2}`."""
  if not mlp:
    return lambda name: name.replace('projector.fc1.', 'projector.')
  return lambda name: name.replace('projector.fc1.', 'projector.0.').replace(
      'projector.fc2.', 'projector.2.')


def ark_state_dict(model: ark.ArkModel, layout: str = 'ark') -> dict[str, np.ndarray]:
  """The whole Ark model as a PyTorch state dict in the reference layout.

  Backbone keys follow `layout` ('ark': timm 0.5.4 with buffers and the unused
  1000-way ImageNet `head` the reference model carries, zero-filled; 'timm':
  current timm), then `projector.*` and `omni_heads.k.{weight [n_k, P], bias}`,
  unpadded to each dataset's class count. A consolidated head is written as the
  per-dataset heads it is equivalent to.
  """
  sd = backbone_state_dict(model.backbone, layout)
  if layout == 'ark':
    features = model.backbone.num_features
    sd['head.weight'] = np.zeros((_IMAGENET_CLASSES, features), np.float32)
    sd['head.bias'] = np.zeros((_IMAGENET_CLASSES,), np.float32)
  rename = _ark_projector_name(model.projector.fc2 is not None)
  _, projector_state = nnx.split(model.projector)
  for path, var in nnx.to_flat_state(projector_state):
    name, value = _to_torch_array(('projector',) + path, np.array(var.get_value()))
    sd[rename(name)] = value
  if model.head is not None:
    # A consolidated head as the per-dataset heads it acts as: each dataset's
    # columns of the union (shared labels copied into every head that has them).
    index_DxC = np.asarray(model.union_index)
    kernel_DxPxC = np.asarray(model.head.kernel.get_value())[:, index_DxC].transpose(1, 0, 2)
    bias_DxC = np.asarray(model.head.bias.get_value())[index_DxC]
  else:
    kernel_DxPxC = np.asarray(model.heads.kernel.get_value())
    bias_DxC = np.asarray(model.heads.bias.get_value())
  for k, n in enumerate(model.num_classes):
    sd[f'omni_heads.{k}.weight'] = kernel_DxPxC[k, :, :n].T.copy()
    sd[f'omni_heads.{k}.bias'] = bias_DxC[k, :n].copy()
  return sd


def load_ark_model(state_dict: Mapping, model_name: str, num_classes: Sequence[int] | None = None,
                   img_size: int | None = None, window_size: int | None = None, *,
                   dtype=jnp.float32, remat: bool = False, drop_path_rate: float | None = None):
  """An ArkModel from a reference checkpoint's state dict (student or teacher).

  The projector kind (Linear or MLP) and width, and the head count and sizes, are
  read from the keys; `num_classes`, when given, must agree. Other arguments as
  in load_backbone.
  """
  family = registry.parse_timm_name(model_name)[0]
  sd = _canonical(state_dict, family)
  mlp = 'projector.0.weight' in sd
  proj_key = 'projector.0.weight' if mlp else 'projector.weight'
  if proj_key not in sd:
    raise WeightsMismatchError(
        f'No projector in the state dict (looked for {proj_key!r}); an Ark checkpoint has '
        "'projector.weight' or 'projector.0.weight'.")
  heads = sorted(int(m[1]) for k in sd if (m := re.match(r'^omni_heads\.(\d+)\.weight$', k)))
  if heads != list(range(len(heads))) or not heads:
    raise WeightsMismatchError(f'omni_heads must be numbered 0..D-1, found indices {heads}.')
  found = tuple(sd[f'omni_heads.{k}.weight'].shape[0] for k in heads)
  if num_classes is not None and tuple(num_classes) != found:
    raise WeightsMismatchError(
        f'Head sizes differ: checkpoint omni_heads have {found}, config asks for '
        f'{tuple(num_classes)}.')
  backbone = load_backbone(sd, model_name, img_size, window_size, dtype=dtype, remat=remat,
                           drop_path_rate=drop_path_rate)
  projector_dim = sd[proj_key].shape[0]
  abstract = nnx.eval_shape(lambda: ark.ArkModel(
      backbone, found, projector_dim=projector_dim, projector_mlp=mlp, dtype=dtype,
      rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  abstract_state['backbone'] = nnx.state(backbone)
  projector_state, missing, misshapen, _ = _assign(
      abstract_state['projector'], sd, 'projector.', rename=_ark_projector_name(mlp))
  abstract_state['projector'] = projector_state
  width = max(found)
  kernel_DxPxC = np.zeros((len(found), projector_dim, width), np.float32)
  bias_DxC = np.zeros((len(found), width), np.float32)
  for k, n in enumerate(found):
    weight, bias = sd[f'omni_heads.{k}.weight'], sd.get(f'omni_heads.{k}.bias')
    if weight.shape[1] != projector_dim:
      misshapen.append(f'omni_heads.{k}.weight: checkpoint {list(weight.shape)}, '
                       f'model [{n}, {projector_dim}]')
      continue
    if bias is None:
      missing.append(f'omni_heads.{k}.bias [{n}]')
      continue
    wrong = [e for e in (_dtype_error(f'omni_heads.{k}.weight', weight),
                         _dtype_error(f'omni_heads.{k}.bias', bias)) if e]
    if wrong:
      misshapen += wrong
      continue
    kernel_DxPxC[k, :, :n] = weight.T
    bias_DxC[k, :n] = bias
  _raise_if_mismatched(f'the Ark model ({model_name})', missing, misshapen, [])
  heads_state = abstract_state['heads']
  heads_state['kernel'] = heads_state['kernel'].replace(jnp.asarray(kernel_DxPxC))
  heads_state['bias'] = heads_state['bias'].replace(jnp.asarray(bias_DxC))
  return nnx.merge(graphdef, abstract_state)


def init_params(state_dict: Mapping, abstract_model: ark.ArkModel) -> nnx.State:
  """Params to start an Ark model from, out of any supported PyTorch state dict.

  The backbone always (current timm, timm 0.5.4 / Ark or Microsoft layout);
  the projector and the heads too when the dict has them (an Ark checkpoint),
  in which case the heads must be the configured ones: a checkpoint of other
  datasets would put its heads' meanings on ours.

  Args:
    state_dict: name -> array (read_state_dict's result).
    abstract_model: the configured ArkModel (nnx.eval_shape is enough).

  Returns:
    An nnx.State holding 'backbone' and, for Ark checkpoints, 'projector' and
    'heads' (for train_state.create_train_state's init_params).

  Raises:
    WeightsMismatchError: naming every missing, unexpected or misshapen tensor,
      or the head sizes when they differ from the model's.
  """
  family = registry.family_of(abstract_model.backbone)
  sd = _canonical(state_dict, family)
  _, full = nnx.split(abstract_model)
  backbone, missing, misshapen, used = _assign(full['backbone'], sd)
  skipped = _SKIPPED_ON_BACKBONE_LOAD[family]
  unexpected = [f'{k} {list(v.shape)}' for k, v in sd.items()
                if k not in used and not skipped.search(k)]
  _raise_if_mismatched(f'the {family} backbone', missing, misshapen, unexpected)
  parts = {'backbone': backbone}
  if any(k.startswith('projector.') for k in sd):
    mlp = abstract_model.projector.fc2 is not None
    projector, missing, misshapen, _ = _assign(full['projector'], sd, 'projector.',
                                               rename=_ark_projector_name(mlp))
    _raise_if_mismatched('the projector (model.projector_dim / projector_mlp)', missing,
                         misshapen, [])
    parts['projector'] = projector
  heads = sorted(int(m[1]) for k in sd if (m := re.match(r'^omni_heads\.(\d+)\.weight$', k)))
  if heads:
    found = tuple(int(sd[f'omni_heads.{k}.weight'].shape[0]) for k in heads)
    if heads != list(range(len(heads))) or found != abstract_model.num_classes:
      raise WeightsMismatchError(
          f'The checkpoint has heads (omni_heads) of sizes {found}, the configured datasets '
          f'have {abstract_model.num_classes} classes (config.data.datasets / num_classes): '
          'heads are not interchangeable. Drop omni_heads.* from the file to load only the '
          'backbone and projector.')
    width = max(found)
    projector_dim = full['heads']['kernel'].shape[1]
    kernel_DxPxC = np.zeros((len(found), projector_dim, width), np.float32)
    bias_DxC = np.zeros((len(found), width), np.float32)
    for k, n in enumerate(found):
      weight, bias = sd[f'omni_heads.{k}.weight'], sd.get(f'omni_heads.{k}.bias')
      if weight.shape[1] != projector_dim or bias is None or bias.shape != (n,):
        raise WeightsMismatchError(
            f'omni_heads.{k}: weight {list(weight.shape)}, bias '
            f'{None if bias is None else list(bias.shape)}; the model wants [{n}, '
            f'{projector_dim}] and [{n}].')
      wrong = [e for e in (_dtype_error(f'omni_heads.{k}.weight', weight),
                           _dtype_error(f'omni_heads.{k}.bias', bias)) if e]
      _raise_if_mismatched('the heads (omni_heads)', [], wrong, [])
      kernel_DxPxC[k, :, :n] = weight.T
      bias_DxC[k, :n] = bias
    head_state = full['heads']
    head_state['kernel'] = head_state['kernel'].replace(jnp.asarray(kernel_DxPxC))
    head_state['bias'] = head_state['bias'].replace(jnp.asarray(bias_DxC))
    parts['heads'] = head_state
  return nnx.State(parts)
