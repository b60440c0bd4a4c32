r"""The PyTorch baseline of `python -m ark_jax.benchmark --mode=forward`: timm eager.

  .venv/bin/python benchmarks/timm_forward.py --model swin_tiny_patch4_window7_224 \
      --img_size 128 --window_size 4 --batch_size 16 --steps 20 --warmup 3

The same work as the JAX forward: timm's backbone (num_classes=0, pooled
features) then Linear(F -> 1376) and the six Ark-6 heads, float32, eval mode,
under torch.no_grad(), on a random NCHW batch. Prints human-readable lines,
then ONE JSON object on the last line of stdout, with the JAX benchmark's
field names where they mean the same thing.
"""

import argparse
import json
import resource
import statistics
import time

import timm
import torch

import ark_torch


def run(model_name: str, img_size: int, window_size: int | None, batch_size: int, steps: int,
        warmup: int) -> dict:
  """Times the eager forward; returns a flat dict (times in seconds)."""
  model = ark_torch.create(model_name, img_size, window_size)
  model.eval()
  x = torch.randn(batch_size, 3, img_size, img_size)
  times = []
  with torch.no_grad():
    for i in range(warmup + steps):
      start = time.perf_counter()
      model(x)  # CPU eager: the call returns when the work is done
      if i >= warmup:
        times.append(time.perf_counter() - start)
  median = statistics.median(times)
  return {
      'framework': 'torch',
      'model': model_name,
      'img_size': img_size,
      'window_size': window_size,
      'batch_size': batch_size,
      'dtype': 'float32',
      'param_count': sum(p.numel() for p in model.parameters()),
      'device': 'cpu',
      'torch_version': torch.__version__,
      'timm_version': timm.__version__,
      'num_threads': torch.get_num_threads(),
      'steps': steps,
      'warmup': warmup,
      'step_time_s_min': min(times),
      'step_time_s_median': median,
      'step_time_s_max': max(times),
      'img_per_s': batch_size / median,
      # Linux reports KiB.
      'peak_memory_bytes': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      'peak_memory_source': 'host max RSS',
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--model', default='swin_tiny_patch4_window7_224', help='timm model name')
  parser.add_argument('--img_size', type=int, default=128, help='input side in pixels')
  parser.add_argument('--window_size', type=int, default=4, help='Swin window (0: timm default)')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--steps', type=int, default=20, help='timed calls')
  parser.add_argument('--warmup', type=int, default=3, help='untimed calls first')
  args = parser.parse_args()
  r = run(args.model, args.img_size, args.window_size, args.batch_size, args.steps, args.warmup)
  print(f"timm {r['model']} {r['img_size']}px window {r['window_size']} batch {r['batch_size']} "
        f"float32, {r['param_count'] / 1e6:.2f}M params, torch {r['torch_version']} "
        f"({r['num_threads']} threads)")
  print(f"step min/median/max {r['step_time_s_min']:.4f}/{r['step_time_s_median']:.4f}/"
        f"{r['step_time_s_max']:.4f} s over {r['steps']} steps -> {r['img_per_s']:.2f} img/s")
  print(f"peak memory {r['peak_memory_bytes'] / 2**30:.2f} GiB (host max RSS)")
  print(json.dumps(r), flush=True)


if __name__ == '__main__':
  main()
