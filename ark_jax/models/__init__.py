"""Backbones (Swin, ViT, ConvNeXt) and the Ark model.

Parameters carry logical axis names as metadata; ark_jax/sharding.py turns them
into shardings and the state is created sharded by jax.jit(out_shardings=...).
Flax's eager sharding (placing each variable at creation, which needs a mesh
in scope) is therefore switched off, so models also build outside any mesh.
"""

from flax import nnx

nnx.use_eager_sharding(False)
