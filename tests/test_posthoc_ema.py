"""Power-function EMAs and post-hoc EMA (EDM2): the sigma_rel <-> gamma conversions, the update,
the least-squares reconstruction against a directly tracked EMA, a tiny run with snapshots,
exact resume, the posthoc_ema tool end to end, and bad input."""

import json
import os
import shutil

import _cli
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import checkpoint, checks, experiment
from dit_jax.errors import ConfigError
from dit_jax.evaluation import runner
from dit_jax.experiment import ema
from dit_jax.tools import posthoc_ema

STD = (0.05, 0.1)
POWER = [
  "--config.train.ema.kind=power",
  f"--config.train.ema.std=({STD[0]},{STD[1]})",
  "--config.train.ema.snapshot_every=2",
]


def power_config(**sample):
  """The config of `power_run` (the tiny CLI run with power EMAs), in-process."""
  c = _cli.tiny_config()
  c.train.ema.kind, c.train.ema.std, c.train.ema.snapshot_every = "power", STD, 2
  for k, v in sample.items():
    c.sample[k] = v
  return c


# sigma_rel <-> gamma.


def test_std_and_gamma_match_the_paper_and_round_trip():
  # EDM2 Section 3: gamma = 16.97 is sigma_rel = 0.05 and gamma = 6.94 is sigma_rel = 0.10.
  assert ema.gamma_to_std(16.97) == pytest.approx(0.05, abs=1e-4)
  assert ema.gamma_to_std(6.94) == pytest.approx(0.10, abs=1e-4)
  assert ema.std_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
  assert ema.std_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
  assert ema.std_to_gamma(ema.MAX_STD) == pytest.approx(0.0, abs=1e-6)  # The plain average.
  stds = np.geomspace(1e-3, ema.MAX_STD, 50)
  gammas = [ema.std_to_gamma(s) for s in stds]
  assert np.all(np.diff(gammas) < 0)  # Longer EMAs have smaller exponents.
  np.testing.assert_allclose([ema.gamma_to_std(g) for g in gammas], stds, rtol=1e-9)
  with pytest.raises(ValueError):
    ema.std_to_gamma(0.3)


def test_power_update_gives_each_step_the_integral_of_its_profile():
  """The weight of step k in the EMA after t steps is (k^(g+1) - (k-1)^(g+1)) / t^(g+1)."""
  t_end, gamma = 40, ema.std_to_gamma(0.1)
  update = jax.jit(lambda e, p, t: ema.update(e, p, t, decay=0.0, gammas=(gamma,)))
  state = (jnp.full((t_end,), 123.0),)  # Any start: the first update replaces it (beta_1 = 0).
  for t in range(1, t_end + 1):
    state = update(state, jnp.eye(t_end)[t - 1], jnp.int32(t))  # Parameters: one-hot of step t.
  k = np.arange(1, t_end + 1, dtype=np.float64)
  want = (k ** (gamma + 1) - (k - 1) ** (gamma + 1)) / t_end ** (gamma + 1)
  np.testing.assert_allclose(np.asarray(state[0]), want, rtol=1e-4, atol=1e-7)


def test_exponential_update_is_unchanged():
  e, p = jnp.arange(5.0), jnp.ones(5) * 3
  got = ema.update({"w": e}, {"w": p}, jnp.int32(7), decay=0.9, gammas=())
  np.testing.assert_array_equal(got["w"], 0.9 * e + (1.0 - 0.9) * p)


def _track(params, gammas, every):
  """Power EMAs (float32, the train step's update) of a parameter sequence [T, D]; returns the
  EMAs after each multiple of `every` steps, [T // every, len(gammas), D]."""

  def body(state, xs):
    t, p = xs
    state = ema.update(state, p, t, decay=0.0, gammas=gammas)
    return state, jnp.stack(state)

  init = tuple(jnp.zeros(params.shape[1:]) for _ in gammas)
  steps = jnp.arange(1, len(params) + 1, dtype=jnp.int32)
  _, all_steps = jax.lax.scan(body, init, (steps, jnp.asarray(params)))
  return np.asarray(all_steps[every - 1 :: every], np.float64)


