"""Private swarms: one shared secret (`--swarm-key FILE`) that every bootstrap, node and client of
the swarm holds, and without which a peer can neither write nor read the swarm's state nor call any
of its peers.

libp2p's own answer, a private-network key (PSK) that encrypts every connection before the
handshake, is not reachable from here: the p2pd that hivemind ships has no flag and no config field
for it (its `-help` lists none; `P2P.create` passes no extra arguments). So the key protects the
swarm one layer up, where our code sees every byte:

- DHT records: every value a keyed peer stores is sealed with AES-256-GCM under a key derived from
  the swarm key, with the DHT key, subkey and expiration as associated data; a keyed peer refuses to
  store or accept any record that does not open (`SealedRecordValidator`). The swarm's DHT key names
  are derived from the swarm key too (`dht_prefix`), so a stranger does not even learn which keys
  are the swarm's.
- RPCs (data plane, link probes, reachability checks): every request and reply carries an
  HMAC-SHA256 tag over the protocol, the direction, the sender's and receiver's peer ids and the
  payload; a handler refuses an untagged or badly tagged request before parsing it.
- A hello protocol lets a peer that joins learn at once whether its initial peers run a private
  swarm and under which key (an 8-byte key id, an HMAC of a constant), so a keyless or wrongly
  keyed peer stops with a one-line error instead of finding an empty swarm.

The file format is libp2p's swarm.key (`/key/swarm/psk/1.0.0/`, `/base16/`, 64 hex digits), so the
same file would serve a libp2p daemon that supports private networks."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
import secrets
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from helix_p2p.errors import HelixError

if TYPE_CHECKING:  # hivemind is imported by the peers that use these, not by `helix keygen`
    from hivemind.p2p import P2P

HEADER = "/key/swarm/psk/1.0.0/\n/base16/\n"
KEY_BYTES = 32
TAG_BYTES = 32
NONCE_BYTES = 12
HELLO_PROTOCOL = "/helix/swarm-hello/1"


class SwarmKeyError(HelixError):
    """A swarm key file that cannot be read or is not in swarm.key format."""


class SwarmAuthError(HelixError):
    """A message or record that is not authenticated with this peer's swarm key."""


@dataclass(frozen=True)
class SwarmKey:
    secret: bytes = dataclasses.field(repr=False)
    path: str = ""  # where it was read from, for messages

    def _derive(self, label: str) -> bytes:
        return hmac.new(self.secret, f"helix-p2p/{label}".encode(), hashlib.sha256).digest()

    @property
    def key_id(self) -> str:
        """A public name for the key (16 hex digits): tells peers whether they hold the same key."""
        return self._derive("key-id").hex()[:16]

    def dht_prefix(self, prefix: str) -> str:
        """The DHT key prefix a private swarm named `prefix` uses (valid under `check_prefix`)."""
        return "p" + hmac.new(self._derive("dht-prefix"), prefix.encode(), hashlib.sha256).hexdigest()[:32]

    def tag(self, protocol: str, direction: str, sender: str, receiver: str, payload: bytes) -> bytes:
        mac = hmac.new(self._derive("rpc"), digestmod=hashlib.sha256)
        for part in (protocol, direction, sender, receiver):
            encoded = part.encode()
            mac.update(len(encoded).to_bytes(2, "big") + encoded)
        mac.update(payload)
        return mac.digest()

    def seal(self, protocol: str, direction: str, sender: str, receiver: str, payload: bytes) -> bytes:
        return self.tag(protocol, direction, sender, receiver, payload) + payload

    def open(self, protocol: str, direction: str, sender: str, receiver: str, data: bytes) -> bytes:
        """The payload of `data` if its tag is right; `SwarmAuthError` naming the sender otherwise."""
        payload = data[TAG_BYTES:]
        if len(data) < TAG_BYTES or not hmac.compare_digest(
            data[:TAG_BYTES], self.tag(protocol, direction, sender, receiver, payload)
        ):
            raise SwarmAuthError(
                f"a {protocol} {direction} from peer {sender} is not authenticated with this private "
                "swarm's key (--swarm-key)"
            )
        return payload

    def aead(self) -> AESGCM:
        return AESGCM(self._derive("records"))


