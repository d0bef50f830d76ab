"""The swarm's control plane as a library: the state the swarm keeps in hivemind's DHT and the rules
every peer applies to it (DESIGN.md, "Swarm state in the DHT", "Election and re-planning").

Pure modules (no network, no hivemind import; exported here):
- `records`: node and plan records, their wire form, size caps and schema checks
- `keys`: DHT key names under the swarm prefix
- `election`: who plans, which plan a node follows, the next epoch
- `cluster_view`: the live registry as the planner's `Cluster`
- `replan`: when to re-plan and whether a new plan is worth its moves
- `probing`: which peers a node measures its links to

Modules that use hivemind (import them directly; hivemind pulls in torch):
- `identity`: the RSA key that is both the libp2p identity and the record-signing key
- `signing`: plan signatures; `validator`: the checks every DHT peer runs on swarm records
- `dht`: start a swarm peer, announce, publish, read; `probe`: RTT and bandwidth probes;
  `reachability`: dial-back checks (directly reachable or only through a relay)"""

from helix_p2p.swarm.cluster_view import planning_members, registry_to_cluster
from helix_p2p.swarm.election import choose_plan, elect_planner, next_epoch
from helix_p2p.swarm.keys import DEFAULT_PREFIX, check_prefix, plan_key, registry_key, registry_keys
from helix_p2p.swarm.records import (
    LinkMeasurement,
    ModelInfo,
    NodeRecord,
    NodeState,
    PlanRecord,
    Reachability,
    RecordError,
    SignedPlan,
)
from helix_p2p.swarm.replan import MembershipWatch, previous_plan_on, worth_adopting

__all__ = [
    "DEFAULT_PREFIX",
    "LinkMeasurement",
    "MembershipWatch",
    "ModelInfo",
    "NodeRecord",
    "NodeState",
    "PlanRecord",
    "Reachability",
    "RecordError",
    "SignedPlan",
    "check_prefix",
    "choose_plan",
    "elect_planner",
    "next_epoch",
    "plan_key",
    "planning_members",
    "previous_plan_on",
    "registry_key",
    "registry_keys",
    "registry_to_cluster",
    "worth_adopting",
]
