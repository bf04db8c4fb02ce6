"""A small class-conditional DiT on the built-in `digits` data, in pixel space, on a laptop CPU.

  python -m dit_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart
  python -m dit_jax.main --config=configs/quickstart.py --workdir=workdirs/quickstart \
      --mode=evaluate

Meant for: one CPU (2 cores suffice). DiT-mini/4 (width 128, depth 6) on 16x16 digits trains
1,000 steps in about 5 minutes; with guidance 3.0 its samples reach class_accuracy 1.000 with
rectified flow (the default) and with --config.diffusion.objective=v or =eps (docs/results.md has
the figures; docs/quickstart.md why eps needs the preconditioning and min-SNR weighting below).
Arg string: none (any is an error); set fields with --config.<field>=<value>.
"""

from dit_jax.config_defaults import base_config, parse_arg


def get_config(arg: str | None = None):
  parse_arg(arg, {})
  c = base_config()
  c.model.variant = "mini/4"
  c.model.class_dropout = 0.1
  c.diffusion.objective = "rectified_flow"
  # EDM preconditioning: the network corrects the best linear denoiser instead of having to copy
  # its input to within alpha / sigma at high noise (which an eps-network cannot learn in this
  # budget). "auto" weighting: min-SNR (gamma 0.1) for eps only, so that its loss is not spent on
  # the nearly clean images; v and rectified flow keep their own MSE.
  c.diffusion.preconditioning = "edm"
  c.diffusion.sigma_data = 0.5
  c.diffusion.loss_weighting = "auto"
  c.diffusion.min_snr_gamma = 0.1
  c.data.name = "digits"
  c.data.image_size = 16
  c.data.channels = 1
  c.train.batch_size = 128
  c.train.num_steps = 1000
  c.train.lr = 1e-3
  c.train.warmup_steps = 100
  c.train.lr_schedule = "cosine"
  c.train.ema_decay = 0.995
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.sample.num_steps = 30
  c.sample.guidance_scale = 3.0
  c.sample.clip_denoised = True
  c.eval.num_images = 1000
  return c
