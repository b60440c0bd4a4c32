"""The training state of Ark+: student params, teacher (EMA) params, optimizer state.

Everything is a plain pytree applied through one NNX graphdef (DESIGN.md
section 4, decision 1); the teacher is `ema_params` run through the student's
graphdef. The whole state is created already sharded, in one jitted program
whose out_shardings come from the parameters' logical axis names (decision 7).

Config keys read here (besides `seed`, `batch_size`, `model`, `data.num_classes`):

  teacher_init              'independent': the teacher has its own random init
                            (own projector and heads, as the reference;
                            ARK_SPEC.md pitfall 5) | 'copy': a copy of the student
  optimizer.name            'sgd' (Nesterov momentum, the reference) | 'adamw'
  optimizer.lr              peak learning rate
  optimizer.warmup_steps    linear warmup length, in optimizer steps
  optimizer.total_steps     end of the cosine (warmup included), in steps
  optimizer.weight_decay    0 in the reference; adamw skips biases and vectors
  optimizer.momentum        optional, default 0.9 (sgd)
  optimizer.clip_grad_norm  optional; global-norm clipping when > 0
  optimizer.warmup_init     optional, default 1e-6 (LR at step 0)
  optimizer.end_lr          optional, default 1e-5 (LR at total_steps)
  mesh.data, mesh.fsdp, sharding.rules   see ark_jax/sharding.py

Only nnx.Param variables are state. The models have no other variables today
(no BatchNorm statistics; Swin's relative position index is a constant);
create_train_state raises if one appears rather than silently dropping it.
"""

import dataclasses

from flax import nnx
from flax import struct
import jax
import jax.numpy as jnp
import optax

from ark_jax import schedules
from ark_jax import sharding
from ark_jax.models import registry

OPTIMIZERS = ('sgd', 'adamw')
TEACHER_INITS = ('independent', 'copy')

# Streams folded out of PRNGKey(config.seed).
_STUDENT_INIT, _TEACHER_INIT, _TRAIN = 0, 1, 2


@struct.dataclass
class TrainState:
  """Args:

  step: int32 scalar, optimizer steps taken.
  params: nnx.State of the student's nnx.Param (float32).
  ema_params: the teacher's, same structure, float32.
  opt_state: optax state of `params`.
  rng: raw uint32[2] PRNG key; the step's key is jax.random.fold_in(rng, step),
    so a resumed run draws the same numbers.
  """
  step: jax.Array
  params: nnx.State
  ema_params: nnx.State
  opt_state: optax.OptState
  rng: jax.Array


def check_config(config, num_devices: int) -> None:
  """Raises a ValueError naming the config key, before anything is compiled."""
  sharding.mesh_shape(config.mesh, num_devices)
  sharding.check_batch_divisible(config.batch_size, num_devices)
  if config.optimizer.name not in OPTIMIZERS:
    raise ValueError(f'config.optimizer.name={config.optimizer.name!r} is unknown; use one of '
                     f'{OPTIMIZERS}.')
  if config.teacher_init not in TEACHER_INITS:
    raise ValueError(f'config.teacher_init={config.teacher_init!r} is unknown; use one of '
                     f'{TEACHER_INITS}.')
  check_model_config(config.model)


def check_model_config(model_cfg) -> None:
  """The model's sizes tile (Swin windows, ViT patches) and its dtype is a float: no tracing.

  Raises:
    ValueError: naming config.model and the sizes or dtype at fault.
  """
  family = model_cfg.name
  if family not in registry.FAMILIES:
    raise ValueError(f'config.model.name={family!r} is unknown; use one of '
                     f'{sorted(registry.FAMILIES)}.')
  # The keys registry.create_model passes: the family's config fields that the
  # config has, less the sizes a named variant fixes.
  fields = {f.name for f in dataclasses.fields(registry.FAMILIES[family][0])}
  keys = [k for k in model_cfg if k in fields and model_cfg[k] is not None and not (
      model_cfg.variant != 'custom' and k in registry.CUSTOM_SIZE_KEYS)]
  try:
    registry.backbone_config(family, model_cfg.variant, **{k: model_cfg[k] for k in keys})
  except (ValueError, TypeError) as e:
    given = ', '.join(f'model.{k}={model_cfg[k]!r}' for k in ['variant'] + keys)
    raise ValueError(f'config.model ({given}): {e}') from e
  try:
    dtype = jnp.dtype(model_cfg.dtype)
  except TypeError as e:
    raise ValueError(f'config.model.dtype={model_cfg.dtype!r} is not a dtype.') from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"config.model.dtype={model_cfg.dtype!r}: use a float dtype ('float32', "
                     "'bfloat16').")


