"""Pieces shared by the experiment configs: the model section and its variants.

A model is named '<family>_<variant>' ('swin_base', 'vit_small', 'convnext_base',
'swin_custom'); ark_jax/models/registry.py decodes the variant into sizes, so no
config repeats a table of widths and depths.
"""

import ml_collections

# The Ark+6 datasets in the reference's head order (checkpoint-compatible), with
# the class count of each head (ARK_SPEC.md section 4).
ARK6_DATASETS = ('mimic_cxr', 'chexpert', 'chestxray14', 'rsna_pneumonia', 'vindr_cxr',
                 'shenzhen_cxr')
ARK6_NUM_CLASSES = (14, 14, 14, 3, 6, 1)


def model_config(name: str = 'swin_base', img_size: int = 224,
                 window_size: int | None = None) -> ml_collections.ConfigDict:
  """The `model` section: backbone, sizes, projector and compute dtype."""
  family, _, variant = name.partition('_')
  c = ml_collections.ConfigDict()
  c.name = family  # 'swin' | 'vit' | 'convnext'
  c.variant = variant or 'base'  # 'tiny' | 'small' | 'base' | 'large' | 'custom'
  c.img_size = img_size  # S, the network's input side in pixels
  c.window_size = window_size or (7 if img_size == 224 else 12)  # Swin only
  c.patch_size = 16  # ViT only (Swin and ConvNeXt fix their own)
  # Sizes for variant='custom' (None = the family default); Swin: embed_dim,
  # depths, num_heads; ViT: embed_dim, depth, num_heads; ConvNeXt: depths, dims.
  c.embed_dim = ml_collections.config_dict.placeholder(int)
  c.depths = ml_collections.config_dict.placeholder(tuple)
  c.depth = ml_collections.config_dict.placeholder(int)
  c.num_heads = ml_collections.config_dict.placeholder(tuple)
  c.dims = ml_collections.config_dict.placeholder(tuple)
  c.drop_path_rate = 0.1  # stochastic depth at the last block (timm's Swin default)
  c.projector_dim = 1376  # P, the embedding the consistency loss compares
  c.projector_mlp = False  # Linear-ReLU-Linear projector (reference --use_mlp)
  c.remat = False  # rematerialise each block in the backward (memory for 768 px)
  c.dtype = 'float32'  # computation dtype; 'bfloat16' on GPU/TPU (params stay f32)
  return c


def smoke_model_config(img_size: int = 64) -> ml_collections.ConfigDict:
  """A Swin small enough to train on a laptop CPU in seconds (tests, demos)."""
  c = model_config('swin_custom', img_size, window_size=4)
  c.embed_dim = 32
  c.depths = (1, 1, 1, 1)
  c.num_heads = (1, 2, 4, 8)
  c.projector_dim = 64
  return c
