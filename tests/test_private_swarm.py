"""A private swarm (`--swarm-key`) on 127.0.0.1: a bootstrap and two `helix-node join` processes
holding one key, a tiny 2-layer Llama. Holders of the key generate as in an open swarm; a node or a
client without it (or with another key) is refused with one line, and a stranger that skips the
refusal and talks to the DHT and the nodes directly can neither read, write nor call anything.

hivemind's p2pd has no libp2p private-network (PSK) option, so the key seals DHT records and tags
RPCs (`helix_p2p.swarm.swarm_key`); these tests check those layers end to end."""

from __future__ import annotations

import asyncio
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from procs import FAST, Proc, Processes, SwarmObserver, start_bootstrap, start_node, wait_for

MODEL_ID = "tiny-private"
NUM_LAYERS = 2
PROMPT = "the quick brown fox"
TIMINGS = dict(FAST, **{"--ttl-s": "10", "--refresh-s": "1.5"})
TABLES = {"a": [900.0, 500.0], "b": [800.0, 450.0]}
HELIX = str(Path(sys.executable).parent / "helix")


# ------------------------------------------------------------------------------ no processes


def test_keygen_writes_a_swarm_key_file_for_its_owner_only(tmp_path) -> None:
    path = tmp_path / "swarm.key"
    done = subprocess.run(
        check=False, args=[HELIX, "keygen", str(path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = path.read_text().split("\n")
    assert lines[:2] == ["/key/swarm/psk/1.0.0/", "/base16/"] and lines[3:] == [""]
    assert len(lines[2]) == 64 and bytes.fromhex(lines[2])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    first = path.read_text()

    again = subprocess.run(
        check=False, args=[HELIX, "keygen", str(path)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"helix keygen: error: {path} already exists; pass --force to replace it"
    ]
    assert path.read_text() == first

    forced = subprocess.run(
        check=False, args=[HELIX, "keygen", "--force", str(path)], capture_output=True, text=True, timeout=60
    )
    assert forced.returncode == 0 and path.read_text() != first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "not a swarm key"),
        ("/key/swarm/psk/1.0.0/\n/base64/\n" + "ab" * 32 + "\n", "not a swarm key"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "ab" * 31 + "\n", "must be 64 hex digits"),
        ("/key/swarm/psk/1.0.0/\n/base16/\n" + "zz" * 32 + "\n", "must be 64 hex digits"),
    ],
)
def test_a_malformed_key_file_is_named_with_what_is_wrong(tmp_path, text: str, why: str) -> None:
    from helix_p2p.swarm.swarm_key import SwarmKeyError, load_swarm_key

    path = tmp_path / "bad.key"
    path.write_text(text)
    with pytest.raises(SwarmKeyError, match=f"^swarm key {path}: .*{why}"):
        load_swarm_key(path)


def test_a_bad_key_file_is_one_line_from_the_command_line(tmp_path) -> None:
    path = tmp_path / "bad.key"
    path.write_text("not a key\n")
    argv = [HELIX, "status", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
            "--swarm-key", str(path)]  # fmt: skip
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"helix status: error: swarm key {path}: not a swarm key")


def test_sealed_records_open_only_under_their_key_and_place() -> None:
    from hivemind.dht.validation import DHTRecord

    from helix_p2p.swarm.sealed_records import SealedRecordValidator
    from helix_p2p.swarm.swarm_key import SwarmKey

    mine, other = SwarmKey(b"\x01" * 32), SwarmKey(b"\x02" * 32)
    record = DHTRecord(key=b"k", subkey=b"[owner:x]", value=b"payload", expiration_time=123.0)
    sealed = replace(record, value=SealedRecordValidator(mine).sign_value(record))
    assert b"payload" not in sealed.value
    assert SealedRecordValidator(mine).validate(sealed)
    assert SealedRecordValidator(mine).strip_value(sealed) == b"payload"
    assert not SealedRecordValidator(other).validate(sealed)
    assert not SealedRecordValidator(mine).validate(replace(sealed, expiration_time=124.0))
    assert not SealedRecordValidator(mine).validate(replace(sealed, subkey=b"[owner:y]"))
    assert not SealedRecordValidator(mine).validate(record)  # a plain value is refused
    assert mine.dht_prefix("helix") != other.dht_prefix("helix") != "helix"


# ------------------------------------------------------------------------------- the swarm


@dataclass
class Swarm:
    procs: Processes
    maddrs: list[str]
    model: Path
    key: Path
    other_key: Path
    observer: SwarmObserver
    intruder: Proc
    stranger: Proc


