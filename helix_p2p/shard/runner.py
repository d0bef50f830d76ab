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

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NewType

import torch
from torch import nn
from transformers import PretrainedConfig

from helix_p2p.shard.errors import (
    BadStepError,
    DeviceError,
    KVCapacityError,
    LayerRangeError,
    LayersNotHeldError,
    MissingTensorError,
    SessionClosedError,
    SessionExistsError,
    SessionLengthError,
    ShardSpecError,
    UnknownSessionError,
)
from helix_p2p.shard.families import (
    EMBEDDING_TENSOR,
    FINAL_NORM_TENSOR,
    LM_HEAD_TENSOR,
    Family,
    check_supported,
    head_dim,
    layer_prefix,
    num_key_value_heads,
    sliding_window_of_layer,
    tie_word_embeddings,
)
from helix_p2p.shard.kv_cache import BatchKV, BatchRow, SessionKV
from helix_p2p.shard.loading import Checkpoint, open_checkpoint
from helix_p2p.shard.memory import kv_bytes_per_token_per_layer, parse_dtype
from helix_p2p.shard.sampling import GREEDY, Sampler, SamplingParams

logger = logging.getLogger(__name__)

SessionId = NewType("SessionId", str)

#: how many closed session ids are remembered, to say "closed" rather than "unknown"
CLOSED_MEMORY = 4096


@dataclass(frozen=True)
class ShardSpec:
    """What to load: layers [start, end) of the checkpoint at `model_path`, and how to run them."""

    model_path: str
    start: int
    end: int
    #: float32, bfloat16 or float16 (also fp32, bf16, fp16)
    dtype: str = "float32"
    #: cpu, cuda or cuda:N
    device: str = "cpu"
    #: sdpa or eager (the attention functions of `transformers`)
    attn_implementation: str = "sdpa"
    #: the most session positions the shard reserves KV for, summed over open sessions; None: no cap
    max_kv_tokens: int | None = None
    #: prompts longer than this are prefilled in chunks of this many tokens
    max_chunk_tokens: int = 512
    #: rows are packed into one forward up to this many (padded) tokens
    max_batch_tokens: int = 4096
    #: a forward pads every row to its longest; rows join it while padded tokens stay within this
    #: factor of real ones (so one prompt does not drag fifteen 1-token decodes to its length)
    max_padding_ratio: float = 1.25
    #: a session untouched this long is closed and its KV freed
    idle_timeout_s: float = 300.0


@dataclass(frozen=True)
class StepRequest:
    """One session's step: `token_ids` [n] when the session's layers start at layer 0, else
    `hidden_states` [n, hidden] in the shard's dtype. The shard holding the head may also be given
    the `token_ids` of those positions (needed when the session samples with a repetition penalty)."""

    session_id: str
    token_ids: torch.Tensor | None = None
    hidden_states: torch.Tensor | None = None
    #: absolute position of the first token; None continues the session. Less than the session's
    #: length rewinds it (its later positions are dropped); more is a gap and is refused.
    position: int | None = None
    #: the layer range the caller expects this shard to run; None trusts the session's
    layers: tuple[int, int] | None = None
    #: also return fp32 logits for every position (only where the session ends at the last layer)
    return_logits: bool = False

    @property
    def num_tokens(self) -> int:
        x = self.token_ids if self.token_ids is not None else self.hidden_states
        return 0 if x is None or x.ndim == 0 else int(x.shape[0])


@dataclass(frozen=True)
class StepResult:
    """What a step produced: hidden states for the next shard, or the sampled next token."""

    session_id: str
    #: the absolute position of the step's first token
    position: int
    num_tokens: int
    #: [n, hidden] in the shard's dtype, for the next shard; None where the session ends here
    hidden_states: torch.Tensor | None = None
    #: the next token, sampled from the last position's logits, where the session ends here
    token_id: int | None = None
    #: [n, vocab] fp32, when asked for
    logits: torch.Tensor | None = None
    #: the token is a stop token, or the session has no room for another position
    finished: bool = False


@dataclass(frozen=True)
class SessionInfo:
    session_id: str
    layers: tuple[int, int]
    max_length: int
    #: positions [0, length) are in the KV cache
    length: int
    kv_bytes: int
    idle_s: float


