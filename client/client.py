"""`HelixClient`: generate text with a swarm. It joins the DHT as a client-mode peer, follows the
plan and the registry, routes each request with IWRR over the plan's flows and drives a session
along the route (`helix_p2p.protocol.driver.RemoteSession`).

Failover: when a hop dies, stalls past `step_timeout_s`, or refuses (busy, lost the session), the
client blames the peer the error names, avoids it for a while, picks a new route and replays the
session's tokens (prompt and everything generated so far) as one prefill there, which rebuilds the
KV cache on every hop; then it goes on decoding. Greedy output is the same as without the failure.
After `max_failovers` re-routes for one request it raises one `GenerationFailedError` naming every
failure. (Seeded sampling goes on after a failover too, but from a fresh generator on the new last
hop, so only greedy output is guaranteed identical.)

The client needs the tokenizer (and the model's config, for its length limit), never the weights.
Everything network-bound runs on the client's own event loop in a background thread, so the sync
methods (`generate`, `stream`) and the async ones (`agenerate`, `astream`) work from any thread or
event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from typing_extensions import Self

from helix_p2p.errors import HelixError
from helix_p2p.protocol.driver import RemoteSession
from helix_p2p.protocol.errors import (
    BusyError,
    DataPlaneError,
    HopUnreachableError,
    LayersUnavailableError,
    RemoteInternalError,
    SessionNotFoundError,
)
from helix_p2p.protocol.messages import RouteHop
from helix_p2p.shard.sampling import SamplingError, SamplingParams
from helix_p2p.swarm.dht import NetworkOptions, SwarmDHT
from helix_p2p.swarm.identity import ephemeral_identity
from helix_p2p.swarm.relay import RelayDialer, relayed_targets
from helix_p2p.swarm.reports import (
    DEFAULT_MIN_REPORTERS,
    Accusation,
    BanRule,
    ReportRecord,
    banned_peers,
    with_accusation,
)
from helix_p2p.swarm.swarm_key import SwarmKey, load_swarm_key

from .errors import BadRequestError, ClientError, GenerationFailedError, NoRouteError
from .verify import VerificationError, Verifier, holders_of
from .view import RoutePicker, Snapshot, follow_plan, view_time

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: one read of the registry and the plans may take this long: a client driving many generations on
#: a busy machine needs more than 5 s, and reads cut short froze its view (an old plan, nodes that
#: had moved since refused and avoided) for as long as that lasted
READ_TIMEOUT_S = 20.0

#: errors after which another route may succeed; anything else is the request's own fault
RETRYABLE: tuple[type[DataPlaneError], ...] = (
    HopUnreachableError,
    BusyError,
    SessionNotFoundError,
    LayersUnavailableError,
    RemoteInternalError,
)


@dataclass(frozen=True)
class ClientOptions:
    #: a step (or open) with no answer after this long counts as a stalled hop
    step_timeout_s: float = 30.0
    #: re-routes allowed for one request before it fails
    max_failovers: int = 4
    #: how long a failed peer is avoided (doubling on each further failure, up to 8x)
    avoid_s: float = 30.0
    #: how often the registry and the plan are read again in the background
    refresh_s: float = 2.0
    #: how long a request waits for a route (a plan, a node with free KV) before NoRouteError
    route_wait_s: float = 15.0
    connect_timeout_s: float = 30.0
    host: str = "127.0.0.1"
    seed: int = 0
    #: share of steps recomputed on another holder of the same layers and compared (`verify.py`)
    verify_rate: float = 0.0
    #: relative tolerance of that comparison; None: by the dtype peers answer in
    verify_tolerance: float | None = None
    #: peers reported lying by this many distinct reporters are not routed to
    ban_min_reporters: int = DEFAULT_MIN_REPORTERS


@dataclass(frozen=True)
class Token:
    """One generated token as it arrives, with the text it adds (may be "" mid-character)."""

    token_id: int
    text: str
    #: the peers of the route that produced it (it changes after a failover)
    route_peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Timings:
    #: from the call until the first token came back
    first_token_s: float
    total_s: float
    #: generated tokens per second after the first token
    decode_tokens_per_s: float


@dataclass(frozen=True)
class GenerationResult:
    text: str
    #: the generated tokens only
    token_ids: list[int]
    prompt_token_ids: list[int]
    #: the route that produced the last token: [{"peer_id", "start", "end"}]
    route: list[dict[str, Any]]
    failovers: int
    #: "stop" (a stop token or string) or "length" (max_new_tokens)
    finish_reason: str
    timings: Timings
    failures: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class HelixClient:
    """A client of one model on one swarm. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        initial_peers: Sequence[str],
        model: str,
        swarm: str = "helix",
        *,
        model_id: str | None = None,
        options: ClientOptions | None = None,
        verify_rate: float | None = None,
        swarm_key: SwarmKey | str | os.PathLike[str] | None = None,
    ) -> None:
        """`swarm_key`: a private swarm's key (a `SwarmKey` or the path of its file)."""
        if swarm_key is not None and not isinstance(swarm_key, SwarmKey):
            swarm_key = load_swarm_key(swarm_key)
        self.options = options or ClientOptions()
        if verify_rate is not None:
            self.options = replace(self.options, verify_rate=verify_rate)
        _check_verify_options(self.options)
        self.model = model
        self.model_id = model_id or _default_model_id(model)
        self.swarm = swarm
        self.tokenizer, self.max_length = _load_tokenizer(model)
        self._avoid_until: dict[str, float] = {}
        self._failures_by_peer: dict[str, int] = {}
        #: when each avoided peer last failed (wall clock, to compare with a record's joined_at)
        self._blamed_at: dict[str, float] = {}
        #: avoided peers whose failure was holding other layers than the route asked (moved by a plan)
        self._moved: set[str] = set()
        #: peers this client caught lying: never routed to again by it, and reported
        self.liars: set[str] = set()
        self._report: ReportRecord | None = None
        self._verify_rng = random.Random(self.options.seed)
        self.verifier: Verifier | None = None
        self._picker = RoutePicker(self.model_id, seed=self.options.seed)
        self._snapshot = Snapshot({}, None, 0.0)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="helix-client", daemon=True)
        self._thread.start()
        self._identity = ephemeral_identity()
        self._refresher: asyncio.Task | None = None
        #: session closes still on their way (awaited by close())
        self._closing: set[asyncio.Future] = set()
        try:
            net = NetworkOptions(
                host=self.options.host,
                client_mode=True,
                connect_timeout_s=self.options.connect_timeout_s,
                check_identity_free=False,
                swarm_key=swarm_key,
            )
            self.dht: SwarmDHT = self._call(
                SwarmDHT.start(self._identity, swarm, list(initial_peers), net),
                self.options.connect_timeout_s + 15,
            )
            # peers behind a NAT in the plan are called through their relays (swarm/relay.py)
            self._relays = RelayDialer(self.dht.p2p)
            if self.options.verify_rate > 0:
                self.verifier = self._make_verifier(model)
            self._call(self._first_refresh(), self.options.connect_timeout_s + 15)
            self._refresher = self._call(self._start_refresher(), 10)
        except BaseException:
            self._stop_loop()
            raise

    # ------------------------------------------------------------------------------ lifecycle

    def _call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout_s)

    async def _start_refresher(self) -> asyncio.Task:
        return asyncio.create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.refresh_s)
            await self._refresh_quietly()

    async def _first_refresh(self) -> Snapshot:
        """The first view of the swarm. One read is capped at a few seconds, which a busy machine or
        a DHT with dead peers in it can pass: try again until `connect_timeout_s`, then say so."""
        deadline = time.monotonic() + self.options.connect_timeout_s
        while True:
            try:
                return await self._refresh()
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    raise ClientError(
                        f"could not read the swarm's registry within {self.options.connect_timeout_s:g} s"
                    ) from None
                logger.info("reading the swarm's registry timed out; trying again")

    async def _refresh(self) -> Snapshot:
        fresh, plans = await asyncio.wait_for(
            self.dht.read(), timeout=max(READ_TIMEOUT_S, 2 * self.options.refresh_s)
        )
        # A lookup can miss entries (a DHT peer holding them is slow or gone); a record read before
        # stays good until it goes stale by its own timestamps, so merge rather than replace.
        records = dict(self._snapshot.records)
        for peer, record in fresh.items():
            if peer not in records or record.updated_at >= records[peer].updated_at:
                records[peer] = record
        at = view_time(Snapshot(records, None, 0.0), time.time())
        records = {p: r for p, r in records.items() if not r.is_stale(at)}
        plan = follow_plan(records, [p.record for p in plans], self._snapshot.plan, self.model_id)
        self._snapshot = Snapshot(records, plan, time.time(), await self._read_banned(records))
        await self._relays.reach(relayed_targets(records, plan))
        return self._snapshot

    async def _read_banned(self, records: dict[str, Any]) -> frozenset[str]:
        """Peers banned for lying by enough distinct reporters; the last answer if the read fails."""
        try:
            reports = await asyncio.wait_for(
                self.dht.read_reports(), timeout=max(5.0, 2 * self.options.refresh_s)
            )
        except (asyncio.TimeoutError, HelixError) as e:
            logger.info("reading the lying-peer reports failed: %s", e)
            return self._snapshot.banned
        rule = BanRule(min_reporters=self.options.ban_min_reporters)
        return banned_peers(reports, time.time(), self.model_id, rule, members=records)

    def _make_verifier(self, model: str) -> Verifier:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model)
        return Verifier(
            self.dht.p2p,
            self.model_id,
            int(config.hidden_size),
            int(config.vocab_size),
            timeout_s=self.options.step_timeout_s,
            tolerance=self.options.verify_tolerance,
            rng=random.Random(self.options.seed),
        )

    def snapshot(self) -> Snapshot:
        return self._snapshot

    def close(self) -> None:
        if not self._loop.is_running():
            return
        try:
            self._call(self._shutdown(), 30)
        finally:
            self._stop_loop()

    async def _shutdown(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._closing:
            # Sessions' closes go out before the connection does: a session left open holds KV on
            # every hop until it idles out, and holds up a node that is leaving for its grace period.
            await asyncio.wait(set(self._closing), timeout=5.0)
        await self.dht.shutdown()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        path = self._identity.path
        if path.exists():
            path.chmod(0o600)
            path.unlink()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ requests

    def encode(
        self, prompt: str | Sequence[int] | None = None, messages: Sequence[dict[str, str]] | None = None
    ) -> list[int]:
        """Token ids of a prompt (text or ids) or of chat messages (the tokenizer's chat template)."""
        if (prompt is None) == (messages is None):
            raise BadRequestError("give exactly one of a prompt and chat messages")
        if messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise BadRequestError(f"the tokenizer of {self.model} has no chat template")
            ids = self.tokenizer.apply_chat_template(
                list(messages), add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            ids = list(ids)
        elif isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)  # type: ignore[arg-type]
            vocab = len(self.tokenizer)
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise BadRequestError(f"token ids must be ints in [0, {vocab})")
        if not ids:
            raise BadRequestError("the prompt is empty")
        return ids

    def _sampling(
        self,
        temperature: float,
        top_p: float,
        top_k: int,
        repetition_penalty: float,
        seed: int | None,
    ) -> SamplingParams:
        eos = self.tokenizer.eos_token_id
        try:
            return SamplingParams(
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                repetition_penalty=repetition_penalty,
                seed=seed,
                stop_token_ids=() if eos is None else (int(eos),),
            )
        except SamplingError as e:
            raise BadRequestError(str(e)) from None

    async def _generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: SamplingParams,
        stop: Sequence[str],
        on_token: Callable[[Token], None] | None,
    ) -> GenerationResult:
        if max_new_tokens < 1:
            raise BadRequestError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > self.max_length:
            raise BadRequestError(
                f"the prompt ({len(prompt_ids)} tokens) and max_new_tokens ({max_new_tokens}) pass "
                f"the model's limit of {self.max_length} positions"
            )
        started = time.perf_counter()
        first_token_at: float | None = None
        generated: list[int] = []
        emitted = ""
        failures: list[str] = []
        session: RemoteSession | None = None
        route: tuple[RouteHop, ...] = ()
        call_started = started
        finish_reason = "length"
        text = ""
        try:
            while True:
                try:
                    if session is None:
                        route = await self._route(len(prompt_ids), max_new_tokens, failures)
                        call_started = time.monotonic()
                        session = await RemoteSession.open(
                            self.dht.p2p,
                            route,
                            len(prompt_ids) + max_new_tokens,
                            sampling,
                            timeout_s=self.options.step_timeout_s,
                        )
                        # a fresh route, or a replacement one: its KV is rebuilt from every token so far
                        call_started = time.monotonic()
                        result = await session.step(prompt_ids + generated)
                    else:
                        call_started = time.monotonic()
                        result = await session.step([generated[-1]])
                    if self.verifier is not None and self._verify_rng.random() < self.options.verify_rate:
                        await self._verify(route, prompt_ids + generated, result.token_id, sampling)
                except RETRYABLE as e:
                    failures.append(str(e))
                    for peer in self._suspects(e, route, time.monotonic() - call_started):
                        self._blame(peer)
                        if isinstance(e, LayersUnavailableError):
                            self._moved.add(peer)
                        else:
                            self._moved.discard(peer)
                    if session is not None:
                        self._close_quietly(session)
                        session = None
                    if len(failures) > self.options.max_failovers:
                        raise GenerationFailedError(
                            f"generation failed after {len(failures)} attempts; last: {e}", failures
                        ) from None
                    logger.info("failover %d: %s", len(failures), e)
                    continue
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                generated.append(result.token_id)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                hit = _first_stop(text, stop)
                if hit is not None:
                    text = text[:hit]
                # hold back text that may still become a stop string, or half a character
                ready = text if hit is not None or result.finished else _safe_prefix(text, stop)
                if on_token is not None:
                    delta = ready[len(emitted) :] if ready.startswith(emitted) else ""
                    on_token(Token(result.token_id, delta, tuple(h.peer_id for h in session.route)))
                    emitted = ready if ready.startswith(emitted) else emitted
                if hit is not None or result.finished:
                    finish_reason = (
                        "stop" if hit is not None or result.token_id in sampling.stop_token_ids else "length"
                    )
                    break
                if len(generated) >= max_new_tokens:
                    break
            assert session is not None
            route_used = [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in session.route]
        finally:
            if session is not None:
                self._close_quietly(session)
        total = time.perf_counter() - started
        first = (first_token_at or started) - started
        decode_s = total - first
        return GenerationResult(
            text=text,
            token_ids=generated,
            prompt_token_ids=list(prompt_ids),
            route=route_used,
            failovers=len(failures),
            finish_reason=finish_reason,
            timings=Timings(first, total, (len(generated) - 1) / decode_s if decode_s > 0 else 0.0),
            failures=failures,
        )

    async def _route(
        self, prompt_tokens: int, max_new_tokens: int, failures: list[str]
    ) -> tuple[RouteHop, ...]:
        """A route for the request, waiting up to `route_wait_s` (re-reading the swarm) for one."""
        deadline = time.monotonic() + self.options.route_wait_s
        refreshed = False
        while True:
            avoid = self.avoided()
            avoid |= self.liars | self._snapshot.banned
            if failures and not refreshed:
                await self._refresh_quietly()
                refreshed = True
            route, why = self._picker.pick(self._snapshot, prompt_tokens, max_new_tokens, avoid)
            if route is not None:
                return route
            if time.monotonic() >= deadline:
                avoided = f"; avoiding {len(avoid)} failing peer(s)" if avoid else ""
                after = f" after {len(failures)} failure(s) (last: {failures[-1]})" if failures else ""
                seen = self._snapshot.live(view_time(self._snapshot, time.time()))
                raise NoRouteError(
                    f"no route for model {self.model_id}{after}: {why}{avoided} "
                    f"({len(seen)} live node record(s) in view)"
                )
            await asyncio.sleep(min(1.0, self.options.refresh_s))
            await self._refresh_quietly()

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh()
        except Exception as e:  # noqa: BLE001 - a DHT hiccup of any kind: the last view stays usable
            logger.info("reading the swarm failed: %s", e)

    def _suspects(self, error: DataPlaneError, route: Sequence[RouteHop], elapsed_s: float) -> list[str]:
        """The peers to avoid after `error`. A hop that answers names the peer that failed; but when
        the first hop itself went silent until our timeout, any hop may be the one stalling (the
        first waits for the rest), so every hop of the route is suspect."""
        if isinstance(error, VerificationError):
            return list(error.suspects)
        head = route[0].peer_id
        stalled = isinstance(error, HopUnreachableError) and error.peer_id in (None, head)
        if stalled and elapsed_s >= 0.9 * self.options.step_timeout_s:
            return [h.peer_id for h in route]
        return [error.peer_id or head]

    def _blame(self, peer_id: str) -> None:
        count = self._failures_by_peer.get(peer_id, 0) + 1
        self._failures_by_peer[peer_id] = count
        self._avoid_until[peer_id] = time.monotonic() + self.options.avoid_s * min(8, 2 ** (count - 1))
        self._blamed_at[peer_id] = time.time()

    async def _verify(
        self, route: Sequence[RouteHop], token_ids: list[int], token_id: int, sampling: SamplingParams
    ) -> None:
        """Check the step just run (`verify.py`); raises VerificationError (a failover, the token
        dropped) when a peer of the route was caught or the route's token is not the verified one."""
        assert self.verifier is not None
        snapshot = self._snapshot
        live = snapshot.live(view_time(snapshot, time.time()))
        distrusted = self.liars | snapshot.banned | self.avoided()

        def holders(layers: tuple[int, int], exclude: set[str]) -> list[str]:
            return holders_of(live, layers, self.model_id, exclude | distrusted)

        verdict = await self.verifier.check(route, token_ids, token_id, sampling, holders)
        for line in verdict.details:
            logger.warning("verification: %s", line)
        for peer in verdict.liars:
            self._mark_liar(peer, "; ".join(verdict.details))
        for peer in verdict.suspects:
            self._blame(peer)
        on_route = [h.peer_id for h in route]
        caught = sorted((verdict.liars | verdict.suspects) & set(on_route))
        if caught:
            raise VerificationError(f"verification caught {', '.join(caught)} on the route", caught)
        if verdict.route_mismatch:
            raise VerificationError(
                f"the route's token {token_id} is not the verified computation's: {verdict.details[-1]}",
                on_route,
            )

    def _mark_liar(self, peer: str, reason: str) -> None:
        """Never route to `peer` again, and report it to the swarm (signed by this client's key)."""
        if peer in self.liars:
            return
        self.liars.add(peer)
        accusation = Accusation(peer, time.time(), reason[:200])
        self._report = with_accusation(self._report, self.dht.peer_id, self.model_id, accusation)
        logger.warning("peer %s caught lying; reporting it to the swarm", peer)
        report = self._report

        async def publish() -> None:
            try:
                if not await self.dht.publish_report(report):
                    logger.warning("no DHT peer accepted the report of %s", peer)
            except HelixError as e:
                logger.warning("publishing the report of %s failed: %s", peer, e)

        asyncio.ensure_future(publish())

    def avoided(self) -> set[str]:
        """Peers routed around now. A peer that has restarted since it failed (a record with a later
        joined_at: a new process behind the same identity) is forgiven, back-off and all."""
        now = time.monotonic()
        for peer in [p for p in self._avoid_until if self._rejoined(p)]:
            logger.info("peer %s has restarted or moved since it failed; routing to it again", peer)
            del self._avoid_until[peer]
            self._failures_by_peer.pop(peer, None)
            self._blamed_at.pop(peer, None)
            self._moved.discard(peer)
        return {p for p, until in self._avoid_until.items() if until > now}

    def _rejoined(self, peer_id: str) -> bool:
        """Restarted since it failed, or refused for holding other layers and re-announced since: a
        node moved by a new plan is healthy, and its newer record routes to the layers it holds."""
        record = self._snapshot.records.get(peer_id)
        if record is None:
            return False
        blamed_at = self._blamed_at.get(peer_id, float("inf"))
        return record.joined_at > blamed_at or (peer_id in self._moved and record.updated_at > blamed_at)

    def _close_quietly(self, session: RemoteSession) -> None:
        async def close() -> None:
            try:
                session.timeout_s = min(session.timeout_s, 5.0)
                await session.close()
            except HelixError as e:  # the hop is gone; its KV goes when it idles out
                logger.debug("closing session %s: %s", session.session_id, e)

        task = asyncio.ensure_future(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    # ------------------------------------------------------------------------------ public API

    def _prepare(
        self,
        prompt: str | Sequence[int] | None,
        messages: Sequence[dict[str, str]] | None,
        temperature: float,
        top_p: float,
        top_k: int,
        repetition_penalty: float,
        seed: int | None,
    ) -> tuple[list[int], SamplingParams]:
        return self.encode(prompt, messages), self._sampling(
            temperature, top_p, top_k, repetition_penalty, seed
        )

    def generate(
        self,
        prompt: str | Sequence[int] | None = None,
        *,
        messages: Sequence[dict[str, str]] | None = None,
        max_new_tokens: int = 32,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        on_token: Callable[[Token], None] | None = None,
    ) -> GenerationResult:
        """Generate from a prompt (text or token ids) or chat messages; blocks until done.
        `on_token` is called (on the client's thread) with each token as it arrives."""
        ids, sampling = self._prepare(prompt, messages, temperature, top_p, top_k, repetition_penalty, seed)
        return self._call(self._generate(ids, max_new_tokens, sampling, tuple(stop), on_token))

    async def agenerate(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> GenerationResult:
        """`generate` for async callers (any event loop)."""
        return await asyncio.wrap_future(self.start(prompt, **kwargs))

    def stream(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> Iterator[Token]:
        """Yield tokens as they come; raises what `generate` raises. The result is then in
        `self.last_result` (for streams in several threads at once, use `start` instead)."""
        import queue

        items: queue.Queue = queue.Queue()
        kwargs["on_token"] = items.put
        future = self.start(prompt, **kwargs)
        future.add_done_callback(lambda _: items.put(None))
        while True:
            item = items.get()
            if item is None:
                break
            yield item
        self.last_result = future.result()

    async def astream(self, prompt: str | Sequence[int] | None = None, **kwargs: Any) -> AsyncIterator[Token]:
        """`stream` for async callers."""
        caller = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        kwargs["on_token"] = lambda token: caller.call_soon_threadsafe(items.put_nowait, token)
        future = self.start(prompt, **kwargs)
        future.add_done_callback(lambda _: caller.call_soon_threadsafe(items.put_nowait, None))
        while True:
            item = await items.get()
            if item is None:
                break
            yield item
        self.last_result = future.result()

    def start(
        self, prompt: str | Sequence[int] | None = None, **kwargs: Any
    ) -> concurrent.futures.Future[GenerationResult]:
        """Start a generation and return at once: a future of its result. Takes `generate`'s
        arguments; `on_token` is called on the client's thread as tokens arrive."""
        on_token = kwargs.pop("on_token", None)
        messages = kwargs.pop("messages", None)
        max_new_tokens = kwargs.pop("max_new_tokens", 32)
        stop = tuple(kwargs.pop("stop", ()))
        ids, sampling = self._prepare(prompt, messages, **_sampling_kwargs(kwargs))
        return asyncio.run_coroutine_threadsafe(
            self._generate(ids, max_new_tokens, sampling, stop, on_token), self._loop
        )


def _check_verify_options(options: ClientOptions) -> None:
    if not 0 <= options.verify_rate <= 1:
        raise ClientError(f"verify_rate must be in [0, 1], got {options.verify_rate}")
    if options.verify_tolerance is not None and not 0 < options.verify_tolerance < 1:
        raise ClientError(f"verify_tolerance must be in (0, 1), got {options.verify_tolerance}")
    if options.ban_min_reporters < 1:
        raise ClientError(f"ban_min_reporters must be >= 1, got {options.ban_min_reporters}")


def _sampling_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    known = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "seed": None}
    unknown = set(kwargs) - set(known)
    if unknown:
        raise BadRequestError(f"unknown generation parameter(s): {', '.join(sorted(unknown))}")
    return {k: kwargs.get(k, v) for k, v in known.items()}


def _first_stop(text: str, stop: Sequence[str]) -> int | None:
    hits = [text.find(s) for s in stop if s and s in text]
    return min(hits) if hits else None


def _safe_prefix(text: str, stop: Sequence[str]) -> str:
    """The part of `text` that can be shown now: no trailing partial character (U+FFFD from a
    half-decoded byte sequence) and no tail that could still grow into a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stop:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end -= k
                break
    return text[:end]


def _default_model_id(model: str) -> str:
    """As nodes name it: a local checkpoint by its folder, a hub checkpoint by its id."""
    path = Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def _load_tokenizer(model: str) -> tuple[Any, int]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise ClientError(f"cannot load the tokenizer and config of {model!r}: {e}") from None
    max_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
    return tokenizer, max_length
