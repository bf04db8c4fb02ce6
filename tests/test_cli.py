"""Bad command lines end in one clear last line `Error: ...` (dit_jax.cli), in every program.

Each case runs the program as a user does; the cases run side by side in one module fixture,
since each costs a Python and JAX start-up and nothing else.
"""

import concurrent.futures
import glob
import importlib.util
import os
import signal
import subprocess
import sys

import _cli
import ml_collections
import numpy as np
import pytest

from dit_jax import cli
from dit_jax.config_defaults import parse_arg
from dit_jax.errors import ConfigError
from launch import local

QS = "--config=configs/quickstart.py"
# A config error of any program with a --config flag: ml_collections raises it while parsing.
BAD_FIELD = [QS, "--config.train.batch_sz=8"]

# name: (module, args, fragments of the last line). "{tmp}" is a scratch directory; every case
# gets --workdir={tmp}/workdir (where the program takes one), which must not appear.
CASES = {
  "unknown_field": (
    "dit_jax.main",
    BAD_FIELD,
    ["config.train.batch_sz is not a config field", "did you mean config.train.batch_size?"],
  ),
  "unknown_mesh_axis": (
    "dit_jax.main",
    [QS, "--config.parallel.mesh.model=2"],
    ["config.parallel.mesh.model is not a config field", "data, fsdp, tensor"],
  ),
  "field_of_a_value": (
    "dit_jax.main",
    [QS, "--config.train.lr.x=1"],
    ["config.train.lr is a value"],
  ),
  "float_field_not_a_number": (
    "dit_jax.main",
    [QS, "--config.train.lr=abc"],
    ["--config.train.lr=abc", "could not convert", "--helpshort"],
  ),
  "group_given_a_value": ("dit_jax.main", [QS, "--config.model=3"], ["--config.model=3"]),
  "unknown_flag": ("dit_jax.main", [QS, "--bogus=1"], ["'bogus'", "--helpshort"]),
  "bad_mode": ("dit_jax.main", [QS, "--mode=foo"], ["--mode=foo", "train|sample|evaluate"]),
  "positional_argument": ("dit_jax.main", [QS, "train"], ["unexpected arguments ['train']"]),
  "missing_config_file": (
    "dit_jax.main",
    ["--config=configs/nope.py"],
    ["--config=configs/nope.py", "there is no file configs/nope.py"],
  ),
  "missing_config_file_with_override": (
    "dit_jax.main",
    ["--config=configs/nope.py", "--config.train.lr=1"],
    ["there is no file configs/nope.py"],
  ),
  "config_syntax_error": (
    "dit_jax.main",
    ["--config={tmp}/syntax.py"],
    ["{tmp}/syntax.py, line 2"],
  ),
  "config_name_error": (
    "dit_jax.main",
    ["--config={tmp}/nameerror.py"],
    ["get_config raised NameError: name 'undefined_name'", "({tmp}/nameerror.py, line 2)"],
  ),
  "config_misspelt_field": (
    "dit_jax.main",
    ["--config={tmp}/misspelt.py"],
    ["get_config raised AttributeError: 'modle' Did you mean", "({tmp}/misspelt.py, line 6)"],
  ),
  "config_without_get_config": (
    "dit_jax.main",
    ["--config={tmp}/noget.py"],
    ["{tmp}/noget.py has no get_config"],
  ),
  "unknown_config_arg": (
    "dit_jax.main",
    ["--config=configs/dit_imagenet256.py:varient=XL/2"],
    ["Unknown config arg 'varient'", "did you mean 'variant'?", "variant, objective, runlocal"],
  ),
  "config_arg_of_a_config_without_args": (
    "dit_jax.main",
    ["--config=configs/quickstart.py:foo=1"],
    ["--config=configs/quickstart.py:foo=1", "this config takes no args"],
  ),
  "config_arg_not_a_bool": (
    "dit_jax.main",
    ["--config=configs/mmdit_sd3.py:runlocal=maybe"],
    ["runlocal='maybe' is not a bool"],
  ),
  "workdir_is_a_file": (
    "dit_jax.main",
    [QS, "--workdir={tmp}/file"],
    ["--workdir={tmp}/file is a file, not a directory"],
  ),
  "workdir_cannot_be_created": (
    "dit_jax.main",
    [QS, "--config.model.variant=tiny/4", "--workdir=/proc/dit_jax_no_such_dir/run"],
    ["No such file or directory: /proc/dit_jax_no_such_dir", "--workdir=/proc/dit_jax_no_such_dir"],
  ),
  "workdir_inside_a_file": (
    "dit_jax.main",
    [QS, "--workdir={tmp}/file/run"],
    ["--workdir={tmp}/file/run is inside {tmp}/file, which is a file"],
  ),
  # Nothing to start from: no empty checkpoints/ is left in the new workdir.
  "init_from_without_checkpoint": (
    "dit_jax.main",
    [QS, "--config.model.variant=tiny/4", "--config.train.init_from={tmp}/no_run"],
    ["config.train.init_from='{tmp}/no_run' holds no checkpoint"],
  ),
  # The other programs end the same way.
  "encode_latents": ("dit_jax.tools.encode_latents", BAD_FIELD, ["did you mean"]),
  "import_dit": ("dit_jax.tools.import_dit", BAD_FIELD, ["did you mean"]),
  "import_sd3": ("dit_jax.tools.import_sd3", BAD_FIELD, ["did you mean"]),
  "benchmark": ("dit_jax.benchmark", BAD_FIELD, ["did you mean"]),
  # absl's message listed every flag's value, for --config the whole config.
  "benchmark_nothing_to_time": (
    "dit_jax.benchmark",
    [],
    ["pass exactly one of --config, --vae, --inception, --text_encoder (got none)"],
  ),
  "benchmark_config_and_vae": ("dit_jax.benchmark", [QS, "--vae=sd"], ["(got --config, --vae)"]),
  "benchmark_no_steps": ("dit_jax.benchmark", [QS, "--steps=0"], ["--steps=0"]),
  "aot_compile": ("launch.aot_compile", BAD_FIELD, ["did you mean"]),
  "aot_compile_no_slices": (
    "launch.aot_compile",
    [QS, "--topology=v5p-8", "--num_slices=0"],
    ["--num_slices=0"],
  ),
  "encode_text": ("dit_jax.tools.encode_text", ["--batch_size=abc"], ["--batch_size=abc"]),
  "encode_text_format": (
    "dit_jax.tools.encode_text",
    ["--captions={tmp}/file", "--out={tmp}/text", "--format=parquet"],
    ["--format='parquet' is not supported; choose one of ['npy', 'array_record']"],
  ),
  "encode_text_backend": (
    "dit_jax.tools.encode_text",
    ["--captions={tmp}/file", "--out={tmp}/text", "--backend=jx"],
    ["--backend='jx' is not supported; choose one of ['jax', 'torch']"],
  ),
  "benchmark_text_batch": (
    "dit_jax.benchmark",
    ["--text_encoder=clip_l", "--text_batch_size=0"],
    ["--text_batch_size=0 must be a positive multiple"],
  ),
  "launch_local": ("launch.local", ["--num_processes=0"], ["--num_processes=0"]),
  "launch_local_failed_processes": (
    "launch.local",
    ["--num_processes=2", "--devices_per_process=1", "--", *BAD_FIELD, "--workdir={tmp}/workdir"],
    # Both processes fail on the flag; either may end first, so the order is not asserted.
    ["exit code 1", "ended with: config.train.batch_sz is not a config field"],
  ),
}
TAKES_WORKDIR = ("dit_jax.main", "dit_jax.tools.import_dit", "dit_jax.tools.import_sd3")


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """{case: (CompletedProcess, fragments, scratch directory)}, all cases run at once."""
  tmp = str(tmp_path_factory.mktemp("bad_cli"))
  with open(f"{tmp}/syntax.py", "w") as f:
    f.write("def get_config(arg=None):\n  return {\n")
  with open(f"{tmp}/noget.py", "w") as f:
    f.write("import ml_collections\n\nCONFIG = ml_collections.ConfigDict()\n")
  with open(f"{tmp}/file", "w") as f:
    f.write("not a workdir\n")
  with open(f"{tmp}/nameerror.py", "w") as f:
    f.write("def get_config(arg=None):\n  return undefined_name\n")
  with open(f"{tmp}/misspelt.py", "w") as f:
    f.write(
      "from dit_jax.config_defaults import base_config\n\n\ndef get_config(arg=None):\n"
      "  c = base_config()\n  c.modle.variant = 'S/2'\n  return c\n"
    )

  def start(case):
    module, args, fragments = CASES[case]
    args = [a.format(tmp=tmp) for a in args]
    if module in TAKES_WORKDIR and not any(a.startswith("--workdir=") for a in args):
      args.append(f"--workdir={tmp}/workdir")
    proc = _cli.run(*args, module=module, timeout=120)
    return proc, [f.format(tmp=tmp) for f in fragments]

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    runs = dict(zip(CASES, pool.map(start, CASES), strict=True))
  return runs, tmp


