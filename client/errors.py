"""What the client raises, as types a caller can catch by name (each a `HelixError`)."""

from __future__ import annotations

from helix_p2p.errors import HelixError


class ClientError(HelixError):
    """Base of the client's own errors."""


class BadRequestError(ClientError, ValueError):
    """The caller's request is invalid (empty prompt, a length past the model's, bad sampling)."""


class NoRouteError(ClientError):
    """No chain of live peers serves every layer with room for the request (after waiting)."""


class GenerationFailedError(ClientError):
    """A generation failed on every route tried; `failures` lists what each attempt hit."""

    def __init__(self, message: str, failures: list[str]) -> None:
        super().__init__(message)
        self.failures = failures
