"""What the elected node does as planner (DESIGN.md, "Election and re-planning").

Each registry read, the node that the election rule picks calls `tick`:
- it takes over at once when the plan being followed is another planner's (the old one left);
- it re-plans when the members differ from those the current plan was made for (a peer banned
  for lying, `helix_p2p.swarm.reports`, is no member), once the
  difference has held for the debounce period (a first plan waits the same way, so a swarm that
  is still starting up is not planned once per arriving node);
- every `replan_period_s` it solves again and adopts the result only if the gain pays for the
  layers it moves (`helix_p2p.swarm.replan.worth_adopting`);
- otherwise it re-publishes its current plan so that the record never expires while it lives.
Solves run in a worker thread as a background task; one at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from helix_p2p.plan import PlanError
from helix_p2p.planner import PlanOptions
from helix_p2p.planner import plan as solve
from helix_p2p.swarm.cluster_view import planning_members, registry_to_cluster
from helix_p2p.swarm.election import next_epoch
from helix_p2p.swarm.identity import Identity
from helix_p2p.swarm.records import NodeRecord, PlanRecord, SignedPlan, moved_layers
from helix_p2p.swarm.replan import MembershipWatch, plan_record_of, previous_plan_on, worth_adopting
from helix_p2p.swarm.signing import sign_plan

from .config import PlannerOptions

logger = logging.getLogger(__name__)


class PlannerRole:
    def __init__(
        self,
        identity: Identity,
        model_id: str,
        options: PlannerOptions,
        refresh_s: float,
        publish: Callable[[SignedPlan], Awaitable[bool]],
        follow: Callable[[PlanRecord], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.model_id = model_id
        self.options = options
        self.refresh_s = refresh_s
        self.publish = publish
        self.follow = follow
        self.clock = clock
        self.watch = MembershipWatch(options.debounce_s)
        self.current: SignedPlan | None = None
        self.last_published_at = float("-inf")
        self.last_periodic_at: float | None = None
        #: the member set the planner failed on (cannot hold the model): not retried until it changes
        self.failed_members: frozenset[str] | None = None
        self.task: asyncio.Task | None = None

    @property
    def me(self) -> str:
        return self.identity.peer_id

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def tick(
        self,
        records: Mapping[str, NodeRecord],
        plans: list[PlanRecord],
        followed: PlanRecord | None,
        now: float,
        banned: frozenset[str] = frozenset(),
    ) -> None:
        members = planning_members(records, now, self.model_id, banned)
        if not members or self.busy:
            return
        member_set = frozenset(members)
        stable = self.watch.observe(member_set, now)
        if self.last_periodic_at is None:
            self.last_periodic_at = now
        takeover = followed is not None and followed.planner != self.me
        changed = followed is None or frozenset(followed.members) != member_set
        if takeover or changed:
            if not takeover and stable is None:
                return
            if member_set == self.failed_members:
                return
            reason = "takeover" if takeover else ("first plan" if followed is None else "membership changed")
            self._start(members, plans, followed, reason, must_publish=True)
        elif now - self.last_periodic_at >= self.options.replan_period_s:
            self.last_periodic_at = now
            self._start(members, plans, followed, "periodic", must_publish=False)
        elif self.current is not None and now - self.last_published_at >= self.refresh_s:
            self.task = asyncio.create_task(self._republish())

    def _start(self, members, plans, followed, reason: str, *, must_publish: bool) -> None:
        self.task = asyncio.create_task(
            self._solve(dict(members), list(plans), followed, reason, must_publish)
        )

    async def _solve(
        self,
        members: dict[str, NodeRecord],
        plans: list[PlanRecord],
        followed: PlanRecord | None,
        reason: str,
        must_publish: bool,
    ) -> None:
        member_set = frozenset(members)
        cluster = registry_to_cluster(members, name=f"swarm-{self.model_id}")
        previous = previous_plan_on(cluster, followed)
        options = PlanOptions(method=self.options.method, time_limit_s=self.options.time_limit_s)
        try:
            new = await asyncio.to_thread(solve, cluster, options, previous)
        except PlanError as e:
            self.failed_members = member_set
            logger.warning("cannot plan %d nodes (%s): %s", len(members), reason, e)
            return
        self.failed_members = None
        moved = moved_layers(previous.placement if previous else {}, new.placement)
        if (
            not must_publish
            and previous is not None
            and not worth_adopting(
                previous.objective_tokens_per_s, new.objective_tokens_per_s, moved, self.options.min_gain
            )
        ):
            logger.info(
                "periodic re-plan kept epoch %d: %.1f tokens/s now, %.1f possible by moving %d layers",
                followed.epoch if followed else 0,
                previous.objective_tokens_per_s,
                new.objective_tokens_per_s,
                moved,
            )
            return
        record = plan_record_of(
            new,
            epoch=next_epoch(plans, self.me, followed),
            planner=self.me,
            model=self.model_id,
            num_layers=cluster.model.num_layers,
            members=member_set,
            created_at=self.clock(),
        )
        signed = sign_plan(record, self.identity)
        self.current = signed
        await self._publish_current()
        bound = record.upper_bound_tokens_per_s
        logger.info(
            "published plan epoch %d (%s): %d nodes, %d holding layers, flow %.1f tokens/s, bound %s, "
            "%d layers moved, method %s, solved in %.2f s",
            record.epoch,
            reason,
            len(record.members),
            len(record.placement),
            record.objective_tokens_per_s,
            "none" if bound is None else f"{bound:.1f}",
            moved,
            record.method,
            record.solve_seconds,
        )
        self.follow(record)

    async def _publish_current(self) -> None:
        if self.current is None:
            return
        ok = await self.publish(self.current)
        self.last_published_at = self.clock()
        if not ok:
            logger.warning(
                "no DHT peer accepted plan epoch %d; retrying at the next refresh", self.current.record.epoch
            )

    async def _republish(self) -> None:
        await self._publish_current()

    def stop(self) -> None:
        """No longer the planner (another was elected, or this node leaves)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
        self.current = None
        self.last_periodic_at = None
