"""Test configuration: 8 simulated CPU devices for every test and doctest in the suite, a
temporary directory of the session's own that must be left empty, and in it a compilation
cache and the C++ kernels built for the session.

The device flag must be set before the JAX backend starts, so it lives here. Every temporary
file of the session (``tempfile`` in this process, ``TMPDIR`` in the processes it starts, and
pytest's own ``tmp_path`` directories) goes under one directory; at the end, anything left
there besides pytest's ``tmp_path`` base is a leak, reported and counted as a failure, and a
passing session removes the directory (a failing one keeps its ``tmp_path`` directories to
look at), so a test run leaves nothing in /tmp. Under pytest-xdist each worker process makes
its own such directory inside the controller's, so a worker's leak fails the controller too.

The suite runs on two xdist workers, a test file at a time on one worker; the test files that
set up the shaped link (network namespaces, one run at a time per machine) all go to the same
worker, one after another (:func:`pytest_xdist_make_scheduler`).
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 8)

SESSION_PREFIX = "kstep_adam-tests-"
SESSION_TMP = tempfile.mkdtemp(prefix=SESSION_PREFIX)
os.environ["TMPDIR"] = tempfile.tempdir = SESSION_TMP

# One persistent compilation cache for the session, inherited by the processes the tests start
# (sweep workers, resumed runs, multi-process ranks compile the same programs again).
# Every program is kept, however fast it compiled: the tests' programs are small, and the
# sweep and run tests went from 159 s to 127 s with it.
CACHE_NAME = "jax-compilation-cache"
COMPILATION_CACHE = os.path.join(SESSION_TMP, CACHE_NAME)
CACHE_SETTINGS = {
  "jax_compilation_cache_dir": COMPILATION_CACHE,
  "jax_persistent_cache_min_compile_time_secs": 0,
  "jax_persistent_cache_min_entry_size_bytes": 0,
}
for name, value in CACHE_SETTINGS.items():
  os.environ[name.upper()] = str(value)
  jax.config.update(name, value)
# The C++ kernels (kstep_adam/_native.py) are built once for the session, not into the user's
# cache: the first test that needs one builds it, the others and their processes load it.
NATIVE_CACHE_NAME = "native-kernels"
os.environ.setdefault("KSTEP_ADAM_CACHE_DIR", os.path.join(SESSION_TMP, NATIVE_CACHE_NAME))
# torch (the optional peer's tests) makes its compile cache under the temp dir on import.
TORCH_CACHE_NAME = "torchinductor"
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(SESSION_TMP, TORCH_CACHE_NAME)
CACHES = {CACHE_NAME, TORCH_CACHE_NAME, NATIVE_CACHE_NAME}


# Test files that set up the shaped link: a link refuses to start beside another run's.
SHAPED_LINK_FILES = {"test_link.py", "test_link_experiment.py"}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """``--dist loadfile``, with every shaped-link test file in one scope (one worker)."""
  if config.getoption("dist") != "loadfile":
    return None
  from xdist.scheduler import LoadFileScheduling

  class LinkFilesTogether(LoadFileScheduling):
    def _split_scope(self, nodeid):
      path = super()._split_scope(nodeid)
      return "shaped-link" if os.path.basename(path) in SHAPED_LINK_FILES else path

  return LinkFilesTogether(config, log)


def _leftovers(directory: str) -> list[str]:
  """What tests left in a session directory, and in those of its xdist workers, named
  relative to it (pytest's ``tmp_path`` base and the caches are not leftovers)."""
  left = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if name.startswith("pytest-of-") or name in CACHES:
      continue
    if name.startswith(SESSION_PREFIX) and os.path.isdir(path):  # a worker's, kept on a leak
      left += [os.path.join(name, inner) for inner in _leftovers(path)] or [name]
    else:
      left.append(name)
  return left


def pytest_sessionfinish(session, exitstatus):
  left = _leftovers(SESSION_TMP)
  if left:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = f"tests left temporary files behind in {SESSION_TMP}: {left}"
    if reporter is not None:
      reporter.write(f"\n{message}\n", red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
  elif exitstatus == pytest.ExitCode.OK or set(os.listdir(SESSION_TMP)) <= CACHES:
    shutil.rmtree(SESSION_TMP, ignore_errors=True)  # a failed run keeps its tmp_path dirs
