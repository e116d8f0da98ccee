"""Command lines generated from frozen config dataclasses: one source for defaults and help.

Every experiment's configuration is a frozen dataclass whose docstring has an ``Attributes:``
section. :func:`add_config_args` turns its fields into ``--flags`` (``learning_rate`` becomes
``--learning-rate``; short aliases such as ``--lr`` are opt-in), with the field's type, default,
allowed choices (``dataclasses.field(metadata={"choices": ...})``) and the docstring's text as
help. A ``tuple[int, ...]`` (or ``float``, ``str``) field takes one or more values
(``--ks 1 8 64``). :func:`config_from_args` builds the config back, so the dataclass's own validation runs on
whatever the user typed. Nothing is declared twice.

:func:`user_errors` is every entry point's error policy: an error the user can cause (a
missing or unreadable file, a corrupt one, a refused value, a full disk) ends the program with
one line on stderr that names the file and what to do, and exit status 1; ``--debug``
(:func:`add_debug_flag`) or ``KSTEP_ADAM_DEBUG=1`` shows the traceback instead. Any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import functools
import os
import re
import signal
import sys
import types
import typing
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping

# Set to 1 to see the traceback of a user error (as --debug does).
DEBUG_ENV = "KSTEP_ADAM_DEBUG"
# The exit status of a user error.
USER_ERROR_EXIT_STATUS = 1

# What to do about an OSError, by errno.
_OS_ERROR_ADVICE = {
  errno.ENOSPC: "the disk is full: free space, then run the same command again (a run saving "
  "checkpoints continues with --resume)",
  errno.EDQUOT: "the disk quota is used up: free space, then run the same command again",
  errno.EROFS: "the file system is read-only: choose a writable place",
  errno.EACCES: "check the file's permissions",
  errno.EPERM: "check the file's permissions",
  errno.ENOENT: "check the path",
  errno.ENOTDIR: "a part of the path is a file, not a directory: check the path",
  errno.EISDIR: "it is a directory: name a file",
  errno.ELOOP: "a loop of symbolic links: check the path",
  errno.ENAMETOOLONG: "shorten the path",
}


def field_docs(cls: type) -> dict[str, str]:
  """The one-paragraph description of each field in ``cls``'s ``Attributes:`` docstring section.

  Examples:
    >>> @dataclasses.dataclass(frozen=True)
    ... class C:
    ...   '''A config.
    ...
    ...   Attributes:
    ...     lr: learning rate,
    ...       a float.
    ...   '''
    ...   lr: float = 0.1
    >>> field_docs(C)
    {'lr': 'learning rate, a float.'}
  """
  doc = cls.__doc__ or ""
  match = re.search(r"^(\s*)Attributes:\s*$", doc, flags=re.MULTILINE)
  if not match:
    return {}
  docs: dict[str, list[str]] = {}
  current, entry_indent = None, None
  for line in doc[match.end() :].splitlines():
    if not line.strip():
      continue
    indent = len(line) - len(line.lstrip())
    if entry_indent is None:
      entry_indent = indent
    if indent < entry_indent:
      break
    m = re.match(r"\s*([A-Za-z_]\w*)\s*(?:\([^)]*\))?:\s*(.*)$", line)
    if indent == entry_indent and m:
      current = m.group(1)
      docs[current] = [m.group(2)]
    elif current is not None:
      docs[current].append(line.strip())
  # Help text is plain text: drop reST literal markup; argparse reads % as a format.
  return {
    name: " ".join(parts).strip().replace("``", "").replace("%", "%%")
    for name, parts in docs.items()
  }


def int_or_str(text: str) -> int | str:
  """An ``int | str`` field's flag value: an int when it reads as one (``--k 8``), else the
  word (``--k auto``)."""
  try:
    return int(text)
  except ValueError:
    return text


def _base_type(hint) -> tuple[type, bool]:
  """``(type, optional)`` for ``int``, ``float``, ``str``, ``bool``, ``int | str`` and
  ``X | None``."""
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if set(args) == {int, str} and len(args) == 2:
      return int_or_str, False
    if len(args) == 1:
      return args[0], True
    raise TypeError(f"unsupported config field type {hint!r}")
  return hint, False


def _optional(parse):
  def parse_optional(text: str):
    return None if text.lower() == "none" else parse(text)

  parse_optional.__name__ = getattr(parse, "__name__", "value")
  return parse_optional


class _StoreTuple(argparse.Action):
  """Store the values of an ``nargs="+"`` flag as a tuple, as the config field holds them."""

  def __call__(self, parser, namespace, values, option_string=None):
    setattr(namespace, self.dest, tuple(values))


def _tuple_item_type(hint) -> type | None:
  """``X`` for ``tuple[X, ...]`` with X in int, float, str; None for any other type."""
  args = typing.get_args(hint)
  if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
    return args[0] if args[0] in (int, float, str) else None
  return None


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Help that shows each flag's default, except where there is nothing to show (None, or an
  on/off switch that is off)."""

  def _get_help_string(self, action):
    if action.default is None or (action.nargs == 0 and action.default is False):
      return action.help
    return super()._get_help_string(action)


