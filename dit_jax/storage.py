"""One storage layer for every path a user gives: a local path or a `gs://` URL.

Local paths are made absolute (so a relative `--workdir` means the same in every process and
thread); `gs://` URLs go through etils `epath` (Orbax's own path type) on gcsfs, and tensorstore
(Orbax's array store) reads and writes them itself. Writes are atomic: written then renamed on a
local disk, one object upload on GCS (which never shows a partial object). GCS support comes in an
extra, `pip install 'dit_jax[gcs]'`; a `gs://` path without it is one clear error.

`STORAGE_EMULATOR_HOST` (the variable of Google's client libraries and gcsfs) points everything at
a GCS emulator: it is passed on to tensorstore as `TENSORSTORE_GCS_HTTP_URL`.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from typing import IO, Any

import numpy as np
from absl import logging
from etils import epath

from dit_jax.errors import ConfigError

GCS_EXTRA = "pip install 'dit_jax[gcs]'"
_SCHEME = "gs://"


class StorageError(ConfigError):
  """A path that cannot be used: missing extra, unreachable service, missing bucket."""


def is_remote(path: str) -> bool:
  return str(path).startswith(_SCHEME)


def _check_scheme(path: str) -> None:
  head, sep, _ = str(path).partition("://")
  if sep and head != "gs" and "/" not in head:
    raise StorageError(f"{path}: only local paths and gs:// URLs are supported, not {head}://.")


_configured = False


def _configure_gcs(path: str) -> None:
  """Checks that the `gcs` extra is installed and points tensorstore at an emulator if asked."""
  global _configured
  if _configured:
    return
  host = os.environ.get("STORAGE_EMULATOR_HOST", "")
  emulator = host not in ("", "default")
  if emulator:
    # gcsfs's experimental bucket-type probe uses GCS's control API, which emulators lack.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  try:
    import gcsfs  # noqa: F401
  except ImportError:
    raise StorageError(
      f"{path} is on Google Cloud Storage, which needs the gcs extra: {GCS_EXTRA}"
    ) from None
  if emulator:
    url = host if host.startswith(("http://", "https://")) else f"http://{host}"
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    # tensorstore's GCS driver sends this token instead of looking for credentials.
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    # ArrayRecord's reader (google-cloud-cpp) reads its own variable.
    os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)
  _configured = True


def resolve(path: str) -> str:
  """`path` as a string every process reads the same way: absolute if local, a URL if remote."""
  path = os.fspath(path)
  _check_scheme(path)
  if is_remote(path):
    _configure_gcs(path)
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
  base = resolve(base)
  if is_remote(base):
    return "/".join([base, *(p.strip("/") for p in parts if p)])
  return os.path.join(base, *parts)


def path(p: str) -> epath.Path:
  """An `epath.Path` for `p` (what Orbax takes)."""
  return epath.Path(resolve(p))


def parent(p: str) -> str:
  p = resolve(p)
  if is_remote(p):
    head, _, _ = p.rpartition("/")
    return head if len(head) > len(_SCHEME) else p
  return os.path.dirname(p)


def basename(p: str) -> str:
  return resolve(p).rstrip("/").rpartition("/")[2] if is_remote(p) else os.path.basename(p)


def _gcs_fs():
  """The gcsfs filesystem epath uses (fsspec caches one instance per arguments), so that what it
  lists and what this module changes stay in one cache."""
  import fsspec

  return fsspec.filesystem("gcs", finalize_on_close=True)


def _fresh(p: str) -> epath.Path:
  """`path(p)`, with gcsfs's cached listings of it dropped: other processes may have written."""
  if is_remote(p):
    _gcs_fs().invalidate_cache(resolve(p))
  return path(p)


def exists(p: str) -> bool:
  return _fresh(p).exists()


def isdir(p: str) -> bool:
  return _fresh(p).is_dir()


def isfile(p: str) -> bool:
  return _fresh(p).is_file()


