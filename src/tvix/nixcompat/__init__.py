"""Nix's formats: nixbase32, store paths, content addresses, NAR, narinfo, signatures.

This package depends on nothing else of ours (only the standard library,
``cryptography`` for ed25519 and ``zstandard`` for zstd-compressed NARs);
the real Nix 2.8 is the authority it is tested against.
"""

from tvix.nixcompat import nar, nixbase32
from tvix.nixcompat.cahash import CAHash, CAKind
from tvix.nixcompat.errors import (
    CompressionError,
    InvalidCAHashError,
    InvalidHashError,
    InvalidKeyError,
    InvalidStorePathError,
    NARError,
    NarInfoError,
    Nixbase32Error,
    NixCompatError,
    SignatureError,
)
from tvix.nixcompat.hashes import HashAlgo, decode_digest, format_hash, parse_hash
from tvix.nixcompat.nar import NarWriter, dump_path, read_nar
from tvix.nixcompat.narinfo import NarInfo, fingerprint
from tvix.nixcompat.signing import (
    Signature,
    SigningKey,
    VerifyingKey,
    parse_public_keys,
    verify_any,
)
from tvix.nixcompat.storepath import (
    STORE_DIR,
    StorePath,
    build_ca_path,
    compress_hash,
    make_store_path,
    validate_name,
)

__all__ = [
    "STORE_DIR",
    "CAHash",
    "CAKind",
    "CompressionError",
    "HashAlgo",
    "InvalidCAHashError",
    "InvalidHashError",
    "InvalidKeyError",
    "InvalidStorePathError",
    "NARError",
    "NarInfo",
    "NarInfoError",
    "NarWriter",
    "NixCompatError",
    "Nixbase32Error",
    "Signature",
    "SignatureError",
    "SigningKey",
    "StorePath",
    "VerifyingKey",
    "build_ca_path",
    "compress_hash",
    "decode_digest",
    "dump_path",
    "fingerprint",
    "format_hash",
    "make_store_path",
    "nar",
    "nixbase32",
    "parse_hash",
    "parse_public_keys",
    "read_nar",
    "validate_name",
    "verify_any",
]
