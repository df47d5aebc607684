"""``tvix-store daemon`` with TLS and client certificates, used by a client command."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.daemons import cli_env, daemon, tvix_store
from tests.support.tls import make_pki

pytestmark = pytest.mark.e2e


def test_mutual_tls_daemon_and_client(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello").write_text("hello over TLS\n")
    flags = (
        "--tls-cert", str(pki.server_cert),
        "--tls-key", str(pki.server_key),
        "--tls-client-ca", str(pki.ca),
    )  # fmt: skip
    with daemon(data_dir=tmp_path / "data", extra_args=flags) as (_proc, url):
        assert url.startswith("grpc+https://127.0.0.1:")
        client = f"{url}?ca={pki.ca}&cert={pki.client_cert}&key={pki.client_key}"
        out = tvix_store("import", tree, env=cli_env(client))
        path = out.stdout.decode().strip()
        assert path.startswith("/nix/store/")
        cat = tvix_store("cat", f"{path}/hello", env=cli_env(client))
        assert cat.stdout == b"hello over TLS\n"
        # Without a client certificate the daemon does not let the client in.
        refused = tvix_store("cat", f"{path}/hello", env=cli_env(f"{url}?ca={pki.ca}"), check=False)
        assert refused.returncode == 1
        assert b"UNAVAILABLE" in refused.stderr


@pytest.mark.parametrize(
    ("flags", "message", "code"),
    [
        (("--tls-cert", "c.pem"), "--tls-cert and --tls-key go together", 2),
        (("--tls-client-ca", "ca.pem"), "--tls-client-ca needs --tls-cert and --tls-key", 2),
        (("--tls-cert", "absent.pem", "--tls-key", "absent.key"), "cannot read the TLS", 1),
    ],
)
def test_incomplete_tls_options_are_refused(
    tmp_path: Path, flags: tuple[str, ...], message: str, code: int
) -> None:
    proc = tvix_store(
        "daemon", "--data-dir", tmp_path / "data", "--listen-address", "127.0.0.1:0", *flags,
        check=False,
    )  # fmt: skip
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr.decode()
