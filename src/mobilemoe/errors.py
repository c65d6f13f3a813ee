"""One error type for everything a user can get wrong; the CLI prints its message and exits non-zero."""


class MobileMoEError(Exception):
    """A problem with the user's input (config, files, budgets) that they can fix.

    The message must say what is wrong and what to do; the CLI shows it without a traceback.
    """


class ConfigError(MobileMoEError, ValueError):
    """A config or recipe names a key that does not exist or holds inconsistent values."""
