"""Precomputes Stable Diffusion 3's text conditioning of a list of captions, on the mesh.

  python -m dit_jax.tools.encode_text --captions=captions.txt --out=DATA_DIR \
      --clip_l=sd3/text_encoder --clip_g=sd3/text_encoder_2 --t5=sd3/text_encoder_3 \
      --compute_dtype=bfloat16

Caption i is the caption of example i (the order of the latents beside it in DATA_DIR); an empty
caption is the empty caption. --captions is a text file (one caption per line), a JSONL file
(.jsonl, one object per line; --caption_field names the key, default "caption"), or a directory
of per-example caption files (<name>.txt beside <name>.<image>, in sorted order, as an image
folder lists them). Each encoder is a local Hugging Face directory (nothing is downloaded):
a CLIPTextModelWithProjection or CLIPModel for the CLIPs, a T5EncoderModel or T5 for T5, with the
tokenizer in the same directory or, for a diffusers pipeline's text_encoder[_N] folder, in its
sibling tokenizer[_N].

--backend=jax (the default) runs the Flax encoders of `dit_jax.text_encoders` over every device
and process (`--preset` lays the params out; fsdp splits T5-XXL over all devices), with the
tokenizers of `transformers` on the host (`pip install 'dit_jax[text]'`, no PyTorch).
--backend=torch runs `transformers`' PyTorch models (`--device=cpu|cuda`), kept to check the JAX
path against.

The layout is that of diffusers' StableDiffusion3Pipeline.encode_prompt (`text_encoders.layout`).
Writes context.npy, pooled.npy, captions.txt, text_encoders.json and null_text.npz (the empty
caption's encoding) into --out, in the format of `dit_jax.data.text`; the arrays are filled batch
by batch through memory maps, so the captions need not fit in memory as embeddings. Into a gs://
--out, or beside ArrayRecord latents, it writes ArrayRecord shards instead (--format=array_record,
of the latents' --shard_size), each whole once finished, so a killed run rerun with the same
arguments resumes after its last whole shard and writes the same bytes; text_job.json records
what they were encoded from, and a rerun with other captions or encoders is refused unless
--overwrite. Process 0 writes; every process encodes its part of each batch.
"""

import dataclasses
import hashlib
import json
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

from dit_jax import cli, parallel, storage, text_encoders
from dit_jax.data import latents, records, text
from dit_jax.errors import ConfigError, check_choice
from dit_jax.parallel import distributed
from dit_jax.text_encoders import CLIP_NAMES, ENCODER_NAMES, TextEncoder

