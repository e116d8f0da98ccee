"""The package's layout holds what the tree promises (issue 19); read from the source, no imports.

- ``kstep_adam/ctr/`` is three rooms, imported one way: ``data`` <- ``train`` <- ``run`` <- the
  workflow. Its top level holds only ``__init__``, ``_workflow`` and the NumPy-only leaf
  ``_metrics``, which imports no other CTR module.
- No module in ``kstep_adam/ctr/`` is over 400 lines.
- No import cycle among the package's modules (imports inside functions count, imports under
  ``if TYPE_CHECKING:`` do not).
- No module uses another module's private name (``from m import _x`` or ``m._x``): what two
  modules share is a documented helper of the module that owns it. Tests and scripts are held to
  this for the CTR package only (white-box tests of the core's internals are left alone).
- The public ``kstep_adam.ctr`` API does not change.

``ALLOWED`` lists the violations the tree still has; the test fails on a new one and on an entry
that no longer applies, so each fix removes its entry.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "kstep_adam"
MAX_LINES = 400
ROOMS = {"data": 0, "train": 1, "run": 2}  # a module may import only from its room or lower ones
CTR_TOP = {"kstep_adam.ctr", "kstep_adam.ctr._workflow", "kstep_adam.ctr._metrics"}
CTR_LEAF = "kstep_adam.ctr._metrics"
SCANNED = ("kstep_adam", "tests", "experiments", "benchmarks", "examples", "theory")

CTR_ALL = [
  "CTRBatch",
  "CTRDataError",
  "CTRFileReader",
  "DCNv2",
  "DLRM",
  "DataConfig",
  "DataSource",
  "DivergenceError",
  "Hook",
  "MODELS",
  "MetricsLog",
  "PeriodicEval",
  "ProgressBar",
  "PushedRows",
  "ReadStats",
  "RunDirectoryError",
  "RunInterrupted",
  "StepResult",
  "SyntheticCTR",
  "TrainConfig",
  "Trainer",
  "auc",
  "batches_source",
  "concat_batches",
  "count_lines",
  "feature_keys",
  "file_source",
  "logloss",
  "make_model",
  "make_optimizer",
  "make_source",
  "summarize",
  "synthetic_source",
  "train",
]

ALLOWED: set[str] = set()


def _module_name(path: Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, Path]:
  return {_module_name(p): p for p in sorted((ROOT / PACKAGE).rglob("*.py"))}


MODULES = _package_modules()


def _resolve(importer: str, is_package: bool, level: int, module: str | None) -> str:
  if not level:
    return module or ""
  base = importer.split(".")
  base = base if is_package else base[:-1]
  base = base[: len(base) - (level - 1)]
  return ".".join(base + ([module] if module else []))


def _is_type_checking(test: ast.expr) -> bool:
  return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
  )


def _runtime_nodes(tree: ast.AST):
  """Every node except those under ``if TYPE_CHECKING:``."""
  stack = [tree]
  while stack:
    node = stack.pop()
    yield node
    for child in ast.iter_child_nodes(node):
      if isinstance(child, ast.If) and _is_type_checking(child.test):
        stack.extend(child.orelse)
      else:
        stack.append(child)


class _Module:
  """One file's imports: the package modules it imports and the private names it uses."""

  def __init__(self, path: Path):
    self.path = path
    self.name = _module_name(path)
    self.tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    self.imports: set[str] = set()  # package modules (not packages) imported at run time
    self.private: set[str] = set()  # "module._name" of other modules
    aliases: dict[str, str] = {}  # local name -> package module it is bound to
    for node in _runtime_nodes(self.tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split(".")[0] == PACKAGE:
            self._add(alias.name)
            if alias.asname:
              aliases[alias.asname] = alias.name
      elif isinstance(node, ast.ImportFrom):
        source = _resolve(self.name, is_package, node.level, node.module)
        if source.split(".")[0] != PACKAGE:
          continue
        self._add(source)
        for alias in node.names:
          full = f"{source}.{alias.name}"
          if full in MODULES:  # a submodule
            self._add(full)
            aliases[alias.asname or alias.name] = full
          elif _is_private(alias.name) and source != self.name:
            self.private.add(full)
    for node in ast.walk(self.tree):
      if isinstance(node, ast.Attribute) and _is_private(node.attr):
        target = _dotted(node.value, aliases)
        if target in MODULES and target != self.name:
          self.private.add(f"{target}.{node.attr}")

  def _add(self, name: str) -> None:
    if name in MODULES and MODULES[name].name != "__init__.py" and name != self.name:
      self.imports.add(name)


def _is_private(name: str) -> bool:
  return name.startswith("_") and not name.startswith("__")


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
  if isinstance(node, ast.Name):
    return aliases.get(node.id, node.id if node.id in MODULES else None)
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value, aliases)
    return f"{base}.{node.attr}" if base else None
  return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph.get(v, ())):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def _room(name: str) -> int | None:
  """Where a CTR module sits: -1 the leaf, 0..2 the rooms, 3 the workflow; None outside ctr."""
  parts = name.split(".")
  if parts[:2] != ["kstep_adam", "ctr"]:
    return None
  if name == CTR_LEAF:
    return -1
  return ROOMS.get(parts[2], 3) if len(parts) > 2 else 3


def _violations() -> set[str]:
  found = set()
  package = {name: _Module(path) for name, path in MODULES.items()}
  for name, module in package.items():
    rel = module.path.relative_to(ROOT).as_posix()
    if name.startswith("kstep_adam.ctr"):
      if len(module.path.read_text().splitlines()) > MAX_LINES:
        found.add(f"size: {rel}")
      if _room(name) == 3 and name not in CTR_TOP:
        found.add(f"flat: {rel}")
      for target in module.imports:
        room, target_room = _room(name), _room(target)
        if target_room is not None and target_room > room:
          found.add(f"layer: {name} imports {target}")
  for component in _cycles({name: module.imports for name, module in package.items()}):
    found.add("cycle: " + ", ".join(component))
  for top in SCANNED:
    for path in sorted((ROOT / top).rglob("*.py")):
      if top == PACKAGE:
        module = package[_module_name(path)]
        who, private = module.name, module.private
      else:
        who = path.relative_to(ROOT).as_posix()
        private = {n for n in _Module(path).private if n.startswith("kstep_adam.ctr.")}
      found |= {f"private: {who} uses {name}" for name in private}
  return found


def test_layout_has_only_the_allowed_violations():
  found = _violations()
  assert sorted(found - ALLOWED) == [], "new violations"
  assert sorted(ALLOWED - found) == [], "fixed: remove these from ALLOWED"


def test_public_ctr_api_is_unchanged():
  tree = ast.parse((ROOT / "kstep_adam" / "ctr" / "__init__.py").read_text())
  (names,) = [
    ast.literal_eval(node.value)
    for node in tree.body
    if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
  ]
  assert sorted(names) == CTR_ALL
