"""Command-line tools that prepare data for dit_jax."""
