"""User-facing errors.

Every problem with something the user gave us (a file, a row, a field, an option) is raised as `InputError`
with a one-line message that names the file/row/field and says what was expected. The CLI prints it as
``hierloc: error: <message>`` and exits non-zero, without a traceback (unless ``--debug``).
"""


class InputError(ValueError):
    """Bad user input. The message is one line: where (file, row, field) and what was expected."""
