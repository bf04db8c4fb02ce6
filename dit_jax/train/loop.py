"""The training loop: set up, resume, step, log, checkpoint, sample."""

import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from dit_jax import checkpoint, data, parallel, utils
from dit_jax.evaluation import sampling
from dit_jax.train import setup

GRID_IMAGES = 100


def is_pixel_data(config: ml_collections.ConfigDict) -> bool:
  return config.data.name != "latents" and config.data.channels in (1, 3)


def _save_grid(exp, state, workdir, step, writer):
  cfg = exp.config
  images, _ = sampling.generate(
    exp,
    state.ema_params,
    min(GRID_IMAGES, cfg.sample.num_images),
    seed=cfg.sample.seed,
    progress=False,
  )
  if jax.process_index() == 0 and is_pixel_data(cfg):
    u8 = utils.to_uint8(images)
    upscale = max(1, 128 // cfg.data.image_size)
    utils.save_grid(os.path.join(workdir, "images", f"step_{step:07d}.png"), u8, upscale=upscale)
    writer.write_image(step, "samples", utils.image_grid(u8))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains until `config.train.num_steps`, resuming from the newest checkpoint in `workdir`.

  Returns the metrics of the last logged step.
  """
  exp = setup.build(config)
  t = config.train
  proc, nproc = jax.process_index(), jax.process_count()
  local_batch = t.batch_size // nproc
  iterator = data.build_train_iterator(
    config, batch_size=local_batch, process_index=proc, process_count=nproc
  )
  ckpt = checkpoint.Checkpointer(workdir, keep=t.keep_checkpoints)
  latest = ckpt.latest_step()
  if latest is None:
    state = exp.init_state()
    logging.info("Starting from scratch in %s.", workdir)
  else:
    state = ckpt.restore_train(latest, exp.abstract_state, iterator)
    checkpoint.log_restore(latest, ckpt.directory)
  start = int(state.step)
  n_params = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
  logging.info(
    "Model %s: %.2fM parameters; mesh %s.",
    config.model.variant,
    n_params / 1e6,
    dict(exp.mesh.shape),
  )

  step_fn = exp.jit_train_step()
  writer = utils.MetricWriter(workdir)
  bar = None
  if proc == 0:
    from tqdm import tqdm

    bar = tqdm(total=t.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  last = {}
  window_start, window_steps = time.perf_counter(), 0
  try:
    with exp.context():
      for step in range(start, t.num_steps):
        batch = parallel.global_batch(next(iterator), exp.mesh)
        state, metrics = step_fn(state, batch)
        window_steps += 1
        done = step + 1
        if bar is not None:
          bar.update(1)
        if done % t.log_every == 0 or done == t.num_steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - window_start
          metrics["images_per_sec"] = window_steps * t.batch_size / max(elapsed, 1e-9)
          if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"Loss became {metrics['loss']} at step {done}.")
          writer.write(done, metrics)
          if bar is not None:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
          last = metrics
          window_start, window_steps = time.perf_counter(), 0
        if done % t.checkpoint_every == 0 and done != t.num_steps:
          ckpt.save(done, state, config, iterator)
        if t.sample_every and done % t.sample_every == 0 and done != t.num_steps:
          _save_grid(exp, state, workdir, done, writer)
      final = int(state.step)
      if ckpt.latest_step() != final:
        ckpt.save(final, state, config, iterator)
      _save_grid(exp, state, workdir, final, writer)
      ckpt.wait()
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    ckpt.close()
  logging.info("Finished at step %d; checkpoint in %s.", int(state.step), ckpt.directory)
  return last
