"""Hugging Face model directories read without PyTorch: config.json and the safetensors weights.

A directory written by `save_pretrained` holds config.json and either one `model.safetensors`
(or a variant such as `model.fp16.safetensors`) or shards listed by `model.safetensors.index.json`
(T5-XXL's `text_encoder_3` in an SD3 pipeline). `Weights` reads tensors by name, one at a time,
in float32 or another numpy dtype, and records which were read, so that a converter can report a
missing tensor, a wrong shape or tensors it left unused as one clear error.
"""

import contextlib
import json
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from dit_jax import storage
from dit_jax.errors import ConfigError

CONFIG_FILE = "config.json"
INDEX_SUFFIX = ".safetensors.index.json"


def read_config(directory: str, what: str) -> dict:
  """config.json of `directory`, a saved `what` (e.g. "CLIPTextModelWithProjection")."""
  if storage.is_remote(directory):
    raise ConfigError(
      f"{directory!r} is on GCS, but model weights load from a local directory; copy it first "
      f"(gcloud storage cp -r {directory} .) and pass the copy."
    )
  if not storage.isdir(directory):
    raise ConfigError(
      f"{directory!r} is not a directory; pass the local directory of a saved {what} "
      f"({CONFIG_FILE} and *.safetensors; nothing is downloaded)."
    )
  path = storage.join(directory, CONFIG_FILE)
  if not storage.isfile(path):
    raise ConfigError(
      f"{directory!r} holds no {CONFIG_FILE}, so it is not a saved {what}; pass the directory "
      "that `save_pretrained` wrote (in an SD3 pipeline: text_encoder, text_encoder_2 or "
      "text_encoder_3)."
    )
  try:
    config = storage.read_json(path)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path!r} cannot be read as JSON ({e}); is the download complete?") from None
  if not isinstance(config, dict):
    raise ConfigError(f"{path!r} is not a JSON object; is the download complete?")
  return config


def _weight_files(directory: str) -> list[str]:
  """The safetensors files of `directory`: an index's shards, else its one *.safetensors."""
  names = storage.listdir(directory)
  indexes = sorted(n for n in names if n.endswith(INDEX_SUFFIX))
  if indexes:
    index_path = storage.join(directory, indexes[0])
    try:
      shards = sorted(set(storage.read_json(index_path)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise ConfigError(f"{index_path!r} cannot be read as a safetensors index ({e}).") from None
    missing = [s for s in shards if s not in names]
    if missing:
      raise ConfigError(
        f"{index_path!r} lists shards that are not in {directory!r}: {missing[:3]}; is the "
        "download complete?"
      )
    return [storage.join(directory, s) for s in shards]
  files = sorted(n for n in names if n.endswith(".safetensors"))
  if len(files) == 1:
    return [storage.join(directory, files[0])]
  if "model.safetensors" in files:  # Beside variants such as model.fp16.safetensors.
    return [storage.join(directory, "model.safetensors")]
  raise ConfigError(
    f"{directory!r} holds "
    + (f"{len(files)} *.safetensors files and no index" if files else "no *.safetensors file")
    + "; save the model with `save_pretrained(path, safe_serialization=True)` (PyTorch .bin "
    "weights are not read)."
  )


class Weights:
  """The tensors of a directory's safetensors files, read by name (see `open_weights`)."""

  def __init__(self, directory: str, handles: dict[str, object]):
    self.directory = directory
    self._handles = handles  # tensor name -> the open safetensors file that holds it
    self.unused = set(handles)

  def __contains__(self, name: str) -> bool:
    return name in self._handles

  def get(self, name: str, shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """Tensor `name` as `dtype`, checked to have `shape` (PyTorch's layout)."""
    if name not in self._handles:
      raise ConfigError(
        f"{self.directory!r} has no tensor {name!r} that its {CONFIG_FILE} implies; the weights "
        "and the config do not match (or the directory holds another model)."
      )
    a = self._handles[name].get_tensor(name)  # The flax reader handles bfloat16, numpy does not.
    if tuple(a.shape) != tuple(shape):
      raise ConfigError(
        f"{self.directory!r}: tensor {name!r} has shape {tuple(a.shape)} but its {CONFIG_FILE} "
        f"implies {tuple(shape)}; the weights and the config do not match."
      )
    self.unused.discard(name)
    return np.asarray(np.asarray(a, np.float32), dtype)

  def check_all_used(self, ignore: tuple[str, ...] = ()) -> None:
    """Raises a ConfigError if tensors other than those starting with `ignore` were never read."""
    left = sorted(n for n in self.unused if not n.startswith(ignore))
    if left:
      raise ConfigError(
        f"{self.directory!r} holds {len(left)} tensors the model of its {CONFIG_FILE} does not "
        f"use (e.g. {left[:3]}); the weights and the config do not match."
      )


@contextlib.contextmanager
def open_weights(directory: str) -> Iterator[Weights]:
  """Opens every safetensors file of `directory` (local) for reading tensors by name."""
  from safetensors import SafetensorError, safe_open

  files = _weight_files(directory)
  try:
    with contextlib.ExitStack() as stack:
      handles = {}
      for file in files:
        fh = stack.enter_context(safe_open(file, framework="flax"))
        handles.update(dict.fromkeys(fh.keys(), fh))
      yield Weights(directory, handles)
  except SafetensorError as e:
    raise ConfigError(f"{directory!r}: a safetensors file cannot be read ({e}).") from None


def numpy_dtype(name: str):
  """The numpy dtype of "float32", "bfloat16" or "float16" (bfloat16 from ml_dtypes)."""
  return ml_dtypes.bfloat16 if name == "bfloat16" else np.dtype(name)
