"""On-device views of the Ark+ train step: pure, jittable JAX over uint8 batches.

The host ships the stored grey image, uint8 [B, R, R]; the jitted step turns it
into the two float32 NHWC model inputs (ARK_SPEC §3, DESIGN §1):

- teacher view: the whole image resized R -> S, no augmentation;
- student view: albumentations 0.4.3's RandomResizedCrop(S, S) then
  ShiftScaleRotate(rotate_limit=10, p=0.5) then
  OneOf([RandomBrightnessContrast, RandomGamma], p=0.3).

Both end in /255, ImageNet normalisation and grey -> 3 channels.

Coordinate convention (as cv2.warpAffine / cv2.resize, hence albumentations):
pixel (row y, column x) has its centre at the point (x, y); affine matrices act
on column vectors (x, y, 1). `sample_affine` takes the matrix that maps an
OUTPUT pixel to the INPUT point it samples (cv2's WARP_INVERSE_MAP direction),
so the crop and the shift-scale-rotate compose by matrix product into one
matrix per example and the student view costs one bilinear gather.

Differences from the reference, all sub-pixel or at the image edge:
- The crop and the rotation are sampled once from the R x R image instead of
  resampling the S x S crop again. Where the rotation looks past the crop's
  edge we therefore see the real image around the crop (reflected only at the
  R x R border) instead of the crop reflected; and near the crop edge, cv2's
  resize would clamp to the crop while we interpolate with the pixel beyond it.
- Bilinear weights are exact float32 (cv2 rounds them to 1/32 pixel for uint8)
  and intermediate results stay float (albumentations rounds to uint8 after
  each transform).
- The teacher resize is bilinear without antialiasing; the reference uses
  PIL's antialiased bicubic. For R = 896 -> S = 768 (factor 1.17) the
  difference is a slight change of sharpness.

Shape suffixes: B batch, R stored (input) side, S output side, N = S*S pixels.
"""

import math

import jax
import jax.numpy as jnp

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# albumentations 0.4.3 defaults used by Ark+ (ARK_SPEC §3).
CROP_SCALE = (0.08, 1.0)  # fraction of the image area
CROP_RATIO = (3 / 4, 4 / 3)  # width / height, drawn log-uniform
CROP_ATTEMPTS = 10  # draws before the centre-crop fallback
SSR_PROB = 0.5
SSR_SHIFT = 0.0625  # fraction of the side
SSR_SCALE = 0.1  # zoom factor in 1 +- this
SSR_ROTATE = 10.0  # degrees
COLOR_PROB = 0.3  # probability of OneOf(brightness/contrast, gamma)
BRIGHTNESS = 0.2  # additive, fraction of the maximum value
CONTRAST = 0.2  # multiplicative, 1 +- this
GAMMA = (0.8, 1.2)


def normalize(x_BxSxS: jax.Array) -> jax.Array:
  """ImageNet-normalises grey values in [0, 1] into 3 identical channels.

  Args:
    x_BxSxS: float grey image with values in [0, 1].

  Returns:
    float32 [B, S, S, 3]: (x - mean_c) / std_c for each ImageNet channel c.
  """
  mean_1x1x1x3 = jnp.asarray(IMAGENET_MEAN, jnp.float32).reshape(1, 1, 1, 3)
  std_1x1x1x3 = jnp.asarray(IMAGENET_STD, jnp.float32).reshape(1, 1, 1, 3)
  x_BxSxSx1 = x_BxSxS.astype(jnp.float32)[..., None]
  return (x_BxSxSx1 - mean_1x1x1x3) / std_1x1x1x3


def teacher_view(image_BxRxR: jax.Array, size: int) -> jax.Array:
  """The teacher's input: the whole image resized to `size`, normalised.

  Bilinear with half-pixel centres (as cv2.resize), no antialiasing: Ark+
  shrinks by only 896 -> 768. jax.image.resize is separable (two small matmuls
  per image), cheaper on accelerators than a gather.

  Args:
    image_BxRxR: uint8 grey images.
    size: output side S (static).

  Returns:
    float32 [B, S, S, 3].
  """
  batch = image_BxRxR.shape[0]
  x_BxSxS = jax.image.resize(image_BxRxR.astype(jnp.float32), (batch, size, size),
                             method='linear', antialias=False)
  return normalize(jnp.clip(x_BxSxS / 255.0, 0.0, 1.0))


