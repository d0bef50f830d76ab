"""The pure parts of lying-peer verification: the rule that weighs reports into bans, the report's
wire form and schema, the forward call's wire form, and the output comparison."""

from __future__ import annotations

import pytest
import torch

from helix_p2p.protocol.errors import MalformedMessageError
from helix_p2p.protocol.forward import (
    Forward,
    Forwarded,
    decode_forward,
    decode_forwarded,
    encode_forward,
    forwarded_message,
)
from helix_p2p.protocol.limits import DataPlaneLimits
from helix_p2p.protocol.messages import Failure
from helix_p2p.protocol.wire import encode_reply
from helix_p2p.swarm.records import RecordError
from helix_p2p.swarm.reports import (
    MAX_ACCUSED,
    Accusation,
    BanRule,
    ReportRecord,
    banned_peers,
    report_from_wire,
    report_to_wire,
    with_accusation,
)

NOW = 1_000_000.0
MODEL = "tiny"


def report(reporter: str, *accused: str, at: float = NOW - 10, model: str = MODEL) -> ReportRecord:
    return ReportRecord(reporter, model, tuple(Accusation(p, at, "outvoted") for p in accused))


# ------------------------------------------------------------------------------- the weighing rule


def test_a_peer_is_banned_by_enough_distinct_reporters() -> None:
    rule = BanRule(min_reporters=2)
    one = [report("r1", "liar")]
    assert banned_peers(one, NOW, MODEL, rule) == frozenset()
    two = [report("r1", "liar"), report("r2", "liar")]
    assert banned_peers(two, NOW, MODEL, rule) == {"liar"}
    # the same reporter twice (two entries read back) is still one reporter
    assert banned_peers([report("r1", "liar"), report("r1", "liar")], NOW, MODEL, rule) == frozenset()


def test_self_reports_stale_future_and_other_model_reports_do_not_count() -> None:
    rule = BanRule(min_reporters=1, max_age_s=600)
    assert banned_peers([report("liar", "liar")], NOW, MODEL, rule) == frozenset()
    assert banned_peers([report("r1", "p", at=NOW - 601)], NOW, MODEL, rule) == frozenset()
    assert banned_peers([report("r1", "p", at=NOW + 3600)], NOW, MODEL, rule) == frozenset()
    assert banned_peers([report("r1", "p", model="other")], NOW, MODEL, rule) == frozenset()
    assert banned_peers([report("r1", "p", at=NOW - 599)], NOW, MODEL, rule) == {"p"}


def test_reports_cannot_ban_more_than_a_share_of_the_members() -> None:
    members = [f"n{i}" for i in range(6)]
    # four reporters each accuse everyone: only half the members go, the most-reported first
    reports = [report(f"r{j}", *members[: 6 - j]) for j in range(3)]
    banned = banned_peers(reports, NOW, MODEL, BanRule(min_reporters=1), members)
    assert banned == {"n0", "n1", "n2"}
    assert (
        len(banned_peers(reports, NOW, MODEL, BanRule(min_reporters=1, max_banned_share=1.0), members)) == 6
    )
    # one member alone can still be banned
    assert banned_peers([report("r", "solo")], NOW, MODEL, BanRule(min_reporters=1), ["solo"]) == {"solo"}


def test_ban_rule_refuses_bad_settings() -> None:
    for bad in ({"min_reporters": 0}, {"max_age_s": 0.0}, {"max_banned_share": 0.0}):
        with pytest.raises(ValueError):
            BanRule(**bad)


# ----------------------------------------------------------------------------------- report records


def test_report_round_trip_and_accusation_cap() -> None:
    record = None
    for i in range(MAX_ACCUSED + 3):
        record = with_accusation(record, "me", MODEL, Accusation(f"p{i}", NOW + i, "outvoted"))
    assert record is not None and len(record.accusations) == MAX_ACCUSED
    assert record.accusations[-1].peer_id == f"p{MAX_ACCUSED + 2}"  # the most recent kept
    assert report_from_wire(report_to_wire(record)) == record
    again = with_accusation(record, "me", MODEL, Accusation("p5", NOW + 100, "again"))
    assert [a.peer_id for a in again.accusations].count("p5") == 1


@pytest.mark.parametrize(
    "change, field",
    [
        ({"format": "helix-report/9"}, "format"),
        ({"reporter": ""}, "reporter"),
        ({"accused": [["p", 1.0, "x"]] * 2}, "accused[1]"),
        ({"accused": [["p", -1.0, "x"]]}, "accused[0]"),
        ({"accused": [["p", 1.0]]}, "accused[0]"),
        ({"accused": [[f"p{i}", 1.0, "x"] for i in range(MAX_ACCUSED + 1)]}, "accused"),
        ({"accused": [["p", 1.0, "x" * 500]]}, "accused[0]"),
    ],
)
def test_bad_reports_are_refused_naming_the_field(change, field) -> None:
    doc = dict(report_to_wire(report("me", "p")), **change)
    with pytest.raises(RecordError, match=field.replace("[", r"\[").replace("]", r"\]")):
        report_from_wire(doc)


