"""`python -m dit_jax.benchmark --compare=torch`: the PyTorch reference is the same model doing the
same work, the XLA CPU flags are added as documented, and the command prints what it measured."""

import math

import _cli
import jax
import numpy as np
import pytest

from configs import dit_imagenet256
from dit_jax import benchmark, xla_flags
from dit_jax.errors import ConfigError

torch = pytest.importorskip("torch")
benchmark_torch = pytest.importorskip("dit_jax.benchmark_torch")


def _tiny(**model):
  c = dit_imagenet256.get_config("variant=S/2,runlocal=True")
  c.model.variant = "tiny/2"
  c.train.batch_size = 8
  for k, v in model.items():
    c.model[k] = v
  return c


def test_reference_is_dit_jax_architecture_with_per_block_conditioning_embedders():
  from dit_jax import experiment

  c = _tiny()
  ref = benchmark_torch.TorchDiT(c, threads=1)
  exp = experiment.build(c)
  ours = sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params))
  theirs = sum(p.numel() for p in ref.model.parameters())
  # diffusers' DiT gives every block its own timestep MLP and label table (the released DiT
  # shares one); everything else has the same parameters.
  width, depth, classes = 64, 2, c.model.num_classes
  embedders = (256 * width + width) + (width * width + width) + (classes + 1) * width
  assert theirs - ours == (depth - 1) * embedders
  out = ref.model(
    torch.zeros(2, 4, 32, 32), timestep=torch.tensor([1, 2]), class_labels=torch.tensor([0, 1])
  ).sample
  assert tuple(out.shape) == (2, 8, 32, 32)  # Learned sigma: twice the channels, as ours.


def test_reference_train_step_learns_and_trajectory_stays_finite():
  c = _tiny()
  c.train.lr = 1e-3
  ref = benchmark_torch.TorchDiT(c, threads=1)
  rng = np.random.default_rng(0)
  x0 = torch.as_tensor(rng.standard_normal((4, 4, 32, 32), np.float32)).clamp(-1, 1)
  labels = torch.tensor([0, 1, 2, 3])
  before = {k: v.clone() for k, v in ref.ema.items()}
  losses = [ref.train_step(x0, labels, np.random.default_rng(1)) for _ in range(8)]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
  # The EMA moved toward the parameters, as train.py's update_ema does after every step.
  assert any(not torch.equal(before[k], ref.ema[k]) for k in before)
  noise = torch.as_tensor(rng.standard_normal((2, 4, 32, 32), np.float32))
  z = ref.trajectory(noise, labels[:2], num_steps=4, scale=1.5, guided_channels=3, seed=0)
  assert tuple(z.shape) == (2, 4, 32, 32) and bool(torch.isfinite(z).all())


def test_reference_refuses_models_it_does_not_reproduce():
  for change, field in (
    ({"conditioning": "in_context"}, "conditioning"),
    ({"dtype": "bfloat16"}, "model.dtype"),
  ):
    with pytest.raises(ConfigError, match=field):
      benchmark_torch.check_config(_tiny(**change))
  c = _tiny()
  c.diffusion.objective = "v"
  with pytest.raises(ConfigError, match="objective"):
    benchmark_torch.check_config(c)


def test_matmul_peak_is_a_rate():
  peak = benchmark.matmul_peak(256, steps=1)
  assert np.isfinite(peak) and peak > 0


def test_xla_cpu_flags_are_added_only_where_they_apply():
  add = xla_flags.flags_to_add
  assert add("", "0.10.2", None) == list(xla_flags.CPU_FLAGS)
  # Flags the user set win; others are kept (the test suite's device count, for one).
  mine = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"
  assert add(mine, "0.10.2", None) == ["--xla_cpu_experimental_xnn_fusion_type=dot"]
  assert add("", "0.9.1", None) == []  # An XLA that may not know them would stop the process.
  assert add("", None, None) == []
  assert add("", "0.10.2", "0") == []


@pytest.mark.multiprocess
def test_compare_command_prints_both_frameworks_and_the_ratios():
  r = _cli.run(
    "--config=configs/dit_imagenet256.py:variant=S/2,runlocal=True",
    "--config.model.variant=tiny/2",
    "--config.train.batch_size=4",
    "--compare=torch",
    "--steps=1",
    "--warmup=0",
    "--trajectory_steps=3",
    "--trajectory_batch=2",
    "--peak_size=256",
    module="dit_jax.benchmark",
  )
  assert r.returncode == 0, r.stderr[-2000:]
  out = r.stdout
  assert "XLA float32 matmul peak" in out
  for line in (
    "dit_jax train step",
    "torch train step",
    "dit_jax sample step",
    "torch sample step",
  ):
    assert line in out, out
  ratios = [line for line in out.splitlines() if line.strip().split(" ")[-1].endswith("x")]
  assert len(ratios) == 2 and "3 guided DDPM steps" in out, out


@pytest.mark.multiprocess
def test_compare_flags_with_other_modes_are_one_clear_error():
  r = _cli.run("--vae=sd", "--compare=torch", module="dit_jax.benchmark")
  _cli.assert_clear_error(r, "--compare", "--vae")
  r = _cli.run("--config=configs/quickstart.py", "--trajectory_batch=2", module="dit_jax.benchmark")
  _cli.assert_clear_error(r, "--trajectory_batch", "--compare")
  r = _cli.run("--config=configs/quickstart.py", "--compare=torch", module="dit_jax.benchmark")
  _cli.assert_clear_error(r, "objective")