def listdir(p: str) -> list[str]:
  """The names in directory `p`, sorted; [] if it does not exist."""
  d = _fresh(p)
  if not d.is_dir():
    return []
  return sorted(child.name for child in d.iterdir())


def find(p: str) -> list[str]:
  """Every file under directory `p` (any depth), as full paths, sorted."""
  p = resolve(p)
  if is_remote(p):
    _gcs_fs().invalidate_cache(p)
    return sorted(f"{_SCHEME}{f}" for f in _gcs_fs().find(p))
  return sorted(os.path.join(d, f) for d, _, files in os.walk(p) for f in files)


def makedirs(p: str) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def remove(p: str) -> None:
  """Deletes file `p` if it exists."""
  f = path(p)
  if f.exists():
    f.unlink()


def rmtree(p: str) -> None:
  d = path(p)
  if d.exists():
    d.rmtree()


def rename(src: str, dst: str) -> None:
  """Moves `src` to `dst` (replacing it): atomic on a local disk, copy then delete on GCS."""
  if is_remote(src) or is_remote(dst):
    if is_remote(src) != is_remote(dst):
      raise ValueError(f"rename between a local disk and GCS: {src} -> {dst}")
    # Copy and delete, as GCS itself does a move (gcsfs's move API first is missing in emulators).
    fs = _gcs_fs()
    fs.copy(resolve(src), resolve(dst), recursive=fs.isdir(resolve(src)))
    fs.rm(resolve(src), recursive=True)
  else:
    os.replace(resolve(src), resolve(dst))


def read_bytes(p: str) -> bytes:
  return path(p).read_bytes()


def open_read(p: str) -> IO[bytes]:
  """File `p` opened for reading bytes, seekable (GCS objects are read in ranges as needed)."""
  source = resolve(p)
  if is_remote(source):
    return _gcs_fs().open(source, "rb")
  return open(source, "rb")  # noqa: SIM115


def sha256(p: str) -> str:
  """The sha256 of file `p`, read in blocks."""
  digest = hashlib.sha256()
  with open_read(p) as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def read_text(p: str) -> str:
  return path(p).read_text()


def write_bytes(p: str, data: bytes) -> None:
  """Writes `data` to `p` atomically (no reader sees part of it), creating its directory."""
  target = resolve(p)
  if is_remote(target):
    path(target).write_bytes(data)  # One object upload: all of it or nothing.
    return
  tmp = f"{target}.tmp{os.getpid()}"
  try:
    f = open(tmp, "wb")  # noqa: SIM115
  except FileNotFoundError:  # (A parent that is a file stays NotADirectoryError, as it says.)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    f = open(tmp, "wb")  # noqa: SIM115
  with f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, target)


def write_text(p: str, text: str) -> None:
  write_bytes(p, text.encode())


@contextlib.contextmanager
def staged(p: str) -> Iterator[str]:
  """A local path to write `p` through, for writers that take a path (ArrayRecord): on a local
  disk a temporary file beside `p`, fsynced and renamed over it at the end; for GCS a temporary
  file in the system's temporary directory, uploaded as one object at the end. `p` is untouched
  if the block raises."""
  target = resolve(p)
  remote = is_remote(target)
  if remote:
    fd, local = tempfile.mkstemp(prefix="dit_jax_")
    os.close(fd)
  else:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    local = f"{target}.tmp{os.getpid()}"
  try:
    yield local
    with open(local, "rb+") as f:
      os.fsync(f.fileno())
    if remote:
      _gcs_fs().put_file(local, target)
    else:
      os.replace(local, target)
  finally:
    if os.path.exists(local):
      os.remove(local)


@contextlib.contextmanager
def local_copy(p: str) -> Iterator[str]:
  """A local path to read `p` through, for readers that take a path (safetensors, zip members,
  memory maps): `p` itself on a local disk; for GCS a temporary copy of the object, deleted at the
  end of the block."""
  source = resolve(p)
  if not is_remote(source):
    yield source
    return
  with tempfile.TemporaryDirectory(prefix="dit_jax_") as d:
    local = os.path.join(d, basename(source))
    _gcs_fs().get_file(source, local)
    yield local


