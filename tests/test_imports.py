"""The optimizer core imports without the subpackages' dependencies; subpackages load lazily."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTRAS_MODULES = ("flax", "tensorstore", "tqdm", "pyarrow", "matplotlib")


def _run(code: str) -> str:
  """Run ``code`` in a fresh interpreter at the repository root; return its stdout."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(code)],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_import_loads_no_optional_dependency_and_subpackages_load_on_access():
  out = _run(
    f"""
    import sys
    import kstep_adam
    print(sorted(m for m in {EXTRAS_MODULES!r} if m in sys.modules))
    print(kstep_adam.ctr.TrainConfig.__name__, "flax" in sys.modules)
    print(kstep_adam.embedding.open_table.__name__, "tensorstore" in sys.modules)
    """
  )
  assert out.split("\n")[:3] == ["[]", "TrainConfig True", "open_table True"]


def test_core_works_without_flax_and_tensorstore():
  """As after `pip install kstep_adam` without extras: the core runs, a subpackage names its extra."""
  out = _run(
    """
    import importlib.abc, sys

    class Uninstalled(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("flax", "tensorstore"):
          raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Uninstalled())
    import jax.numpy as jnp
    import kstep_adam
    from kstep_adam import parallel

    tx = kstep_adam.kstep_adam(0.1, 2)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update(params, tx.init(params), params)
    print(float(updates["w"][0]) < 0, parallel.AXIS_NAMES)
    try:
      kstep_adam.ctr
    except ModuleNotFoundError as e:
      print(e)
    """
  )
  lines = out.strip().split("\n")
  assert lines[0] == "True ('node', 'local')"
  assert "pip install 'kstep_adam[ctr]'" in lines[1]


def test_unknown_attribute_is_an_attribute_error():
  import kstep_adam

  with pytest.raises(AttributeError, match="has no attribute 'nope'"):
    kstep_adam.nope  # noqa: B018
  assert {"ctr", "embedding", "kstep_adam"} <= set(dir(kstep_adam))
