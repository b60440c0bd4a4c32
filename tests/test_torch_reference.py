"""benchmarks/torch_reference.py: the PyTorch Ark+ step trains (a tiny Swin, one fixed batch)."""

import os
import sys

import pytest

torch = pytest.importorskip('torch')
pytest.importorskip('timm')

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_step_lowers_the_loss_on_a_fixed_batch():
  torch.manual_seed(0)
  device = torch.device('cpu')
  student, teacher, optimizer = torch_reference.build(
      'swin_tiny_patch4_window7_224', 32, 4, device, lr=0.05, embed_dim=16, depths=(1, 1),
      num_heads=(1, 2), drop_path_rate=0.0)
  teacher_before = [p.clone() for p in teacher.parameters()]
  step = torch_reference.make_step(student, teacher, optimizer, 0.25, device)
  batch, = torch_reference.synthetic_batches(8, 32, 1, device)

  losses = [float(step(batch)) for _ in range(10)]

  assert all(map(torch.isfinite, torch.tensor(losses)))
  assert losses[-1] < 0.8 * losses[0], losses
  # The teacher is not trained: no EMA in the step, no gradient reaches it.
  assert all(torch.equal(a, b) for a, b in zip(teacher_before, teacher.parameters()))
  assert not teacher.training and student.training
