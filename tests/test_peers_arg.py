"""`--initial-peers` falls back to `$HELIX_INITIAL_PEERS`, so the README's exported bootstrap address
works for every swarm command; without either, the command refuses in argparse's one line."""

from __future__ import annotations

import argparse

import pytest

from helix_p2p.cli.peers_arg import add_initial_peers, initial_peers_from_env


def test_env_splits_on_spaces_commas_and_newlines():
    env = {"HELIX_INITIAL_PEERS": " /ip4/1.2.3.4/tcp/1/p2p/A,/ip4/5.6.7.8/tcp/2/p2p/B\n/dns/x/tcp/3/p2p/C "}
    assert initial_peers_from_env(env) == ["/ip4/1.2.3.4/tcp/1/p2p/A", "/ip4/5.6.7.8/tcp/2/p2p/B", "/dns/x/tcp/3/p2p/C"]
    assert initial_peers_from_env({}) == []


def test_flag_defaults_to_env_and_flag_wins(monkeypatch):
    monkeypatch.setenv("HELIX_INITIAL_PEERS", "/ip4/127.0.0.1/tcp/31337/p2p/QmX")
    parser = argparse.ArgumentParser()
    add_initial_peers(parser)
    assert parser.parse_args([]).initial_peers == ["/ip4/127.0.0.1/tcp/31337/p2p/QmX"]
    assert parser.parse_args(["--initial-peers", "/ip4/10.0.0.1/tcp/1/p2p/QmY"]).initial_peers == [
        "/ip4/10.0.0.1/tcp/1/p2p/QmY"
    ]


def test_flag_is_required_without_env(monkeypatch, capsys):
    monkeypatch.delenv("HELIX_INITIAL_PEERS", raising=False)
    parser = argparse.ArgumentParser(prog="helix-node")
    add_initial_peers(parser)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([])
    assert exit_info.value.code == 2
    assert "--initial-peers" in capsys.readouterr().err
