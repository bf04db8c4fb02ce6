"""Text-to-image MMDiT as in Stable Diffusion 3 (Esser et al., 2024) on 256x256 images:
32x32x16 latents of a 16-channel VAE, CLIP-L + CLIP-G + T5-XXL text (77 + 77 tokens of 4096
channels, pooled 2048), rectified flow with logit-normal timesteps.

  python -m dit_jax.tools.encode_latents --config=configs/mmdit_sd3.py --source=folder \\
      --source_path=/data/images --vae=/models/sd3/vae --out=/data/latents256
  python -m dit_jax.tools.encode_text --captions=/data/captions.txt --out=/data/latents256 \\
      --clip_l=/models/clip-l --clip_g=/models/clip-g --t5=/models/t5-xxl --t5_max_length=77
  python -m dit_jax.main --config=configs/mmdit_sd3.py:variant=d24 \\
      --config.data.path=/data/latents256 --workdir=gs://bucket/mmdit_d24
  python -m launch.aot_compile --config=configs/mmdit_sd3.py:variant=d24 --topology=v5p-32

Meant for: a TPU pod slice (the 2B model, d24, is SD3-medium's size; d38 is the paper's 8B).
The paper trains with batch 4096 (here 1024 by default; set train.batch_size), AdamW lr 1e-4
after 1000 warmup steps, EMA, and drops each text encoder's input with probability 0.464.
Precision: bfloat16 matmuls, while the parameters, AdamW moments, EMA, residual streams, norm and
QK-norm statistics, softmax, final layer, loss and sampler stay float32; a checkpoint is the same
in either dtype, so `--config.model.dtype=float32` computes everything in float32 (`runlocal`
does by default).
Data: `latents` reads <data.path>/latents.npy [N, 32, 32, 16] (SD3's VAE: (mean - 0.0609) x
1.5305, as encode_latents writes them; row i in the image source's order, which caption line i
must follow) plus the text embeddings written by dit_jax.tools.encode_text into the same
directory. Sampling decodes with --config.vae.path=/models/sd3/vae.
Arg string: variant=d<depth>, runlocal (a seconds-long CPU run on synthetic data of the same
structure, with a tiny model and short text); any other arg is an error.
"""

from dit_jax.config_defaults import base_config, parse_arg


def get_config(arg: str | None = None):
  args = parse_arg(arg, {"variant": "d24", "runlocal": False})
  c = base_config()
  c.model.name = "mmdit"
  c.model.variant = args["variant"]
  c.model.qk_norm = True
  c.model.text_dropout = 0.464
  c.model.context_len = 154
  c.model.context_dim = 4096
  c.model.pooled_dim = 2048
  c.model.pos_embed_max_size = 96  # Up to 1536x1536 images with the same weights.
  c.model.dtype = "bfloat16"
  c.model.remat = "dots"
  c.diffusion.objective = "rectified_flow"
  c.diffusion.timestep_sampler = "logit_normal"
  # The resolution-dependent shift (SD3 §5.3.2): 1 at 256^2 (32 latent pixels), x4 at 1024^2.
  c.diffusion.shift = 1.0
  c.diffusion.shift_base_resolution = 32
  c.data.name = "latents"
  c.data.image_size = 32
  c.data.channels = 16
  c.data.latent_scale = (
    1.5305  # The SD3 VAE's scaling factor (its shift, 0.0609, is in latents.json).
  )
  c.train.batch_size = 1024
  c.train.num_steps = 500_000
  c.train.lr = 1e-4
  c.train.warmup_steps = 1000
  c.train.weight_decay = 0.0
  c.train.ema_decay = 0.9999
  c.train.log_every = 100
  c.train.checkpoint_every = 10_000
  c.parallel.preset = "fsdp"
  c.parallel.mesh.data = 1
  c.parallel.mesh.fsdp = -1
  c.sample.num_steps = 28
  c.sample.guidance_scale = 7.0
  c.sample.batch_size = 64
  if args["runlocal"]:
    c.model.variant = "d2"
    c.model.width = 64
    c.model.heads = 2
    c.model.dtype = "float32"
    c.model.context_len, c.model.context_dim, c.model.pooled_dim = 8, 32, 16
    c.data.name = "synthetic"
    c.data.synthetic_size = 64
    c.data.image_size = 8
    c.train.batch_size = 8
    c.train.num_steps = 10
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.parallel.mesh.fsdp = 1
    c.parallel.mesh.data = -1
    c.sample.num_steps = 4
    c.sample.num_images = 8
    c.sample.batch_size = 8
  return c
