"""The storage layer (dit_jax/storage.py) on local disks and on GCS (a local emulator), and the
clear errors for gs:// paths that cannot work."""

import importlib.util
import io
import os
import shutil

import _cli
import _gcs
import jax
import numpy as np
import portpicker
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from dit_jax import storage, utils
from dit_jax.evaluation import guides, runner, sampling, scoring


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


def _in_empty_dir(tmp_path, *args, **env):
  """The CLI run in a new empty directory, which it must leave empty (no ./gs:/... folder)."""
  cwd = tmp_path / "cwd"
  cwd.mkdir(parents=True)
  proc = _cli.run(*args, cwd=str(cwd), timeout=180, **env)
  assert os.listdir(cwd) == [], os.listdir(cwd)  # Nothing written locally.
  return proc


def _bad_workdir(workdir, tmp_path, extra=(), config=True, **env):
  args = [a.replace("configs/", os.path.join(_cli.REPO, "configs/")) for a in _cli.TINY]
  return _in_empty_dir(tmp_path, *(args if config else []), *extra, f"--workdir={workdir}", **env)


@pytest.mark.multiprocess
def test_sample_and_evaluate_a_gs_workdir_with_no_config(gcs, trained_workdir, tmp_path):
  """--mode=sample and --mode=evaluate read the config saved in the gs:// run's checkpoint and
  give the bytes and scores they give from a local copy of it."""
  url = _gcs.upload(trained_workdir, gcs.url(), only=("checkpoints",))
  local = str(tmp_path / "local")
  shutil.copytree(os.path.join(trained_workdir, "checkpoints"), os.path.join(local, "checkpoints"))
  config = runner.run_config(local)
  assert config.model.variant == "tiny/4" and config.train.batch_size == 8  # The TINY run's.
  npz, png, _ = sampling.sample_files(local, config.sample.name)
  assert runner.sample(config, local) == npz
  scores = runner.evaluate(config, local)
  proc = _in_empty_dir(tmp_path / "s", f"--workdir={url}", "--mode=sample")
  assert proc.returncode == 0, proc.output[-3000:]
  gs_npz, gs_png, _ = sampling.sample_files(url, config.sample.name)
  assert storage.read_bytes(gs_npz) == _read(npz) and storage.read_bytes(gs_png) == _read(png)
  proc = _in_empty_dir(tmp_path / "e", f"--workdir={url}", "--mode=evaluate")
  assert proc.returncode == 0, proc.output[-3000:]
  gs_scores = storage.read_json(scoring.eval_files(url, config.eval.name)[0])
  timing = ("sample_seconds",)
  assert {k: v for k, v in gs_scores.items() if k not in timing} == {
    k: v for k, v in scores.items() if k not in timing
  }
  assert "class_accuracy" in gs_scores
  # A --config alongside sets the sampling fields, and cannot change the model.
  args = [a.replace("configs/", os.path.join(_cli.REPO, "configs/")) for a in _cli.TINY]
  proc = _in_empty_dir(
    tmp_path / "m", *args, f"--workdir={url}", "--mode=sample", "--config.model.variant=tiny/2"
  )
  _cli.assert_clear_error(
    proc, "config.model.variant='tiny/2' here, 'tiny/4' in the run", "drop them"
  )


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def test_gs_workdir_errors(gcs, tmp_path):
  """A missing bucket, an unreachable service, and no gcs extra: each one line, no traceback."""
  proc = _bad_workdir("gs://no-such-bucket/run", tmp_path / "a")
  _cli.assert_clear_error(proc, "bucket gs://no-such-bucket does not exist", "gcloud storage")
  closed = f"127.0.0.1:{portpicker.pick_unused_port()}"  # Nobody listens.
  proc = _bad_workdir(gcs.url(), tmp_path / "b", STORAGE_EMULATOR_HOST=closed)
  _cli.assert_clear_error(proc, "cannot reach the GCS emulator", closed)
  proc = _bad_workdir(gcs.url(), tmp_path / "d", extra=["--mode=sample"], config=False)
  _cli.assert_clear_error(proc, "No checkpoint with its config in gs://", "pass the run's --config")
  # A gs:// input of the config in a bucket that does not exist: named, before anything runs.
  proc = _bad_workdir(gcs.url(), tmp_path / "e", extra=["--config.vae.path=gs://nobucket/vae"])
  _cli.assert_clear_error(proc, "config.vae.path: bucket gs://nobucket does not exist")
  # Without gcsfs (a stand-in package that fails to import, as a missing one does).
  shim = tmp_path / "shim" / "gcsfs"
  shim.mkdir(parents=True)
  (shim / "__init__.py").write_text("raise ImportError('no gcsfs here')\n")
  pythonpath = os.pathsep.join([str(tmp_path / "shim"), os.environ.get("PYTHONPATH", "")])
  proc = _bad_workdir(gcs.url(), tmp_path / "c", PYTHONPATH=pythonpath)
  _cli.assert_clear_error(proc, "needs the gcs extra", "pip install 'dit_jax[gcs]'")


