r"""Writes the Fashion-MNIST subset that ships with the repository.

The demo datasets (fashion_mosaic.py) use the full Fashion-MNIST when Debian's
`dataset-fashion-mnist` is installed, else this subset, so that a fresh
machine, CI included, builds them offline. Run once where the package is
installed; the output is committed:

  python -m input_pipeline.datasets.make_demo_subset \
      [--source_dir=/usr/share/datasets/fashion-mnist] [--output=...]

The subset is class-balanced and seeded, so rerunning it rewrites the same
images (the .npz bytes may differ with the numpy version, the arrays do not).
"""

from absl import app
from absl import flags
import numpy as np

from input_pipeline.datasets import fashion_mosaic

_SOURCE_DIR = flags.DEFINE_string('source_dir', fashion_mosaic.FASHION_MNIST_DIR,
                                  'Folder holding the four Fashion-MNIST IDX .gz files.')
_OUTPUT = flags.DEFINE_string('output', fashion_mosaic.SUBSET_PATH, 'The .npz to write.')
# 600 + 200 images per class: 3.5 MB compressed, enough distinct items for
# four disjoint pools of 1,500 train and 500 evaluation images.
_TRAIN_PER_CLASS = flags.DEFINE_integer('train_per_class', 600, 'Train images per class.')
_TEST_PER_CLASS = flags.DEFINE_integer('test_per_class', 200, 'Test images per class.')

SEED = 0


def balanced_subset(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
  """Sorted indices of `per_class` randomly chosen examples of each class."""
  chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
            for c in range(len(fashion_mosaic.CLASS_NAMES))]
  return np.sort(np.concatenate(chosen))


def main(argv):
  del argv
  full = fashion_mosaic.read_fashion_mnist(_SOURCE_DIR.value)
  rng = np.random.default_rng(SEED)
  arrays = {}
  for split, per_class in (('train', _TRAIN_PER_CLASS.value), ('test', _TEST_PER_CLASS.value)):
    images, labels = full[split]
    index = balanced_subset(labels, per_class, rng)
    # The original indices make the subset traceable to the published files.
    arrays.update({f'{split}_images': images[index], f'{split}_labels': labels[index],
                   f'{split}_index': index.astype(np.int32)})
  np.savez_compressed(_OUTPUT.value, **arrays)
  print(f'Wrote {_OUTPUT.value}: ' + ', '.join(f'{k} {v.shape}' for k, v in arrays.items()))


if __name__ == '__main__':
  app.run(main)