@pytest.mark.multiprocess
@pytest.mark.parametrize("case", list(CASES))
def test_bad_command_line_ends_in_one_error_line(bad_runs, case):
  runs, tmp = bad_runs
  proc, fragments = runs[case]
  _cli.assert_clear_error(proc, *fragments)
  assert not os.path.exists(f"{tmp}/workdir"), "a bad command line created the workdir"
  with open(f"{tmp}/file") as f:
    assert f.read() == "not a workdir\n"


@pytest.mark.multiprocess
def test_overwrite_lets_sample_replace_earlier_samples(trained_workdir, tmp_path):
  workdir = _cli.copy_workdir(trained_workdir, str(tmp_path / "run"))
  path = os.path.join(workdir, "samples", "samples.npz")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(b"an earlier run's samples")
  proc = _cli.run(*_cli.TINY, f"--workdir={workdir}", "--mode=sample", "--overwrite")
  _cli.assert_quiet(proc)
  assert proc.returncode == 0, proc.output[-3000:]
  with np.load(path) as npz:
    assert any(npz[k].shape[:1] == (8,) for k in npz.files), dict(npz)


SHIPPED_CONFIGS = sorted(glob.glob(os.path.join(_cli.REPO, "configs", "*.py")))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=os.path.basename)
def test_every_shipped_config_rejects_an_unknown_arg(path):
  module = _load(path)
  assert isinstance(module.get_config(), ml_collections.ConfigDict)
  assert "Arg string:" in module.__doc__
  with pytest.raises(ConfigError, match="Unknown config arg 'bogus'"):
    module.get_config("bogus=1")


