"""The benchmark's FLOP counts see every block (XLA counts a scanned loop body only once)."""

import jax
import pytest

from dit_jax import benchmark
from dit_jax.config_defaults import base_config


def _flops(depth: int) -> dict:
  c = base_config()
  c.model.variant, c.model.depth = "tiny/4", depth
  c.train.batch_size = 8
  c.sample.guidance_scale = 1.5
  return benchmark.flops(c)  # What benchmark.benchmark reports, compiled but not run.


@pytest.mark.integration  # Compiles 4 programs.
def test_flops_grow_with_depth_and_train_costs_about_three_forward_passes():
  two, six = _flops(2), _flops(6)
  for r in (two, six):
    # A guided sampling step is 2 forward passes, a train step about 3 (forward + backward); on a
    # model this small the optimizer and loss add up to one more pass per image (4.1 measured).
    ratio = r["train"] / (r["sample"] / 2)
    assert 2.5 < ratio < 5.0, ratio
  # Blocks dominate this model's FLOPs; 3x the blocks must cost well over 2x.
  assert six["sample"] > 2.0 * two["sample"]


def test_power_emas_benchmark_the_network_sampling_reads():
  """With several power EMAs the sampling step is lowered on the one config.sample.ema_index
  picks, a tree like the parameters (it was given the tuple of all of them)."""
  c = base_config()
  c.model.variant, c.model.depth, c.train.batch_size = "tiny/4", 1, 8
  c.train.ema.update(kind="power", std=(0.05, 0.1))
  c.sample.ema_index = 1
  exp, programs = benchmark.lower_steps(c, concrete=False)
  params = programs["sample"][1][0]
  assert jax.tree.structure(params) == jax.tree.structure(exp.abstract_state.params)
  assert params is exp.abstract_state.ema_params[1]


def test_input_benchmark_reads_latents_from_a_bucket(gcs):
  """`python -m dit_jax.benchmark --input` on a config whose data.path is a gs:// dataset: the
  ArrayRecord latents that encode_latents writes to a bucket, read as training reads them."""
  import _cli
  import _gcs

  url = gcs.url("latents")
  _gcs.write_latents(url)
  config = _cli.tiny_config(
    data__name="latents",
    data__path=url,
    data__image_size=8,
    data__channels=4,
    data__latent_scale=0.18215,
  )
  result = benchmark.benchmark_input(config, steps=3, warmup=1)
  assert result["seconds"] > 0
  assert result["images_per_sec"] == config.train.batch_size / result["seconds"]
