"""Fixtures for the nar-bridge tests: a shared on-disk store, nar-bridge processes, the real Nix."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.nix import Nix
from tests.support.processes import Server, clean_env, start_process


class Bridge(Server):
    """A running ``nar-bridge`` process."""

    @property
    def url(self) -> str:
        """Its base URL, ``http://127.0.0.1:PORT``."""
        return self.address


StartBridge = Callable[..., Bridge]


@pytest.fixture
def start_bridge(store_args: list[str], tmp_path: Path) -> Iterator[StartBridge]:
    """Start ``nar-bridge ARGS`` on 127.0.0.1 (a free port unless ARGS name one).

    It serves the shared store, or ``store`` (arguments naming another one)
    when given. Its state (XDG_STATE_HOME) is in ``tmp_path``.
    """
    started: list[Bridge] = []

    def start(*args: str | Path, store: list[str] | None = None) -> Bridge:
        argv = [
            sys.executable,
            "-m",
            "tvix.cli.nar_bridge",
            "-v",
            "--listen-address",
            "127.0.0.1:0",
            *(store_args if store is None else store),
            *map(str, args),
        ]
        env = clean_env()
        env["XDG_STATE_HOME"] = str(tmp_path / "xdg-state")
        server = start_process("nar-bridge", argv, r"listening on (http://\S+)", env)
        bridge = Bridge(server.proc, server.address, server.log)
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


@dataclass(frozen=True)
class Closure:
    """Input-addressed and content-addressed paths with references, built by Nix."""

    tree: str  # content-addressed (fixed:r:sha256), no references
    text: str  # text:sha256, refers to tree
    built: str  # input-addressed, with a Deriver, refers to tree, text and itself

    @property
    def paths(self) -> list[str]:
        return [self.tree, self.text, self.built]


@pytest.fixture(scope="session")
def closure(nix: Nix, tmp_path_factory: pytest.TempPathFactory) -> Closure:
    """A small closure in the session's Nix chroot store."""
    from tests.support.trees import make_tree

    tree = nix.add(make_tree(tmp_path_factory.mktemp("closure") / "nb-tree", big_size=300_000))
    text = nix.add_text("nb-text", "refers to the tree", [tree])
    built = nix.build("nb-built", references=[tree, text])
    return Closure(tree, text, built)