def test_posthoc_reconstructs_a_directly_tracked_profile():
  """Snapshots of sigma_rel 0.05 and 0.10 every 50 of 2000 steps reproduce the EMA of 0.07 that
  was tracked alongside: to 1% of its distance from the nearer stored EMA (it is ~0.1%)."""
  rng = np.random.default_rng(0)
  steps, every, dim = 2000, 50, 16
  # A trajectory like training's: a drift plus a random walk.
  params = np.cumsum(rng.normal(size=(steps, dim)), 0) + np.linspace(0, 40, steps)[:, None]
  stored = tuple(ema.std_to_gamma(s) for s in STD)
  target = ema.std_to_gamma(0.07)
  snaps = _track(params, stored, every)  # [S, 2, D]
  direct = _track(params, (target,), steps)[-1, 0]  # [D]
  times = np.repeat(np.arange(every, steps + 1, every), len(stored))
  weights, err = ema.posthoc_weights(times, np.tile(stored, len(snaps)), steps, target)
  assert err < ema.MAX_RESIDUAL / 10
  rebuilt = weights @ snaps.reshape(-1, dim)
  nearest = np.abs(snaps[-1] - direct).max(axis=1).min()
  assert np.abs(rebuilt - direct).max() < 0.01 * nearest, (np.abs(rebuilt - direct).max(), nearest)
  # A stored profile is reconstructed exactly, from its own newest snapshot.
  w, err = ema.posthoc_weights(times, np.tile(stored, len(snaps)), steps, stored[1])
  assert err < 1e-6
  np.testing.assert_allclose(w @ snaps.reshape(-1, dim), snaps[-1, 1], rtol=1e-6)
  # The range the snapshots reconstruct contains both stored profiles and the target.
  lo, hi = ema.reconstructable_range(times, np.tile(stored, len(snaps)), steps)
  assert lo < 0.05 < 0.07 < 0.1 < hi <= ema.MAX_STD


def test_extra_memory_per_parameter():
  assert ema.extra_bytes_per_param(1) == {"state": 0, "snapshots_on_disk": 0}
  assert ema.extra_bytes_per_param(2, snapshots=10) == {"state": 4, "snapshots_on_disk": 80}


# Bad config.


@pytest.mark.parametrize(
  "fields, message",
  [
    (dict(kind="linear"), "config.train.ema.kind='linear' is not supported"),
    (dict(kind="power", std=()), "config.train.ema.std=() must be a non-empty tuple"),
    (dict(kind="power", std=(0.05, 0.5)), "holds 0.5; each sigma_rel must be in (0, 0.28868]"),
    (dict(kind="power", std=(0.05, 0.05)), "repeats a value"),
    (dict(snapshot_every=10), "snapshot_every=10 needs power-function EMAs"),
    (dict(kind="power", snapshot_every=-1), "snapshot_every=-1 must be >= 0"),
    (dict(kind="power", ema_index=2), "ema_index=2 picks none of the 2 EMAs"),
    (dict(ema_index=-1), "ema_index=-1 must be >= 0"),
  ],
)
def test_bad_ema_config_is_one_clear_error(fields, message):
  c = _cli.tiny_config()
  c.sample.ema_index = fields.pop("ema_index", 0)
  for k, v in fields.items():
    c.train.ema[k] = v
  with pytest.raises(ConfigError) as e:
    checks.validate(c)
  assert message in str(e.value), str(e.value)


@pytest.mark.multiprocess
def test_cli_reports_an_empty_std(tmp_path):
  proc = _cli.run(
    *_cli.TINY,
    "--config.train.ema.kind=power",
    "--config.train.ema.std=()",
    f"--workdir={tmp_path}",
  )
  _cli.assert_clear_error(proc, "config.train.ema.std=() must be a non-empty tuple")
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


