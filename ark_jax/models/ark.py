"""The Ark model: backbone -> projector -> one head per dataset, all heads at once.

Shape suffixes: B batch, F pooled features, P projector width (1376 in Ark+),
D datasets (heads), C the largest head's class count (heads padded to it),
U the union of all datasets' label names (consolidated head only).

The D heads are one stacked Linear created with nnx.vmap ([D, P, C] kernel,
[D, C] bias). Every example computes every head (P x D x C multiply-adds with
the padding: 0.1 MMAC for Ark+6, a rounding error next to the backbone's
15 GMAC) and the loss picks its own by `dataset_id`, so one compiled program
serves any mix of datasets.

`head_labels` switches to the MedIA paper's "label consolidation" ablation: one
Linear(P -> U) over the union of the datasets' label names (matched by exact
name), each dataset reading its own columns of it; a label two datasets share
is one output. The logits keep the [B, D, C] layout, so loss, evaluation and
prediction do not know which head they got.
"""

from collections.abc import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from ark_jax.models import layers

# Logit given to a padded (non-existent) class: sigmoid -> 0, softmax weight -> 0,
# and still finite in bfloat16.
PADDED_LOGIT = -1e9


class Projector(nnx.Module):
  """Linear(F -> P), or Linear -> ReLU -> Linear with `mlp=True` (reference `--use_mlp`).

  PyTorch's default init (U(+-1/sqrt(fan_in)) for weights and biases), because
  the reference creates these layers after timm's init pass.
  """

  def __init__(self, features: int, dim: int, *, mlp: bool, dtype, rngs: nnx.Rngs):
    def make(fan_in, fan_out, axes):
      init = layers.torch_default_uniform(fan_in)
      return layers.linear(fan_in, fan_out, axes, dtype=dtype, kernel_init=init,
                           bias_init=init, rngs=rngs)
    self.fc1 = make(features, dim, ('embed', 'proj'))
    self.fc2 = make(dim, dim, ('proj', 'proj_out')) if mlp else None

  def __call__(self, features_BxF):
    z_BxP = self.fc1(features_BxF)
    if self.fc2 is not None:
      z_BxP = self.fc2(jax.nn.relu(z_BxP))
    return z_BxP.astype(jnp.float32)


class ArkModel(nnx.Module):
  """Backbone, projector and the stacked per-dataset heads."""

  def __init__(self, backbone: nnx.Module, num_classes: Sequence[int], *,
               projector_dim: int = 1376, projector_mlp: bool = False, dtype=jnp.float32,
               head_labels: Sequence[Sequence[str]] | None = None, rngs: nnx.Rngs):
    """Args:
      backbone: maps NHWC images to pooled features [B, F] (see models/registry.py).
      num_classes: class count of each dataset's head, in head order.
      projector_dim: P, the embedding the consistency loss compares.
      projector_mlp: Linear-ReLU-Linear projector instead of one Linear.
      dtype: computation dtype (parameters stay float32).
      head_labels: per dataset, its label names: one consolidated head over
        their union instead of one head per dataset (None: per-dataset heads).
      rngs: parameter initialisation.
    """
    if not num_classes or min(num_classes) < 1:
      raise ValueError(f'Every head needs at least one class, got num_classes={tuple(num_classes)}.')
    self.backbone = backbone
    self.projector = Projector(backbone.num_features, projector_dim, mlp=projector_mlp,
                               dtype=dtype, rngs=rngs)
    self.num_classes = tuple(int(n) for n in num_classes)
    width = max(self.num_classes)
    head_init = layers.torch_default_uniform(projector_dim)
    if head_labels is not None:
      self.union_labels, index_DxC = union_head_index(head_labels, self.num_classes)
      # Static (nested tuples): part of the graphdef, not of the trained state.
      self.union_index = tuple(map(tuple, index_DxC.tolist()))
      self.head = layers.linear(projector_dim, len(self.union_labels), ('proj', 'classes'),
                                dtype=dtype, kernel_init=head_init, bias_init=head_init,
                                rngs=rngs)
      self.heads = None
      return
    self.head = None

    @nnx.split_rngs(splits=len(self.num_classes))
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'dataset'})
    def make_heads(rngs):
      return layers.linear(projector_dim, width, ('proj', 'classes'), dtype=dtype,
                           kernel_init=head_init, bias_init=head_init, rngs=rngs)

    self.heads = make_heads(rngs)

  def class_mask(self) -> np.ndarray:
    """[D, C] bool: True where class c exists in dataset d's label set."""
    return np.arange(max(self.num_classes))[None, :] < np.array(self.num_classes)[:, None]

  def __call__(self, x_BxSxSx3, *, train: bool = False, rng: jax.Array | None = None):
    """Returns dict(features [B, F], z [B, P], logits [B, D, C]), all float32.

    Logits of padded classes are PADDED_LOGIT.
    """
    features_BxF = self.backbone(x_BxSxSx3, train=train, rng=rng)
    z_BxP = self.projector(features_BxF)
    return dict(features=features_BxF, z=z_BxP, logits=self.head_logits(z_BxP))

  def head_logits(self, z_BxP):
    """Every head applied to every example's projection: [B, P] -> [B, D, C]."""
    if self.head is not None:
      logits_BxU = self.head(z_BxP).astype(jnp.float32)
      logits_BxDxC = logits_BxU[:, np.asarray(self.union_index)]
      return jnp.where(self.class_mask()[None], logits_BxDxC, PADDED_LOGIT)

    @nnx.vmap(in_axes=(0, None), out_axes=1)
    def apply(head, z):
      return head(z)

    logits_BxDxC = apply(self.heads, z_BxP).astype(jnp.float32)
    return jnp.where(self.class_mask()[None], logits_BxDxC, PADDED_LOGIT)


def union_head_index(head_labels: Sequence[Sequence[str]],
                     num_classes: Sequence[int]) -> tuple[tuple[str, ...], np.ndarray]:
  """The union of the label names (first-seen order) and each class's column in it.

  Returns:
    (union_labels, index_DxC): index_DxC[d, c] is the union column of dataset
    d's class c (0 for padded classes, which class_mask hides).
  """
  if len(head_labels) != len(num_classes):
    raise ValueError(f'head_labels names {len(head_labels)} datasets, num_classes '
                     f'{len(num_classes)}.')
  union: dict[str, int] = {}
  index_DxC = np.zeros((len(num_classes), max(num_classes)), np.int32)
  for d, (names, n) in enumerate(zip(head_labels, num_classes)):
    if len(names) != n:
      raise ValueError(f'head_labels[{d}] has {len(names)} names, its head {n} classes.')
    for c, name in enumerate(names):
      index_DxC[d, c] = union.setdefault(name, len(union))
  return tuple(union), index_DxC


def select_head(logits_BxDxC, dataset_id_B):
  """Each example's own head: [B, D, C], [B] int -> [B, C]."""
  return jnp.take_along_axis(logits_BxDxC, dataset_id_B[:, None, None], axis=1)[:, 0]
