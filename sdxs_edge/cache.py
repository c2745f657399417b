"""Where sdxs-edge keeps what it can rebuild: converted bundles of the local app, the int8 sensitivity
pass's figures. Standard library only."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SDXS_EDGE_CACHE"


def cache_root() -> Path:
    """$SDXS_EDGE_CACHE, else $XDG_CACHE_HOME/sdxs-edge, else ~/.cache/sdxs-edge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sdxs-edge"
