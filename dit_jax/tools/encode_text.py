"""Precomputes Stable Diffusion 3's text conditioning of a list of captions.

  python -m dit_jax.tools.encode_text --captions=captions.txt --out=DATA_DIR \
      --clip_l=sd3/text_encoder --clip_g=sd3/text_encoder_2 --t5=sd3/text_encoder_3 \
      --device=cuda

Line i of --captions is the caption of example i (the order of the latents beside it in
DATA_DIR); an empty line is the empty caption. Each encoder is a local directory that Hugging
Face `from_pretrained` loads (nothing is downloaded): CLIPTextModelWithProjection for the CLIPs,
T5EncoderModel for T5, with the tokenizer in the same directory or, for a diffusers pipeline's
text_encoder[_N] folder, in its sibling tokenizer[_N]. Needs torch and transformers
(`pip install 'dit_jax[text]'`).

The layout is that of diffusers' StableDiffusion3Pipeline.encode_prompt: each CLIP's penultimate
hidden state over clip_max_length tokens, CLIP-L then CLIP-G along channels, zero-padded to T5's
width, then T5's last hidden state over t5_max_length tokens in the rows after; pooled is CLIP-L's
then CLIP-G's projected end-of-text embedding. Writes context.npy, pooled.npy, captions.txt,
text_encoders.json and null_text.npz (the empty caption's encoding) into --out, in the format of
`dit_jax.data.text`; the arrays are filled batch by batch through memory maps, so the captions
need not fit in memory as embeddings. Into a gs:// --out, or beside ArrayRecord latents, it writes
ArrayRecord shards instead (--format=array_record, of the latents' --shard_size), each whole once
finished, so a killed run rerun with the same arguments resumes after its last whole shard and
writes the same bytes; text_job.json records what they were encoded from, and a rerun with other
captions or encoders is refused unless --overwrite.
"""

import dataclasses
import hashlib
import json
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import app, flags, logging

from dit_jax import cli, storage
from dit_jax.data import latents, records, text
from dit_jax.errors import ConfigError, check_choice

ENCODER_NAMES = ("clip_l", "clip_g", "t5")
CLIP_NAMES = ("clip_l", "clip_g")
DTYPES = ("float16", "float32")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# Any one of these marks a directory that holds a Hugging Face tokenizer.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """A loaded Hugging Face text encoder, its tokenizer and the token length it pads to."""

  name: str  # one of ENCODER_NAMES
  model: Any  # torch.nn.Module
  tokenizer: Any
  max_length: int

  @property
  def is_clip(self) -> bool:
    return self.name in CLIP_NAMES

  @property
  def width(self) -> int:
    """Channels of the sequence features."""
    config = self.model.config
    return config.hidden_size if self.is_clip else config.d_model

  @property
  def pooled_width(self) -> int:
    """Channels of the pooled vector (0 for T5, which has none)."""
    return self.model.config.projection_dim if self.is_clip else 0


