"""Churn schedules (`helix-churn/1`): nodes that leave or join a simulated swarm at given times.

```json
{"format": "helix-churn/1",
 "events": [{"time_s": 120, "leave": ["a100-0"]}, {"time_s": 300, "join": ["a100-0"]}],
 "initially_absent": ["t4-11"],
 "replan": {"method": "swarm", "time_limit_s": 30},
 "load_s_per_layer": 1.5}
```
- `events`: at `time_s`, the nodes in `leave` disappear at once (their KV caches with them) and the
  nodes in `join` (from the cluster file) arrive with no layers. After each event the simulator
  re-plans with `replan` (default: the plan's own method, else `swarm`).
- `initially_absent`: cluster nodes that are not there at time 0 (they may `join` later).
- `load_s_per_layer`: seconds a node needs to load one layer's weights after a re-plan gives it
  a new range (default: from the GPU profile, layer bytes / disk bytes/s)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from helix_p2p.cluster import Cluster, NodeId
from helix_p2p.errors import HelixError

CHURN_FORMAT = "helix-churn/1"


class ChurnError(HelixError):
    """A churn file that does not follow `helix-churn/1`, or names nodes the cluster lacks."""


@dataclass(frozen=True)
class ChurnEvent:
    time_s: float
    leave: tuple[NodeId, ...] = ()
    join: tuple[NodeId, ...] = ()


@dataclass(frozen=True)
class ChurnSchedule:
    events: tuple[ChurnEvent, ...]
    initially_absent: tuple[NodeId, ...] = ()
    replan_method: str | None = None
    replan_time_limit_s: float = 30.0
    load_s_per_layer: float | None = None

    def check_against(self, cluster: Cluster) -> None:
        known = cluster.node_by_id
        for where, ids in [("initially_absent", self.initially_absent)] + [
            (f"events[{i}]", e.leave + e.join) for i, e in enumerate(self.events)
        ]:
            for node_id in ids:
                if node_id not in known:
                    raise ChurnError(f"churn {where}: node {node_id!r} is not in cluster {cluster.name!r}")


def _ids(value: Any, where: str) -> tuple[NodeId, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ChurnError(f"churn {where}: expected a list of node ids")
    return tuple(NodeId(v) for v in value)


def _number(value: Any, where: str, minimum: float = 0.0) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < minimum
    ):
        raise ChurnError(f"churn {where}: expected a number >= {minimum}, got {value!r}")
    return float(value)


def parse_churn(doc: Any, where: str = "<churn>") -> ChurnSchedule:
    if not isinstance(doc, dict):
        raise ChurnError(f"{where}: expected a JSON object")
    if doc.get("format") != CHURN_FORMAT:
        raise ChurnError(f"{where}: field 'format' must be {CHURN_FORMAT!r}, got {doc.get('format')!r}")
    raw_events = doc.get("events")
    if not isinstance(raw_events, list):
        raise ChurnError(f"{where}: field 'events' must be a list")
    events = []
    for i, item in enumerate(raw_events):
        if not isinstance(item, dict):
            raise ChurnError(f"{where}: events[{i}] must be an object")
        unknown = set(item) - {"time_s", "leave", "join"}
        if unknown:
            raise ChurnError(f"{where}: events[{i}] has unknown fields {sorted(unknown)}")
        event = ChurnEvent(
            time_s=_number(item.get("time_s"), f"events[{i}].time_s"),
            leave=_ids(item.get("leave"), f"events[{i}].leave"),
            join=_ids(item.get("join"), f"events[{i}].join"),
        )
        if not event.leave and not event.join:
            raise ChurnError(f"{where}: events[{i}] neither leaves nor joins")
        events.append(event)
    replan = doc.get("replan") or {}
    if not isinstance(replan, dict):
        raise ChurnError(f"{where}: field 'replan' must be an object")
    method = replan.get("method")
    if method is not None and not isinstance(method, str):
        raise ChurnError(f"{where}: replan.method must be a string")
    load = doc.get("load_s_per_layer")
    return ChurnSchedule(
        events=tuple(sorted(events, key=lambda e: e.time_s)),
        initially_absent=_ids(doc.get("initially_absent"), "initially_absent"),
        replan_method=method,
        replan_time_limit_s=_number(replan.get("time_limit_s", 30.0), "replan.time_limit_s"),
        load_s_per_layer=None if load is None else _number(load, "load_s_per_layer"),
    )


def read_churn(path: str | Path) -> ChurnSchedule:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as e:
        raise ChurnError(f"{path}: cannot read: {e.strerror or e}") from e
    except ValueError as e:
        raise ChurnError(f"{path}: not valid JSON: {e}") from e
    return parse_churn(doc, str(path))
