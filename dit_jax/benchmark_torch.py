"""The PyTorch reference that `python -m dit_jax.benchmark --compare=torch` times beside dit_jax.

It does the work of the official DiT scripts (train.py, sample.py) with diffusers'
`DiTTransformer2DModel` built with the config's hyper-parameters, on the same shapes, batch and
number of CPU threads:

- train step: draw t and the noise, noise the latents, forward, the loss (MSE on eps plus the
  learned-sigma variational bound term, as improved DDPM and DiT train), backward, AdamW, and the
  EMA update that train.py does after every step;
- sampling step: one classifier-free-guided forward on the doubled batch (DiT's
  `forward_with_cfg`: only the first `guided_channels` channels are guided);
- trajectory: ancestral DDPM sampling over `num_steps` respaced steps with guidance and the learned
  variance, one Python-level forward call per step, as sample.py runs it.

Weights are random; speed does not depend on them. PyTorch and diffusers come with the `test`
extra (`pip install -e ".[test]"`).
"""

import math
import statistics
import time

import numpy as np

from dit_jax.errors import ConfigError


def _import_torch():
  try:
    import torch
    from diffusers import DiTTransformer2DModel
  except ImportError as e:
    raise ConfigError(
      f"--compare=torch needs PyTorch and diffusers ({e}); install them with "
      "pip install -e '.[test]'."
    ) from None
  return torch, DiTTransformer2DModel


