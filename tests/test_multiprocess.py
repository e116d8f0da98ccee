"""Two processes x two CPU devices (gloo): the harness and the hierarchical merge across
processes match the NumPy reference. Slow: starts two fresh Python processes."""

import os
import socket
import subprocess
import sys

import _numpy_reference as ref
import numpy as np
import pytest
from _runs import init_params
from _runs import theta_of
from _runs import worker_data

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_numpy(tmp_path):
  port = str(_free_port())
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        os.path.join(HERE, "_multiprocess_worker.py"),
        str(rank),
        port,
        str(tmp_path / f"rank{rank}.npy"),
      ],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for rank in (0, 1)
  ]
  for p in procs:
    out, _ = p.communicate(timeout=240)
    assert p.returncode == 0, out.decode()[-3000:]
  got = np.concatenate([np.load(tmp_path / f"rank{r}.npy") for r in (0, 1)], axis=1)
  want = ref.kstep_adam(
    theta_of(init_params()), worker_data(4, 5), num_nodes=2, lr=0.05, periods={"params": (3, 1)}
  )
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=2e-5)
