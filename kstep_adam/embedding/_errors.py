"""The embedding tier's own exception types. Bad arguments raise ``ValueError``; these are
for the table's state."""


class TableLockedError(RuntimeError):
  """The table is already open, in this process or another: one writer per table.

  Examples:
    >>> import tempfile
    >>> from kstep_adam import embedding
    >>> with tempfile.TemporaryDirectory() as d:
    ...   path = d + "/t"
    ...   with embedding.open_table(path, num_rows=10, dim=2):
    ...     try:
    ...       embedding.open_table(path)
    ...     except embedding.TableLockedError as e:
    ...       print("refused:", e.path == path)
    refused: True
  """

  def __init__(self, path: str):
    super().__init__(
      f"the table at {path!r} is already open (in this or another process); close it first"
    )
    self.path = path


class TableFailedError(RuntimeError):
  """An I/O error left the table in a state it cannot continue from: reopen it.

  Raised by the call that hit the error (its ``__cause__``) and by every later call on the
  same ``EmbeddingTable``, ``flush`` and ``close(flush=True)`` included, so no flush can
  commit a state that no step produced. Close the table (``close(flush=False)``) and open
  it again: that gives exactly its last committed flush. Calls whose error left the table
  as it was raise the original error instead (``OSError`` for I/O).

  Attributes:
    path: the table's directory.
    operation: the call that failed (``'push'``, ``'flush'``, ...).
  """

  def __init__(self, path: str, operation: str, cause: BaseException):
    super().__init__(
      f"the embedding table at {path!r} failed during {operation} "
      f"({type(cause).__name__}: {cause}); it refuses every call until it is closed and "
      "reopened, which restores its last committed flush"
    )
    self.path = path
    self.operation = operation


class NonFiniteRowsError(FloatingPointError):
  """A push would store a non-finite value: a parameter or an optimizer moment that is NaN,
  infinite, or too large for float32 (the optimizer computes in float64 and stores float32).

  Nothing of the push is stored if its rows fit in the host cache (one block); a push of
  more unique rows than that, whose earlier blocks are stored, fails the table instead
  (``TableFailedError`` from this error). Either way no flush commits such a row.

  Attributes:
    row_ids: the rows (table ids) whose new state is not finite.
  """

  def __init__(self, row_ids):
    self.row_ids = row_ids
    super().__init__(
      f"{len(row_ids)} rows would hold non-finite values after this push (e.g. rows "
      f"{list(map(int, row_ids[:5]))}; a parameter or optimizer moment overflows float32): "
      "nothing of them is stored; lower the sparse learning rate"
    )