_QS = os.path.join(_cli.REPO, "configs", "quickstart.py")
_TOOLS_WITH_A_MISSING_BUCKET = {
  "dit_jax.tools.encode_text": ["--captions=c.txt", "--out=gs://nobucket/text"],
  "dit_jax.tools.encode_latents": [f"--config={_QS}", "--vae=gs://nobucket/vae", "--out=lat"],
  "dit_jax.tools.posthoc_ema": ["--workdir=gs://nobucket/run", "--out=ema", "--std=0.05"],
  "dit_jax.tools.import_dit": [f"--config={_QS}", "--checkpoint=gs://nobucket/a.pt", "--workdir=w"],
  "dit_jax.tools.import_sd3": [f"--config={_QS}", "--transformer=gs://nobucket/t", "--workdir=w"],
  "dit_jax.evaluation.fid": ["--samples=gs://nobucket/s.npz", "--reference=r.npz", "--inception=i"],
  "dit_jax.benchmark": [f"--config={_QS}", "--input", "--config.data.path=gs://nobucket/lat"],
}


@pytest.mark.multiprocess
def test_tools_name_a_bucket_that_does_not_exist(gcs, tmp_path):
  """Every tool that takes a path checks its gs:// ones first: one line naming the bucket, no
  traceback, nothing written."""
  import concurrent.futures

  def start(module):
    return _cli.run(*_TOOLS_WITH_A_MISSING_BUCKET[module], module=module, cwd=str(tmp_path))

  modules = list(_TOOLS_WITH_A_MISSING_BUCKET)
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    runs = list(pool.map(start, modules))
  for module, proc in zip(modules, runs, strict=True):
    assert "Traceback" not in proc.output, (module, proc.output[-2000:])
    _cli.assert_clear_error(proc, "bucket gs://nobucket does not exist")
  assert os.listdir(tmp_path) == [], "a tool wrote into its current directory"


def _tree_equal(a, b) -> None:
  leaves_a, tree_a = jax.tree.flatten(jax.device_get(a))
  leaves_b, tree_b = jax.tree.flatten(jax.device_get(b))
  assert tree_a == tree_b
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.multiprocess  # trained_workdir trains through the command line.
def test_inputs_on_gs_read_as_from_a_local_disk(gcs, trained_workdir, tmp_path):
  """The config's inputs given as gs:// URLs (a VAE directory, the Inception weights, a reference
  batch with its statistics cache beside it, a prompts file, a run to start from or guide with)
  read as their local copies do."""
  from dit_jax import checkpoint, experiment
  from dit_jax.data import text
  from dit_jax.evaluation import fid
  from dit_jax.models import autoencoder, inception

  local, url = str(tmp_path / "in"), gcs.url("inputs")
  # A diffusers AutoencoderKL directory (vae.path).
  vae = autoencoder.AutoencoderConfig(
    block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4
  )
  params = autoencoder.random_params(vae, seed=0)
  for where in (local, url):
    autoencoder.save_diffusers(storage.join(where, "vae"), vae, params)
  (cfg_a, a), (cfg_b, b) = (
    autoencoder.load_diffusers(storage.join(w, "vae")) for w in (local, url)
  )
  assert cfg_a == cfg_b == vae
  _tree_equal(a, b)

  # The Inception weights (eval.inception_weights): the same hash keys the reference cache.
  weights = [storage.join(w, "inception.npz") for w in (local, url)]
  for w in weights:
    inception.random_weights(w, seed=1)
  assert fid.weights_hash(weights[0]) == fid.weights_hash(weights[1])
  _tree_equal(inception.load_params(weights[0]), inception.load_params(weights[1]))
  if importlib.util.find_spec("torch"):  # The standard .pth, converted once to .pth.npz beside.
    pth = storage.join(url, "inception.pth")
    inception.random_weights(pth, seed=1)
    _tree_equal(inception.load_params(pth), inception.load_params(weights[0]))
    assert storage.isfile(pth + ".npz")

  # A reference batch (eval.reference): the same statistics, cached beside it in the bucket.
  images = np.random.default_rng(2).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  for w in (local, url):
    storage.save_npz(storage.join(w, "ref.npz"), arr_0=images)

  def featurize(batch):
    x = batch.reshape(len(batch), -1).astype(np.float32) / 255
    return {"pool": x[:, :16], "spatial": x[:, 16:24], "logits": x[:, 24:34]}

  def must_not_featurize(_):
    raise AssertionError("the reference was featurized again instead of read from the cache")

  got = [
    fid.reference_statistics(storage.join(w, "ref.npz"), featurize, weights_id="w")
    for w in (local, url)
  ]
  _tree_equal(got[0], got[1])
  assert storage.isfile(fid.cache_path(storage.join(url, "ref.npz")))
  again = fid.reference_statistics(storage.join(url, "ref.npz"), must_not_featurize, weights_id="w")
  _tree_equal(again, got[1])

  # A prompts file (sample.prompts), read as open() reads text: any line ending.
  storage.write_text(storage.join(url, "prompts.txt"), "a red circle\r\nblue\n\nlast")
  assert text.read_captions(storage.join(url, "prompts.txt")) == [
    "a red circle",
    "blue",
    "",
    "last",
  ]

  # A run in a bucket to start from (train.init_from) and to guide with (sample.guide.workdir).
  run = _gcs.upload(trained_workdir, gcs.url("run"), only=("checkpoints",))
  exp = experiment.build(_cli.tiny_config(), training=False)
  from_gs = checkpoint.restore_weights(run, exp.abstract_state.params)
  from_disk = checkpoint.restore_weights(trained_workdir, exp.abstract_state.params)
  assert from_gs[0] == from_disk[0] == _cli.TINY_STEPS
  _tree_equal(from_gs[1:], from_disk[1:])
  guided = _cli.tiny_config(sample__guidance_scale=2.0)
  guided.sample.guide.workdir, guided.sample.guide.step = run, 2
  guide = guides.load_guide(guided, exp.mesh)
  assert guide.step == 2 and guide.workdir == run
