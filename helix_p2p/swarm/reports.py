"""Reports of lying peers (`--verify-rate`) and the rule that turns them into bans.

A client whose verification caught a peer answering wrong numbers (`helix_p2p.client.verify`)
writes a report to `<prefix>/reports` under its own owner subkey: one entry per reporter holding
its most recent accusations. hivemind's owner-subkey signature makes the entry writable only by the
reporter's key, and `SwarmRecordValidator` binds the entry's `reporter` to that key, checks this
schema and caps its size, so a report is signed by its reporter and cannot be forged for another.

Reports are weighed, never trusted one by one (`banned_peers`): a peer is banned when at least
`min_reporters` distinct reporters accused it within `max_age_s`; a reporter's accusations of
itself do not count, each reporter holds at most MAX_ACCUSED accusations, and at most a share of
the members can be banned at once (the most-reported first), so one client, or a handful of fake
identities below the threshold, cannot ban the swarm. Clients apply the rule to routing and the
elected planner to the members it plans over. Pure: no hivemind import."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from helix_p2p.swarm.records import MAX_ID_CHARS, MAX_TTL_S, RecordError, _Fields, check_number, check_str

REPORT_FORMAT = "helix-report/1"
#: accusations one reporter's entry may hold (its most recent); bounds what one reporter can ban
MAX_ACCUSED = 8
MAX_REASON_CHARS = 200
#: a serialized report entry is at most this large (8 accusations with reasons take ~3 KiB)
MAX_REPORT_RECORD_BYTES = 6 * 1024
#: distinct reporters needed to ban a peer, unless configured otherwise
DEFAULT_MIN_REPORTERS = 2
#: an accusation counts for this long (the DHT entry lives no longer: MAX_TTL_S)
DEFAULT_REPORT_MAX_AGE_S = MAX_TTL_S
#: at most this share of the members is banned at once
MAX_BANNED_SHARE = 0.5
#: an accusation dated this far in the future is refused (clock skew allowance)
CLOCK_SLACK_S = 60.0


@dataclass(frozen=True)
class Accusation:
    """`peer_id` answered a verified computation wrongly (`reason` says how) at `reported_at`."""

    peer_id: str
    reported_at: float
    reason: str


@dataclass(frozen=True)
class ReportRecord:
    reporter: str
    model: str
    accusations: tuple[Accusation, ...]


def report_to_wire(record: ReportRecord) -> dict[str, Any]:
    if len(record.accusations) > MAX_ACCUSED:
        raise RecordError(f"a report holds at most {MAX_ACCUSED} accusations, got {len(record.accusations)}")
    return {
        "format": REPORT_FORMAT,
        "reporter": record.reporter,
        "model": record.model,
        "accused": [
            [a.peer_id, float(a.reported_at), a.reason[:MAX_REASON_CHARS]] for a in record.accusations
        ],
    }


def report_from_wire(doc: Any) -> ReportRecord:
    """Parse and check a report as read from the DHT; raises RecordError naming the field."""
    f = _Fields("report", doc)
    f.format_(REPORT_FORMAT)
    reporter = f.str_("reporter", MAX_ID_CHARS, allow_empty=False)
    f.what = f"report by {reporter}"
    model = f.str_("model", MAX_ID_CHARS, allow_empty=False)
    accusations = []
    seen: set[str] = set()
    for i, item in enumerate(f.list_("accused", MAX_ACCUSED)):
        where = f"accused[{i}]"
        if not isinstance(item, (list, tuple)) or len(item) != 3:
            raise f.fail(where, "expected [peer_id, reported_at, reason]")
        peer = check_str(item[0], MAX_ID_CHARS, allow_empty=False, fail=lambda p, w=where: f.fail(w, p))
        if peer in seen:
            raise f.fail(where, f"{peer} accused twice")
        seen.add(peer)
        at = check_number(item[1], fail=lambda p, w=where: f.fail(w, p))
        reason = check_str(item[2], MAX_REASON_CHARS, fail=lambda p, w=where: f.fail(w, p))
        accusations.append(Accusation(peer, at, reason))
    return ReportRecord(reporter, model, tuple(accusations))


def with_accusation(
    record: ReportRecord | None, reporter: str, model: str, accusation: Accusation
) -> ReportRecord:
    """A reporter's entry with one more accusation (replacing an older one of the same peer),
    keeping the MAX_ACCUSED most recent."""
    old = () if record is None else tuple(a for a in record.accusations if a.peer_id != accusation.peer_id)
    kept = sorted((*old, accusation), key=lambda a: a.reported_at)[-MAX_ACCUSED:]
    return ReportRecord(reporter, model, tuple(kept))


@dataclass(frozen=True)
class BanRule:
    #: distinct reporters needed to ban a peer
    min_reporters: int = DEFAULT_MIN_REPORTERS
    #: accusations older than this are forgotten
    max_age_s: float = DEFAULT_REPORT_MAX_AGE_S
    #: at most this share of the members is banned at once (rounded down, at least one)
    max_banned_share: float = MAX_BANNED_SHARE

    def __post_init__(self) -> None:
        if type(self.min_reporters) is not int or self.min_reporters < 1:
            raise ValueError(f"min_reporters must be an int >= 1, got {self.min_reporters!r}")
        if not (math.isfinite(self.max_age_s) and self.max_age_s > 0):
            raise ValueError(f"max_age_s must be a positive number, got {self.max_age_s!r}")
        if not 0 < self.max_banned_share <= 1:
            raise ValueError(f"max_banned_share must be in (0, 1], got {self.max_banned_share!r}")


def reporters_by_peer(
    reports: Iterable[ReportRecord], now: float, model_id: str, rule: BanRule
) -> Counter[str]:
    """How many distinct reporters accuse each peer, counting only current accusations about
    `model_id` by someone other than the accused."""
    counts: Counter[str] = Counter()
    seen: set[tuple[str, str]] = set()
    for report in reports:
        if report.model != model_id:
            continue
        for a in report.accusations[:MAX_ACCUSED]:
            fresh = now - rule.max_age_s <= a.reported_at <= now + CLOCK_SLACK_S
            if fresh and a.peer_id != report.reporter and (report.reporter, a.peer_id) not in seen:
                seen.add((report.reporter, a.peer_id))
                counts[a.peer_id] += 1
    return counts


def banned_peers(
    reports: Iterable[ReportRecord],
    now: float,
    model_id: str,
    rule: BanRule = BanRule(),
    members: Collection[str] | None = None,
) -> frozenset[str]:
    """The peers to keep out of routes and plans. With `members` (the peers that could serve),
    at most `max_banned_share` of them is banned, the most-reported first (ties by peer id), so
    that a flood of reports cannot empty the swarm."""
    counts = reporters_by_peer(reports, now, model_id, rule)
    over = sorted((p for p, n in counts.items() if n >= rule.min_reporters), key=lambda p: (-counts[p], p))
    if members is None:
        return frozenset(over)
    members = set(members)
    cap = max(1, math.floor(rule.max_banned_share * len(members)))
    return frozenset([p for p in over if p in members][:cap])
