"""Who the daemon trusts, and the command line that sets it."""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys

import pytest

from tests.nix_daemon.daemon_support import clean_env
from tvix.nix_daemon import Peer, TrustPolicy


def test_trusted_users_by_name_uid_group_and_star() -> None:
    me = pwd.getpwuid(os.getuid())
    peer = Peer(pid=1, uid=me.pw_uid, gid=me.pw_gid)
    group = grp.getgrgid(me.pw_gid).gr_name
    assert TrustPolicy.parse([me.pw_name]).is_trusted(peer)
    assert TrustPolicy.parse([f"nobody, {me.pw_uid}"]).is_trusted(peer)
    assert TrustPolicy.parse([f"@{group}"]).is_trusted(peer)
    assert TrustPolicy.parse(["*"]).is_trusted(Peer())
    assert not TrustPolicy.parse(["nobody", "@no-such-group", "4242"]).is_trusted(peer)
    assert not TrustPolicy.parse([me.pw_name]).is_trusted(Peer())  # unknown peer
    assert me.pw_name in TrustPolicy.default_trusted() or "root" in TrustPolicy.default_trusted()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--listen-address unix:///PATH"),
        (["--listen-address", "127.0.0.1:9"], "only unix:///PATH"),
        (["--listen-address", "unix://relative.sock"], "must be absolute"),
        (["--listen-address", "unix:///tmp/x.sock", "--trusted-public-keys", "x"], "public"),
    ],
)
def test_command_line_errors(args: list[str], message: str) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tvix.cli.store",
            "nix-daemon",
            "--blob-service-addr",
            "memory://",
            "--directory-service-addr",
            "memory://",
            "--path-info-service-addr",
            "memory://",
            *args,
        ],
        capture_output=True,
        env=clean_env(),
        timeout=60,
    )
    assert proc.returncode == 1
    assert message in proc.stderr.decode()
