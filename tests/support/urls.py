"""Rows the three URL tables share (tests/*/test_*service_urls.py), and how a row is checked.

A valid row is ``(url, type, attributes)``: building ``url`` gives an
instance of ``type`` whose (dotted) ``attributes`` have these values. Several
of them are private state of the backend today: the table is the one place
to update when a backend exposes its settings (a config object).
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

#: Rejected by every kind, whatever the scheme.
GENERIC_INVALID = [
    ("memory://host", "no host expected"),
    ("memory:///some/path", "no path expected"),
    ("memory://?foo=bar", "unknown option.*foo"),
    ("memory://?a=1&a=2", "'a' given twice"),
    ("nope://", "unknown scheme 'nope'"),
    ("memory", "expected scheme://"),
    ("", "expected scheme://"),
]

#: gRPC clients (all three kinds): the URL and the channel target it dials.
GRPC_VALID = [
    ("grpc+http://localhost:8000", "localhost:8000"),
    ("grpc+http://127.0.0.1:1", "127.0.0.1:1"),
    ("grpc+http://[::1]:8000", "[::1]:8000"),
    ("grpc+http://[::1]:8000/", "[::1]:8000"),
    ("grpc+unix:///run/tvix/store.sock", "unix:/run/tvix/store.sock"),
    ("grpc+https://localhost:443", "localhost:443"),
]

#: gRPC clients speaking the snix service names, or TLS with a CA file: URL, target, protocol.
GRPC_OPTIONS_VALID = [
    ("grpc+http://localhost:8000?protocol=snix", "localhost:8000", "snix"),
    ("grpc+unix:///run/s.sock?protocol=tvix", "unix:/run/s.sock", "tvix"),
    ("grpc+https://store.example.org:443?ca={tmp}/ca.pem", "store.example.org:443", "tvix"),
]

GRPC_INVALID = [
    ("grpc+http://localhost", "port is required"),
    ("grpc+http://localhost:", "port is required"),
    ("grpc+http://localhost:99999", "out of range"),
    ("grpc+http://localhost:0", "out of range"),
    ("grpc+http://localhost:x", "port is required"),
    ("grpc+http://::1:8000", "port is required"),
    ("grpc+http://user@localhost:8000", "port is required"),
    ("grpc+http://", "host:port is required"),
    ("grpc+http://localhost:8000/some/path", "no path expected"),
    ("grpc+http://localhost:8000?wait-connect=1", "unknown option"),
    ("grpc+unix:///run/s.sock?foo=bar", r"unknown option\(s\) foo"),
    ("grpc+unix://", "a path is required"),
    ("grpc+unix://host/run/s.sock", "no host expected"),
    ("grpc+http://localhost:8000?protocol=nix", "protocol must be one of tvix, snix"),
    ("grpc+http://localhost:8000?ca=/x.pem", r"unknown option\(s\) ca"),
    ("grpc+https://localhost:443?cert={tmp}/c.pem", "needs both cert and key"),
    ("grpc+https://localhost:443?ca={tmp}/absent.pem", "cannot read the TLS CA .*absent.pem"),
]

#: PostgreSQL (directories and PathInfos): parsed and checked without connecting.
#: ``display`` is the DSN without the password.
POSTGRES_VALID = [
    (
        "postgresql://user@localhost/db",
        {
            "_db.display": "postgresql://user@localhost/db",
            "_db._schema": None,
            "_db._pool_size": 10,
        },
    ),
    (
        "postgres://user:pw@db.example.org:6543/tvix?sslmode=require&application_name=tvix",
        {
            "_db.display": "postgresql://user@db.example.org:6543/tvix",
            "_db._schema": None,
            "_db._pool_size": 10,
        },
    ),
    (
        "postgresql:///tvix?host=/var/run/postgresql&schema=store&pool_size=3",
        {"_db.display": "postgresql:/tvix", "_db._schema": "store", "_db._pool_size": 3},
    ),
]

POSTGRES_INVALID = [
    ("postgresql://h/db?foo=1", "unknown option"),
    ("postgresql://h/db?options=-csearch_path%3Dx", "unknown option"),
    ("postgresql://h/db?pool_size=0", "pool_size must be positive"),
    ("postgresql://h/db?pool_size=x", "integer"),
    ("postgresql://h/db?schema=", "empty schema"),
]


def grpc_rows(client: type) -> list[tuple[str, type, dict[str, Any]]]:
    """:data:`GRPC_VALID` and :data:`GRPC_OPTIONS_VALID` as valid rows for ``client``."""
    return [
        *((url, client, {"address": url, "_channel.target": t}) for url, t in GRPC_VALID),
        *(
            (url, client, {"_channel.target": t, "protocol": protocol})
            for url, t, protocol in GRPC_OPTIONS_VALID
        ),
    ]


def check_built(
    svc: object, expected_type: type, attributes: dict[str, Any], tmp: Path | None = None
) -> None:
    """Assert ``svc`` is an ``expected_type`` with these (dotted) ``attributes``.

    ``{tmp}`` in a string value stands for ``tmp``.
    """
    assert type(svc) is expected_type, f"{type(svc).__name__} is not {expected_type.__name__}"
    want = {k: v.format(tmp=tmp) if isinstance(v, str) else v for k, v in attributes.items()}
    got = {name: operator.attrgetter(name)(svc) for name in attributes}
    assert got == want


def prepared(url: str, tmp: Path) -> str:
    """``url`` with ``{tmp}`` standing for ``tmp``, where a ``ca.pem`` file exists."""
    (tmp / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    return url.format(tmp=tmp)
