"""The storage layer (dit_jax/storage.py) on local disks and on GCS (a local emulator), and the
clear errors for gs:// paths that cannot work."""

import io
import os

import _cli
import numpy as np
import portpicker
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from dit_jax import storage, utils


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path / "root")
  return request.getfixturevalue("gcs").url("storage")


def test_files_round_trip(root):
  a = storage.join(root, "sub", "a.json")
  assert storage.parent(a) == storage.join(root, "sub") and storage.basename(a) == "a.json"
  assert not storage.exists(a) and storage.listdir(root) == []
  storage.write_json(a, {"x": [1, 2]})
  assert storage.read_json(a) == {"x": [1, 2]} and storage.isfile(a)
  assert storage.isdir(storage.join(root, "sub")) and storage.listdir(root) == ["sub"]
  storage.save_npz(storage.join(root, "b.npz"), x=np.arange(6).reshape(2, 3), y=np.ones(2))
  got = storage.load_npz(storage.join(root, "b.npz"))
  np.testing.assert_array_equal(got["x"], np.arange(6).reshape(2, 3))
  storage.save_npy(storage.join(root, "c.npy"), np.float32([1.5, 2.5]))
  np.testing.assert_array_equal(storage.load_npy(storage.join(root, "c.npy")), [1.5, 2.5])
  storage.write_text(a, "replaced")  # Atomic overwrite: no temporary file is left beside it.
  assert storage.read_text(a) == "replaced" and storage.listdir(storage.join(root, "sub")) == [
    "a.json"
  ]
  storage.rename(a, storage.join(root, "sub", "d.json"))
  assert storage.listdir(storage.join(root, "sub")) == ["d.json"]
  storage.rmtree(storage.join(root, "sub"))
  assert storage.listdir(root) == ["b.npz", "c.npy"]


def test_append_log_keeps_lines_across_reopening(root):
  path = storage.join(root, "m.jsonl")
  log = storage.AppendLog(path)
  log.write("1\n")
  log.flush()
  assert storage.read_text(path) == "1\n"  # Readable after each flush, on GCS too.
  log.write("2\n")
  log.close()
  log = storage.AppendLog(path)
  log.write("3\n")
  log.close()
  assert storage.read_text(path) == "1\n2\n3\n"
  storage.AppendLog(path, keep="1\n").close()  # A resumed run drops the lines after its step.
  assert storage.read_text(path) == "1\n"


def test_metric_writer_on_gcs_is_what_tensorboard_reads(gcs):
  workdir = gcs.url("metrics")
  writer = utils.MetricWriter(workdir)
  writer.write(5, {"loss": 0.25})
  grid = np.zeros((6, 4, 3), np.uint8)
  grid[:, :, 1] = 90
  writer.write_image(5, "samples", grid)
  writer._tb.roll_bytes = 0  # Every event now starts a new file: TensorBoard reads them as one.
  writer.write(10, {"loss": 0.125})
  writer.close()
  assert [line.count('"step"') for line in storage.read_text(workdir + "/metrics.jsonl").split()]
  assert len(storage.listdir(workdir + "/tensorboard")) == 2
  # TensorBoard's own reader, on the gs:// path (its gfile goes through fsspec and gcsfs).
  events = event_accumulator.EventAccumulator(workdir + "/tensorboard", size_guidance={})
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(5, 0.25), (10, 0.125)]
  (image,) = events.Images("samples")
  decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
  np.testing.assert_array_equal(decoded, grid)


def test_unsupported_scheme_is_a_clear_error():
  with pytest.raises(storage.StorageError, match=r"only local paths and gs:// URLs"):
    storage.join("s3://bucket/run", "x")


def _bad_workdir(workdir, tmp_path, extra=(), **env):
  cwd = tmp_path / "cwd"
  cwd.mkdir(parents=True)
  args = [a.replace("configs/", os.path.join(_cli.REPO, "configs/")) for a in _cli.TINY]
  proc = _cli.run(*args, *extra, f"--workdir={workdir}", cwd=str(cwd), timeout=120, **env)
  assert os.listdir(cwd) == []  # Nothing written locally (no ./gs:/... folder).
  return proc


def test_gs_workdir_errors(gcs, tmp_path):
  """A missing bucket, an unreachable service, and no gcs extra: each one line, no traceback."""
  proc = _bad_workdir("gs://no-such-bucket/run", tmp_path / "a")
  _cli.assert_clear_error(proc, "bucket gs://no-such-bucket does not exist", "gcloud storage")
  closed = f"127.0.0.1:{portpicker.pick_unused_port()}"  # Nobody listens.
  proc = _bad_workdir(gcs.url(), tmp_path / "b", STORAGE_EMULATOR_HOST=closed)
  _cli.assert_clear_error(proc, "cannot reach the GCS emulator", closed)
  proc = _bad_workdir(gcs.url(), tmp_path / "d", extra=["--mode=sample"])
  _cli.assert_clear_error(proc, "--mode=sample does not read gs:// workdirs yet")
  # Not on the storage layer yet: said so, and nothing is written under ./gs:/ instead.
  proc = _bad_workdir(gcs.url(), tmp_path / "e", extra=["--config.data.path=gs://b/latents"])
  _cli.assert_clear_error(proc, "config.data.path=gs://b/latents is on gs://")
  # Without gcsfs (a stand-in package that fails to import, as a missing one does).
  shim = tmp_path / "shim" / "gcsfs"
  shim.mkdir(parents=True)
  (shim / "__init__.py").write_text("raise ImportError('no gcsfs here')\n")
  pythonpath = os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])
  proc = _bad_workdir(gcs.url(), tmp_path / "c", PYTHONPATH=pythonpath)
  _cli.assert_clear_error(proc, "needs the gcs extra", "pip install 'dit_jax[gcs]'")