# ------------------------------------------------------------------------------ the forward call


def _request_proto(message: Forward):
    from hivemind.proto import runtime_pb2

    return runtime_pb2.ExpertRequest.FromString(encode_forward(message))


def test_forward_round_trips_and_checks_its_reply() -> None:
    limits = DataPlaneLimits()
    ids = Forward(0, 2, token_ids=torch.tensor([1, 2, 3]))
    back = decode_forward(_request_proto(ids), limits)
    assert back.layers == (0, 2) and back.token_ids.tolist() == [1, 2, 3]
    hidden = torch.randn(3, 8)
    mid = Forward(2, 4, hidden_states=hidden)
    assert torch.equal(decode_forward(_request_proto(mid), limits).hidden_states, hidden)

    reply = forwarded_message(Forwarded(0, 2, torch.randn(3, 8), False)).SerializeToString()
    assert decode_forwarded(reply, ids, 1 << 20).output.shape == (3, 8)
    # a reply for other layers, or for other tokens, is refused
    with pytest.raises(MalformedMessageError, match="layers"):
        decode_forwarded(reply, Forward(0, 1, token_ids=torch.tensor([1, 2, 3])), 1 << 20)
    with pytest.raises(MalformedMessageError):
        decode_forwarded(reply, Forward(0, 2, token_ids=torch.tensor([1, 2])), 1 << 20)
    with pytest.raises(MalformedMessageError, match="limit"):
        decode_forwarded(reply, ids, 16)
    failure = decode_forwarded(encode_reply(Failure.of(MalformedMessageError("no"), "x")), ids, 1 << 20)
    assert isinstance(failure, Failure)


def test_forward_refuses_inputs_that_do_not_fit_its_layers() -> None:
    with pytest.raises(MalformedMessageError, match="token_ids"):
        Forward(0, 2, hidden_states=torch.randn(2, 8))
    with pytest.raises(MalformedMessageError, match="hidden_states"):
        Forward(1, 2, token_ids=torch.tensor([1]))
    with pytest.raises(MalformedMessageError, match="range"):
        Forward(2, 2, hidden_states=torch.randn(2, 8))


# ---------------------------------------------------------------------------------- comparison


def test_outputs_match_within_the_dtype_tolerance() -> None:
    from helix_p2p.client.verify import outputs_match, relative_error, tolerance_for

    x = torch.randn(4, 16)
    assert outputs_match(x, x.clone())
    assert outputs_match(x, x + 1e-5 * x.abs().max())
    assert not outputs_match(x, x + 0.1 * torch.randn(4, 16))
    assert not outputs_match(x, x[:3])
    nan = x.clone()
    nan[0, 0] = float("nan")
    assert relative_error(x, nan) == float("inf")
    # half precision rounds more: what fp32 would call a lie, bf16 allows
    rounded = x.to(torch.bfloat16)
    assert not outputs_match(x, rounded.float(), tolerance_for(torch.float32))
    assert outputs_match(x.to(torch.bfloat16), (x * 1.001).to(torch.bfloat16))
    assert tolerance_for(torch.float32) < tolerance_for(torch.float16) < tolerance_for(torch.bfloat16)


# ----------------------------------------------------------------------------------- the flags


def test_the_perturb_flag_is_hidden_and_bad_settings_are_refused() -> None:
    from helix_p2p.client import ClientError, HelixClient
    from helix_p2p.node.cli import build_parser, config_from_args
    from helix_p2p.node.config import NodeConfigError

    parser = build_parser()
    join = parser._subparsers._group_actions[0].choices["join"]  # the subcommand's own --help
    assert "test-perturb" not in join.format_help() and "--ban-min-reporters" in join.format_help()
    peer = "/ip4/127.0.0.1/tcp/1/p2p/QmesZynDcQNTNqKvuMeJ5GrPXKwamZ227YAJZ4UA1A1ypy"
    base = ["join", "--initial-peers", peer, "--model", "m"]
    config = config_from_args(parser.parse_args([*base, "--test-perturb-outputs", "0.5"]))
    assert config.test_perturb_scale == 0.5 and config.planner.ban_min_reporters == 2
    for bad in (["--ban-min-reporters", "0"], ["--test-perturb-outputs", "-1"]):
        with pytest.raises(NodeConfigError, match=bad[0]):
            config_from_args(parser.parse_args([*base, *bad]))
    with pytest.raises(ClientError, match="verify_rate"):
        HelixClient([peer], model="m", verify_rate=1.5)
