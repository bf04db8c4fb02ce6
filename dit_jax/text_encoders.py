"""Stable Diffusion 3's frozen text encoders, run in JAX over a device mesh.

    encoders = load_encoders({"clip_l": "sd3/text_encoder", "clip_g": "sd3/text_encoder_2",
                              "t5": "sd3/text_encoder_3"}, mesh)
    context, pooled = encode(captions, encoders)   # SD3's layout (see `layout`)

Each encoder is a Flax module of `dit_jax.models` (CLIP's text tower, T5's encoder) with its
params read from the local Hugging Face directory (safetensors; no PyTorch) and laid out on the
mesh by the logical-axis rules of a `dit_jax.parallel` preset (default "fsdp": T5-XXL's 4.7B
parameters split over every device). Tokenization runs on the host with the directory's
Hugging Face tokenizer (`transformers`, which loads it without PyTorch). Every process passes the
same captions; the batch is split over the mesh's data axes and every process gets the whole
result back.

An encoder is a `TextEncoder`: a tokenizer, a token length and a function from token ids to
(sequence features, pooled vector), so the PyTorch backend of `dit_jax.tools.encode_text` (kept
for parity checks) plugs into the same `layout` and `encode`.
"""

import dataclasses
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dit_jax import parallel, storage
from dit_jax.data import text
from dit_jax.errors import ConfigError, check_choice
from dit_jax.models import clip, t5

ENCODER_NAMES = ("clip_l", "clip_g", "t5")
CLIP_NAMES = ("clip_l", "clip_g")
COMPUTE_DTYPES = ("float32", "bfloat16")
# Any one of these marks a directory that holds a Hugging Face tokenizer.
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")

MESH_HELP = "data,fsdp,tensor sizes (one may be -1: the devices left)"

Forward = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


@dataclasses.dataclass(frozen=True)
class TextEncoder:
  """One of SD3's text encoders, ready to run.

  Attributes:
    name: one of ENCODER_NAMES.
    tokenizer: a Hugging Face tokenizer (called on a list of captions).
    max_length: tokens per caption (captions are padded and truncated to it).
    width: channels of the sequence features.
    pooled_width: channels of the pooled vector (0 for T5, which has none).
    forward: token ids int32 [N, max_length] -> (sequence features float32 [N, max_length,
      width], pooled float32 [N, pooled_width] or None): for a CLIP the penultimate layer's
      hidden state and the projected end-of-text embedding, for T5 the last hidden state.
    module: the Flax module (the torch backend: the PyTorch model).
  """

  name: str
  tokenizer: Any
  max_length: int
  width: int
  pooled_width: int
  forward: Forward
  module: Any = None

  @property
  def is_clip(self) -> bool:
    return self.name in CLIP_NAMES


def tokenizer_dir(name: str, path: str) -> str:
  """`path` if it holds a tokenizer, else the sibling tokenizer[_N] of a diffusers
  text_encoder[_N] folder (SD3's checkpoints keep them apart)."""
  if any(storage.isfile(storage.join(path, f)) for f in TOKENIZER_FILES):
    return path
  match = re.fullmatch(r"text_encoder(_\d+)?", storage.basename(storage.resolve(path)))
  if match:
    sibling = storage.join(storage.parent(path), "tokenizer" + (match.group(1) or ""))
    if storage.isdir(sibling):
      return sibling
  raise ConfigError(
    f"{name}={path!r} holds no tokenizer (none of {list(TOKENIZER_FILES)}); save the encoder's "
    "tokenizer into it with `tokenizer.save_pretrained(path)`."
  )


def load_tokenizer(name: str, path: str):
  """The Hugging Face tokenizer of encoder directory `path` (or of its sibling tokenizer[_N])."""
  try:
    import transformers
  except ImportError as e:
    raise ConfigError(
      f"Tokenizing captions needs transformers ({e}); install it with "
      "`pip install 'dit_jax[text]'`."
    ) from None
  where = tokenizer_dir(name, path)
  try:
    return transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
  except (OSError, ValueError, TypeError, ImportError) as e:
    raise ConfigError(f"{name}: the tokenizer in {where!r} cannot be loaded ({e}).") from None


