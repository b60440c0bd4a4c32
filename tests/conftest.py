"""Test setup: 8 fake CPU devices, strict rank promotion, the repo on sys.path."""

import os
import sys

import jax

# Before any JAX computation: multi-device code is tested on fake CPU devices.
jax.config.update('jax_num_cpu_devices', 8)
jax.config.update('jax_numpy_rank_promotion', 'raise')

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)
