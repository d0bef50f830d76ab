"""The data plane across real processes on 127.0.0.1: three standalone servers holding [0, 1),
[1, 3) and [3, 4) of a tiny random Llama, and a client in the test process (`RemoteSession`).

Checked: greedy generation equals `transformers`' `generate` on the whole model token for token;
seeded sampling (with a repetition penalty, so token ids ride along to the last hop) equals the
same sampling in one process; a prompt whose hidden states exceed the 4 MiB unary cap works
(streamed); 16 concurrent sessions are all correct; a malformed step, an unknown session, a
too-long sequence and an exhausted KV budget each get their named error while another session
keeps generating the right tokens."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from dataplane_helpers import LoopThread, Server, start_servers
from procs import Processes
from transformers import AutoModelForCausalLM

from helix_p2p.protocol import (
    BusyError,
    DuplicateSessionError,
    MalformedMessageError,
    RouteHop,
    SequenceTooLongError,
    SessionNotFoundError,
    Step,
)
from helix_p2p.protocol.driver import RemoteSession, generate
from helix_p2p.protocol.transport import UNARY_MAX_BYTES, call_peer
from helix_p2p.protocol.wire import encode_request
from helix_p2p.shard import LocalChain, SamplingParams, ShardSpec, TinyModelSpec, load_shard, make_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Hidden size 512 in fp32 is 2 KiB per token: a 2,200-token prompt's hidden states are 4.3 MiB.
SPEC = TinyModelSpec(
    family="llama",
    num_layers=4,
    hidden_size=512,
    num_heads=8,
    num_kv_heads=2,
    intermediate_size=1024,
    max_position_embeddings=4096,
    initializer_range=0.1,
)
RANGES = ((0, 1), (1, 3), (3, 4))
#: the middle hop's KV budget, in positions
MIDDLE_KV_TOKENS = 6000
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("dataplane") / "llama", SPEC)


@pytest.fixture(scope="module")
def swarm(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[list[Server], LoopThread]]:
    with Processes(tmp_path_factory.mktemp("dataplane-procs")) as procs:
        extra = [(), ("--max-kv-tokens", str(MIDDLE_KV_TOKENS)), ()]
        servers = start_servers(procs, model_dir, RANGES, extra)
        client = LoopThread([servers[0].maddr])
        try:
            yield servers, client
        finally:
            client.close()
            for server in servers:
                assert server.proc.alive(), f"{server.proc.name} died:\n{procs.report()}"


@pytest.fixture(scope="module")
def chain(model_dir: Path) -> LocalChain:
    return LocalChain([load_shard(ShardSpec(str(model_dir), a, b)) for a, b in RANGES])


def route_of(servers: list[Server]) -> list[RouteHop]:
    return [RouteHop(s.peer_id, s.start, s.end) for s in servers]


def prompt(length: int, seed: int) -> list[int]:
    return torch.randint(
        3, SPEC.vocab_size, (length,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def hf_greedy(model_dir: Path, ids: list[int], new_tokens: int) -> list[int]:
    whole = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = whole.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False, eos_token_id=None)
    return out[0, len(ids) :].tolist()


def test_greedy_through_three_nodes_equals_generate(swarm, model_dir: Path) -> None:
    servers, client = swarm
    for seed, length in ((1, 6), (2, 23)):
        ids = prompt(length, seed)
        ours = client.run(generate(client.p2p, route_of(servers), ids, NEW_TOKENS))
        assert ours == hf_greedy(model_dir, ids, NEW_TOKENS)


def test_seeded_sampling_equals_one_process(swarm, chain: LocalChain) -> None:
    servers, client = swarm
    ids = prompt(9, seed=3)
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3, seed=11)
    ours = client.run(generate(client.p2p, route_of(servers), ids, NEW_TOKENS, params))
    assert ours == chain.generate(ids, NEW_TOKENS, params)
    other = client.run(
        generate(client.p2p, route_of(servers), ids, NEW_TOKENS, SamplingParams(temperature=0.8, seed=12))
    )
    assert other != ours, "a different seed samples differently"


def test_prompt_over_the_unary_cap_is_streamed(swarm, model_dir: Path) -> None:
    servers, client = swarm
    ids = prompt(2200, seed=4)
    hidden_bytes = len(ids) * SPEC.hidden_size * 4
    assert hidden_bytes > 4 * 1024 * 1024 > UNARY_MAX_BYTES
    ours = client.run(generate(client.p2p, route_of(servers), ids, 4), timeout_s=240)
    assert ours == hf_greedy(model_dir, ids, 4)


def test_16_concurrent_sessions_are_all_correct(swarm, chain: LocalChain) -> None:
    servers, client = swarm
    prompts = [prompt(3 + 2 * i, seed=100 + i) for i in range(16)]

    async def all_at_once() -> list[list[int]]:
        return await asyncio.gather(
            *(generate(client.p2p, route_of(servers), p, NEW_TOKENS) for p in prompts)
        )

    results = client.run(all_at_once())
    for p, ours in zip(prompts, results):
        assert ours == chain.generate(p, NEW_TOKENS)


def test_bad_messages_get_named_errors_while_a_session_continues(swarm, chain: LocalChain) -> None:
    servers, client = swarm
    route = route_of(servers)
    head = servers[0].peer_id
    ids = prompt(11, seed=7)
    expected = chain.generate(ids, 8)

    async def scenario() -> list[int]:
        session = await RemoteSession.open(client.p2p, route, len(ids) + 8)
        tokens = [(await session.step(ids)).token_id]

        async def keep_going() -> None:
            tokens.append((await session.step([tokens[-1]])).token_id)

        # a malformed step: a token id outside the vocabulary
        with pytest.raises(MalformedMessageError, match="token ids must be in"):
            await session.step([SPEC.vocab_size + 5])
        # hidden states sent to the first hop, which takes token ids
        bad = Step(session.session_id, session.length, hidden_states=torch.zeros(1, SPEC.hidden_size))
        reply = await call_peer(client.p2p, head, encode_request(bad), 30)
        with pytest.raises(MalformedMessageError, match="send token_ids"):
            raise reply.exception()
        await keep_going()
        # an unknown session
        with pytest.raises(SessionNotFoundError, match="no-such-session"):
            await RemoteSession(client.p2p, tuple(route), "no-such-session", 8, session.sampling, 30).step(
                [5]
            )
        await keep_going()
        # too long: a step past the session's max length, and a max length past the model's
        short = await RemoteSession.open(client.p2p, route, 10)
        await short.step(prompt(8, seed=8))
        with pytest.raises(SequenceTooLongError, match="max_length 10"):
            await short.step([5, 6, 7])
        await short.close()
        with pytest.raises(SequenceTooLongError, match="4096"):
            await RemoteSession.open(client.p2p, route, SPEC.max_position_embeddings + 1)
        await keep_going()
        # the KV budget of the middle hop: one big session fits, a second does not
        big = await RemoteSession.open(client.p2p, route, 4000)
        with pytest.raises(BusyError, match=f"KV budget of {MIDDLE_KV_TOKENS} positions") as refused:
            await RemoteSession.open(client.p2p, route, 3000, session_id="second-big")
        assert refused.value.peer_id == servers[1].peer_id
        await keep_going()
        await big.close()
        # the first hop released its part of the refused session: the same id opens now
        second = await RemoteSession.open(client.p2p, route, 3000, session_id="second-big")
        with pytest.raises(DuplicateSessionError):
            await RemoteSession.open(client.p2p, route, 30, session_id="second-big")
        await second.close()
        while len(tokens) < 8:
            await keep_going()
        await session.close()
        with pytest.raises(SessionNotFoundError):
            await session.step([5], position=len(ids) + 7)
        return tokens

    assert client.run(scenario()) == expected
