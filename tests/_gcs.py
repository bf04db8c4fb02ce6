"""A local GCS emulator (gcp-storage-emulator, in this process) for the gs:// tests.

The real client libraries talk to it: gcsfs (under etils epath) through STORAGE_EMULATOR_HOST, and
tensorstore (under Orbax) through the variables `dit_jax.storage` derives from it. Programs the
tests start inherit the variables and reach the same emulator.
"""

import logging
import os
import threading
import time
import uuid

import numpy as np
import portpicker

BUCKET = "dit-jax-test"


def _report_generations() -> None:
  """Makes the emulator's media downloads send `x-goog-generation`, as GCS does: tensorstore reads
  an object's generation from it for its conditional writes (OCDBT manifests), and without it
  fails with "Malformed StorageGeneration". Done once, on the emulator's route table."""
  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  if getattr(objects, "_dit_jax_generations", False):
    return

  def download(request, response, storage, *args, **kwargs):
    objects._dit_jax_download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # Not found: the original handler has answered 404.
      return
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj.get("metageneration", "1")

  objects._dit_jax_download, objects._dit_jax_generations = objects.download, True
  objects.download = download  # Its JSON API route (?alt=media) calls it by name.
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler is objects._dit_jax_download:
        handlers[method] = download


class Emulator:
  """Serves GCS on 127.0.0.1 with an in-memory bucket `BUCKET`; `url(name)` gives a fresh prefix."""

  def __init__(self):
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # Its 404s are expected.
    _report_generations()
    self.port = portpicker.pick_unused_port()
    self._server = create_server("127.0.0.1", self.port, in_memory=True, default_bucket=BUCKET)
    self._server.start()
    # A client that hangs up early (gcsfs after a HEAD) is no error worth a traceback.
    self._server._api._httpd.handle_error = lambda request, address: None
    self.host = f"http://127.0.0.1:{self.port}"
    self.env = {
      "STORAGE_EMULATOR_HOST": self.host,
      "TENSORSTORE_GCS_HTTP_URL": self.host,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    os.environ.update(self.env)

  def url(self, name: str = "run") -> str:
    """A gs:// prefix no other test uses."""
    return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"

  def stop(self) -> None:
    # A closed input pipeline's read-ahead may still be reading from the bucket (grain shuts its
    # threads down without waiting): let those reads end before the server goes, or they retry
    # against a closed port and the process cannot exit.
    deadline = time.monotonic() + 60
    while any(t.name.startswith("grain-") for t in threading.enumerate()):
      assert time.monotonic() < deadline, "grain's reading threads did not end within 60 s"
      time.sleep(0.05)
    self._server.stop()


def upload(local_dir: str, url: str, only: tuple[str, ...] = ()) -> str:
  """Copies the files under `local_dir` (of its top-level entries `only`, if given) to `url`."""
  from dit_jax import storage

  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    if only and rel.split(os.sep)[0] not in only:
      continue
    for name in files:
      with open(os.path.join(root, name), "rb") as f:
        parts = [] if rel == "." else rel.split(os.sep)
        storage.write_bytes(storage.join(url, *parts, name), f.read())
  return url


def download(url: str, local_dir: str) -> str:
  """Copies the objects under `url` to the same relative paths under `local_dir`."""
  from dit_jax import storage

  for name in storage.find(url):
    target = os.path.join(local_dir, *name[len(url.rstrip("/")) + 1 :].split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as f:
      f.write(storage.read_bytes(name))
  return local_dir


def write_latents(url: str, count: int = 32, shard_size: int = 16, size: int = 8) -> None:
  """Random 8x8x4 latents with labels as encode_latents stores them in a bucket."""
  from dit_jax import storage
  from dit_jax.data import latents, records

  rng = np.random.default_rng(0)
  latents.LatentsMetadata(
    vae="(random latents)",
    scaling_factor=0.18215,
    shift_factor=0.0,
    latent_channels=4,
    downsample_factor=8,
    image_size=size * 8,
    crop=latents.NO_CROP,
    flip=False,
    std=True,
    count=count,
    source="random",
    source_path="",
    source_split="train",
    dtype="float32",
    compute_dtype="float32",
    batch_size=shard_size,
    has_labels=True,
    format=records.FORMAT,
    shard_size=shard_size,
  ).save(url)
  n = records.num_shards(count, shard_size)
  for i in range(n):
    rows = min(shard_size, count - i * shard_size)
    shape = (rows, size, size, 4)
    storage.save_npy(
      storage.join(url, records.shard_name("labels", i, n)),
      rng.integers(0, 10, rows).astype(np.int32),
    )
    records.write_shard(
      storage.join(url, records.shard_name("latents", i, n)),
      {
        "latent": rng.standard_normal(shape).astype(np.float32),
        "latent_std": rng.uniform(0.01, 0.1, shape).astype(np.float32),
      },
    )
