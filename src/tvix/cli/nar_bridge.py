"""``nar-bridge``: the store as a Nix HTTP binary cache (not built yet)."""

from __future__ import annotations

import argparse
import sys

from tvix import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nar-bridge",
        description="Serve a tvix store as a Nix HTTP binary cache. NOT BUILT YET: this "
        "command only exists so the name is reserved; see the README's feature table.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.parse_args(argv)
    print("nar-bridge: not built yet (see the README's feature table)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
