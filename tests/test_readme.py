"""The README's and docs' commands run as written.

Every fenced code block of README.md is marked in the source by the HTML comment on the line
above it: ``<!-- runnable -->`` blocks run here in full (each takes seconds; outputs go to
``runs/``), ``<!-- long: why -->`` blocks (installs, runs of minutes or hours) are exempt.
Every ``python -m experiments.X`` / ``kstep_adam.X`` command of the README and of docs/, long
ones included, is checked cheaply: the module exists and its ``--help`` lists every flag the
command passes.
"""

import functools
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENCE = re.compile(
  r"^(<!--\s*(?P<mark>[^>]*?)\s*-->\n)?```(?P<lang>\w*)\n(?P<body>.*?)^```$", re.M | re.S
)
PROJECT_MODULE = re.compile(r"^(experiments|kstep_adam)(\.\w+)*$")


def _read(path):
  with open(os.path.join(REPO, path), encoding="utf-8") as f:
    return f.read()


def _blocks(path):
  """``(mark, lang, body)`` of every fenced block; mark is '' when unmarked."""
  return [(m["mark"] or "", m["lang"], m["body"]) for m in FENCE.finditer(_read(path))]


def _commands(body):
  """The block's command lines: continuations joined, comments and blanks dropped."""
  joined = body.replace("\\\n", " ")
  lines = [line.split(" #")[0].strip() for line in joined.splitlines()]
  return [line for line in lines if line and not line.startswith("#")]


def _env():
  return dict(os.environ, PYTHONPATH=REPO)


def test_every_readme_block_says_whether_it_runs_here():
  blocks = _blocks("README.md")
  assert blocks
  for mark, _, body in blocks:
    assert mark == "runnable" or mark.startswith("long:"), f"unmarked block:\n{body}"


RUNNABLE = [(lang, body) for mark, lang, body in _blocks("README.md") if mark == "runnable"]


@pytest.mark.parametrize("lang,body", RUNNABLE, ids=[b.split("\n")[0][:60] for _, b in RUNNABLE])
def test_runnable_readme_blocks_run_as_written(lang, body):
  if lang == "python":
    argvs = [[sys.executable, "-c", body]]
  else:
    argvs = []
    for line in _commands(body):
      argv = shlex.split(line)
      assert argv[0] == ".venv/bin/python", line  # the README's interpreter: ours here
      argvs.append([sys.executable, *argv[1:]])
  for argv in argvs:
    proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{argv}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def _documented_commands():
  """``{module: {flags}}`` over every command in README.md and docs/*.md."""
  pages = ["README.md"] + [
    os.path.join("docs", n)
    for n in sorted(os.listdir(os.path.join(REPO, "docs")))
    if n.endswith(".md")
  ]
  out: dict[str, set[str]] = {}
  for page in pages:
    for _, lang, body in _blocks(page):
      if lang not in ("bash", "sh", ""):
        continue
      for line in _commands(body):
        # Each `python -m MODULE` of the line (a launcher's `-- python -m ...` is another):
        # its flags run up to a bare `--` or the next command.
        for segment in line.split("python -m ")[1:]:
          tokens = segment.split()
          if not tokens or not PROJECT_MODULE.match(tokens[0]):
            continue
          flags = out.setdefault(tokens[0], set())
          for token in tokens[1:]:
            if token == "--":
              break
            if token.startswith("--"):
              flags.add(token.split("=")[0])
  return out


@functools.cache
def _help(module):
  proc = subprocess.run(
    [sys.executable, "-m", module, "--help"],
    cwd=REPO,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=120,
  )
  return proc.returncode, proc.stdout + proc.stderr


COMMANDS = sorted(_documented_commands().items())


@pytest.mark.parametrize("module,flags", COMMANDS, ids=[m for m, _ in COMMANDS])
def test_documented_commands_name_real_modules_and_flags(module, flags):
  status, text = _help(module)
  assert status == 0, f"python -m {module} --help failed:\n{text[-2000:]}"
  missing = sorted(f for f in flags if not re.search(re.escape(f) + r"\b", text))
  assert not missing, f"python -m {module}: flags not in its --help: {missing}"
