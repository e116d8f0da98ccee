"""The embedding tier's own exception types. Bad arguments raise ``ValueError``; these are
for the table's state."""


class TableLockedError(RuntimeError):
  """The table is already open, in this process or another: one writer per table.

  Examples:
    >>> import tempfile
    >>> from kstep_adam import embedding
    >>> path = tempfile.mkdtemp() + "/t"
    >>> with embedding.open_table(path, num_rows=10, dim=2):
    ...   try:
    ...     embedding.open_table(path)
    ...   except embedding.TableLockedError as e:
    ...     print("refused:", e.path == path)
    refused: True
  """

  def __init__(self, path: str):
    super().__init__(
      f"the table at {path!r} is already open (in this or another process); close it first"
    )
    self.path = path