BACKENDS = ("jax", "torch")
DTYPES = ("float16", "float32")
TORCH_COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _import_torch():
  """Imports torch and transformers, or says how to install them."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ConfigError(
      f"--backend=torch needs torch and transformers ({e}); install them with "
      "`pip install torch transformers`, or use --backend=jax."
    ) from e
  return torch, transformers


def load_torch_encoder(
  name: str, path: str, max_length: int, device: str = "cpu", compute_dtype: str = "float32"
) -> TextEncoder:
  """One of SD3's text encoders as `transformers`' PyTorch model (the parity backend).

  Raises:
    ConfigError: for a missing or unloadable directory, a checkpoint of another model class,
      a CLIP max_length beyond its position embeddings, or an unavailable device.
  """
  check_choice(name, ENCODER_NAMES, "text encoder", prefix="")
  check_choice(compute_dtype, TORCH_COMPUTE_DTYPES, "compute_dtype", prefix="")
  torch, transformers = _import_torch()
  text_encoders.check_local_dir(name, path)
  if device.startswith("cuda") and not torch.cuda.is_available():
    raise ConfigError(f"device={device!r}, but torch sees no CUDA GPU; use device='cpu'.")
  is_clip = name in CLIP_NAMES
  cls = transformers.CLIPTextModelWithProjection if is_clip else transformers.T5EncoderModel
  tokenizer = text_encoders.load_tokenizer(name, path)
  try:
    model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{name}={path!r} cannot be loaded as a {cls.__name__}: {e}") from e
  if info["missing_keys"]:
    # from_pretrained fills missing weights randomly (e.g. the projection of a CLIPTextModel).
    raise ConfigError(
      f"{name}={path!r} lacks the weights {sorted(info['missing_keys'])[:5]} of a "
      f"{cls.__name__}; point it to that model's checkpoint."
    )
  # T5's relative positions take any length; CLIP's learned ones stop at max_position_embeddings.
  positions = model.config.max_position_embeddings if is_clip else max_length
  if max_length > positions:
    raise ConfigError(
      f"The {name} encoder has {positions} positions, fewer than the {max_length} tokens asked; "
      f"set clip_max_length <= {positions}."
    )
  model = model.to(device=device, dtype=getattr(torch, compute_dtype)).eval()

  def forward(ids: np.ndarray):
    ids = torch.from_numpy(ids.astype(np.int64)).to(model.device)
    with torch.inference_mode():
      if not is_clip:
        return model(ids).last_hidden_state.float().cpu().numpy(), None
      out = model(ids, output_hidden_states=True)
      return out.hidden_states[-2].float().cpu().numpy(), out.text_embeds.float().cpu().numpy()

  config = model.config
  return TextEncoder(
    name=name,
    tokenizer=tokenizer,
    max_length=max_length,
    width=config.hidden_size if is_clip else config.d_model,
    pooled_width=config.projection_dim if is_clip else 0,
    forward=forward,
    module=model,
  )


def load_encoders(
  paths: dict[str, str | None],
  clip_max_length: int = 77,
  t5_max_length: int = 256,
  *,
  backend: str = "jax",
  mesh=None,
  compute_dtype: str = "float32",
  preset: str = "fsdp",
  device: str = "cpu",
) -> dict[str, TextEncoder]:
  """Loads the encoders whose path is given (keys from ENCODER_NAMES; None or "" = absent).

  Args:
    paths: {name: local directory}.
    clip_max_length, t5_max_length: tokens per caption.
    backend: "jax" (the Flax encoders on `mesh`) or "torch" (transformers on `device`).
    mesh: the jax backend's mesh; None = every device, the batch and params split over them
      (fsdp axis).
    compute_dtype: float32 or bfloat16 (the torch backend also takes float16).
    preset: the jax backend's parameter layout (a `dit_jax.parallel` preset).
    device: the torch backend's device.

  Raises:
    ConfigError: if no CLIP is given (the pooled vector comes from the CLIPs), or as the
      loaders do.
  """
  check_choice(backend, BACKENDS, "--backend", prefix="")
  text_encoders.check_paths(paths)
  if backend == "jax":
    mesh = text_encoders.make_mesh() if mesh is None else mesh
    return text_encoders.load_encoders(
      paths, mesh, clip_max_length, t5_max_length, compute_dtype, preset
    )
  return {
    name: load_torch_encoder(
      name,
      paths[name],
      clip_max_length if name in CLIP_NAMES else t5_max_length,
      device,
      compute_dtype,
    )
    for name in ENCODER_NAMES
    if paths.get(name)
  }


FORMATS = records.FORMATS
JOB_FILE = "text_job.json"  # array_record: what the shards there were encoded from.
DEFAULT_SHARD_SIZE = 10_000


def _stored(x: np.ndarray, dtype: str, start: int, rows: int) -> np.ndarray:
  stored = x.astype(dtype)
  if not np.isfinite(stored).all():
    fix = "--dtype=float32" if np.isfinite(x).all() else "--compute_dtype=float32"
    raise ConfigError(
      f"Captions {start}..{start + rows - 1} encode to non-finite values in {dtype} storage; "
      f"rerun with {fix}."
    )
  return stored


def _choose_layout(out: str, count: int, format: str, shard_size: int, batch_size: int):
  """(format, shard_size) for `out`: array_record for a gs:// `out` or one that holds
  array_record latents (whose shard size the text then takes), else npy."""
  beside = latents.LatentsMetadata.load(out) if storage.isdir(out) else None
  if beside is not None and beside.count != count:
    raise ConfigError(
      f"--captions has {count} captions, but --out={out} holds {beside.count} latents; give one "
      "caption per latent, in the latents' order."
    )
  sharded_latents = beside is not None and beside.format == records.FORMAT
  format = records.output_format(format, out, sharded_default=sharded_latents)
  if format != records.FORMAT:
    return format, 0
  if shard_size < 0:
    raise ConfigError(f"--shard_size={shard_size} must be positive (0: the default).")
  shard_size = shard_size or (beside.shard_size if sharded_latents else DEFAULT_SHARD_SIZE)
  return format, -(-shard_size // batch_size) * batch_size  # Whole batches per shard.


def _resume_shards(out: str, job: dict, overwrite: bool) -> int:
  """Rows already encoded in `out` by the same job (`job`: what they depend on), after the
  unbroken run of whole shards from the first; starts the job's bookkeeping if there is none."""
  job_path = storage.join(out, JOB_FILE)
  names = records.shard_names(text.SHARD_KIND, job["count"], job["shard_size"])
  present = set(storage.listdir(out))
  old = storage.read_json(job_path) if storage.isfile(job_path) else None
  ours = sorted(n for n in present if n.startswith(text.SHARD_KIND + "-"))
  if old != job and (old is not None or ours):
    if not overwrite:
      diff = "; ".join(
        f"{k}={(old or {}).get(k)!r} there, {job[k]!r} here"
        for k in job
        if (old or {}).get(k) != job[k]
      )
      raise ConfigError(
        f"--out={out} holds text shards encoded from other inputs ({diff or 'no ' + JOB_FILE}); "
        "rerun with the same captions, encoders and flags to resume, or pass --overwrite to "
        "encode them anew."
      )
    logging.warning("Removing the text shards in %s (--overwrite).", out)
    for name in [*ours, JOB_FILE]:
      storage.remove(storage.join(out, name))
    present = set()
  if old != job or not storage.isfile(job_path):
    storage.write_json(job_path, job)
  done = 0
  while done < len(names) and names[done] in present:
    done += 1
  return min(done * job["shard_size"], job["count"])