def _reflect101(index: jax.Array, n: int) -> jax.Array:
  """Folds integer indices into [0, n) as cv2's BORDER_REFLECT_101 (gfedcb|abcdefgh|gfedcba)."""
  # Reflect-101 is symmetric about 0 and periodic with period 2(n - 1).
  period = max(2 * (n - 1), 1)
  index = jnp.abs(index) % period
  return jnp.where(index >= n, period - index, index)


def sample_affine(image_BxRxR: jax.Array, affine_BxKx3: jax.Array, size: int) -> jax.Array:
  """Bilinear warp of each image by its own affine map, with reflect-101 borders.

  Same result as cv2.warpAffine(image, affine[:2], (size, size),
  flags=INTER_LINEAR | WARP_INVERSE_MAP, borderMode=BORDER_REFLECT_101) up to
  cv2's 1/32-pixel weight rounding.

  Args:
    image_BxRxR: grey images (any real dtype; uint8 is gathered as uint8).
    affine_BxKx3: K = 2 or 3; rows 0-1 map an output pixel centre (x, y, 1) to
      the input point sampled, both in pixel coordinates (centre of pixel
      [row y, column x] at (x, y)).
    size: output side S (static).

  Returns:
    float32 [B, S, S] in the units of the input (0..255 for uint8).
  """
  batch, rows, cols = image_BxRxR.shape
  affine_BxKx3 = affine_BxKx3.astype(jnp.float32)
  grid = jnp.arange(size, dtype=jnp.float32)
  ys_1xSxS, xs_1xSxS = (g[None] for g in jnp.meshgrid(grid, grid, indexing='ij'))

  # Elementwise rather than a matmul: TPUs run f32 matmuls in bf16 by default,
  # far too coarse for coordinates up to ~900.
  def row(k):
    a_Bx1x1 = affine_BxKx3[:, k, :, None, None]
    return a_Bx1x1[:, 0] * xs_1xSxS + a_Bx1x1[:, 1] * ys_1xSxS + a_Bx1x1[:, 2]

  src_x_BxSxS, src_y_BxSxS = row(0), row(1)
  x0_BxSxS = jnp.floor(src_x_BxSxS)
  y0_BxSxS = jnp.floor(src_y_BxSxS)
  wx_BxSxS = src_x_BxSxS - x0_BxSxS
  wy_BxSxS = src_y_BxSxS - y0_BxSxS
  x0_BxSxS = x0_BxSxS.astype(jnp.int32)
  y0_BxSxS = y0_BxSxS.astype(jnp.int32)

  flat_BxRR = image_BxRxR.reshape(batch, rows * cols)

  def tap(dy, dx):
    yi = _reflect101(y0_BxSxS + dy, rows)
    xi = _reflect101(x0_BxSxS + dx, cols)
    idx_BxN = (yi * cols + xi).reshape(batch, size * size)
    vals_BxN = jnp.take_along_axis(flat_BxRR, idx_BxN, axis=1)
    return vals_BxN.reshape(batch, size, size).astype(jnp.float32)

  top = (1 - wx_BxSxS) * tap(0, 0) + wx_BxSxS * tap(0, 1)
  bottom = (1 - wx_BxSxS) * tap(1, 0) + wx_BxSxS * tap(1, 1)
  return (1 - wy_BxSxS) * top + wy_BxSxS * bottom