def parse_swarm_key(text: str, path: str = "") -> SwarmKey:
    where = f"swarm key {path}".rstrip()
    lines = text.strip().splitlines()
    if len(lines) != 3 or lines[0].strip() != "/key/swarm/psk/1.0.0/" or lines[1].strip() != "/base16/":
        raise SwarmKeyError(
            f"{where}: not a swarm key; expected 3 lines '/key/swarm/psk/1.0.0/', '/base16/' and 64 hex "
            "digits (make one with `helix keygen`)"
        )
    digits = lines[2].strip()
    try:
        secret = bytes.fromhex(digits)
    except ValueError:
        secret = b""
    if len(secret) != KEY_BYTES:
        raise SwarmKeyError(f"{where}: the key line must be {2 * KEY_BYTES} hex digits, got {digits[:80]!r}")
    return SwarmKey(secret, path)


def load_swarm_key(path: str | os.PathLike[str]) -> SwarmKey:
    try:
        text = Path(path).read_text(encoding="ascii")
    except FileNotFoundError:
        raise SwarmKeyError(f"swarm key {path}: no such file (make one with `helix keygen {path}`)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SwarmKeyError(f"swarm key {path}: cannot read it ({e})") from None
    return parse_swarm_key(text, str(path))


def format_swarm_key(secret: bytes) -> str:
    return HEADER + secret.hex() + "\n"


def write_new_swarm_key(path: str | os.PathLike[str], *, force: bool = False) -> SwarmKey:
    """Write a fresh random key readable by its owner only (mode 0600)."""
    path = Path(path)
    if path.exists() and not force:
        raise SwarmKeyError(f"{path} already exists; pass --force to replace it")
    if not path.parent.is_dir():
        raise SwarmKeyError(f"cannot write {path}: the folder {path.parent} does not exist")
    secret = secrets.token_bytes(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(format_swarm_key(secret))
    os.replace(tmp, path)
    return SwarmKey(secret, str(path))


# ------------------------------------------------------------------------------------- RPCs

_KEYS: weakref.WeakKeyDictionary[P2P, SwarmKey] = weakref.WeakKeyDictionary()


def bind_swarm_key(p2p: P2P, key: SwarmKey | None) -> None:
    """Make every RPC through `p2p` (ours and its handlers) authenticated with `key`. The key is
    looked up by the P2P object so that the transport, the data plane and the probes, which all
    receive a `P2P`, need no extra parameter threaded through every caller."""
    if key is not None:
        _KEYS[p2p] = key


def swarm_key_of(p2p: P2P) -> SwarmKey | None:
    return _KEYS.get(p2p)


def _me(p2p: P2P) -> str:
    return p2p.peer_id.to_base58()


def seal_request(p2p: P2P, protocol: str, receiver: str, payload: bytes) -> bytes:
    key = swarm_key_of(p2p)
    return payload if key is None else key.seal(protocol, "request", _me(p2p), receiver, payload)


def open_request(p2p: P2P, protocol: str, sender: str, data: bytes) -> bytes:
    key = swarm_key_of(p2p)
    return data if key is None else key.open(protocol, "request", sender, _me(p2p), data)


def seal_reply(p2p: P2P, protocol: str, receiver: str, payload: bytes) -> bytes:
    key = swarm_key_of(p2p)
    return payload if key is None else key.seal(protocol, "reply", _me(p2p), receiver, payload)


def open_reply(p2p: P2P, protocol: str, sender: str, data: bytes) -> bytes:
    key = swarm_key_of(p2p)
    return data if key is None else key.open(protocol, "reply", sender, _me(p2p), data)


# ------------------------------------------------------------------------------------ hello


def hello_answer(key: SwarmKey | None) -> bytes:
    return b"open" if key is None else b"private:" + key.key_id.encode()


def hello_refusal(answer: bytes, key: SwarmKey | None, peer: str) -> str | None:
    """Why a peer holding `key` must not join the swarm of an initial peer that answered `answer`
    to the hello (None: it may)."""
    if answer == b"open":
        if key is None:
            return None
        return (
            f"initial peer {peer} runs an open swarm but --swarm-key {key.path} was given; "
            "start the bootstrap with the same --swarm-key or drop it here"
        )
    if answer.startswith(b"private:"):
        theirs = answer[len(b"private:") :].decode("ascii", "replace")[:32]
        if key is None:
            return (
                f"initial peer {peer} runs a private swarm: pass its key with --swarm-key FILE "
                "(ask the swarm's operator for it)"
            )
        if theirs != key.key_id:
            return (
                f"initial peer {peer} runs a private swarm under another key (id {theirs}); "
                f"--swarm-key {key.path} has id {key.key_id}"
            )
        return None
    return f"initial peer {peer} gave an unknown answer to the swarm hello: {answer[:40]!r}"
