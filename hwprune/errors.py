"""One error family. Every message says what is wrong, the value given, and how to fix it.

The CLI prints ``str(error)`` as a single line and exits non-zero; a traceback is shown only with ``--debug``.
"""


class HwpruneError(Exception):
    """Base class of every error hwprune reports to a user."""

    exit_code = 2


class ConfigError(HwpruneError):
    """A search space or device profile file is invalid."""


class ModelError(HwpruneError):
    """A model reference, checkpoint or input shape cannot be used."""


class DataError(HwpruneError):
    """A data reference or data path cannot be used."""


class BackendUnavailable(HwpruneError):
    """A device profile's backend is not installed or not reachable here."""


class BudgetError(HwpruneError):
    """A latency budget that no plan in the search space can meet."""


class RunError(HwpruneError):
    """A run directory, study or trial that does not exist or does not fit the request."""