def _ready(s: Swarm):
    return s.observer.served_plan(MODEL_ID, min_placed=len(TABLES))


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    from helix_p2p.shard import TinyModelSpec, make_tiny_model
    from helix_p2p.swarm.swarm_key import write_new_swarm_key

    workdir = tmp_path_factory.mktemp("private-swarm")
    model = make_tiny_model(workdir / MODEL_ID, TinyModelSpec(num_layers=NUM_LAYERS, initializer_range=0.1))
    key = Path(write_new_swarm_key(workdir / "swarm.key").path)
    other_key = Path(write_new_swarm_key(workdir / "other.key").path)
    with Processes(workdir) as procs:
        boot = start_bootstrap(procs, extra=["--swarm-key", str(key)])
        assert boot.join_line.endswith(f"--swarm-key {key}")
        observer = SwarmObserver(boot.maddrs, swarm_key=key)
        try:
            for name, table in TABLES.items():
                start_node(procs, name, boot.maddrs, model, table, "--planner-method", "petals",
                           "--swarm-key", str(key), timings=TIMINGS)  # fmt: skip
            # Started with the keyed nodes so that their slow start overlaps.
            intruder = start_node(procs, "intruder", boot.maddrs, model, [700.0, 400.0], timings=TIMINGS)
            stranger = start_node(procs, "stranger", boot.maddrs, model, [700.0, 400.0],
                                  "--swarm-key", str(other_key), timings=TIMINGS)  # fmt: skip
            s = Swarm(procs, boot.maddrs, model, key, other_key, observer, intruder, stranger)
            wait_for(lambda: _ready(s), 150, "a plan over both keyed nodes, loaded", describe=procs.report)
            yield s
        finally:
            observer.close()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_client_with_the_key_generates_as_the_whole_model(swarm) -> None:
    from helix_p2p.client import ClientOptions, HelixClient
    from shard_fixtures import whole_model_greedy

    ids, whole = whole_model_greedy(swarm.model, PROMPT, 6)
    options = ClientOptions(step_timeout_s=20, route_wait_s=15)
    with HelixClient(swarm.maddrs, model=str(swarm.model), options=options, swarm_key=swarm.key) as client:
        result = client.generate(PROMPT, max_new_tokens=6)
    assert result.prompt_token_ids == ids
    assert result.token_ids == whole
    assert result.route[0]["start"] == 0 and result.route[-1]["end"] == NUM_LAYERS


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_keyed_peers_probe_links_and_check_reachability_with_each_other(swarm) -> None:
    """Link probes and the bootstrap's dial-back are tagged RPCs too: they must still work."""

    def measured():
        records, _ = swarm.observer.read()
        done = [r for r in records.values() if r.links and r.reachability.value == "direct"]
        return records if len(done) == len(TABLES) else None

    # probing rounds run every few seconds, but a busy 2-core machine can delay the first ones a lot
    wait_for(measured, 180, "both keyed nodes with measured links and a direct reachability verdict")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize(
    "who, why",
    [
        ("intruder", "runs a private swarm: pass its key with --swarm-key FILE"),
        ("stranger", "under another key"),
    ],
)
def test_a_node_without_the_key_exits_and_never_appears(swarm, who: str, why: str) -> None:
    proc = getattr(swarm, who)
    code = swarm.procs.wait(proc, 120)
    assert code != 0
    errors = [line for line in proc.stderr().splitlines() if "error" in line.lower()]
    assert errors and why in errors[-1], proc.stderr()[-2000:]
    records, _ = swarm.observer.read()
    assert len(records) == len(TABLES) and who not in {r.name for r in records.values()}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_client_without_the_key_is_refused_quickly(swarm) -> None:
    from helix_p2p.client import ClientOptions, HelixClient

    from helix_p2p.swarm.dht import SwarmConnectError

    started = time.monotonic()
    with pytest.raises(SwarmConnectError, match=r"runs a private swarm: pass its key with --swarm-key"):
        HelixClient(swarm.maddrs, model=str(swarm.model), options=ClientOptions(connect_timeout_s=20))
    assert time.monotonic() - started < 30

    argv = [HELIX, "status", "--initial-peers", *swarm.maddrs, "--swarm-key", str(swarm.other_key)]
    done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "runs a private swarm under another key" in lines[0], done.stderr


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_stranger_that_skips_the_hello_can_read_write_and_call_nothing(swarm) -> None:
    """A peer that knows the swarm's derived key names (the strongest stranger: it has everything
    but the key) reads only ciphertext, its record is refused by keyed peers, and a node answers
    its data-plane call with a refusal."""
    asyncio.run(_stranger(swarm))
    records, _ = swarm.observer.read()
    assert len(records) == len(TABLES) and all(r.name in TABLES for r in records.values())


async def _stranger(swarm: Swarm) -> None:
    from hivemind.dht.node import DHTNode
    from hivemind.dht.validation import CompositeValidator
    from swarm_builders import node

    from helix_p2p.protocol import CloseSession, Failure, encode_request
    from helix_p2p.protocol.transport import call_peer
    from helix_p2p.swarm.dht import SwarmDHT
    from helix_p2p.swarm.identity import ephemeral_identity
    from helix_p2p.swarm.swarm_key import load_swarm_key
    from helix_p2p.swarm.validator import swarm_validators

    prefix = load_swarm_key(swarm.key).dht_prefix("helix")
    identity = ephemeral_identity()
    raw = await DHTNode.create(
        initial_peers=swarm.maddrs, identity_path=str(identity.path), host_maddrs=["/ip4/127.0.0.1/tcp/0"],
        record_validator=CompositeValidator(swarm_validators(identity, prefix)), client_mode=True,
        check_if_identity_free=False,
    )  # fmt: skip
    try:
        stranger = SwarmDHT(identity=identity, prefix=prefix, node=raw)
        seen, plans = await stranger.read()
        assert seen == {} and plans == []  # sealed values do not parse without the key

        forged = node(identity.peer_id, name="forged", updated_at=time.time())
        await stranger.announce(forged, ttl_s=30)
        await asyncio.sleep(1)

        keyed_records, _ = swarm.observer.read()
        target = next(iter(keyed_records))
        reply = await call_peer(raw.p2p, target, encode_request(CloseSession(uuid.uuid4().hex)), 20)
        assert (
            isinstance(reply, Failure) and "without this private swarm's key (--swarm-key)" in reply.message
        )
    finally:
        await raw.shutdown()
        identity.path.chmod(0o600)
        identity.path.unlink()
