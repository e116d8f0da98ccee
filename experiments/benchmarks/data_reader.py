"""Throughput of the CTR file reader against pyarrow's own CSV reader, same file, same process.

  python -m experiments.benchmarks.data_reader                 # 300k Criteo lines, plain text
  python -m experiments.benchmarks.data_reader --gzip          # the same lines, gzip
  python -m experiments.benchmarks.data_reader --format csv    # a CSV with a header, strings

Writes a Criteo-format file with the synthetic generator (in a temporary directory, removed
afterwards) and reads all of it three ways, interleaved ``--repeats`` times, keeping each
one's best run (the machine may be shared):

- ``raw``: ``pyarrow.csv.read_csv(path)`` with its defaults (threads, type inference): a
  table of the fields and nothing more, the ceiling;
- ``columnar``: :class:`kstep_adam.ctr.CTRFileReader`, batches of 4096 with everything the
  trainer needs (labels, log-transformed dense features, 64-bit feature keys);
- ``lines``: the same reader with ``engine='lines'``, the one-line-at-a-time parser (the
  reader's design before the columnar engine), on the first ``--line-lines`` lines.

Prints lines/s of each and the ratios ``columnar / raw`` and ``columnar / lines`` as JSON
(``--out`` also writes them).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

from experiments._cli import add_config_args
from experiments._cli import config_from_args
from experiments._common import dumps
from experiments._common import write_json


@dataclasses.dataclass(frozen=True)
class DataReaderBenchmark:
  """What to read and how often.

  Attributes:
    lines: data lines in the file.
    format: the file's format: criteo (tab separated, hex ids) or csv (a header, string ids).
    gzip: compress the file.
    repeats: interleaved runs of each reader; the best is kept.
    line_lines: lines read by the line parser (it is slow; its rate is per line).
    workers: the columnar reader's parse threads.
    block_bytes: bytes per block of the columnar reader.
    out: also write the result to this JSON file.
  """

  lines: int = 300_000
  format: str = dataclasses.field(default="criteo", metadata={"choices": ("criteo", "csv")})
  gzip: bool = False
  repeats: int = 3
  line_lines: int = 60_000
  workers: int = 2
  block_bytes: int = 1 << 20
  out: str | None = None


def write_file(directory: str, config: DataReaderBenchmark) -> str:
  """A Criteo-format file of ``config.lines`` lines (the generator's), as TSV or CSV."""
  import gzip

  from kstep_adam import ctr

  tsv = os.path.join(directory, "day.txt")
  ctr.SyntheticCTR(vocab_size=100_000, seed=0).write_criteo(tsv, config.lines)
  path = tsv
  if config.format == "csv":
    path = os.path.join(directory, "day.csv")
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    with open(tsv) as src, open(path, "w") as dst:
      dst.write(",".join(names) + "\n")
      for line in src:
        dst.write(line.replace("\t", ","))
  if config.gzip:
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb", compresslevel=6) as dst:
      dst.write(src.read())
    path += ".gz"
  return path


def read_raw(path: str, config: DataReaderBenchmark) -> int:
  import pyarrow.csv as pacsv

  criteo = config.format == "criteo"
  table = pacsv.read_csv(
    path,
    read_options=pacsv.ReadOptions(autogenerate_column_names=criteo),
    parse_options=pacsv.ParseOptions(delimiter="\t" if criteo else ","),
  )
  return table.num_rows


def read_ctr(path: str, config: DataReaderBenchmark, engine: str, max_lines: int | None) -> int:
  from kstep_adam import ctr

  dense = [f"I{i}" for i in range(1, 14)] if config.format == "csv" else ()
  reader = ctr.CTRFileReader(
    path,
    format=config.format,
    dense_columns=dense,
    engine=engine,
    workers=config.workers,
    block_bytes=config.block_bytes,
  )
  lines = 0
  for batch in reader.batches(4096):
    lines += batch.size
    if max_lines is not None and lines >= max_lines:
      break
  return lines


def run(config: DataReaderBenchmark) -> dict:
  with tempfile.TemporaryDirectory(prefix="data_reader_") as directory:
    path = write_file(directory, config)
    readers = {
      "raw": lambda: read_raw(path, config),
      "columnar": lambda: read_ctr(path, config, "columnar", None),
      "lines": lambda: read_ctr(path, config, "lines", config.line_lines),
    }
    best = dict.fromkeys(readers, 0.0)
    for _ in range(config.repeats):
      for name, read in readers.items():
        start = time.perf_counter()
        lines = read()
        best[name] = max(best[name], lines / (time.perf_counter() - start))
    size = os.path.getsize(path)
  return {
    "lines_per_sec": {name: round(rate) for name, rate in best.items()},
    "columnar_over_raw": best["columnar"] / best["raw"],
    "columnar_over_lines": best["columnar"] / best["lines"],
    "file_bytes": size,
    "cpu_count": os.cpu_count(),
    "config": dataclasses.asdict(config),
  }


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  add_config_args(parser, DataReaderBenchmark)
  config = config_from_args(DataReaderBenchmark, parser.parse_args(argv))
  result = run(config)
  print(dumps(result))
  if config.out is not None:
    write_json(config.out, result)
  return result


if __name__ == "__main__":
  main()
