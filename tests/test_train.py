"""End to end on a tiny DiT: train -> checkpoint -> resume -> sample -> evaluate, and the CLI."""

import importlib.util
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from dit_jax import checks, experiment, parallel, utils
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.evaluation import hooks, runner
from dit_jax.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**train):
  c = base_config()
  c.model.variant = "tiny/4"
  c.data.image_size = 16
  c.train.batch_size = 16
  c.train.num_steps = 20
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.lr = 1e-3
  c.train.ema_decay = 0.9
  c.sample.num_steps = 4
  c.sample.num_images = 24
  c.sample.batch_size = 16
  c.sample.guidance_scale = 2.0
  c.eval.num_images = 40
  for k, v in train.items():
    c.train[k] = v
  return c


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _final_params(workdir, step):
  exp = experiment.build(tiny_config())
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as mgr:
    restored = mgr.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
          exp.abstract_state,
          restore_args=ocp.checkpoint_utils.construct_restore_args(exp.abstract_state),
        )
      ),
    )
  return restored["state"]


@pytest.mark.integration
def test_train_resume_sample_evaluate(tmp_path):
  workdir = str(tmp_path / "run")
  loop.run(tiny_config(num_steps=10), workdir, hooks.TrainingHooks(workdir))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]
  # Rerunning the same command with more steps resumes at 10, not from scratch.
  loop.run(tiny_config(num_steps=20), workdir, hooks.TrainingHooks(workdir))
  records = _read_metrics(workdir)
  assert [r["step"] for r in records] == [5, 10, 15, 20]
  for r in records:
    assert {"step", "loss", "lr", "grad_norm", "images_per_sec"} <= set(r)
    assert np.isfinite(r["loss"]) and r["images_per_sec"] > 0
  assert os.path.exists(os.path.join(workdir, "images", "step_0000020.png"))
  assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))

  # Resuming is exact: the interrupted run ends with the uninterrupted run's parameters.
  straight = str(tmp_path / "straight")
  loop.run(tiny_config(num_steps=20), straight)
  a, b = _final_params(workdir, 20), _final_params(straight, 20)
  assert int(a.step) == int(b.step) == 20
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert [r["loss"] for r in _read_metrics(straight)] == [r["loss"] for r in records]

  config = tiny_config()
  path = runner.sample(config, workdir)
  with np.load(path) as f:
    images, labels = f["arr_0"], f["labels"]
  assert images.dtype == np.uint8 and images.shape == (24, 16, 16, 1)
  np.testing.assert_array_equal(labels, np.arange(24) % 10)  # Balanced labels.
  assert os.path.exists(path.replace(".npz", ".png"))

  other = tiny_config()
  other.model.variant = "tiny/2"  # Another patch size: the patch projections differ in shape.
  with pytest.raises(ConfigError, match="variant='tiny/4'"):
    runner.sample(other, workdir, overwrite=True)

  results = runner.evaluate(config, workdir)
  assert 0.0 <= results["class_accuracy"] <= 1.0 and np.isfinite(results["frechet_distance"])
  with open(os.path.join(workdir, "eval", "eval.json")) as f:
    assert json.load(f)["class_accuracy"] == results["class_accuracy"]


@pytest.mark.sharding
def test_samples_do_not_depend_on_device_count(tmp_path):
  workdir = str(tmp_path / "run")
  loop.run(tiny_config(num_steps=5), workdir)
  outs = []
  for devices in (jax.devices(), jax.devices()[:1]):
    exp = experiment.build(tiny_config(), devices=devices)
    params, _ = runner.restore_params(exp, workdir)
    from dit_jax.evaluation import sampling

    images, _ = sampling.generate(exp, params, 16, seed=3, progress=False)
    outs.append(images)
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-4)


@pytest.mark.sharding
def test_batch_not_divisible_by_devices_is_a_clear_error():
  with pytest.raises(ConfigError, match="train.batch_size"):
    experiment.build(tiny_config(batch_size=12))
  assert parallel.data_parallel_size(experiment.build(tiny_config()).mesh) == 8


@pytest.mark.parametrize(
  "section,field,value,match",
  [
    ("diffusion", "objective", "x0", "diffusion.objective"),
    ("model", "variant", "H/2", "model.variant"),
    ("sample", "sampler", "dpm++", "sample.sampler"),
    ("train", "num_steps", 0, "train.num_steps"),
  ],
)
def test_bad_values_name_the_field(section, field, value, match):
  config = tiny_config()
  config[section][field] = value
  with pytest.raises(ConfigError, match=match):  # As a program checks it: first, then builds.
    checks.validate(config)
    experiment.build(config)


