"""Logical axis names: the only vocabulary model code uses to describe array dimensions.

`dit_jax.parallel` maps these names onto mesh axes through rules chosen by a preset.
"""

BATCH = "batch"
SEQ = "seq"  # Tokens (image patches, conditioning tokens).
EMBED = "embed"  # Model width.
MLP = "mlp"  # MLP hidden width, and fused modulation outputs.
HEADS = "heads"
KV = "kv"  # Per-head width.
VOCAB = "vocab"  # Rows of the class embedding table.
PATCH = "patch"  # Flattened patch (p * p * C) at the input and output projections.
FREQ = "freq"  # Sinusoidal timestep features.
TEXT = "text"  # Channels of the text conditioning given to the model (context and pooled vector).
LAYERS = "layers"  # Stacked (scanned) blocks.

LOGICAL_AXES = (BATCH, SEQ, EMBED, MLP, HEADS, KV, VOCAB, PATCH, FREQ, TEXT, LAYERS)
TOKENS = (BATCH, SEQ, EMBED)  # The transformers' activations [B, L, D].

# Input and output channels of the autoencoder's convolutions, norms and attention projections.
# `dit_jax.vae.VAE` runs it data-parallel with replicated params, so they have no config rules.
CONV_IN = "conv_in"
CONV_OUT = "conv_out"