def write(
  captions: Sequence[str],
  encoders: dict[str, TextEncoder],
  out: str,
  batch_size: int = 64,
  dtype: str = "float16",
  *,
  format: str = "",
  shard_size: int = 0,
  overwrite: bool = False,
  max_batches: int | None = None,
) -> tuple[text.TextSpec, dict[str, int]]:
  """Encodes `captions` batch by batch into `out` (format of `dit_jax.data.text`), a local
  directory or a gs:// one.

  The npy format fills context.npy and pooled.npy through memory maps (a local disk), rewritten
  on every run. The array_record format writes shards of `shard_size` captions, each whole once
  finished, so a rerun of a killed job resumes after its last whole shard and writes the same
  bytes. text_encoders.json comes last: until it is there, the embeddings are not complete.

  Args:
    captions: caption i is the text of example i of the latents in `out`.
    encoders: from `load_encoders`.
    out: the output directory (the latents' directory).
    batch_size: captions per forward pass.
    dtype: storage dtype, one of DTYPES.
    format: "npy" or "array_record"; "" = array_record for a gs:// `out` or beside array_record
      latents, else npy.
    shard_size: captions per shard (array_record; rounded up to whole batches); 0 = the shard
      size of the latents beside, else DEFAULT_SHARD_SIZE.
    overwrite: replace the shards of another job instead of refusing to.
    max_batches: stop after this many batches (a test hook that simulates a kill).

  Returns:
    The spec written, and how many captions each encoder truncated in this run.

  Raises:
    ConfigError: for a bad dtype, format or batch size, captions that do not match the latents
      in `out`, shards there from other inputs, or embeddings that are not finite (in float32,
      or only after casting to float16).
  """
  check_choice(dtype, DTYPES, "dtype", prefix="")
  if batch_size < 1:
    raise ConfigError(f"batch_size={batch_size} must be at least 1.")
  n = len(captions)
  format, shard_size = _choose_layout(out, n, format, shard_size, batch_size)

  spec = text_encoders.text_spec(encoders)
  sharded = format == records.FORMAT
  stored = text.StoredText(format, n if sharded else 0, shard_size)
  job = None
  if sharded:
    job = {
      "count": n,
      "captions_sha256": hashlib.sha256("\n".join(captions).encode()).hexdigest(),
      "shard_size": shard_size,
      "batch_size": batch_size,
      "dtype": dtype,
      "layout": [dataclasses.asdict(slot) for slot in spec.encoders],
      # The empty caption's encoding stands for the encoders' weights and compute dtype.
      "null_sha256": hashlib.sha256(
        spec.null_context.tobytes() + spec.null_pooled.tobytes()
      ).hexdigest(),
    }
    job = json.loads(json.dumps(job))  # As it reads back.
  start = distributed.on_process_0(
    lambda: _prepare(out, n, spec, dtype, stored, job, overwrite),
    f"write into --out={out!r}",
    "choose a writable directory.",
  )
  if start > n:
    logging.info("%s holds all %d text embeddings already; nothing to do.", out, n)
    return spec, dict.fromkeys(encoders, 0)
  writer = jax.process_index() == 0
  if writer and not sharded:
    context = storage.open_memmap(storage.join(out, text.CONTEXT_FILE), "r+")
    pooled = storage.open_memmap(storage.join(out, text.POOLED_FILE), "r+")
  num_shards = records.num_shards(n, shard_size) if sharded else 0
  shard = {"context": [], "pooled": []}
  truncated = dict.fromkeys(encoders, 0)
  bar = tqdm(
    total=n,
    initial=start,
    desc="encode_text",
    unit="caption",
    dynamic_ncols=True,
    disable=not writer,
  )
  with bar:
    for batches, begin in enumerate(range(start, n, batch_size)):
      if max_batches is not None and batches >= max_batches:
        logging.info("Stopping after %d batches (max_batches); %d of %d done.", batches, begin, n)
        return spec, truncated
      batch = captions[begin : begin + batch_size]
      c, p = text_encoders.encode(batch, encoders)
      for name, count in text_encoders.count_truncated(batch, encoders).items():
        truncated[name] += count
      c, p = _stored(c, dtype, begin, len(batch)), _stored(p, dtype, begin, len(batch))
      end = begin + len(batch)
      bar.update(len(batch))
      if not writer:
        continue
      if sharded:
        shard["context"].append(c)
        shard["pooled"].append(p)
        if end % shard_size == 0 or end == n:
          name = records.shard_name(text.SHARD_KIND, (end - 1) // shard_size, num_shards)
          rows = {k: np.concatenate(v) for k, v in shard.items()}
          records.write_shard(storage.join(out, name), rows)
          shard = {"context": [], "pooled": []}
      else:
        context[begin:end], pooled[begin:end] = c, p
  if writer:
    if not sharded:
      context.flush()
      pooled.flush()
      del context, pooled
    storage.write_text(
      storage.join(out, text.CAPTIONS_FILE), "".join(caption + "\n" for caption in captions)
    )
    spec.save(out, stored)
  return spec, truncated


def _prepare(
  out: str,
  n: int,
  spec: text.TextSpec,
  dtype: str,
  stored: text.StoredText,
  job: dict | None,
  overwrite: bool,
) -> int:
  """On process 0: readies `out` for the job and returns the first caption to encode, or n + 1
  if `out` holds the whole job already."""
  storage.makedirs(out)
  start = 0 if job is None else _resume_shards(out, job, overwrite)
  spec_path = storage.join(out, text.SPEC_FILE)
  if start >= n and storage.isfile(spec_path) and text.stored_layout(out) == stored:
    return n + 1
  # Until the spec is written again, a crashed or running job does not look complete.
  for stale in (text.SPEC_FILE, text.NULL_FILE):
    storage.remove(storage.join(out, stale))
  if job is None:
    shapes = {
      text.CONTEXT_FILE: (n, spec.context_len, spec.context_dim),
      text.POOLED_FILE: (n, spec.pooled_dim),
    }
    for name, shape in shapes.items():
      storage.open_memmap(storage.join(out, name), "w+", dtype, shape).flush()
  return start


def _define_flags() -> None:
  """Defines the flags only when run as a program: a program that imports `encode` (e.g. to
  encode prompts for sampling) must not get --captions and --out as required flags."""
  flags.DEFINE_string(
    "captions", None, "Captions: a text file (one per line), a .jsonl file or an image folder."
  )
  flags.DEFINE_string("caption_field", "caption", "The caption's key in a .jsonl file.")
  flags.DEFINE_string("out", None, "Output directory (created; the latents' directory).")
  flags.DEFINE_string("clip_l", None, "Local CLIP-L directory (CLIPTextModelWithProjection).")
  flags.DEFINE_string("clip_g", None, "Local OpenCLIP bigG directory (the same class).")
  flags.DEFINE_string("t5", None, "Local T5 (T5EncoderModel) directory; omit for CLIP rows only.")
  flags.DEFINE_integer("clip_max_length", 77, "CLIP tokens per caption.")
  flags.DEFINE_integer("t5_max_length", 256, "T5 tokens per caption.")
  flags.DEFINE_integer("batch_size", 64, "Captions per forward pass, over all devices.")
  flags.DEFINE_enum("dtype", "float16", DTYPES, "Storage dtype of context and pooled.")
  flags.DEFINE_string(
    "compute_dtype", "float32", "Dtype the encoders run in: float32 or bfloat16 (torch: float16)."
  )
  flags.DEFINE_string("backend", "jax", "jax (Flax encoders on the mesh) or torch (parity).")
  flags.DEFINE_string("preset", "fsdp", "jax: how params are laid out (dp, fsdp, fsdp_tp).")
  flags.DEFINE_string("mesh", "1,-1,1", f"jax: mesh {text_encoders.MESH_HELP}.")
  flags.DEFINE_string("device", "cpu", "torch: cpu, cuda or cuda:N.")
  flags.DEFINE_string(
    "format", "", "npy | array_record (shards; default on gs:// and beside array_record latents)."
  )
  flags.DEFINE_integer("shard_size", 0, "Captions per array_record shard (0: the latents').")
  flags.DEFINE_bool("overwrite", False, "Replace text shards encoded from other inputs.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
  flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
  flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
  flags.mark_flags_as_required(["captions", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  storage.check_reachable(f.out, f.captions)
  # Before the encoders load: a bad flag is reported at once.
  if f.format:
    check_choice(f.format, FORMATS, "--format", prefix="")
  check_choice(f.backend, BACKENDS, "--backend", prefix="")
  dtypes = text_encoders.COMPUTE_DTYPES if f.backend == "jax" else TORCH_COMPUTE_DTYPES
  check_choice(f.compute_dtype, dtypes, "--compute_dtype", prefix="")
  check_choice(f.preset, parallel.PRESETS, "--preset", prefix="")
  captions = text.read_captions(f.captions, f.caption_field)
  mesh = None
  if f.backend == "jax":
    distributed.initialize(f.coordinator_address, f.num_processes, f.process_id)
    mesh = text_encoders.make_mesh(f.mesh)
  encoders = load_encoders(
    {"clip_l": f.clip_l, "clip_g": f.clip_g, "t5": f.t5},
    f.clip_max_length,
    f.t5_max_length,
    backend=f.backend,
    mesh=mesh,
    compute_dtype=f.compute_dtype,
    preset=f.preset,
    device=f.device,
  )
  spec, truncated = write(
    captions,
    encoders,
    f.out,
    f.batch_size,
    f.dtype,
    format=f.format,
    shard_size=f.shard_size,
    overwrite=f.overwrite,
  )
  if jax.process_index():
    return
  n = len(captions)
  slots = ", ".join(f"{s.name} rows {s.seq} channels {s.context_channels}" for s in spec.encoders)
  logging.info(
    "Wrote %d captions to %s: context %s and pooled %s in %s (%s); truncated per encoder: %s.",
    n,
    f.out,
    [n, spec.context_len, spec.context_dim],
    [n, spec.pooled_dim],
    f.dtype,
    slots,
    truncated,
  )


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
