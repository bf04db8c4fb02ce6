"""Text conditioning stored with a dataset: precomputed embeddings and how they were laid out.

A text-conditioned dataset carries, per example, a token sequence `context` [L, Dc] and a pooled
vector `pooled` [Dp]. Several text encoders may fill them (SD3: CLIP-L and CLIP-G side by side in
the first 77 rows, T5 in the rows after); a `TextSpec` records which rows and channels each
encoder wrote, so that training can drop each encoder's part independently, and the encoding of
the empty caption, which stands in for a dropped encoder and is the unconditional input of
classifier-free guidance.

On disk (written by `python -m dit_jax.tools.encode_text`, read by the `latents` source):
  text_encoders.json   the spec without the arrays (see `TextSpec.save`), and how the
                       embeddings are stored (`StoredText`); written last, so its presence marks
                       them complete
  null_text.npz        context [L, Dc] and pooled [Dp]: the empty caption's encoding
  context.npy          float16 or float32 [N, L, Dc]
  pooled.npy           float16 or float32 [N, Dp]
  captions.txt         the N captions, one per line (for reference and evaluation)
In the array_record format (for buckets and pods, beside array_record latents), context.npy and
pooled.npy are ArrayRecord shards instead, `text-<i>-of-<n>.array_record` of `shard_size` rows
each, one record per caption holding its "context" and "pooled" (`dit_jax.data.records`).
"""

import dataclasses
import io
import json

import numpy as np

from dit_jax import storage
from dit_jax.errors import ConfigError

SPEC_FILE = "text_encoders.json"
NULL_FILE = "null_text.npz"
CONTEXT_FILE = "context.npy"
POOLED_FILE = "pooled.npy"
CAPTIONS_FILE = "captions.txt"
SHARD_KIND = "text"  # The shards' names: text-<i>-of-<n>.array_record.


@dataclasses.dataclass(frozen=True)
class StoredText:
  """How the embeddings of a directory are stored: format "npy" (context.npy, pooled.npy) or
  "array_record" (`count` captions in shards of `shard_size` rows)."""

  format: str = "npy"
  count: int = 0
  shard_size: int = 0


def stored_layout(directory: str) -> StoredText:
  """The `StoredText` that text_encoders.json in `directory` records ("npy" if it says none)."""
  path = storage.join(directory, SPEC_FILE)
  try:
    meta = storage.read_json(path)
    fields = {f.name for f in dataclasses.fields(StoredText)}
    return StoredText(**{k: v for k, v in meta.get("storage", {}).items() if k in fields})
  except (OSError, ValueError, TypeError, AttributeError) as e:
    raise ConfigError(
      f"{path!r} cannot be read ({type(e).__name__}: {e}); rewrite the text embeddings with "
      "`python -m dit_jax.tools.encode_text`."
    ) from None


@dataclasses.dataclass(frozen=True)
class EncoderSlot:
  """Where one text encoder's output sits: rows `seq` and channels `context_channels` of the
  context, channels `pooled_channels` of the pooled vector (an empty range if it has none)."""

  name: str
  seq: tuple[int, int]
  context_channels: tuple[int, int]
  pooled_channels: tuple[int, int] = (0, 0)


@dataclasses.dataclass(frozen=True, eq=False)
class TextSpec:
  """Shapes, per-encoder layout and the empty caption's encoding of a text-conditioned dataset."""

  context_len: int
  context_dim: int
  pooled_dim: int
  encoders: tuple[EncoderSlot, ...]
  null_context: np.ndarray  # [context_len, context_dim] float32
  null_pooled: np.ndarray  # [pooled_dim] float32

  def __post_init__(self):
    if self.null_context.shape != (self.context_len, self.context_dim):
      raise ConfigError(
        f"The null context has shape {list(self.null_context.shape)}; the text spec says "
        f"[{self.context_len}, {self.context_dim}]."
      )
    if self.null_pooled.shape != (self.pooled_dim,):
      raise ConfigError(
        f"The null pooled vector has shape {list(self.null_pooled.shape)}; the text spec says "
        f"[{self.pooled_dim}]."
      )
    for slot in self.encoders:
      ranges = (
        (slot.seq, self.context_len),
        (slot.context_channels, self.context_dim),
        (slot.pooled_channels, self.pooled_dim),
      )
      for (lo, hi), size in ranges:
        if not 0 <= lo <= hi <= size:
          raise ConfigError(
            f"Text encoder {slot.name!r} has a range {(lo, hi)} outside [0, {size}]."
          )

  def save(self, directory: str, stored: StoredText = StoredText()) -> None:
    """Writes null_text.npz, then text_encoders.json (with `stored`), into `directory`."""
    storage.save_npz(
      storage.join(directory, NULL_FILE),
      context=self.null_context.astype(np.float32),
      pooled=self.null_pooled.astype(np.float32),
    )
    meta = {
      "context_len": self.context_len,
      "context_dim": self.context_dim,
      "pooled_dim": self.pooled_dim,
      "encoders": [dataclasses.asdict(slot) for slot in self.encoders],
      "storage": dataclasses.asdict(stored),
    }
    storage.write_json(storage.join(directory, SPEC_FILE), meta)

  @classmethod
  def load(cls, directory: str) -> "TextSpec":
    """Reads a spec written by `save`; a clear error if the files are missing or malformed."""
    spec_path, null_path = (storage.join(directory, f) for f in (SPEC_FILE, NULL_FILE))
    missing = [p for p in (spec_path, null_path) if not storage.isfile(p)]
    if missing:
      raise ConfigError(
        f"{directory!r} holds no text embeddings: missing {missing}. Write them with "
        "`python -m dit_jax.tools.encode_text --captions=... --out=DIR`."
      )
    try:
      meta = storage.read_json(spec_path)
      null = storage.load_npz(null_path)
      null_context, null_pooled = null["context"], null["pooled"]
      encoders = tuple(
        EncoderSlot(
          name=str(e["name"]),
          seq=tuple(e["seq"]),
          context_channels=tuple(e["context_channels"]),
          pooled_channels=tuple(e["pooled_channels"]),
        )
        for e in meta["encoders"]
      )
      return cls(
        context_len=int(meta["context_len"]),
        context_dim=int(meta["context_dim"]),
        pooled_dim=int(meta["pooled_dim"]),
        encoders=encoders,
        null_context=np.asarray(null_context, np.float32),
        null_pooled=np.asarray(null_pooled, np.float32),
      )
    except (KeyError, TypeError, ValueError, OSError) as e:
      raise ConfigError(
        f"The text embeddings in {directory!r} are malformed ({type(e).__name__}: {e}); "
        "rewrite them with `python -m dit_jax.tools.encode_text`."
      ) from e


