"""Sweep tables and figures say what they measured: one seed has no spread, and every optimizer
is told apart (its own hue; each k its own shade and marker)."""

import colorsys
import os
import types

import matplotlib.colors
import matplotlib.text
import pytest

from experiments import sweep
from experiments.paper import table as paper_table
from experiments.plot import __main__ as plot_main
from experiments.plot import _style
from experiments.plot import sweep as sweep_plot
from experiments.sweep_lib import select

ONE_SEED_SWEEP = """
name = "one_seed"
task = "convergence"
seeds = [0]
reference = "sync"

[base]
problem = { kind = "separable", d = 4 }
workers = 2
steps = 8
log_every = 4

[[optimizers]]
name = "sync"
variant = "sync_adam"
learning_rate = [0.03, 0.1]

[[optimizers]]
name = "sgd"
variant = "local_sgd"
k = [2, 4]
learning_rate = 0.1
"""


@pytest.fixture(scope="module")
def one_seed_sweep(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("one_seed")
  (tmp / "one_seed.toml").write_text(ONE_SEED_SWEEP)
  out = str(tmp / "out")
  assert sweep.main([str(tmp / "one_seed.toml"), "--out", out, "--jobs", "2"]) == 0
  return out


def test_a_one_seed_table_says_no_spread_instead_of_plus_minus_zero(one_seed_sweep):
  with open(os.path.join(one_seed_sweep, "table.md"), encoding="utf-8") as f:
    table = f.read()
  assert "1 seed: no spread" in table
  assert "±" not in table and "std" not in table


def test_one_seed_figures_say_no_spread_in_titles_and_labels(one_seed_sweep, tmp_path, monkeypatch):
  texts = []
  save = _style.save

  def record(fig, path):
    texts.extend(t.get_text() for t in fig.findobj(matplotlib.text.Text))
    return save(fig, path)

  monkeypatch.setattr(_style, "save", record)
  assert plot_main.draw(one_seed_sweep, str(tmp_path))
  joined = "\n".join(texts)
  assert "1 seed: no spread" in joined
  assert "±" not in joined and "std" not in joined


def _selections(names_and_ks):
  rows = [
    dict(run_id=f"{n}-{k}", name=n, seed=0, status="completed", k=k, learning_rate=0.1, loss=1.0)
    for n, k in names_and_ks
  ]
  return select.select(
    rows,
    group_by=["k"],
    tune=["learning_rate"],
    metric="loss",
    report="loss",
    higher_is_better=False,
  )


def _hue(rgb):
  return colorsys.rgb_to_hsv(*matplotlib.colors.to_rgb(rgb))[0]


def test_each_optimizer_has_its_own_hue_and_each_k_its_own_shade_and_marker():
  names = ["ref"] + [f"opt{i}" for i in range(9)]
  chosen = _selections([("ref", None), *((n, k) for n in names[1:] for k in (4, 16, 64))])
  palette, marks = sweep_plot.colors(chosen, "ref"), sweep_plot.markers(chosen)
  assert palette["ref"] == matplotlib.colors.to_rgb("black")
  base = {n: palette[f"{n}, k=16"] for n in names[1:]}  # the middle shade of each optimizer
  assert len(set(base.values())) == len(base)  # nine optimizers, nine colors
  for n in names[1:]:
    shades = [palette[f"{n}, k={k}"] for k in (4, 16, 64)]
    assert len(set(shades)) == 3  # each k its own shade ...
    assert max(abs(_hue(s) - _hue(shades[1])) for s in shades) < 0.02  # ... of one hue
    assert len({marks[f"{n}, k={k}"] for k in (4, 16, 64)}) == 3  # and its own marker
  for k in (4, 16, 64):  # the same k has the same marker in every optimizer
    assert len({marks[f"{n}, k={k}"] for n in names[1:]}) == 1


def test_an_adaptive_period_beside_fixed_ones_gets_its_own_shade_and_marker():
  """Regression: k = 'auto' beside integer k made the colors' and markers' sort fail."""
  chosen = _selections([("ref", None), *(("kstep_adam", k) for k in (4, "auto", 16))])
  palette, marks = sweep_plot.colors(chosen, "ref"), sweep_plot.markers(chosen)
  labels = [f"kstep_adam, k={k}" for k in (4, 16, "auto")]
  assert len({palette[label] for label in labels}) == 3
  assert len({marks[label] for label in labels}) == 3


@pytest.mark.parametrize("seeds", [1, 5])
def test_the_paper_table_shows_a_spread_only_over_several_seeds(seeds):
  pair = (0.7, 0.01 if seeds > 1 else 0.0)
  row = dict(
    optimizer="sync_adam",
    variant="grads",
    k=1,
    auc=pair,
    d_auc_vs_k1=pair,
    d_auc_vs_sync=pair,
    logloss=pair,
    d_logloss_vs_k1=pair,
    node_bytes=1e6,
    dense_seconds=0.1,
    sparse_seconds=0.1,
    seeds=seeds,
    steps=96,
    teacher_auc=0.8,
  )
  cfg = types.SimpleNamespace(slow_inter_node_gbps=1.0, batch_size=32)
  text = paper_table.markdown([row], cfg)
  if seeds == 1:
    assert "1 seed: no spread" in text and "±" not in text
  else:
    assert "± 0.0100" in text and "5 seeds" in text
