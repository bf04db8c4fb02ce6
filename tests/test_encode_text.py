"""dit_jax.tools.encode_text: SD3's text layout, values against the encoders and diffusers, errors.

The encoders are tiny random stand-ins (tests/_tiny_text_encoders.py) with distinct widths, so a
swapped or misplaced block changes shapes or values: CLIP-L 32 channels (pooled 16), CLIP-G 48
(pooled 24), T5 96 (wider than the CLIPs' 80, as in SD3) or 40 (narrower).
"""

import os
import shutil
import subprocess
import sys
import types

import _tiny_text_encoders as tiny
import numpy as np
import pytest

from dit_jax import text_encoders
from dit_jax.data import text
from dit_jax.errors import ConfigError
from dit_jax.tools import encode_text

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CLIP_LEN, T5_LEN = 16, 12
CAPTIONS = [
  "a red cat",
  "",
  "two dogs, one asleep!",
  "a very long caption that runs past sixteen clip tokens",
  "x",
]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  root = tmp_path_factory.mktemp("encoders")
  return {
    "clip_l": tiny.save_clip(str(root / "clip_l"), 32, 16, max_positions=CLIP_LEN, seed=0),
    "clip_g": tiny.save_clip(str(root / "clip_g"), 48, 24, max_positions=CLIP_LEN, seed=1),
    "t5": tiny.save_t5(str(root / "t5"), 96, seed=2),
    "t5_narrow": tiny.save_t5(str(root / "t5_narrow"), 40, seed=3),
  }


def _load(paths, names, t5="t5", backend="jax"):
  chosen = {n: paths[t5 if n == "t5" else n] for n in names}
  return encode_text.load_encoders(
    chosen, clip_max_length=CLIP_LEN, t5_max_length=T5_LEN, backend=backend
  )


def _direct(paths, name, captions):
  """Encoder `name`'s own forward pass: (sequence features, pooled or None) as float32 numpy."""
  is_clip = name.startswith("clip")
  tokenizer = transformers.AutoTokenizer.from_pretrained(paths[name])
  ids = tokenizer(
    captions,
    padding="max_length",
    max_length=CLIP_LEN if is_clip else T5_LEN,
    truncation=True,
    return_tensors="pt",
  ).input_ids
  path = paths[name]
  with torch.no_grad():
    if is_clip:
      out = transformers.CLIPTextModelWithProjection.from_pretrained(path)(
        ids, output_hidden_states=True
      )
      return out.hidden_states[-2].numpy(), out.text_embeds.numpy()
    return transformers.T5EncoderModel.from_pretrained(path)(ids).last_hidden_state.numpy(), None


def _expected_sd3(paths, captions):
  """context [N, 28, 96] and pooled [N, 40] assembled by hand from the three direct passes."""
  l_seq, l_pool = _direct(paths, "clip_l", captions)
  g_seq, g_pool = _direct(paths, "clip_g", captions)
  t5_seq, _ = _direct(paths, "t5", captions)
  clip = np.concatenate([l_seq, g_seq, np.zeros((len(captions), CLIP_LEN, 96 - 80))], axis=-1)
  return np.concatenate([clip, t5_seq], axis=1), np.concatenate([l_pool, g_pool], axis=-1)