def sample_crop_boxes(rng: jax.Array, batch: int, in_size: int,
                      scale: tuple[float, float] = CROP_SCALE,
                      ratio: tuple[float, float] = CROP_RATIO,
                      attempts: int = CROP_ATTEMPTS) -> jax.Array:
  """Random resized crop boxes as albumentations 0.4.3 (torchvision) draws them.

  Each example draws `attempts` candidates (area fraction U(scale), aspect
  w/h log-uniform in `ratio`, sides rounded); the first that fits is used,
  at an offset uniform over the integer positions. If none fits, the
  fallback is the centre crop of the largest in-ratio box (the whole image
  for square inputs). Vectorised: all candidates drawn at once.

  Args:
    rng: PRNG key.
    batch: B (static).
    in_size: R, side of the square input (static).
    scale: range of the crop's fraction of the image area.
    ratio: range of the crop's width / height.
    attempts: candidates per example.

  Returns:
    float32 [B, 4]: (x0, y0, w, h) in whole pixels; the crop is columns
    x0 .. x0+w-1 and rows y0 .. y0+h-1.
  """
  u_Bx2A2 = jax.random.uniform(rng, (batch, 2 * attempts + 2))  # one draw: cheap to compile
  lerp = lambda u, lo, hi: lo + (hi - lo) * u
  target_BxA = in_size * in_size * lerp(u_Bx2A2[:, :attempts], *scale)
  log_ratio_BxA = lerp(u_Bx2A2[:, attempts:2 * attempts], math.log(ratio[0]), math.log(ratio[1]))
  aspect_BxA = jnp.exp(log_ratio_BxA)
  w_BxA = jnp.round(jnp.sqrt(target_BxA * aspect_BxA))
  h_BxA = jnp.round(jnp.sqrt(target_BxA / aspect_BxA))
  fits_BxA = (w_BxA > 0) & (w_BxA <= in_size) & (h_BxA > 0) & (h_BxA <= in_size)
  first_B = jnp.argmax(fits_BxA, axis=1)  # index of the first True (0 if none)
  pick = lambda v_BxA: jnp.take_along_axis(v_BxA, first_B[:, None], axis=1)[:, 0]

  # Fallback of a square image (in_ratio = 1), decided statically.
  if 1.0 < min(ratio):
    fallback_w, fallback_h = in_size, round(in_size / min(ratio))
  elif 1.0 > max(ratio):
    fallback_w, fallback_h = round(in_size * max(ratio)), in_size
  else:
    fallback_w, fallback_h = in_size, in_size
  any_fits_B = jnp.any(fits_BxA, axis=1)
  w_B = jnp.where(any_fits_B, pick(w_BxA), float(fallback_w))
  h_B = jnp.where(any_fits_B, pick(h_BxA), float(fallback_h))

  # random.randint(0, R - w) is inclusive: R - w + 1 positions.
  x0_B = jnp.floor(u_Bx2A2[:, -2] * (in_size - w_B + 1))
  y0_B = jnp.floor(u_Bx2A2[:, -1] * (in_size - h_B + 1))
  x0_B = jnp.where(any_fits_B, jnp.minimum(x0_B, in_size - w_B), (in_size - w_B) // 2)
  y0_B = jnp.where(any_fits_B, jnp.minimum(y0_B, in_size - h_B), (in_size - h_B) // 2)
  return jnp.stack([x0_B, y0_B, w_B, h_B], axis=1)


def crop_affine(box_Bx4: jax.Array, out_size: int) -> jax.Array:
  """Output -> input map of cropping `box` and resizing it to out_size (cv2.resize).

  cv2.resize's half-pixel rule: x_in = x0 + (x_out + 0.5) * w / S - 0.5.

  Args:
    box_Bx4: (x0, y0, w, h) per example, as from `sample_crop_boxes`.
    out_size: S (static).

  Returns:
    float32 [B, 3, 3].
  """
  x0_B, y0_B, w_B, h_B = (box_Bx4[:, i].astype(jnp.float32) for i in range(4))
  sx_B, sy_B = w_B / out_size, h_B / out_size
  zero_B, one_B = jnp.zeros_like(sx_B), jnp.ones_like(sx_B)
  rows = [[sx_B, zero_B, x0_B + 0.5 * sx_B - 0.5],
          [zero_B, sy_B, y0_B + 0.5 * sy_B - 0.5],
          [zero_B, zero_B, one_B]]
  return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=1)


def sample_ssr_params(rng: jax.Array, batch: int, p: float = SSR_PROB) -> tuple[jax.Array, ...]:
  """ShiftScaleRotate draws, with the identity where the transform is skipped.

  Args:
    rng: PRNG key.
    batch: B (static).
    p: probability of applying the transform to an example.

  Returns:
    (angle_B in degrees, scale_B, dx_B, dy_B in fractions of the side).
  """
  u_Bx5 = jax.random.uniform(rng, (batch, 5))
  u = lambda i, lo, hi: lo + (hi - lo) * u_Bx5[:, i]
  apply_B = u_Bx5[:, 0] < p
  angle_B = jnp.where(apply_B, u(1, -SSR_ROTATE, SSR_ROTATE), 0.0)
  scale_B = jnp.where(apply_B, u(2, 1 - SSR_SCALE, 1 + SSR_SCALE), 1.0)
  dx_B = jnp.where(apply_B, u(3, -SSR_SHIFT, SSR_SHIFT), 0.0)
  dy_B = jnp.where(apply_B, u(4, -SSR_SHIFT, SSR_SHIFT), 0.0)
  return angle_B, scale_B, dx_B, dy_B


def ssr_affine(angle_B: jax.Array, scale_B: jax.Array, dx_B: jax.Array, dy_B: jax.Array,
               size: int) -> jax.Array:
  """Output -> input map of albumentations' shift_scale_rotate on an S x S image.

  albumentations warps with M = cv2.getRotationMatrix2D((S/2, S/2), angle,
  scale) plus a shift (dx*S, dy*S), mapping input -> output; positive angles
  turn the picture counter-clockwise as displayed. We return the inverse of M.

  Args:
    angle_B: rotation in degrees.
    scale_B: zoom factor.
    dx_B, dy_B: shift as fractions of the side.
    size: S (static).

  Returns:
    float32 [B, 3, 3].
  """
  theta_B = jnp.deg2rad(angle_B.astype(jnp.float32))
  alpha_B = scale_B * jnp.cos(theta_B)
  beta_B = scale_B * jnp.sin(theta_B)
  c = size / 2  # cv2/albumentations rotate about (w/2, h/2), not (w-1)/2
  tx_B = (1 - alpha_B) * c - beta_B * c + dx_B * size
  ty_B = beta_B * c + (1 - alpha_B) * c + dy_B * size
  # Inverse of [[a, b, tx], [-b, a, ty]]: [[a, -b], [b, a]] / (a^2 + b^2), and
  # the translation mapped back through it.
  det_B = alpha_B**2 + beta_B**2
  ia_B, ib_B = alpha_B / det_B, beta_B / det_B
  zero_B, one_B = jnp.zeros_like(ia_B), jnp.ones_like(ia_B)
  rows = [[ia_B, -ib_B, -(ia_B * tx_B - ib_B * ty_B)],
          [ib_B, ia_B, -(ib_B * tx_B + ia_B * ty_B)],
          [zero_B, zero_B, one_B]]
  return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=1)


