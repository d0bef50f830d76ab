"""Data-plane protobufs in a private swarm: a request or reply is wrapped, with the swarm key's
tag (`helix_p2p.swarm.swarm_key`) over its serialized bytes, in an envelope of the same protobuf
type, so the unary call path is unchanged. Without a key bound to the P2P instance every function
here passes its message through untouched."""

from __future__ import annotations

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

from helix_p2p.swarm.swarm_key import (
    SwarmAuthError,
    open_reply,
    open_request,
    seal_reply,
    seal_request,
    swarm_key_of,
)

#: marks a sealed data-plane protobuf (`uid` of a request; start of a reply's metadata)
SEALED_MARK = "helix-sealed/1"


def seal_expert_request(p2p: P2P, protocol: str, receiver: str, request: bytes) -> runtime_pb2.ExpertRequest:
    """The protobuf to send for the serialized request `request` (an envelope when keyed)."""
    if swarm_key_of(p2p) is None:
        return runtime_pb2.ExpertRequest.FromString(request)
    return runtime_pb2.ExpertRequest(uid=SEALED_MARK, metadata=seal_request(p2p, protocol, receiver, request))


def open_expert_request(
    p2p: P2P, protocol: str, sender: str, request: runtime_pb2.ExpertRequest
) -> runtime_pb2.ExpertRequest:
    if swarm_key_of(p2p) is None:
        return request
    if request.uid != SEALED_MARK:
        raise SwarmAuthError(f"peer {sender} sent a request without this private swarm's key (--swarm-key)")
    payload = open_request(p2p, protocol, sender, request.metadata)
    try:
        return runtime_pb2.ExpertRequest.FromString(payload)
    except DecodeError as e:  # tagged by a key holder, yet not a request: refused the same way
        raise SwarmAuthError(f"peer {sender} sealed something that is not an ExpertRequest ({e})") from None


def seal_expert_response(
    p2p: P2P, protocol: str, receiver: str, response: runtime_pb2.ExpertResponse
) -> runtime_pb2.ExpertResponse:
    if swarm_key_of(p2p) is None:
        return response
    sealed = seal_reply(p2p, protocol, receiver, response.SerializeToString())
    return runtime_pb2.ExpertResponse(metadata=SEALED_MARK.encode() + sealed)


def open_expert_response(p2p: P2P, protocol: str, sender: str, data: bytes) -> bytes:
    """The serialized reply inside the response bytes `data` (unchanged when not keyed)."""
    if swarm_key_of(p2p) is None:
        return data
    metadata = runtime_pb2.ExpertResponse.FromString(data).metadata
    mark = SEALED_MARK.encode()
    if not metadata.startswith(mark):
        raise SwarmAuthError(f"peer {sender} answered without this private swarm's key (--swarm-key)")
    return open_reply(p2p, protocol, sender, metadata[len(mark) :])
