"""What can go wrong on the data plane, as types a caller can catch by name.

A node answers every bad or refused message with an error reply (a code, a message and the peer
that refused), never by dropping the connection; the client side turns the reply back into one of
these exceptions. Each is a `HelixError`: its message is the whole explanation."""

from __future__ import annotations

from enum import Enum

from helix_p2p.errors import HelixError


class ErrorCode(str, Enum):
    MALFORMED = "malformed"
    UNKNOWN_SESSION = "unknown_session"
    SESSION_EXISTS = "session_exists"
    TOO_LONG = "too_long"
    BUSY = "busy"
    LAYERS = "layers"
    UNREACHABLE = "unreachable"
    INTERNAL = "internal"


class DataPlaneError(HelixError):
    """Base of every data-plane error. `peer_id` is the peer that refused (None: this process)."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class MalformedMessageError(DataPlaneError):
    """A message failed validation: its encoding, a size, shape, dtype, id or layer range."""

    code = ErrorCode.MALFORMED


class SessionNotFoundError(DataPlaneError):
    """No such session is open on that peer for this caller (never opened, closed, or idled out)."""

    code = ErrorCode.UNKNOWN_SESSION


class DuplicateSessionError(DataPlaneError):
    """A session with this id is already open on that peer."""

    code = ErrorCode.SESSION_EXISTS


class SequenceTooLongError(DataPlaneError):
    """A step would pass the session's max length (or a max length passes the model's)."""

    code = ErrorCode.TOO_LONG


class BusyError(DataPlaneError):
    """The peer refuses more work now: its KV budget, its session limit, or a per-peer limit."""

    code = ErrorCode.BUSY


class LayersUnavailableError(DataPlaneError):
    """The peer does not hold the layers the route gives it."""

    code = ErrorCode.LAYERS


class HopUnreachableError(DataPlaneError):
    """A peer on the route did not answer (dead, unreachable, or past the timeout)."""

    code = ErrorCode.UNREACHABLE


class RemoteInternalError(DataPlaneError):
    """A peer failed on a valid message (a bug or a device error there)."""

    code = ErrorCode.INTERNAL


ERROR_TYPES: dict[ErrorCode, type[DataPlaneError]] = {
    cls.code: cls
    for cls in (
        MalformedMessageError,
        SessionNotFoundError,
        DuplicateSessionError,
        SequenceTooLongError,
        BusyError,
        LayersUnavailableError,
        HopUnreachableError,
        RemoteInternalError,
    )
}


def error_for(code: ErrorCode, message: str, peer_id: str | None) -> DataPlaneError:
    return ERROR_TYPES[code](message, peer_id)
