"""Every number of a config is checked up front (training, sampling and evaluation alike), and a
legal but probably mistaken setting logs one warning line."""

import importlib.util
import json
import logging
import math
import os

import _cli
import jax
import numpy as np
import pytest

from dit_jax import checks, experiment
from dit_jax.data import text
from dit_jax.diffusion import timesteps
from dit_jax.errors import ConfigError
from dit_jax.evaluation import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN, INF = float("nan"), float("inf")


def load_config(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def with_fields(config, **fields):
  """`config` with `section__name=value` fields set."""
  for key, value in fields.items():
    section, name = key.split("__")
    config[section][name] = value
  return config


def warnings_of(config, caplog) -> list[str]:
  """The warning lines `checks.validate(config)` logs (it must not raise)."""
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    checks.validate(config)
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


SHIPPED = [
  ("quickstart", None),
  ("quickstart_t2i", None),
  *(
    ("dit_imagenet256", f"variant={v},objective={o}{local}")
    for v in ("XL/2", "S/4")
    for o in ("eps", "v", "rectified_flow")
    for local in ("", ",runlocal")
  ),
  ("mmdit_sd3", "variant=d24"),
  ("mmdit_sd3", "runlocal"),
]


@pytest.mark.parametrize("name,arg", SHIPPED)
def test_shipped_configs_validate_without_warnings(name, arg, caplog):
  assert warnings_of(load_config(name, arg), caplog) == []


def test_quickstart_objectives_validate_without_warnings(caplog):
  # Its min-SNR gamma is read under loss_weighting "auto" only with eps: no warning for any.
  for objective in ("eps", "v", "rectified_flow"):
    config = with_fields(load_config("quickstart"), diffusion__objective=objective)
    assert warnings_of(config, caplog) == []


MODE_LO, MODE_HI = timesteps.MODE_SCALE_RANGE
BAD = [
  # (fields, what the error says)
  (dict(diffusion__logit_std=0.0), "diffusion.logit_std=0.0 must be > 0"),
  (dict(diffusion__logit_std=-1.0), "diffusion.logit_std=-1.0 must be > 0"),
  (dict(diffusion__logit_std=NAN), "diffusion.logit_std=nan must be > 0"),
  (dict(diffusion__logit_mean=INF), "diffusion.logit_mean=inf must be a finite number"),
  (dict(diffusion__mode_scale=MODE_HI + 0.01), r"diffusion.mode_scale=1.76.* must be in \[-1, "),
  (dict(diffusion__mode_scale=-1.01), r"diffusion.mode_scale=-1.01 must be in \[-1, 2/\(pi-2\)"),
  (dict(diffusion__shift=0.0), r"diffusion.shift=0.0 must be > 0 \(1.0 = no shift\)"),
  (dict(diffusion__shift_base_resolution=-32), "diffusion.shift_base_resolution=-32 must be >= 0"),
  (dict(diffusion__num_timesteps=0), "diffusion.num_timesteps=0 must be >= 2"),
  (dict(diffusion__min_snr_gamma=0.0), "diffusion.min_snr_gamma=0.0 must be > 0"),
  (dict(diffusion__sigma_data=-0.5), "diffusion.sigma_data=-0.5 must be > 0"),
  (dict(diffusion__schedule="quadratic"), "diffusion.schedule='quadratic' is not supported"),
  (dict(train__lr=-1e-4), "train.lr=-0.0001 must be > 0"),
  (dict(train__lr=NAN), "train.lr=nan must be > 0"),
  (dict(train__warmup_steps=-1), "train.warmup_steps=-1 must be >= 0"),
  (dict(train__weight_decay=-0.1), "train.weight_decay=-0.1 must be >= 0"),
  (dict(train__grad_clip=-1.0), r"train.grad_clip=-1.0 must be >= 0 \(0 = no clipping\)"),
  (dict(train__b1=1.0), r"train.b1=1.0 must be in \[0, 1\)"),
  (dict(train__b2=-0.1), r"train.b2=-0.1 must be in \[0, 1\)"),
  (dict(train__ema_decay=1.0), r"train.ema_decay=1.0 must be in \[0, 1\)"),
  (dict(train__seed=-1), r"train.seed=-1 must be in \[0, 2\*\*32\)"),
  (dict(train__seed=2**32), r"train.seed=4294967296 must be in \[0, 2\*\*32\)"),
  (dict(train__batch_size=0), "train.batch_size=0 must be > 0"),
  (dict(train__num_steps=0), "train.num_steps=0 must be > 0"),
  (dict(train__sample_every=-1), "train.sample_every=-1 must be >= 0"),
  (dict(model__class_dropout=1.0), r"model.class_dropout=1.0 must be in \[0, 1\)"),
  (dict(model__text_dropout=-0.1), r"model.text_dropout=-0.1 must be in \[0, 1\)"),
  (dict(model__mlp_ratio=0.0), "model.mlp_ratio=0.0 must be > 0"),
  (dict(model__width=-64), r"model.width=-64 must be >= 0 \(0 = the variant's\)"),
  (dict(model__depth=-1), "model.depth=-1 must be >= 0"),
  (dict(model__heads=-2), "model.heads=-2 must be >= 0"),
  (dict(model__scan_unroll=0), "model.scan_unroll=0 must be > 0"),
  (dict(model__num_classes=0), "model.num_classes=0 must be > 0"),
  (dict(model__pos_embed_max_size=-1), "model.pos_embed_max_size=-1 must be >= 0"),
  (dict(model__context_len=-1), "model.context_len=-1 must be >= 0"),
  (dict(sample__num_steps=0), "sample.num_steps=0 must be > 0"),
  (dict(sample__num_images=0), "sample.num_images=0 must be > 0"),
  (dict(sample__eta=-0.1), r"sample.eta=-0.1 must be in \[0, 1\]"),
  (dict(sample__eta=1.5), r"sample.eta=1.5 must be in \[0, 1\]"),
  (dict(sample__seed=-1), "sample.seed=-1 must be in"),
  (dict(sample__guidance_scale=NAN), "sample.guidance_scale=nan must be a finite number"),
  (dict(eval__num_images=0), "eval.num_images=0 must be > 0"),
  (dict(sample__prompts="prompts.txt"), r"sample.prompts='prompts.txt' is for text models.*"),
  (dict(sample__prompt_text="a cat"), r"prompt_text='a cat' .*takes class labels.*sample.labels"),
  # Checked here, before the model is built from them (a negative size was a JAX traceback).
  (dict(data__image_size=-16), "data.image_size=-16 must be > 0"),
  (dict(data__channels=0), "data.channels=0 must be > 0"),
  (dict(data__num_workers=-1), r"data.num_workers=-1 must be >= 0 \(0 = threads"),
  (dict(data__latent_scale=0.0), "data.latent_scale=0.0 must be > 0"),
  # Not "needs text-conditioned data", which the data's checks said of any unknown name.
  (
    dict(model__name="unet"),
    r"model.name='unet' is not supported; choose one of \['dit', 'mmdit', 'classifier'\]",
  ),
  # The samples were written to samples/.npz, or not at all (PIL: "unknown file extension").
  (dict(sample__name=""), "sample.name='' names no file; .*--config.sample.name=samples"),
  (dict(sample__name="sub/"), "sample.name='sub/' names no file"),
  (dict(eval__name=" "), "eval.name=' ' names no file; .*--config.eval.name=eval"),
  (dict(sample__name="../../x"), "sample.name='../../x' would write outside the workdir"),
  (dict(eval__name="/tmp/x"), "eval.name='/tmp/x' would write outside the workdir"),
]


@pytest.mark.parametrize("fields,match", BAD, ids=[m.split(" ")[0] for _, m in BAD])
def test_bad_numbers_and_prompts_are_errors_naming_field_value_and_range(fields, match):
  with pytest.raises(ConfigError, match=match):
    checks.validate(with_fields(load_config("quickstart"), **fields))


@pytest.mark.parametrize("prompt_text", ["||", " | ", " "])
def test_prompt_text_without_prompts_is_an_error(prompt_text):
  config = with_fields(load_config("quickstart_t2i"), sample__prompt_text=prompt_text)
  with pytest.raises(ConfigError, match=r"prompt_text=.* has no prompts between '\|'"):
    checks.validate(config)


def test_inline_prompts_split_on_bars_and_drop_empty_ones():
  assert text.inline_prompts(" a red circle || a blue square |") == [
    "a red circle",
    "a blue square",
  ]


def test_sampling_checks_the_numbers_before_building_anything(monkeypatch, tmp_path):
  config = with_fields(load_config("quickstart"), sample__num_steps=0)
  monkeypatch.setattr(experiment, "build", lambda *a, **k: pytest.fail("built the model"))
  for sample_or_evaluate in (runner.sample, runner.evaluate):
    with pytest.raises(ConfigError, match="sample.num_steps=0 must be > 0"):
      sample_or_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
  "fields",
  [
    dict(diffusion__timestep_sampler="mode", diffusion__mode_scale=MODE_LO),
    dict(diffusion__timestep_sampler="mode", diffusion__mode_scale=MODE_HI),
    dict(diffusion__objective="v", sample__sampler="ddim", sample__eta=1.0),
    dict(train__b1=0.0, train__grad_clip=0.0, train__warmup_steps=0, train__seed=2**32 - 1),
    dict(model__class_dropout=0.0, sample__guidance_scale=1.0),
  ],
)
def test_edge_values_are_legal_and_quiet(fields, caplog):
  assert warnings_of(with_fields(load_config("quickstart"), **fields), caplog) == []