@dataclass
class _Session:
    id: str
    start: int
    end: int
    max_length: int
    kv: SessionKV
    sampler: Sampler | None
    #: token ids of positions [0, kv.length), kept only when sampling reads them
    history: torch.Tensor | None
    last_used: float

    def info(self, now: float) -> SessionInfo:
        return SessionInfo(
            self.id,
            (self.start, self.end),
            self.max_length,
            self.kv.length,
            self.kv.nbytes,
            now - self.last_used,
        )


@dataclass
class _Work:
    """A slice [offset, offset + num_tokens) of one request, run in one forward."""

    index: int
    session: _Session
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


def resolve_device(device: str) -> torch.device:
    """`cpu`, `cuda` or `cuda:N`, checked against this machine."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device {device!r} is not a device name (use cpu, cuda or cuda:N)") from e
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported (use cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but CUDA is not available on this machine")
    index = 0 if dev.index is None else dev.index
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", index)


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
        self._sessions: dict[str, _Session] = {}
        self._closed: OrderedDict[str, str] = OrderedDict()
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
        return sum(s.max_length for s in self._sessions.values())

    @property
    def free_kv_tokens(self) -> int | None:
        """Positions a new session may still reserve; None when the shard has no cap."""
        if self.spec.max_kv_tokens is None:
            return None
        return self.spec.max_kv_tokens - self.reserved_kv_tokens

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
            if session_id in self._sessions:
                raise SessionExistsError(f"session {session_id!r} is already open")
            max_positions = int(getattr(self.config, "max_position_embeddings", max_length) or max_length)
            if not isinstance(max_length, int) or not 1 <= max_length <= max_positions:
                raise SessionLengthError(
                    f"session {session_id!r}: max_length must be in [1, {max_positions}], got {max_length!r}"
                )
            start, end = self._check_layers(layers if layers is not None else (self.start, self.end))
            free = self.free_kv_tokens
            if free is not None and max_length > free:
                raise KVCapacityError(
                    f"session {session_id!r}: max_length {max_length} exceeds the {free} free KV positions"
                )
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
            session = _Session(session_id, start, end, max_length, kv, sampler, history, self.clock())
            self._sessions[session_id] = session
            self._closed.pop(session_id, None)
            logger.debug(
                "session %s opened: layers [%d, %d), max_length %d", session_id, start, end, max_length
            )
            return session.info(session.last_used)

    def close_session(self, session_id: str) -> None:
        """Free the session's KV cache. Closing an unknown session is an error; twice is an error."""
        with self._lock:
            self._get(session_id)
            self._forget(session_id, "closed")

    def session(self, session_id: str) -> SessionInfo:
        with self._lock:
            return self._get(session_id).info(self.clock())

    def sessions(self) -> list[SessionInfo]:
        with self._lock:
            now = self.clock()
            return [s.info(now) for s in self._sessions.values()]

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Close sessions idle for more than `idle_timeout_s`; returns their ids."""
        with self._lock:
            now = self.clock() if now is None else now
            expired = [
                sid for sid, s in self._sessions.items() if now - s.last_used > self.spec.idle_timeout_s
            ]
            for sid in expired:
                self._forget(sid, f"expired after {self.spec.idle_timeout_s:g} s idle")
            return expired

    def _forget(self, session_id: str, reason: str) -> None:
        del self._sessions[session_id]
        self._closed[session_id] = reason
        while len(self._closed) > CLOSED_MEMORY:
            self._closed.popitem(last=False)
        logger.debug("session %s %s", session_id, reason)

    def _get(self, session_id: str) -> _Session:
        session = self._sessions.get(session_id)
        if session is not None:
            return session
        reason = self._closed.get(session_id)
        if reason is not None:
            raise SessionClosedError(f"session {session_id!r} is {reason}")
        raise UnknownSessionError(f"session {session_id!r} is not open on layers [{self.start}, {self.end})")

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
            self._validate(request, self._get(request.session_id))

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
                session = self._get(request.session_id)
                self._validate(request, session)
                sessions.append(session)
            return self._run(list(requests), sessions)

    def _validate(self, request: StepRequest, session: _Session) -> None:
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

    def _check_inputs(self, request: StepRequest, session: _Session) -> int:
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

    def _run(self, requests: list[StepRequest], sessions: list[_Session]) -> list[StepResult]:
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

    def _result(self, request: StepRequest, session: _Session, position: int, out: _Output) -> StepResult:
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


def load_shard(spec: ShardSpec, *, clock: Callable[[], float] = time.monotonic) -> Shard:
    """Build layers [spec.start, spec.end) of the checkpoint with the family's own `transformers`
    modules, reading only their tensors (and the embedding / final norm and head where held)."""
    device = resolve_device(spec.device)
    dtype = parse_dtype(spec.dtype)
    checkpoint = open_checkpoint(spec.model_path, attn_implementation=spec.attn_implementation)
    config = checkpoint.config
    family = check_supported(config)
    num_layers = int(config.num_hidden_layers)
    if not (
        isinstance(spec.start, int) and isinstance(spec.end, int) and 0 <= spec.start < spec.end <= num_layers
    ):
        raise LayerRangeError(
            f"{spec.model_path}: layers [{spec.start}, {spec.end}) are not a non-empty range of its {num_layers} layers"
        )
    if spec.max_chunk_tokens < 1 or spec.max_batch_tokens < spec.max_chunk_tokens:
        raise ShardSpecError("max_chunk_tokens must be >= 1 and max_batch_tokens >= max_chunk_tokens")
    if not spec.idle_timeout_s > 0 or (spec.max_kv_tokens is not None and spec.max_kv_tokens < 0):
        raise ShardSpecError("idle_timeout_s must be > 0 and max_kv_tokens >= 0 (or None)")
    if not spec.max_padding_ratio >= 1:
        raise ShardSpecError(f"max_padding_ratio must be >= 1, got {spec.max_padding_ratio}")

    layers = nn.ModuleList()
    for index in range(spec.start, spec.end):
        with torch.device("meta"):
            layer = family.decoder_layer(config, index)
        _assign(layer, checkpoint, layer_prefix(index), device, dtype)
        layers.append(layer)

    embed_tokens = None
    if spec.start == 0:
        with torch.device("meta"):
            embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        _assign(embed_tokens, checkpoint, EMBEDDING_TENSOR.removesuffix("weight"), device, dtype)

    norm = lm_head = None
    if spec.end == num_layers:
        with torch.device("meta"):
            norm = family.norm(config.hidden_size, eps=config.rms_norm_eps)
            lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        _assign(norm, checkpoint, FINAL_NORM_TENSOR.removesuffix("weight"), device, dtype)
        if tie_word_embeddings(config):
            if embed_tokens is not None:
                lm_head.weight = embed_tokens.weight
            else:
                _assign(lm_head, checkpoint, "", device, dtype, names={"weight": EMBEDDING_TENSOR})
        else:
            _assign(lm_head, checkpoint, LM_HEAD_TENSOR.removesuffix("weight"), device, dtype)

    rotary_emb = family.rotary_embedding(config=config).to(device)
    shard = Shard(spec, config, family, layers, embed_tokens, norm, lm_head, rotary_emb, device, dtype, clock)
    for module in (layers, embed_tokens, norm, lm_head, rotary_emb):
        if module is not None:
            module.eval().requires_grad_(False)
    logger.info(
        "loaded %s layers [%d, %d) of %d on %s as %s%s%s",
        spec.model_path, spec.start, spec.end, num_layers, device, dtype,
        " with embedding" if embed_tokens is not None else "", " with head" if lm_head is not None else "",
    )  # fmt: skip
    return shard


def _assign(
    module: nn.Module,
    checkpoint: Checkpoint,
    prefix: str,
    device: torch.device,
    dtype: torch.dtype,
    names: dict[str, str] | None = None,
) -> None:
    """Fill a module built on the meta device with its checkpoint tensors (every parameter and
    persistent buffer, shapes checked), so no random initial weights are ever allocated."""
    expected = {key: tensor.shape for key, tensor in module.state_dict().items()}
    names = names or {key: prefix + key for key in expected}
    loaded = checkpoint.load(names.values(), device=device, dtype=dtype)
    state = {}
    for key, shape in expected.items():
        tensor = loaded[names[key]]
        if tensor.shape != shape:
            raise MissingTensorError(
                f"{checkpoint.source}: tensor {names[key]!r} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}"
            )
        state[key] = tensor
    module.load_state_dict(state, strict=True, assign=True)
