"""Scoring with the FID Inception's interface in --mode=evaluate and during training.

Invariants: evaluating during training changes neither the losses nor the checkpoints of a run; a
run killed during an evaluation resumes and logs the same numbers; a killed --mode=evaluate
resumes from its chunks; samples scored against the very images --mode=sample wrote for the same
config have FID 0 and precision = recall = 1; digits keep their built-in metrics; bad input is one
clear error.

The network is `_stand_in_inception` (the Inception's class and feature widths, milliseconds to
compile), except in the sharded featurization test: the real one is tested against torch-fidelity
in tests/test_inception.py. The Fréchet distance of 2048-dimensional statistics costs a minute of
scipy's sqrtm on these shared CPUs, so the tests score through `low_rank_frechet`, the same
formula in the span of the two covariances (exact for fewer samples than dimensions; checked
against `metrics.frechet_distance` below).
"""

import json
import logging
import math
import os

import _cli
import _stand_in_inception
import jax
import numpy as np
import pytest
from PIL import Image

from dit_jax import checkpoint, checks, experiment, parallel
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.evaluation import hooks, metrics, runner, sampling, scoring
from dit_jax.models import inception
from dit_jax.train import loop

NUM = 16  # Samples per evaluation: 2 chunks of 8, one row per device.
STEPS, EVAL_EVERY = 4, 2
# The real ones, before the tests replace them.
_FRECHET, _SAMPLE_CHUNKS = metrics.frechet_distance, sampling.sample_chunks


def low_rank_frechet(mu1, sigma1, mu2, sigma2):
  """`metrics.frechet_distance` for covariances of rank < 40: in an orthonormal basis U holding
  both column spaces, S1 = U A U^T and S2 = U B U^T, and tr sqrtm(S1 S2) is the sum of the square
  roots of the eigenvalues of A^1/2 B A^1/2."""
  omega = np.random.default_rng(0).standard_normal((sigma1.shape[0], 40))
  basis, _ = np.linalg.qr(np.concatenate([sigma1 @ omega, sigma2 @ omega], axis=1))
  a, b = basis.T @ sigma1 @ basis, basis.T @ sigma2 @ basis
  w, v = np.linalg.eigh(a)
  half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  roots = np.sqrt(np.clip(np.linalg.eigvalsh(half @ b @ half), 0, None))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sum(roots))


@pytest.fixture(autouse=True)
def fast_frechet(monkeypatch):
  monkeypatch.setattr(metrics, "frechet_distance", low_rank_frechet)


@pytest.fixture(scope="module", autouse=True)
def stand_in_weights(tmp_path_factory):
  """Weights of the stand-in Inception; `Inception.load` builds it from them (and the real
  network from real weights) in this module."""
  with pytest.MonkeyPatch.context() as m:
    _stand_in_inception.patch(m)
    path = tmp_path_factory.mktemp("stand_in") / "inception.npz"
    yield _stand_in_inception.write(str(path))


def test_low_rank_frechet_is_the_frechet_distance():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(12, 64)), rng.normal(size=(9, 64)) * 1.5 + 0.3
  args = (*metrics.feature_statistics(a), *metrics.feature_statistics(b))
  want = _FRECHET(*args)
  assert math.isclose(low_rank_frechet(*args), want, rel_tol=1e-6) and want > 1


@pytest.mark.sharding
def test_sharded_featurization_keeps_the_order_of_the_images(inception_weights):
  mesh = parallel.make_mesh(base_config(), jax.devices()[:2])
  net = inception.Inception.load(inception_weights, mesh)
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
  want = net.features(images, batch_size=4)
  want = np.concatenate([want[name] for name, _ in scoring.FEATURES], axis=1)
  # 3 rows a device in steps of 2 and 1 (padded); the last image is padding to drop.
  sharded = jax.device_put(images, parallel.batch_sharding(mesh))
  got = scoring.featurize_sharded(net, sharded, 5, batch_size=4)
  # Other per-device batch shapes may round differently (XLA's CPU dots split their work by
  # the threads free at the time): the same to float32 rounding, in the same order.
  np.testing.assert_allclose(got, want[:5], rtol=1e-4, atol=1e-5)
  assert not np.allclose(got[:4], want[1:5], rtol=1e-4, atol=1e-5)  # A shifted order fails.


