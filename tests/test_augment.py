"""Tests of ark_jax/augment.py: exact geometry on known images, draw statistics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ark_jax import augment

# Jitted once: op-by-op dispatch is the slow part on CPU.
sample_affine = jax.jit(augment.sample_affine, static_argnums=2)
sample_crop_boxes = jax.jit(augment.sample_crop_boxes, static_argnums=(1, 2),
                            static_argnames=('scale',))
student_view = jax.jit(augment.student_view, static_argnums=1)
teacher_view = jax.jit(augment.teacher_view, static_argnums=1)
color_jitter = jax.jit(augment.color_jitter)
crop_affine = jax.jit(augment.crop_affine, static_argnums=1)
ssr_affine = jax.jit(augment.ssr_affine, static_argnums=4)

MEAN = np.asarray(augment.IMAGENET_MEAN, np.float32)
STD = np.asarray(augment.IMAGENET_STD, np.float32)


def _affine(*rows):
  """One 2x3 matrix as a batch of one."""
  return jnp.asarray([rows], jnp.float32)


def _gradient(rows, cols):
  """A linear image 3x + 5y + 7: bilinear sampling of it is exact."""
  y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
  return 3 * x + 5 * y + 7


def test_identity_affine_reproduces_input():
  image = np.random.default_rng(0).integers(0, 256, (2, 9, 9), dtype=np.uint8)
  eye = jnp.broadcast_to(jnp.eye(3), (2, 3, 3))
  out = sample_affine(jnp.asarray(image), eye, 9)
  assert out.dtype == jnp.float32 and out.shape == (2, 9, 9)
  np.testing.assert_array_equal(np.asarray(out), image.astype(np.float32))


def test_integer_translation_moves_pixels_exactly():
  image = np.random.default_rng(1).integers(0, 256, (1, 10, 10), dtype=np.uint8)
  # Output (x, y) samples input (x + 3, y - 2).
  out = np.asarray(sample_affine(jnp.asarray(image), _affine([1, 0, 3], [0, 1, -2]), 10))
  np.testing.assert_array_equal(out[0, 2:, :7], image[0, :8, 3:])


def test_reflect101_borders():
  # Every row is 10 20 30 40 50; shifts move along x only.
  image = jnp.asarray(np.tile(np.float32([10, 20, 30, 40, 50]), (1, 5, 1)))
  sample = lambda shift: np.asarray(
      sample_affine(image, _affine([1, 0, shift], [0, 1, 0]), 5))[0, 0]
  # Columns -2, -1 reflect to 2, 1 (the edge pixel is not repeated).
  np.testing.assert_array_equal(sample(-2.0)[:3], [30, 20, 10])
  # Columns 5, 6, 7 reflect to 3, 2, 1.
  np.testing.assert_array_equal(sample(3.0)[2:], [40, 30, 20])
  # Half a pixel left of column 0 interpolates column 0 with column -1 (= 1).
  np.testing.assert_allclose(sample(-0.5)[0], 15.0)
  np.testing.assert_array_equal(
      np.asarray(augment._reflect101(jnp.arange(-6, 11), 5)),
      [2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2])


def test_crop_at_scale_one_is_a_slice():
  image = _gradient(16, 16)[None]
  box = jnp.asarray([[2, 4, 8, 8]], jnp.float32)  # x0, y0, w, h
  out = np.asarray(sample_affine(jnp.asarray(image), crop_affine(box, 8), 8))
  np.testing.assert_allclose(out[0], image[0, 4:12, 2:10], rtol=0, atol=1e-4)


def test_crop_upsampled_follows_half_pixel_rule():
  # cv2.resize's rule x_in = x0 + (x_out + 0.5) * w / S - 0.5 (not corners-to-
  # corners): the top-left output pixel samples (1.75, 3.75), the bottom-right
  # one (9.25, 11.25), for a 2x upsample of the crop at (2, 4) of side 8.
  image = _gradient(16, 16)[None]
  box = jnp.asarray([[2, 4, 8, 8]], jnp.float32)
  out = np.asarray(sample_affine(jnp.asarray(image), crop_affine(box, 16), 16))
  y, x = np.mgrid[0:16, 0:16].astype(np.float32)
  expected = 3 * (2 + (x + 0.5) / 2 - 0.5) + 5 * (4 + (y + 0.5) / 2 - 0.5) + 7
  np.testing.assert_allclose(out[0], expected, rtol=0, atol=1e-3)
  np.testing.assert_allclose(out[0, 0, 0], 3 * 1.75 + 5 * 3.75 + 7, atol=1e-3)


def test_ssr_identity_and_inverse_of_cv2_matrix():
  zero, one = jnp.zeros(1), jnp.ones(1)
  np.testing.assert_allclose(np.asarray(ssr_affine(zero, one, zero, zero, 8))[0],
                             np.eye(3), atol=1e-6)
  # Against cv2.getRotationMatrix2D((S/2, S/2), angle, scale) + shift, written out.
  angle, scale, dx, dy, size = 7.0, 1.05, 0.03, -0.05, 64
  a, b = scale * np.cos(np.deg2rad(angle)), scale * np.sin(np.deg2rad(angle))
  c = size / 2
  forward = np.asarray([[a, b, (1 - a) * c - b * c + dx * size],
                        [-b, a, b * c + (1 - a) * c + dy * size], [0, 0, 1]])
  inverse = ssr_affine(jnp.asarray([angle]), jnp.asarray([scale]), jnp.asarray([dx]),
                               jnp.asarray([dy]), size)
  np.testing.assert_allclose(np.asarray(inverse)[0] @ forward, np.eye(3), atol=1e-5)


def test_ssr_rotation_by_90_degrees():
  size = 6
  image = np.random.default_rng(2).integers(0, 256, (1, size, size), dtype=np.uint8)
  affine = ssr_affine(jnp.asarray([90.0]), jnp.ones(1), jnp.zeros(1), jnp.zeros(1), size)
  out = np.asarray(sample_affine(jnp.asarray(image), affine, size))[0]
  # cv2 rotates about (S/2, S/2), counter-clockwise: out[y, x] = in[x, S - y];
  # column S is off the image and reflects to S - 2.
  for y in range(size):
    for x in range(size):
      col = size - y if y > 0 else size - 2
      assert out[y, x] == pytest.approx(float(image[0, x, col]), abs=1e-3), (y, x)


def test_crop_then_ssr_compose_in_one_matrix():
  image = _gradient(16, 16)[None]
  box = jnp.asarray([[2, 4, 8, 8]], jnp.float32)
  # Shift right by one pixel of the 8x8 crop: out[y, x] = crop[y, x - 1].
  ssr = ssr_affine(jnp.zeros(1), jnp.ones(1), jnp.asarray([1 / 8]), jnp.zeros(1), 8)
  affine = crop_affine(box, 8) @ ssr
  out = np.asarray(sample_affine(jnp.asarray(image), affine, 8))[0]
  np.testing.assert_allclose(out[:, 1:], image[0, 4:12, 2:9], atol=1e-4)


def test_normalize_and_teacher_view():
  x = jnp.full((1, 2, 2), 0.5)
  out = np.asarray(augment.normalize(x))
  assert out.shape == (1, 2, 2, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to((0.5 - MEAN) / STD, out.shape), atol=1e-6)

  constant = jnp.full((2, 12, 12), 200, jnp.uint8)
  teacher = np.asarray(teacher_view(constant, 8))
  assert teacher.shape == (2, 8, 8, 3) and teacher.dtype == np.float32
  np.testing.assert_allclose(teacher, np.broadcast_to((200 / 255 - MEAN) / STD, teacher.shape),
                             atol=1e-5)
  image = np.random.default_rng(3).integers(0, 256, (1, 8, 8), dtype=np.uint8)
  same = np.asarray(teacher_view(jnp.asarray(image), 8))
  np.testing.assert_allclose(same, (image[..., None] / 255 - MEAN) / STD, atol=1e-5)


def test_crop_boxes_statistics():
  size = 896
  box = np.asarray(sample_crop_boxes(jax.random.key(0), 1024, size))
  x0, y0, w, h = box.T
  assert np.all(x0 >= 0) and np.all(y0 >= 0)
  assert np.all(x0 + w <= size) and np.all(y0 + h <= size)
  assert np.all(x0 == np.round(x0)) and np.all(w == np.round(w))
  frac, aspect = w * h / size**2, w / h
  # Sides are rounded to whole pixels: 1% slack at R = 896.
  assert frac.min() >= 0.08 * 0.99 and frac.max() <= 1.0
  assert aspect.min() >= 0.75 * 0.99 and aspect.max() <= 4 / 3 * 1.01
  assert frac.min() < 0.1 and frac.max() > 0.9  # the whole range is used
  assert abs(np.mean(np.log(aspect))) < 0.02  # log-uniform about 1
  # Offsets spread over the free room, not pinned to a corner or the centre.
  rel = x0 / np.maximum(size - w, 1)
  assert 0.4 < rel.mean() < 0.6


def test_crop_fallback_is_whole_square_image():
  box = np.asarray(sample_crop_boxes(jax.random.key(1), 8, 32, scale=(1.5, 2.0)))
  np.testing.assert_array_equal(box, np.tile([0, 0, 32, 32], (8, 1)))


def test_color_jitter_applies_to_about_30_percent():
  batch = 10000
  x = jnp.full((batch, 2, 2), 0.5)
  out = np.asarray(color_jitter(x, jax.random.key(2)))
  changed = np.any(np.abs(out - 0.5) > 1e-6, axis=(1, 2))
  assert abs(changed.mean() - 0.3) < 0.02
  # Brightness/contrast stays within 0.5 * (1 +- 0.2) +- 0.2; gamma within
  # 0.5 ** (1.2, 0.8); one value per example.
  assert out.min() >= 0.2 - 1e-6 and out.max() <= 0.8 + 1e-6
  assert np.all(out == out[:, :1, :1])


def test_student_view():
  image = jnp.asarray(np.random.default_rng(4).integers(0, 256, (4, 24, 24), dtype=np.uint8))
  a = np.asarray(student_view(image, 16, jax.random.key(5)))
  b = np.asarray(student_view(image, 16, jax.random.key(5)))
  c = np.asarray(student_view(image, 16, jax.random.fold_in(jax.random.key(5), 1)))
  assert a.shape == (4, 16, 16, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert np.all(np.abs(a - c).max(axis=(1, 2, 3)) > 1e-3)
  assert np.all(np.isfinite(a))
  lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
  assert np.all(a >= lo - 1e-5) and np.all(a <= hi + 1e-5)
  np.testing.assert_allclose(a[..., 1], (a[..., 0] * STD[0] + MEAN[0] - MEAN[1]) / STD[1],
                             atol=1e-5)  # the same grey in every channel


def test_student_view_of_constant_image():
  # Geometry cannot change a constant image: only the ~30% colour-jittered
  # examples differ from the normalised constant.
  constant = jnp.full((256, 8, 8), 128, jnp.uint8)
  out = np.asarray(student_view(constant, 4, jax.random.key(6)))
  unchanged = np.all(np.abs(out - (128 / 255 - MEAN) / STD) < 1e-5, axis=(1, 2, 3))
  assert 0.6 < unchanged.mean() < 0.8


ten_crop = jax.jit(augment.ten_crop, static_argnums=(1, 2))


def _torchvision_ten_crop(image_RxR, crop):
  """The reference's TenCrop(crop), ToTensor, Normalize on one grey image, as [10, S, S, 3]."""
  torch = pytest.importorskip('torch')
  tvf = pytest.importorskip('torchvision.transforms.functional')
  x_3xRxR = torch.from_numpy(image_RxR.astype(np.float32) / 255).expand(3, -1, -1)
  crops = tvf.ten_crop(x_3xRxR, crop)
  views = [tvf.normalize(c, list(augment.IMAGENET_MEAN), list(augment.IMAGENET_STD))
           for c in crops]
  return np.stack([v.permute(1, 2, 0).numpy() for v in views])


