"""Exception types. Every error names the file, key or field it is about."""


class JanusError(Exception):
    """Base class of every error janusvl raises on purpose."""


class ConfigError(JanusError, ValueError):
    """config.json (or a processor config) is missing, unreadable or asks for something unsupported."""


class CheckpointError(JanusError):
    """Weights are missing, unreadable, or do not fit the model the config describes."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint at a local path, and none in the Hub cache (or downloads are disabled)."""


class ImageLoadError(JanusError, ValueError):
    """An image path, URL or byte string could not be read as an image."""


class InputError(JanusError, ValueError):
    """Arguments to a processing or generation call are inconsistent or out of range."""


class OverloadedError(JanusError):
    """The engine's queue is full; try again later."""


class UnavailableError(JanusError):
    """The engine is shutting down (or stopped) and takes no more work."""


class CancelledError(JanusError):
    """The request was cancelled before it finished."""
