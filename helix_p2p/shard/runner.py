"""A shard: layers [start, end) of a causal LM, run for many sessions at once.

The shard holding layer 0 also holds the embedding and takes token ids; the one holding the last
layer also holds the final norm and LM head, and samples. Everything in between takes and returns
hidden states [tokens, hidden]. Each session keeps a KV cache for the shard's layers until it is
closed or idles out.

`step_batch` is continuous batching: it runs whatever steps are ready (a 1-token decode of one
session, a 300-token prompt of another) in as few forwards as padding allows. Every row of a
forward carries its own positions and its own explicit 4D mask, so a session gets the same numbers
whether it runs alone or beside others. Long prompts are cut into chunks of `max_chunk_tokens`.

Every request is checked before any tensor work (`validate`), and a bad one raises a named
`ShardError`; the node answers it without touching the batch."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import PretrainedConfig

from helix_p2p.shard.api import SessionInfo, ShardSpec, StepRequest, StepResult
from helix_p2p.shard.errors import BadStepError, LayersNotHeldError, SessionLengthError
from helix_p2p.shard.families import Family, head_dim, num_key_value_heads, sliding_window_of_layer
from helix_p2p.shard.kv_cache import BatchKV, BatchRow, SessionKV
from helix_p2p.shard.memory import kv_bytes_per_token_per_layer
from helix_p2p.shard.sampling import GREEDY, Sampler, SamplingParams
from helix_p2p.shard.sessions import Session, SessionTable


@dataclass
class _Work:
    """A slice [offset, offset + num_tokens) of one request, run in one forward."""

    index: int
    session: Session
    request: StepRequest
    offset: int
    num_tokens: int
    position: int
    last_chunk: bool


@dataclass
class _Output:
    hidden: list[torch.Tensor] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    last_logits: torch.Tensor | None = None


class Shard:
    """Layers [start, end) of one model, with their sessions. Made by `load_shard`. Its methods
    may be called from several threads; they run one at a time."""

    def __init__(
        self,
        spec: ShardSpec,
        config: PretrainedConfig,
        family: Family,
        layers: nn.ModuleList,
        embed_tokens: nn.Embedding | None,
        norm: nn.Module | None,
        lm_head: nn.Linear | None,
        rotary_emb: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.config = config
        self.family = family
        self.layers = layers
        self.embed_tokens = embed_tokens
        self.norm = norm
        self.lm_head = lm_head
        self.rotary_emb = rotary_emb
        self.device = device
        self.dtype = dtype
        self.clock = clock
        self._table = SessionTable(
            idle_timeout_s=spec.idle_timeout_s,
            max_kv_tokens=spec.max_kv_tokens,
            clock=clock,
            where=f"layers [{spec.start}, {spec.end})",
        )
        self._lock = threading.RLock()
        self._windows = {i: sliding_window_of_layer(config, i) for i in range(spec.start, spec.end)}

    # --- what the shard is ---------------------------------------------------------------------

    @property
    def start(self) -> int:
        return self.spec.start

    @property
    def end(self) -> int:
        return self.spec.end

    @property
    def num_model_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def holds_embedding(self) -> bool:
        return self.embed_tokens is not None

    @property
    def holds_head(self) -> bool:
        return self.lm_head is not None

    @property
    def reserved_kv_tokens(self) -> int:
        """Positions reserved by open sessions (the sum of their max lengths)."""
        return self._table.reserved_kv_tokens

    @property
    def free_kv_tokens(self) -> int | None:
        """Positions a new session may still reserve; None when the shard has no cap."""
        return self._table.free_kv_tokens

    def kv_bytes_per_token(self) -> int:
        """KV bytes one position of one session costs on this shard (all held layers)."""
        return (self.end - self.start) * kv_bytes_per_token_per_layer(self.config, self.dtype)

    # --- sessions ------------------------------------------------------------------------------

    def open_session(
        self,
        session_id: str,
        max_length: int,
        sampling: SamplingParams | None = None,
        layers: tuple[int, int] | None = None,
    ) -> SessionInfo:
        """Reserve KV for `max_length` positions. `layers` (default: all held) is the sub-range this
        session runs here, fixed for its life since its cache covers exactly those layers.
        `sampling` applies where the session ends at the model's last layer (elsewhere nothing samples)."""
        with self._lock:
            self.expire_idle()
            if not isinstance(session_id, str) or not session_id:
                raise BadStepError(f"session id must be a non-empty string, got {session_id!r}")
            max_positions = int(getattr(self.config, "max_position_embeddings", max_length) or max_length)
            if not isinstance(max_length, int) or not 1 <= max_length <= max_positions:
                raise SessionLengthError(
                    f"session {session_id!r}: max_length must be in [1, {max_positions}], got {max_length!r}"
                )
            start, end = self._check_layers(layers if layers is not None else (self.start, self.end))
            self._table.check_room(session_id, max_length)
            sampler = None
            history = None
            if end == self.num_model_layers:
                params = sampling or GREEDY
                params.check_vocab(self.vocab_size)
                sampler = Sampler(params, self.device)
                if params.needs_history:
                    history = torch.zeros(max_length, dtype=torch.long, device=self.device)
            kv = SessionKV(
                first_layer=start,
                num_layers=end - start,
                num_kv_heads=num_key_value_heads(self.config),
                head_dim=head_dim(self.config),
                max_length=max_length,
                dtype=self.dtype,
                device=self.device,
            )
            session = Session(session_id, start, end, max_length, kv, sampler, history, self.clock())
            self._table.add(session)
            return session.info(session.last_used)

    def close_session(self, session_id: str) -> None:
        """Free the session's KV cache. Closing an unknown session is an error; twice is an error."""
        with self._lock:
            self._table.close(session_id)

    def session(self, session_id: str) -> SessionInfo:
        with self._lock:
            return self._table.get(session_id).info(self.clock())

    def sessions(self) -> list[SessionInfo]:
        with self._lock:
            now = self.clock()
            return [s.info(now) for s in self._table]

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle for more than `idle_timeout_s`; returns their ids. Steps and opens
        call it themselves; a node may also call it on a timer."""
        with self._lock:
            return self._table.expire_idle(now)

    def _check_layers(self, layers: tuple[int, int]) -> tuple[int, int]:
        try:
            start, end = (int(x) for x in layers)
        except (TypeError, ValueError) as e:
            raise LayersNotHeldError(f"layers must be a (start, end) pair, got {layers!r}") from e
        if not self.start <= start < end <= self.end:
            raise LayersNotHeldError(
                f"layers [{start}, {end}) are not held here (this shard holds [{self.start}, {self.end}))"
            )
        return start, end

    # --- steps ---------------------------------------------------------------------------------

    def validate(self, request: StepRequest) -> None:
        """Refuse a malformed request with a named error, touching no tensor data but token ids'
        range. `step_batch` calls this for every request before running any."""
        with self._lock:
            self._validate(request, self._table.get(request.session_id))

    def step(self, request: StepRequest) -> StepResult:
        return self.step_batch([request])[0]

    def step_batch(self, requests: Sequence[StepRequest]) -> list[StepResult]:
        """Run several sessions' steps together; results come back in the order of `requests`.
        Each session may appear once. If any request is bad, none runs."""
        if not requests:
            return []
        with self._lock, torch.inference_mode():
            self.expire_idle()
            sessions = []
            seen: set[str] = set()
            for request in requests:
                if request.session_id in seen:
                    raise BadStepError(f"session {request.session_id!r} appears twice in one batch")
                seen.add(request.session_id)
                session = self._table.get(request.session_id)
                self._validate(request, session)
                sessions.append(session)
            return self._run(list(requests), sessions)

    def _validate(self, request: StepRequest, session: Session) -> None:
        sid = request.session_id
        if request.layers is not None:
            layers = self._check_layers(request.layers)
            if layers != (session.start, session.end):
                raise BadStepError(
                    f"session {sid!r} runs layers [{session.start}, {session.end}) here, "
                    f"the step asks for [{layers[0]}, {layers[1]})"
                )
        n = self._check_inputs(request, session)
        position = session.kv.length if request.position is None else request.position
        if not isinstance(position, int) or position < 0:
            raise SessionLengthError(f"session {sid!r}: position must be an int >= 0, got {position!r}")
        if position > session.kv.length:
            raise SessionLengthError(
                f"session {sid!r}: position {position} leaves a gap after its {session.kv.length} positions"
            )
        if position + n > session.max_length:
            raise SessionLengthError(
                f"session {sid!r}: positions [{position}, {position + n}) pass its max_length {session.max_length}"
            )
        ends_here = session.end == self.num_model_layers
        if request.return_logits and not ends_here:
            raise BadStepError(f"session {sid!r}: logits come only from the shard holding the last layer")
        if ends_here and session.history is not None and request.token_ids is None:
            raise BadStepError(
                f"session {sid!r} samples with a repetition penalty: its steps must carry token_ids"
            )

    def _check_inputs(self, request: StepRequest, session: Session) -> int:
        sid = request.session_id
        ids, hidden = request.token_ids, request.hidden_states
        takes_ids = session.start == 0
        if takes_ids and (hidden is not None or ids is None):
            raise BadStepError(f"session {sid!r} starts at layer 0 here: send token_ids, not hidden_states")
        if not takes_ids and hidden is None:
            raise BadStepError(f"session {sid!r} starts at layer {session.start} here: send hidden_states")
        n = None
        if ids is not None:
            if (
                not isinstance(ids, torch.Tensor)
                or ids.ndim != 1
                or ids.dtype not in (torch.int64, torch.int32)
            ):
                raise BadStepError(f"session {sid!r}: token_ids must be a 1-D int64 or int32 tensor")
            n = int(ids.shape[0])
            if n and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                raise BadStepError(f"session {sid!r}: token ids must be in [0, {self.vocab_size})")
        if hidden is not None:
            if not isinstance(hidden, torch.Tensor) or hidden.ndim != 2:
                raise BadStepError(f"session {sid!r}: hidden_states must be a [tokens, hidden] tensor")
            if hidden.shape[1] != self.hidden_size:
                raise BadStepError(
                    f"session {sid!r}: hidden size {hidden.shape[1]} does not match the model's {self.hidden_size}"
                )
            if hidden.dtype != self.dtype:
                raise BadStepError(
                    f"session {sid!r}: hidden_states are {hidden.dtype}, this shard runs {self.dtype}"
                )
            if n is not None and n != hidden.shape[0]:
                raise BadStepError(f"session {sid!r}: {n} token ids for {hidden.shape[0]} hidden states")
            n = int(hidden.shape[0])
        if not n:
            raise BadStepError(f"session {sid!r}: a step needs at least one token")
        return n

    # --- running -------------------------------------------------------------------------------

    def _run(self, requests: list[StepRequest], sessions: list[Session]) -> list[StepResult]:
        positions = []
        for request, session in zip(requests, sessions):
            position = session.kv.length if request.position is None else request.position
            session.kv.length = position  # a rewind drops later positions; a continuation changes nothing
            positions.append(position)
        outputs = [_Output() for _ in requests]
        chunk = self.spec.max_chunk_tokens
        rounds = max(-(-r.num_tokens // chunk) for r in requests)
        for r in range(rounds):
            work = []
            for i, (request, session) in enumerate(zip(requests, sessions)):
                offset = r * chunk
                if offset < request.num_tokens:
                    n = min(chunk, request.num_tokens - offset)
                    last = offset + n == request.num_tokens
                    work.append(_Work(i, session, request, offset, n, positions[i] + offset, last))
            for group in self._groups(work):
                self._forward(group, outputs)
        now = self.clock()
        results = []
        for i, (request, session) in enumerate(zip(requests, sessions)):
            session.last_used = now
            results.append(self._result(request, session, positions[i], outputs[i]))
        return results

    def _groups(self, work: list[_Work]) -> list[list[_Work]]:
        """Pack rows into forwards: longest first, a row joins while padding stays within
        max_padding_ratio and the forward within max_batch_tokens. Rows of different layer ranges
        never share one."""
        groups: list[list[_Work]] = []
        by_range: dict[tuple[int, int], list[_Work]] = {}
        for w in work:
            by_range.setdefault((w.session.start, w.session.end), []).append(w)
        for items in by_range.values():
            items.sort(key=lambda w: -w.num_tokens)
            group: list[_Work] = []
            real = 0
            for w in items:
                width = group[0].num_tokens if group else w.num_tokens
                padded = (len(group) + 1) * width
                if group and (
                    padded > self.spec.max_padding_ratio * (real + w.num_tokens)
                    or padded > self.spec.max_batch_tokens
                ):
                    groups.append(group)
                    group, real = [], 0
                group.append(w)
                real += w.num_tokens
            groups.append(group)
        return groups

    def _forward(self, group: list[_Work], outputs: list[_Output]) -> None:
        session = group[0].session
        batch, width = len(group), group[0].num_tokens
        rows = [BatchRow(w.session.kv, w.position, w.num_tokens) for w in group]
        cache = BatchKV(rows)
        # Padded slots repeat their row's last position, so every query row attends to something
        # (an all-masked row would be NaN) and no position past a row's own is ever used.
        steps = torch.arange(width, device=self.device)
        last = torch.tensor([w.num_tokens - 1 for w in group], device=self.device)
        starts = torch.tensor([w.position for w in group], device=self.device)
        position_ids = starts[:, None] + torch.minimum(steps[None, :], last[:, None])
        hidden = self._inputs(group, batch, width)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        masks: dict[int | None, torch.Tensor | None] = {}
        for layer_idx in range(session.start, session.end):
            window = self._windows[layer_idx]
            if window not in masks:
                masks[window] = self._mask(rows, position_ids, cache.kv_length, window)
            hidden = self.layers[layer_idx - self.start](
                hidden,
                attention_mask=masks[window],
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                position_embeddings=position_embeddings,
            )
        for row in rows:
            row.kv.length = row.end
        if session.end < self.num_model_layers:
            for b, w in enumerate(group):
                outputs[w.index].hidden.append(hidden[b, : w.num_tokens])
            return
        # One head matmul for every position that needs logits: per-row matmuls would read the
        # vocab x hidden matrix once per row.
        picks: list[tuple[_Work, int, int]] = []  # (row, batch index, tokens taken)
        for b, w in enumerate(group):
            if w.request.return_logits:
                picks.append((w, b, w.num_tokens))
            elif w.last_chunk:
                picks.append((w, b, 1))
        if not picks:
            return
        selected = torch.cat([hidden[b, w.num_tokens - taken : w.num_tokens] for w, b, taken in picks])
        logits = self.lm_head(self.norm(selected)).float()
        offset = 0
        for w, _, taken in picks:
            rows_logits = logits[offset : offset + taken]
            offset += taken
            out = outputs[w.index]
            if w.request.return_logits:
                out.logits.append(rows_logits)
            if w.last_chunk:
                out.last_logits = rows_logits[-1]

    def _inputs(self, group: list[_Work], batch: int, width: int) -> torch.Tensor:
        if group[0].session.start == 0:
            assert self.embed_tokens is not None  # a session starting at 0 exists only on such a shard
            ids = torch.zeros((batch, width), dtype=torch.long, device=self.device)
            for b, w in enumerate(group):
                ids[b, : w.num_tokens] = w.request.token_ids[w.offset : w.offset + w.num_tokens]
            return self.embed_tokens(ids)
        hidden = torch.zeros((batch, width, self.hidden_size), dtype=self.dtype, device=self.device)
        for b, w in enumerate(group):
            hidden[b, : w.num_tokens] = w.request.hidden_states[w.offset : w.offset + w.num_tokens]
        return hidden

    def _mask(
        self, rows: list[BatchRow], position_ids: torch.Tensor, kv_length: int, window: int | None
    ) -> torch.Tensor | None:
        """The [batch, 1, tokens, kv_length] mask: query at position p sees keys at positions <= p
        (and > p - window on sliding-window layers), as the family's own model masks them."""
        sdpa = self.config._attn_implementation == "sdpa"
        if len(rows) == 1 and (window is None or window >= kv_length):
            row = rows[0]
            # Masks the kernel can infer, skipped as `transformers` skips them: one query, or a
            # causal prompt from position 0 (sdpa's is_causal; eager has no such flag).
            if row.num_tokens == 1 or (sdpa and row.position == 0):
                return None
        keys = torch.arange(kv_length, device=self.device)
        allowed = keys[None, None, :] <= position_ids[:, :, None]
        if window is not None:
            allowed &= keys[None, None, :] > position_ids[:, :, None] - window
        allowed = allowed[:, None]
        if sdpa:
            return allowed
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)

    def _result(self, request: StepRequest, session: Session, position: int, out: _Output) -> StepResult:
        n = request.num_tokens
        if session.end < self.num_model_layers:
            hidden = out.hidden[0] if len(out.hidden) == 1 else torch.cat(out.hidden)
            return StepResult(request.session_id, position, n, hidden_states=hidden)
        if session.history is not None and request.token_ids is not None:
            session.history[position : position + n] = request.token_ids.to(self.device)
        assert session.sampler is not None and out.last_logits is not None
        history = session.history[: position + n] if session.history is not None else None
        token = session.sampler.sample(out.last_logits, history)
        finished = session.sampler.is_stop(token) or session.kv.length >= session.max_length
        logits = None
        if request.return_logits:
            logits = out.logits[0] if len(out.logits) == 1 else torch.cat(out.logits)
        return StepResult(request.session_id, position, n, token_id=token, logits=logits, finished=finished)
