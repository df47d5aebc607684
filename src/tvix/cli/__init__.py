"""The command-line programs: ``tvix-store`` and ``nar-bridge``, thin shells over the library.

grpc's C core logs on its own (binding failures, connection resets) before our
logging is set up, and reads its verbosity when first imported: unless asked
for with ``-vvv`` (or ``GRPC_VERBOSITY`` set), it stays quiet, and what
matters reaches the user through our one-line errors.
"""

from __future__ import annotations

import os as _os
import sys as _sys

if not any(a.startswith("-vvv") for a in _sys.argv[1:]):
    _os.environ.setdefault("GRPC_VERBOSITY", "NONE")
