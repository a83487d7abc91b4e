"""One base class for every problem caused by the user's input.

The UI shows ``str(error)`` in an error box and the CLI prints it on one line and exits 2;
anything that is *not* a :class:`UserError` is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A clear, one-sentence message about bad input (model id, prompt, file, setting)."""