def test_parse_arg_checks_keys_and_types():
  defaults = {"variant": "XL/2", "steps": 10, "scale": 1.5, "runlocal": False}
  assert parse_arg(None, defaults) == defaults
  assert parse_arg("variant=,steps=3,scale=2,runlocal", defaults) == {
    "variant": "",
    "steps": 3,
    "scale": 2.0,
    "runlocal": True,
  }
  assert parse_arg("runlocal=false", defaults)["runlocal"] is False
  for arg, match in [
    ("step=3", "Unknown config arg 'step' \\(did you mean 'steps'\\?\\)"),
    ("steps=abc", "steps='abc' is not a int"),
    ("scale=x", "scale='x' is not a float"),
    ("runlocal=maybe", "runlocal='maybe' is not a bool"),
    ("variant", "'variant' needs a value"),
  ]:
    with pytest.raises(ConfigError, match=match):
      parse_arg(arg, defaults)
  with pytest.raises(ConfigError, match="takes no args"):
    parse_arg("runlocal", {})


def test_workdir_error_names_only_errors_on_the_way_to_or_in_the_workdir():
  denied = PermissionError(13, "Permission denied", "/data/run/checkpoints")
  message = cli.workdir_error(denied, "/data/run")
  assert message.startswith("Permission denied: /data/run/checkpoints (in --workdir=/data/run)")
  assert cli.workdir_error(OSError(30, "Read-only file system", "/data"), "/data/run")
  assert cli.workdir_error(OSError(2, "No such file", "/data/runs"), "/data/run") is None
  assert cli.workdir_error(OSError(2, "No such file", "/weights.pth"), "/data/run") is None
  assert cli.workdir_error(OSError(28, "No space left on device"), "/data/run") is None


