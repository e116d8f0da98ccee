"""Opening a run (run/_context): one place chooses one process or several; hooks see a narrow view.

The multi-process layout itself runs in test_multiprocess_ctr.py; here the choice is checked
through what it returns, with a ``Processes`` of two made up (nothing connects).
"""

import ast
import dataclasses
import os
from pathlib import Path

import pytest

from kstep_adam import ctr
from kstep_adam._distributed import Processes
from kstep_adam.ctr.run._context import check_processes
from kstep_adam.ctr.run._context import open_run
from kstep_adam.ctr.run._context import prepare_run
from kstep_adam.ctr.train._hooks import HookView
from kstep_adam.ctr.train._steppers import LocalStepper

ROOT = Path(__file__).resolve().parents[1]
ONE, TWO = Processes(0, 1), Processes(1, 2)


def _small(**overrides):
  base = dict(batch_size=16, steps=4, k=2, table_rows=1 << 14, host_cache_rows=1 << 12)
  config = ctr.TrainConfig(**{**base, "log_every": 2, "eval_every": 0, **overrides})
  data = ctr.DataConfig(vocab_size=20, test_examples=256)
  return config, ctr.make_source(data, config)


def test_one_process_accepts_what_several_refuse():
  config = ctr.TrainConfig(nodes=1, device_cache_rows=4096)
  check_processes(config, ONE)
  with pytest.raises(ValueError, match="--nodes 1 with 2 processes: the 'node' axis spans"):
    check_processes(config, TWO)
  with pytest.raises(ValueError, match="device_cache_rows=4096 with processes=2"):
    check_processes(dataclasses.replace(config, nodes=2), TWO)


def test_prepare_run_cuts_the_source_for_several_processes_only(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config, source = _small(nodes=2, devices_per_node=2)
  whole, out = prepare_run(config, source, "rel out", ONE)
  assert whole is source and out == os.path.join(str(tmp_path), "rel out")
  part, _ = prepare_run(config, source, None, TWO)
  assert part.part == (1, 2)
  assert prepare_run(config, part, out, TWO) == (part, out)  # again: the same


def test_no_branch_on_the_number_of_processes_outside_the_context():
  """The trainer, the loop and the steppers never ask how many processes run: the context's
  layout chose their objects. (The check reads the source, as test_layout does.)"""
  for rel in ("run/_trainer.py", "train/_loop.py", "train/_steppers.py"):
    tree = ast.parse((ROOT / "kstep_adam" / "ctr" / rel).read_text())
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute):
        owner = ast.unparse(node.value).rsplit(".", 1)[-1]
        names.add(f"{owner}.{node.attr}" if node.attr == "count" else node.attr)
    assert not {"sharded", "processes.count", "process_count"} & names, rel


def test_open_run_opens_a_one_process_run_and_closes_it(tmp_path):
  config, source = _small(checkpoint_every=2)
  with open_run(config, source, ctr.make_optimizer(config), str(tmp_path / "out")) as run:
    assert isinstance(run.stepper, LocalStepper) and run.gather is None
    assert run.table_dir == os.path.join(str(tmp_path), "out", "table")
    assert run.start_step == 0 and run.num_steps == 4 and run.run_state is None
    metrics = run.metrics_file
  assert metrics.closed


class _Seen(ctr.Hook):
  def __init__(self):
    self.views = []

  def after_step(self, run, result):
    self.views.append(run)
    if result.step == 2:
      run.log({"kind": "seen", "step": result.step})
      run.evaluate(test=not run.has_val_set)


def test_hooks_see_the_documented_view_only(tmp_path):
  fields = HookView.__doc__.split("Attributes:")[1]
  documented = [line.split(":")[0].strip() for line in fields.splitlines() if ": " in line]
  assert list(HookView._fields) == [name for name in documented if name in HookView._fields]
  assert set(HookView._fields) <= set(documented)
  config, source = _small()
  seen = _Seen()
  with ctr.Trainer(config, source, ctr.make_optimizer(config), str(tmp_path)) as trainer:
    trainer.fit([seen])
  view = seen.views[0]
  assert all(v is view for v in seen.views)  # one view per fit
  assert type(view) is HookView and not hasattr(view, "tier")
  assert view.config is config and view.processes.count == 1 and 0 <= view.hit_rate() <= 1
  assert [e["step"] for e in trainer.evals] == [2]
  with open(tmp_path / "metrics.jsonl") as f:
    assert '"kind": "seen"' in f.read().replace('":"', '": "')
