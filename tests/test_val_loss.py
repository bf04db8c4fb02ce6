"""The validation loss (train.val_every, eval.val_*): fixed held-out examples, times and noise;
the same bits on 1 and 8 devices and after a resume; logged per t and averaged; its errors."""

import json
import os

import jax
import numpy as np
import pytest

from dit_jax import checks, experiment
from dit_jax.config_defaults import base_config
from dit_jax.errors import ConfigError
from dit_jax.experiment import validation
from dit_jax.train import loop


def tiny_config(**fields):
  c = base_config()
  c.model.variant = "tiny/4"
  c.data.image_size = 16
  c.train.batch_size = 8
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.checkpoint_every = 2
  c.train.lr = 1e-3
  c.eval.val_examples = 20  # Not a multiple of the chunk: the last chunk wraps around.
  c.eval.val_timesteps = 4
  c.eval.val_device_batch = 2
  for key, value in fields.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


def _val(config, devices):
  exp = experiment.build(config, devices=devices)
  state = exp.init_state()
  val = validation.build(exp)
  with exp.context():
    return val.losses(state.params), val(state.params)


def test_fixed_times_noise_and_examples():
  assert np.allclose(validation.unit_times(8), np.arange(8) / 7)
  losses, scores = _val(tiny_config(), jax.devices()[:1])
  assert losses.shape == (20, 4) and np.isfinite(losses).all()
  # Per time and overall, in the order the host averages them.
  assert scores["val_loss"] == pytest.approx(float(losses.astype(np.float64).mean()))
  assert sorted(scores) == ["val_loss", *(f"val_loss_t{t:.3f}" for t in (0, 1 / 3, 2 / 3, 1))]
  # An untrained model's loss differs across times (eps objective: t=0 gives z=x0, etc.).
  assert len({round(float(v), 6) for v in losses.mean(0)}) == 4
  again, _ = _val(tiny_config(), jax.devices()[:1])
  np.testing.assert_array_equal(losses, again)  # Derived randomness, not a running key.
  other, _ = _val(tiny_config(eval__val_seed=1), jax.devices()[:1])
  assert not np.array_equal(losses, other)


@pytest.mark.sharding
@pytest.mark.parametrize("preset", ["dp", "fsdp"])
def test_the_same_bits_on_1_and_8_devices(preset):
  config = tiny_config(parallel__preset=preset)
  one, scores1 = _val(config, jax.devices()[:1])
  eight, scores8 = _val(config, jax.devices()[:8])
  np.testing.assert_array_equal(one, eight)
  assert scores1 == scores8


def _val_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    lines = [json.loads(line) for line in f]
  return {
    r["step"]: {k: v for k, v in r.items() if k.startswith("val_loss")}
    for r in lines
    if "val_loss" in r
  }


def test_logged_and_the_same_after_a_resume(tmp_path):
  config = tiny_config(train__val_every=2)
  whole = str(tmp_path / "whole")
  loop.run(config, whole)
  logged = _val_lines(whole)
  assert sorted(logged) == [2, 4]
  assert set(logged[4]) == {
    "val_loss",
    *(f"val_loss_t{t:.3f}" for t in (0, 1 / 3, 2 / 3, 1)),
  }
  assert logged[4]["val_loss"] != logged[2]["val_loss"]  # The parameters it scores moved.

  parts = str(tmp_path / "parts")
  loop.run(tiny_config(train__val_every=2, train__num_steps=2), parts)
  loop.run(config, parts)  # Resumes from checkpoint 2.
  resumed = _val_lines(parts)
  for step in (2, 4):
    assert resumed[step] == logged[step], step  # Bit for bit (float64 in JSON).


def test_text_models_score_their_held_out_captions():
  c = base_config()
  c.model.name = "mmdit"
  c.model.variant = "d2"
  c.model.width = 32
  c.model.heads = 2
  c.data.name = "shapes"
  c.data.image_size = 16
  c.data.channels = 3
  c.diffusion.objective = "rectified_flow"
  c.train.batch_size = 8
  c.eval.val_examples = 8
  c.eval.val_device_batch = 4
  losses, scores = _val(c, jax.devices()[:1])
  assert losses.shape == (8, 8) and np.isfinite(scores["val_loss"])


def test_errors_name_the_fix(tmp_path):
  folder = tiny_config(data__name="folder", data__path=str(tmp_path), train__val_every=5)
  with pytest.raises(ConfigError, match="has no default split.*config.eval.val_path"):
    validation.data_config(folder)
  with pytest.raises(ConfigError, match=r"config.eval.val_timesteps=0 must be > 0"):
    checks.validate(tiny_config(eval__val_timesteps=0))
  with pytest.raises(ConfigError, match=r"config.train.val_every=-1 must be >= 0"):
    checks.validate(tiny_config(train__val_every=-1))
  # A held-out directory with no images in it (a folder source refuses an empty one).
  os.makedirs(tmp_path / "empty" / "a")
  empty = tiny_config(data__name="folder", data__channels=3, eval__val_path=str(tmp_path / "empty"))
  with pytest.raises(ConfigError, match="has no images"):
    validation.build(experiment.build(empty))
