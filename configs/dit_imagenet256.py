"""DiT on ImageNet 256x256 as in Peebles & Xie (2023): 32x32x4 SD-VAE latents, 1000 classes.

  python -m dit_jax.tools.encode_latents --config=configs/dit_imagenet256.py \\
      --source=tfds:imagenet2012 --vae=/models/sd-vae-ft-ema --out=/data/imagenet256_latents --flip
  python -m dit_jax.main --config=configs/dit_imagenet256.py:variant=XL/2,objective=eps \\
      --config.data.path=/data/imagenet256_latents --workdir=gs://bucket/dit_xl2
  python -m dit_jax.main --config=configs/dit_imagenet256.py:variant=XL/2 --mode=sample \\
      --config.vae.path=/models/sd-vae-ft-ema --workdir=gs://bucket/dit_xl2

Meant for: a TPU pod slice or an 8-GPU host (the paper trains XL/2 with global batch 256, AdamW
lr 1e-4, no weight decay, EMA 0.9999, learned sigma, 400k-7M steps; FID-50K 2.27 with cfg 1.5).
Precision: bfloat16 matmuls (every size), while the parameters, AdamW moments, EMA, residual
stream, norm statistics, softmax, final layer, loss and sampler stay float32; a checkpoint is the
same in either dtype, so `--config.model.dtype=float32` computes everything in float32 (for
training or sampling) and `runlocal` does by default.
Arg string: variant=<S|B|L|XL>/<2|4|8>, objective=eps|v|rectified_flow, runlocal (shrinks the
run to seconds on a CPU with `synthetic` latents of the same shape); any other arg is an error.
Data: `latents` reads <data.path>/latents.npy [N, 32, 32, 4] and labels.npy [N] as
dit_jax.tools.encode_latents writes them (ADM center crop to 256, SD-VAE posterior mean x 0.18215;
with --flip also the flipped images' latents, one of the two picked at random per read, as the
paper's training flips images).
The released weights: python -m dit_jax.tools.import_dit --checkpoint=DiT-XL-2-256x256.pt
--config=configs/dit_imagenet256.py:variant=XL/2 --workdir=DIR. Sampling guides only the first 3
of the 4 latent channels (sample.guided_channels=3), as the official sampler does.
"""

from dit_jax.config_defaults import base_config, parse_arg
from dit_jax.errors import ConfigError


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"variant": "XL/2", "objective": "eps", "runlocal": False})
  patch = args["variant"].partition("/")[2]
  if not patch:
    raise ConfigError(f"Config arg variant={args['variant']!r} is not <size>/<patch>, e.g. XL/2.")
  c = base_config()
  c.model.variant = args["variant"]
  c.model.dtype = "bfloat16"
  c.model.num_classes = 1000
  c.model.class_dropout = 0.1
  c.diffusion.objective = args["objective"]
  c.model.learn_sigma = args["objective"] != "rectified_flow"
  c.diffusion.schedule = "linear"
  c.data.name = "latents"
  c.data.image_size = 32
  c.data.channels = 4
  c.data.latent_scale = 0.18215
  c.data.random_flip = True
  c.train.batch_size = 256
  c.train.num_steps = 400_000
  c.train.lr = 1e-4
  c.train.weight_decay = 0.0
  c.train.grad_clip = 0.0  # The paper does not clip.
  c.train.ema_decay = 0.9999
  c.train.log_every = 100
  c.train.checkpoint_every = 50_000
  c.train.sample_every = 50_000
  c.sample.num_steps = 250
  c.sample.sampler = "ddpm" if args["objective"] != "rectified_flow" else "euler"
  c.sample.guidance_scale = 1.5
  c.sample.guided_channels = 3
  c.sample.num_images = 50_000
  c.sample.batch_size = 256
  c.eval.num_images = 50_000
  if args["runlocal"]:
    c.model.variant = "tiny/" + patch
    c.model.dtype = "float32"
    c.data.name = "synthetic"
    c.data.synthetic_size = 256
    c.train.batch_size = 16
    c.train.num_steps = 20
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.train.sample_every = 0
    c.sample.num_steps = 10
    c.sample.num_images = 16
    c.sample.batch_size = 16
  return c
