"""The training loop: set up, resume, step, log, checkpoint, sample."""

import os
import signal
import threading
import time

import jax
import ml_collections
from absl import logging

from dit_jax import checkpoint, data, parallel, utils
from dit_jax.errors import TrainingStopped
from dit_jax.evaluation import sampling
from dit_jax.train import setup


def _save_grid(grid, state, workdir, step, writer):
  """Writes images/step_<step>.png and a TensorBoard image of `grid(ema_params)` (pixels, decoded
  for latent models; nothing for a latent model without a VAE)."""
  u8 = grid(state.ema_params)
  if jax.process_index() == 0 and u8 is not None:
    upscale = max(1, 128 // u8.shape[1])
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
  ckpt = checkpoint.Checkpointer(
    workdir,
    keep=t.keep_checkpoints,
    keep_every=t.keep_every,
    async_save=t.async_checkpoints,
    config=config,
  )
  restored = ckpt.restore_latest(exp.abstract_state, iterator)
  if restored is None:
    state = exp.init_state()
    if t.init_from:
      # A new run (step 0, fresh optimizer and data order) from another run's weights.
      step, params, ema_params = checkpoint.restore_weights(
        t.init_from, exp.abstract_state.params, config
      )
      state = state.replace(params=params, ema_params=ema_params)
      logging.info(
        "Starting in %s from the parameters and EMA of checkpoint %d of %s (init_from).",
        workdir,
        step,
        t.init_from,
      )
    else:
      logging.info("Starting from scratch in %s.", workdir)
  else:
    state = restored[1]
    checkpoint.log_restore(restored[0], ckpt.directory)
    if t.init_from:
      logging.info("Resuming %s; config.train.init_from=%s is ignored.", workdir, t.init_from)
  start = int(state.step)
  skipped = int(state.skipped)
  n_params = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
  logging.info(
    "Model %s: %.2fM parameters; mesh %s.",
    config.model.variant,
    n_params / 1e6,
    dict(exp.mesh.shape),
  )

  step_fn = exp.jit_train_step()
  grid = sampling.grid_sampler(exp)
  writer = utils.MetricWriter(workdir, resume_step=start)
  bar = None
  if proc == 0:
    from tqdm import tqdm

    bar = tqdm(total=t.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
  last = {}
  window_start, window_steps = time.perf_counter(), 0
  preemption = Preemption()

  def check_finite(step: int, count: int) -> None:
    nonlocal skipped
    if count == skipped:
      return
    if t.nonfinite == "stop":
      raise TrainingStopped(
        f"The loss or gradient became non-finite by step {step} (its update was dropped, so no "
        f"bad state was saved). Stopped; the last checkpoint ({ckpt.latest_step()}) in "
        f"{ckpt.directory} is good. Lower config.train.lr, set config.train.grad_clip, or set "
        "config.train.nonfinite=skip to skip such steps and go on."
      )
    logging.warning(
      "%d step(s) with a non-finite loss or gradient skipped by step %d (%d in all).",
      count - skipped,
      step,
      count,
    )
    skipped = count

  try:
    with exp.context(), preemption:
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
          writer.write(done, metrics)
          if bar is not None:
            bar.set_postfix(loss=f"{metrics['loss']:.4f}")
          last = metrics
          window_start, window_steps = time.perf_counter(), 0
          check_finite(done, int(metrics["skipped_steps"]))
        if preemption.reached(done):
          check_finite(done, int(state.skipped))
          ckpt.save(done, state, config, iterator)
          ckpt.wait()
          logging.warning(
            "Preempted (%s): saved checkpoint %d in %s and stopped. Rerun the same command to "
            "resume.",
            preemption.reason,
            done,
            ckpt.directory,
          )
          return {**last, "preempted_at": float(done)}
        if done % t.checkpoint_every == 0 and done != t.num_steps:
          check_finite(done, int(state.skipped))
          ckpt.save(done, state, config, iterator)
        if t.sample_every and done % t.sample_every == 0 and done != t.num_steps:
          _save_grid(grid, state, workdir, done, writer)
      final = int(state.step)
      check_finite(final, int(state.skipped))
      if ckpt.latest_step() != final:
        ckpt.save(final, state, config, iterator)
      _save_grid(grid, state, workdir, final, writer)
      ckpt.wait()
  finally:
    if bar is not None:
      bar.close()
    writer.close()
    ckpt.close()
  logging.info("Finished at step %d; checkpoint in %s.", int(state.step), ckpt.directory)
  return last


class Preemption:
  """Notices that the run should stop: SIGTERM (one process) or JAX's preemption notice, which
  every process of a multi-host job sees at the same step.

  Use as a context manager around the loop and call `reached(step)` after every step.
  """

  def __init__(self):
    self.reason = ""
    self._sigterm = False
    self._previous = None

  def __enter__(self):
    # Multi-process jobs leave SIGTERM to JAX's preemption service, which makes every process
    # stop at the same step; a single process handles it here.
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._sigterm = True

  def reached(self, step: int) -> bool:
    if self._sigterm:
      self.reason = "SIGTERM"
      return True
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      if multihost_utils.reached_preemption_sync_point(step):
        self.reason = "preemption notice, all processes"
        return True
    return False
