"""The two kinds of record the swarm keeps in the DHT (DESIGN.md, "Swarm state in the DHT"): a node's
own record in the registry and the planner's plan. Typed frozen dataclasses, their wire form (plain
msgpack-able dicts), size limits and strict schema checks.

Everything that arrives from the DHT was written by a stranger, so parsing is strict: every field is
type-checked and range-checked, strings and lists have caps, and any problem raises `RecordError`
naming the field. No hivemind import here: this module is pure and fast to import."""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from helix_p2p.cluster import SINK, SOURCE, NodeId
from helix_p2p.errors import HelixError
from helix_p2p.plan import EdgeFlow, moved_layers

NODE_FORMAT = "helix-node/1"
PLAN_FORMAT = "helix-swarm-plan/1"

#: Serialized size caps. A node record holds a throughput table (<= MAX_LAYERS_TABLE floats) and at
#: most MAX_LINKS measured links, so a honest record is ~3 KiB; the cap leaves room and bounds what
#: one peer can make every other peer download with each registry read.
MAX_NODE_RECORD_BYTES = 8 * 1024
#: A plan lists every member; flows are index-compressed. ~1,000 nodes fit in a few hundred KiB;
#: hivemind's DHT messages are capped at 4 MiB, so 1 MiB keeps the plan and its replies well under.
MAX_PLAN_RECORD_BYTES = 1024 * 1024
MAX_LAYERS_TABLE = 1024
MAX_LINKS = 32
MAX_ADDRS = 4
MAX_MEMBERS = 4096
MAX_NAME_CHARS = 64
MAX_ID_CHARS = 256
MAX_ADDR_CHARS = 256
#: epochs stay exactly representable in every JSON/msgpack reader
MAX_EPOCH = 2**53 - 1
#: a record may ask to live at most this long; keeps a crashed peer from squatting the registry
MAX_TTL_S = 600.0


class RecordError(HelixError, ValueError):
    """A record does not follow its schema (bad type, out of range, too large, bad signature)."""


class NodeState(str, enum.Enum):
    """A node's life cycle. `standby`: in the swarm but holds no layers under the current plan."""

    JOINING = "joining"
    LOADING = "loading"
    SERVING = "serving"
    STANDBY = "standby"
    LEAVING = "leaving"


class Reachability(str, enum.Enum):
    """How other peers reach a node: directly, only through a libp2p relay, or not yet known."""

    DIRECT = "direct"
    RELAY = "relay"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class LinkMeasurement:
    """What a node measured on its link to `peer`: both directions and the round trip."""

    peer: str
    out_bytes_per_s: float  # this node -> peer
    in_bytes_per_s: float  # peer -> this node
    rtt_s: float
    measured_at: float


@dataclass(frozen=True)
class ModelInfo:
    """The model a node serves, as much as the planner needs (`ModelShape`) plus its id."""

    id: str
    num_layers: int
    hidden_size: int
    #: bytes per element of the hidden state passed between stages (2 for fp16/bf16, 4 for fp32)
    dtype_bytes: int


@dataclass(frozen=True)
class NodeRecord:
    peer_id: str
    name: str
    version: str
    model: ModelInfo
    gpu: str
    memory_bytes: int
    max_layers: int
    #: tokens_per_s[k-1]: tokens/s while holding k layers (DESIGN.md, "The flow model")
    tokens_per_s: tuple[float, ...]
    nic_in_bytes_per_s: float
    nic_out_bytes_per_s: float
    links: tuple[LinkMeasurement, ...]
    state: NodeState
    #: layers served now, [start, end); None when it holds none
    layers: tuple[int, int] | None
    #: layers being loaded while the old ones keep serving (make before break)
    loading_layers: tuple[int, int] | None
    free_kv_tokens: int
    #: sessions running on this node now
    load: float
    joined_at: float
    updated_at: float
    #: the node re-announces this often; a record older than two periods is stale
    refresh_s: float
    reachability: Reachability
    dht_client_mode: bool
    planner_eligible: bool
    addrs: tuple[str, ...] = ()
    #: cumulative since the node started: sessions it opened as the first hop (requests) and tokens
    #: it sampled as the last hop, so each request and token counts once over the swarm; status
    #: pages turn them into rates by the difference between two records
    requests_started: int = 0
    tokens_generated: int = 0

    def is_stale(self, now: float) -> bool:
        """Missed two refreshes in a row: the node is presumed gone before its DHT entry expires."""
        return now - self.updated_at > 2.0 * self.refresh_s

    def is_live(self, now: float) -> bool:
        return self.state != NodeState.LEAVING and not self.is_stale(now)