def tokenize(enc: TextEncoder, captions: Sequence[str]) -> np.ndarray:
  """Token ids int32 [N, max_length], padded and truncated as SD3's pipeline does."""
  ids = enc.tokenizer(
    list(captions), padding="max_length", max_length=enc.max_length, truncation=True
  )["input_ids"]
  return np.asarray(ids, np.int32).reshape(len(captions), enc.max_length)


def count_truncated(captions: Sequence[str], encoders: dict[str, TextEncoder]) -> dict[str, int]:
  """How many captions each encoder cuts to its max_length tokens."""
  counts = {}
  for name, enc in encoders.items():
    ids = enc.tokenizer(list(captions), truncation=False, verbose=False)["input_ids"]
    counts[name] = sum(len(i) > enc.max_length for i in ids)
  return counts


def _param_layout(module, ids_shape, mesh: Mesh, rules):
  """(unboxed param shapes, their shardings) of `module` on `mesh` under `rules`."""
  ids = jax.ShapeDtypeStruct(ids_shape, jnp.int32)
  boxed = jax.eval_shape(lambda x: module.init(jax.random.key(0), x), ids)["params"]
  return nn.unbox(boxed), parallel.logical_shardings(boxed, mesh, rules)


def place_params(module, params, ids_shape, mesh: Mesh, rules):
  """`params` (host numpy) on `mesh` as the module's logical axes and `rules` say."""
  shapes, shardings = _param_layout(module, ids_shape, mesh, rules)
  assert jax.tree.map(lambda b: b.shape, shapes) == jax.tree.map(np.shape, params), (
    "converted params differ from the module's"
  )
  return jax.tree.map(parallel.from_host, params, shardings)