def test_mode_scale_range_is_where_the_mode_map_stays_monotone():
  """SD3's mode map sends [0, 1] onto [0, 1] decreasingly (a valid density of t) exactly for
  scales in MODE_SCALE_RANGE: just outside, it turns back somewhere."""
  u = np.linspace(0.0, 1.0, 100_001)  # float64: at the ends of the range f' touches 0.

  def mode_map(scale):
    return 1.0 - u - scale * (np.cos(math.pi / 2 * u) ** 2 - 1.0 + u)

  np.testing.assert_allclose(timesteps.mode_transform(u, 1.29), mode_map(1.29), atol=1e-6)
  for scale in (MODE_LO, 0.0, 1.29, MODE_HI):
    assert np.diff(mode_map(scale)).max() <= 0, scale
  for scale in (MODE_LO - 0.01, MODE_HI + 0.01):
    assert np.diff(mode_map(scale)).max() > 0, scale


WARN = [
  # (config, fields, the one warning line says)
  ("quickstart", dict(sample__guidance_scale=-1.0), "guidance_scale=-1.0 is negative"),
  ("quickstart", dict(model__class_dropout=0.0), "class_dropout=0 never trains it"),
  ("quickstart_t2i", dict(model__text_dropout=0.0), "text_dropout=0 never trains it"),
  ("quickstart", dict(diffusion__mode_scale=1.0), "mode_scale=1.0 has no effect: only the 'mode'"),
  ("quickstart", dict(diffusion__logit_std=2.0), "logit_std=2.0 has no effect: only the 'logit_"),
  ("quickstart", dict(diffusion__logit_mean=0.5), "logit_mean=0.5 has no effect"),
  ("quickstart", dict(sample__eta=0.5), "eta=0.5 has no effect: only the ddim sampler"),
  (
    "quickstart",
    dict(diffusion__objective="v", sample__sampler="ddpm", sample__eta=0.5),
    "sample.sampler='ddpm'",
  ),
  ("quickstart", dict(diffusion__loss_weighting="none"), "min_snr_gamma=0.1 has no effect"),
  (
    "quickstart",
    dict(diffusion__preconditioning="none", diffusion__sigma_data=0.3),
    "sigma_data=0.3 has no effect: only preconditioning 'edm'",
  ),
  ("quickstart", dict(diffusion__num_timesteps=500), "num_timesteps=500 has no effect"),
  ("quickstart", dict(diffusion__schedule="cosine"), "schedule='cosine' has no effect"),
  (
    "quickstart",
    dict(sample__guidance_scale=1.0, sample__guided_channels=1),
    "guided_channels=1 has no effect",
  ),
  ("quickstart", dict(model__qk_norm=False), "qk_norm=False has no effect: only mmdit"),
  ("quickstart_t2i", dict(model__num_classes=5), "num_classes=5 has no effect: only dit"),
  ("quickstart_t2i", dict(sample__labels="random"), "labels='random' has no effect"),
  (
    "quickstart",
    dict(diffusion__objective="eps", sample__num_steps=2000),
    "sample.num_steps=2000 exceeds config.diffusion.num_timesteps=1000",
  ),
  (
    ("dit_imagenet256", "runlocal"),
    dict(sample__clip_denoised=True),
    "clip_denoised=True clips these latents",
  ),
]


