"""The data plane's protocol: typed messages (open a session along a route, step, close) and their
replies, their wire form with strict validation, the errors a node answers with, and the limits a
node applies per peer. Pure: no network here.

Modules that use the network (import them directly):
- `transport`: send an encoded message to a peer (unary call, or a stream above the 4 MiB cap);
- `driver`: `RemoteSession`, a minimal client that opens a session on a route and generates."""

from helix_p2p.protocol.errors import (
    BusyError,
    DataPlaneError,
    DuplicateSessionError,
    ErrorCode,
    HopUnreachableError,
    LayersUnavailableError,
    MalformedMessageError,
    RemoteInternalError,
    SequenceTooLongError,
    SessionNotFoundError,
)
from helix_p2p.protocol.limits import DataPlaneLimits, LimitsError, PeerQuota
from helix_p2p.protocol.messages import (
    Closed,
    CloseSession,
    Failure,
    Generated,
    Opened,
    OpenSession,
    Reply,
    Request,
    RouteHop,
    Step,
    check_route,
    route_from_pipeline,
)
from helix_p2p.protocol.wire import decode_reply, decode_request, encode_reply, encode_request

__all__ = [
    "BusyError",
    "CloseSession",
    "Closed",
    "DataPlaneError",
    "DataPlaneLimits",
    "DuplicateSessionError",
    "ErrorCode",
    "Failure",
    "Generated",
    "HopUnreachableError",
    "LayersUnavailableError",
    "LimitsError",
    "MalformedMessageError",
    "OpenSession",
    "Opened",
    "PeerQuota",
    "RemoteInternalError",
    "Reply",
    "Request",
    "RouteHop",
    "SequenceTooLongError",
    "SessionNotFoundError",
    "Step",
    "check_route",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "encode_request",
    "route_from_pipeline",
]
