"""Two processes x two CPU devices (gloo), started by ``kstep_adam.launch``: the harness and
the hierarchical merge across processes match the NumPy reference."""

import _numpy_reference as ref
import numpy as np
from _runs import init_params
from _runs import launch_two_processes
from _runs import theta_of
from _runs import worker_data


def test_two_processes_match_numpy(tmp_path):
  done = launch_two_processes("_multiprocess_worker.py", tmp_path)
  assert done.returncode == 0, done.stdout[-3000:]
  got = np.concatenate([np.load(tmp_path / f"rank{r}.npy") for r in (0, 1)], axis=1)
  want = ref.kstep_adam(
    theta_of(init_params()), worker_data(4, 5), num_nodes=2, lr=0.05, periods={"params": (3, 1)}
  )
  np.testing.assert_allclose(got, np.stack(want), rtol=1e-4, atol=2e-5)