@dataclass(frozen=True)
class PlanRecord:
    """A plan as published in the swarm: the planner's `Plan` plus epoch, planner, members, time.
    `members` are the nodes the planner planned over (also those that got no layers), so every
    peer can tell whether membership has changed since."""

    epoch: int
    planner: str
    model: str
    num_layers: int
    method: str
    members: tuple[str, ...]
    placement: Mapping[str, tuple[int, int]]
    flows: tuple[EdgeFlow, ...]
    objective_tokens_per_s: float
    upper_bound_tokens_per_s: float | None
    solve_seconds: float
    created_at: float
    partial_inference: bool = False

    def moved_layers_from(self, previous: Mapping[str, tuple[int, int]]) -> int:
        """How many (node, layer) pairs this plan assigns that `previous` did not: the layers
        nodes must load to follow it."""
        return moved_layers(previous, self.placement)


@dataclass(frozen=True)
class SignedPlan:
    """A plan record with the planner's public key and signature over `body` (the exact bytes
    parsed into `record`), so the plan can be checked anywhere, not only inside the DHT."""

    record: PlanRecord
    body: bytes
    public_key: bytes
    signature: bytes = field(repr=False)


# ------------------------------------------------------------------------------------ strict reading


class _Fields:
    """Typed access to a decoded record that names the bad field in every error."""

    def __init__(self, what: str, doc: Any) -> None:
        if not isinstance(doc, Mapping):
            raise RecordError(f"{what}: expected a map, got {type(doc).__name__}")
        self.what = what
        self.doc = doc

    def fail(self, key: str, problem: str) -> RecordError:
        return RecordError(f"{self.what}: field '{key}': {problem}")

    def raw(self, key: str) -> Any:
        if key not in self.doc:
            raise self.fail(key, "missing")
        return self.doc[key]

    def str_(self, key: str, max_chars: int, *, allow_empty: bool = True) -> str:
        value = self.raw(key)
        return check_str(value, max_chars, allow_empty=allow_empty, fail=lambda p: self.fail(key, p))

    def int_(self, key: str, minimum: int = 0, maximum: int = 2**62) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {type(value).__name__}")
        if not minimum <= value <= maximum:
            raise self.fail(key, f"must be in [{minimum}, {maximum}], got {value}")
        return value

    def num(self, key: str, *, positive: bool = False, optional: bool = False) -> float | None:
        value = self.raw(key)
        if value is None and optional:
            return None
        return check_number(value, positive=positive, fail=lambda p: self.fail(key, p))

    def bool_(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"expected a boolean, got {type(value).__name__}")
        return value

    def list_(self, key: str, max_items: int) -> list[Any]:
        value = self.raw(key)
        if not isinstance(value, (list, tuple)):
            raise self.fail(key, f"expected a list, got {type(value).__name__}")
        if len(value) > max_items:
            raise self.fail(key, f"at most {max_items} items allowed, got {len(value)}")
        return list(value)

    def range_(self, key: str, num_layers: int) -> tuple[int, int] | None:
        value = self.raw(key)
        if value is None:
            return None
        return check_range(value, num_layers, fail=lambda p: self.fail(key, p))

    def enum_(self, key: str, kind: type[enum.Enum]) -> Any:
        value = self.raw(key)
        try:
            return kind(value)
        except ValueError:
            choices = ", ".join(str(item.value) for item in kind)
            raise self.fail(key, f"expected one of {choices}, got {value!r}") from None

    def format_(self, expected: str) -> None:
        found = self.raw("format")
        if found != expected:
            raise self.fail("format", f"unknown format {found!r}, expected {expected!r}")