def flag_name(field_name: str) -> str:
  """``learning_rate`` -> ``--learning-rate``."""
  return "--" + field_name.replace("_", "-")


def config_flags(fields: Mapping[str, object]) -> list[str]:
  """The flags :func:`add_config_args` parses back into these field values (its inverse), e.g.
  to start a recorded run's configuration as a command.

  Examples:
    >>> config_flags({"top_mlp": [8, 4], "learning_rate": 0.001, "prefetch": False, "k": None})
    ['--top-mlp', '8', '4', '--learning-rate', '0.001', '--no-prefetch', '--k', 'none']
  """
  flags = []
  for name, value in fields.items():
    if isinstance(value, bool):
      flags.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
    elif isinstance(value, (list, tuple)):
      flags += [flag_name(name), *map(str, value)]
    else:
      flags += [flag_name(name), "none" if value is None else str(value)]
  return flags


def add_config_args(
  parser: argparse.ArgumentParser | argparse._ArgumentGroup,
  cls: type,
  *,
  aliases: Mapping[str, Iterable[str]] | None = None,
  exclude: Iterable[str] = (),
  defaults: Mapping[str, object] | None = None,
) -> None:
  """Add one ``--flag`` per field of the dataclass ``cls`` to ``parser``.

  Args:
    parser: a parser or an argument group.
    cls: a dataclass whose fields are ``int``, ``float``, ``str``, ``bool``, ``X | None`` or
      ``tuple[X, ...]``.
    aliases: extra flag spellings per field, e.g. ``{"learning_rate": ["--lr"]}``.
    exclude: fields that get no flag (set by the program itself).
    defaults: defaults that differ from the dataclass's (e.g. a quicker entry point).

  Raises:
    TypeError: a field has a type this generator does not handle.

  Examples:
    >>> @dataclasses.dataclass(frozen=True)
    ... class Grid:
    ...   '''A grid.
    ...
    ...   Attributes:
    ...     ks: merge periods.
    ...     steps: steps per run.
    ...   '''
    ...   ks: tuple[int, ...] = (1, 8)
    ...   steps: int = 100
    >>> parser = argparse.ArgumentParser()
    >>> add_config_args(parser, Grid, aliases={"steps": ["-n"]})
    >>> config_from_args(Grid, parser.parse_args(["--ks", "2", "4", "-n", "7"]))
    Grid(ks=(2, 4), steps=7)
    >>> config_from_args(Grid, parser.parse_args([]))
    Grid(ks=(1, 8), steps=100)
  """
  aliases = dict(aliases or {})
  defaults = dict(defaults or {})
  docs = field_docs(cls)
  hints = typing.get_type_hints(cls)
  for field in dataclasses.fields(cls):
    if field.name in exclude or not field.init:
      continue
    base, optional = _base_type(hints[field.name])
    default = defaults.get(field.name, field.default)
    if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
      default = field.default_factory()
    names = [flag_name(field.name), *aliases.get(field.name, ())]
    kwargs: dict = {"dest": field.name, "default": default, "help": docs.get(field.name, "")}
    item_type = _tuple_item_type(base)
    if base is bool:
      kwargs["action"] = argparse.BooleanOptionalAction
    elif item_type is not None:
      kwargs.update(nargs="+", type=item_type, action=_StoreTuple)
      kwargs["metavar"] = item_type.__name__.upper()
    elif base in (int, float, str):
      kwargs["type"] = _optional(base) if optional else base
      kwargs["metavar"] = base.__name__.upper() + ("|none" if optional else "")
    elif base is int_or_str:
      kwargs.update(type=int_or_str, metavar="INT|WORD")
    else:
      raise TypeError(f"{cls.__name__}.{field.name}: unsupported type {hints[field.name]!r}")
    if "choices" in field.metadata and base is not bool:
      kwargs["choices"] = tuple(field.metadata["choices"])
      kwargs.pop("metavar")
    parser.add_argument(*names, **kwargs)


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
  """Build ``cls`` from the parsed flags (fields without a flag keep their default)."""
  values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
  values.update(overrides)
  return cls(**values)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
  """``--debug``: show the traceback of an error instead of its one line."""
  parser.add_argument(
    "--debug",
    action="store_true",
    help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)",
  )