def color_jitter(x_BxSxS: jax.Array, rng: jax.Array, p: float = COLOR_PROB) -> jax.Array:
  """OneOf([RandomBrightnessContrast(0.2, 0.2), RandomGamma((80, 120))], p).

  Values in [0, 1]. Brightness/contrast is albumentations 0.4.3's
  x * alpha + beta (brightness_by_max: beta is a fraction of the maximum),
  alpha in 1 +- CONTRAST, beta in +- BRIGHTNESS; gamma is x ** g, g in GAMMA.
  Each example is changed with probability p, by one of the two chosen 50/50.

  Args:
    x_BxSxS: float images in [0, 1].
    rng: PRNG key.
    p: probability of changing an example.

  Returns:
    float32 [B, S, S], clipped to [0, 1].
  """
  batch = x_BxSxS.shape[0]
  u_Bx5x1x1 = jax.random.uniform(rng, (batch, 5, 1, 1))
  u = lambda i, lo, hi: lo + (hi - lo) * u_Bx5x1x1[:, i]
  apply_Bx1x1 = u_Bx5x1x1[:, 0] < p
  use_bc_Bx1x1 = u_Bx5x1x1[:, 1] < 0.5
  alpha_Bx1x1 = u(2, 1 - CONTRAST, 1 + CONTRAST)
  beta_Bx1x1 = u(3, -BRIGHTNESS, BRIGHTNESS)
  gamma_Bx1x1 = u(4, *GAMMA)
  x_BxSxS = jnp.clip(x_BxSxS.astype(jnp.float32), 0.0, 1.0)  # x ** g needs x >= 0
  jittered = jnp.where(use_bc_Bx1x1, x_BxSxS * alpha_Bx1x1 + beta_Bx1x1,
                       x_BxSxS**gamma_Bx1x1)
  return jnp.clip(jnp.where(apply_Bx1x1, jittered, x_BxSxS), 0.0, 1.0)