def make_forward(module, params, mesh: Mesh, rules, outputs: Callable[[dict], tuple]) -> Forward:
  """A host function ids [N, L] -> outputs, jitted once per shape, the batch split over the
  mesh's data axes (padded to a multiple of their size) and gathered back to every process."""
  batch = parallel.batch_sharding(mesh)
  param_shardings = jax.tree.map(lambda a: a.sharding, params)

  def apply(p, ids):
    with nn.logical_axis_rules(rules):
      return outputs(module.apply({"params": p}, ids))

  jitted = jax.jit(apply, in_shardings=(param_shardings, batch), out_shardings=batch)

  def forward(ids: np.ndarray):
    n = ids.shape[0]
    dp = parallel.data_parallel_size(mesh)
    padded = -(-n // dp) * dp
    ids = np.concatenate([ids, np.zeros((padded - n, ids.shape[1]), ids.dtype)])
    with jax.set_mesh(mesh):
      out = jitted(params, parallel.from_host(ids.astype(np.int32), batch))
    out = multihost_utils.process_allgather(out, tiled=True)
    return jax.tree.map(lambda a: np.asarray(a, np.float32)[:n], out)

  return forward


def check_local_dir(name: str, path: str) -> None:
  """Raises a ConfigError unless encoder `name`'s `path` is a local directory."""
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


def load_encoder(
  name: str,
  path: str,
  max_length: int,
  mesh: Mesh,
  compute_dtype: str = "float32",
  preset: str = "fsdp",
) -> TextEncoder:
  """Loads one of SD3's text encoders from a local Hugging Face directory onto `mesh`.

  Args:
    name: "clip_l", "clip_g" (a CLIPTextModelWithProjection, or a CLIPModel) or "t5" (a
      T5EncoderModel or a whole T5).
    path: a directory written by `save_pretrained` (safetensors); nothing is downloaded.
    max_length: tokens per caption.
    mesh: the device mesh (data, fsdp, tensor); the batch splits over data x fsdp.
    compute_dtype: "float32", or "bfloat16" (params stored in it too; norms, logits, softmax and
      the residual stream stay float32).
    preset: the `dit_jax.parallel` preset whose rules lay the params out.

  Raises:
    ConfigError: for a directory that holds no such encoder or no tokenizer, weights that do
      not match, or a CLIP max_length beyond its position embeddings.
  """
  check_choice(name, ENCODER_NAMES, "text encoder", prefix="")
  check_choice(compute_dtype, COMPUTE_DTYPES, "compute_dtype", prefix="")
  check_choice(preset, parallel.PRESETS, "preset", prefix="")
  check_local_dir(name, path)
  dtype = jnp.dtype(compute_dtype)
  try:
    loaded = (clip.load_text_hf if name in CLIP_NAMES else t5.load_hf)(path, compute_dtype)
  except ConfigError as e:
    raise ConfigError(f"{name}: {e}") from None
  config, params = loaded
  if name in CLIP_NAMES:
    if not config.projection_dim:
      raise ConfigError(
        f"{name}={path!r} is a CLIPTextModel without the text projection that SD3's pooled vector "
        "needs; point it to the CLIPTextModelWithProjection (or CLIPModel) checkpoint."
      )
    if max_length > config.max_positions:
      raise ConfigError(
        f"The {name} encoder has {config.max_positions} positions, fewer than the {max_length} "
        f"tokens asked; set clip_max_length <= {config.max_positions}."
      )
    module = clip.CLIPText(config, dtype)
    width, pooled_width = config.width, config.projection_dim
  else:
    module = t5.T5Encoder(config, dtype)
    width, pooled_width = config.width, 0

  tokenizer = load_tokenizer(name, path)
  rules = parallel.PRESETS[preset]
  placed = place_params(module, params, (1, max_length), mesh, rules)
  return TextEncoder(
    name=name,
    tokenizer=tokenizer,
    max_length=max_length,
    width=width,
    pooled_width=pooled_width,
    forward=make_forward(module, placed, mesh, rules, sd3_outputs),
    module=module,
  )


def make_mesh(shape: str = "1,-1,1", devices=None) -> Mesh:
  """The (data, fsdp, tensor) mesh of "d,f,t" sizes over `devices` (default: every device of
  the job); the default puts them all on fsdp, so the batch and the params split over all."""
  try:
    sizes = [int(s) for s in shape.split(",")]
  except ValueError:
    sizes = []
  if len(sizes) != len(parallel.MESH_AXES):
    raise ConfigError(f"--mesh={shape!r} is not {MESH_HELP}, e.g. --mesh=1,-1,1.")
  config = ml_collections.ConfigDict(
    {
      "parallel": {
        "preset": "dp",
        "rules": {},
        "mesh": dict(zip(parallel.MESH_AXES, sizes, strict=True)),
        "dcn_mesh": dict(zip(parallel.MESH_AXES, (-1, 1, 1), strict=True)),
      }
    }
  )
  return parallel.make_mesh(config, devices)


def check_paths(paths: dict[str, str | None]) -> None:
  """Raises a ConfigError for an unknown encoder name, or if no CLIP is given."""
  unknown = sorted(set(paths) - set(ENCODER_NAMES))
  if unknown:
    raise ConfigError(f"Unknown text encoders {unknown}; choose from {list(ENCODER_NAMES)}.")
  if not any(paths.get(name) for name in CLIP_NAMES):
    raise ConfigError(
      "No CLIP encoder given: the pooled text vector comes from CLIP; pass --clip_l and/or "
      "--clip_g (local CLIPTextModelWithProjection directories)."
    )


def load_encoders(
  paths: dict[str, str | None],
  mesh: Mesh,
  clip_max_length: int = 77,
  t5_max_length: int = 256,
  compute_dtype: str = "float32",
  preset: str = "fsdp",
) -> dict[str, TextEncoder]:
  """Loads the encoders whose path is given (keys from ENCODER_NAMES; None or "" = absent)
  onto `mesh`, as `load_encoder` does."""
  check_paths(paths)
  return {
    name: load_encoder(
      name,
      paths[name],
      clip_max_length if name in CLIP_NAMES else t5_max_length,
      mesh,
      compute_dtype,
      preset,
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
  """(context_len, context_dim, pooled_dim, slots) of SD3's text conditioning: each CLIP's
  features over the CLIP rows, CLIP-L then CLIP-G along channels, zero-padded to T5's width, then
  T5's features in the rows after; pooled is CLIP-L's then CLIP-G's projected embedding."""
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


def encode(
  captions: Sequence[str], encoders: dict[str, TextEncoder]
) -> tuple[np.ndarray, np.ndarray]:
  """Encodes captions as SD3 does, in one forward pass per encoder.

  Args:
    captions: N captions; "" is the empty caption.
    encoders: keyed by name (at least one CLIP).

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
    enc = encoders[slot.name]
    seq, vec = enc.forward(tokenize(enc, captions))
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


# --- The released configurations, for benchmarks and compile checks (random or no weights) ---

RELEASED = {"clip_l": clip.CLIP_L, "clip_g": clip.CLIP_G, "t5_xxl": t5.T5_XXL}
SD3_LENGTHS = {"clip_l": 77, "clip_g": 77, "t5_xxl": 256}  # Tokens per caption in SD3.


def released_module(name: str, dtype: str = "bfloat16", depth: int = 0, unroll: int = 1):
  """The Flax module of released encoder `name` (RELEASED), `depth` layers if given."""
  check_choice(name, RELEASED, "text encoder", prefix="")
  config = RELEASED[name]
  if depth:
    config = dataclasses.replace(config, depth=depth)
  cls = t5.T5Encoder if name.startswith("t5") else clip.CLIPText
  return cls(config, jnp.dtype(dtype), unroll)


def sd3_outputs(out: dict) -> tuple[jax.Array, jax.Array | None]:
  """What SD3 takes from an encoder's outputs: a CLIP's penultimate hidden state and projected
  pooled vector, T5's last hidden state (and no pooled vector)."""
  if "text_embeds" in out:
    return out["penultimate"], out["text_embeds"]
  return out["last"], None


def sharded_forward(module, ids_shape: tuple[int, int], mesh: Mesh, rules, dtype: str):
  """(jitted forward ids -> `sd3_outputs`, abstract params and ids carrying their
  shardings) of `module` on `mesh`: what the benchmark times and the AOT check compiles."""
  ids = jax.ShapeDtypeStruct(ids_shape, jnp.int32, sharding=parallel.batch_sharding(mesh))
  shapes, shardings = _param_layout(module, ids_shape, mesh, rules)
  abstract = jax.tree.map(
    lambda b, s: jax.ShapeDtypeStruct(b.shape, jnp.dtype(dtype), sharding=s), shapes, shardings
  )

  def apply(p, x):
    with nn.logical_axis_rules(rules):
      return sd3_outputs(module.apply({"params": p}, x))

  batch = parallel.batch_sharding(mesh)
  return jax.jit(apply, in_shardings=(shardings, batch), out_shardings=batch), abstract, ids


def random_params(abstract):
  """Stand-in params laid out as `abstract` (from `sharded_forward`), made on the devices in
  their dtype, one array at a time and without random bits (an elementwise hash of the index,
  so no program holds more than the array itself: T5-XXL in float32 is 19 GB): norms' scales
  one, biases zero, the rest spread uniformly in [-0.02, 0.02). For timing and memory only."""

  def leaf(path, a):
    name = jax.tree_util.keystr(path[-1:], simple=True)
    seed = zlib.crc32(jax.tree_util.keystr(path).encode()) % 2**31

    def make():
      if name == "scale":
        return jnp.ones(a.shape, a.dtype)
      if name == "bias":
        return jnp.zeros(a.shape, a.dtype)
      index = jnp.zeros(a.shape, jnp.uint32)
      for axis in range(len(a.shape)):
        index = index * np.uint32(a.shape[axis]) + jax.lax.broadcasted_iota(
          jnp.uint32, a.shape, axis
        )
      mixed = (index + np.uint32(seed)) * np.uint32(2654435761)  # Knuth's multiplicative hash.
      unit = (mixed >> 8).astype(jnp.float32) * (1.0 / 2**24)  # [0, 1)
      return (0.04 * unit - 0.02).astype(a.dtype)

    return jax.block_until_ready(jax.jit(make, out_shardings=a.sharding)())

  return jax.tree_util.tree_map_with_path(leaf, abstract)


def compile_forward(
  name: str, mesh: Mesh, batch_size: int, length: int, dtype: str = "bfloat16", depth: int = 0
):
  """The forward of released encoder `name` on `mesh` (params fsdp), lowered with abstract
  inputs and compiled; `depth` > 0 compiles a twin of that many layers, unrolled, whose cost
  analysis counts every layer (XLA counts a loop body once)."""
  module = released_module(name, dtype, depth, unroll=depth or 1)
  fn, abstract, ids = sharded_forward(
    module, (batch_size, length), mesh, parallel.PRESETS["fsdp"], dtype
  )
  with jax.set_mesh(mesh):
    return fn.lower(abstract, ids).compile()


def extrapolate(at_1: float, at_2: float, depth: int) -> float:
  """A cost of the full `depth` from those of the depth-1 and depth-2 twins (linear in depth:
  each layer costs the same)."""
  return at_1 + (depth - 1) * (at_2 - at_1)