@pytest.mark.parametrize("name,fields,says", WARN, ids=[w[2].split(" ")[0] for w in WARN])
def test_unusual_settings_log_one_warning_line_and_go_on(name, fields, says, caplog):
  name, arg = name if isinstance(name, tuple) else (name, None)
  lines = warnings_of(with_fields(load_config(name, arg), **fields), caplog)
  assert len(lines) == 1 and says in lines[0] and "\n" not in lines[0], lines


@pytest.mark.parametrize(
  "fields",
  [
    dict(diffusion__timestep_sampler="mode", diffusion__mode_scale=1.0),
    dict(diffusion__timestep_sampler="logit_normal", diffusion__logit_std=2.0),
    dict(diffusion__objective="v", sample__sampler="ddim", sample__eta=0.5),
    dict(diffusion__loss_weighting="min_snr", diffusion__min_snr_gamma=3.0),
    dict(diffusion__objective="eps", diffusion__num_timesteps=500, diffusion__schedule="cosine"),
  ],
)
def test_the_same_fields_are_quiet_where_they_are_read(fields, caplog):
  assert warnings_of(with_fields(load_config("quickstart"), **fields), caplog) == []


def test_only_process_0_warns(monkeypatch, caplog):
  config = with_fields(load_config("quickstart"), sample__guidance_scale=-1.0)
  assert len(warnings_of(config, caplog)) == 1
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert warnings_of(config, caplog) == []


