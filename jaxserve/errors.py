"""The exceptions jaxserve raises. Every error says what was wrong and what is allowed.

`ValueError` subclasses are bad input from a caller (the server maps them to HTTP 400);
`CheckpointError` is a file on disk that cannot be used, and always names the file.
"""


class JaxserveError(Exception):
    """Base class of every jaxserve error."""


class CheckpointError(JaxserveError, ValueError):
    """A checkpoint file is missing, truncated, corrupt, or disagrees with its config."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedArchitectureError(JaxserveError, ValueError):
    """The checkpoint's architecture is not one jaxserve implements."""


class ModelFetchError(JaxserveError, RuntimeError):
    """The default model could not be downloaded; the message says how to place it by hand."""


class TokenizerError(JaxserveError, ValueError):
    """Tokenizer metadata (GGUF keys, tokenizer files) that jaxserve cannot turn into a tokenizer."""


class ChatTemplateError(JaxserveError, ValueError):
    """Bad chat messages, a model without a chat template, or a template that refused the input."""


class ConfigError(JaxserveError, ValueError):
    """An engine or server option out of range; `field` names the option (the CLI names its flag)."""

    def __init__(self, field: str, problem: str):
        self.field, self.problem = field, problem
        super().__init__(f"{field} {problem}")
