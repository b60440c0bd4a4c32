"""The Ark reference model on timm 0.5.4, run in a subprocess by test_interop.py.

The Ark reference code subclasses timm 0.5.4's SwinTransformer and adds
`projector` and `omni_heads` (ARK_SPEC.md section 2). timm 0.5.4 cannot be
imported next to the current timm, so the tests install it under
.venv/timm054 and run this script with that folder first on sys.path.

  python ark_reference_model.py SPEC.json

SPEC: {"swin": {img_size, window_size, embed_dim, depths, num_heads},
       "projector_dim": P or null (plain Swin), "num_classes": [n_k...],
       "load": "in.npz" or null (random init, LayerNorms perturbed),
       "strict": true | false (false: the reference's downstream recipe: strip
         `module.`, drop head.* and attn_mask, load non-strictly),
       "input": "x.npy" (NCHW float32), "save_state": "out.npz" or null,
       "output": "out.npz"}
Writes features (pooled), z and logits_k to "output", and for non-strict loads
the missing and unexpected key lists.
"""

import json
import sys

import numpy as np
import timm
from timm.models.swin_transformer import SwinTransformer
import torch
from torch import nn


class ArkSwin(SwinTransformer):
  """timm 0.5.4 Swin + projector + one head per dataset, as the reference builds it."""

  def __init__(self, projector_dim, num_classes_list, **kwargs):
    super().__init__(**kwargs)
    self.projector = nn.Linear(self.num_features, projector_dim)
    self.omni_heads = nn.ModuleList([nn.Linear(projector_dim, n) for n in num_classes_list])

  def forward(self, x):
    z = self.projector(self.forward_features(x))
    return z, [head(z) for head in self.omni_heads]


def main(spec_path):
  assert timm.__version__ == '0.5.4', timm.__version__
  with open(spec_path) as f:
    spec = json.load(f)
  torch.manual_seed(0)
  swin_kwargs = dict(spec['swin'], patch_size=4, num_classes=1000)
  if spec.get('projector_dim'):
    model = ArkSwin(spec['projector_dim'], spec['num_classes'], **swin_kwargs)
  else:
    model = SwinTransformer(**swin_kwargs)
  model.eval()
  result = {}
  if spec.get('load'):
    sd = {k: torch.from_numpy(v) for k, v in np.load(spec['load']).items()}
    if spec.get('strict', True):
      model.load_state_dict(sd, strict=True)
    else:
      sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
      sd = {k: v for k, v in sd.items() if not k.startswith('head.') and 'attn_mask' not in k}
      missing, unexpected = model.load_state_dict(sd, strict=False)
      result['missing'] = np.array(sorted(missing), dtype=object).astype(str)
      result['unexpected'] = np.array(sorted(unexpected), dtype=object).astype(str)
  else:
    with torch.no_grad():
      for name, p in model.named_parameters():
        if 'norm' in name:
          p.add_(0.1 * torch.randn_like(p))
  if spec.get('save_state'):
    np.savez(spec['save_state'], **{k: v.numpy() for k, v in model.state_dict().items()})
  x = torch.from_numpy(np.load(spec['input']))
  with torch.no_grad():
    result['features'] = model.forward_features(x).numpy()
    if spec.get('projector_dim'):
      z, logits = model(x)
      result['z'] = z.numpy()
      for k, l in enumerate(logits):
        result[f'logits_{k}'] = l.numpy()
  np.savez(spec['output'], **result)


if __name__ == '__main__':
  main(sys.argv[1])
