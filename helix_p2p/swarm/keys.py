"""Key names of the swarm's state in the DHT, all under one swarm prefix (default `helix`).

- `<prefix>/nodes/<shard>`: the node registry, one subkey per peer (its owner key). DESIGN.md names
  one key, `<prefix>/nodes`; we spread it over REGISTRY_SHARDS keys because one DHT value with
  1,000 subkeys of ~3 KiB each would pass hivemind's 4 MiB message cap. A peer's shard is fixed
  by its id, and readers fetch all shards in one batched lookup.
- `<prefix>/plan`: plans, one subkey per planner (its owner key); nodes follow the newest one from
  the elected planner.
- `<prefix>/reports`: reports of peers caught lying, one subkey per reporter (its owner key);
  weighed by `helix_p2p.swarm.reports.banned_peers`."""

from __future__ import annotations

import hashlib
import re

from helix_p2p.errors import HelixError

DEFAULT_PREFIX = "helix"
REGISTRY_SHARDS = 16
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class SwarmPrefixError(HelixError, ValueError):
    """A swarm prefix that cannot name DHT keys."""


def check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise SwarmPrefixError(
            f"bad swarm prefix {prefix!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return prefix


def registry_shard(peer_id: str) -> int:
    return hashlib.sha256(peer_id.encode()).digest()[0] % REGISTRY_SHARDS


def registry_key(prefix: str, peer_id: str) -> str:
    """The registry key that holds `peer_id`'s record."""
    return f"{check_prefix(prefix)}/nodes/{registry_shard(peer_id)}"


def registry_keys(prefix: str) -> list[str]:
    check_prefix(prefix)
    return [f"{prefix}/nodes/{shard}" for shard in range(REGISTRY_SHARDS)]


def plan_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}/plan"


def reports_key(prefix: str) -> str:
    return f"{check_prefix(prefix)}/reports"
