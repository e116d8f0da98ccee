"""The demo (the interim main job) runs end to end on a shrunken config; importing any entry
point leaves JAX alone."""

import json
import os
import subprocess
import sys
import textwrap

from experiments import demo

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = (
  "experiments.demo",
  "experiments.reproduce_paper",
  "experiments.benchmarks.optimizer_overhead",
  "experiments.benchmarks.ctr_throughput",
  "experiments.benchmarks.embedding_tier",
)


def test_demo_quick_run_reports_fewer_inter_node_bytes_than_ddp(tmp_path):
  out = tmp_path / "summary.json"
  summary = demo.main(["--quick", "--k-node", "4", "--k-local", "2", "--out", str(out)])
  kstep, ddp = (v for k, v in summary.items() if isinstance(v, dict))
  assert kstep["merges"] == {"node": 10, "local": 10}  # 40 steps: node every 4, local at 2 mod 4.
  assert 0 < kstep["bytes_by_axis"]["node"] < ddp["bytes_by_axis"]["node"]
  assert kstep["seconds"] < ddp["seconds"]
  assert json.loads(out.read_text())["steps"] == 40


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
