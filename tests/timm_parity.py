"""Shared pieces of the backbone parity tests against timm (test_vit, test_convnext)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch


def perturb_(model: torch.nn.Module, seed: int):
  """Random LayerNorm weights, layer scales and biases, so none is trivially 1, 0 or 1e-6."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name or name.endswith(('bias', 'gamma')):
        base = 1.0 if name.endswith('weight') else 0.0
        p.copy_(base + 0.5 * torch.randn(p.shape, generator=gen))


def random_backbone(create, seed: int):
  """The module `create()` builds, with numpy-random weights (no initialiser to compile).

  Kernels ~ N(0, 0.02), LayerNorm scales ~ 1 + N(0, 0.5), everything else ~ N(0, 0.5).
  """
  graphdef, state = nnx.split(nnx.eval_shape(create))
  gen = np.random.default_rng(seed)
  leaves = []
  for path, var in nnx.to_flat_state(state):
    std, base = {'kernel': (0.02, 0.0), 'scale': (0.5, 1.0)}.get(path[-1], (0.5, 0.0))
    value = base + std * gen.standard_normal(var.shape, dtype=np.float32)
    leaves.append((path, var.replace(jnp.asarray(value, jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


@nnx.jit(static_argnames='train')
def forward(model, x, rng=None, train=False):
  return model(x, train=train, rng=rng)


@nnx.jit
def eval_and_train(model, x, rng):
  """Eval without and with an rng, then training under two rngs: one compile."""
  return (model(x), model(x, train=False, rng=rng), model(x, train=True, rng=rng),
          model(x, train=True, rng=jax.random.fold_in(rng, 1)))


def nhwc(x_nchw: torch.Tensor) -> jax.Array:
  return jnp.asarray(x_nchw.numpy().transpose(0, 2, 3, 1))


def to_torch(sd: dict) -> dict:
  return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def timm_reference(model_name: str):
  """A timm model with random, perturbed weights: (state dict, input batch, its output)."""
  torch.manual_seed(0)
  model = timm.create_model(model_name, pretrained=False, num_classes=0).eval()
  perturb_(model, seed=1)
  x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    out = model(x).numpy()
  sd = {k: v.numpy().copy() for k, v in model.state_dict().items()}
  return sd, x, out