def check_str(value: Any, max_chars: int, *, allow_empty: bool = True, fail=None) -> str:
    fail = fail or RecordError
    if not isinstance(value, str):
        raise fail(f"expected a string, got {type(value).__name__}")
    if len(value) > max_chars:
        raise fail(f"longer than {max_chars} characters")
    if not allow_empty and not value:
        raise fail("must not be empty")
    if not value.isprintable():
        raise fail("contains control characters")
    return value


def check_number(value: Any, *, positive: bool = False, fail=None) -> float:
    fail = fail or RecordError
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(f"expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise fail(f"must be a finite number >= 0, got {value}")
    if positive and value <= 0:
        raise fail(f"must be > 0, got {value}")
    return value


def check_range(value: Any, num_layers: int, fail=None) -> tuple[int, int]:
    fail = fail or RecordError
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise fail("expected [start, end]")
    start, end = value
    if any(isinstance(x, bool) or not isinstance(x, int) for x in (start, end)):
        raise fail("expected two integers [start, end]")
    if not 0 <= start < end <= num_layers:
        raise fail(f"needs 0 <= start < end <= {num_layers}, got [{start}, {end}]")
    return (start, end)


# ------------------------------------------------------------------------------------- node records


def node_record_to_wire(record: NodeRecord) -> dict[str, Any]:
    return {
        "format": NODE_FORMAT,
        "peer_id": record.peer_id,
        "name": record.name,
        "version": record.version,
        "model": {
            "id": record.model.id,
            "num_layers": record.model.num_layers,
            "hidden_size": record.model.hidden_size,
            "dtype_bytes": record.model.dtype_bytes,
        },
        "gpu": record.gpu,
        "memory_bytes": record.memory_bytes,
        "max_layers": record.max_layers,
        "tokens_per_s": [float(x) for x in record.tokens_per_s],
        "nic_in_bytes_per_s": float(record.nic_in_bytes_per_s),
        "nic_out_bytes_per_s": float(record.nic_out_bytes_per_s),
        "links": [
            [
                link.peer,
                float(link.out_bytes_per_s),
                float(link.in_bytes_per_s),
                float(link.rtt_s),
                float(link.measured_at),
            ]
            for link in record.links
        ],
        "state": record.state.value,
        "layers": list(record.layers) if record.layers else None,
        "loading_layers": list(record.loading_layers) if record.loading_layers else None,
        "free_kv_tokens": record.free_kv_tokens,
        "load": float(record.load),
        "joined_at": float(record.joined_at),
        "updated_at": float(record.updated_at),
        "refresh_s": float(record.refresh_s),
        "reachability": record.reachability.value,
        "dht_client_mode": record.dht_client_mode,
        "planner_eligible": record.planner_eligible,
        "addrs": list(record.addrs),
        "requests_started": record.requests_started,
        "tokens_generated": record.tokens_generated,
    }


def node_record_from_wire(doc: Any) -> NodeRecord:
    """Parse and check a node record as read from the DHT; raises RecordError."""
    f = _Fields("node record", doc)
    f.format_(NODE_FORMAT)
    peer_id = f.str_("peer_id", MAX_ID_CHARS, allow_empty=False)
    f.what = f"node record of {peer_id}"
    m = _Fields(f"{f.what}: model", f.raw("model"))
    model = ModelInfo(
        id=m.str_("id", MAX_ID_CHARS, allow_empty=False),
        num_layers=m.int_("num_layers", 1, MAX_LAYERS_TABLE),
        hidden_size=m.int_("hidden_size", 1, 2**20),
        dtype_bytes=m.int_("dtype_bytes", 1, 8),
    )
    max_layers = f.int_("max_layers", 1, MAX_LAYERS_TABLE)
    table = f.list_("tokens_per_s", MAX_LAYERS_TABLE)
    if len(table) < max_layers:
        raise f.fail("tokens_per_s", f"has {len(table)} entries but max_layers is {max_layers}")
    tokens_per_s = tuple(
        check_number(x, positive=True, fail=lambda p, i=i: f.fail(f"tokens_per_s[{i}]", p))
        for i, x in enumerate(table)
    )
    links = []
    seen_peers: set[str] = set()
    for i, item in enumerate(f.list_("links", MAX_LINKS)):
        where = f"links[{i}]"
        if not isinstance(item, (list, tuple)) or len(item) != 5:
            raise f.fail(where, "expected [peer, out_bytes_per_s, in_bytes_per_s, rtt_s, measured_at]")
        peer = check_str(item[0], MAX_ID_CHARS, allow_empty=False, fail=lambda p, w=where: f.fail(w, p))
        if peer in seen_peers or peer == peer_id:
            raise f.fail(where, f"duplicate or self link to {peer}")
        seen_peers.add(peer)
        numbers = [check_number(x, fail=lambda p, w=where: f.fail(w, p)) for x in item[1:]]
        links.append(LinkMeasurement(peer, *numbers))
    addrs = tuple(
        check_str(a, MAX_ADDR_CHARS, fail=lambda p, i=i: f.fail(f"addrs[{i}]", p))
        for i, a in enumerate(f.list_("addrs", MAX_ADDRS))
    )
    refresh_s = f.num("refresh_s", positive=True)
    if refresh_s > MAX_TTL_S:
        raise f.fail("refresh_s", f"must be <= {MAX_TTL_S}")
    return NodeRecord(
        peer_id=peer_id,
        name=f.str_("name", MAX_NAME_CHARS),
        version=f.str_("version", MAX_NAME_CHARS),
        model=model,
        gpu=f.str_("gpu", MAX_NAME_CHARS),
        memory_bytes=f.int_("memory_bytes", 0, 2**62),
        max_layers=max_layers,
        tokens_per_s=tokens_per_s,
        nic_in_bytes_per_s=f.num("nic_in_bytes_per_s", positive=True),
        nic_out_bytes_per_s=f.num("nic_out_bytes_per_s", positive=True),
        links=tuple(links),
        state=f.enum_("state", NodeState),
        layers=f.range_("layers", model.num_layers),
        loading_layers=f.range_("loading_layers", model.num_layers),
        free_kv_tokens=f.int_("free_kv_tokens", 0, 2**62),
        load=f.num("load"),
        joined_at=f.num("joined_at"),
        updated_at=f.num("updated_at"),
        refresh_s=refresh_s,
        reachability=f.enum_("reachability", Reachability),
        dht_client_mode=f.bool_("dht_client_mode"),
        planner_eligible=f.bool_("planner_eligible"),
        addrs=addrs,
        requests_started=f.int_("requests_started", 0, 2**62),
        tokens_generated=f.int_("tokens_generated", 0, 2**62),
    )


# ------------------------------------------------------------------------------------- plan records

_SOURCE_INDEX = -1
_SINK_INDEX = -2


def plan_body_bytes(record: PlanRecord) -> bytes:
    """The exact bytes a planner signs: canonical JSON (sorted keys, no spaces). Flows and placement
    name nodes by their index in `members` to keep 1,000-node plans small."""
    members = sorted(record.members)
    index = {peer: i for i, peer in enumerate(members)}
    missing = [peer for peer in record.placement if peer not in index]
    if missing:
        raise RecordError(f"plan epoch {record.epoch}: placed nodes {missing} are not members")

    def endpoint(name: str) -> int:
        if name == SOURCE:
            return _SOURCE_INDEX
        if name == SINK:
            return _SINK_INDEX
        if name not in index:
            raise RecordError(f"plan epoch {record.epoch}: flow endpoint {name!r} is not a member")
        return index[name]

    doc = {
        "format": PLAN_FORMAT,
        "epoch": record.epoch,
        "planner": record.planner,
        "model": record.model,
        "num_layers": record.num_layers,
        "method": record.method,
        "members": members,
        "placement": sorted([index[peer], start, end] for peer, (start, end) in record.placement.items()),
        "flows": [[endpoint(e.src), endpoint(e.dst), float(e.tokens_per_s)] for e in record.flows],
        "objective_tokens_per_s": float(record.objective_tokens_per_s),
        "upper_bound_tokens_per_s": (
            None if record.upper_bound_tokens_per_s is None else float(record.upper_bound_tokens_per_s)
        ),
        "solve_seconds": float(record.solve_seconds),
        "created_at": float(record.created_at),
        "partial_inference": record.partial_inference,
    }
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_PLAN_RECORD_BYTES:
        raise RecordError(f"plan epoch {record.epoch} is {len(body)} bytes, over {MAX_PLAN_RECORD_BYTES}")
    return body


def plan_record_from_body(body: bytes) -> PlanRecord:
    """Parse and check a plan's signed body; raises RecordError."""
    if not isinstance(body, bytes) or len(body) > MAX_PLAN_RECORD_BYTES:
        raise RecordError(f"plan record: body must be at most {MAX_PLAN_RECORD_BYTES} bytes")
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"plan record: body is not JSON: {e}") from None
    except RecursionError:
        raise RecordError("plan record: body is nested too deeply") from None
    f = _Fields("plan record", doc)
    f.format_(PLAN_FORMAT)
    epoch = f.int_("epoch", 0, MAX_EPOCH)
    f.what = f"plan record epoch {epoch}"
    num_layers = f.int_("num_layers", 1, MAX_LAYERS_TABLE)
    members = tuple(
        check_str(m, MAX_ID_CHARS, allow_empty=False, fail=lambda p, i=i: f.fail(f"members[{i}]", p))
        for i, m in enumerate(f.list_("members", MAX_MEMBERS))
    )
    if len(set(members)) != len(members):
        raise f.fail("members", "duplicate members")

    def member(i: Any, where: str) -> str:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(members):
            raise f.fail(where, f"not a member index: {i!r}")
        return members[i]

    placement: dict[str, tuple[int, int]] = {}
    for i, item in enumerate(f.list_("placement", MAX_MEMBERS)):
        where = f"placement[{i}]"
        if not isinstance(item, list) or len(item) != 3:
            raise f.fail(where, "expected [member, start, end]")
        peer = member(item[0], where)
        if peer in placement:
            raise f.fail(where, f"{peer} placed twice")
        placement[peer] = check_range(item[1:], num_layers, fail=lambda p, w=where: f.fail(w, p))

    def endpoint(i: Any, where: str) -> str:
        if i == _SOURCE_INDEX:
            return SOURCE
        if i == _SINK_INDEX:
            return SINK
        peer = member(i, where)
        if peer not in placement:
            raise f.fail(where, f"flow through {peer}, which holds no layers")
        return peer

    flows = []
    for i, item in enumerate(f.list_("flows", 16 * MAX_MEMBERS)):
        where = f"flows[{i}]"
        if not isinstance(item, list) or len(item) != 3:
            raise f.fail(where, "expected [src, dst, tokens_per_s]")
        src, dst = endpoint(item[0], where), endpoint(item[1], where)
        flows.append(EdgeFlow(src, dst, check_number(item[2], fail=lambda p, w=where: f.fail(w, p))))
    return PlanRecord(
        epoch=epoch,
        planner=f.str_("planner", MAX_ID_CHARS, allow_empty=False),
        model=f.str_("model", MAX_ID_CHARS, allow_empty=False),
        num_layers=num_layers,
        method=f.str_("method", MAX_NAME_CHARS),
        members=members,
        placement={NodeId(peer): span for peer, span in placement.items()},
        flows=tuple(flows),
        objective_tokens_per_s=f.num("objective_tokens_per_s"),
        upper_bound_tokens_per_s=f.num("upper_bound_tokens_per_s", optional=True),
        solve_seconds=f.num("solve_seconds"),
        created_at=f.num("created_at"),
        partial_inference=f.bool_("partial_inference"),
    )


def signed_plan_to_wire(plan: SignedPlan) -> dict[str, Any]:
    return {"body": plan.body, "public_key": plan.public_key, "signature": plan.signature}


def signed_plan_parts_from_wire(doc: Any) -> tuple[bytes, bytes, bytes]:
    """(body, public_key, signature) of a wire plan, type- and size-checked; the signature is
    checked by `helix_p2p.swarm.signing.verify_plan`."""
    f = _Fields("plan record", doc)
    parts = []
    for key, limit in (("body", MAX_PLAN_RECORD_BYTES), ("public_key", 4096), ("signature", 4096)):
        value = f.raw(key)
        if not isinstance(value, bytes):
            raise f.fail(key, f"expected bytes, got {type(value).__name__}")
        if len(value) > limit:
            raise f.fail(key, f"longer than {limit} bytes")
        parts.append(value)
    return parts[0], parts[1], parts[2]
