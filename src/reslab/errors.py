"""The one exception type for bad input from a person.

The command line turns a `ReslabError` into a single line on stderr and a non-zero exit; anything
else is a bug and keeps its traceback.
"""


class ReslabError(Exception):
    """Bad input from a person: a missing path, an unknown model, a corrupt file...

    The message names the thing and says what to do; it is printed as one line.
    """

    exit_code = 2
