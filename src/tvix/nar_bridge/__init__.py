"""nar-bridge: the store as a Nix HTTP binary cache, for downloads and uploads.

:class:`NarBridge` serves narinfos rendered from PathInfos and NARs rendered
on the fly from castore (with byte ranges), and, when allowed, ingests what
``nix copy --to http://…`` uploads. See :mod:`tvix.nar_bridge.server` for
the routes and :mod:`tvix.nar_bridge.urls` for the NAR URL scheme.

Builds on :mod:`tvix.store`, :mod:`tvix.castore` and :mod:`tvix.nixcompat`.
"""

from tvix.nar_bridge.auth import BasicAuth, load_credentials
from tvix.nar_bridge.errors import HTTPError, status_for
from tvix.nar_bridge.nar_files import NarFiles
from tvix.nar_bridge.server import NarBridge, parse_range
from tvix.nar_bridge.upload import UploadIndex
from tvix.nar_bridge.urls import decode_castore_nar, encode_castore_nar

__all__ = [
    "BasicAuth",
    "HTTPError",
    "NarBridge",
    "NarFiles",
    "UploadIndex",
    "decode_castore_nar",
    "encode_castore_nar",
    "load_credentials",
    "parse_range",
    "status_for",
]
