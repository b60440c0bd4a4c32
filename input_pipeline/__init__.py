"""Input pipeline: official dataset files → TFDS ArrayRecord → Grain batches.

`prepare` turns an official download into pre-resized ArrayRecord shards (one
TFDS builder per dataset, under `datasets/`); `images` reads one image file of
any supported format into grey uint8; `pipeline` and `labels` feed training.
"""
