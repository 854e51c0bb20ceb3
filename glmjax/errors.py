"""The one exception family glmjax raises for bad input; the CLI turns it into one line + exit 2."""


class GlmjaxError(ValueError):
    """A user-facing error: the message names the problem in one line."""


class ConfigError(GlmjaxError):
    """Malformed or impossible model configuration."""


class CheckpointError(GlmjaxError):
    """Missing, truncated or inconsistent checkpoint."""


class MeshError(GlmjaxError):
    """Bad mesh spec, or an array dimension that does not divide its mesh axis."""


class InputError(GlmjaxError):
    """Model inputs with wrong shapes, dtypes, lengths or token ids."""