# --- A tiny class-conditional DiT on an image folder -------------------------------------------


def folder_config(data_dir: str, weights: str):
  c = base_config()
  c.model.variant, c.model.num_classes = "tiny/4", 2
  c.data.update(name="folder", path=data_dir, image_size=8, channels=3)
  c.train.update(batch_size=8, num_steps=STEPS, log_every=1, checkpoint_every=EVAL_EVERY)
  c.train.update(ema_decay=0.5, eval_every=EVAL_EVERY, eval_num_images=NUM)
  c.sample.update(num_steps=2, batch_size=8, num_images=NUM)
  c.eval.update(inception_weights=weights, num_images=NUM, batch_size=8)
  return c


@pytest.fixture(scope="module")
def folder(tmp_path_factory, stand_in_weights):
  """(config, root): 16 random 8x8 RGB images in two class folders, and the config of a tiny DiT
  on them that is scored (16 samples) every 2 of its 4 steps."""
  root = tmp_path_factory.mktemp("evaluate")
  rng = np.random.default_rng(0)
  for i in range(NUM):
    directory = root / "images" / f"class{i % 2}"
    directory.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(directory / f"{i}.png")
  return folder_config(str(root / "images"), stand_in_weights), root


def _log(workdir: str) -> list[dict]:
  """metrics.jsonl without its wall-clock fields."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return [{k: v for k, v in line.items() if k not in ("time", "images_per_sec")} for line in lines]


def _final_weights(config, workdir: str):
  exp = experiment.build(config, training=False)
  _, params, ema = checkpoint.restore_weights(workdir, exp.abstract_state.params, config)
  return jax.device_get((params, ema))


def _kill_after_chunks(monkeypatch, calls: int, chunks: int, firsts: list[int]) -> None:
  """Makes the `calls`-th featurized sampling (counting from 1) stop as if killed once `chunks`
  of its chunks are done, and records where every featurized sampling started."""
  count = [0]

  def chunked(*args, **kwargs):
    if kwargs.get("gather", True):  # Image grids and in-memory sampling.
      yield from _SAMPLE_CHUNKS(*args, **kwargs)
      return
    count[0] += 1
    firsts.append(kwargs.get("first", 0))
    for i, item in enumerate(_SAMPLE_CHUNKS(*args, **kwargs)):
      if count[0] == calls and i == chunks:
        raise KeyboardInterrupt
      yield item

  monkeypatch.setattr(sampling, "sample_chunks", chunked)


@pytest.fixture(scope="module")
def runs(folder):
  """Workdirs of the same 4 steps trained without evaluation ("off") and with it, killed in the
  middle of the evaluation of step 4 and rerun ("on"), with what the kill left behind, and the
  scores of an uninterrupted --mode=evaluate of the final checkpoint ("full")."""
  config, root = folder
  off = config.copy_and_resolve_references()
  off.train.eval_every = 0
  out = {"off": str(root / "off"), "on": str(root / "on"), "firsts": []}
  with pytest.MonkeyPatch.context() as m:
    m.setattr(metrics, "frechet_distance", low_rank_frechet)  # Module scope: set here too.
    loop.run(off, out["off"], hooks.TrainingHooks(out["off"]))
    _kill_after_chunks(m, calls=2, chunks=1, firsts=out["firsts"])
    with pytest.raises(KeyboardInterrupt):
      loop.run(config, out["on"], hooks.TrainingHooks(out["on"]))
    out["parts_after_kill"] = sorted(
      os.listdir(scoring.eval_files(out["on"], "during_training")[1])
    )
    out["log_after_kill"] = _log(out["on"])
    out["checkpoints_after_kill"] = sorted(os.listdir(os.path.join(out["on"], "checkpoints")))
    _kill_after_chunks(m, calls=0, chunks=0, firsts=out["firsts"])
    loop.run(config, out["on"], hooks.TrainingHooks(out["on"]))
    full = config.copy_and_resolve_references()
    full.eval.name = "full"
    out["full"] = runner.evaluate(full, out["on"])
  return out


@pytest.mark.integration
def test_evaluation_during_training_changes_no_loss_and_no_checkpoint(folder, runs):
  config, _ = folder
  off, on = _log(runs["off"]), _log(runs["on"])
  scored = [line for line in on if "fid" in line]
  assert [line["step"] for line in scored] == [2, 4]
  for line in scored:
    assert set(scoring.SCORE_KEYS) <= set(line) and all(map(math.isfinite, line.values()))
  assert scored[0]["fid"] != scored[1]["fid"]  # The EMA moved in between.
  assert [line for line in on if "fid" not in line] == off
  weights_off, weights_on = _final_weights(config, runs["off"]), _final_weights(config, runs["on"])
  jax.tree.map(np.testing.assert_array_equal, weights_on, weights_off)


@pytest.mark.integration
def test_a_run_killed_during_an_evaluation_resumes_and_logs_the_same_numbers(runs):
  # Killed in step 4's evaluation, after its first chunk of 8: the checkpoint of step 4 comes
  # after its scores, so the rerun resumed from step 2, repeated steps 3-4 and finished the
  # evaluation from its chunk on disk.
  assert runs["checkpoints_after_kill"] == ["2"], runs["checkpoints_after_kill"]
  assert runs["parts_after_kill"] == ["00000000-00000008.npy", sampling.FINGERPRINT_FILE]
  assert [line["step"] for line in runs["log_after_kill"] if "fid" in line] == [2]
  # Where each featurized sampling started: steps 2 and 4, step 4 again at sample 8, evaluate.
  assert runs["firsts"] == [0, 0, 8, 0]
  assert not os.path.exists(scoring.eval_files(runs["on"], scoring.TRAINING_PARTS)[1])
  logged = [line for line in _log(runs["on"]) if "fid" in line][-1]
  assert {k: logged[k] for k in scoring.SCORE_KEYS} == {
    k: runs["full"][k] for k in scoring.SCORE_KEYS
  }


@pytest.mark.integration
def test_evaluate_writes_every_score_against_the_own_data_cached_under_a_key(runs):
  scores = runs["full"]
  path = scoring.eval_files(runs["on"], "full")[0]
  with open(path) as f:
    assert json.load(f) == scores
  want = {*scoring.SCORE_KEYS, "num_images", "num_reference", "reference", "step", "sampler"}
  assert want <= set(scores), scores
  assert all(math.isfinite(scores[k]) for k in scoring.SCORE_KEYS), scores
  assert scores["num_images"] == scores["num_reference"] == NUM and scores["step"] == STEPS
  assert not os.path.exists(scoring.eval_files(runs["on"], "full")[1])
  # Training and evaluate share the reference computed once from the 16 training images.
  eval_dir = os.path.join(runs["on"], "eval")
  cached = [n for n in os.listdir(eval_dir) if n.startswith("reference_")]
  assert cached == [os.path.basename(scores["reference"])], os.listdir(eval_dir)
  with np.load(scores["reference"]) as z:
    assert z["pool"].shape == (NUM, 2048) and z["sigma_s"].shape == (2023, 2023)


@pytest.mark.integration
def test_killed_evaluate_resumes_to_the_scores_of_the_samples_it_would_write(folder, runs):
  config, _ = folder
  workdir = runs["on"]
  config = config.copy_and_resolve_references()
  config.sample.name, config.eval.name = "reference", "self"
  reference = runner.sample(config, workdir)  # The very images evaluate samples and scores.
  config.eval.reference = reference
  path, parts = scoring.eval_files(workdir, "self")
  firsts = []
  with pytest.MonkeyPatch.context() as m:
    _kill_after_chunks(m, calls=1, chunks=1, firsts=firsts)
    with pytest.raises(KeyboardInterrupt):
      runner.evaluate(config, workdir)
  assert not os.path.exists(path) and len(os.listdir(parts)) == 2
  with pytest.MonkeyPatch.context() as m:
    _kill_after_chunks(m, calls=0, chunks=0, firsts=firsts)
    scores = runner.evaluate(config, workdir)  # No --overwrite needed: the run is unfinished.
  assert firsts == [0, 8]
  assert not os.path.exists(parts)
  assert scores["reference"] == reference and scores["num_reference"] == NUM
  with np.load(reference.removesuffix(".npz") + ".dit_jax_stats.npz") as z:
    fid_scale, sfid_scale = 2 * np.trace(z["sigma"]), 2 * np.trace(z["sigma_s"])
  assert abs(scores["fid"]) <= 1e-6 * fid_scale and abs(scores["sfid"]) <= 1e-6 * sfid_scale
  assert scores["precision"] == scores["recall"] == 1.0
  # The Inception Score needs no reference: that of the uninterrupted evaluation.
  assert scores["inception_score"] == runs["full"]["inception_score"]
  with pytest.raises(ConfigError, match=r"self\.json exists .*--overwrite"):
    runner.evaluate(config, workdir)


@pytest.mark.integration
def test_a_gs_workdir_evaluates_resumes_and_scores_as_a_local_copy(runs, gcs, tmp_path):
  """The run's checkpoints on GCS (the emulator) and in a local copy, each evaluated with the
  config saved in them: the gs:// evaluation, killed after its first chunk of features and rerun,
  computes the own reference and gives the local copy's scores, and leaves no chunks behind."""
  import shutil

  import _gcs

  from dit_jax import storage

  url = _gcs.upload(runs["on"], gcs.url(), only=("checkpoints",))
  local = str(tmp_path / "local")
  shutil.copytree(os.path.join(runs["on"], "checkpoints"), os.path.join(local, "checkpoints"))
  want = runner.evaluate(runner.run_config(local), local)
  config = runner.run_config(url)
  assert config.data.name == "folder" and config.eval.num_images == NUM
  path, parts = scoring.eval_files(url, config.eval.name)
  with pytest.MonkeyPatch.context() as m:
    _kill_after_chunks(m, calls=1, chunks=1, firsts=[])
    with pytest.raises(KeyboardInterrupt):
      runner.evaluate(config, url)
  # The reference was computed whole, then the samples' features killed after one chunk.
  assert not storage.exists(path)
  assert storage.listdir(parts) == ["00000000-00000008.npy", sampling.FINGERPRINT_FILE]
  firsts = []
  with pytest.MonkeyPatch.context() as m:
    _kill_after_chunks(m, calls=0, chunks=0, firsts=firsts)
    got = runner.evaluate(config, url)
  assert firsts == [8] and not storage.exists(parts)
  assert storage.read_json(path) == got
  drop = ("sample_seconds", "reference")
  assert {k: v for k, v in got.items() if k not in drop} == {
    k: v for k, v in want.items() if k not in drop
  }
  assert os.path.basename(want["reference"]) == storage.basename(got["reference"])
  reference = os.path.join(local, "eval", os.path.basename(want["reference"]))
  with open(reference, "rb") as f:
    assert storage.read_bytes(got["reference"]) == f.read()