# A tiny run with power EMAs: checkpoints and snapshots at steps 2, 4 and 6.


@pytest.fixture(scope="module")
def power_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("power") / "run")
  proc = _cli.run(*_cli.TINY, *POWER, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.output[-3000:]
  return workdir


def _state(workdir, step=_cli.TINY_STEPS):
  exp = experiment.build(power_config())
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  try:
    return jax.device_get(ckpt.restore_train(step, exp.abstract_state))
  finally:
    ckpt.close()


def _snapshot(workdir, step):
  exp = experiment.build(power_config())
  snaps = checkpoint.EmaSnapshots(workdir, read_only=True)
  try:
    return snaps.profiles(step), jax.device_get(snaps.restore(step, exp.abstract_state.params))
  finally:
    snaps.close()


@pytest.mark.multiprocess  # power_run trains through the command line.
def test_run_keeps_one_ema_per_profile_and_snapshots_them(power_run):
  snaps = checkpoint.EmaSnapshots(power_run, read_only=True)
  assert snaps.all_steps() == [2, 4, 6]
  snaps.close()
  state = _state(power_run)
  assert isinstance(state.ema_params, tuple) and len(state.ema_params) == 2
  profiles, emas = _snapshot(power_run, 6)
  assert profiles["std"] == list(STD)
  np.testing.assert_allclose(profiles["gamma"], [ema.std_to_gamma(s) for s in STD])
  jax.tree.map(np.testing.assert_array_equal, emas, state.ema_params)
  # The two profiles differ, and sample.ema_index picks which one sampling restores.
  assert any(
    not np.array_equal(a, b)
    for a, b in zip(*(jax.tree.leaves(e) for e in state.ema_params), strict=True)
  )
  for index in (0, 1):
    exp = experiment.build(power_config(ema_index=index), training=False)
    params, step = runner.restore_params(exp, power_run)
    assert step == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), state.ema_params[index])
  # The checkpoint holds 2 EMAs; an exponential config may pick one but not a third.
  exponential = _cli.tiny_config()
  exponential.sample.ema_index = 2
  with pytest.raises(ConfigError, match="ema_index=2, but the checkpoint .* holds 2 EMAs"):
    runner.restore_params(experiment.build(exponential, training=False), power_run)


@pytest.mark.multiprocess  # power_run trains through the command line.
def test_resume_after_a_kill_is_bitwise_with_power_emas(power_run, tmp_path):
  """As if killed after snapshot 4 and before checkpoints 4 and 6: the rerun resumes from
  checkpoint 2, keeps snapshot 4, and ends with the same state and snapshot 6."""
  workdir = _cli.copy_workdir(power_run, str(tmp_path / "run"))
  for name in ("checkpoints/4", "checkpoints/6", "ema_snapshots/6"):
    shutil.rmtree(os.path.join(workdir, name))
  kept = _cli.snapshot(os.path.join(workdir, "ema_snapshots", "4"))
  proc = _cli.run(*_cli.TINY, *POWER, f"--workdir={workdir}")
  assert proc.returncode == 0, proc.output[-3000:]
  assert "Restored checkpoint 2" in proc.output, proc.output[-3000:]
  assert _cli.snapshot(os.path.join(workdir, "ema_snapshots", "4")) == kept  # Not rewritten.
  jax.tree.map(np.testing.assert_array_equal, _state(workdir), _state(power_run))
  jax.tree.map(np.testing.assert_array_equal, _snapshot(workdir, 6), _snapshot(power_run, 6))
  # Other profiles cannot continue these EMAs.
  other = power_config()
  other.train.ema.std = (0.05, 0.2)
  from dit_jax.train import loop

  with pytest.raises(ConfigError, match=r"track train.ema kind='power', std=\(0.05, 0.1\)"):
    loop.run(other, workdir)


