"""Ark model: stacked heads equal a per-head loop, padding is masked, reference init."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ark_jax.models import ark
from ark_jax.models import registry
from configs import ark6

NUM_CLASSES = (14, 14, 14, 3, 6, 1)


@pytest.fixture(scope='module')
def model():
  config = ark6.get_config('smoke')
  return registry.materialize(
      lambda: registry.create_model(config.model, NUM_CLASSES, rngs=nnx.Rngs(0)))


@pytest.fixture(scope='module')
def outputs(model):
  x = jax.random.normal(jax.random.key(0), (6, 64, 64, 3))
  return jax.jit(lambda m, x: m(x))(model, x)


def test_each_example_gets_its_own_head(model, outputs):
  z_BxP = np.asarray(outputs['z'], np.float64)
  kernel_DxPxC = np.asarray(model.heads.kernel[...], np.float64)
  bias_DxC = np.asarray(model.heads.bias[...], np.float64)
  dataset_id_B = np.array([0, 3, 5, 4, 1, 3])
  own_BxC = np.asarray(ark.select_head(outputs['logits'], jnp.asarray(dataset_id_B)))
  for b, d in enumerate(dataset_id_B):
    n = NUM_CLASSES[d]
    want = z_BxP[b] @ kernel_DxPxC[d, :, :n] + bias_DxC[d, :n]  # one head, one example
    np.testing.assert_allclose(own_BxC[b, :n], want, rtol=1e-4, atol=1e-5)
    assert np.all(own_BxC[b, n:] == ark.PADDED_LOGIT)


def test_padded_classes_are_masked(model, outputs):
  logits_BxDxC = np.asarray(outputs['logits'])
  mask_DxC = model.class_mask()
  assert mask_DxC.sum() == sum(NUM_CLASSES)
  assert np.all(logits_BxDxC[:, ~mask_DxC] == ark.PADDED_LOGIT)
  assert np.all(np.abs(logits_BxDxC[:, mask_DxC]) < 100)
  # Padded classes take no probability mass under softmax or sigmoid.
  probs = jax.nn.softmax(outputs['logits'][:, 3], axis=-1)
  np.testing.assert_allclose(np.asarray(probs[:, 3:]), 0)
  np.testing.assert_allclose(np.asarray(probs.sum(-1)), 1, rtol=1e-6)


def test_outputs_are_float32_features_projection_logits(model, outputs):
  assert outputs['features'].shape == (6, model.backbone.num_features)
  assert outputs['z'].shape == (6, 64)
  assert outputs['logits'].shape == (6, 6, 14)
  assert all(v.dtype == jnp.float32 for v in outputs.values())


def test_projector_and_heads_use_pytorch_default_init(model):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, as the reference's nn.Linear."""
  def check(values, fan_in):
    bound = fan_in ** -0.5
    values = np.asarray(values).ravel()
    assert np.abs(values).max() <= bound
    np.testing.assert_allclose(values.std(), bound / np.sqrt(3), rtol=0.1)  # uniform's std

  check(model.projector.fc1.kernel[...], model.backbone.num_features)
  check(model.heads.kernel[...], 64)
  check(model.heads.bias[...], 64)
  # Heads are independent draws, not copies of one another.
  kernel = np.asarray(model.heads.kernel[...])
  assert np.abs(kernel[0] - kernel[1]).max() > 0.01


def test_materialize_equals_eager_construction(model):
  config = ark6.get_config('smoke')
  eager = registry.create_model(config.model, NUM_CLASSES, rngs=nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(nnx.state(eager)), jax.tree.leaves(nnx.state(model))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_heads_carry_the_dataset_axis_name(model):
  names = model.heads.kernel.get_metadata()['out_sharding']
  assert names == ('dataset', 'proj', 'classes')


def test_create_model_covers_every_family():
  for arg in ('vit_small', 'convnext_tiny'):
    config = ark6.get_config(arg)
    m = nnx.eval_shape(lambda: registry.create_model(config.model, (3, 2), rngs=nnx.Rngs(0)))
    assert m.heads.kernel.shape == (2, 1376, 3)


def test_bad_head_sizes_and_model_name():
  config = ark6.get_config('smoke')
  with pytest.raises(ValueError, match='at least one class'):
    registry.create_model(config.model, (3, 0), rngs=nnx.Rngs(0))
  config.model.name = 'resnet'
  with pytest.raises(ValueError, match="config.model.name='resnet' is unknown"):
    registry.create_model(config.model, (3,), rngs=nnx.Rngs(0))


DEMO_LABELS = (('tshirt_top', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
                'sneaker', 'bag', 'ankle_boot'),
               ('tshirt_top', 'trouser', 'pullover', 'sneaker', 'bag'),
               ('shirt',), ('one', 'two', 'three_or_four'))


def test_union_head_index_matches_labels_by_name():
  union, index_DxC = ark.union_head_index(DEMO_LABELS, (10, 5, 1, 3))
  assert len(union) == 13  # the 10 items + the 3 counts; shared names counted once
  for names, row in zip(DEMO_LABELS, index_DxC):
    assert [union[i] for i in row[:len(names)]] == list(names)
  with pytest.raises(ValueError, match=r'head_labels\[2\] has 1 names, its head 2 classes'):
    ark.union_head_index(DEMO_LABELS, (10, 5, 2, 3))


def test_consolidated_head_shares_one_output_per_label_name():
  config = ark6.get_config('smoke')
  config.model.head_labels = DEMO_LABELS
  model = registry.materialize(
      lambda: registry.create_model(config.model, (10, 5, 1, 3), rngs=nnx.Rngs(0)))
  assert model.heads is None and model.head.kernel[...].shape == (64, 13)
  out = model(jax.random.normal(jax.random.key(1), (3, 64, 64, 3)))
  logits_BxDxC = np.asarray(out['logits'])
  want_BxU = np.asarray(out['z'], np.float64) @ np.asarray(model.head.kernel[...], np.float64) \
      + np.asarray(model.head.bias[...], np.float64)
  shirt, bag = 6, 8
  # 'shirt' of demo_multilabel and of demo_binary are the same output; 'bag' too.
  np.testing.assert_allclose(logits_BxDxC[:, 0, shirt], want_BxU[:, shirt], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(logits_BxDxC[:, 2, 0], logits_BxDxC[:, 0, shirt])
  np.testing.assert_array_equal(logits_BxDxC[:, 1, 4], logits_BxDxC[:, 0, bag])
  np.testing.assert_allclose(logits_BxDxC[:, 3, :3], want_BxU[:, 10:13], rtol=1e-4, atol=1e-5)
  assert np.all(logits_BxDxC[:, 2, 1:] == ark.PADDED_LOGIT)
  # Exported as the per-dataset heads it acts as (the reference layout has no union head).
  from ark_jax import interop  # pylint: disable=g-import-not-at-top
  sd = interop.ark_state_dict(model, 'ark')
  kernel_PxU = np.asarray(model.head.kernel[...])
  np.testing.assert_array_equal(sd['omni_heads.2.weight'], kernel_PxU[:, [shirt]].T)
  np.testing.assert_array_equal(sd['omni_heads.1.weight'], kernel_PxU[:, [0, 1, 2, 7, 8]].T)
  np.testing.assert_array_equal(sd['omni_heads.3.bias'], np.asarray(model.head.bias[...])[10:])
