"""The training loop: set up, resume, step, log, evaluate, checkpoint, sample."""

import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Protocol

import jax
import ml_collections
from absl import logging

from dit_jax import checkpoint, data, experiment, parallel, storage, utils
from dit_jax.data.prefetch import Prefetcher
from dit_jax.errors import TrainingStopped, check_choice, check_numbers
from dit_jax.experiment import ema as ema_lib
from dit_jax.experiment import validation

# What each number of config.train that the loop reads accepts (see errors.check_numbers).
NUMBERS = (
  ("train.num_steps", "> 0", ""),
  ("train.log_every", "> 0", ""),
  ("train.checkpoint_every", "> 0", ""),
  ("train.keep_checkpoints", "> 0", ""),
  ("train.keep_every", ">= 0", " (0 = off)"),
  ("train.sample_every", ">= 0", " (0 = only at the end)"),
  ("train.eval_every", ">= 0", " (0 = off)"),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a ConfigError for a field of config.train that the loop reads and that cannot work."""
  check_choice(config.train.nonfinite, ("stop", "skip"), "train.nonfinite")
  check_numbers(config, NUMBERS)


class Hooks(Protocol):
  """What the loop asks of sampling and evaluation (`dit_jax.evaluation.hooks.TrainingHooks`,
  which the entry point builds). Nothing of it reads the train state beyond the parameters it is
  given, nor draws on the training key or the training batches."""

  def start(self, exp: experiment.Experiment) -> None:
    """Builds what the grids and evaluations need, before the first step (a bad file stops the
    run here)."""

  def grid(self, ema_params, step: int, writer: utils.MetricWriter) -> str | None:
    """Writes the image grid of step `step` (of the EMA parameters sampling uses); returns
    where, or None if the model makes no pixels to show."""

  def evaluate(self, ema_params, step: int) -> dict[str, float] | None:
    """The scores of the EMA parameters at step `step`, or None if the run scores nothing."""


class Interrupted(TrainingStopped):
  """Ctrl-C stopped the run after it saved a checkpoint; the message says which and how to resume.

  A ConfigError, so the command line ends with it as its `Error: ...` line and exit status 1: a
  script that chains commands (`train && evaluate`, `set -e`) stops there instead of going on as
  if training had finished. (A preemption's SIGTERM returns normally, status 0.)
  """


def _warn_above(bar, log: Callable[..., None] = logging.warning) -> Callable[..., None]:
  """`log` (logging.warning) that first clears the progress bar (if any) so the line stands on
  its own and the bar is redrawn below it. No lock: it is also called from signal handlers."""
  if bar is None:
    return log

  def warn(msg, *args):
    with bar.external_write_mode(file=sys.stderr, nolock=True):
      log(msg, *args)

  return warn


def train_batches(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> Prefetcher:
  """This process's endless iterator over the global training batches (`jax.Array`s on `mesh`),
  `config.data.prefetch` of them assembled on the devices ahead of the step.

  Checkpoint this object: its position is that of the batches consumed (see `Prefetcher`).
  """
  proc, nproc = jax.process_index(), jax.process_count()
  local = data.build_train_iterator(
    config, batch_size=config.train.batch_size // nproc, process_index=proc, process_count=nproc
  )
  place = functools.partial(parallel.global_batch, mesh=mesh)
  return Prefetcher(local, place, config.data.prefetch)


def run(
  config: ml_collections.ConfigDict, workdir: str, hooks: Hooks | None = None
) -> dict[str, float]:
  """Trains until `config.train.num_steps`, resuming from the newest checkpoint in `workdir`.

  `hooks` write the image grids (every config.train.sample_every steps and at the end) and score
  the evaluations during training; `dit_jax.main` passes `evaluation.hooks.TrainingHooks`.
  Without them a run writes no grid and cannot evaluate (train.eval_every must be 0).

  SIGTERM (a preemption) or a first Ctrl-C stops the run at the end of the current step with a
  checkpoint: after SIGTERM this returns (with "preempted_at"), after Ctrl-C it raises
  `Interrupted`. A second Ctrl-C ends the process at once, saving nothing (see `Preemption`).

  With `config.train.eval_every` > 0 the EMA parameters are scored after every eval_every-th
  step (the hooks' `evaluate`: FID and the rest, or the toy data's built-in metrics) and
  the scores logged at that step. Evaluation reads the parameters and nothing else of the state,
  draws its randomness from config.sample.seed and never from the training key, and reads no
  training batch, so the losses and checkpoints are those of a run without it. It runs before
  that step's checkpoint is saved and before a stop request is acted on, so a checkpoint at step
  s always comes after the scores of step s were logged: a run killed during the evaluation of
  step s resumes from an earlier checkpoint (dropping the log lines after it), repeats the steps
  to s exactly, and evaluates step s again, reusing the chunks of features the killed run left in
  eval/during_training.parts (keyed by a checksum of the parameters, so only features of the very
  same parameters are reused): it logs the same numbers. A Ctrl-C or SIGTERM during an
  evaluation takes effect when it is done.

  With power-function EMAs (train.ema.kind="power") and train.ema.snapshot_every > 0 the EMAs
  are saved to WORKDIR/ema_snapshots after every snapshot_every-th step and the last one
  (checkpoint.EmaSnapshots, for dit_jax.tools.posthoc_ema). Every checkpoint waits until the
  snapshots before it are on disk, so a resumed run, which repeats only the steps after its
  checkpoint, misses none; it skips those already there (it would write the same arrays).

  Returns the metrics of the last logged step (none if the run was already at num_steps).
  """
  check_config(config)
  if hooks is None and config.train.eval_every:
    raise ValueError(
      f"config.train.eval_every={config.train.eval_every} needs hooks that evaluate: pass "
      "hooks=dit_jax.evaluation.hooks.TrainingHooks(workdir), as dit_jax.main does."
    )
  with Preemption() as preemption:
    return _train(config, workdir, hooks, preemption)


def _train(
  config: ml_collections.ConfigDict, workdir: str, hooks: Hooks | None, preemption: "Preemption"
) -> dict:
  exp = experiment.build(config)
  t = config.train
  proc = jax.process_index()
  # The held-out examples are read first: a bad or empty split stops the run before the workdir
  # changes.
  val = validation.build(exp) if t.val_every else None
  batches = train_batches(config, exp.mesh)
  if t.init_from and not storage.exists(storage.join(workdir, "checkpoints")):
    checkpoint.check_weights_source(t.init_from)  # Before the new workdir gets its folders.
  ckpt = checkpoint.Checkpointer(
    workdir,
    keep=t.keep_checkpoints,
    keep_every=t.keep_every,
    async_save=t.async_checkpoints,
    config=config,
  )
  gammas = ema_lib.gammas(config)
  snapshots = None
  if gammas and t.ema.snapshot_every:
    snapshots = checkpoint.EmaSnapshots(workdir, async_save=t.async_checkpoints)
  bar = writer = None
  try:
    newest = ckpt.latest_step()
    if newest is not None:
      ema_lib.check_resume(ckpt.saved_config(newest), config, ckpt.directory)
    restored = ckpt.restore_latest(exp.abstract_state, batches)
    if restored is None:
      state = exp.init_state()
      if t.init_from:
        # A new run (step 0, fresh optimizer and data order) from another run's weights.
        step, params, ema_params = checkpoint.restore_weights(
          t.init_from, exp.abstract_state.params, config, init_params=state.params
        )
        if gammas:
          # Power EMAs start anew: their first update sets them to the parameters (beta_1 = 0).
          state = state.replace(params=params)
        else:
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
      preemption.note_checkpoint(restored[0], ckpt.directory, complete=True)
      checkpoint.log_restore(restored[0], ckpt.directory)
      if t.init_from:
        logging.info("Resuming %s; config.train.init_from=%s is ignored.", workdir, t.init_from)
    start = int(state.step)
    if start >= t.num_steps:
      # Before the metric writer and the grid: nothing in the workdir may change.
      logging.warning(
        "The run in %s is already at step %d >= config.train.num_steps=%d, so nothing was "
        "trained and its checkpoints, metrics and images are as they were; raise "
        "--config.train.num_steps to train further.",
        workdir,
        start,
        t.num_steps,
      )
      return {}
    skipped = int(state.skipped)
    if proc == 0:
      n_params = sum(x.size for x in jax.tree.leaves(exp.abstract_state.params))
      fraction = parallel.device_fraction(exp.abstract_state, exp.mesh.devices.flat[0])
      logging.info(
        "Model %s: %.2fM parameters; mesh %s (preset %s); each device holds %.1f%% of the train "
        "state (parameters, EMA and optimizer).",
        config.model.variant,
        n_params / 1e6,
        dict(exp.mesh.shape),
        config.parallel.preset,
        100 * fraction,
      )
      for warning in parallel.layout_warnings(config, exp.mesh):
        logging.warning("%s", warning)

    # The first batches are read and placed while the step and the samplers compile.
    batches.start_prefetch()
    step_fn = exp.jit_train_step()
    if hooks is not None:
      hooks.start(exp)

    def grid(step: int) -> str | None:
      if hooks is None:
        return None
      return hooks.grid(ema_lib.select(state.ema_params, config), step, writer)

    if preemption.requested():
      # The signal came during setup: nothing new to save.
      return _stop_before_training(preemption, start, ckpt.directory)
    writer = utils.MetricWriter(workdir, resume_step=start)
    if proc == 0:
      from tqdm import tqdm

      bar = tqdm(total=t.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    warn = _warn_above(bar)
    preemption.warn = warn
    last = {}
    window_start, window_steps = time.perf_counter(), 0

    def check_finite(step: int, count: int) -> None:
      nonlocal skipped
      if count == skipped:
        return
      if t.nonfinite == "stop":
        newest = ckpt.latest_step()
        if newest is None:
          where = f"no checkpoint was written yet in {ckpt.directory}"
        else:
          where = f"the last checkpoint ({newest}) in {ckpt.directory} is good"
        raise TrainingStopped(
          f"The loss or gradient became non-finite by step {step} (its update was dropped, so no "
          f"bad state was saved). Stopped; {where}. Lower config.train.lr, set "
          "config.train.grad_clip, or set config.train.nonfinite=skip to skip such steps and go "
          "on."
        )
      warn(
        "%d step(s) with a non-finite loss or gradient skipped by step %d (%d in all).",
        count - skipped,
        step,
        count,
      )
      skipped = count

    def save(step: int) -> None:
      check_finite(step, int(state.skipped))
      if snapshots is not None:
        # A resumed run repeats only the steps after its checkpoint, so the snapshots before it
        # must be on disk first.
        snapshots.wait()
      ckpt.save(step, state, config, batches)
      preemption.note_checkpoint(step, ckpt.directory, complete=not t.async_checkpoints)

    with exp.context():
      for step in range(start, t.num_steps):
        state, metrics = step_fn(state, next(batches))
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
        if t.eval_every and done % t.eval_every == 0:
          # Before the checkpoint of this step (see the docstring).
          scores = hooks.evaluate(ema_lib.select(state.ema_params, config), done)
          writer.write(done, scores or {})
          if scores:
            text = ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
            _warn_above(bar, logging.info)("Evaluation at step %d: %s.", done, text)
        if val is not None and done % t.val_every == 0:
          # Of the parameters being trained; before this step's checkpoint, like evaluate.
          losses = val(state.params)
          writer.write(done, losses)
          _warn_above(bar, logging.info)(
            "Validation loss at step %d: %.5f.", done, losses["val_loss"]
          )
        if snapshots is not None and (done % t.ema.snapshot_every == 0 or done == t.num_steps):
          # Before this step's checkpoint (see save).
          snapshots.save(done, state.ema_params, tuple(t.ema.std), gammas, config)
        if preemption.reached(done):
          save(done)
          ckpt.wait()
          preemption.note_checkpoint(done, ckpt.directory, complete=True)
          if bar is not None:
            bar.close()  # Before the last line, so that it stands on its own.
          resume = f"saved checkpoint {done} in {ckpt.directory}. Rerun the same command to resume."
          if preemption.interrupted:
            raise Interrupted(f"Stopped by {preemption.reason}: {resume}")
          logging.warning("Preempted (%s): %s", preemption.reason, resume)
          return {**last, "preempted_at": float(done)}
        if done % t.checkpoint_every == 0 and done != t.num_steps:
          save(done)
        if t.sample_every and done % t.sample_every == 0 and done != t.num_steps:
          grid(done)
      final = int(state.step)
      check_finite(final, int(state.skipped))
      if ckpt.latest_step() != final:
        save(final)
      grid_path = grid(final)
      ckpt.wait()
  finally:
    batches.close()
    if bar is not None:
      bar.close()
    if writer is not None:
      writer.close()
    ckpt.close()
    if snapshots is not None:
      snapshots.close()
  if grid_path:
    images = f"samples in {grid_path}"
  elif hooks is None:
    images = "no image grid (no hooks were given)"
  else:
    images = "no image grid (a latent model without config.vae.path makes no pixels)"
  logging.info("Finished at step %d; checkpoint in %s; %s.", final, ckpt.directory, images)
  return last


def _stop_before_training(preemption: "Preemption", step: int, directory: str) -> dict:
  resume = f"nothing new to save (at step {step}). Rerun the same command to resume."
  if preemption.interrupted:
    raise Interrupted(f"Stopped by {preemption.reason} before the first step; {resume}")
  logging.warning("Preempted (%s) before the first step; %s", preemption.reason, resume)
  return {"preempted_at": float(step)}


class Preemption:
  """Notices that the run should stop at the end of the current step, with a checkpoint.

  One process: SIGTERM (a preemption) or a first Ctrl-C (SIGINT), caught here. Several processes
  must stop at the same step, or they would wait for each other in collectives: SIGTERM is left
  to JAX's preemption service, which makes them agree on one, and a Ctrl-C is passed on to it as
  a SIGTERM to this process. A second Ctrl-C ends the process at once with status 130 (128 +
  SIGINT, the shell's code for Ctrl-C) and saves nothing; one within `SAME_PRESS_S` of the first
  is the same press delivered twice (a terminal reaches every process of its group, and
  launch.local forwards the signal to its processes again).

  Use as a context manager around the run (in the main thread), call `reached(step)` after every
  step, and `note_checkpoint` after every save (for the message of a second Ctrl-C).
  """

  SAME_PRESS_S = 1.0

  def __init__(self):
    self.reason = ""
    self.interrupted = False  # By Ctrl-C, rather than by a preemption.
    self.warn = logging.warning  # The loop routes it above its progress bar.
    self._sigterm = False
    self._first_sigint = None
    self._multi = False
    self._previous = {}
    self._directory = ""
    self._complete = None  # The newest checkpoint known to be fully written.
    self._writing = None  # A newer one whose asynchronous save may still be going on.

  def __enter__(self):
    # jax.process_count() is read here, not in a handler, which may run in the middle of anything.
    self._multi = jax.process_count() > 1
    if threading.current_thread() is threading.main_thread():
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
      if not self._multi:
        self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, signal.SIG_DFL if previous is None else previous)
    self._previous = {}

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._sigterm = True

  def _on_sigint(self, signum, frame):
    del signum, frame
    now = time.monotonic()
    if self._first_sigint is None:
      self._first_sigint = now
      self.interrupted = True
      if self._multi:
        os.kill(os.getpid(), signal.SIGTERM)  # Caught by JAX's preemption notifier.
      self.warn(
        "Ctrl-C: stopping at the end of this step with a checkpoint; press Ctrl-C again to stop "
        "at once without one."
      )
      return
    if now - self._first_sigint < self.SAME_PRESS_S:
      return
    self.warn("Second Ctrl-C: stopped at once without saving; %s.", self._newest())
    sys.stdout.flush()
    sys.stderr.flush()
    # Not an exception: it could surface inside a checkpoint save or a collective, and the
    # cleanup it would run waits for those to finish, which is what the user wants to skip.
    os._exit(130)

  def _newest(self) -> str:
    if self._writing is not None:
      before = "none" if self._complete is None else str(self._complete)
      return (
        f"the newest checkpoint in {self._directory} is {self._writing} (or {before}, if its "
        "save had not finished); rerun the same command to resume from it"
      )
    if self._complete is not None:
      return (
        f"the newest checkpoint in {self._directory} is {self._complete}; rerun the same "
        "command to resume from it"
      )
    return "no checkpoint was written yet, so a rerun starts from scratch"

  def note_checkpoint(self, step: int, directory: str, *, complete: bool) -> None:
    """Records a checkpoint that was restored or saved; `complete=False` for an asynchronous save,
    which Orbax finishes before it starts the next."""
    self._directory = directory
    if complete:
      self._complete, self._writing = step, None
    else:
      if self._writing is not None:
        self._complete = self._writing
      self._writing = step

  def requested(self) -> bool:
    """Whether this process alone was asked to stop (one process only; several agree on a step
    through `reached`)."""
    if self._sigterm or (self.interrupted and not self._multi):
      self.reason = "Ctrl-C" if self.interrupted else "SIGTERM"
      return True
    return False

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step`; with several processes, a collective that every
    process calls after every step."""
    if not self._multi:
      return self.requested()
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(step):
      self.reason = (
        "Ctrl-C, all processes" if self.interrupted else "preemption notice, all processes"
      )
      return True
    return False
