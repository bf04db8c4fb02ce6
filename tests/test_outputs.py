"""Results already on disk stay there unless replacing them is asked for (--overwrite), the last
log line names what a run wrote, and latents data that is not a numeric array, or holds negative
class ids, is one clear error naming the file."""

import json
import logging
import os
import re

import _cli
import numpy as np
import pytest

from dit_jax import data, storage
from dit_jax import diffusion as diffusion_lib
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.evaluation import runner, sampling


@pytest.fixture
def workdir(trained_workdir, tmp_path):
  return _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))


def _sha(path: str) -> str:
  return _cli.snapshot(os.path.dirname(path))[os.path.basename(path)]


def _no_build(*args, **kwargs):
  raise AssertionError("the run went on to build the model")


def test_sample_keeps_earlier_samples_unless_overwrite(workdir, monkeypatch, caplog):
  config = _cli.tiny_config()
  npz, png, parts = sampling.sample_files(workdir, config.sample.name)
  with caplog.at_level(logging.INFO):
    assert runner.sample(config, workdir) == npz
  last = caplog.records[-1].getMessage()
  assert npz in last and png in last, last
  first = _cli.snapshot(os.path.dirname(npz))
  assert set(first) == {"samples.npz", "samples.png"}

  # A second run of the same name stops before it builds anything, and changes no file.
  with monkeypatch.context() as m:
    m.setattr(runner.experiment, "build", _no_build)
    with pytest.raises(ConfigError, match=r"samples\.npz exists .*sample\.name=.*--overwrite"):
      runner.sample(config, workdir)
  os.rename(npz, npz + ".kept")  # The grid alone is a result too.
  with monkeypatch.context() as m:
    m.setattr(runner.experiment, "build", _no_build)
    with pytest.raises(ConfigError, match=r"samples\.png exists .*--overwrite"):
      runner.sample(config, workdir)
  os.rename(npz + ".kept", npz)
  assert _cli.snapshot(os.path.dirname(npz)) == first

  # overwrite replaces the samples (of another seed here), and the chunks of another config
  # that a killed run left under this name.
  os.makedirs(parts)
  with open(os.path.join(parts, sampling.FINGERPRINT_FILE), "w") as f:
    json.dump({"sample.seed": 99}, f)
  config.sample.seed = 1
  runner.sample(config, workdir, overwrite=True)
  replaced = _cli.snapshot(os.path.dirname(npz))
  assert set(replaced) == {"samples.npz", "samples.png"}
  assert replaced["samples.npz"] != first["samples.npz"]
  assert replaced["samples.png"] != first["samples.png"]
  with np.load(npz) as f:
    assert f["arr_0"].shape == (8, 16, 16, 1)


def test_killed_sampling_resumes_without_overwrite(workdir, monkeypatch):
  config = _cli.tiny_config()
  config.sample.name, config.sample.num_images = "killed", 16  # Two chunks of 8.
  npz, png, parts = sampling.sample_files(workdir, "killed")
  real, firsts = sampling.sample_chunks, []

  def one_chunk_then_killed(*args, **kwargs):
    firsts.append(kwargs.get("first", 0))
    for i, item in enumerate(real(*args, **kwargs)):
      if i == 1:
        raise KeyboardInterrupt
      yield item

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as m:
    m.setattr(sampling, "sample_chunks", one_chunk_then_killed)
    with pytest.raises(KeyboardInterrupt):
      runner.sample(config, workdir)
    assert not os.path.exists(npz) and os.path.isdir(parts)
    # Killed again after the .npz and the grid were written, before the chunks were removed.
    m.setattr(storage.ChunkStore, "remove", killed)
    with pytest.raises(KeyboardInterrupt):
      runner.sample(config, workdir)
    assert os.path.isfile(npz) and os.path.isfile(png) and os.path.isdir(parts)
  assert firsts == [0, 8]
  written = _sha(npz)
  # The .parts directory says the run is unfinished: a rerun finishes it without overwrite.
  runner.sample(config, workdir)
  assert not os.path.exists(parts)
  assert _sha(npz) == written
  with pytest.raises(ConfigError, match="killed.npz exists"):
    runner.sample(config, workdir)