def _import_torch():
  """Imports torch and transformers, or says how to install them."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ConfigError(
      f"Encoding text needs torch and transformers ({e}); install them with "
      "`pip install 'dit_jax[text]'`."
    ) from e
  return torch, transformers


def _tokenizer_dir(name: str, path: str) -> str:
  """`path` if it holds a tokenizer, else the sibling tokenizer[_N] of a diffusers
  text_encoder[_N] folder (SD3's checkpoints keep them apart)."""
  if any(storage.isfile(storage.join(path, f)) for f in _TOKENIZER_FILES):
    return path
  match = re.fullmatch(r"text_encoder(_\d+)?", storage.basename(storage.resolve(path)))
  if match:
    sibling = storage.join(storage.parent(path), "tokenizer" + (match.group(1) or ""))
    if storage.isdir(sibling):
      return sibling
  raise ConfigError(
    f"{name}={path!r} holds no tokenizer (none of {list(_TOKENIZER_FILES)}); save the encoder's "
    "tokenizer into it with `tokenizer.save_pretrained(path)`."
  )


def load_encoder(
  name: str, path: str, max_length: int, device: str = "cpu", compute_dtype: str = "float32"
) -> TextEncoder:
  """Loads one of SD3's text encoders and its tokenizer from a local directory.

  Args:
    name: "clip_l", "clip_g" (CLIPTextModelWithProjection) or "t5" (T5EncoderModel).
    path: a directory written by `save_pretrained`; nothing is downloaded.
    max_length: tokens per caption (captions are padded and truncated to it).
    device: torch device the encoder runs on.
    compute_dtype: one of COMPUTE_DTYPES.

  Raises:
    ConfigError: for a missing or unloadable directory, a checkpoint of another model class,
      a CLIP max_length beyond its position embeddings, or an unavailable device.
  """
  check_choice(name, ENCODER_NAMES, "text encoder", prefix="")
  check_choice(compute_dtype, COMPUTE_DTYPES, "compute_dtype", prefix="")
  torch, transformers = _import_torch()
  if storage.is_remote(path):
    raise ConfigError(
      f"{name}={path!r} is on GCS, but the encoders load from a local directory; copy it first "
      f"(gcloud storage cp -r {path} .) and pass the copy."
    )
  if not storage.isdir(path):
    raise ConfigError(
      f"{name}={path!r} is not a directory; pass a local directory holding the saved encoder "
      "and its tokenizer (nothing is downloaded)."
    )
  if device.startswith("cuda") and not torch.cuda.is_available():
    raise ConfigError(f"device={device!r}, but torch sees no CUDA GPU; use device='cpu'.")
  cls = (
    transformers.CLIPTextModelWithProjection if name in CLIP_NAMES else transformers.T5EncoderModel
  )
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(
      _tokenizer_dir(name, path), local_files_only=True
    )
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
  positions = model.config.max_position_embeddings if name in CLIP_NAMES else max_length
  if max_length > positions:
    raise ConfigError(
      f"The {name} encoder has {positions} positions, fewer than the {max_length} tokens asked; "
      f"set clip_max_length <= {positions}."
    )
  model = model.to(device=device, dtype=getattr(torch, compute_dtype)).eval()
  return TextEncoder(name=name, model=model, tokenizer=tokenizer, max_length=max_length)


def load_encoders(
  paths: dict[str, str | None],
  clip_max_length: int = 77,
  t5_max_length: int = 256,
  device: str = "cpu",
  compute_dtype: str = "float32",
) -> dict[str, TextEncoder]:
  """Loads the encoders whose path is given (keys from ENCODER_NAMES; None or "" = absent).

  Raises:
    ConfigError: if no CLIP is given (the pooled vector comes from the CLIPs), or as
      `load_encoder` does.
  """
  unknown = sorted(set(paths) - set(ENCODER_NAMES))
  if unknown:
    raise ConfigError(f"Unknown text encoders {unknown}; choose from {list(ENCODER_NAMES)}.")
  if not any(paths.get(name) for name in CLIP_NAMES):
    raise ConfigError(
      "No CLIP encoder given: the pooled text vector comes from CLIP; pass --clip_l and/or "
      "--clip_g (local CLIPTextModelWithProjection directories)."
    )
  return {
    name: load_encoder(
      name,
      paths[name],
      clip_max_length if name in CLIP_NAMES else t5_max_length,
      device,
      compute_dtype,
    )
    for name in ENCODER_NAMES
    if paths.get(name)
  }


def _ordered(encoders: dict[str, TextEncoder]) -> list[TextEncoder]:
  """The encoders in SD3's order (CLIP-L, CLIP-G, T5), whatever the dict's order."""
  if not any(name in encoders for name in CLIP_NAMES):
    raise ConfigError("No CLIP encoder given: the pooled text vector comes from CLIP.")
  clip_lengths = {encoders[n].max_length for n in CLIP_NAMES if n in encoders}
  if len(clip_lengths) > 1:
    raise ConfigError(
      f"CLIP-L and CLIP-G share rows; give them one max_length, not {clip_lengths}."
    )
  return [encoders[name] for name in ENCODER_NAMES if name in encoders]


def layout(encoders: dict[str, TextEncoder]) -> tuple[int, int, int, tuple[text.EncoderSlot, ...]]:
  """Returns (context_len, context_dim, pooled_dim, slots) of SD3's text conditioning."""
  slots, rows, channels, pooled = [], 0, 0, 0
  for enc in _ordered(encoders):
    if enc.is_clip:
      rows = enc.max_length
      slots.append(
        text.EncoderSlot(
          enc.name,
          seq=(0, rows),
          context_channels=(channels, channels + enc.width),
          pooled_channels=(pooled, pooled + enc.pooled_width),
        )
      )
      channels += enc.width
      pooled += enc.pooled_width
    else:
      slots.append(text.EncoderSlot(enc.name, (rows, rows + enc.max_length), (0, enc.width)))
      rows += enc.max_length
      # SD3 pads the CLIP channels to T5's width; a narrower T5 is padded to the CLIPs' instead.
      channels = max(channels, enc.width)
  return rows, channels, pooled, tuple(slots)


def _tokenize(enc: TextEncoder, captions: Sequence[str]):
  return enc.tokenizer(
    list(captions),
    padding="max_length",
    max_length=enc.max_length,
    truncation=True,
    return_tensors="pt",
  ).input_ids.to(enc.model.device)


def _forward(enc: TextEncoder, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray | None]:
  """Sequence features [N, max_length, width] and pooled [N, pooled_width] (None for T5)."""
  torch, _ = _import_torch()
  ids = _tokenize(enc, captions)
  with torch.inference_mode():
    if not enc.is_clip:
      return enc.model(ids).last_hidden_state.float().cpu().numpy(), None
    out = enc.model(ids, output_hidden_states=True)
    return out.hidden_states[-2].float().cpu().numpy(), out.text_embeds.float().cpu().numpy()


def encode(
  captions: Sequence[str], encoders: dict[str, TextEncoder]
) -> tuple[np.ndarray, np.ndarray]:
  """Encodes captions as SD3 does, in one forward pass per encoder.

  Args:
    captions: N captions; "" is the empty caption.
    encoders: from `load_encoders`, keyed by name (at least one CLIP).

  Returns:
    context float32 [N, context_len, context_dim] and pooled float32 [N, pooled_dim], laid out
    as `layout(encoders)` says; channels and rows no encoder fills are zero.
  """
  length, dim, pooled_dim, slots = layout(encoders)
  context = np.zeros((len(captions), length, dim), np.float32)
  pooled = np.zeros((len(captions), pooled_dim), np.float32)
  if not captions:
    return context, pooled
  for slot in slots:
    seq, vec = _forward(encoders[slot.name], captions)
    (r0, r1), (c0, c1), (p0, p1) = slot.seq, slot.context_channels, slot.pooled_channels
    context[:, r0:r1, c0:c1] = seq  # [N, max_length, width]
    if vec is not None:
      pooled[:, p0:p1] = vec  # [N, pooled_width]
  return context, pooled


def text_spec(encoders: dict[str, TextEncoder]) -> text.TextSpec:
  """The TextSpec of `encoders`, with the empty caption encoded through the same path."""
  length, dim, pooled_dim, slots = layout(encoders)
  null_context, null_pooled = encode([""], encoders)
  return text.TextSpec(length, dim, pooled_dim, slots, null_context[0], null_pooled[0])


def count_truncated(captions: Sequence[str], encoders: dict[str, TextEncoder]) -> dict[str, int]:
  """How many captions each encoder cuts to its max_length tokens."""
  counts = {}
  for name, enc in encoders.items():
    ids = enc.tokenizer(list(captions), truncation=False, verbose=False)["input_ids"]
    counts[name] = sum(len(i) > enc.max_length for i in ids)
  return counts


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
  from tqdm import tqdm

  spec = text_spec(encoders)
  storage.makedirs(out)
  sharded = format == records.FORMAT
  start = 0
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
    start = _resume_shards(out, json.loads(json.dumps(job)), overwrite)  # (As it reads back.)
  spec_path = storage.join(out, text.SPEC_FILE)
  stored = text.StoredText(format, n if sharded else 0, shard_size)
  if start >= n and storage.isfile(spec_path) and text.stored_layout(out) == stored:
    logging.info("%s holds all %d text embeddings already; nothing to do.", out, n)
    return spec, dict.fromkeys(encoders, 0)
  # Until the spec is written again, a crashed or running job does not look complete.
  for stale in (text.SPEC_FILE, text.NULL_FILE):
    storage.remove(storage.join(out, stale))
  if not sharded:
    context = storage.open_memmap(
      storage.join(out, text.CONTEXT_FILE), "w+", dtype, (n, spec.context_len, spec.context_dim)
    )
    pooled = storage.open_memmap(
      storage.join(out, text.POOLED_FILE), "w+", dtype, (n, spec.pooled_dim)
    )
  num_shards = records.num_shards(n, shard_size) if sharded else 0
  shard = {"context": [], "pooled": []}
  truncated = dict.fromkeys(encoders, 0)
  with tqdm(total=n, initial=start, desc="encode_text", unit="caption", dynamic_ncols=True) as bar:
    for batches, begin in enumerate(range(start, n, batch_size)):
      if max_batches is not None and batches >= max_batches:
        logging.info("Stopping after %d batches (max_batches); %d of %d done.", batches, begin, n)
        return spec, truncated
      batch = captions[begin : begin + batch_size]
      c, p = encode(batch, encoders)
      for name, count in count_truncated(batch, encoders).items():
        truncated[name] += count
      c, p = _stored(c, dtype, begin, len(batch)), _stored(p, dtype, begin, len(batch))
      end = begin + len(batch)
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
      bar.update(len(batch))
  if not sharded:
    context.flush()
    pooled.flush()
    del context, pooled
  storage.write_text(
    storage.join(out, text.CAPTIONS_FILE), "".join(caption + "\n" for caption in captions)
  )
  spec.save(out, stored)
  return spec, truncated


def _define_flags() -> None:
  """Defines the flags only when run as a program: a program that imports `encode` (e.g. to
  encode prompts for sampling) must not get --captions and --out as required flags."""
  flags.DEFINE_string("captions", None, "Text file of captions, one per line.")
  flags.DEFINE_string("out", None, "Output directory (created; the latents' directory).")
  flags.DEFINE_string("clip_l", None, "Local CLIP-L (CLIPTextModelWithProjection) directory.")
  flags.DEFINE_string("clip_g", None, "Local CLIP-G (CLIPTextModelWithProjection) directory.")
  flags.DEFINE_string("t5", None, "Local T5 (T5EncoderModel) directory; omit for CLIP rows only.")
  flags.DEFINE_integer("clip_max_length", 77, "CLIP tokens per caption.")
  flags.DEFINE_integer("t5_max_length", 256, "T5 tokens per caption.")
  flags.DEFINE_integer("batch_size", 64, "Captions per forward pass.")
  flags.DEFINE_enum("dtype", "float16", DTYPES, "Storage dtype of context and pooled.")
  flags.DEFINE_enum("compute_dtype", "float32", COMPUTE_DTYPES, "Dtype the encoders run in.")
  flags.DEFINE_string("device", "cpu", "torch device: cpu, cuda or cuda:N.")
  flags.DEFINE_string(
    "format", "", "npy | array_record (shards; default on gs:// and beside array_record latents)."
  )
  flags.DEFINE_integer("shard_size", 0, "Captions per array_record shard (0: the latents').")
  flags.DEFINE_bool("overwrite", False, "Replace text shards encoded from other inputs.")
  flags.mark_flags_as_required(["captions", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  storage.check_reachable(f.out, f.captions)
  if f.format:  # Before the encoders load: a bad flag is reported at once.
    check_choice(f.format, FORMATS, "--format", prefix="")
  captions = text.read_captions(f.captions)
  encoders = load_encoders(
    {"clip_l": f.clip_l, "clip_g": f.clip_g, "t5": f.t5},
    f.clip_max_length,
    f.t5_max_length,
    f.device,
    f.compute_dtype,
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
