"""The hand-off of forwards between a node's event loop and its worker thread, in one process with
a real tiny shard: the worker's ordering, results, errors and cancellation, and the batcher's choice
between the worker and running a short decode batch on the loop itself."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
import torch
from helix_p2p.node.forward_worker import ForwardWorker
from helix_p2p.node.serving import _Batcher

from helix_p2p.shard import ShardSpec, StepRequest, TinyModelSpec, load_shard, make_tiny_model

pytestmark = pytest.mark.timeout(60)


def test_a_worker_runs_jobs_in_order_on_its_own_thread_and_hands_back_results_and_errors() -> None:
    ran: list[int] = []

    def job(i: int) -> tuple[int, int]:
        ran.append(i)
        if i == 3:
            raise ValueError("job 3 is bad")
        return i, threading.get_ident()

    async def scenario() -> None:
        worker = ForwardWorker("test-forwards")
        try:
            outcomes = await asyncio.gather(*(worker.run(job, i) for i in range(8)), return_exceptions=True)
            assert ran == list(range(8))
            error = outcomes.pop(3)
            assert isinstance(error, ValueError) and str(error) == "job 3 is bad"
            assert [i for i, _ in outcomes] == [0, 1, 2, 4, 5, 6, 7]
            threads = {ident for _, ident in outcomes}
            assert len(threads) == 1 and threading.get_ident() not in threads

            # A caller that stops waiting leaves the worker serving the next ones.
            release = threading.Event()
            blocked = asyncio.ensure_future(worker.run(release.wait, 10))
            await asyncio.sleep(0.01)
            blocked.cancel()
            release.set()
            assert await asyncio.wait_for(worker.run(job, 9), 10) == (9, next(iter(threads)))
        finally:
            worker.close()
        with pytest.raises(RuntimeError, match="closed"):
            await worker.run(job, 10)
        await asyncio.to_thread(worker._thread.join, 10)
        assert not worker.alive

    asyncio.run(scenario())


def test_short_decode_batches_run_inline_only_when_nothing_else_is_served(tmp_path: Path) -> None:
    """A decode batch runs on the loop once its cost is measured and predicted under the cap, and
    only while its steps are all the node is serving; a prefill, a batch predicted over the cap and
    one beside another call in progress go to the worker. The results are the same either way. The
    cap is set relative to what this machine measures, so the test does not depend on its speed."""
    model = make_tiny_model(tmp_path / "llama", TinyModelSpec(num_layers=4, initializer_range=0.1))
    shard = load_shard(ShardSpec(str(model), 0, 2))
    tokens = torch.randint(3, 300, (12,), generator=torch.Generator().manual_seed(0))
    calls_in_progress = [1]

    async def scenario() -> tuple[list[torch.Tensor], list[int]]:
        batcher = _Batcher(shard, 4, lambda: calls_in_progress[0], inline_forward_s=60.0)
        inline_counts = []

        async def step(ids: torch.Tensor) -> torch.Tensor:
            result = await batcher.submit(StepRequest("s", token_ids=ids))
            inline_counts.append(batcher.inline_forwards)
            assert result.hidden_states is not None
            return result.hidden_states

        try:
            shard.open_session("s", 64)
            outputs = [await step(tokens[:5])]  # a prefill: the worker
            outputs += [await step(tokens[i : i + 1]) for i in range(5, 8)]  # measured first, then inline
            calls_in_progress[0] = 2  # another call waits on the loop: the worker
            outputs.append(await step(tokens[8:9]))
            calls_in_progress[0] = 1
            outputs.append(await step(tokens[9:10]))  # inline again
            assert batcher.decode_s_per_step is not None
            batcher.inline_forward_s = batcher.decode_s_per_step / 10  # over the cap: the worker
            outputs += [await step(tokens[i : i + 1]) for i in range(10, 12)]
            return outputs, inline_counts
        finally:
            batcher.close()

    outputs, inline_counts = asyncio.run(scenario())
    assert inline_counts == [0, 0, 1, 2, 2, 3, 3, 3]
    expected = load_shard(ShardSpec(str(model), 0, 2))
    expected.open_session("whole", 64)
    whole = expected.step(StepRequest("whole", token_ids=tokens)).hidden_states
    assert torch.allclose(torch.cat(outputs), whole, atol=1e-5)


def test_a_peer_id_is_parsed_once_and_a_bad_one_is_named() -> None:
    """Every call to the next hop names its peer by text; the parse (pure-Python base58) is
    remembered, and a string that is not a peer id is a `MalformedMessageError` each time."""
    from hivemind.p2p import PeerID

    from helix_p2p.protocol import MalformedMessageError
    from helix_p2p.protocol.transport import parse_peer_id

    text = PeerID(b"\x12\x20" + bytes(range(32))).to_base58()
    first = parse_peer_id(text)
    assert first == PeerID.from_base58(text) and parse_peer_id(text) is first
    for _ in range(2):
        with pytest.raises(MalformedMessageError, match=r"'not-a-peer-0OIl' is not a peer id"):
            parse_peer_id("not-a-peer-0OIl")