def _median_seconds(fn, steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def check_config(config) -> None:
  """Raises ConfigError unless `config` is a model the reference reproduces; also checks that
  PyTorch and diffusers are installed."""
  _import_torch()
  m, d = config.model, config.diffusion
  if m.name != "dit" or m.conditioning != "adaln_zero":
    raise ConfigError(
      f"--compare=torch times diffusers' DiT (model.name='dit', model.conditioning="
      f"'adaln_zero'); this config has model.name={m.name!r}, conditioning="
      f"{m.conditioning!r}. Run it without --compare."
    )
  if d.objective != "eps" or d.schedule != "linear":
    raise ConfigError(
      f"--compare=torch reproduces the official DiT training (diffusion.objective='eps', "
      f"schedule='linear'); this config has objective={d.objective!r}, schedule={d.schedule!r}. "
      "Set them, or run without --compare."
    )
  if m.dtype != "float32":
    raise ConfigError(
      f"--compare=torch times float32; this config computes in model.dtype={m.dtype!r}. Add "
      "--config.model.dtype=float32."
    )


def versions() -> str:
  import diffusers
  import torch

  return f"{torch.__version__} + diffusers {diffusers.__version__}"


class TorchDiT:
  """diffusers' DiT with the config's sizes, its AdamW, EMA and diffusion arithmetic."""

  def __init__(self, config, threads: int):
    torch, dit_cls = _import_torch()
    from dit_jax.diffusion.schedules import linear_betas
    from dit_jax.models import variant_dims

    check_config(config)
    m, d, t = config.model, config.diffusion, config.train
    hp = variant_dims(m)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    self.torch = torch
    self.c = config.data.channels
    self.learn_sigma = m.learn_sigma
    self.num_classes = m.num_classes
    self.model = dit_cls(
      num_attention_heads=hp["heads"],
      attention_head_dim=hp["width"] // hp["heads"],
      in_channels=self.c,
      out_channels=self.c * (2 if m.learn_sigma else 1),
      num_layers=hp["depth"],
      sample_size=config.data.image_size,
      patch_size=hp["patch"],
      norm_type="ada_norm_zero",
      num_embeds_ada_norm=m.num_classes,
    )
    self.ema = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
    self.ema_decay = t.ema_decay
    self.grad_clip = t.grad_clip
    self.opt = torch.optim.AdamW(
      self.model.parameters(),
      lr=t.lr,
      betas=(t.b1, t.b2),
      eps=1e-8,
      weight_decay=t.weight_decay,
    )
    betas = linear_betas(d.num_timesteps)
    self.alphas_cumprod = np.cumprod(1.0 - betas)
    self.num_timesteps = d.num_timesteps

  def _tensor(self, a):
    return self.torch.as_tensor(np.asarray(a, np.float32))

  # -- training --------------------------------------------------------------------------------

  def _vb(self, x0, z, t, eps_hat, var_out):
    """The learned-variance bound term (bits per dimension), per example, t the model's steps."""
    torch = self.torch
    acp = self.alphas_cumprod
    acp_prev = np.append(1.0, acp[:-1])
    beta = 1.0 - acp / acp_prev
    var = beta * (1.0 - acp_prev) / (1.0 - acp)
    log_var = np.log(np.append(var[1], var[1:]))
    coef_x0 = beta * np.sqrt(acp_prev) / (1.0 - acp)
    coef_xt = (1.0 - acp_prev) * np.sqrt(1.0 - beta) / (1.0 - acp)

    def b(a):
      return self._tensor(a)[t][:, None, None, None]

    sqrt_acp, sqrt_1macp = b(np.sqrt(acp)), b(np.sqrt(1.0 - acp))
    x0_hat = (z - sqrt_1macp * eps_hat.detach()) / sqrt_acp
    true_mean = b(coef_x0) * x0 + b(coef_xt) * z
    model_mean = b(coef_x0) * x0_hat + b(coef_xt) * z
    frac = (var_out + 1.0) / 2.0
    model_log_var = frac * b(np.log(beta)) + (1.0 - frac) * b(log_var)
    kl = 0.5 * (
      -1.0
      + model_log_var
      - b(log_var)
      + torch.exp(b(log_var) - model_log_var)
      + (true_mean - model_mean) ** 2 * torch.exp(-model_log_var)
    )
    kl = kl.mean(dim=(1, 2, 3)) / math.log(2.0)
    # Decoder NLL at t = 0 (discretized Gaussian over 256 levels).
    inv_std = torch.exp(-0.5 * model_log_var)
    normal = torch.distributions.Normal(0.0, 1.0)
    upper = normal.cdf(inv_std * (x0 - model_mean + 1 / 255))
    lower = normal.cdf(inv_std * (x0 - model_mean - 1 / 255))
    nll = -torch.log(torch.clamp(upper - lower, min=1e-12)).mean(dim=(1, 2, 3)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)

  def train_step(self, x0, labels, rng: np.random.Generator):
    torch = self.torch
    b = x0.shape[0]
    t = torch.as_tensor(rng.integers(0, self.num_timesteps, b))
    noise = torch.randn_like(x0)
    sqrt_acp = self._tensor(np.sqrt(self.alphas_cumprod))[t][:, None, None, None]
    sqrt_1macp = self._tensor(np.sqrt(1.0 - self.alphas_cumprod))[t][:, None, None, None]
    z = sqrt_acp * x0 + sqrt_1macp * noise
    out = self.model(z, timestep=t, class_labels=labels, return_dict=False)[0]
    eps_hat = out[:, : self.c]
    loss = ((eps_hat - noise) ** 2).mean(dim=(1, 2, 3))
    if self.learn_sigma:
      loss = loss + self._vb(x0, z, t, eps_hat, out[:, self.c :])
    loss = loss.mean()
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    if self.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.opt.step()
    with torch.no_grad():
      for name, p in self.model.named_parameters():
        self.ema[name].mul_(self.ema_decay).add_(p.detach(), alpha=1.0 - self.ema_decay)
    return loss.item()

  # -- sampling --------------------------------------------------------------------------------

  def guided(self, z, t, labels, scale: float, guided_channels: int):
    """DiT's forward_with_cfg on the doubled batch (conditional, then the null class)."""
    torch = self.torch
    null = torch.full_like(labels, self.num_classes)
    out = self.model(
      torch.cat([z, z]),
      timestep=torch.cat([t, t]),
      class_labels=torch.cat([labels, null]),
      return_dict=False,
    )[0]
    cond, uncond = out.chunk(2)
    g = guided_channels
    mean = uncond[:, :g] + scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([mean, cond[:, g:]], dim=1)

  def trajectory(self, noise, labels, num_steps: int, scale: float, guided_channels: int, seed):
    """Ancestral DDPM over `num_steps` evenly respaced steps with the learned variance."""
    torch = self.torch
    grid = np.linspace(0, self.num_timesteps - 1, num_steps).round().astype(np.int64)[::-1]
    acp = self.alphas_cumprod[grid]
    acp_prev = np.append(acp[1:], 1.0)
    beta = 1.0 - acp / acp_prev
    var = beta * (1.0 - acp_prev) / (1.0 - acp)
    log_var = np.log(np.append(var[:-1], var[-2] if len(var) > 1 else var[-1]))
    coef_x0 = beta * np.sqrt(acp_prev) / (1.0 - acp)
    coef_xt = (1.0 - acp_prev) * np.sqrt(1.0 - beta) / (1.0 - acp)
    gen = torch.Generator().manual_seed(seed)
    z = noise
    with torch.no_grad():
      for i, step in enumerate(grid):
        t = torch.full((z.shape[0],), int(step), dtype=torch.int64)
        out = self.guided(z, t, labels, scale, guided_channels)
        eps = out[:, : self.c]
        x0 = ((z - math.sqrt(1.0 - acp[i]) * eps) / math.sqrt(acp[i])).clamp(-1, 1)
        mean = coef_x0[i] * x0 + coef_xt[i] * z
        if self.learn_sigma:
          frac = (out[:, self.c :] + 1.0) / 2.0
          lv = frac * math.log(beta[i]) + (1.0 - frac) * log_var[i]
        else:
          lv = torch.full_like(mean, log_var[i])
        if i + 1 < len(grid):
          z = mean + torch.exp(0.5 * lv) * torch.randn(z.shape, generator=gen)
        else:
          z = mean
    return z


def benchmark(config, steps: int, warmup: int, threads: int, trajectory: dict | None):
  """Seconds per train step, per guided sampling step and (optionally) per trajectory."""
  ref = TorchDiT(config, threads)
  torch = ref.torch
  b, s, c = config.train.batch_size, config.data.image_size, config.data.channels
  rng = np.random.default_rng(0)
  x0 = torch.as_tensor(rng.standard_normal((b, c, s, s), np.float32))
  labels = torch.as_tensor(rng.integers(0, config.model.num_classes, b))
  scale = config.sample.guidance_scale
  from dit_jax.evaluation import guides

  g = guides.guided_channels(config)
  results = {"train": _median_seconds(lambda: ref.train_step(x0, labels, rng), steps, warmup)}
  t = torch.full((b,), 500, dtype=torch.int64)

  def sample_step():
    with torch.no_grad():
      ref.guided(x0, t, labels, scale, g)

  results["sample"] = _median_seconds(sample_step, steps, warmup)
  if trajectory is not None:
    n = trajectory["batch_size"]
    noise = torch.as_tensor(rng.standard_normal((n, c, s, s), np.float32))
    tl = labels[:n] if n <= b else torch.as_tensor(rng.integers(0, config.model.num_classes, n))
    start = time.perf_counter()
    ref.trajectory(noise, tl, trajectory["num_steps"], scale, g, seed=0)
    results["trajectory"] = time.perf_counter() - start
  return results
