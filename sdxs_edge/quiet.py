"""Library noise on the process's stderr, dropped line by line; everything else is passed on.

ExecuTorch's native code logs its CPU probing (`[cpuinfo_utils.cpp:87] Failed to open midr file ...`) on
file descriptor 2 each time a method is loaded, torchao prints the kernels it cannot load on CPU builds,
and torch warns about its own `register_constant` use when executorch imports torchao: none of it is
about the user's work, and a conversion's sensitivity pass repeats it dozens of times. `filtered_stderr`
sends fd 2 to a temporary file for the duration of a block and writes back only the lines that match
none of `NOISE`, so errors the libraries print still reach the user. Standard library only.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

NOISE = re.compile(
    r"\[cpuinfo_utils\.cpp:\d+\]"  # ExecuTorch's CPU probe at method load
    r"|^Failed to load .*torchao/_C"  # torchao's CUDA / mxfp8 kernels on a CPU build
    r"|_pytree\.py:\d+\].*register_constant"  # torch's deprecation of its own Enum registration
    r"|is an Enum subclass and is now natively supported"
)


def drop_noise(text: str) -> str:
    """`text` without the lines that match `NOISE`."""
    return "".join(line for line in text.splitlines(keepends=True) if not NOISE.search(line))


@contextmanager
def filtered_stderr() -> Iterator[None]:
    """Run the block with fd 2 captured; afterwards write its lines, less the noise, to stderr."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # stderr replaced by an object without a descriptor
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile(mode="w+b") as cap:
        os.dup2(cap.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            cap.seek(0)
            kept = drop_noise(cap.read().decode("utf-8", "replace"))
            if kept:
                sys.stderr.write(kept)
                sys.stderr.flush()
