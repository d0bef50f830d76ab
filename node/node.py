"""A volunteer node: joins the swarm, announces itself, measures its links, follows the plan of the
elected planner (planning itself when elected), loads the layers it is given, and leaves cleanly.

One asyncio loop runs it all (hivemind's DHT peer included); blocking work (loading layers,
solving) runs in worker threads. Tasks:
- announce: re-store the node's record every refresh period, and at once on any state change;
- watch: read the registry and the plans, elect, follow the newest plan of the elected planner,
  and, when elected, let the planner role act;
- probe: measure RTT and bandwidth to a few peers (`helix_p2p.swarm.probing`);
- layers: load what the followed plan assigns, make before break (`layers.LayerHost`).
The data plane (`serving`) serves inference sessions on the loaded layers; SIGINT/SIGTERM closes
admissions (`sessions.SessionGate`) and lets running sessions finish within the grace period."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time

from helix_p2p import __version__
from helix_p2p.swarm.cluster_view import planning_members
from helix_p2p.swarm.dht import NetworkOptions, SwarmDHT
from helix_p2p.swarm.election import choose_plan, elect_planner
from helix_p2p.swarm.identity import Identity
from helix_p2p.swarm.probe import ProbeError, ProbeServer, measure_link
from helix_p2p.swarm.probing import choose_probe_targets, links_to_announce, plan_neighbors
from helix_p2p.swarm.reachability import ReachServer, ask_dial_back
from helix_p2p.swarm.records import (
    MAX_ADDR_CHARS,
    MAX_ADDRS,
    MAX_LINKS,
    LinkMeasurement,
    ModelInfo,
    NodeRecord,
    NodeState,
    PlanRecord,
    Reachability,
)
from helix_p2p.swarm.relay import (
    RELAYED_PROBE_BYTES,
    RelayDialer,
    RelayError,
    Reservation,
    circuit_addr,
    relayed_connection,
    relayed_targets,
    reserve,
)
from helix_p2p.swarm.reports import BanRule, banned_peers

from .config import NodeConfig
from .layers import LayerHost, LayerLoader
from .metrics import NodeMetrics
from .planner_role import PlannerRole
from .serving import DataPlane, attach_data_plane
from .sessions import SessionGate
from .state import derive_state

logger = logging.getLogger(__name__)

#: after the last session closes, how long replies in flight get before the daemon stops
REPLY_LINGER_S = 0.5
#: a NIC figure to announce before any link has been measured (1 Gbit/s)
DEFAULT_NIC_BYTES_PER_S = 1.25e8
#: seconds to wait for a connection through a relay
RELAY_DIAL_TIMEOUT_S = 10.0
#: record stores running at once (a slow one must not delay the next refresh)
ANNOUNCES_IN_FLIGHT = 3


class Node:
    def __init__(
        self,
        config: NodeConfig,
        identity: Identity,
        model: ModelInfo,
        tokens_per_s: tuple[float, ...],
        max_layers: int,
        gpu: str,
        memory_bytes: int,
        loader: LayerLoader,
    ) -> None:
        self.config = config
        self.identity = identity
        self.model = model
        self.tokens_per_s = tokens_per_s
        self.max_layers = max_layers
        self.gpu = gpu
        self.memory_bytes = memory_bytes
        self.dht: SwarmDHT | None = None
        self.data_plane: DataPlane | None = None
        self.metrics = NodeMetrics()
        self.layers = LayerHost(loader, on_change=self._changed)
        self.sessions = SessionGate()
        self.planner = PlannerRole(
            identity,
            model.id,
            config.planner,
            config.refresh_period_s,
            publish=self._publish_plan,
            follow=self._follow,
        )
        self.joined_at = time.time()
        self.leaving = False
        self.state = NodeState.JOINING
        self.followed: PlanRecord | None = None
        self.elected: str | None = None
        self.records: dict[str, NodeRecord] = {}
        self.measurements: dict[str, LinkMeasurement] = {}
        self.last_probed: dict[str, float] = {}
        self.reachability = Reachability.UNKNOWN
        self.addrs: tuple[str, ...] = ()
        self._announce_now = asyncio.Event()
        self._stop = asyncio.Event()
        #: a second signal: stop waiting for running sessions
        self._hurry = asyncio.Event()
        self._rng = random.Random(identity.peer_id)
        self._last_banned: frozenset[str] = frozenset()
        self.relay_dialer: RelayDialer | None = None
        #: the watch loop's background dial to relayed plan neighbours (one at a time)
        self._reaching: asyncio.Task | None = None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id

    # ------------------------------------------------------------------------------------- life

    async def run(self) -> int:
        """Join, serve until SIGINT/SIGTERM, leave. Returns the exit code (0)."""
        c = self.config
        options = NetworkOptions(
            host=c.host,
            port=c.port,
            announce_addrs=c.announce_addrs,
            client_mode=c.client_mode,
            use_relay=c.use_relay,
            use_auto_relay=c.use_auto_relay,
            no_listen=c.no_listen,
            # A node that accepts no inbound connection is private by definition; telling libp2p so
            # makes it reserve a relay slot at once instead of waiting for AutoNAT to find out.
            force_reachability=c.force_reachability or ("private" if c.no_listen else None),
            connect_timeout_s=c.connect_timeout_s,
            rpc_timeout_s=c.rpc_timeout_s,
            check_identity_free=c.identity is not None,
            swarm_key=c.load_swarm_key(),
        )
        self._install_signal_handlers()
        joining = asyncio.create_task(SwarmDHT.start(self.identity, c.swarm, c.initial_peers, options))
        stop = asyncio.create_task(self._stop.wait())
        await asyncio.wait([joining, stop], return_when=asyncio.FIRST_COMPLETED)
        if not joining.done():
            joining.cancel()
            await asyncio.gather(joining, return_exceptions=True)
            logger.info("stopped while joining")
            return 0
        stop.cancel()
        self.dht = joining.result()
        self.relay_dialer = RelayDialer(
            self.dht.p2p, timeout_s=min(c.connect_timeout_s, RELAY_DIAL_TIMEOUT_S)
        )
        tasks: list[asyncio.Task] = []
        metrics_site = None
        try:
            await ProbeServer().register(self.dht.p2p)
            await ReachServer().register(self.dht.p2p)
            self.data_plane = await attach_data_plane(
                self.dht.p2p,
                self._served_shards,
                gate=self.sessions,
                metrics=self.metrics,
                perturb_scale=c.test_perturb_scale,
            )
            metrics_site = await self._serve_metrics()
            self.addrs = await self._visible_addrs()
            self.joined_at = time.time()
            logger.info(
                "joined swarm %r as %s (%s), model %s: %d layers max, %s",
                c.swarm, self.peer_id, c.public_name or "no public name", self.model.id, self.max_layers,
                ", ".join(self.addrs) or "no direct address",
            )  # fmt: skip
            await self._announce()
            loops = [
                asyncio.create_task(self._announce_loop(), name="announce"),
                asyncio.create_task(self._watch_loop(), name="watch"),
                asyncio.create_task(self._probe_loop(), name="probe"),
                asyncio.create_task(self._check_reachability(), name="reachability"),
            ]
            tasks = [*loops, asyncio.create_task(self.layers.run(), name="layers")]
            crashed: list[BaseException] = []

            def watch(task: asyncio.Task) -> None:
                if not task.cancelled() and task.exception() is not None:
                    logger.error("the %s task failed: %r", task.get_name(), task.exception())
                    crashed.append(task.exception())
                    self._stop.set()

            for task in tasks:
                task.add_done_callback(watch)
            await self._stop.wait()
            if crashed:
                raise crashed[0]
            # Quiet the loops first so that the "leaving" record is the last one this node writes;
            # the layers stay loaded for the sessions that finish during the grace period.
            for task in loops:
                task.cancel()
            await asyncio.gather(*loops, return_exceptions=True)
            await self._leave()
            return 0
        finally:
            self.planner.stop()
            if self._reaching is not None:
                tasks.append(self._reaching)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if metrics_site is not None:
                await metrics_site.cleanup()
            if self.data_plane is not None:
                await self.data_plane.close()
            await self.layers.close()
            await self.dht.shutdown()

    async def _serve_metrics(self):
        """Prometheus' /metrics on --metrics-port (None when not asked for)."""
        if self.config.metrics_port is None:
            return None
        from aiohttp import web

        from helix_p2p.web import add_metrics_route, start_site

        def kv_used() -> int:
            return 0 if self.layers.handle is None else int(self.layers.handle.reserved_kv_tokens)

        self.metrics.watch(lambda: self.sessions.running, kv_used, self.layers.free_kv_tokens)
        app = web.Application()
        add_metrics_route(app, self.metrics.registry)
        c = self.config
        site = await start_site(app, c.metrics_host, c.metrics_port, "metrics")
        logger.info("metrics at http://%s:%d/metrics", c.metrics_host, c.metrics_port)
        return site

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop.is_set():
            logger.warning("second %s: leaving without waiting for sessions", sig.name)
            self._hurry.set()
            return
        logger.info("%s: leaving the swarm", sig.name)
        self._stop.set()

    async def _leave(self) -> None:
        self.leaving = True
        self.planner.stop()
        self.sessions.close()
        self._update_state()
        try:
            await asyncio.wait_for(self._announce(), timeout=max(5.0, self.config.rpc_timeout_s * 2))
        except asyncio.TimeoutError:
            logger.warning(
                "could not announce leaving in time; peers will drop this node when its record goes stale"
            )
        drain = asyncio.create_task(self.sessions.drain(self.config.grace_s))
        hurry = asyncio.create_task(self._hurry.wait())
        await asyncio.wait([drain, hurry], return_when=asyncio.FIRST_COMPLETED)
        for task in (drain, hurry):
            task.cancel()
        remaining = self.sessions.running
        # The last session's close releases its slot before its reply is written back; give that
        # reply a moment on the wire before the p2p daemon goes down.
        await asyncio.sleep(REPLY_LINGER_S)
        if remaining:
            logger.warning(
                "left with %d sessions still running after the %.0f s grace period",
                remaining,
                self.config.grace_s,
            )
        logger.info("left swarm %r", self.config.swarm)

    async def _visible_addrs(self) -> tuple[str, ...]:
        """Addresses for the record: relayed ones first (they are how a NATed node is reached)."""
        addrs = [a for a in await self.dht.visible_maddrs() if len(a) <= MAX_ADDR_CHARS]
        addrs.sort(key=lambda a: "p2p-circuit" not in a)
        return tuple(addrs[:MAX_ADDRS])

    # --------------------------------------------------------------------------------- announce

    def record(self, now: float | None = None) -> NodeRecord:
        now = time.time() if now is None else now
        nic_in, nic_out = self._nic_bytes_per_s()
        return NodeRecord(
            peer_id=self.peer_id,
            name=self.config.public_name,
            version=__version__,
            model=self.model,
            gpu=self.gpu,
            memory_bytes=self.memory_bytes,
            max_layers=self.max_layers,
            tokens_per_s=self.tokens_per_s[: self.max_layers],
            nic_in_bytes_per_s=nic_in,
            nic_out_bytes_per_s=nic_out,
            links=links_to_announce(
                self.measurements,
                self.records,
                now=now,
                max_links=MAX_LINKS,
                max_age_s=self.config.probe_max_age_s,
                preferred=plan_neighbors(self.peer_id, self.followed),
            ),
            state=self.state,
            layers=self.layers.served,
            loading_layers=self.layers.loading,
            free_kv_tokens=self.layers.free_kv_tokens(),
            load=float(self.sessions.running),
            joined_at=self.joined_at,
            updated_at=now,
            refresh_s=self.config.refresh_period_s,
            reachability=self.reachability,
            dht_client_mode=self.config.client_mode,
            planner_eligible=self.config.planner_eligible and not self.leaving,
            addrs=self.addrs,
            requests_started=self.metrics.requests_started,
            tokens_generated=self.metrics.tokens_generated,
        )

    def _nic_bytes_per_s(self) -> tuple[float, float]:
        if self.config.nic_bytes_per_s is not None:
            return self.config.nic_bytes_per_s, self.config.nic_bytes_per_s
        if not self.measurements:
            return DEFAULT_NIC_BYTES_PER_S, DEFAULT_NIC_BYTES_PER_S
        # The fastest link seen is a lower bound on the NIC; unmeasured pairs are estimated from it.
        return (
            max(m.in_bytes_per_s for m in self.measurements.values()),
            max(m.out_bytes_per_s for m in self.measurements.values()),
        )

    async def _announce(self) -> None:
        record = self.record()
        ok = await self.dht.announce(record, self.config.ttl_s)
        if not ok:
            logger.warning("no DHT peer accepted this node's record; retrying at the next refresh")

    async def _announce_loop(self) -> None:
        # A store can take seconds (a busy machine, dead DHT peers to time out on). Awaited here, it
        # stretched the gap between records to a period plus the store, past the two periods after
        # which readers count a record stale: live nodes dropped out of elections and plans under
        # churn. So refreshes keep their period and a slow store runs alongside the next one (the
        # newer record wins in the DHT by its later expiration).
        in_flight: set[asyncio.Task] = set()

        def stored(task: asyncio.Task) -> None:
            in_flight.discard(task)
            if not task.cancelled() and task.exception() is not None:
                logger.warning(
                    "announcing this node failed: %r; retrying at the next refresh", task.exception()
                )

        try:
            while True:
                try:
                    await asyncio.wait_for(self._announce_now.wait(), timeout=self.config.refresh_period_s)
                except asyncio.TimeoutError:
                    pass  # the periodic refresh
                self._announce_now.clear()
                if len(in_flight) >= ANNOUNCES_IN_FLIGHT:
                    await asyncio.wait(set(in_flight), return_when=asyncio.FIRST_COMPLETED)
                task = asyncio.create_task(self._announce(), name="announce-store")
                in_flight.add(task)
                task.add_done_callback(stored)
        finally:
            for task in list(in_flight):
                task.cancel()

    def _changed(self) -> None:
        self._update_state()
        self._announce_now.set()

    def _update_state(self) -> None:
        state = derive_state(
            leaving=self.leaving,
            serving=self.layers.served is not None,
            loading=self.layers.loading is not None or self.layers.target not in (None, self.layers.served),
            has_plan=self.followed is not None,
        )
        if state != self.state:
            logger.info("state %s -> %s", self.state.value, state.value)
            self.state = state
            self._announce_now.set()

    # ------------------------------------------------------------------------------------ watch

    async def _watch_loop(self) -> None:
        read_timeout_s = 4 * self.config.rpc_timeout_s + 5
        while True:
            # Records are judged at the time the read began: one that takes seconds (a busy machine)
            # must not age every record by its own length and make live nodes look stale.
            now = time.time()
            try:
                records, signed = await asyncio.wait_for(self.dht.read(), timeout=read_timeout_s)
            except asyncio.TimeoutError:
                logger.warning("reading the registry took over %.0f s; trying again", read_timeout_s)
                continue
            records[self.peer_id] = self.record(now)  # we know we are alive, whatever the DHT says
            self.records = records
            plans = [p.record for p in signed]
            elected = elect_planner(records, now, self.model.id)
            if elected != self.elected:
                logger.info("planner is now %s%s", elected, " (this node)" if elected == self.peer_id else "")
                if self.elected == self.peer_id:
                    self.planner.stop()
                self.elected = elected
            chosen = choose_plan(plans, elected, self.followed, self.model.id)
            if chosen is not None and chosen != self.followed:
                self._follow(chosen)
            if self._reaching is None or self._reaching.done():
                # in the background: a relay that does not answer must not stall the watch loop
                self._reaching = asyncio.create_task(
                    self._reach_relayed(plan_neighbors(self.peer_id, self.followed))
                )
            if elected == self.peer_id and not self.leaving:
                # the reports are read first: a solve finishing during that read sets `followed`, and a
                # tick given the value from before it would plan again (a second epoch-1 plan, seen)
                banned = await self._banned(records, now)
                self.planner.tick(records, plans, self.followed, now, banned)
            await asyncio.sleep(self.config.poll_s)

    async def _banned(self, records: dict[str, NodeRecord], now: float) -> frozenset[str]:
        """Peers the planner leaves out: reported lying by enough distinct reporters."""
        try:
            reports = await asyncio.wait_for(self.dht.read_reports(), timeout=4 * self.config.rpc_timeout_s)
        except asyncio.TimeoutError:
            logger.info("reading the lying-peer reports timed out; planning without them this time")
            return self._last_banned
        rule = BanRule(min_reporters=self.config.planner.ban_min_reporters)
        members = planning_members(records, now, self.model.id)
        banned = banned_peers(reports, now, self.model.id, rule, members)
        if banned != self._last_banned:
            logger.info(
                "peers banned for lying (by %d+ reporters): %s", rule.min_reporters, sorted(banned) or "none"
            )
        self._last_banned = banned
        return banned

    def _follow(self, plan: PlanRecord) -> None:
        self.followed = plan
        mine = plan.placement.get(self.peer_id)
        logger.info(
            "following plan epoch %d by %s: flow %.1f tokens/s over %d nodes; this node: %s",
            plan.epoch, plan.planner, plan.objective_tokens_per_s, len(plan.placement),
            f"layers [{mine[0]}, {mine[1]})" if mine else "no layers",
        )  # fmt: skip
        self.layers.set_target(mine)
        self._update_state()

    def _served_shards(self) -> list:
        """What the data plane serves new sessions on: the loaded range (sessions opened on a range
        the node has since moved off keep their shard until they close)."""
        return [] if self.layers.handle is None else [self.layers.handle]

    async def _publish_plan(self, plan) -> bool:
        return await self.dht.publish_plan(plan, self.config.ttl_s)

    # ------------------------------------------------------------------------------------ links

    async def _probe_loop(self) -> None:
        if self.config.probe_peers == 0:
            return
        await asyncio.sleep(self.config.refresh_period_s)  # let the first registry read land
        while True:
            now = time.time()
            targets = choose_probe_targets(
                self.record(now),
                self.records,
                self.followed,
                self.last_probed,
                k=self.config.probe_peers,
                now=now,
                max_age_s=self.config.probe_max_age_s,
                rng=self._rng,
            )
            measured = 0
            await self._reach_relayed(set(targets))
            for peer in targets:
                self.last_probed[peer] = time.time()
                # a probe through a relay stays under the relay's per-connection byte cap
                relayed = peer in self.records and self.records[peer].reachability == Reachability.RELAY
                relayed = relayed and await relayed_connection(self.dht.p2p, peer)
                probe_bytes = (
                    min(self.config.probe_bytes, RELAYED_PROBE_BYTES) if relayed else self.config.probe_bytes
                )
                try:
                    m = await measure_link(self.dht.p2p, peer, probe_bytes=probe_bytes)
                except ProbeError as e:
                    logger.info("link to %s not measured: %s", peer, e)
                    continue
                self.measurements[peer] = m
                measured += 1
                logger.info(
                    "link to %s%s: rtt %.1f ms, out %.1f MB/s, in %.1f MB/s",
                    peer, " (through a relay)" if relayed else "", m.rtt_s * 1e3, m.out_bytes_per_s / 1e6,
                    m.in_bytes_per_s / 1e6,
                )  # fmt: skip
            if measured:
                self._announce_now.set()
            await asyncio.sleep(self.config.probe_period_s)

    async def _check_reachability(self) -> None:
        """Ask an initial peer to dial back: directly reachable, or only through a relay?"""
        # RELAY only with a relay slot to hold (--no-auto-relay: nobody can call this node)
        if self.config.no_listen or self.config.force_reachability == "private":
            self.reachability = Reachability.RELAY if self.config.use_auto_relay else Reachability.UNKNOWN
        else:
            helper = self.config.initial_peers[0].rsplit("/p2p/", 1)[-1]
            result = await ask_dial_back(self.dht.p2p, helper, list(self.addrs))
            if result.answered:
                direct = result.reachable
                self.reachability = (
                    Reachability.DIRECT
                    if direct
                    else (Reachability.RELAY if self.config.use_auto_relay else Reachability.UNKNOWN)
                )
            logger.info("reachability: %s (%s)", self.reachability.value, result.detail)
        self._announce_now.set()
        if self.reachability == Reachability.RELAY:
            await self._hold_relay_slot()

    async def _hold_relay_slot(self) -> None:
        """Keep a reservation on a relay (the first initial peer that grants one) and announce the
        circuit address through it; renewed every few refreshes and well before it expires, so a
        relay that restarted (and forgot it) is back within seconds."""
        announced: str | None = None
        while True:
            reservation, addr = await self._reserve_on_a_relay()
            if addr is not None and addr != announced:
                announced = addr
                direct = [a for a in await self._visible_addrs() if "p2p-circuit" not in a]
                self.addrs = tuple([addr, *direct][:MAX_ADDRS])
                logger.info(
                    "reachable through relay %s at %s (the relay caps each relayed connection at %s "
                    "and %s; it expires in %.0f s, renewed before)",
                    reservation.relay, addr,
                    "no byte limit" if reservation.limit_bytes is None else f"{reservation.limit_bytes} bytes",
                    "no time limit" if reservation.limit_duration_s is None else f"{reservation.limit_duration_s:.0f} s",
                    reservation.expires_at - time.time(),
                )  # fmt: skip
                self._announce_now.set()
            renew_s = 4 * self.config.refresh_period_s
            if reservation is not None:
                renew_s = min(renew_s, max(1.0, (reservation.expires_at - time.time()) / 2))
            await asyncio.sleep(renew_s)

    async def _reserve_on_a_relay(self) -> tuple[Reservation | None, str | None]:
        errors = []
        for maddr in self.config.initial_peers:
            relay = maddr.rsplit("/p2p/", 1)[-1]
            try:
                reservation = await reserve(self.dht.p2p, relay, timeout_s=self.config.connect_timeout_s)
            except RelayError as e:
                errors.append(str(e))
                continue
            return reservation, circuit_addr(maddr, self.peer_id)
        logger.warning(
            "no relay among the initial peers granted a slot, so peers cannot call this node: %s",
            "; ".join(errors),
        )
        return None, None

    async def _reach_relayed(self, peers: set[str]) -> None:
        """Connect through their relays to the relayed peers among `peers` that this node must call."""
        targets = relayed_targets(self.records, self.followed, peers)
        if targets and self.relay_dialer is not None:
            await self.relay_dialer.reach(targets)