# --- The toy data keep their built-in metrics ----------------------------------------------------


@pytest.mark.integration
def test_digits_keep_their_metrics_and_add_the_inceptions(
  trained_workdir, tmp_path, stand_in_weights
):
  workdir = _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))
  config = _cli.tiny_config(eval__inception_weights=stand_in_weights)
  scores = runner.evaluate(config, workdir)
  assert all(math.isfinite(scores[k]) for k in scoring.SCORE_KEYS), scores
  # Their built-in metrics, as training logs them without weights: the same numbers.
  config = _cli.tiny_config(train__eval_every=2, train__eval_num_images=scores["num_images"])
  exp = experiment.build(config, training=False)
  params, _ = runner.restore_params(exp, workdir)
  logged = hooks.training_evaluator(exp, workdir, sampling.make_sampler(exp), None)(params, 6)
  assert {"class_accuracy", "frechet_distance"} <= set(logged)  # (+ diversity given 2 a class)
  assert logged == {k: scores[k] for k in logged}


# --- Bad input --------------------------------------------------------------------------------


@pytest.mark.multiprocess
def test_cli_evaluate_without_the_inception_weights_is_one_clear_line(tmp_path):
  args = [*_cli.TINY, f"--workdir={tmp_path / 'run'}", "--mode=evaluate"]
  proc = _cli.run(*args, "--config.data.name=synthetic", "--config.data.channels=3")
  _cli.assert_clear_error(proc, "config.eval.inception_weights", "pt_inception-2015-12-05")
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
  "fields, says",
  [
    ({"eval__inception_weights": ""}, "set config.eval.inception_weights to pt_inception"),
    ({"eval__inception_weights": "/nowhere/w.pth"}, "'/nowhere/w.pth' does not exist"),
    ({"eval__num_images": 1}, "eval.num_images=1 must be at least 2"),
    ({"data__name": "latents", "data__channels": 4}, "config.vae.path is empty"),
  ],
)
def test_evaluate_that_cannot_score_stops_before_building_anything(
  folder, fields, says, monkeypatch
):
  config, _ = folder
  config = config.copy_and_resolve_references()
  for key, value in fields.items():
    section, name = key.split("__")
    config[section][name] = value
  monkeypatch.setattr(experiment, "build", lambda *a, **k: pytest.fail("built the model"))
  with pytest.raises(ConfigError, match=says):
    runner.evaluate(config, "/nonexistent")


