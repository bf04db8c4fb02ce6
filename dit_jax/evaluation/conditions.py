"""What samples are conditioned on: balanced or random class labels, or text prompts (given
inline, in a file, or as pre-encoded directories beside the latents or in a bucket), gathered
chunk by chunk so that 50,000 text conditions never sit in memory at once."""

import dataclasses

import ml_collections
import numpy as np

from dit_jax import data, storage
from dit_jax.data import text
from dit_jax.errors import ConfigError


def sample_labels(config: ml_collections.ConfigDict, num: int, seed: int) -> np.ndarray:
  """Balanced (0, 1, ..., K-1, 0, 1, ...) or uniformly random class labels [num]."""
  k = config.model.num_classes
  if config.sample.labels == "balanced":
    return (np.arange(num) % k).astype(np.int32)
  return np.random.default_rng(seed).integers(0, k, num).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Conditions:
  """The conditioning of `num` samples, gathered chunk by chunk (50,000 text conditions do not fit
  in memory at once).

  Attributes:
    table: arrays whose rows are the distinct conditions (labels, or encoded prompts, possibly
      memory-mapped), keyed as the conditioner expects them.
    index: [num] the table row of each sample.
    meta: what is stored beside the samples: `labels` or `captions` [num].
  """

  table: dict[str, np.ndarray]
  index: np.ndarray
  meta: dict[str, np.ndarray]

  def take(self, samples: np.ndarray) -> dict[str, np.ndarray]:
    """The conditioning of the given sample indices (float arrays as float32)."""
    rows = self.index[samples]
    return {
      k: np.asarray(v[rows], np.float32 if np.issubdtype(v.dtype, np.floating) else v.dtype)
      for k, v in self.table.items()
    }


def _read_prompts(path: str) -> list[str]:
  """The non-empty lines of a prompts file (config.sample.prompts)."""
  prompts = [p for p in text.read_captions(path) if p]
  if not prompts:
    raise ConfigError(f"config.sample.prompts={path!r} holds no prompts (one per line).")
  return prompts


def text_conditions(config: ml_collections.ConfigDict, num: int) -> Conditions:
  """Text conditioning for `num` images: prompts cycled in order, and their captions.

  `config.sample.prompts` is a directory written by dit_jax.tools.encode_text (on a local disk
  or gs://), or a text file of prompts that the built-in encoder of the `shapes`
  data can encode; `config.sample.prompt_text` gives such prompts in the config ("|"-separated);
  neither: the held-out captions of `shapes`, or the data's own captions.
  """
  path, name, inline = config.sample.prompts, config.data.name, config.sample.prompt_text
  if path and inline:
    raise ConfigError(
      "Set config.sample.prompts (a file or directory) or config.sample.prompt_text, not both."
    )
  if (path and storage.isdir(path)) or (not path and not inline and name == "latents"):
    directory = path or config.data.path
    spec, want = text.TextSpec.load(directory), data.text_spec(config)
    got_sizes = (spec.context_len, spec.context_dim, spec.pooled_dim)
    want_sizes = (want.context_len, want.context_dim, want.pooled_dim)
    if got_sizes != want_sizes:
      raise ConfigError(
        f"config.sample.prompts={directory!r} holds text of sizes (context_len, context_dim, "
        f"pooled_dim)={got_sizes}, but the model takes {want_sizes}; encode the prompts with "
        "the encoders and max lengths used for the training data."
      )
    context, pooled = data.open_text(directory)
    captions_path = storage.join(directory, text.CAPTIONS_FILE)
    captions = text.read_captions(captions_path) if storage.isfile(captions_path) else None
    index = np.arange(num) % len(pooled)
    names = [captions[i] if captions and i < len(captions) else f"prompt {i}" for i in index]
    return Conditions(
      {"context": context, "pooled": pooled}, index, {"captions": np.asarray(names)}
    )
  if name != "shapes":
    raise ConfigError(
      f"Prompts {path or inline!r} (config.sample.prompts / prompt_text) can be encoded "
      "in-process only for the built-in 'shapes' data; for other data encode them with `python -m "
      "dit_jax.tools.encode_text --captions=FILE --out=DIR` and set config.sample.prompts=DIR."
    )
  from dit_jax.data import shapes

  if path:
    prompts = _read_prompts(path)
  elif inline:
    prompts = [p.strip() for p in inline.split("|") if p.strip()]
  else:
    prompts = shapes.held_out_captions()
  context, pooled = shapes.encode_captions(prompts)
  index = np.arange(num) % len(prompts)
  captions = np.asarray([prompts[i] for i in index])
  return Conditions({"context": context, "pooled": pooled}, index, {"captions": captions})


def conditions(config: ml_collections.ConfigDict, num: int, seed: int) -> Conditions:
  """The conditioning of `num` samples and what to store beside them in the .npz (labels [num]
  for class-conditional models, captions [num] for text models)."""
  if data.wants_text(config):
    return text_conditions(config, num)
  labels = sample_labels(config, num, seed)
  return Conditions({"label": labels}, np.arange(num), {"labels": labels})