@pytest.mark.multiprocess
def test_evaluate_cli_records_the_sampler_used_and_keeps_the_scores(workdir):
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}", "--mode=evaluate")
  _cli.assert_quiet(proc)
  assert proc.returncode == 0, proc.output[-3000:]
  path = os.path.join(workdir, "eval", "eval.json")
  logs = [line for line in proc.output.splitlines() if "eval.json" in line]
  assert logs and path in logs[-1], proc.output[-3000:]
  with open(path) as f:
    scores = json.load(f)
  config = _cli.tiny_config()
  assert config.sample.sampler == "auto"
  assert scores["sampler"] == diffusion_lib.resolve_sampler(config) != "auto"
  assert scores["num_steps"] == config.sample.num_steps == 2
  assert scores["step"] == _cli.TINY_STEPS

  before = _cli.snapshot(workdir)
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}", "--mode=evaluate")
  _cli.assert_clear_error(proc, "eval.json exists", "--config.eval.name=", "--overwrite")
  assert _cli.snapshot(workdir) == before


def _latents_dir(tmp_path, latents=None, labels=None):
  latents = np.zeros((3, 4, 4, 1), np.float32) if latents is None else latents
  np.save(tmp_path / "latents.npy", latents, allow_pickle=True)
  np.save(tmp_path / "labels.npy", np.arange(3) if labels is None else labels, allow_pickle=True)
  config = base_config()
  config.data.update(name="latents", path=str(tmp_path), image_size=4, channels=1)
  return config


_FLOATS = np.zeros((3, 4, 4, 1), np.float32)


def _write_text(path):
  path.write_text("3 4 4 1\n0.0 0.1\n")


def _write_npz(path):
  with open(path, "wb") as f:
    np.savez(f, latents=_FLOATS)


def _truncate(path):
  np.save(path, _FLOATS)
  path.write_bytes(path.read_bytes()[:-8])


@pytest.mark.parametrize(
  "write, holds",
  [
    (lambda p: np.save(p, np.array([{"a": 1}, None]), allow_pickle=True), "Python objects"),
    (lambda p: np.save(p, np.array(["a latent", "b"])), r"strings \(<U8\) \[2\]"),
    (_write_text, "is a text file"),
    (_write_npz, r"is an \.npz archive"),
    (_truncate, r"is truncated \(312 of the 320 bytes of float32 \[3, 4, 4, 1\]\)"),
    (lambda p: np.save(p, _FLOATS[..., 0]), r"holds float32 \[3, 4, 4\]"),
  ],
  ids=["objects", "strings", "text", "npz", "truncated", "3d"],
)
def test_latents_that_are_not_a_float_array_are_one_clear_error(tmp_path, write, holds):
  config = _latents_dir(tmp_path)
  write(tmp_path / "latents.npy")
  path = str(tmp_path / "latents.npy")
  with pytest.raises(data.DataError) as e:
    data.build_source(config)
  message = str(e.value)
  assert message.startswith(repr(path)) and "pickled" not in message
  assert re.search(holds, message), message
  assert "float16 or float32 [N, H, W, C]" in message and "dit_jax.tools.encode_latents" in message


@pytest.mark.parametrize(
  "labels, holds",
  [
    (np.array([0, -1, 2]), r"negative class ids \(-1 in row 1\)"),
    (np.array([0, 1, None]), "Python objects"),
    (np.array([0.0, 1.0, 2.0]), r"float64 \[3\]"),
    (np.array([0, 1]), r"int64 \[2\]"),
  ],
  ids=["negative", "objects", "floats", "short"],
)
def test_labels_out_of_range_or_not_integers_are_one_clear_error(tmp_path, labels, holds):
  config = _latents_dir(tmp_path, labels=labels)
  with pytest.raises(data.DataError, match=rf"^'.*labels\.npy' (holds )?{holds}") as e:
    data.build_source(config, num_classes=10)
  assert "integer class ids [3]" in str(e.value) and "0..K-1" in str(e.value)


def test_more_classes_than_the_model_names_the_labels_file(tmp_path):
  config = _latents_dir(tmp_path, labels=np.array([0, 11, 2]))
  with pytest.raises(data.DataError, match=r"12 classes \(class ids up to 11 in '.*labels\.npy'\)"):
    data.build_source(config, num_classes=10)
  assert data.build_source(config, num_classes=12).num_classes == 12
