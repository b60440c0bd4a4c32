"""Label policies: how stored raw labels become training targets, at load time.

Builders store labels as the source gives them (DESIGN.md section 4, decision
4): 1 positive, 0 negative, -1 uncertain, NaN blank (not mentioned). A policy,
chosen per dataset in the config, resolves them when examples are read, so a
change of policy needs no re-preparation:

  uncertain (-1): 'ones' | 'zeros' | 'ignore' | 'lsr_ones'
  blank (NaN):    'zeros' | 'ignore'

'ignore' keeps the entry out of the loss (label_mask 0). 'lsr_ones' is the
reference's label-smoothing-to-ones for CheXpert: U(0.55, 0.85), drawn once per
(example, label) as the reference draws once when it loads the CSV. The draw is
a hash of (seed, example index, class) rather than a stateful generator, so it
is the same on every load, in every worker and after a resume, in any order.

Outputs are padded to the largest label set of the run (Cmax); padded entries
have label 0 and mask 0. Shape suffixes: N examples, C classes, M = Cmax.
"""

import dataclasses
import zlib

import numpy as np

UNCERTAIN_POLICIES = ('ones', 'zeros', 'ignore', 'lsr_ones')
BLANK_POLICIES = ('zeros', 'ignore')
# The reference's LSR-Ones interval (ARK_SPEC.md section 3, CheXpert).
LSR_LOW, LSR_HIGH = 0.55, 0.85


@dataclasses.dataclass(frozen=True)
class LabelPolicy:
  """What to do with uncertain (-1) and blank (NaN) raw labels."""
  uncertain: str = 'zeros'
  blank: str = 'zeros'

  def __post_init__(self):
    if self.uncertain not in UNCERTAIN_POLICIES:
      raise ValueError(f'Unknown uncertain-label policy {self.uncertain!r}; '
                       f'known: {UNCERTAIN_POLICIES}.')
    if self.blank not in BLANK_POLICIES:
      raise ValueError(f'Unknown blank-label policy {self.blank!r}; known: {BLANK_POLICIES}.')


# The reference's choices (ARK_SPEC.md section 9, pitfalls 9 and 10); every
# other dataset has no uncertain labels, and blank means 'not found'.
DEFAULT_POLICIES = {
    'chexpert': LabelPolicy(uncertain='lsr_ones', blank='zeros'),
    'mimic_cxr': LabelPolicy(uncertain='ones', blank='zeros'),
}


def policy_for(name: str, overrides=None) -> LabelPolicy:
  """The policy of dataset `name`: the config's override, else the default.

  Args:
    name: TFDS name of the dataset.
    overrides: optional mapping name -> LabelPolicy, or name -> mapping with
      keys 'uncertain' and/or 'blank', or name -> 'UNCERTAIN,BLANK' string
      (the form that fits on a command line, e.g. 'ignore,zeros').

  Returns:
    The LabelPolicy to apply.
  """
  default = DEFAULT_POLICIES.get(name, LabelPolicy())
  spec = (overrides or {}).get(name)
  if spec is None:
    return default
  if isinstance(spec, LabelPolicy):
    return spec
  if isinstance(spec, str):
    uncertain, _, blank = spec.partition(',')
    return LabelPolicy(uncertain.strip() or default.uncertain, blank.strip() or default.blank)
  spec = dict(spec)
  unknown = set(spec) - {'uncertain', 'blank'}
  if unknown:
    raise ValueError(f'Label policy for {name!r} has unknown keys {sorted(unknown)}; '
                     "known: ['blank', 'uncertain'].")
  return dataclasses.replace(default, **spec)


def dataset_seed(seed: int, name: str) -> int:
  """A per-dataset seed that does not change when the dataset order does."""
  return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """A well-mixed 64-bit hash (Steele et al.'s SplitMix64 finaliser)."""
  x = x + np.uint64(0x9E3779B97F4A7C15)
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def lsr_draws(seed: int, index_N, num_classes: int) -> np.ndarray:
  """U(0.55, 0.85) per (example, class), a pure function of its arguments.

  Args:
    seed: the dataset's seed (see `dataset_seed`).
    index_N: int or int array of example indices within the dataset split.
    num_classes: C.

  Returns:
    float32 [*index.shape, C].
  """
  index = np.asarray(index_N, dtype=np.uint64)[..., None]
  classes = np.arange(num_classes, dtype=np.uint64)
  key = _splitmix64(np.full((1,), seed, dtype=np.uint64))
  bits = _splitmix64(_splitmix64(key + index) + classes)
  # The top 53 bits give a double in [0, 1) with no rounding bias.
  u = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53
  return (LSR_LOW + (LSR_HIGH - LSR_LOW) * u).astype(np.float32)


def apply_policy(raw_NxC, policy: LabelPolicy, num_classes_max: int, *, seed: int = 0,
                 index_N=0) -> tuple[np.ndarray, np.ndarray]:
  """Resolves raw labels into padded training targets and a loss mask.

  Args:
    raw_NxC: float array [..., C] of raw labels (1, 0, -1, NaN); a single
      example [C] works too.
    policy: what to do with -1 and NaN.
    num_classes_max: M >= C, the padded width.
    seed: the dataset's seed, used by 'lsr_ones' only.
    index_N: the examples' indices in their split (int or int array matching
      the leading shape of raw), used by 'lsr_ones' only.

  Returns:
    (labels, label_mask), both float32 [..., M].
  """
  raw = np.asarray(raw_NxC, dtype=np.float32)
  num_classes = raw.shape[-1]
  if num_classes > num_classes_max:
    raise ValueError(f'{num_classes} labels do not fit in num_classes_max={num_classes_max}.')
  blank = np.isnan(raw)
  uncertain = raw == -1
  labels = np.where(blank | uncertain, 0.0, raw).astype(np.float32)
  mask = np.ones_like(labels)
  if policy.uncertain == 'ones':
    labels[uncertain] = 1.0
  elif policy.uncertain == 'lsr_ones':
    if uncertain.any():
      labels = np.where(uncertain, lsr_draws(seed, index_N, num_classes), labels)
  elif policy.uncertain == 'ignore':
    mask[uncertain] = 0.0
  if policy.blank == 'ignore':
    mask[blank] = 0.0
  # Zeros then a slice: np.pad cost a tenth of a 256-px example's read time.
  labels_M = np.zeros(raw.shape[:-1] + (num_classes_max,), np.float32)
  mask_M = np.zeros_like(labels_M)
  labels_M[..., :num_classes] = labels
  mask_M[..., :num_classes] = mask
  return labels_M, mask_M
