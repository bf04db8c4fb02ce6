"""Latents as sharded ArrayRecord files (grain's random-access format), for data in a bucket.

The `array_record` layout of a latents directory (`dit_jax.data.latents`), beside latents.json:
  latents-<i>-of-<n>.array_record   rows [i * shard_size, (i + 1) * shard_size): one record per
                                    example, a msgpack map of its arrays ("latent", and as
                                    encoded "latent_std", "latent_flip", "latent_flip_std")
  labels-<i>-of-<n>.npy             int32 class ids of those rows (class-labelled data)
  buckets-<i>-of-<n>.npy            (latents encoded in config.data.buckets) int32 bucket of each
                                    row, whose latent has that bucket's shape
  text-<i>-of-<n>.array_record      (text-conditioned data) the rows' text embeddings, written by
                                    encode_text (layout in `dit_jax.data.text`)

Each file is written whole (a temporary file renamed, or one object upload on GCS), labels first,
so a shard file present is a finished shard. Readers open the shards directly (ArrayRecord reads
gs:// itself, with random access), and a process reads only the records it asks for.
"""

import threading

import numpy as np
from flax import serialization

from dit_jax import storage
from dit_jax.errors import ConfigError, check_choice

FORMAT = "array_record"
FORMATS = ("npy", FORMAT)  # What the tools that write data (encode_latents, encode_text) write.
_GROUP_SIZE_1 = "group_size:1"  # One record per chunk: random access reads one record.


def output_format(format: str, out: str, sharded_default: bool = False) -> str:
  """The --format of a tool writing into `out`: the one given, or "" = array_record for a gs://
  `out` (or where `sharded_default`), else npy.

  Raises:
    ConfigError: for an unknown format, or npy (memory-mapped files) on GCS.
  """
  format = format or (FORMAT if storage.is_remote(out) or sharded_default else "npy")
  check_choice(format, FORMATS, "--format", prefix="")
  if format == "npy" and storage.is_remote(out):
    raise ConfigError(
      f"--format=npy writes memory-mapped files, which --out={out} on GCS cannot hold; use "
      "--format=array_record (the default for gs://)."
    )
  return format


def shard_name(kind: str, index: int, num_shards: int) -> str:
  ext = "npy" if kind in ("labels", "buckets") else "array_record"
  return f"{kind}-{index:05d}-of-{num_shards:05d}.{ext}"


def num_shards(count: int, shard_size: int) -> int:
  return -(-count // shard_size)


def shard_names(kind: str, count: int, shard_size: int) -> list[str]:
  """The names of all `kind` ("latents", "labels", "buckets" or "text") files of `count` rows,
  in row order."""
  n = num_shards(count, shard_size)
  return [shard_name(kind, i, n) for i in range(n)]


def encode(example: dict[str, np.ndarray]) -> bytes:
  """One record: the example's arrays as a msgpack map (the same bytes for the same arrays)."""
  return serialization.msgpack_serialize({k: np.asarray(v) for k, v in sorted(example.items())})


def decode(record: bytes) -> dict[str, np.ndarray]:
  return serialization.msgpack_restore(record)


def write_shard(path: str, examples: dict[str, np.ndarray]) -> None:
  """Writes the rows of `examples` (arrays [rows, ...] by name) as one ArrayRecord file."""
  from array_record.python import array_record_module

  rows = len(next(iter(examples.values())))
  with storage.staged(path) as local:
    writer = array_record_module.ArrayRecordWriter(local, _GROUP_SIZE_1)
    for i in range(rows):
      writer.write(encode({k: v[i] for k, v in examples.items()}))
    writer.close()


class Records:
  """Random access to the records of several ArrayRecord files, as one sequence of examples."""

  def __init__(self, paths: list[str]):
    self.paths = [storage.resolve(p) for p in paths]
    self._open()

  def _open(self) -> None:
    import grain

    self._source = grain.sources.ArrayRecordDataSource(self.paths)
    self._last = threading.local()  # Each reading thread's last decoded record.

  def __getstate__(self):
    return {"paths": self.paths}

  def __setstate__(self, state):
    self.paths = state["paths"]
    self._open()

  def __len__(self) -> int:
    return len(self._source)

  def get(self, index: int) -> dict[str, np.ndarray]:
    last = getattr(self._last, "value", None)
    if last is None or last[0] != index:
      last = (index, decode(self._source[index]))
      self._last.value = last
    return last[1]


class Column:
  """One array of every record (e.g. "latent_std"), with the shape, dtype and row indexing of
  the memory-mapped .npy it stands in for."""

  def __init__(self, records: Records, key: str):
    self._records, self._key = records, key
    first = records.get(0)
    if key not in first:
      raise KeyError(key)
    self.dtype = first[key].dtype
    self.shape = (len(records), *first[key].shape)
    self.ndim = len(self.shape)

  def __len__(self) -> int:
    return self.shape[0]

  def __getitem__(self, index) -> np.ndarray:
    """Row `index`, or the rows of a slice or an integer array, stacked in its shape."""
    if isinstance(index, slice):
      index = range(*index.indices(len(self)))
    if np.ndim(index) == 0:
      return self._records.get(int(index))[self._key]
    rows = np.asarray(index, np.int64)
    out = np.empty((*rows.shape, *self.shape[1:]), self.dtype)
    for at, row in zip(np.ndindex(rows.shape), rows.flat, strict=True):
      out[at] = self._records.get(int(row))[self._key]
    return out
