"""The Ark model in PyTorch as the reference wires it: timm Swin -> projector -> heads.

Shared by the PyTorch baselines: benchmarks/timm_forward.py (the forward) and
benchmarks/torch_reference.py (the train step).
"""

import timm
from torch import nn

ARK6_NUM_CLASSES = (14, 14, 14, 3, 6, 1)  # configs/common.py, head order
PROJECTOR_DIM = 1376


class ArkTorch(nn.Module):
  """timm backbone -> projector -> every head, as the Ark reference wires them."""

  def __init__(self, backbone: nn.Module, projector_mlp: bool = False,
               num_classes: tuple[int, ...] = ARK6_NUM_CLASSES):
    super().__init__()
    self.backbone = backbone
    features = backbone.num_features
    # The reference's --use_mlp: Linear-ReLU-Linear; else one Linear (configs: projector_mlp).
    self.projector = (nn.Sequential(nn.Linear(features, PROJECTOR_DIM), nn.ReLU(),
                                    nn.Linear(PROJECTOR_DIM, PROJECTOR_DIM))
                      if projector_mlp else nn.Linear(features, PROJECTOR_DIM))
    self.heads = nn.ModuleList(nn.Linear(PROJECTOR_DIM, n) for n in num_classes)

  def forward(self, x):
    features = self.backbone(x)
    z = self.projector(features)
    return features, z, [head(z) for head in self.heads]


def create(model_name: str, img_size: int, window_size: int | None,
           projector_mlp: bool = False, **backbone_kwargs) -> ArkTorch:
  """A randomly initialised ArkTorch on a timm Swin built at `img_size` and `window_size`.

  Args:
    model_name: a timm model name, e.g. 'swin_tiny_patch4_window7_224'.
    img_size: input side in pixels (overrides the name's).
    window_size: Swin window (overrides the name's); 0 or None: the name's.
    projector_mlp: Linear-ReLU-Linear projector instead of one Linear.
    **backbone_kwargs: more timm.create_model arguments (embed_dim, depths... for tests).
  """
  kwargs = {'img_size': img_size, **backbone_kwargs}
  if window_size:
    kwargs['window_size'] = window_size
  backbone = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
  return ArkTorch(backbone, projector_mlp)
