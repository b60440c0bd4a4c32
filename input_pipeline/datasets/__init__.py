"""The TFDS builders, registered on import, and their label metadata.

`import input_pipeline.datasets` registers 'chestxray14', 'chexpert',
'mimic_cxr', 'rsna_pneumonia', 'vindr_cxr', 'shenzhen_cxr' and the demo sets
('demo_multilabel', 'demo_subset', 'demo_binary', 'demo_count'),
so `tfds.builder(name, ...)` and `tfds.data_source(name, ...)` find them.
CSV-described sets (`csv_images`) are not registered: they are read back from
their prepared folder. `metadata(name)` gives a dataset's label names and task
without building or reading anything else.
"""

import dataclasses
import glob
import json
import os

from tensorflow_datasets.core import registered

from input_pipeline.datasets import chestxray14
from input_pipeline.datasets import chexpert
from input_pipeline.datasets import csv_images  # pylint: disable=unused-import
from input_pipeline.datasets import fashion_mosaic
from input_pipeline.datasets import mimic_cxr
from input_pipeline.datasets import rsna_pneumonia
from input_pipeline.datasets import shenzhen_cxr
from input_pipeline.datasets import vindr_cxr

# The official chest X-ray sets, read from a manual_dir, by TFDS name.
BUILDERS = {cls.name: cls for cls in (chestxray14.Chestxray14, chexpert.Chexpert,
                                      mimic_cxr.MimicCxr, rsna_pneumonia.RsnaPneumonia,
                                      vindr_cxr.VindrCxr, shenzhen_cxr.ShenzhenCxr)}
# The generated demo sets (no manual_dir), by TFDS name.
DEMO_BUILDERS = dict(fashion_mosaic.BUILDERS)


@dataclasses.dataclass(frozen=True)
class DatasetMetadata:
  """What a head needs to know about a dataset."""
  name: str
  label_names: tuple[str, ...]
  task: str  # 'multilabel' | 'multiclass' | 'binary'
  num_classes: int


def metadata(name: str, data_dir: str | None = None) -> DatasetMetadata:
  """Label names and task of a dataset, from its builder and/or prepared folder.

  Args:
    name: a TFDS name ('chexpert'); 'csv_images:NAME' is accepted for NAME.
    data_dir: where datasets are prepared. When it holds `name`, its stored
      metadata is read (the only source for CSV-described sets) and must agree
      with the registered builder's.

  Returns:
    The dataset's DatasetMetadata.

  Raises:
    ValueError: unknown name, or a prepared folder whose labels differ from
      the builder's (prepared by another version: prepare it again).
  """
  name = name.split(':', 1)[1] if name.startswith('csv_images:') else name
  stored = _stored_metadata(name, data_dir) if data_dir else None
  # The registry itself, not tfds.builder_cls: an unknown name there imports
  # every TFDS builder just to list them in the error.
  cls = registered._DATASET_REGISTRY.get(name)  # pylint: disable=protected-access
  if cls is not None and hasattr(cls, 'LABEL_NAMES'):
    label_names, task = tuple(cls.LABEL_NAMES), getattr(cls, 'TASK', 'multilabel')
    if stored and stored != (label_names, task):
      raise ValueError(f'{name} prepared in {data_dir} has labels {stored} but the builder has '
                       f'{(label_names, task)}; prepare it again')
  elif stored:
    label_names, task = stored
  else:
    where = f'nor prepared in {data_dir}' if data_dir else '(pass data_dir for CSV datasets)'
    raise ValueError(f'unknown dataset {name!r}: not a registered chest X-ray builder {where}; '
                     f'registered: {sorted(BUILDERS) + sorted(DEMO_BUILDERS)}')
  return DatasetMetadata(name, label_names, task, len(label_names))


def _stored_metadata(name: str, data_dir: str) -> tuple[tuple[str, ...], str] | None:
  """metadata.json of the prepared configs of `name`; they must agree."""
  found = {}
  for path in sorted(glob.glob(os.path.join(data_dir, name, '*', '*', 'metadata.json'))):
    with open(path) as f:
      stored = json.load(f)
    if 'label_names' in stored:
      found[path] = (tuple(stored['label_names']), stored.get('task', 'multilabel'))
  if len(set(found.values())) > 1:
    raise ValueError(f'{name}: prepared configs disagree on labels: {found}')
  return next(iter(found.values())) if found else None
