"""Test-session settings: the converters' on-disk cache lives under build/, not in the user's home.

A sensitivity-cache entry only ranks candidates, but a run that finds entries from another machine or
another day follows another path through the pass than a fresh clone does (CI); keeping the cache under
build/test-cache makes a fresh clone's run and a developer's first run the same. SDXS_EDGE_CACHE set by
hand still wins.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("SDXS_EDGE_CACHE", str(Path(__file__).resolve().parents[1] / "build" / "test-cache"))
