"""The C++ kernels' build: a cache keyed by what went in, atomic, at paths as users type them,
and every failure either named (required, or a broken source) or a warned fallback (auto)."""

import ctypes
import os

import pytest

from kstep_adam import _native

SOURCE = 'extern "C" int Answer() { return %d; }\n'


def _source(directory, name="answer.cc", value=42):
  directory.mkdir(parents=True, exist_ok=True)
  path = directory / name
  path.write_text(SOURCE % value)
  return path


@pytest.mark.parametrize("where", ["a dir with spaces", "link"])
def test_a_kernel_builds_once_into_its_cache_and_loads(tmp_path, where):
  source = _source(tmp_path / "src dir")
  target = tmp_path / where
  if where == "link":  # the cache directory reached through a symlink
    (tmp_path / "real").mkdir()
    target.symlink_to(tmp_path / "real")
  library = _native.build(source, target)
  assert library.parent == target and library.name.startswith("answer-")
  assert ctypes.CDLL(str(library)).Answer() == 42
  built = library.stat().st_mtime_ns
  assert _native.build(source, target) == library  # the same inputs: no second build
  assert library.stat().st_mtime_ns == built
  assert os.listdir(target) == [library.name]  # no partial file left behind
  assert library.stat().st_mode & 0o777 == 0o755  # readable by the other users of a cache
  source.write_text(SOURCE % 7)  # a changed source is another library
  changed = _native.build(source, target)
  assert changed != library and ctypes.CDLL(str(changed)).Answer() == 7


def test_the_cache_directory_follows_the_environment(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("KSTEP_ADAM_CACHE_DIR", "relative cache")
  library = _native.build(_source(tmp_path / "src"))
  assert library.resolve().parent == tmp_path / "relative cache" / "kernels"
  monkeypatch.delenv("KSTEP_ADAM_CACHE_DIR")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert _native.cache_dir() == tmp_path / "xdg" / "kstep_adam" / "kernels"


def test_a_broken_source_or_a_missing_compiler_is_named(tmp_path, monkeypatch):
  broken = tmp_path / "broken.cc"
  broken.write_text("this is not C++\n")
  with pytest.raises(_native.NativeBuildError, match=r"compiling .*broken\.cc failed") as e:
    _native.build(broken, tmp_path / "cache")
  assert "broken.cc:1" in str(e.value)  # the compiler's own message, file and line
  assert os.listdir(tmp_path / "cache") == []  # no partial library
  monkeypatch.setenv("CXX", f"env {tmp_path / 'no-such-compiler'}")  # a command with arguments
  with pytest.raises(_native.NativeBuildError, match=r"no-such-compiler.* does not run"):
    _native.build(_source(tmp_path / "src"), tmp_path / "cache")


def test_the_switch_requires_falls_back_or_skips(tmp_path, monkeypatch):
  monkeypatch.setenv("KSTEP_ADAM_CACHE_DIR", str(tmp_path / "cache"))
  no_handler = _source(tmp_path / "src", "no_handler.cc")  # builds, lacks the handler
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "0")
  assert not _native.available(no_handler, ("Handler",))
  assert not (tmp_path / "cache").exists()  # off: nothing built
  monkeypatch.delenv("KSTEP_ADAM_NATIVE_KERNELS")
  with pytest.warns(
    RuntimeWarning, match=r"(?s)lacks the symbols \['Handler'\].*NumPy or XLA form instead"
  ):
    assert not _native.available(no_handler, ("Handler",))
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "1")
  with pytest.raises(_native.NativeBuildError, match="lacks the symbols"):
    _native.available(no_handler, ("Handler",))
  monkeypatch.setenv("KSTEP_ADAM_NATIVE_KERNELS", "maybe")
  with pytest.raises(ValueError, match=r"KSTEP_ADAM_NATIVE_KERNELS='maybe': must be 1"):
    _native.mode()
