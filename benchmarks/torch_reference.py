r"""The PyTorch baseline of `python -m ark_jax.benchmark --mode=step`: the Ark+ train step, eager.

  .venv/bin/python benchmarks/torch_reference.py --model swin_tiny_patch4_window7_224 \
      --img_size 128 --window_size 4 --batch_size 16 --steps 5 --warmup 2

What a user of the Ark reference runs today (ARK_SPEC.md section 3), one
optimizer step per call:
  teacher: an independent ArkTorch (built and initialised separately, eval
    mode, requires_grad False), forward under torch.no_grad() on the teacher
    view -> z_t (its head logits are computed and discarded, as the reference);
  student: ArkTorch in train mode (timm's drop-path 0.1) on the student view
    -> z_s and every head; each row's own head gives the task loss: BCE for
    multi-label sets, CE for the multi-class one (RSNA), averaged per dataset
    and then over the datasets present (ark_jax/losses.py's convention);
  loss = (1 - c) task + c MSE(z_s, z_t), c fixed (--consistency_weight);
  zero_grad(set_to_none=True), backward, timm's 'sgd' (SGD Nesterov, momentum
    0.9, weight decay 0).
float32 eager on CPU; on CUDA the forwards run under
torch.autocast('cuda', dtype=torch.bfloat16) (the parameters stay float32).

Not in the timed step, unlike the JAX step:
  - augmentation: the reference augments on the host in DataLoader workers
    (albumentations), so both views come in as ready float NCHW batches here;
    the JAX step augments on the device inside the step (its split puts that
    at a few percent of the step on CPU);
  - EMA: none, as with the JAX configs' ema='pass' (one teacher update per
    dataset pass, outside the step).
Rows cycle through the six Ark-6 heads as the JAX synthetic batches do:
dataset_id = (arange(B) + i) % 6 for batch i.

Threads: torch's default (all cores, as XLA uses), or --threads.
Prints human-readable lines, then ONE JSON object on the last line of stdout,
with the JAX benchmark's field names where they mean the same thing.
"""

import argparse
import contextlib
import json
import resource
import statistics
import time

import timm
import timm.optim
import torch
from torch.nn import functional as F
from torch.utils import flop_counter

import ark_torch

# Per head in ARK6_NUM_CLASSES order: True for softmax-CE sets (Ark+: RSNA).
ARK6_MULTICLASS = (False, False, False, True, False, False)


def synthetic_batches(batch_size: int, img_size: int, count: int, device: torch.device,
                      num_classes=ark_torch.ARK6_NUM_CLASSES, multiclass=ARK6_MULTICLASS,
                      seed: int = 0) -> list[dict]:
  """`count` batches: both views as random float NCHW and, per dataset present, its rows.

  'rows' holds (head, row indices, targets): class indices for multi-class
  heads, random 0/1 floats for multi-label ones.
  """
  generator = torch.Generator().manual_seed(seed)
  batches = []
  for i in range(count):
    dataset_id = (torch.arange(batch_size) + i) % len(num_classes)
    rows = []
    for d, n in enumerate(num_classes):
      index = torch.nonzero(dataset_id == d).flatten()
      if index.numel() == 0:
        continue
      if multiclass[d]:
        target = torch.randint(0, n, (index.numel(),), generator=generator)
      else:
        target = torch.randint(0, 2, (index.numel(), n), generator=generator).float()
      rows.append((d, index.to(device), target.to(device)))
    views = torch.randn(2, batch_size, 3, img_size, img_size, generator=generator)
    batches.append({'student_view': views[0].to(device), 'teacher_view': views[1].to(device),
                    'rows': rows})
  return batches


def task_loss(logits_per_head: list[torch.Tensor], rows, multiclass=ARK6_MULTICLASS):
  """Each dataset's mean loss over its rows, averaged over the datasets present."""
  losses = []
  for d, index, target in rows:
    logits = logits_per_head[d][index].float()
    losses.append(F.cross_entropy(logits, target) if multiclass[d]
                  else F.binary_cross_entropy_with_logits(logits, target))
  return torch.stack(losses).mean()


