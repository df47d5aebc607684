"""Fixtures for the stores tests: the real Nix."""

from __future__ import annotations

from support.nix import nix  # noqa: F401
