"""The demo run every ablation varies (configs/ablations/*.py).

configs/demo.py shortened to ABLATION_EPOCHS epochs, so that the committed
script (scripts/ablations.py) can run each comparison over three seeds on a
2-core CPU within about an hour; everything else is the demo's recipe.
"""

import ml_collections

from configs import demo

ABLATION_EPOCHS = 2  # epochs of every ablation run (the demo: 4)


def get_config(schedule: str = 'cyclic') -> ml_collections.ConfigDict:
  c = demo.get_config(schedule)
  c.num_epochs = ABLATION_EPOCHS
  c.progress_bar = False  # the script runs many; their logs are enough
  return c
