"""A small text-to-image MMDiT on the built-in `shapes` captions, in pixel space, on a laptop CPU.

  python -m dit_jax.main --config=configs/quickstart_t2i.py --workdir=workdirs/quickstart_t2i
  python -m dit_jax.main --config=configs/quickstart_t2i.py --workdir=workdirs/quickstart_t2i \
      --mode=evaluate

Meant for: one CPU (2 cores suffice). An MMDiT (width 128, 4 joint blocks, QK-norm) learns to
draw "a red circle at the top left" and the like at 16x16 with rectified flow and logit-normal
timesteps; `--mode=evaluate` draws the 8 caption combinations held out of training and reads
colour, shape and position back with the shapes checker (docs/text_to_image.md has the figures).
Arg string: "buckets" trains with two aspect-ratio buckets, 16x16 (64 tokens) and 12x20 (60),
each global batch from one of them, and draws a grid at each size (images/step_*_16x16.png and
_12x20.png); `--config.sample.size=12x20 --mode=evaluate` scores the wide one. Any other arg is
an error; set fields with --config.<field>=<value>.
"""

from dit_jax.config_defaults import base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"buckets": False})
  c = base_config()
  c.model.name = "mmdit"
  c.model.variant = "d4"
  c.model.width = 128
  c.model.heads = 4
  c.model.text_dropout = 0.1
  c.diffusion.objective = "rectified_flow"
  c.diffusion.timestep_sampler = "logit_normal"
  c.data.name = "shapes"
  c.data.image_size = 16
  c.data.channels = 3
  c.train.batch_size = 64
  c.train.num_steps = 1200
  c.train.lr = 1e-3
  c.train.warmup_steps = 100
  c.train.lr_schedule = "cosine"
  c.train.ema_decay = 0.995
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.sample.num_images = 64
  c.sample.num_steps = 30
  c.sample.guidance_scale = 4.0
  c.sample.clip_denoised = True
  c.eval.num_images = 400
  if args["buckets"]:
    c.data.buckets = "16x16,12x20"
  return c
