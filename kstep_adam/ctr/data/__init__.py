"""The data room: where a run's examples come from. Imports nothing from ``train`` or ``run``.

- ``_config``: :class:`DataConfig` and :func:`make_source`, the one way a run opens its data.
- ``_sources``: :class:`DataSource` (synthetic, file and batch-list sources; a process's part).
- ``_synthetic``: :class:`SyntheticCTR`, streamed data with a known teacher.
- ``_readers``: :class:`CTRFileReader`, a Criteo / CSV file (or part of it) as batches.
- ``_schema``: what a record is made of (formats, schemas, rows, read statistics, positions).
- ``_line_parser`` / ``_columnar``: the reference line parser and the vectorized block parser.
- ``_textfile``: blocks of whole lines from a plain or gzip file; :class:`CTRDataError`.
- ``_records``: :class:`CTRBatch`, the seam to the trainer, and the feature keys.
- ``_prefetch``: the background reader and the held-out sets the trainer consumes.

A new data format goes in a parser here and a name in ``_schema.FORMATS``. This package
re-exports nothing: the public names are in :mod:`kstep_adam.ctr`.
"""