@pytest.mark.multiprocess
def test_cli_writes_sd3_layout_matching_the_encoders(paths, tmp_path):
  captions_file, out = tmp_path / "captions.txt", tmp_path / "out"
  captions_file.write_text("\n".join(CAPTIONS) + "\n")
  flags = {
    "captions": captions_file,
    "out": out,
    "clip_l": paths["clip_l"],
    "clip_g": paths["clip_g"],
    "t5": paths["t5"],
    "clip_max_length": CLIP_LEN,
    "t5_max_length": T5_LEN,
    "batch_size": 2,  # 5 captions: two full batches and a partial one
    "dtype": "float32",
  }
  result = subprocess.run(
    [sys.executable, "-m", "dit_jax.tools.encode_text", *(f"--{k}={v}" for k, v in flags.items())],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Wrote 5 captions" in result.stderr

  spec = text.TextSpec.load(str(out))
  assert (spec.context_len, spec.context_dim, spec.pooled_dim) == (CLIP_LEN + T5_LEN, 96, 40)
  assert spec.encoders == (
    text.EncoderSlot("clip_l", (0, CLIP_LEN), (0, 32), (0, 16)),
    text.EncoderSlot("clip_g", (0, CLIP_LEN), (32, 80), (16, 40)),
    text.EncoderSlot("t5", (CLIP_LEN, CLIP_LEN + T5_LEN), (0, 96), (0, 0)),
  )
  context = np.load(out / text.CONTEXT_FILE)
  pooled = np.load(out / text.POOLED_FILE)
  assert context.dtype == pooled.dtype == np.float32
  assert context.shape == (5, 28, 96) and pooled.shape == (5, 40)
  want_context, want_pooled = _expected_sd3(paths, CAPTIONS)
  np.testing.assert_allclose(context, want_context, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, want_pooled, rtol=1e-5, atol=1e-5)
  assert not context[:, :CLIP_LEN, 80:].any()  # CLIP rows zero-padded to T5's width

  null_context, null_pooled = _expected_sd3(paths, [""])
  np.testing.assert_allclose(spec.null_context, null_context[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(spec.null_pooled, null_pooled[0], rtol=1e-5, atol=1e-5)
  assert np.abs(spec.null_pooled).max() > 0.1  # the empty caption is encoded, not zeros
  np.testing.assert_allclose(context[1], spec.null_context, rtol=1e-5, atol=1e-5)
  assert (out / text.CAPTIONS_FILE).read_text().split("\n")[:-1] == CAPTIONS


def test_float16_storage_and_spec_round_trip(paths, tmp_path):
  encoders = _load(paths, ("clip_l", "clip_g", "t5"))
  spec, truncated = encode_text.write(CAPTIONS, encoders, str(tmp_path), 3, "float16")
  context = np.load(tmp_path / text.CONTEXT_FILE)
  pooled = np.load(tmp_path / text.POOLED_FILE)
  assert context.dtype == pooled.dtype == np.float16
  want_context, want_pooled = _expected_sd3(paths, CAPTIONS)
  # float16 keeps 11 significant bits: a relative error up to 2**-11.
  np.testing.assert_allclose(context.astype(np.float32), want_context, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(pooled.astype(np.float32), want_pooled, rtol=1e-3, atol=1e-4)
  # Caption 2 (20 CLIP tokens, 23 T5 tokens) and caption 3 exceed both lengths; the rest fit.
  assert truncated == {"clip_l": 2, "clip_g": 2, "t5": 2}

  loaded = text.TextSpec.load(str(tmp_path))
  for field in ("context_len", "context_dim", "pooled_dim", "encoders"):
    assert getattr(loaded, field) == getattr(spec, field)
  np.testing.assert_array_equal(loaded.null_context, spec.null_context)
  np.testing.assert_array_equal(loaded.null_pooled, spec.null_pooled)


def test_matches_diffusers_sd3_encode_prompt(paths):
  pipeline = pytest.importorskip("diffusers").StableDiffusion3Pipeline
  encoders = _load(paths, ("clip_l", "clip_g", "t5"), backend="torch")
  stand_in = types.SimpleNamespace(
    tokenizer_max_length=CLIP_LEN,
    _execution_device=torch.device("cpu"),
    **{
      f"{kind}{suffix}": getattr(encoders[name], "module" if kind == "model" else kind)
      for name, suffix in (("clip_l", ""), ("clip_g", "_2"), ("t5", "_3"))
      for kind in ("tokenizer", "model")
    },
  )
  for suffix in ("", "_2", "_3"):
    setattr(stand_in, f"text_encoder{suffix}", getattr(stand_in, f"model{suffix}"))
  for method in ("_get_clip_prompt_embeds", "_get_t5_prompt_embeds"):
    setattr(stand_in, method, types.MethodType(getattr(pipeline, method), stand_in))
  with torch.no_grad():
    context, null_context, pooled, null_pooled = pipeline.encode_prompt(
      stand_in, CAPTIONS, None, None, max_sequence_length=T5_LEN
    )
  ours_context, ours_pooled = text_encoders.encode(CAPTIONS, encoders)
  np.testing.assert_allclose(ours_context, context.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours_pooled, pooled.numpy(), rtol=1e-5, atol=1e-5)
  spec = text_encoders.text_spec(encoders)
  np.testing.assert_allclose(spec.null_context, null_context[0].numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(spec.null_pooled, null_pooled[0].numpy(), rtol=1e-5, atol=1e-5)


def test_only_clip_gives_the_clip_rows(paths):
  encoders = _load(paths, ("clip_l", "clip_g"))
  context, pooled = text_encoders.encode(CAPTIONS[:3], encoders)
  assert context.shape == (3, CLIP_LEN, 80) and pooled.shape == (3, 40)
  want_context, want_pooled = _expected_sd3(paths, CAPTIONS[:3])
  np.testing.assert_allclose(context, want_context[:, :CLIP_LEN, :80], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, want_pooled, rtol=1e-5, atol=1e-5)
  assert [s.name for s in text_encoders.text_spec(encoders).encoders] == ["clip_l", "clip_g"]


def test_narrower_t5_is_zero_padded_to_the_clip_width(paths):
  encoders = _load(paths, ("clip_g", "t5"), t5="t5_narrow")
  length, dim, pooled_dim, slots = text_encoders.layout(encoders)
  assert (length, dim, pooled_dim) == (CLIP_LEN + T5_LEN, 48, 24)
  assert slots[0] == text.EncoderSlot("clip_g", (0, CLIP_LEN), (0, 48), (0, 24))
  assert slots[1] == text.EncoderSlot("t5", (CLIP_LEN, CLIP_LEN + T5_LEN), (0, 40))
  context, pooled = text_encoders.encode(CAPTIONS[:2], encoders)
  t5_seq, _ = _direct(paths, "t5_narrow", CAPTIONS[:2])
  g_seq, g_pool = _direct(paths, "clip_g", CAPTIONS[:2])
  np.testing.assert_allclose(context[:, CLIP_LEN:, :40], t5_seq, rtol=1e-5, atol=1e-5)
  assert not context[:, CLIP_LEN:, 40:].any()
  np.testing.assert_allclose(context[:, :CLIP_LEN], g_seq, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, g_pool, rtol=1e-5, atol=1e-5)


def test_diffusers_folder_layout_finds_the_sibling_tokenizer(paths, tmp_path):
  # SD3's diffusers checkpoints keep text_encoder_2/ and tokenizer_2/ apart.
  model_dir, tokenizer_dir = tmp_path / "text_encoder_2", tmp_path / "tokenizer_2"
  for name in os.listdir(paths["clip_g"]):
    is_model = name in ("config.json", "model.safetensors")
    os.makedirs(model_dir if is_model else tokenizer_dir, exist_ok=True)
    shutil.copy(os.path.join(paths["clip_g"], name), model_dir if is_model else tokenizer_dir)
  encoders = encode_text.load_encoders({"clip_g": str(model_dir)}, CLIP_LEN)
  context, pooled = text_encoders.encode(["a red cat"], encoders)
  g_seq, g_pool = _direct(paths, "clip_g", ["a red cat"])
  np.testing.assert_allclose(context, g_seq, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, g_pool, rtol=1e-5, atol=1e-5)
  os.rename(tokenizer_dir, tmp_path / "elsewhere")
  with pytest.raises(ConfigError, match="holds no tokenizer"):
    encode_text.load_encoders({"clip_g": str(model_dir)}, CLIP_LEN)


def test_errors_name_the_problem(paths, tmp_path):
  with pytest.raises(ConfigError, match="No CLIP encoder given.*--clip_l"):
    encode_text.load_encoders({"t5": paths["t5"]})
  missing = str(tmp_path / "nowhere")
  with pytest.raises(ConfigError, match=f"clip_l='{missing}' is not a directory"):
    encode_text.load_encoders({"clip_l": missing})
  with pytest.raises(ConfigError, match="is on GCS, but the encoders load from a local"):
    encode_text.load_encoders({"clip_l": "gs://bucket/sd3/text_encoder"})
  encoders = _load(paths, ("clip_l",))
  with pytest.raises(ConfigError, match=r"--format='parquet' is not supported"):
    encode_text.write(CAPTIONS, encoders, str(tmp_path / "out"), format="parquet")
  with pytest.raises(ConfigError, match="holds a t5, not a CLIP text encoder"):
    encode_text.load_encoders({"clip_l": paths["t5"]}, CLIP_LEN)
  with pytest.raises(ConfigError, match="lacks the weights"):
    encode_text.load_torch_encoder("clip_l", paths["t5"], CLIP_LEN)
  for backend in encode_text.BACKENDS:
    with pytest.raises(ConfigError, match="clip_max_length <= 16"):
      encode_text.load_encoders({"clip_l": paths["clip_l"]}, CLIP_LEN + 1, backend=backend)
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  with pytest.raises(ConfigError, match="is empty"):
    text.read_captions(str(empty))


def test_jax_and_torch_backends_write_the_same_arrays(paths, tmp_path):
  for backend in encode_text.BACKENDS:
    encoders = _load(paths, ("clip_l", "clip_g", "t5"), backend=backend)
    encode_text.write(CAPTIONS, encoders, str(tmp_path / backend), 2, "float32")
  for name in (text.CONTEXT_FILE, text.POOLED_FILE):
    jax_out, torch_out = (np.load(tmp_path / b / name) for b in ("jax", "torch"))
    assert np.abs(torch_out).max() > 0.1
    np.testing.assert_allclose(jax_out, torch_out, rtol=0, atol=1e-4, err_msg=name)


def test_captions_from_jsonl_and_an_image_folder(tmp_path):
  jsonl = tmp_path / "captions.jsonl"
  jsonl.write_text(
    '{"caption": " a red cat ", "id": 1}\n{"caption": ""}\n{"text": "x", "caption": "b"}\n'
  )
  assert text.read_captions(str(jsonl)) == ["a red cat", "", "b"]
  with pytest.raises(ConfigError, match="Line 1 of .* 'text' string .KeyError.*--caption_field"):
    text.read_captions(str(jsonl), "text")
  jsonl.write_text('{"caption": 3}\n')
  with pytest.raises(ConfigError, match="Line 1 .* is a int, not text"):
    text.read_captions(str(jsonl))
  # An image folder: <class>/<name>.<ext> with <name>.txt beside it, in the folder source's order.
  from PIL import Image

  for cls, names in (("b", ["z", "a"]), ("a", ["m"])):
    os.makedirs(tmp_path / "images" / cls)
    for n in names:
      Image.new("RGB", (4, 4)).save(tmp_path / "images" / cls / f"{n}.png")
      (tmp_path / "images" / cls / f"{n}.txt").write_text(f"{cls} {n}\n")
  assert text.read_captions(str(tmp_path / "images")) == ["a m", "b a", "b z"]
  os.remove(tmp_path / "images" / "b" / "z.txt")
  with pytest.raises(ConfigError, match="1 images without a caption file .*z.txt"):
    text.read_captions(str(tmp_path / "images"))