# (R, S): odd and even margins; R - S = 5 puts torchvision's centre at round(2.5) = 2.
@pytest.mark.parametrize('side,crop', [(11, 6), (12, 6), (9, 9), (16, 7)])
def test_ten_crop_matches_torchvision(side, crop):
  image_BxRxR = np.random.default_rng(side).integers(0, 256, (2, side, side), dtype=np.uint8)
  out = np.asarray(ten_crop(jnp.asarray(image_BxRxR), crop, None))
  assert out.shape == (10, 2, crop, crop, 3) and out.dtype == np.float32
  for b in range(2):
    np.testing.assert_allclose(out[:, b], _torchvision_ten_crop(image_BxRxR[b], crop),
                               atol=1e-5, rtol=0)


def test_ten_crop_order_and_flip():
  # Pixel value = its column + 10 * row, so every crop is identified by its corner.
  rows, cols = np.mgrid[0:8, 0:8]
  image_1xRxR = (cols + 10 * rows).astype(np.uint8)[None]
  out = np.asarray(ten_crop(jnp.asarray(image_1xRxR), 5, None))[:, 0, :, :, 0]
  grey = np.rint((out * STD[0] + MEAN[0]) * 255).astype(int)
  top_left = [(0, 0), (0, 3), (3, 0), (3, 3), (2, 2)]  # (row, column); centre round(1.5) = 2
  for t, (r, c) in enumerate(top_left):
    np.testing.assert_array_equal(grey[t], image_1xRxR[0, r:r + 5, c:c + 5])
  # The flipped five are the same windows of the mirrored image: flipped
  # top-left is the mirrored top-right, but with an odd margin the flipped
  # centre is not the mirrored centre (column 2 of the mirror is column 1 + 5).
  mirrored_RxR = image_1xRxR[0, :, ::-1]
  for t, (r, c) in enumerate(top_left, start=5):
    np.testing.assert_array_equal(grey[t], mirrored_RxR[r:r + 5, c:c + 5])
  np.testing.assert_array_equal(grey[5], grey[1][:, ::-1])
  np.testing.assert_array_equal(grey[9], image_1xRxR[0, 2:7, 1:6][:, ::-1])


def test_ten_crop_centre_at_full_size_is_teacher_view():
  image = jnp.asarray(np.random.default_rng(7).integers(0, 256, (2, 20, 20), dtype=np.uint8))
  out = np.asarray(ten_crop(image, 12, 12))
  np.testing.assert_array_equal(out[4], np.asarray(teacher_view(image, 12)))
  np.testing.assert_array_equal(out[9], out[4][:, :, ::-1])
  # A smaller crop of the resized image is the matching window of teacher_view.
  small = np.asarray(ten_crop(image, 8, 12))
  np.testing.assert_array_equal(small[3], out[4][:, 4:, 4:])