def debug_requested(argv: list[str] | None) -> bool:
  """Whether ``--debug`` is among the arguments or :data:`DEBUG_ENV` is set (not 0)."""
  argv = sys.argv[1:] if argv is None else argv
  return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(error: BaseException) -> str:
  """The message of a user error on one line; an OSError names its file and what to do.

  Examples:
    >>> one_line(FileNotFoundError(errno.ENOENT, "No such file or directory", "a.json"))
    'a.json: No such file or directory; check the path'
    >>> one_line(ValueError("bad\\nvalue"))
    'bad value'
  """
  if isinstance(error, OSError) and error.strerror:
    where = f"{error.filename}: " if error.filename is not None else ""
    advice = _OS_ERROR_ADVICE.get(error.errno)
    text = f"{where}{error.strerror}" + (f"; {advice}" if advice else "")
  else:
    text = str(error) or type(error).__name__
  return " ".join(text.split())


@contextlib.contextmanager
def user_errors_reported(prog: str, *, debug: bool = False):
  """Within the block, a user error (OSError, ValueError: missing, unreadable, corrupt files,
  refused values, a full disk) exits with :data:`USER_ERROR_EXIT_STATUS` after one line on
  stderr, ``PROG: error: MESSAGE``, and Ctrl-C with 130 after one line; with ``debug`` they
  propagate with their traceback."""
  try:
    yield
  except (OSError, ValueError) as error:
    if debug:
      raise
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    sys.exit(USER_ERROR_EXIT_STATUS)
  except Exception as error:
    from kstep_adam.ctr.run._interrupt import RunInterrupted  # a CTR run stopped by a signal

    if debug or not isinstance(error, RunInterrupted):
      raise
    print(f"{prog}: {error}; run the same command again to continue", file=sys.stderr)
    sys.exit(error.exit_status)
  except KeyboardInterrupt:  # Ctrl-C outside a training loop (which stops at a step boundary)
    if debug:
      raise
    print(f"{prog}: interrupted (SIGINT)", file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


def user_errors(prog: str) -> Callable:
  """Decorate an entry point's ``main(argv=None)`` with :func:`user_errors_reported` (debug
  from :func:`debug_requested`); its parser should have :func:`add_debug_flag`."""

  def decorate(main):
    @functools.wraps(main)
    def wrapped(argv=None, *args, **kwargs):
      with user_errors_reported(prog, debug=debug_requested(argv)):
        return main(argv, *args, **kwargs)

    return wrapped

  return decorate