@pytest.mark.multiprocess  # power_run trains through the command line.
def test_posthoc_tool_end_to_end(power_run, tmp_path):
  out = str(tmp_path / "ema007")
  proc = _cli.run(
    f"--workdir={power_run}", "--std=0.07", f"--out={out}", module="dit_jax.tools.posthoc_ema"
  )
  assert proc.returncode == 0, proc.output[-3000:]
  _cli.assert_quiet(proc)
  with open(os.path.join(out, "posthoc_ema.json")) as f:
    record = json.load(f)
  assert record["step"] == 6 and record["relative_error"] <= ema.MAX_RESIDUAL
  # The written weights are the recorded combination of the snapshots.
  want = None
  for step in (2, 4, 6):
    _, emas = _snapshot(power_run, step)
    for tree in emas:
      row = next(r for r in record["snapshots"] if r["step"] == step)
      record["snapshots"].remove(row)
      term = jax.tree.map(lambda x, w=row["weight"]: w * x.astype(np.float64), tree)
      want = term if want is None else jax.tree.map(np.add, want, term)
  params, step = runner.restore_params(experiment.build(power_config(), training=False), out)
  assert step == 6
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    jax.device_get(params),
    want,
  )
  # Sampled like any checkpoint, with the run's command line.
  proc = _cli.run(*_cli.TINY, *POWER, f"--workdir={out}", "--mode=sample")
  assert proc.returncode == 0, proc.output[-3000:]
  assert os.path.isfile(os.path.join(out, "samples", "samples.npz"))


@pytest.mark.multiprocess  # power_run trains through the command line.
def test_posthoc_of_the_tracked_profiles_gives_them_back(power_run, tmp_path):
  out = str(tmp_path / "sweep")
  paths = posthoc_ema.reconstruct(power_run, [0.1, 0.07, 0.05], out)
  assert paths == [os.path.join(out, s) for s in ("0.1", "0.07", "0.05")]
  state = _state(power_run)
  exp = experiment.build(power_config(), training=False)
  for std, index in ((0.05, 0), (0.1, 1)):
    params, _ = runner.restore_params(exp, os.path.join(out, f"{std:g}"))
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      jax.device_get(params),
      state.ema_params[index],
    )


@pytest.mark.multiprocess  # power_run trains through the command line.
def test_posthoc_of_a_run_in_a_bucket_writes_into_the_bucket(power_run, gcs, tmp_path):
  """Snapshots read from a gs:// run and the reconstructed workdir written to gs:// give the
  parameters that the local run and a local output give."""
  import _gcs

  from dit_jax import storage

  run = _gcs.upload(power_run, gcs.url("power"), only=("checkpoints", checkpoint.SNAPSHOTS))
  snaps = checkpoint.EmaSnapshots(run, read_only=True)
  try:
    assert snaps.all_steps() == [2, 4, 6]
  finally:
    snaps.close()
  out, local = gcs.url("ema007"), str(tmp_path / "ema007")
  assert posthoc_ema.reconstruct(run, [0.07], out) == [out]
  posthoc_ema.reconstruct(power_run, [0.07], local)
  record = storage.read_json(storage.join(out, "posthoc_ema.json"))
  assert record["source"] == run and record["step"] == 6
  exp = experiment.build(power_config(), training=False)
  (a, step_a), (b, step_b) = (runner.restore_params(exp, w) for w in (out, local))
  assert step_a == step_b == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


