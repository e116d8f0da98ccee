"""Sphinx configuration: the markdown pages (MyST) and an API reference from the docstrings.

Build (CI does, with warnings as errors, so a broken cross-reference fails it):
  pip install -e '.[docs]'
  python -m sphinx -W -n -b html docs runs/docs-html
"""

import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "kstep_adam"
author = "kstep_adam contributors"
copyright = "the kstep_adam contributors"
extensions = [
  "sphinx.ext.autodoc",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "pending/**"]
myst_enable_extensions = ["dollarmath"]
myst_heading_anchors = 3
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "none"  # the docstrings say the types; annotations name optax/jax internals
autodoc_member_order = "bysource"
html_theme = "alabaster"
html_static_path: list[str] = []
suppress_warnings = ["myst.xref_missing"] if os.environ.get("DOCS_LENIENT") else []

# Names outside this project that docstrings mention as cross-references.
nitpick_ignore_regex = [
  ("py:.*", r"(optax|jax|jnp|np|numpy|flax|nnx|tensorstore|pyarrow|concurrent|collections)\..*"),
  # Private modules and helpers that public docstrings point at for readers of the source;
  # they are not in the reference. Listed by name, so that any other broken one still fails.
  ("py:.*", r"(kstep_adam\.)?(ctr\.|embedding\.)?((data|train|run)\.)?_[a-z_]+(\.\w+)*"),
]
nitpick_ignore = [
  ("py:class", name)
  for name in ("RunDirectory", "CommMeter", "DivergenceMonitor", "ReadPosition", "HookView")
] + [
  ("py:func", name)
  for name in ("positioned_epoch", "declared_merge", "powers", "adam_params", "host_device_traffic")
]

# `.. public-api:: MODULE` expands to one autodoc entry per name in MODULE.__all__, so the
# reference covers every public name by construction.
PUBLIC_API = ".. public-api:: "


def _entries(module_name: str) -> str:
  module = importlib.import_module(module_name)
  lines = [f".. currentmodule:: {module_name}", ""]
  for name in module.__all__:
    obj = getattr(module, name)
    full = f"{module_name}.{name}"
    if isinstance(obj, type(sys)):
      lines += [f"See :mod:`{obj.__name__}` below.", ""]
    elif isinstance(obj, type):
      lines += [f".. autoclass:: {full}", "   :members:", ""]
    elif callable(obj):
      lines += [f".. autofunction:: {full}", ""]
    else:
      lines += [f".. autodata:: {full}", "   :annotation:", ""]
  return "\n".join(lines)


def _expand(app, docname, source):
  text = source[0]
  if PUBLIC_API not in text:
    return
  out = []
  for line in text.splitlines():
    if line.startswith(PUBLIC_API):
      out.append(_entries(line[len(PUBLIC_API) :].strip()))
    else:
      out.append(line)
  source[0] = "\n".join(out) + "\n"


def setup(app):
  app.connect("source-read", _expand)
