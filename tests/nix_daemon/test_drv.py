"""Reading a derivation's outputs from its ATerm text."""

from __future__ import annotations

import pytest

from tvix.nix_daemon.drv import parse_drv_outputs

DRV = (
    'Derive([("dev","/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x-dev","",""),'
    '("out","/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x","","")],'
    '[],["/nix/store/cccccccccccccccccccccccccccccccc-src"],"x86_64-linux","/bin/sh",'
    '["-c","echo \\"hi\\"\\n"],[("out","/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x")])'
)


def test_outputs() -> None:
    assert parse_drv_outputs(DRV) == {
        "dev": "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x-dev",
        "out": "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-x",
    }


def test_floating_and_escaped() -> None:
    drv = 'Derive([("o\\"ut","","r:sha256","")],[],[],"s","b",[],[])'
    assert parse_drv_outputs(drv) == {'o"ut': ""}


@pytest.mark.parametrize("text", ["", "Derive(", 'Derive([("out","/x"', "not a drv"])
def test_malformed(text: str) -> None:
    with pytest.raises(ValueError, match=r"expected|unterminated"):
        parse_drv_outputs(text)