@pytest.mark.multiprocess  # power_run trains through the command line.
def test_posthoc_bad_input_is_one_clear_error(power_run, tmp_path):
  out = str(tmp_path / "out")
  proc = _cli.run(
    f"--workdir={tmp_path}", "--std=0.07", f"--out={out}", module="dit_jax.tools.posthoc_ema"
  )
  _cli.assert_clear_error(proc, "holds no EMA snapshots", "--config.train.ema.snapshot_every")
  proc = _cli.run(
    f"--workdir={power_run}", "--std=0.01", f"--out={out}", module="dit_jax.tools.posthoc_ema"
  )
  _cli.assert_clear_error(proc, "--std=0.01 cannot be reconstructed", "they reconstruct sigma_rel")
  proc = _cli.run(
    f"--workdir={power_run}",
    "--std=0.07",
    f"--out={out}",
    "--set=sample.guidance_scale=1",
    module="dit_jax.tools.posthoc_ema",
  )
  _cli.assert_clear_error(proc, "--set changes how --evaluate scores; add --evaluate")
  cases = [
    (dict(stds=[0.07], step=3), "--step=3 is not a snapshot step; "),
    (dict(stds=[0.07, 0.2], step=None), "--std=0.2 cannot be reconstructed"),
    (dict(stds=[0.07, 0.5], step=None), r"holds 0.5; each sigma_rel must be in \(0, 0.28868\]"),
  ]
  for kwargs, message in cases:
    with pytest.raises(ConfigError, match=message):
      posthoc_ema.reconstruct(power_run, kwargs["stds"], out, kwargs["step"])
  for text, message in (("abc", "is not a list of numbers"), ("0.5", "must be in (0, 0.28868]")):
    with pytest.raises(ConfigError) as e:
      posthoc_ema.parse_stds(text)
    assert message in str(e.value)
  with pytest.raises(ConfigError, match="repeats a value"):
    posthoc_ema.parse_stds("0.05,0.05")
  for setting, message in (
    ("model.width=8", "names no sampling or evaluation setting"),  # Not how it samples.
    ("sample.guidance_sclae=1", "names no sampling or evaluation setting"),
    ("sample.guidance_scale=high", "'high' is not a value for sample.guidance_scale"),
  ):
    with pytest.raises(ConfigError, match=message):  # Before anything is reconstructed.
      posthoc_ema.sweep(power_run, [0.07], out, settings=[setting])
  assert not os.path.exists(out)  # Nothing was written.
  os.makedirs(os.path.join(out, "checkpoints", "7"))
  with pytest.raises(ConfigError, match="is not empty"):
    posthoc_ema.reconstruct(power_run, [0.07], out)


@pytest.mark.multiprocess  # power_run trains through the command line.
def test_init_from_a_power_run_takes_its_parameters_and_first_ema(power_run):
  exp = experiment.build(_cli.tiny_config(), training=False)
  step, params, ema_params = checkpoint.restore_weights(power_run, exp.abstract_state.params)
  state = _state(power_run)
  assert step == 6
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), state.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(ema_params), state.ema_params[0])


@pytest.mark.multiprocess  # power_run trains through the command line.
def test_posthoc_sweep_scores_each_std_and_plots_them(power_run, tmp_path):
  out = str(tmp_path / "sweep")
  proc = _cli.run(
    f"--workdir={power_run}",
    "--std=0.08,0.05",
    f"--out={out}",
    "--evaluate",
    "--set=sample.guidance_scale=1",
    "--set=sample.num_steps=3",
    module="dit_jax.tools.posthoc_ema",
  )
  assert proc.returncode == 0, proc.output[-3000:]
  _cli.assert_quiet(proc)
  with open(os.path.join(out, "sweep.json")) as f:
    rows = json.load(f)
  assert [r["std"] for r in rows] == [0.05, 0.08]  # Sorted.
  # Scored under --set (the run itself samples with CFG 3 in 2 steps).
  assert [(r["guidance_scale"], r["num_steps"]) for r in rows] == [(1.0, 3), (1.0, 3)]
  for r in rows:  # Each scored as --mode=evaluate scores it, from its own workdir.
    with open(os.path.join(r["workdir"], "eval", "posthoc.json")) as f:
      assert json.load(f)["class_accuracy"] == r["class_accuracy"]
  assert rows[0]["frechet_distance"] != rows[1]["frechet_distance"]
  table = proc.output.strip().splitlines()[-3:]
  assert table[0].split() == ["sigma_rel", "frechet_distance", "class_accuracy"], table
  assert [float(line.split()[0]) for line in table[1:]] == [0.05, 0.08]
  from PIL import Image

  with Image.open(os.path.join(out, "sweep.png")) as image:
    assert image.size == (720, 240)