@pytest.mark.parametrize(
  "fields, says",
  [
    ({"train__eval_num_images": 1}, "eval_num_images=1 must be at least 2"),
    ({"eval__inception_weights": ""}, "set config.eval.inception_weights"),
    ({"data__name": "latents", "data__channels": 4}, "config.vae.path is empty"),
    ({"eval__batch_size": 0}, "eval.batch_size=0 must be > 0"),
    ({"train__eval_every": -1}, "eval_every=-1 must be >= 0"),
  ],
)
def test_evaluation_during_training_is_validated_up_front(folder, fields, says):
  config, _ = folder
  config = config.copy_and_resolve_references()
  for key, value in fields.items():
    section, name = key.split("__")
    config[section][name] = value
  with pytest.raises(ConfigError, match=says):
    checks.validate(config)


def test_digits_evaluate_during_training_without_weights():
  checks.validate(_cli.tiny_config(train__eval_every=2))


def test_eval_fields_that_nothing_reads_log_one_warning_each(caplog):
  config = base_config()
  config.eval.reference, config.train.eval_num_images = "ref.npz", 10
  with caplog.at_level(logging.WARNING):
    checks.validate(config)
  said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert said == [
    "config.train.eval_num_images=10 has no effect: only evaluation during training reads it, "
    "and config.train.eval_every=0.",
    "config.eval.reference='ref.npz' has no effect: only the FID Inception reads it, and "
    "config.eval.inception_weights=''.",
  ]


