"""Train/validation/test partitions: seeded group splits and the reference's lists.

A seeded split keeps every group (a patient) in one split, takes the groups in
a permutation drawn from a fixed seed over their sorted names, and fills the
splits in order up to their share of images. The result depends only on the
set of groups, the seed and the fractions, not on file order or the machine.
"""

import collections
import os
import re
from typing import Sequence

import numpy as np

from input_pipeline.datasets import label_files

# The one seed of every seeded split in this package; changing it re-partitions.
SPLIT_SEED = 0


def assign_by_group(groups: Sequence[str], fractions: Sequence[tuple[str, float]],
                    seed: int = SPLIT_SEED) -> list[str]:
  """Assigns each item to a split, keeping the items of a group together.

  Args:
    groups: one group key (e.g. patient id) per item.
    fractions: (split name, share of the items), shares summing to 1.
    seed: the permutation seed.

  Returns:
    The split name of each item, in the order of `groups`.
  """
  counts = collections.Counter(groups)
  names = sorted(counts)
  order = np.random.default_rng(seed).permutation(len(names))
  total = len(groups)
  bounds = np.rint(np.cumsum([share for _, share in fractions]) * total)
  split_of, seen = {}, 0
  for index in order:
    group = names[index]
    k = int(np.searchsorted(bounds, seen, side='right'))
    split_of[group] = fractions[min(k, len(fractions) - 1)][0]
    seen += counts[group]
  return [split_of[g] for g in groups]


def read_reference_lists(directory: str, files: dict[str, str]) -> dict[str, str]:
  """Reads the reference's split lists (ARK_SPEC §4): image name → split.

  Each non-blank line starts with an image name, then labels separated by
  spaces or commas; only the name's base name is kept (the reference prefixes
  folders of its own).

  Args:
    directory: the folder holding the lists (--split_files_dir).
    files: split name → file name in that folder.

  Returns:
    base name of each listed image → split name.

  Raises:
    DatasetError: a list file is missing.
    LabelFileError: an image listed in two splits.
  """
  split_of, where = {}, {}
  for split, file_name in files.items():
    path = label_files.find_file(directory, file_name)
    for line, text in label_files.read_lines(path):
      name = os.path.basename(re.split(r'[,\s]+', text)[0])
      if name in split_of and split_of[name] != split:
        raise label_files.LabelFileError(
            path, f'{name} is also listed for {split_of[name]!r} in {where[name]}', line)
      split_of[name], where[name] = split, f'{path} line {line}'
  return split_of