def make_step(student, teacher, optimizer, consistency_weight: float, device: torch.device):
  """`step(batch) -> loss`: one Ark+ optimizer step, as the reference's training loop."""
  def autocast():
    if device.type == 'cuda':
      return torch.autocast('cuda', dtype=torch.bfloat16)
    return contextlib.nullcontext()  # float32 on CPU, as the reference

  c = consistency_weight

  def step(batch):
    with torch.no_grad(), autocast():
      _, z_t, _ = teacher(batch['teacher_view'])
    with autocast():
      _, z_s, logits = student(batch['student_view'])
    task = task_loss(logits, batch['rows'])
    consistency = F.mse_loss(z_s.float(), z_t.float())
    loss = (1.0 - c) * task + c * consistency
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()

  return step


def build(model_name: str, img_size: int, window_size: int | None, device: torch.device,
          projector_mlp: bool = False, lr: float = 0.01, **backbone_kwargs):
  """(student, teacher, optimizer): two independently initialised models, SGD on the student."""
  student = ark_torch.create(model_name, img_size, window_size, projector_mlp,
                             **backbone_kwargs).to(device).train()
  teacher = ark_torch.create(model_name, img_size, window_size, projector_mlp,
                             **backbone_kwargs).to(device).eval()
  teacher.requires_grad_(False)
  # timm's 'sgd' is what the reference's create_optimizer gives: SGD, Nesterov.
  optimizer = timm.optim.create_optimizer_v2(student, 'sgd', lr=lr, weight_decay=0.0,
                                             momentum=0.9)
  return student, teacher, optimizer


def forward_flops(model, img_size: int, device: torch.device) -> float:
  """FLOPs (2 x multiply-accumulates) of one image's forward, counted by torch.

  Matmuls and the patch-embed conv, as ark_jax.benchmark.ark_forward_macs
  counts them analytically (Swin-T/128/w4: 1.4364 GMACs here, 1.4365 there;
  the JAX side pads the heads to 14 classes).
  """
  was_training = model.training
  model.eval()
  with torch.no_grad(), flop_counter.FlopCounterMode(display=False) as counter:
    model(torch.zeros(1, 3, img_size, img_size, device=device))
  model.train(was_training)
  return float(counter.get_total_flops())


def sync(device: torch.device):
  if device.type == 'cuda':
    torch.cuda.synchronize(device)


def matmul_peak_flops(device: torch.device, repeats: int = 5) -> tuple[float, str]:
  """Best-of-`repeats` FLOP/s of one square matmul, the JAX benchmark's roofline in torch.

  float32 2048^2 on CPU, bfloat16 8192^2 on CUDA (ark_jax.benchmark.matmul_peak_flops).
  """
  n, dtype = (2048, torch.float32) if device.type == 'cpu' else (8192, torch.bfloat16)
  a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
  for _ in range(2):  # warm-up: thread pools, caches, clocks
    torch.matmul(a, b)
  sync(device)
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    torch.matmul(a, b)
    sync(device)
    best = min(best, time.perf_counter() - start)
  return 2.0 * n**3 / best, f'{str(dtype).removeprefix("torch.")} {n}x{n}'


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
  if device.type == 'cuda':
    return torch.cuda.max_memory_allocated(device), 'torch.cuda.max_memory_allocated'
  # Linux reports KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'host max RSS'


