"""What moe-lab reports as a user's mistake: one `moe-lab: error: ...` line, never a traceback.

A leaf module (it imports nothing), so every part of moe-lab can raise these, including the analysis side, which
never imports torch.
"""


class UserError(Exception):
    """A mistake in what the user asked for (a setting, a path, a file): reported as one message."""


class ConfigError(UserError):
    """A configuration value or combination that cannot run."""


class DataError(UserError):
    """Data that cannot be read or is too small for the configured blocks."""


class CheckpointError(UserError):
    """A checkpoint that is missing, unreadable, not moe-lab's, or does not fit the configured model."""


class DashboardError(UserError):
    """A run or sweep directory that cannot be drawn, or an output that moe-lab will not write over."""


class ExportError(UserError):
    """A model that has no equivalent in the requested format, or an output that moe-lab will not write over."""


class ModelImportError(UserError):
    """A model moe-lab cannot import exactly, or an output it will not write over."""


class RunFailed(Exception):
    """Not a user's mistake but what happened to the run (divergence, a full disk): one line, exit code 1, and a
    summary.json that says so."""


class DiskFull(RunFailed):
    """A write failed for want of space; the last checkpoint written whole is named."""


class Diverged(RunFailed):
    """Not a user's mistake but the run's outcome: the loss or the weights became NaN or infinite. The run stops, no
    checkpoint with non-finite weights is written, and the process exits non-zero (a sweep's max_failure_rate decides
    what follows)."""
