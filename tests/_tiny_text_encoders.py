"""Tiny, randomly initialised stand-ins for SD3's text encoders, built offline for tests.

Each is saved with `save_pretrained` (model and tokenizer in one directory), as the real
CLIP-L, CLIP-G and T5 checkpoints are loaded by `dit_jax.tools.encode_text`. The tokenizers know
lowercase letters, digits and a little punctuation, one token per character: enough for any
caption the tests write.
"""

import json
import os
import string

_CHARS = string.ascii_lowercase + string.digits + ",.!"


def save_clip(directory: str, hidden: int, projection: int, max_positions: int, seed: int) -> str:
  """Saves a CLIPTextModelWithProjection and its CLIPTokenizer into `directory`; returns it.

  The tokenizer is built from a hand-written vocab.json/merges.txt, as CLIP's own files are, so
  the real CLIP tokenization (lowercasing, start/end tokens, "</w>" word ends) is exercised; the
  config's eos_token_id is the tokenizer's, so the pooled token is the end of each caption.
  """
  import torch
  from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

  os.makedirs(directory, exist_ok=True)
  specials = ["<|startoftext|>", "<|endoftext|>"]
  pieces = specials + list(_CHARS) + [c + "</w>" for c in _CHARS]
  with open(os.path.join(directory, "vocab.json"), "w") as f:
    json.dump({p: i for i, p in enumerate(pieces)}, f)
  with open(os.path.join(directory, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tokenizer = CLIPTokenizer.from_pretrained(directory, model_max_length=max_positions)
  tokenizer.save_pretrained(directory)

  config = CLIPTextConfig(
    vocab_size=len(pieces),
    hidden_size=hidden,
    intermediate_size=2 * hidden,
    projection_dim=projection,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=max_positions,
    bos_token_id=tokenizer.bos_token_id,
    eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id,
  )
  torch.manual_seed(seed)
  CLIPTextModelWithProjection(config).save_pretrained(directory)
  return directory


def save_t5(directory: str, d_model: int, seed: int) -> str:
  """Saves a T5EncoderModel and a fast tokenizer (pad 0, eos 1, unk 2, as T5's) into `directory`."""
  import torch
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

  os.makedirs(directory, exist_ok=True)
  pieces = ["<pad>", "</s>", "<unk>", "▁"] + list(_CHARS)
  backend = Tokenizer(models.WordLevel({p: i for i, p in enumerate(pieces)}, unk_token="<unk>"))
  backend.normalizer = normalizers.Lowercase()
  backend.pre_tokenizer = pre_tokenizers.Sequence(
    [pre_tokenizers.Metaspace(), pre_tokenizers.Split("", "isolated")]
  )
  backend.post_processor = processors.TemplateProcessing(
    single="$A </s>", special_tokens=[("</s>", 1)]
  )
  tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
  )
  tokenizer.save_pretrained(directory)

  config = T5Config(
    vocab_size=len(pieces),
    d_model=d_model,
    d_kv=d_model // 4,
    d_ff=2 * d_model,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
    pad_token_id=0,
    eos_token_id=1,
  )
  torch.manual_seed(seed)
  T5EncoderModel(config).save_pretrained(directory)
  return directory
