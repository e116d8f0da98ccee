"""Every experiment entry point I/O hygiene: importing one leaves JAX alone, and quick or smoke
runs write under runs/ (or nowhere), never into the committed results/ and figures/."""

import os
import subprocess
import sys
import textwrap

import pytest

from experiments import demo
from experiments import reproduce_paper
from experiments.benchmarks import ctr_step_profile
from experiments.benchmarks import ctr_throughput
from experiments.benchmarks import embedding_tier
from experiments.benchmarks import optimizer_overhead

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = (
  "experiments.demo",
  "experiments.reproduce_paper",
  "experiments.benchmarks.optimizer_overhead",
  "experiments.benchmarks.ctr_throughput",
  "experiments.benchmarks.ctr_step_profile",
  "experiments.benchmarks.embedding_tier",
  "experiments.benchmarks.scaling",
  "experiments.sweep",
  "experiments.plot.__main__",
)
OUTPUT_FLAGS = ("out", "figures", "workdir")


def test_importing_an_entry_point_leaves_jax_config_and_backend_alone():
  # A fresh interpreter: this one's JAX was configured by conftest.py.
  script = textwrap.dedent(
    f"""
    import importlib
    import jax
    from jax._src import xla_bridge

    def state():
      return jax.config.jax_num_cpu_devices, jax.config.jax_platforms

    before = state()
    for name in {ENTRY_POINTS!r}:
      importlib.import_module(name)
    assert state() == before, (before, state())
    assert not xla_bridge.backends_are_initialized()
    """
  )
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
  "module, argv, output_flags",
  [
    (demo, ["--quick"], {"out"}),
    (optimizer_overhead, ["--quick"], {"out"}),  # prints only unless --out
    (ctr_throughput, ["--steps", "100"], {"out"}),  # its docstring's smoke run; no --quick
    (ctr_step_profile, ["--batch", "256", "--steps", "3"], {"out"}),  # its trace: a temp dir
    (embedding_tier, ["--quick"], {"out", "workdir"}),
    (embedding_tier, ["--quick", "--large"], {"out", "workdir"}),
  ],
)
def test_smoke_runs_of_demo_and_benchmarks_write_no_files_by_default(module, argv, output_flags):
  args = vars(module.parse_args(argv))
  # None: print only (--out), or a temporary directory removed afterwards (--workdir).
  assert {flag: args[flag] for flag in OUTPUT_FLAGS if flag in args} == dict.fromkeys(output_flags)


@pytest.mark.parametrize(
  "argv, expected",
  [
    (["--quick"], ("runs/reproduce_paper_quick", "runs/reproduce_paper_quick/figures")),
    (
      ["--quick", "--plot-only"],
      ("runs/reproduce_paper_quick", "runs/reproduce_paper_quick/figures"),
    ),
    (
      ["--quick", "--seeds", "2"],
      ("runs/reproduce_paper_quick", "runs/reproduce_paper_quick/figures"),
    ),
    (["--steps", "64"], ("runs/reproduce_paper", "runs/reproduce_paper/figures")),
    (["--ks", "1", "8"], ("runs/reproduce_paper", "runs/reproduce_paper/figures")),
    (["--out", "runs/paper"], ("runs/paper", "runs/paper/figures")),
    # Only the full config, unchanged, is the deliberate run behind the committed files.
    ([], ("results/reproduce_paper", "figures")),
    (["--plot-only"], ("results/reproduce_paper", "figures")),
  ],
)
def test_paper_experiment_defaults_to_committed_dirs_only_for_the_full_config(argv, expected):
  assert reproduce_paper.output_dirs(*reproduce_paper.parse_args(argv)) == expected
