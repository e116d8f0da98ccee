"""A plain or gzip text file read as blocks of whole lines, whole or one byte span of it.

Reading is by *blocks*: runs of whole lines of about ``block_bytes`` bytes, each cut at the
first line end at or after a multiple of ``block_bytes`` from the part's start, so every pass
over a part yields the same blocks however the bytes arrived.

A *part* is the lines that start inside a span ``[lo, hi)`` of the file's size **as stored**
(compressed bytes for gzip): a line belongs to the span that holds its first byte, so parts
``[0, 0.9)`` and ``[0.9, 1)`` are disjoint, complete and in file order (a time split of a
time-ordered log). For gzip, a line's "first byte" is placed by the decompressor's output: the
part from ``lo`` starts with the first line that starts at or after everything decompressed
from the first ``lo * size`` stored bytes, which depends on the compressed data only. A later
part of a plain file is reached by a seek; a later part of a gzip file by decompressing (not
parsing) what comes before it, once: the decompressor's state at the part's start is kept in
memory and later passes resume from it.

The file is read as it was when it was opened: never past the size it had then, so lines
appended to it meanwhile (a log still being written) enter no part, and every pass reads the
same lines.

Line numbers are 1-based physical lines of the whole file (a CSV header is line 1). For a
seeked part they are counted only when first asked for (an error message), by one scan of
the bytes before it.

A pass can also start at a block that an earlier pass yielded (``blocks(..., start=(offset,
index))``, e.g. to resume training from a checkpoint): the blocks from there are the same as
that pass's. A plain file seeks to it; a gzip file is decompressed (not parsed) up to it.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import zlib
from collections.abc import Iterator

GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"
_PLAIN_READ = 1 << 20  # bytes per read of a plain file
_GZIP_READ = 1 << 16  # compressed bytes per read of a gzip file
MAX_LINE_BYTES = 1 << 26  # a longer line is no CTR record (a binary file, a foreign newline)
_NOT_FILES = (  # what a path that is no regular file is, for the message
  (stat.S_ISDIR, "a directory"),
  (stat.S_ISFIFO, "a FIFO"),
  (lambda mode: stat.S_ISCHR(mode) or stat.S_ISBLK(mode), "a device"),
  (stat.S_ISSOCK, "a socket"),
)


class CTRDataError(ValueError):
  """A malformed record or file in CTR data; the message names the file (and line, field)."""


@dataclasses.dataclass(frozen=True)
class Block:
  """Whole lines of a part, in file order."""

  data: bytes  # whole lines, each ending in b"\n" except perhaps the file's last one
  part_start: int  # decompressed offset where the part's first line starts
  index: int  # lines of the part before this block
  stored_end: float  # stored bytes consumed up to the block's end (interpolated for gzip)
  last: bool  # the part ends with this block
  offset: int  # decompressed offset of the block's first byte (where a pass may resume)


class _Truncated(Exception):
  """The file ended inside a gzip member."""


class _PlainReader:
  """A plain file's bytes from an offset, up to ``limit`` (its size when it was opened); the
  stored offset is the decompressed one."""

  def __init__(self, f, pos: int, limit: int):
    f.seek(pos)
    self._f, self.pos, self._limit = f, pos, limit

  def read(self) -> bytes:
    chunk = self._f.read(max(min(_PLAIN_READ, self._limit - self.pos), 0))
    self.pos += len(chunk)
    return chunk

  def offset_at(self, stored: int) -> int:
    return stored

  def stored_at(self, offset: int) -> float:
    return float(offset)


class _Inflater:
  """A gzip file's decompressed bytes (one or more members), read in small pieces.

  Reads are cut at the stored ``marks``, so ``offset_at(mark)`` is the decompressed offset
  reached once exactly ``mark`` stored bytes are consumed, and end at the stored ``limit``
  (the file's size when it was opened).
  """

  def __init__(self, f, marks=(), *, limit: int, state=None):
    self._f, self._marks = f, sorted(m for m in marks if m > 0)
    self._limit = limit
    self._at: dict[int, int] = {}
    if state is None:
      self._in, self.pos, self._member, self._between = 0, 0, zlib.decompressobj(31), False
    else:
      self._in, self.pos, member, self._between, at = state
      self._member, self._at = member.copy(), dict(at)
    f.seek(self._in)
    self._last = (self._in, self._in, self.pos, self.pos)  # the last read: in, out spans

  def state(self):
    """What resuming here needs (the decompressor is copied, so a pass can go on)."""
    return (self._in, self.pos, self._member.copy(), self._between, dict(self._at))

  def offset_at(self, stored: int) -> int | None:
    return 0 if stored <= 0 else self._at.get(stored)

  def stored_at(self, offset: int) -> float:
    """The stored offset at decompressed ``offset``, interpolated within the last read."""
    in0, in1, out0, out1 = self._last
    if offset >= out1 or out1 == out0:
      return float(in1)
    return in0 + (in1 - in0) * max(offset - out0, 0) / (out1 - out0)

  def read(self) -> bytes:
    """The next decompressed bytes; b"" only at the end of the file."""
    while True:
      mark = next((m for m in self._marks if m > self._in), None)
      want = _GZIP_READ if mark is None else min(_GZIP_READ, mark - self._in)
      data = self._f.read(max(min(want, self._limit - self._in), 0))
      if not data:
        if not self._between:
          raise _Truncated
        return b""
      in0, out0 = self._in, self.pos
      self._in += len(data)
      out = self._inflate(data)
      self.pos += len(out)
      if self._in in self._marks:
        self._at[self._in] = self.pos
      if out:
        self._last = (in0, self._in, out0, self.pos)
        return out

  def _inflate(self, data: bytes) -> bytes:
    pieces = []
    while data:
      if self._between:  # after a member: another member, or zero padding
        if not data.strip(b"\0"):
          break
        self._member, self._between = zlib.decompressobj(31), False
      pieces.append(self._member.decompress(data))
      data = b""
      if self._member.eof:
        self._between, data = True, self._member.unused_data
    return b"".join(pieces)


def check_data_file(path: str) -> None:
  """Raise unless ``path`` is a regular file this process may read; the message names the
  file and what it is instead.

  Raises:
    FileNotFoundError: there is no ``path`` (or it is a link to nothing).
    CTRDataError: ``path`` is a directory, a FIFO, a device or socket, or cannot be read.
  """
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise FileNotFoundError(f"CTR data file not found: {path}; check the path") from None
  except OSError as error:
    raise CTRDataError(f"{path}: cannot read the file: {error.strerror}") from None
  if not stat.S_ISREG(mode):
    kind = next((kind for test, kind in _NOT_FILES if test(mode)), "not a regular file")
    raise CTRDataError(
      f"{path} is {kind}, not a data file; pass a regular file (plain text or gzip)"
    )
  if not os.access(path, os.R_OK):
    raise CTRDataError(f"{path}: cannot read the file: permission denied")


class TextFile:
  """A CTR data file (plain or gzip, told apart by its first bytes) as blocks of lines.

  Args:
    path: the file.
    header: the first line is a header (CSV) and never data.
    block_bytes: the target size of a block.

  Raises:
    FileNotFoundError: there is no ``path``.
    CTRDataError: ``path`` is not a regular file (a directory, a FIFO, a device), cannot be
      read (permissions, a loop of symbolic links), or its gzip data is corrupt at the start.
  """

  def __init__(self, path: str, *, header: bool, block_bytes: int):
    check_data_file(path)
    self.path, self.block_bytes = path, block_bytes
    with self._open() as f:
      self.gzip = self._call(lambda: f.read(2)) == GZIP_MAGIC
    self.size = os.path.getsize(path)
    self._resume: dict[tuple[int, int], tuple] = {}  # (stored span) -> where its part starts
    self._first_line: dict[int, int] = {0: 1}  # decompressed line start -> line number
    self.header_line, self.data_start = self._head(header)

  # -- opening and reading -------------------------------------------------------------------
  def _open(self):
    try:
      return open(self.path, "rb")
    except OSError as error:
      raise CTRDataError(f"{self.path}: cannot read the file: {error}") from None

  def _call(self, read, where=lambda: ""):
    """Run a read; a failure becomes a CTRDataError naming the file and ``where()``."""
    try:
      return read()
    except _Truncated:
      after = where()
      raise CTRDataError(
        f"{self.path}: the gzip data ends inside a compressed member{after} (a truncated "
        "file?); the lines before were read"
      ) from None
    except zlib.error as error:
      raise CTRDataError(f"{self.path}: corrupt gzip data{where()}: {error}") from None
    except OSError as error:
      raise CTRDataError(f"{self.path}: cannot read the file{where()}: {error}") from None

  def _reader(self, f, pos: int, marks=()):
    if self.gzip:
      return _Inflater(f, marks, limit=self.size)
    return _PlainReader(f, pos, self.size)

  def _head(self, header: bool) -> tuple[bytes | None, int]:
    """The first line (no BOM, no line end) if it is a header, and where data starts."""
    with self._open() as f:
      reader, buf = self._reader(f, 0), b""
      while b"\n" not in buf and len(buf) <= MAX_LINE_BYTES:
        chunk = self._call(reader.read)
        if not chunk:
          break
        buf += chunk
    bom = len(UTF8_BOM) if buf.startswith(UTF8_BOM) else 0
    self._first_line[bom] = 1
    if not header:
      return None, bom
    newline = buf.find(b"\n")
    end = len(buf) if newline < 0 else newline + 1
    self._first_line[end] = 2
    return buf[bom:end].rstrip(b"\n").removesuffix(b"\r"), end

  def stored_offset(self, fraction: float) -> int:
    """The stored byte offset of a span boundary."""
    return self.size if fraction >= 1.0 else int(self.size * fraction)

  # -- line numbers --------------------------------------------------------------------------
  def first_line(self, part_start: int) -> int:
    """The line number of the line that starts at decompressed offset ``part_start``."""
    if part_start not in self._first_line:  # a seeked plain part: count once
      with self._open() as f:
        reader, count = _PlainReader(f, 0, limit=part_start), 0
        while chunk := self._call(reader.read):
          count += chunk.count(b"\n")
      self._first_line[part_start] = count + 1
    return self._first_line[part_start]

  # -- blocks ----------------------------------------------------------------------------------
  def blocks(
    self, lo: float = 0.0, hi: float = 1.0, *, start: tuple[int, int] | None = None
  ) -> Iterator[Block]:
    """Yield the blocks of the lines that start in ``[lo, hi)`` of the stored bytes.

    Args:
      lo, hi: the span, as fractions of the stored size.
      start: ``(offset, index)`` of a block an earlier pass over the same span yielded (its
        ``offset`` and ``index``): the pass starts there, with the blocks that pass had.

    Raises:
      CTRDataError: the file cannot be read, or its gzip data is corrupt or truncated (the
        message names the last line read); the blocks before the failure come first.
    """
    begin, stop = self.stored_offset(lo), self.stored_offset(hi)
    with self._open() as f:
      reader, part_start, head = self._position(f, begin, stop)
      at, index = part_start, 0
      if start is not None:
        at, index = start
        reader, head = self._skip_to(f, reader, part_start, head, at)
      yield from self._cut(reader, part_start, head, stop, at=at, index=index)

  def _skip_to(self, f, reader, pos: int, head: bytes, offset: int):
    """A reader and the bytes from decompressed ``offset`` on, given ones from ``pos``."""
    if offset < pos:
      raise ValueError(f"{self.path}: cannot start a pass at offset {offset}, before its part")
    if not self.gzip:
      return _PlainReader(f, offset, self.size), b""
    while pos + len(head) < offset:  # decompress, without parsing, up to the offset
      chunk = self._call(reader.read)
      if not chunk:
        raise ValueError(f"{self.path}: offset {offset} is past the end of the file")
      pos, head = pos + len(head), chunk
    return reader, head[offset - pos :]

  def _position(self, f, start: int, stop: int):
    """A reader past the part's first line start, that start, and the bytes read past it."""
    if self.gzip and (start, stop) in self._resume:
      state, part_start, head = self._resume[start, stop]
      return _Inflater(f, (stop,), limit=self.size, state=state), part_start, head
    if start == 0 or (not self.gzip and start <= self.data_start):
      target, pos = self.data_start, (0 if self.gzip else self.data_start)
    else:
      target, pos = (None, 0) if self.gzip else (start, start - 1)
    reader = self._reader(f, pos, (start, stop))
    lines, buf = 0, b""  # newlines before `pos`; bytes from `pos` on
    while True:
      if target is None and reader.offset_at(start) is not None:
        target = max(reader.offset_at(start), self.data_start)
      if target is not None:
        if target == self.data_start and pos <= target:
          part_start = target
        else:
          newline = buf.find(b"\n", max(target - 1 - pos, 0))
          part_start = None if newline < 0 else pos + newline + 1
        if part_start is not None and part_start <= pos + len(buf):
          break
      chunk = self._call(reader.read, lambda n=lines: f" after line {n}" if self.gzip else "")
      if not chunk:
        part_start = pos + len(buf)  # the part is empty
        break
      keep = 1 if target is None else max(len(buf) - max(target - 1 - pos, 0), 0)
      keep = min(keep, len(buf))
      lines += buf.count(b"\n", 0, len(buf) - keep)
      pos, buf = pos + len(buf) - keep, buf[len(buf) - keep :] + chunk
    head = buf[part_start - pos :]
    if self.gzip or part_start <= self.data_start:
      self._first_line.setdefault(part_start, lines + buf.count(b"\n", 0, part_start - pos) + 1)
    if self.gzip and start > 0:
      self._resume[start, stop] = (reader.state(), part_start, head)
    return reader, part_start, head

  def _cut(
    self, reader, part_start: int, head: bytes, stop: int, *, at: int, index: int
  ) -> Iterator[Block]:
    """Cut the part's bytes into blocks, from the block at decompressed offset ``at`` (the
    ``index``-th line of the part), until the line holding the stop offset ends."""
    buf, buf_pos = bytearray(head), at  # buf holds [buf_pos, buf_pos + len(buf))
    # Cuts fall at the first line end at or after each grid point from the part's start.
    grid = part_start + ((at - part_start) // self.block_bytes + 1) * self.block_bytes
    end = None  # one past the part's last byte, once known
    at_eof = False

    def where() -> str:  # the last whole line read, for a read error
      lines = buf.count(b"\n")
      return f" after line {self.first_line(part_start) - 1 + index + lines}"

    while True:
      if end is None and stop < self.size and reader.offset_at(stop) is not None:
        stop_at = reader.offset_at(stop)
        if stop_at <= buf_pos:
          end = buf_pos
        else:
          newline = buf.find(b"\n", stop_at - 1 - buf_pos)
          end = buf_pos + newline + 1 if newline >= 0 else None
      if end is None and at_eof:
        end = buf_pos + len(buf)
      # The next cut: the first line end at or after the grid point, or the part's end.
      cut = None
      newline = buf.find(b"\n", max(grid - 1 - buf_pos, 0))
      if newline >= 0:
        cut = buf_pos + newline + 1
      if end is not None and (cut is None or end <= cut):
        cut = end
      if cut is not None:
        last = cut == end
        if cut > buf_pos:
          data = bytes(memoryview(buf)[: cut - buf_pos])
          yield Block(data, part_start, index, reader.stored_at(cut), last, buf_pos)
          index += data.count(b"\n")
          del buf[: cut - buf_pos]
          buf_pos = cut
        if last:
          return
        while grid <= cut:
          grid += self.block_bytes
        continue
      if len(buf) - buf.rfind(b"\n") - 1 > MAX_LINE_BYTES:
        line = self.first_line(part_start) + index + buf.count(b"\n")
        raise CTRDataError(
          f"{self.path}:{line}: a line longer than {MAX_LINE_BYTES >> 20} MiB; is this a text "
          "file with one record per line?"
        )
      chunk = self._call(reader.read, where)
      if chunk:
        buf += chunk
      else:
        at_eof = True