def stat(p: str) -> tuple[int, str]:
  """(size in bytes, a version that changes when the file is written again: the modification
  time on a local disk, the object's generation on GCS) of file `p`."""
  source = resolve(p)
  if is_remote(source):
    fs = _gcs_fs()
    fs.invalidate_cache(source)
    info = fs.info(source)
    return int(info["size"]), str(info.get("generation") or info.get("updated") or "")
  s = os.stat(source)
  return s.st_size, str(s.st_mtime_ns)


@contextlib.contextmanager
def atomic_file(p: str) -> Iterator[IO[bytes]]:
  """A seekable binary file to write `p` through, for writers that stream (a zip archive); as
  `staged`."""
  with staged(p) as local, open(local, "wb") as f:
    yield f


def read_json(p: str) -> Any:
  return json.loads(read_text(p))


def write_json(p: str, value: Any, indent: int | None = 2) -> None:
  write_text(p, json.dumps(value, indent=indent) + "\n")


def save_npz(p: str, **arrays: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  write_bytes(p, buffer.getvalue())


def load_npz(p: str) -> dict[str, np.ndarray]:
  """All arrays of the .npz at `p`, read into memory."""
  with np.load(io.BytesIO(read_bytes(p)) if is_remote(p) else resolve(p)) as f:
    return {k: f[k] for k in f.files}


def save_npy(p: str, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, array)
  write_bytes(p, buffer.getvalue())


def load_npy(p: str, mmap: bool = False) -> np.ndarray:
  """The .npy at `p`; memory-mapped (not read) if `mmap` and local."""
  if is_remote(p):
    return np.load(io.BytesIO(read_bytes(p)))
  return np.load(resolve(p), mmap_mode="r" if mmap else None)


def open_memmap(p: str, mode: str = "r", dtype=None, shape: tuple | None = None) -> np.memmap:
  """The .npy file `p` as a memory map, for the `npy` layouts filled row by row on a local disk:
  mode "r" or "r+" opens it, "w+" creates it with `dtype` and `shape`. GCS objects cannot be
  mapped: a `gs://` path is a StorageError."""
  source = resolve(p)
  if is_remote(source):
    raise StorageError(f"{source}: memory-mapped .npy files need a local disk, not GCS.")
  if mode == "w+":
    os.makedirs(os.path.dirname(source), exist_ok=True)
    return np.lib.format.open_memmap(source, mode="w+", dtype=dtype, shape=shape)
  return np.load(source, mmap_mode=mode, allow_pickle=False)


def getsize(p: str) -> int:
  return stat(p)[0]


def write_npz_streamed(
  p: str, key: str, chunks: Iterable[np.ndarray], shape: tuple, dtype, extra: dict
) -> None:
  """Writes an np.load-able .npz at `p` holding `key` [shape] (the arrays `chunks` yields, one
  after another, never all in memory) and the small arrays `extra`; stored uncompressed and with
  zip64 members, as np.savez writes them."""
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False}
  with atomic_file(p) as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    with zf.open(f"{key}.npy", "w", force_zip64=True) as member:
      np.lib.format.write_array_header_2_0(member, {**header, "shape": tuple(shape)})
      for chunk in chunks:
        member.write(memoryview(np.ascontiguousarray(chunk, dtype)).cast("B"))
    for k, v in extra.items():
      with zf.open(f"{k}.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array(member, np.asarray(v), allow_pickle=False)


class ChunkStore:
  """The resumable chunks of a long job (samples, their Inception features, a reference's): the
  rows [start, end) of one array [N, *item_shape] as whole files `<start>-<end>.npy` in
  `directory`, beside `fingerprint.json`, a JSON object of everything the rows depend on. A chunk
  is written atomically, so a file there is always whole; a rerun continues after the last chunk
  of an unbroken chain from row 0, if its fingerprint is equal. Used by process 0 only."""

  FINGERPRINT = "fingerprint.json"
  _CHUNK = re.compile(r"^(\d+)-(\d+)\.npy$")

  def __init__(self, directory: str, item_shape: tuple, dtype):
    self.directory = resolve(directory)
    self.item_shape, self.dtype = tuple(item_shape), np.dtype(dtype)

  def chunks(self) -> list[tuple[int, int, str]]:
    """(start, end, path) of the chunk files there, sorted."""
    found = []
    for name in listdir(self.directory):
      m = self._CHUNK.match(name)
      if m and int(m.group(2)) > int(m.group(1)):
        found.append((int(m.group(1)), int(m.group(2)), join(self.directory, name)))
    return sorted(found)

  def problem(self, want: dict) -> str | None:
    """Why the chunks there cannot be continued by a job of fingerprint `want` (None if they can,
    or if there are none)."""
    fp_path = join(self.directory, self.FINGERPRINT)
    if not isfile(fp_path):
      return f"holds chunks but no {self.FINGERPRINT}" if self.chunks() else None
    try:
      have = read_json(fp_path)
    except (OSError, ValueError) as e:
      return f"has a {self.FINGERPRINT} that cannot be read ({e})"
    if not isinstance(have, dict):
      return f"has a {self.FINGERPRINT} that is not a JSON object"
    diff = [
      "other labels or captions"
      if k == "conditions_sha256"
      else f"{k}={have.get(k)!r} there, {want.get(k)!r} here"
      for k in sorted(set(have) | set(want))
      if have.get(k) != want.get(k)
    ]
    if diff:
      return f"holds the chunks of a run with another config ({'; '.join(diff)})"
    return None

  def resume(self, want: dict, *, overwrite: bool = False, field: str = "sample.name") -> int:
    """The number of rows already there as a chain of whole chunks from 0 on (removing chunk
    files that do not continue it), after checking that they were made with the same fingerprint
    (written on the first run). Chunks of another fingerprint are an error naming config.`field`
    (what names the directory), or, with `overwrite`, removed."""
    makedirs(self.directory)
    problem = self.problem(want)
    if problem and not overwrite:
      raise ConfigError(
        f"{self.directory} {problem}; set another --config.{field}=..., delete that directory "
        "to start over, or pass --overwrite to replace it."
      )
    if problem:
      logging.warning("Removing %s, which %s (overwrite is set).", self.directory, problem)
      rmtree(self.directory)
      makedirs(self.directory)
    fp_path = join(self.directory, self.FINGERPRINT)
    if not isfile(fp_path):
      write_text(fp_path, json.dumps(want, indent=1))
    done = 0
    for start, end, chunk in self.chunks():
      ok = start == done
      if ok:
        try:
          array = load_npy(chunk, mmap=True)
          ok = array.dtype == self.dtype and array.shape == (end - start, *self.item_shape)
          del array
        except (OSError, ValueError):
          ok = False
      if ok:
        done = end
      else:
        logging.warning("Removing %s: not the next whole chunk after row %d.", chunk, done)
        remove(chunk)
    return done

  def put(self, start: int, rows: np.ndarray) -> None:
    """Writes rows [start, start + len(rows)) as one chunk."""
    assert rows.dtype == self.dtype and rows.shape[1:] == self.item_shape, (rows.shape, rows.dtype)
    save_npy(join(self.directory, f"{start:08d}-{start + len(rows):08d}.npy"), rows)

  def arrays(self) -> Iterator[np.ndarray]:
    """The chunks' arrays in order, one at a time."""
    for _, _, chunk in self.chunks():
      yield load_npy(chunk)

  def read(self, num: int) -> np.ndarray:
    """All `num` rows, which must be there whole."""
    out, at = np.empty((num, *self.item_shape), self.dtype), 0
    for start, end, chunk in self.chunks():
      assert start == at, (start, at, self.directory)
      out[start:end] = load_npy(chunk)
      at = end
    assert at == num, (at, num, self.directory)
    return out

  def remove(self) -> None:
    rmtree(self.directory)


class AppendLog:
  """A file that only grows (`metrics.jsonl`, TensorBoard event files): appended to on a local
  disk; on GCS, whose objects cannot be appended to, its whole content is uploaded again at each
  `flush` (keep such files small: see `size`)."""

  def __init__(self, p: str, *, keep: str | bytes | None = None, binary: bool = False):
    """Opens `p` for appending; with `keep`, replaces its content with `keep` first."""
    self.path, self._binary = resolve(p), binary
    self._remote = is_remote(self.path)
    if keep is not None:
      write_bytes(self.path, keep if isinstance(keep, bytes) else keep.encode())
    if self._remote:
      old = read_bytes(self.path) if exists(self.path) else b""
      self._parts = [old if binary else old.decode()]
      self.size = len(old)
    else:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      self._file = open(self.path, "ab" if binary else "a")  # noqa: SIM115
      self.size = self._file.tell()
    self._dirty = False

  def write(self, data: str | bytes) -> None:
    self.size += len(data)
    if self._remote:
      self._parts.append(data)
      self._dirty = True
    else:
      self._file.write(data)

  def flush(self) -> None:
    if not self._remote:
      self._file.flush()
    elif self._dirty:
      joined = (b"" if self._binary else "").join(self._parts)
      self._parts = [joined]
      write_bytes(self.path, joined if self._binary else joined.encode())
      self._dirty = False

  def close(self) -> None:
    self.flush()
    if not self._remote:
      self._file.close()


def check_writable(p: str) -> None:
  """One clear error now if file `p` could not be written at the end of a long job: a local
  folder that is missing or read-only; for GCS, as `check_reachable`."""
  target = resolve(p)
  if is_remote(target):
    check_reachable(target)
    return
  folder = os.path.dirname(target)
  if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
    raise StorageError(f"{p}: {folder} is not a writable folder.")


def nearest_existing(p: str) -> str:
  """`p`, or the nearest of its parents that exists."""
  p = resolve(p)
  while not exists(p) and parent(p) != p:
    p = parent(p)
  return p


def check_reachable(*paths: str) -> None:
  """For each `gs://` path: one clear error now if the service cannot be reached or the bucket
  does not exist, instead of a minute of retries and a traceback later. Nothing to do for local
  paths and empty ones (flags left unset)."""
  for p in paths:
    if p:
      _check_reachable(p)


def _check_reachable(p: str) -> None:
  p = resolve(p)
  if not is_remote(p):
    return
  import gcsfs.core

  bucket = p[len(_SCHEME) :].split("/", 1)[0]
  if not bucket:
    raise StorageError(f"{p} names no bucket; write gs://BUCKET/path.")
  location = gcsfs.core._location()
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "") not in ("", "default")
  where = f"the GCS emulator at STORAGE_EMULATOR_HOST={location}" if emulator else location
  try:
    urllib.request.urlopen(location, timeout=10).close()
  except urllib.error.HTTPError:
    pass  # It answered.
  except (OSError, ValueError) as e:
    raise StorageError(
      f"cannot reach {where} for {p} ({getattr(e, 'reason', e)}); check the network"
      + (" and that the emulator is running" if emulator else "")
      + "."
    ) from None
  try:
    exists_ = path(f"{_SCHEME}{bucket}").exists()
  except OSError as e:
    raise StorageError(
      f"cannot use gs://{bucket} for {p}: {e}; check the credentials "
      "(gcloud auth application-default login) and the bucket's permissions."
    ) from None
  if not exists_:
    raise StorageError(
      f"bucket gs://{bucket} does not exist (for {p}); create it "
      f"(gcloud storage buckets create gs://{bucket}) or pass another path."
    )