def test_launch_local_names_the_process_that_failed_first():
  # The process that failed ends with its error line; the one stopped after it, with a signal.
  cause = local.failure_cause([-15, 1], ["I1201 step 3", "Error: config.x is not a config field"])
  assert cause == "p1 ended with: config.x is not a config field"
  assert local.failure_cause([1, -15], ["ValueError: boom", "I1201 step 3"]) == (
    "p0 ended with: ValueError: boom"
  )
  assert local.failure_cause([1, 1], ["", ""]) == "the cause is in the [p<i>] lines above."


@pytest.mark.multiprocess
def test_launch_local_lets_failing_processes_end_and_stops_the_rest(monkeypatch, capsys):
  # Every process that fails within the grace period keeps its own exit code, whichever ends
  # first; one left blocked (in a collective) is terminated after it.
  monkeypatch.setenv("PYTHONPATH", os.path.dirname(__file__))
  last = []
  codes = local.launch(
    ["--behaviour=exit:1:1.5,exit:3:0,hang"],
    3,
    1,
    module="_launch_child",
    last_lines=last,
    grace_s=4.0,
  )
  assert codes == [1, 3, -signal.SIGTERM], (codes, last)
  assert last[:2] == ["Error: process 0 failed", "Error: process 1 failed"], last
  assert local.failure_cause(codes, last) == "p0 ended with: process 0 failed"
  assert "[p2] waiting in a collective" in capsys.readouterr().out


GLOO = "[Gloo] Rank {} is connected to 1 peer ranks. Expected number of connected peer ranks is : 1"


def test_launch_local_drops_gloo_connection_messages():
  assert local.drop_gloo_messages(GLOO.format(0) + "\n") is None
  assert local.drop_gloo_messages("  " + GLOO.format(12) + "\n") is None
  # Written piece by piece from several threads: glued to a progress bar, split over two lines.
  bar = "train:  50%|#####     | 1/2 [00:59<00:59, 59.78s/step]"
  assert local.drop_gloo_messages(f"{bar}{GLOO.format(1)}[Gloo] Rank 0\n") == f"{bar}\n"
  tail = " is connected to 1 peer ranks. Expected number of connected peer ranks is : 1\n"
  assert local.drop_gloo_messages(tail) is None
  for ours in ["Gloo all-reduce failed: connection reset\n", "\n", "step 2: loss 0.5\n"]:
    assert local.drop_gloo_messages(ours) == ours


def test_jax_starts_no_libtpu_on_a_machine_without_a_tpu():
  assert cli.platforms_without_tpu("", False, True, False) == "cpu"
  assert cli.platforms_without_tpu("cpu,tpu", False, True, False) is None  # The user's choice.
  assert cli.platforms_without_tpu("", True, True, False) is None  # A TPU VM.
  assert cli.platforms_without_tpu("", False, False, False) is None  # No libtpu to start.
  assert cli.platforms_without_tpu("", False, True, True) is None  # A GPU host.


@pytest.mark.multiprocess
def test_a_program_run_without_jax_platforms_prints_no_libtpu_errors(tmp_path):
  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed (the tpu extra): nothing would print its errors")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  proc = subprocess.run(
    [sys.executable, "-m", "dit_jax.main", f"--workdir={tmp_path}/none", "--mode=sample"],
    cwd=_cli.REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 1
  assert "TPU" not in proc.stderr + proc.stdout, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("Error: No checkpoint with its config")
