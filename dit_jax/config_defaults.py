"""The base config every `configs/*.py` starts from. Imports no JAX (only ml_collections).

Every field a user may set lives here with its default, so that a locked config rejects typos.
docs/configs.md ("Config contract") documents the public names.
"""

import difflib
import json

import ml_collections

from dit_jax.axes import LOGICAL_AXES
from dit_jax.errors import ConfigError

# Names accepted by the registries; the JAX-side registries validate against the same tuples.
OBJECTIVES = ("eps", "v", "rectified_flow")
TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "mode", "cosmap")
SAMPLERS = ("ddpm", "ddim", "euler", "heun")
CONDITIONINGS = ("adaln_zero", "adaln", "cross_attention", "in_context")
VP_SCHEDULES = ("linear", "cosine")
LOSS_WEIGHTINGS = ("none", "min_snr", "auto")
PRECONDITIONINGS = ("none", "edm")
DTYPES = ("float32", "bfloat16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
ATTENTIONS = ("xla", "cudnn", "splash")
# What a dropped text encoder's part becomes: the empty caption's encoding, or zeros.
TEXT_DROPOUT_TO = ("empty", "zeros")
EMA_KINDS = ("exponential", "power")
ATTENTION_CONDITIONINGS = ("none", "tmsa")
_TRUE = ("", "1", "true", "yes")
_FALSE = ("0", "false", "no")


def base_config() -> ml_collections.ConfigDict:
  """Returns the full default config (a small DiT on the built-in `digits` data)."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = "dit"
  c.model.variant = "S/2"  # One of the 12 sizes of DiT Table 1, or "tiny/2"-style test sizes.
  c.model.learn_sigma = False
  c.model.conditioning = "adaln_zero"
  c.model.num_classes = 10
  c.model.class_dropout = 0.1  # Label dropout for classifier-free guidance.
  c.model.dtype = "float32"  # Compute dtype; parameters stay float32.
  c.model.remat = "none"
  c.model.scan_unroll = 1  # Blocks per scan iteration (depth = fully unrolled).
  # Attention kernel: xla (any device) | cudnn (GPU flash attention, bfloat16) | splash (TPU
  # Pallas splash attention). Same numerics; the kernels never hold the L x L logits.
  c.model.attention = "xla"
  # "tmsa": DiffiT's time-dependent self-attention (the time embedding projected into the queries
  # and values; zero-initialized, so training starts from the plain DiT). DiT only.
  c.model.attention_conditioning = "none"
  # Overrides of the variant table (0 = take the variant's value).
  c.model.width = 0
  c.model.depth = 0
  c.model.heads = 0
  c.model.mlp_ratio = 4.0
  # MMDiT (model.name="mmdit", variant "d<depth>": width 64*depth, depth heads, patch 2).
  c.model.text_dropout = 0.1  # Per text encoder, independently (SD3 used 0.464).
  # A dropped encoder's part becomes the empty caption's encoding ("empty") or zeros ("zeros":
  # what diffusers' SD3 pipeline feeds for a T5 left out at inference). Guidance's unconditional
  # input is the empty caption's encoding either way.
  c.model.text_dropout_to = "empty"
  c.model.qk_norm = True  # RMS-normalize queries and keys per head (SD3.5; SD3-medium: False).
  c.model.pos_embed_max_size = 0  # Side of the position table in patches (0: the image's grid).
  c.model.pos_embed_base_size = 0  # Grid side its positions are spaced for (0: = max size).
  # Text sizes; 0 takes them from the data (required > 0 only for synthetic text).
  c.model.context_len = 0
  c.model.context_dim = 0
  c.model.pooled_dim = 0

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.objective = "rectified_flow"
  c.diffusion.schedule = "linear"  # Beta schedule of the VP objectives (eps, v).
  c.diffusion.num_timesteps = 1000
  c.diffusion.timestep_sampler = "uniform"
  c.diffusion.logit_mean = 0.0
  c.diffusion.logit_std = 1.0
  c.diffusion.mode_scale = 1.29
  # SD3 timestep shift t -> s*t / (1 + (s-1)*t). If shift_base_resolution > 0 the shift is
  # multiplied by sqrt(H*W) / shift_base_resolution (the resolution-dependent shift, SD3 §5.3.2).
  c.diffusion.shift = 1.0
  c.diffusion.shift_base_resolution = 0
  # none | min_snr | auto (min_snr for eps, whose plain MSE spends most of its weight on the
  # nearly clean images; none for v and rectified flow).
  c.diffusion.loss_weighting = "none"
  c.diffusion.min_snr_gamma = 5.0
  # "edm": the network's input and output are scaled as in Karras et al. 2022 (EDM) around the
  # best linear denoiser of data with std sigma_data; the loss is still the objective's MSE.
  # "none" (default) is the plain network of the DiT paper (needed for its released weights).
  c.diffusion.preconditioning = "none"
  c.diffusion.sigma_data = 0.5

  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"  # digits | synthetic | tfds:<name> | folder | latents
  c.data.path = ""  # Image folder root, or directory of pre-encoded latents.
  c.data.split = "train"
  # Aspect-ratio buckets "HxW,HxW,..." in the data's units (MMDiT; dit_jax.data.buckets): each
  # global batch holds one bucket's size; "" = square config.data.image_size only.
  c.data.buckets = ""
  c.data.image_size = 16
  c.data.channels = 1
  c.data.random_flip = False
  c.data.image_key = "image"  # Feature names for tfds datasets.
  c.data.label_key = "label"
  c.data.latent_scale = 1.0  # Multiplier applied to pre-encoded latents (SD-VAE: 0.18215).
  c.data.synthetic_size = 4096  # Number of distinct synthetic examples.
  c.data.num_workers = 0  # grain worker processes (0 = threads in this process).
  # Global batches a background thread reads and places on the devices ahead of the running step
  # (0 = off: each step reads its batch itself). Checkpoints keep the position of the batches
  # consumed, so resuming is exact with any depth.
  c.data.prefetch = 2

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 64  # Global batch size, over all devices and processes.
  c.train.num_steps = 1000
  c.train.seed = 0
  c.train.lr = 1e-4
  c.train.warmup_steps = 0
  c.train.lr_schedule = "constant"  # constant | cosine (to 0 at num_steps), after warmup.
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.grad_clip = 1.0  # Global-norm clipping; 0 disables it.
  c.train.ema_decay = 0.9999  # Of the exponential EMA (train.ema.kind="exponential").
  # "exponential" (ema_decay) or "power": one power-function EMA per relative std sigma_rel in
  # `std` (EDM2), with snapshots every `snapshot_every` steps (0 = none) in WORKDIR/ema_snapshots
  # (never deleted) from which dit_jax.tools.posthoc_ema reconstructs the EMA of any sigma_rel.
  c.train.ema = ml_collections.ConfigDict()
  c.train.ema.kind = "exponential"
  c.train.ema.std = (0.05, 0.1)
  c.train.ema.snapshot_every = 0
  c.train.log_every = 50
  c.train.checkpoint_every = 1000
  c.train.keep_checkpoints = 3  # The newest K checkpoints are kept ...
  c.train.keep_every = 0  # ... plus, if > 0, every checkpoint whose step is a multiple of this.
  c.train.async_checkpoints = True  # Write checkpoints in the background while training goes on.
  # A non-finite loss or gradient never reaches the state (its update is dropped); then
  # "stop": stop at the next log step with a message (the last checkpoint is good), or
  # "skip": go on and count it (metrics.jsonl: skipped_steps).
  c.train.nonfinite = "stop"
  c.train.sample_every = 0  # Steps between PNG grids of samples (0 = only at the end).
  # Steps between scores of the EMA parameters (FID etc. as in --mode=evaluate, with the FID
  # Inception of config.eval; digits/shapes without it: their built-in metrics), logged to
  # metrics.jsonl and TensorBoard; 0 = off. Never changes the losses or checkpoints of a run.
  c.train.eval_every = 0
  c.train.eval_num_images = 5000  # Samples per evaluation during training (at least 2).
  # Steps between validation losses (SD3 §5.1: the loss on held-out data at fixed timesteps and
  # noise tracks sample quality; config.eval.val_*), logged per t and averaged; 0 = off.
  c.train.val_every = 0
  # Start a new run (step 0, fresh optimizer and data order) from the parameters and EMA of the
  # newest checkpoint in this workdir (another run, or dit_jax.tools.import_dit / import_sd3).
  c.train.init_from = ""

  c.sample = ml_collections.ConfigDict()
  c.sample.name = "samples"
  c.sample.num_images = 100
  c.sample.labels = "balanced"  # balanced | random
  # Text models: a file of prompts, one per line (shapes data), or a directory written by
  # dit_jax.tools.encode_text; "" = the data's held-out captions (shapes) or its own captions.
  c.sample.prompts = ""
  c.sample.prompt_text = ""  # Or prompts written in the config, separated by "|" (shapes data).
  # auto (euler for rectified flow, ddim otherwise) | ddpm | ddim | euler | heun
  c.sample.sampler = "auto"
  c.sample.num_steps = 50
  c.sample.guidance_scale = 1.0
  c.sample.eta = 0.0  # DDIM eta.
  c.sample.batch_size = 100  # Images per jitted sampling call.
  # The size "HxW" to sample at (MMDiT: any size that divides into patches and fits the position
  # table, e.g. one of config.data.buckets); "" = config.data.image_size square.
  c.sample.size = ""
  c.sample.seed = 0
  c.sample.use_ema = True
  c.sample.ema_index = 0  # Which EMA of a checkpoint with several (train.ema.std) to use.
  c.sample.clip_denoised = False  # Clip predicted x0 to [-1, 1] (pixel-space data only).
  # Output channels that classifier-free guidance steers (0 = all); the official DiT guides only
  # the first 3 of the 4 latent channels, so 3 reproduces its samples.
  c.sample.guided_channels = 0
  # Guide only at noise levels in (lo, hi] (Kynkäänniemi et al. 2024), e.g. "(0.28,5.42)": EDM's
  # sigma = sqrt((1 - alpha_bar) / alpha_bar) for eps and v, t for rectified flow; elsewhere the
  # conditional pass alone runs (scale 1). () = guide at every step.
  c.sample.guidance_interval = ()
  # CADS (Sadat et al. 2024): noise annealed into the condition the model sees, from noise_scale x
  # pure noise at u >= tau2 to the condition itself at u <= tau1 (u = t / T for eps and v, t for
  # rectified flow; 1 = pure noise). noise_scale 0 = off.
  c.sample.cads = ml_collections.ConfigDict()
  c.sample.cads.noise_scale = 0.0
  c.sample.cads.tau1 = 0.6
  c.sample.cads.tau2 = 0.9
  c.sample.cads.psi = 1.0  # Share of the rescaled perturbation (rescale=True).
  c.sample.cads.rescale = True  # Match each condition's mean and std after adding the noise.
  # Classifier guidance (ADM): scale x grad log p(y | z_t) of a noise-aware classifier trained by
  # this trainer (model.name="classifier", e.g. configs/quickstart_classifier.py) in `workdir`.
  c.sample.classifier = ml_collections.ConfigDict()
  c.sample.classifier.workdir = ""
  c.sample.classifier.scale = 0.0  # 0 = off.
  c.sample.classifier.step = 0  # Checkpoint step of the classifier (0 = the newest).
  # Autoguidance (Karras et al. 2024): a weaker version of the model (an earlier checkpoint,
  # `step`, or a smaller `variant` trained on the same data) in place of the unconditional pass:
  # D_guide + guidance_scale x (D_main - D_guide). "" = classifier-free guidance.
  c.sample.guide = ml_collections.ConfigDict()
  c.sample.guide.workdir = ""
  c.sample.guide.step = 0  # 0 = the newest checkpoint of guide.workdir.
  c.sample.guide.variant = ""  # "" = the main model's config.model.variant.

  c.eval = ml_collections.ConfigDict()
  c.eval.name = "eval"
  # The validation loss (train.val_every): the data config with `val_split` as data.split ("" =
  # the data's held-out split: "held_out" for digits and shapes, "validation" for tfds) and, if
  # set, `val_path` as data.path (folder, latents: the held-out data's directory); its first
  # `val_examples` elements spread evenly (0 = all), each at `val_timesteps` times evenly
  # spaced over [0, 1] with noise drawn from (val_seed, example, time) alone, in chunks of
  # `val_device_batch` examples per device, so it is the same bits on any number of devices.
  # A transformers CLIPModel directory (e.g. a saved openai/clip-vit-large-patch14): text
  # models' evaluations then report the CLIP score of the samples against their prompts.
  c.eval.clip_model = ""
  c.eval.val_split = ""
  c.eval.val_path = ""
  c.eval.val_examples = 256
  c.eval.val_timesteps = 8
  c.eval.val_seed = 0
  c.eval.val_device_batch = 8
  c.eval.num_images = 1000
  # An ADM reference batch (.npz with arr_0 images and/or mu, sigma, mu_s, sigma_s) to score
  # against; "" = the config's own training data (min(its size, eval.num_images) images spread
  # evenly through it), featurized once and cached as workdir/eval/reference_<key>.npz.
  c.eval.reference = ""
  # The FID Inception's weights: pt_inception-2015-12-05-6726825d.pth (pytorch-fid's release) or
  # the .npz converted from it; "" = none (then only digits/shapes can be scored, without FID).
  c.eval.inception_weights = ""
  c.eval.batch_size = 64  # Images per Inception step over the whole mesh.

  # The autoencoder between pixels and latents (latent models only).
  c.vae = ml_collections.ConfigDict()
  # A diffusers-format AutoencoderKL directory (config.json + diffusion_pytorch_model.safetensors,
  # e.g. sd-vae-ft-ema or SD3's vae/); "" = sampling a latent model writes latents, not images.
  c.vae.path = ""
  c.vae.dtype = "float32"  # float32 | bfloat16 compute.

  c.parallel = ml_collections.ConfigDict()
  c.parallel.preset = "dp"
  c.parallel.mesh = ml_collections.ConfigDict()
  c.parallel.mesh.data = -1  # -1: all remaining devices.
  c.parallel.mesh.fsdp = 1
  c.parallel.mesh.tensor = 1
  # Across slices (multi-slice TPU, data-center network): the product is the number of slices;
  # the full mesh is mesh x dcn_mesh axis by axis. Keep tensor (and usually fsdp) within a slice.
  # -1: the slices left over (all of them by default: data parallel across slices; 1 off TPU).
  c.parallel.dcn_mesh = ml_collections.ConfigDict()
  c.parallel.dcn_mesh.data = -1
  c.parallel.dcn_mesh.fsdp = 1
  c.parallel.dcn_mesh.tensor = 1
  # Per logical axis: "preset" keeps the preset's rule; "none" replicates; otherwise mesh axis
  # names joined by "," (e.g. --config.parallel.rules.mlp=tensor, rules.batch=data,fsdp).
  c.parallel.rules = ml_collections.ConfigDict({name: "preset" for name in LOGICAL_AXES})
  return c


def parse_value(text: str, default):
  """`text` as a value of `default`'s type (bools: 1/true/yes or 0/false/no); ValueError if it
  does not parse."""
  if isinstance(default, bool):
    if text and text.lower() in _TRUE:  # Empty is a bare flag's True only in `parse_arg`.
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(f"{text!r} is not a bool")
  return type(default)(text)


def parse_arg(arg: str | None, defaults: dict) -> dict:
  """Parses a config arg string `key=value,flag` against `defaults` (bools may be bare flags).

  Raises:
    ConfigError: for a key not in `defaults`, or a value that does not parse as its default's
      type (bools: 1/true/yes or 0/false/no).
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      if not defaults:
        raise ConfigError(
          f"Unknown config arg {key!r}: this config takes no args; set fields with "
          "--config.<field>=<value>."
        )
      close = difflib.get_close_matches(key, list(defaults), n=1)
      hint = f" (did you mean {close[0]!r}?)" if close else ""
      raise ConfigError(
        f"Unknown config arg {key!r}{hint}; this config takes {', '.join(defaults)} "
        "(see its docstring)."
      )
    default = defaults[key]
    if isinstance(default, bool):
      try:
        out[key] = parse_value(value, default) if value else True  # Bare `key` or `key=`.
      except ValueError:
        raise ConfigError(
          f"Config arg {key}={value!r} is not a bool; write {key} or {key}=false."
        ) from None
    elif not eq:
      raise ConfigError(f"Config arg {key!r} needs a value, e.g. {key}={default}.")
    else:
      try:
        out[key] = parse_value(value, default)
      except ValueError:
        kind = type(default).__name__
        raise ConfigError(
          f"Config arg {key}={value!r} is not a {kind}; e.g. {key}={default}."
        ) from None
  return out


# --- The config of a saved run ------------------------------------------------------------------

# Fields that make the network and what its output means: a checkpoint is read with its own. The
# rest of `model` (how it runs: remat, scan unrolling, attention kernel, compute dtype) may change.
_RUN_FIELDS = {
  "model": None,  # All of model but _MODEL_EXECUTION.
  "diffusion": None,  # All of diffusion.
  "data": ("name", "image_size", "channels", "latent_scale"),
}
_MODEL_EXECUTION = ("remat", "scan_unroll", "attention", "dtype")
# Sections a --config given with a saved run's workdir sets (sampling, scoring, decoding, mesh).
_EVAL_SECTIONS = ("sample", "eval", "vae", "parallel")


def _fill(target: ml_collections.ConfigDict, saved: dict, where: str) -> None:
  for key, value in saved.items():
    if key in target and isinstance(target[key], ml_collections.ConfigDict):
      if not isinstance(value, dict):
        raise ConfigError(f"The saved config's {where}{key} is {value!r}, not a section.")
      _fill(target[key], value, f"{where}{key}.")
    elif key in target and isinstance(target[key], tuple) and isinstance(value, list):
      target[key] = tuple(value)  # JSON has no tuples.
    else:
      try:
        target[key] = value
      except TypeError as e:
        raise ConfigError(f"The saved config's {where}{key}={value!r} cannot be read: {e}.") from e


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """The config a run saved (as JSON, e.g. in its checkpoints), over the base config, so that
  fields added since it was written take their defaults."""
  config = base_config()
  _fill(config, saved, "")
  return config


def run_fields(config: ml_collections.ConfigDict) -> dict:
  """The fields (dotted names) that make the network and what its output means."""
  out = {}
  for section, keys in _RUN_FIELDS.items():
    values = config[section].to_dict()
    if section == "model":
      keys = [k for k in values if k not in _MODEL_EXECUTION]
    out.update({f"{section}.{k}": values.get(k) for k in keys or values})
  return out


def for_saved_run(
  saved: ml_collections.ConfigDict, given: ml_collections.ConfigDict | None, where: str
) -> ml_collections.ConfigDict:
  """The config to sample or evaluate a saved run with: the run's own (`saved`), with what
  `given` (a --config given alongside, or None) sets of sampling, scoring, decoding, the mesh, the
  data's location and how the network runs (model.remat/scan_unroll/attention/dtype).

  Raises:
    ConfigError: `given` differs from the run in a field that makes the network or what its
      output means (a model, diffusion or data-shape field), naming it.
  """
  if given is None:
    return saved
  # As they read back from JSON (tuples as lists), as the saved run's were.
  ours, theirs = (json.loads(json.dumps(run_fields(c))) for c in (given, saved))
  diff = [k for k in theirs if ours.get(k) != theirs[k]]
  if diff:
    shown = "; ".join(f"config.{k}={ours.get(k)!r} here, {theirs[k]!r} in the run" for k in diff)
    raise ConfigError(
      f"--config differs from the model saved in {where}: {shown}. Those fields come from the "
      "checkpoint: drop them (or --config, to take all of the run's config), or use another "
      "--workdir."
    )
  config = ml_collections.ConfigDict(saved.to_dict())
  for section in _EVAL_SECTIONS:
    config[section] = ml_collections.ConfigDict(given[section].to_dict())
  locked = _RUN_FIELDS["data"]
  for key, value in given.data.items():
    if key not in locked:
      config.data[key] = value
  for key in _MODEL_EXECUTION:
    config.model[key] = given.model[key]
  return config
