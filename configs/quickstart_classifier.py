"""The noise-aware digit classifier that guides the quickstart model (classifier guidance, ADM).

  python -m dit_jax.main --config=configs/quickstart_classifier.py \
      --workdir=workdirs/quickstart_classifier
  python -m dit_jax.main --config=configs/quickstart_classifier.py \
      --workdir=workdirs/quickstart_classifier --mode=evaluate

Meant for: one CPU (2 cores suffice), a few minutes. A DiT-style encoder (`model.name=
"classifier"`) learns p(y | z_t, t) on the 16x16 digits under exactly the noise process of
configs/quickstart.py (whose config this one starts from: the same objective, schedule, timestep
sampler and shift), so that its gradient can steer that model's samplers. 3,000 steps took 9.5
minutes on 2 cores shared with other work. `--mode=evaluate` reports its accuracy on the digits
noised to unit times u = 0, 0.25, 0.5, 0.75, 0.95 (sigma/alpha 0, 1/3, 1, 3, 19): 1.000, 1.000,
0.954, 0.517, 0.149 on all the digits, i.e. training images under fresh noise. Held out: trained
with --config.data.split=fit (80% of the digits) and evaluated with --config.data.split=held_out
(the other 359), 0.983, 0.992, 0.919, 0.485, 0.134 (chance: 0.10). Trained longer, it guides
better (docs/guidance.md): class accuracy at guidance scales 1, 3, 10 rose from 0.907,
0.931, 0.915 (600 steps) to 0.967, 0.991, 0.990 (1,500) and 0.982, 0.998, 0.999 (3,000).
Arg string: none (any is an error); set fields with --config.<field>=<value>.
"""

import importlib.util
import os

from dit_jax.config_defaults import parse_arg


def _quickstart_config():
  """configs/quickstart.py's config: loaded by path, since configs/ is not a package."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "quickstart.py")
  spec = importlib.util.spec_from_file_location("_quickstart_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg: str | None = None):
  parse_arg(arg, {})
  c = _quickstart_config()  # The diffusion and data settings stay the quickstart's.
  c.model.name = "classifier"
  c.model.variant = "tiny/4"  # Width 64, 2 heads; 16 tokens of 4x4 pixels.
  c.model.depth = 4
  c.model.class_dropout = 0.0  # Labels are the targets; the classifier never drops them.
  c.sample.guidance_scale = 1.0  # It makes no samples; this only keeps the CFG warning quiet.
  c.train.num_steps = 3000
  c.train.checkpoint_every = 1000
  return c
