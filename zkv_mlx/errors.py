"""Typed errors. User-facing messages name the bad value and the fix."""


class ZkvError(Exception):
    """Base class of every error zkv-mlx raises on purpose."""


class ConfigError(ZkvError, ValueError):
    """A configuration value (flag, TOML key, API kwarg) is invalid."""


class ModelLoadError(ZkvError):
    """A model file or directory is missing, corrupt or of an unsupported family."""


class OutOfKVMemory(ZkvError):
    """A request needs more KV blocks than the pool can ever give it."""


class SessionError(ZkvError):
    """A session could not be saved, loaded, imported or exported."""


class SessionFormatError(SessionError):
    """A session file is corrupt, truncated or of an unknown version."""


class SessionMismatchError(SessionError):
    """A session file was made with another model or KV format."""


class KernelError(ZkvError):
    """A kernel could not be built or run."""


class PromptTooLong(ZkvError, ValueError):
    """A prompt does not fit in the configured max context."""


class MessageError(ConfigError):
    """A chat message cannot be rendered (no role, unknown role, non-text content); the message names its index."""


class SamplingError(ZkvError):
    """The model's logits for a request had no finite value (all NaN or -inf): no token can be picked."""


class DistributedError(ZkvError):
    """A distributed run failed: a rank died or cannot be reached, or the ranks disagree on model or config."""
