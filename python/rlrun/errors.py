"""Exceptions raised by rlrun."""


class RecipeError(ValueError):
    """A recipe that does not parse or validate.

    Attributes: ``key`` (dotted key path, e.g. ``"trainer.lr"``, or ``""``), ``line`` and
    ``column`` (1-based, or ``None``), ``file``.
    """

    def __init__(self, message, key="", line=None, column=None, file=""):
        super().__init__(message)
        self.key = key
        self.line = line
        self.column = column
        self.file = file
