"""--mode=export: an ark_jax checkpoint as PyTorch weights (DESIGN.md section 2).

  python -m ark_jax.main --config=... --workdir=DIR --mode=export \
      --export_format=ark|timm --output=FILE [--export_model=teacher|student]

- 'ark': a torch `.pth.tar` dict {'teacher': sd, 'state_dict': sd} in the Ark
  reference layout (timm 0.5.4 Swin keys with buffers, `projector.*`,
  `omni_heads.k.*`): the EMA teacher under 'teacher' (what Ark's releases and
  downstream use) and the student under 'state_dict', as the reference saves.
- 'timm': a safetensors file of one backbone (default the teacher) in the
  current timm layout, for timm.create_model(NAME, num_classes=0, img_size=S,
  window_size=W).load_state_dict(sd, strict=True).
"""

import os

from flax import nnx
import jax
import numpy as np

from ark_jax import interop
from ark_jax import train

FORMATS = ('ark', 'timm')
MODELS = ('teacher', 'student')


def export(config, workdir: str, export_format: str, output: str,
           export_model: str = 'teacher', step: int | None = None) -> str:
  """Writes the newest (or given) checkpoint of workdir to `output`; returns its path.

  Raises:
    ValueError: an unknown format or model, or an output suffix that does not
      fit the format (checked before the checkpoint is read).
    ImportError: 'ark' without PyTorch installed.
  """
  if export_format not in FORMATS:
    raise ValueError(f'--export_format={export_format!r} is unknown; use one of {FORMATS}.')
  if export_model not in MODELS:
    raise ValueError(f'--export_model={export_model!r} is unknown; use one of {MODELS}.')
  if export_format == 'timm' and not output.endswith('.safetensors'):
    raise ValueError(f'--output={output!r}: the timm export is a .safetensors file.')
  if export_format == 'ark':
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError('--export_format=ark writes a PyTorch .pth.tar and needs torch '
                        '(pip install torch); --export_format=timm writes safetensors '
                        'without it.') from e
  graphdef, state, _, _ = train.restore_checkpoint(config, workdir, step, purpose='--mode=export')
  models = {'teacher': nnx.merge(graphdef, jax.device_get(state.ema_params)),
            'student': nnx.merge(graphdef, jax.device_get(state.params))}
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = output + '.tmp'
  if export_format == 'ark':
    def tensors(model):
      return {k: torch.from_numpy(np.ascontiguousarray(v))
              for k, v in interop.ark_state_dict(model, 'ark').items()}
    torch.save({'teacher': tensors(models['teacher']),
                'state_dict': tensors(models['student'])}, tmp)
  else:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    sd = interop.backbone_state_dict(models[export_model].backbone, 'timm')
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp)
  os.replace(tmp, output)  # never a half-written file under the final name
  return output