def read_captions(path: str, field: str = "caption") -> list[str]:
  """The captions at `path`, caption i first-to-last, each stripped ("" is the empty caption):
  a text file (line i is caption i), a JSONL file (`.jsonl`: line i an object whose `field` is
  caption i), or an image folder `<root>/<class>/<name>.<ext>` with `<name>.txt` beside each
  image (in the folder source's order, which encode_latents encodes in)."""
  if storage.isdir(path):
    from dit_jax.data import sources  # (sources reads this module's layouts.)

    files = sources.FolderSource(path, 1, 3).caption_files()
    missing = [f for f in files if not storage.isfile(f)]
    if missing:
      raise ConfigError(
        f"The image folder {path!r} has {len(missing)} images without a caption file (e.g. "
        f"{missing[0]!r}); write <name>.txt beside each <name>.<image>."
      )
    return [_decode(f, storage.read_bytes(f)).strip() for f in files]
  try:
    data = _decode(path, storage.read_bytes(path))
  except OSError as e:
    raise ConfigError(f"The captions file {path!r} cannot be read ({e}).") from e
  lines = list(io.StringIO(data, newline=None))  # As open() reads.
  if path.endswith(".jsonl"):
    captions = [_json_caption(path, i, line, field) for i, line in enumerate(lines)]
  else:
    captions = [line.strip() for line in lines]
  if not captions:
    raise ConfigError(f"The captions file {path!r} is empty; write one caption per line.")
  return captions


def _decode(path: str, data: bytes) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(f"The captions file {path!r} is not UTF-8 text ({e}).") from None


def _json_caption(path: str, i: int, line: str, field: str) -> str:
  try:
    value = json.loads(line)[field]
  except (json.JSONDecodeError, TypeError, KeyError) as e:
    raise ConfigError(
      f"Line {i + 1} of {path!r} is not a JSON object with a {field!r} string ({type(e).__name__}: "
      f"{e}); write one object per line, or name the key with --caption_field."
    ) from None
  if not isinstance(value, str):
    raise ConfigError(f"Line {i + 1} of {path!r}: {field!r} is a {type(value).__name__}, not text.")
  return value.strip()


def inline_prompts(prompt_text: str) -> list[str]:
  """The prompts of `config.sample.prompt_text`: its "|"-separated parts, stripped, empty ones
  left out; a ConfigError if none is left."""
  prompts = [p.strip() for p in prompt_text.split("|") if p.strip()]
  if not prompts:
    raise ConfigError(
      f"config.sample.prompt_text={prompt_text!r} has no prompts between '|'; write them as "
      "'a red circle at the top left | a blue square at the bottom right', or leave it empty "
      "for the default prompts."
    )
  return prompts


def single_encoder_spec(context_len: int, context_dim: int, pooled_dim: int) -> TextSpec:
  """A spec with one encoder filling everything and an all-zero empty caption (synthetic data)."""
  return TextSpec(
    context_len=context_len,
    context_dim=context_dim,
    pooled_dim=pooled_dim,
    encoders=(EncoderSlot("text", (0, context_len), (0, context_dim), (0, pooled_dim)),),
    null_context=np.zeros((context_len, context_dim), np.float32),
    null_pooled=np.zeros((pooled_dim,), np.float32),
  )
