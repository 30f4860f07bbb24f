"""The one base class for mistakes a user can fix (bad task, file, recipe, request...).

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    pass