# --- The command line: the last line says what is wrong, nothing on disk changes --------------


@pytest.mark.multiprocess
def test_cli_sample_with_zero_steps_is_one_clear_line(trained_workdir):
  before = _cli.snapshot(trained_workdir)
  proc = _cli.run(
    *_cli.TINY, f"--workdir={trained_workdir}", "--mode=sample", "--config.sample.num_steps=0"
  )
  _cli.assert_clear_error(proc, "config.sample.num_steps=0 must be > 0")
  assert _cli.snapshot(trained_workdir) == before


@pytest.mark.multiprocess
@pytest.mark.parametrize(
  "flags,says",
  [
    (
      ["--config.diffusion.timestep_sampler=logit_normal", "--config.diffusion.logit_std=0"],
      "config.diffusion.logit_std=0.0 must be > 0",
    ),
    (["--config.sample.prompt_text=a cat"], "takes class labels"),
    (["--config.data.channels=0"], "config.data.channels=0 must be > 0"),
  ],
)
def test_cli_bad_config_is_one_clear_line_and_writes_nothing(flags, says, tmp_path):
  workdir = tmp_path / "run"
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}", *flags)
  _cli.assert_clear_error(proc, says)
  assert not workdir.exists()


def test_a_saved_runs_config_reads_back_and_takes_only_sampling_fields_from_a_given_one():
  from dit_jax import config_defaults

  run = _cli.tiny_config(sample__guidance_interval=(0.3, 5.0))
  saved = json.loads(run.to_json())
  del saved["model"]["qk_norm"]  # A field added after the run was saved: its default.
  back = config_defaults.from_saved(saved)
  assert back.to_dict() == run.to_dict()  # Tuples are tuples again.
  given = _cli.tiny_config()
  given.sample.num_steps, given.eval.num_images, given.train.lr = 7, 32, 0.5
  given.data.path, given.model.dtype = "/elsewhere", "bfloat16"
  config = config_defaults.for_saved_run(back, given, "RUN")
  assert (config.sample.num_steps, config.eval.num_images) == (7, 32)
  assert config.sample.guidance_interval == ()  # The given config's sampling, whole.
  assert (config.data.path, config.model.dtype) == ("/elsewhere", "bfloat16")
  assert config.train.lr == run.train.lr  # Training fields stay the run's.
  assert config_defaults.for_saved_run(back, None, "RUN") is back
  for field, value in [("diffusion.objective", "eps"), ("model.num_classes", 3)]:
    bad = _cli.tiny_config(**{field.replace(".", "__"): value})
    with pytest.raises(ConfigError, match=rf"config\.{field}={value!r} here, .* in the run"):
      config_defaults.for_saved_run(back, bad, "RUN")
