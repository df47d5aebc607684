"""tvix-store in Python: a content-addressed store for Nix."""

__version__ = "0.1.0"
