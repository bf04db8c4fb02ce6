"""Training data: random-access sources chosen by `config.data.name`, and the grain pipeline."""

from dit_jax.data.pipeline import build_train_iterator, real_images
from dit_jax.data.sources import (
  SOURCE_NAMES,
  DataError,
  Source,
  build_source,
  check_config,
  is_pixel_data,
  open_array,
  open_text,
  text_spec,
  wants_text,
)

__all__ = [
  "SOURCE_NAMES",
  "DataError",
  "Source",
  "build_source",
  "check_config",
  "build_train_iterator",
  "is_pixel_data",
  "open_array",
  "open_text",
  "real_images",
  "text_spec",
  "wants_text",
]