def student_view(image_BxRxR: jax.Array, size: int, rng: jax.Array,
                 crop_scale: tuple[float, float] = CROP_SCALE) -> jax.Array:
  """The student's input: crop, shift-scale-rotate, colour; normalised.

  Same `rng` gives the same views (the trainer passes fold_in(rng, step), so a
  resumed run replays its augmentations).

  Args:
    image_BxRxR: uint8 grey images.
    size: output side S (static).
    rng: PRNG key.
    crop_scale: the crop's area fraction range (the reference: 0.08 to 1).

  Returns:
    float32 [B, S, S, 3].
  """
  batch, in_size, _ = image_BxRxR.shape
  k_crop, k_ssr, k_color = jax.random.split(rng, 3)
  box_Bx4 = sample_crop_boxes(k_crop, batch, in_size, scale=tuple(crop_scale))
  # Output -> crop-resized image (S x S) -> stored image (R x R). HIGHEST: a
  # default-precision f32 matmul is bf16 on TPU, too coarse for pixel offsets.
  affine_Bx3x3 = jnp.matmul(crop_affine(box_Bx4, size),
                            ssr_affine(*sample_ssr_params(k_ssr, batch), size),
                            precision=jax.lax.Precision.HIGHEST)
  x_BxSxS = sample_affine(image_BxRxR, affine_Bx3x3, size) / 255.0
  return normalize(color_jitter(x_BxSxS, k_color))


def ten_crop(image_BxRxR: jax.Array, crop: int, resize: int | None = None) -> jax.Array:
  """The reference's test-time views: Resize(resize) then torchvision's TenCrop(crop).

  Order as torchvision.transforms.functional.ten_crop: top-left, top-right,
  bottom-left, bottom-right, centre, then the same five of the horizontally
  flipped image (so flipped top-left mirrors the original top-right). The
  resize is teacher_view's (bilinear, no antialiasing, not the reference's
  PIL resize), so the centre crop with crop == resize equals teacher_view.
  Crop offsets are static: one compiled program per (R, resize, crop).

  Args:
    image_BxRxR: uint8 (0..255) grey images; floats are read in the same units.
    crop: side S of each crop (static), at most the resized side.
    resize: side the image is resized to first (static); None keeps R.

  Returns:
    float32 [10, B, S, S, 3], T = 10 views of each image, normalised.
  """
  batch, in_size, _ = image_BxRxR.shape
  x_BxRxR = image_BxRxR.astype(jnp.float32)
  if resize is not None:
    x_BxRxR = jax.image.resize(x_BxRxR, (batch, resize, resize), method='linear',
                               antialias=False)
    in_size = resize
  x_BxRxR = jnp.clip(x_BxRxR / 255.0, 0.0, 1.0)
  if crop > in_size:
    raise ValueError(f'crop {crop} is bigger than the resized side {in_size}')
  far = in_size - crop
  # torchvision's center_crop: int(round(...)) is Python's round, half to even.
  mid = int(round(far / 2.0))
  corners = ((0, 0), (0, far), (far, 0), (far, far), (mid, mid))  # (top, left)

  def five(x_BxRxR):
    return [x_BxRxR[:, t:t + crop, l:l + crop] for t, l in corners]

  crops_BxSxS = five(x_BxRxR) + five(x_BxRxR[:, :, ::-1])
  x_TBxSxS = jnp.concatenate(crops_BxSxS, axis=0)  # normalise once, not ten times
  return normalize(x_TBxSxS).reshape(10, batch, crop, crop, 3)
