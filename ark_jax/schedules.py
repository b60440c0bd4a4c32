"""Schedules of Ark+ training: learning rate, EMA momentum, consistency weight.

ARK_SPEC.md section 3; DESIGN.md section 4, decisions 5 and 6. All functions
accept Python numbers or (traced) jnp scalars.

  learning_rate   The intended schedule, per optimizer step: linear warmup from
                  warmup_init to base_lr, then cosine to end_lr. The reference
                  steps timm's scheduler with the validation loss as the epoch
                  (ARK_SPEC.md section 9, pitfall 1); that bug is not reproduced.
  ema_momentum    Per EMA update (one per dataset pass: k = epoch * D + d,
                  K = epochs * D): the DINO cosine from m0 = 0.9 towards 1.
  consistency_weight
                  c = 5 (m - 0.9), from 0 to 0.5; the 0.9 is the reference's
                  hard-coded constant, not m0.
"""

import functools

import jax
import jax.numpy as jnp
import optax


def learning_rate(step, base_lr, warmup_steps, total_steps, warmup_init=1e-6, end_lr=1e-5):
  """Linear warmup then cosine decay, per step.

  Args:
    step: optimizer step, 0-based.
    base_lr: the peak, reached at `warmup_steps`.
    warmup_steps: length of the linear warmup (0: start at base_lr).
    total_steps: the step at which the cosine reaches end_lr (warmup included);
      the LR stays at end_lr afterwards.
    warmup_init: the LR at step 0 (timm's warmup_lr_init).
    end_lr: the final LR (timm's lr_min).

  Returns:
    The LR, float32.
  """
  step = jnp.asarray(step, jnp.float32)
  warmup = warmup_init + (base_lr - warmup_init) * step / max(warmup_steps, 1)
  decay_steps = max(total_steps - warmup_steps, 1)
  progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
  cosine = end_lr + (base_lr - end_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup_steps, warmup, cosine)


def lr_schedule(base_lr, warmup_steps, total_steps, warmup_init=1e-6,
                end_lr=1e-5) -> optax.Schedule:
  """`learning_rate` as an optax schedule (step -> LR) for the optimizer.

  It is optax.warmup_cosine_decay_schedule's curve, but that one computes the
  warmup as (init - peak)(1 - t) + peak in float32, which puts step 0 at
  1.013e-6 rather than 1e-6; this one is exact at both ends.
  """
  return functools.partial(learning_rate, base_lr=base_lr, warmup_steps=warmup_steps,
                           total_steps=total_steps, warmup_init=warmup_init, end_lr=end_lr)


def ema_momentum(k, total_updates, m0=0.9):
  """Teacher momentum of EMA update k of K: 1 - (1 - m0)(1 + cos(pi k / K)) / 2."""
  k = jnp.asarray(k, jnp.float32)
  return 1.0 - (1.0 - m0) * (1.0 + jnp.cos(jnp.pi * k / total_updates)) / 2.0


def consistency_weight(momentum):
  """c = 5 (m - 0.9), clipped at 0 (a custom m0 below 0.9 would make it negative)."""
  return jnp.maximum(5.0 * (jnp.asarray(momentum, jnp.float32) - 0.9), 0.0)


def ema_update(teacher_params, student_params, momentum):
  """theta_T <- m theta_T + (1 - m) theta_S over any pytree, in float32.

  Args:
    teacher_params: the EMA (teacher) pytree.
    student_params: the student pytree, same structure.
    momentum: m, a scalar.

  Returns:
    The new teacher pytree, float32 leaves.
  """
  to_f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  return optax.incremental_update(to_f32(student_params), to_f32(teacher_params),
                                  step_size=1.0 - jnp.asarray(momentum, jnp.float32))
