"""The demo (the interim main job) runs end to end on a shrunken config."""

import json

from experiments import demo


def test_demo_quick_run_reports_fewer_inter_node_bytes_than_ddp(tmp_path):
  out = tmp_path / "summary.json"
  summary = demo.main(["--quick", "--k-node", "4", "--k-local", "2", "--out", str(out)])
  kstep, ddp = (v for k, v in summary.items() if isinstance(v, dict))
  assert kstep["merges"] == {"node": 10, "local": 10}  # 40 steps: node every 4, local at 2 mod 4.
  assert 0 < kstep["bytes_by_axis"]["node"] < ddp["bytes_by_axis"]["node"]
  assert kstep["seconds"] < ddp["seconds"]
  assert json.loads(out.read_text())["steps"] == 40
