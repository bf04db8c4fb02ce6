"""Small host-side helpers: images to uint8, PNG grids, and metric writers (process 0 only)."""

import json
import logging as std_logging
import math
import os
import time

import jax
import numpy as np
from absl import logging
from PIL import Image

from dit_jax import storage

# (file path fragment, message format) of library warnings that ask nothing of the user.
_HARMLESS = (
  # Sampling and evaluation open the checkpoints read-only on purpose.
  ("/orbax/checkpoint/", "Given directory is read only=%s"),
)


class _LibraryInfoFilter(std_logging.Filter):
  """Keeps dit_jax's own INFO lines; other libraries (Orbax, grain) only speak up from WARNING,
  and not with the warnings in `_HARMLESS`."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "/dit_jax/" in record.pathname:
      return True
    harmless = any(part in record.pathname and record.msg == msg for part, msg in _HARMLESS)
    return record.levelno >= std_logging.WARNING and not harmless


def quiet_library_logs() -> None:
  """For command-line programs: absl logs dit_jax's INFO lines and other libraries' warnings
  (less the harmless ones)."""
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 [N, H, W, C], as the ADM evaluator reads them."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] image."""
  n, h, w, c = images.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, ncols)
    grid[
      pad + r * (h + pad) : pad + r * (h + pad) + h,
      pad + col * (w + pad) : pad + col * (w + pad) + w,
    ] = img
  return grid


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, C] (C = 1 or 3) as PNG file bytes."""
  import io

  png = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(png, format="PNG")
  return png.getvalue()


def save_grid(path: str, images: np.ndarray, ncols: int | None = None, upscale: int = 1) -> None:
  """Writes `images` tiled as one PNG at `path` (local or gs://)."""
  grid = image_grid(images, ncols)
  if upscale > 1:
    grid = grid.repeat(upscale, axis=0).repeat(upscale, axis=1)
  storage.write_bytes(path, png_bytes(grid))


def spaced_labels(centers: list[float], widths: list[float], gap: float = 4.0) -> set[int]:
  """Which of the labels centred at `centers` (ascending) with these `widths` to draw so that no
  two overlap or come closer than `gap`: from the left, each that clears the last one drawn, and
  the last label always (dropping the one before it if they would touch)."""
  shown = []
  for i, (c, w) in enumerate(zip(centers, widths, strict=True)):
    if not shown or c - w / 2 >= centers[shown[-1]] + widths[shown[-1]] / 2 + gap:
      shown.append(i)
  last = len(centers) - 1
  if shown and shown[-1] != last:
    while (
      shown and centers[last] - widths[last] / 2 < centers[shown[-1]] + widths[shown[-1]] / 2 + gap
    ):
      shown.pop()
    shown.append(last)
  return set(shown)


def line_plot(
  path: str, x: list[float], series: dict[str, list[float]], x_label: str, size=(360, 240)
) -> None:
  """Writes a PNG with one small panel per series (y against x, points joined, each panel's own
  y range printed at its top and bottom, x values under the points, those that would overlap
  left out): enough to see a sweep's shape without a plotting library."""
  from PIL import ImageDraw

  w, h = size
  margin_l, margin_r, margin_t, margin_b = 56, 12, 22, 30
  image = Image.new("RGB", (w * len(series), h), "white")
  draw = ImageDraw.Draw(image)
  lo_x, hi_x = min(x), max(x)
  for n, (name, ys) in enumerate(series.items()):
    left = n * w
    lo, hi = min(ys), max(ys)
    span_x, span_y = (hi_x - lo_x) or 1.0, (hi - lo) or 1.0

    def point(xv, yv, left=left, lo=lo, span_x=span_x, span_y=span_y):
      px = left + margin_l + (xv - lo_x) / span_x * (w - margin_l - margin_r)
      py = margin_t + (1.0 - (yv - lo) / span_y) * (h - margin_t - margin_b)
      return px, py

    box = [left + margin_l, margin_t, left + w - margin_r, h - margin_b]
    draw.rectangle(box, outline="black")
    draw.text((left + margin_l, 4), name, fill="black")
    draw.text((left + 2, margin_t - 4), f"{hi:.4g}", fill="black")
    draw.text((left + 2, h - margin_b - 8), f"{lo:.4g}", fill="black")
    points = [point(xv, yv) for xv, yv in zip(x, ys, strict=True)]
    draw.line(points, fill="blue", width=2)
    labels = [f"{xv:g}" for xv in x]
    widths = [draw.textlength(label) for label in labels]
    shown = spaced_labels([px for px, _ in points], widths)
    for i, (px, py) in enumerate(points):
      draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill="blue")
      if i in shown:
        draw.text((px - widths[i] / 2, h - margin_b + 4), labels[i], fill="black")
    draw.text((left + w // 2 - 20, h - 12), x_label, fill="black")
  storage.write_bytes(path, png_bytes(np.asarray(image)))


def _complete_line_before(line: str, step: int) -> bool:
  try:
    return json.loads(line)["step"] <= step
  except (ValueError, KeyError):  # A line cut short when the process was killed.
    return False


class _EventFile:
  """TensorBoard event files in `directory`, written with the `tensorboard` package's record
  writer (which, unlike tensorboardX's, imports no framework) and flushed after every event. On
  GCS a file is uploaded whole at each flush, so a new one is started past `roll_bytes`;
  TensorBoard reads all the files of a directory, in the order of their names, as one run."""

  def __init__(self, directory: str, roll_bytes: int = 8 << 20):
    self.directory, self.roll_bytes, self._count, self._file = directory, roll_bytes, 0, None

  def _open(self) -> None:
    import socket

    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    self._file = storage.AppendLog(
      storage.join(self.directory, f"{name}.{self._count:05d}"), binary=True
    )
    self._count += 1
    self._records = RecordWriter(self._file)
    version = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
    self._records.write(version.SerializeToString())

  def add(self, event) -> None:
    if self._file is None or (
      storage.is_remote(self.directory) and self._file.size > self.roll_bytes
    ):
      if self._file is not None:
        self._file.close()
      self._open()
    self._records.write(event.SerializeToString())
    self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()


class MetricWriter:
  """Appends one JSON object per log step to `metrics.jsonl` and mirrors it to TensorBoard, in a
  local or `gs://` workdir.

  On processes other than 0 every method does nothing. With `resume_step`, lines of later steps
  (written after the checkpoint the run resumes from, and about to be written again) are dropped.
  """

  def __init__(self, workdir: str, resume_step: int | None = None):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    path = storage.join(workdir, "metrics.jsonl")
    keep = None
    if resume_step is not None and storage.exists(path):
      lines = storage.read_text(path).splitlines(keepends=True)
      keep = "".join(line for line in lines if _complete_line_before(line, resume_step))
    self._jsonl = storage.AppendLog(path, keep=keep)
    self._tb = _EventFile(storage.join(workdir, "tensorboard"))

  def _event(self, step: int, values: list) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2

    summary = summary_pb2.Summary(value=values)
    self._tb.add(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}, "time": time.time()}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    from tensorboard.compat.proto import summary_pb2

    values = [summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in metrics.items()]
    self._event(step, values)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """`image`: uint8 [H, W, C] with C = 1 or 3, shown as a PNG."""
    if not self.active:
      return
    from tensorboard.compat.proto import summary_pb2

    image = np.asarray(image, np.uint8)
    height, width, channels = image.shape
    picture = summary_pb2.Summary.Image(
      height=height, width=width, colorspace=channels, encoded_image_string=png_bytes(image)
    )
    self._event(step, [summary_pb2.Summary.Value(tag=tag, image=picture)])

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()


def xla_flops(compiled) -> float:
  """XLA's FLOP estimate for a compiled program (multiply-add = 2); NaN if it gives none.

  XLA counts a loop body once: read it from a program built with `fully_unrolled(config)`.
  """
  cost = compiled.cost_analysis()
  if isinstance(cost, list | tuple):  # Older JAX: one dict per program.
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def fully_unrolled(config):
  """A copy of `config` whose block scan is fully unrolled, for FLOP counting."""
  twin = config.copy_and_resolve_references()
  twin.model.scan_unroll = 10_000  # Clipped to the depth.
  return twin
