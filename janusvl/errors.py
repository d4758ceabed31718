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


class ImageTooLargeError(ImageLoadError):
    """An image whose header claims more pixels (or whose encoding holds more bytes) than the
    limits allow; nothing of it was decoded."""


class InputError(JanusError, ValueError):
    """Arguments to a processing or generation call are inconsistent or out of range."""


class ContextLengthError(InputError):
    """The prompt plus the tokens to generate do not fit the model's context. The counts are
    attributes, so a front end can phrase the error its own way (the server's
    `context_length_exceeded`)."""

    def __init__(self, message: str, prompt_tokens: int, new_tokens: int, context: int) -> None:
        super().__init__(message)
        self.prompt_tokens, self.new_tokens, self.context = prompt_tokens, new_tokens, context


class OverloadedError(JanusError):
    """The engine's queue is full; try again later."""


class UnavailableError(JanusError):
    """The engine is shutting down (or stopped) and takes no more work."""


class CancelledError(JanusError):
    """The request was cancelled before it finished."""