def test_ddim_with_rectified_flow_is_rejected():
  config = tiny_config()
  config.sample.sampler = "ddim"
  with pytest.raises(ConfigError, match="sample.sampler"):
    checks.validate(config)


def _load_config_module(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _cli(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "dit_jax.main", *args],
    capture_output=True,
    text=True,
    cwd=cwd,
    env=env,
    timeout=300,
  )


@pytest.mark.multiprocess
def test_cli_errors_are_one_clear_line(tmp_path):
  wd = f"--workdir={tmp_path}"
  proc = _cli("--config=configs/quickstart.py", wd, "--config.train.bogus=1")
  assert proc.returncode != 0 and "bogus" in proc.stderr
  proc = _cli("--config=configs/quickstart.py", wd, "--config.diffusion.objective=x0")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith("Error: config.diffusion.objective='x0'")
  proc = _cli("--config=configs/quickstart.py", wd, "--mode=sample")
  assert proc.returncode == 1 and "No checkpoint" in proc.stderr.strip().splitlines()[-1]
  proc = _cli(
    "--config=configs/quickstart.py",
    wd,
    "--config.data.name=folder",
    f"--config.data.path={tmp_path}/missing",
  )
  assert proc.returncode == 1 and "config.data.path" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.integration
def test_imagenet_config_runlocal_trains(tmp_path):
  dit_imagenet256 = _load_config_module("dit_imagenet256")
  config = dit_imagenet256.get_config("variant=XL/2,objective=eps,runlocal")
  assert config.model.variant == "tiny/2" and config.model.learn_sigma
  config.train.num_steps = 4
  config.train.checkpoint_every = 4
  metrics = loop.run(config, str(tmp_path))
  assert np.isfinite(metrics["loss"]) and "vb" in metrics
  full = dit_imagenet256.get_config("variant=B/4,objective=rectified_flow")
  assert full.model.variant == "B/4" and not full.model.learn_sigma
  with pytest.raises(ValueError, match="Unknown config arg"):
    dit_imagenet256.get_config("varient=B/2")


def test_metric_writer_writes_what_tensorboard_reads(tmp_path):
  writer = utils.MetricWriter(str(tmp_path))
  writer.write(5, {"loss": 0.25, "lr": 1e-3})
  writer.write(10, {"loss": 0.125, "lr": 1e-3})
  grid = np.zeros((6, 4, 3), np.uint8)
  grid[:, :, 0] = 200
  writer.write_image(10, "samples", grid)
  writer.write_image(10, "gray", grid[..., :1])
  writer.close()
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={})
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("loss")] == [(5, 0.25), (10, 0.125)]
  assert [e.step for e in events.Scalars("lr")] == [5, 10]
  for tag, channels in (("samples", 3), ("gray", 1)):
    (image,) = events.Images(tag)
    assert (image.step, image.height, image.width) == (10, 6, 4)
    decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
    np.testing.assert_array_equal(decoded.reshape(6, 4, channels), grid[..., :channels])


def test_sweep_plot_labels_do_not_overlap(tmp_path):
  """sigma_rel values close together (0.05, 0.06, 0.07) used to print their x labels on top of
  each other: now those that would touch are left out, the first and the last always shown."""
  centers = [60.0, 80.0, 88.0, 96.0, 120.0, 200.0, 206.0]
  widths = [24.0] * len(centers)
  shown = sorted(utils.spaced_labels(centers, widths))
  assert shown[0] == 0 and shown[-1] == len(centers) - 1
  for a, b in zip(shown, shown[1:], strict=False):
    assert centers[b] - centers[a] >= (widths[a] + widths[b]) / 2 + 4, (a, b)
  assert utils.spaced_labels([0.0, 100.0, 200.0], [20.0] * 3) == {0, 1, 2}  # Room for all.
  path = str(tmp_path / "sweep.png")
  utils.line_plot(path, [0.05, 0.06, 0.07, 0.1], {"fid": [3.0, 2.0, 2.5, 4.0]}, "sigma_rel")
  with Image.open(path) as image:
    assert image.size == (360, 240)
