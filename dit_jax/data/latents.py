"""The layout of a directory of pre-encoded latents, and the metadata that describes it.

Written by `python -m dit_jax.tools.encode_latents`, read by the `latents` source:
  latents.json            `LatentsMetadata`: how the latents were made (written first)
  progress.json           {"rows": k}: rows 0..k-1 of every array are final (written after each
                          chunk); the directory is complete when k == count
  latents.npy             float16 or float32 [N, h, w, c]: posterior means, already scaled,
                          (mean - shift_factor) * scaling_factor
  latents_std.npy         (with --std) posterior standard deviations times scaling_factor
  latents_flip.npy        (with --flip) the latents of the horizontally flipped images
  latents_flip_std.npy    (with --flip --std) their standard deviations
  labels.npy              int32 [N] class ids (class-labelled sources only)

Latents without latents.json (written by hand with np.save) are taken as unscaled and multiplied
by config.data.latent_scale on read.

With format "array_record" (encode_latents --format=array_record, the default for a gs:// --out),
the arrays are sharded ArrayRecord files instead (`dit_jax.data.records`), and no progress.json:
the shards present are the rows done.
"""

import dataclasses
import json
import math

from dit_jax import storage
from dit_jax.errors import ConfigError

METADATA_FILE = "latents.json"
PROGRESS_FILE = "progress.json"
LATENTS_FILE = "latents.npy"
STD_FILE = "latents_std.npy"
FLIP_FILE = "latents_flip.npy"
FLIP_STD_FILE = "latents_flip_std.npy"
LABELS_FILE = "labels.npy"
ADM_CROP = "adm_center"  # guided-diffusion's center_crop_arr (dit_jax.data.sources.adm_center_crop)
NO_CROP = "none"  # Sources that are already square (digits, synthetic).


@dataclasses.dataclass(frozen=True)
class LatentsMetadata:
  """How a directory of latents was made; two runs with equal metadata write identical files."""

  vae: str  # Absolute path of the diffusers AutoencoderKL directory.
  scaling_factor: float
  shift_factor: float
  latent_channels: int
  downsample_factor: int
  image_size: int  # Pixels per side of the encoded images.
  crop: str  # ADM_CROP or NO_CROP
  flip: bool  # latents_flip.npy is present.
  std: bool  # latents_std.npy (and latents_flip_std.npy with flip) is present.
  count: int
  source: str  # The pixel data's config.data.name ...
  source_path: str  # ... its absolute config.data.path ("" if it has none) ...
  source_split: str  # ... and config.data.split.
  dtype: str  # Storage dtype of the latent arrays.
  compute_dtype: str  # The autoencoder's compute dtype.
  batch_size: int  # Images per encoder call (results may differ in the last bits across sizes).
  has_labels: bool
  format: str = "npy"  # "npy" (memory-mapped arrays) or "array_record" (shards).
  shard_size: int = 0  # Rows per shard (array_record).
  # config.data.buckets of the latents ("HxW,..." in latent cells), "" for one size; with
  # buckets, each row has its bucket's shape and buckets-<i>-of-<n>.npy holds the rows' buckets.
  buckets: str = ""

  @property
  def latent_size(self) -> int:
    return self.image_size // self.downsample_factor

  def latent_files(self) -> list[str]:
    """The names of the latent arrays, [N, h, w, c] each."""
    files = [LATENTS_FILE]
    if self.std:
      files.append(STD_FILE)
    if self.flip:
      files += [FLIP_FILE, FLIP_STD_FILE] if self.std else [FLIP_FILE]
    return files

  def differences(self, other: "LatentsMetadata") -> list[str]:
    """`field=self's (other: other's)` for every field that differs."""
    a, b = dataclasses.asdict(self), dataclasses.asdict(other)
    return [f"{k}={a[k]!r} (this run: {b[k]!r})" for k in a if a[k] != b[k]]

  def save(self, directory: str) -> None:
    _write_json(storage.join(directory, METADATA_FILE), dataclasses.asdict(self))

  @classmethod
  def load(cls, directory: str) -> "LatentsMetadata | None":
    """The metadata in `directory`, or None if it has no latents.json.

    Raises:
      ConfigError: if latents.json cannot be read or lacks fields.
    """
    path = storage.join(directory, METADATA_FILE)
    if not storage.isfile(path):
      return None
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    try:
      raw = storage.read_json(path)
      # Fields added since (with defaults) may be missing from older files.
      return cls(
        **{k: raw[k] if k in raw or d is dataclasses.MISSING else d for k, d in defaults.items()}
      )
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise ConfigError(
        f"{path!r} cannot be read as latents metadata ({type(e).__name__}: {e}); re-run "
        "dit_jax.tools.encode_latents into a new directory."
      ) from None


def _write_json(path: str, value: dict) -> None:
  """Writes `value` so that `path` is either the old file or the new one, never half of one."""
  storage.write_text(path, json.dumps(value, indent=2))


def read_progress(directory: str) -> int | None:
  """Rows already final in `directory`, or None if no chunk bookkeeping was started."""
  path = storage.join(directory, PROGRESS_FILE)
  if not storage.isfile(path):
    return None
  try:
    return int(storage.read_json(path)["rows"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ConfigError(
      f"{path!r} cannot be read ({type(e).__name__}: {e}); delete it to re-encode from the start."
    ) from None


def write_progress(directory: str, rows: int) -> None:
  _write_json(storage.join(directory, PROGRESS_FILE), {"rows": rows})


def vae_factors(vae_path: str) -> tuple[float, float] | None:
  """(scaling_factor, shift_factor) of a diffusers AutoencoderKL directory's config.json, with
  diffusers' defaults; None if the directory has no config.json."""
  path = storage.join(vae_path, "config.json")
  if not storage.isfile(path):
    return None
  try:
    hf = storage.read_json(path)
    return float(hf.get("scaling_factor", 0.18215)), float(hf.get("shift_factor") or 0.0)
  except (OSError, ValueError, TypeError, AttributeError):
    return None  # Loading the autoencoder itself reports a broken config.


def same_factor(a: float, b: float) -> bool:
  """Whether two scale or shift factors agree up to float32/JSON round-off."""
  return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