def _decay_mask(params):
  # timm's rule: no weight decay on biases, norms and other vectors (and
  # relative_position_bias_table, its no_weight_decay()). A lone leaf (optax's
  # placeholder in tree_map_params) counts as decayed.
  def decays(path, p):
    names = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    last = names[-1] if names else ''
    return getattr(p, 'ndim', 2) > 1 and 'bias' not in last
  return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(config) -> optax.GradientTransformation:
  """The optimizer of `config.optimizer`, with the warmup-cosine LR schedule."""
  c = config.optimizer
  lr = schedules.lr_schedule(c.lr, c.warmup_steps, c.total_steps,
                             warmup_init=c.get('warmup_init', 1e-6), end_lr=c.get('end_lr', 1e-5))
  if c.name == 'sgd':
    # optax's Nesterov trace: v = m v + g; step = -lr (g + m v), as torch.optim.SGD.
    tx = optax.chain(optax.add_decayed_weights(c.weight_decay) if c.weight_decay else
                     optax.identity(),
                     optax.sgd(lr, momentum=c.get('momentum', 0.9), nesterov=True))
  elif c.name == 'adamw':
    tx = optax.adamw(lr, weight_decay=c.weight_decay, mask=_decay_mask)
  else:
    raise ValueError(f'config.optimizer.name={c.name!r} is unknown; use one of {OPTIMIZERS}.')
  if c.get('clip_grad_norm'):
    tx = optax.chain(optax.clip_by_global_norm(c.clip_grad_norm), tx)
  return tx


def _check_init_params(init_params, abstract_params):
  """Every entry of `init_params` must exist in the model with the same shape."""
  expected = dict(nnx.to_flat_state(abstract_params))
  for path, variable in nnx.to_flat_state(init_params):
    name = '.'.join(map(str, path))
    if path not in expected:
      raise ValueError(f'init_params has {name}, which the model does not have.')
    want = expected[path].get_value().shape
    got = jnp.shape(variable.get_value() if isinstance(variable, nnx.Variable) else variable)
    if got != want:
      raise ValueError(f'init_params {name} has shape {got}, the model wants {want}.')


def create_train_state(config, num_classes, mesh, rules, *, init_params=None,
                       abstract_only: bool = False):
  """Builds the sharded TrainState of student, teacher and optimizer.

  Args:
    config: the run's ConfigDict (keys in the module docstring).
    num_classes: class count of each head, in head order.
    mesh: the ('data', 'fsdp') mesh (sharding.make_mesh).
    rules: logical axis rules (config.sharding.rules).
    init_params: optional nnx.State of (a subset of) the student's params, e.g.
      ImageNet backbone weights. Every entry it has is loaded into BOTH student
      and teacher, as the reference loads the same pretrained weights into
      both; entries it lacks (e.g. projector, heads) keep their fresh init, so
      the teacher's stay independent under teacher_init='independent'.
    abstract_only: return jax.eval_shape's TrainState instead of creating it.

  Returns:
    (graphdef, state, state_shardings): the student's graphdef (the teacher uses
    it too), the TrainState created already sharded, and its shardings (a
    TrainState of NamedShardings, for the train step's in/out_shardings).
  """
  check_config(config, mesh.size)
  tx = create_optimizer(config)
  # The root key is an argument of the compiled init, not a constant in it: runs
  # that differ only by seed (federated clients, seeds of an ablation) share one
  # compiled program.
  root = jax.random.PRNGKey(config.seed)

  def build(stream, root):
    return registry.create_model(config.model, num_classes,
                                 rngs=nnx.Rngs(jax.random.fold_in(root, stream)))

  def split(model, loaded):
    if loaded is not None:
      nnx.update(model, loaded)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
      # Every model of ark_jax/models holds nnx.Param only; a stateful layer
      # (e.g. BatchNorm statistics) would need its own TrainState field.
      raise TypeError(
          f'The model has non-Param variables, which TrainState does not hold: {rest}')
    return graphdef, params

  def init(loaded, root):
    _, params = split(build(_STUDENT_INIT, root), loaded)
    if config.teacher_init == 'copy':
      ema_params = params
    else:
      _, ema_params = split(build(_TEACHER_INIT, root), loaded)
    ema_params = jax.tree.map(lambda x: x.astype(jnp.float32), ema_params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=ema_params,
                      opt_state=tx.init(params), rng=jax.random.fold_in(root, _TRAIN))

  graphdef, abstract_params, _ = nnx.split(nnx.eval_shape(lambda: build(_STUDENT_INIT, root)),
                                           nnx.Param, ...)
  if init_params is not None:
    _check_init_params(init_params, abstract_params)
  state_shardings = train_state_shardings(abstract_params, tx, mesh, rules)
  if abstract_only:
    return graphdef, jax.eval_shape(init, init_params, root), state_shardings
  with jax.set_mesh(mesh):
    # Initialisers need no backend optimisation (registry.materialize).
    compiled = jax.jit(init, out_shardings=state_shardings).lower(init_params, root).compile(
        compiler_options={'xla_backend_optimization_level': 0})
    state = compiled(init_params, root)
  return graphdef, state, state_shardings


def abstract_train_state(config, num_classes, mesh, rules):
  """(graphdef, TrainState of ShapeDtypeStructs, shardings): a restore target, nothing computed."""
  return create_train_state(config, num_classes, mesh, rules, abstract_only=True)


def train_state_shardings(abstract_params: nnx.State, tx: optax.GradientTransformation, mesh,
                          rules) -> TrainState:
  """Shardings of a TrainState from the student's (abstract) params.

  Params and EMA (same structure) by the rules; the optimizer state's copies of
  the params (momentum, Adam moments) as the params; its other leaves (step
  counts) and step and rng replicated.
  """
  param_sh = sharding.param_shardings(abstract_params, mesh, rules)
  replicated = sharding.replicated(mesh)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params),
                                 param_sh, transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, ema_params=param_sh, opt_state=opt_sh,
                    rng=replicated)
