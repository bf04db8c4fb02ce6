"""The CLIP score of samples against their prompts (Hessel et al. 2021; SD3's prompt fidelity).

    scorer = ClipScorer.load("clip-vit-large-patch14", mesh)
    scorer.score(scorer.image_features(images_uint8), captions)   # {"clip_score": ...}

As torchmetrics' CLIPScore defines it: 100 x max(cos(image embedding, text embedding), 0),
averaged over the samples, with a transformers CLIPModel (`dit_jax.models.clip.load_hf`; the
usual choice is OpenAI's ViT-L/14) run in Flax. Images are resized to the model's resolution
(shorter side, bicubic with antialiasing, then centre-cropped) and normalized as CLIP's image
processor does; the resize is JAX's, not PIL's, so scores differ from torchmetrics' in the
third digit at most when the samples are not at the model's resolution. Captions are tokenized by
the directory's tokenizer to the text tower's positions (77), truncated.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from dit_jax import parallel, storage, text_encoders
from dit_jax.errors import ConfigError
from dit_jax.models import clip

SCORE_KEY = "clip_score"


def preprocess(images: jax.Array, size: int) -> jax.Array:
  """uint8 images [B, H, W, 1 or 3] -> CLIP's input [B, size, size, 3]: the shorter side resized
  to `size` (bicubic, antialiased), centre-cropped, scaled to [0, 1] and normalized."""
  x = images.astype(jnp.float32) / 255.0
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  b, h, w, _ = x.shape
  scale = size / min(h, w)
  rh, rw = max(size, round(h * scale)), max(size, round(w * scale))
  if (rh, rw) != (h, w):
    x = jax.image.resize(x, (b, rh, rw, 3), "bicubic", antialias=True)
  top, left = (rh - size) // 2, (rw - size) // 2
  x = x[:, top : top + size, left : left + size]
  mean, std = np.asarray(clip.IMAGE_MEAN, np.float32), np.asarray(clip.IMAGE_STD, np.float32)
  return (x - mean) / std


def _normalized(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipScorer:
  """A CLIPModel's two towers on `mesh` (params replicated, the batch split over the data
  axes), jitted once per input shape."""

  def __init__(self, model: clip.CLIP, tokenizer, mesh: Mesh, batch_size: int = 64):
    self.model, self.tokenizer, self.mesh = model, tokenizer, mesh
    dp = parallel.data_parallel_size(mesh)
    self.batch_size = max(dp, batch_size // dp * dp)
    replicated, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    def put(tree):
      return jax.tree.map(lambda a: jax.device_put(np.asarray(a, np.float32), replicated), tree)

    self._text_params, self._vision_params = put(model.text_params), put(model.vision_params)
    vision, text = clip.CLIPVision(model.vision), clip.CLIPText(model.text)
    size = model.vision.image_size

    def images_fn(params, images):
      return _normalized(vision.apply({"params": params}, preprocess(images, size)))

    def text_fn(params, ids):
      return _normalized(text.apply({"params": params}, ids)["text_embeds"])

    shardings = dict(in_shardings=(replicated, batch), out_shardings=batch)
    self._images = jax.jit(images_fn, **shardings)
    self._text = jax.jit(text_fn, **shardings)

  @classmethod
  def load(cls, path: str, mesh: Mesh, batch_size: int = 64) -> "ClipScorer":
    """The scorer of a local transformers CLIPModel directory (config.json, safetensors and its
    tokenizer)."""
    if not storage.isdir(path):
      raise ConfigError(
        f"config.eval.clip_model={path!r} is not a directory; pass a local transformers "
        "CLIPModel directory (e.g. a saved openai/clip-vit-large-patch14; nothing is downloaded)."
      )
    try:
      model = clip.load_hf(path)
    except ConfigError as e:
      raise ConfigError(f"config.eval.clip_model: {e}") from None
    return cls(
      model, text_encoders.load_tokenizer("config.eval.clip_model", path), mesh, batch_size
    )

  @property
  def dim(self) -> int:
    return self.model.vision.projection_dim

  def _run(self, fn, params, rows: np.ndarray) -> np.ndarray:
    n, out = len(rows), []
    for begin in range(0, n, self.batch_size):
      chunk = rows[begin : begin + self.batch_size]
      pad = self.batch_size - len(chunk)
      if pad:  # One shape: one compile.
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
      sharding = parallel.batch_sharding(self.mesh)
      x = parallel.from_host(chunk, sharding)
      y = multihost_utils.process_allgather(fn(params, x), tiled=True)
      out.append(np.asarray(y, np.float32)[: self.batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

  def image_features(self, images: np.ndarray) -> np.ndarray:
    """Unit image embeddings [N, dim] of uint8 images [N, H, W, 1 or 3] (every process passes
    the same images and gets them all)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
      raise ConfigError(f"The CLIP score takes uint8 images [N, H, W, 1 or 3]; got {images.shape}.")
    return self._run(self._images, self._vision_params, images)

  def text_features(self, captions) -> np.ndarray:
    """Unit text embeddings [N, dim] of `captions`."""
    length = self.model.text.max_positions
    ids = self.tokenizer(
      [str(c) for c in captions], padding="max_length", max_length=length, truncation=True
    )["input_ids"]
    return self._run(self._text, self._text_params, np.asarray(ids, np.int32))

  def score(self, image_features: np.ndarray, captions) -> dict[str, float]:
    """{"clip_score": the mean of 100 x max(cos, 0)} of image features and their captions."""
    if len(captions) != len(image_features):
      raise ConfigError(
        f"{len(image_features)} images but {len(captions)} captions for the CLIP score."
      )
    cos = np.sum(image_features * self.text_features(captions), axis=-1)
    return {SCORE_KEY: float(np.mean(100.0 * np.maximum(cos, 0.0)))}