def run(args) -> dict:
  """Builds the models, times the step; returns a flat dict (times in seconds)."""
  device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
  if args.threads > 0:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  student, teacher, optimizer = build(args.model, args.img_size, args.window_size, device,
                                      args.projector_mlp, args.lr, **args.backbone_kwargs)
  flops_per_image = 4 * forward_flops(student, args.img_size, device)  # DESIGN.md section 5
  if args.compile:  # off by default: the reference runs eager
    student, teacher = torch.compile(student), torch.compile(teacher)
  step = make_step(student, teacher, optimizer, args.consistency_weight, device)
  batches = synthetic_batches(args.batch_size, args.img_size, len(ark_torch.ARK6_NUM_CLASSES),
                              device, seed=args.seed)

  peak_before, _ = matmul_peak_flops(device)
  times, losses = [], []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    losses.append(step(batches[i % len(batches)]))
    sync(device)  # CPU eager returns when the work is done
    times.append(time.perf_counter() - start)
  peak_after, peak_kind = matmul_peak_flops(device)
  peak = max(peak_before, peak_after)
  timed = times[args.warmup:]
  median = statistics.median(timed)
  memory, memory_source = peak_memory_bytes(device)
  return {
      'framework': 'torch',
      'mode': 'step',
      'model': args.model,
      'img_size': args.img_size,
      'window_size': args.window_size,
      'batch_size': args.batch_size,
      'dtype': 'bfloat16 autocast' if device.type == 'cuda' else 'float32',
      'param_count': sum(p.numel() for p in student.parameters()),
      'device': f'{device.type}:{torch.cuda.get_device_name(device)}' if device.type == 'cuda'
                else 'cpu',
      'torch_version': torch.__version__,
      'timm_version': timm.__version__,
      'num_threads': torch.get_num_threads(),
      'compile': args.compile,
      # With --compile, the first step's wall time (tracing and code generation included).
      'compile_s': times[0] if args.compile else 0.0,
      'augment': 'excluded (host-side in the reference; the JAX step includes it)',
      'ema': 'none in the step (as ema=pass)',
      'consistency_weight': args.consistency_weight,
      'steps': args.steps,
      'warmup': args.warmup,
      'step_time_s_min': min(timed),
      'step_time_s_median': median,
      'step_time_s_max': max(timed),
      'img_per_s': args.batch_size / median,
      'gflops_per_image': flops_per_image / 1e9,
      'tflops_per_s': flops_per_image * args.batch_size / median / 1e12,
      'peak_tflops_per_s': peak / 1e12,
      'peak_matmul': peak_kind,
      'mfu': flops_per_image * args.batch_size / median / peak,
      'peak_memory_bytes': memory,
      'peak_memory_source': memory_source,
      'first_loss': float(losses[0]),
      'last_loss': float(losses[-1]),
  }


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='swin_tiny_patch4_window7_224', help='timm model name')
  parser.add_argument('--img_size', type=int, default=128, help='S, both views\' side in pixels')
  parser.add_argument('--window_size', type=int, default=4, help='Swin window (0: timm default)')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--backbone_kwargs', type=json.loads, default={},
                      help='JSON: more timm.create_model arguments, e.g. a custom Swin\'s '
                      '{"embed_dim": 32, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 4, 8]}')
  parser.add_argument('--projector_mlp', action='store_true',
                      help='Linear-ReLU-Linear projector (mirror config.model.projector_mlp)')
  parser.add_argument('--consistency_weight', type=float, default=0.25, help='c in the loss')
  parser.add_argument('--lr', type=float, default=0.01)
  parser.add_argument('--steps', type=int, default=5, help='timed steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps first')
  parser.add_argument('--threads', type=int, default=0,
                      help='intra-op threads; 0: torch\'s default (all cores)')
  parser.add_argument('--device', default=None, help='cpu | cuda; default: cuda if available')
  parser.add_argument('--compile', action='store_true',
                      help='torch.compile both models (not what the reference runs)')
  parser.add_argument('--seed', type=int, default=0)
  return parser.parse_args(argv)


def main():
  args = parse_args()
  if args.steps < 1 or args.warmup < 0 or (args.compile and args.warmup < 1):
    raise SystemExit('Need --steps >= 1 and --warmup >= 0 (>= 1 with --compile).')
  r = run(args)
  print(f"torch step: {r['model']} {r['img_size']}px window {r['window_size']} batch "
        f"{r['batch_size']} {r['dtype']}, {r['param_count'] / 1e6:.2f}M params, on {r['device']}, "
        f"torch {r['torch_version']} ({r['num_threads']} threads)"
        + (', torch.compile' if r['compile'] else ', eager'))
  print(f"augmentation {r['augment']}; EMA {r['ema']}")
  print(f"compile {r['compile_s']:.2f} s; step min/median/max {r['step_time_s_min']:.4f}/"
        f"{r['step_time_s_median']:.4f}/{r['step_time_s_max']:.4f} s over {r['steps']} steps")
  print(f"{r['img_per_s']:.2f} img/s, {r['gflops_per_image']:.3f} GFLOPs/img (4x fwd), "
        f"{r['tflops_per_s']:.4f} TFLOP/s achieved")
  print(f"matmul peak ({r['peak_matmul']}) {r['peak_tflops_per_s']:.4f} TFLOP/s -> "
        f"MFU {r['mfu']:.1%}")
  print(f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']}); "
        f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}")
  print(json.dumps(r), flush=True)


if __name__ == '__main__':
  main()
