"""A peer's identity: one RSA key that is both its libp2p identity (so its peer id, and with a fixed
port its multiaddr, stay the same across restarts) and the key that signs its DHT records and
plans. Binding the two is what lets any peer check that a record claiming peer id P was written by
P: the record's subkey carries the public key, and P must be that key's libp2p peer id.

The key file is hivemind's `identity_path` file (a libp2p `PrivateKey` protobuf holding an RSA key
in DER), created on first use and reused afterwards."""

from __future__ import annotations

import functools
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import base58
import multihash
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from helix_p2p.errors import HelixError

_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


class IdentityError(HelixError):
    """An identity file that cannot be created or read."""


@dataclass(frozen=True)
class Identity:
    path: Path
    private_key: RSAPrivateKey = field(repr=False)
    peer_id: str
    #: the public key in OpenSSH form, as hivemind's signature validator embeds it
    public_key: bytes = field(repr=False)

    @property
    def owner_subkey(self) -> bytes:
        """The DHT subkey that only this peer can write (`[owner:<public key>]`)."""
        return RSASignatureValidator.PUBLIC_KEY_FORMAT.replace(b"_key_", self.public_key)


def load_identity(path: str | Path, *, create: bool = True) -> Identity:
    """Read the identity at `path`, creating it first if it does not exist and `create` is set."""
    path = Path(path).expanduser()
    if not path.exists():
        if not create:
            raise IdentityError(f"identity file {path} does not exist")
        if not path.parent.is_dir():
            raise IdentityError(f"cannot create identity {path}: directory {path.parent} does not exist")
        try:
            P2P.generate_identity(str(path))
        except OSError as e:
            raise IdentityError(f"cannot create identity {path}: {e}") from None
    try:
        data = path.read_bytes()
        der = crypto_pb2.PrivateKey.FromString(data).data
        # hivemind's RSAPrivateKey has no loader; its pickling state is exactly the DER key, which
        # is the documented way to rebuild one without generating a fresh key.
        private_key = RSAPrivateKey.__new__(RSAPrivateKey)
        private_key.__setstate__({"_private_key": der})
        public_key = private_key.get_public_key().to_bytes()
    except (OSError, ValueError, TypeError, DecodeError) as e:
        raise IdentityError(f"{path} is not a readable libp2p RSA identity: {e}") from None
    return Identity(path=path, private_key=private_key, peer_id=peer_id_of(public_key), public_key=public_key)


def ephemeral_identity(directory: str | Path | None = None) -> Identity:
    """A fresh identity in a private temporary file (the caller removes the file when done)."""
    fd, name = tempfile.mkstemp(prefix="helix-identity-", suffix=".key", dir=directory)
    os.close(fd)
    os.unlink(name)  # generate_identity refuses nothing but writes read-only; start from no file
    return load_identity(name, create=True)


@functools.lru_cache(maxsize=4096)
def peer_id_of(public_key: bytes) -> str:
    """The libp2p peer id (base58) of an RSA public key in OpenSSH form: the sha2-256 multihash
    of the protobuf-wrapped DER public key (libp2p peer-id spec; RSA keys are never inlined)."""
    try:
        key = serialization.load_ssh_public_key(public_key)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise IdentityError(f"not an OpenSSH public key: {e}") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise IdentityError("not an RSA public key")
    der = key.public_bytes(
        encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
    )
    wrapped = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    digest = multihash.encode(hashlib.sha256(wrapped).digest(), multihash.coerce_code("sha2-256"))
    return base58.b58encode(digest).decode()


def public_key_of_owner_subkey(subkey: bytes) -> bytes | None:
    """The public key in an `[owner:...]` subkey, or None if the subkey is not an owner key."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNER_RE.fullmatch(subkey)
    return match.group(1) if match else None