def _npz(path, **arrays) -> str:
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return str(path)


@pytest.mark.parametrize(
  "arrays, says",
  [
    ({"labels": np.arange(4)}, "neither arr_0 images nor the statistics"),
    ({"arr_0": np.zeros((4, 8, 8, 3), np.float32)}, "must be uint8"),
    (
      {"mu": np.zeros(64), "sigma": np.eye(64), "mu_s": np.zeros(8), "sigma_s": np.eye(8)},
      "comes from another network",
    ),
  ],
  ids=["no_images", "floats", "other_network"],
)
def test_a_bad_reference_is_one_clear_error_naming_the_field(folder, runs, tmp_path, arrays, says):
  config, _ = folder
  config = config.copy_and_resolve_references()
  config.eval.reference = _npz(tmp_path / "ref.npz", **arrays)
  with pytest.raises(ConfigError, match=says) as e:
    runner.evaluate(config, runs["on"])
  assert str(e.value).startswith(f"config.eval.reference={config.eval.reference!r}")
  assert not os.path.exists(scoring.eval_files(runs["on"], config.eval.name)[0])


def test_within_class_distance_averages_same_class_pairs_only():
  from dit_jax.evaluation import metrics

  features = np.array([[0.0, 0.0], [3.0, 4.0], [100.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 4.0]])
  labels = np.array([0, 0, 1, 2, 2, 2])  # Class 1 has one sample: no pair, left out.
  # Class 0: one pair at distance 5; class 2: pairs at 1, 3, 2 (mean 2).
  assert metrics.within_class_distance(features, labels) == pytest.approx((5.0 + 2.0) / 2)
  with pytest.raises(ValueError, match="at least two samples"):
    metrics.within_class_distance(features[:3], np.array([0, 1, 2]))
