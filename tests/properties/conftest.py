"""Hypothesis profiles: a bounded run in the suite, a long one for ``./dev fuzz``.

``HYPOTHESIS_PROFILE=fuzz`` (what ``./dev fuzz`` sets) runs many more
examples; ``FUZZ_EXAMPLES`` overrides the count.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "suite", max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "20000")),
    deadline=5000,
    suppress_health_check=list(HealthCheck),
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "suite"))
