"""Argument types shared by every `sdxs-edge` subcommand (argparse `type=` callables).

The CLI is the top floor: `sdxs_edge.cli` (the dispatcher) and the subcommand modules (`converters.cli`,
`runtimes.cli`, `benchmarks.cli`) import these; no library module does. Each type turns bad text into
an `argparse.ArgumentTypeError` naming the flag, which argparse prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings


def positive(kind: type, name: str):
    """A number of type `kind` (int or float) greater than 0."""

    def parse(v: str):
        try:
            x = kind(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a {kind.__name__}, got {v!r}") from None
        if x <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {v}")
        return x

    return parse


def at_least(name: str, minimum: int = 1):
    """An integer >= `minimum`."""

    def parse(v: str) -> int:
        try:
            x = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {v!r}") from None
        if x < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum}, got {v}")
        return x

    return parse


def unit_interval(name: str):
    """A number in (0, 1] (a share, an image-to-image strength)."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number in (0, 1], got {text!r}") from None
        if not 0 < x <= 1:
            raise argparse.ArgumentTypeError(f"{name} must be in (0, 1], got {x}")
        return x

    return parse


fraction = unit_interval("--max-float-fraction")
strength = unit_interval("--strength")


def finite(name: str):
    """A finite number (a LoRA or ControlNet strength)."""

    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text}")
        return x

    return parse


lora_scale = finite("--lora-scale")
control_scale = finite("--control-scale")


def warnings_as_lines(fn, *a):
    """Call fn(*a); print each warning it raised (a resize, a mode conversion) as one `warning: ...` line on
    stderr, without Python's source lines."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(*a)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    return out


def image_side(name: str):
    """--width / --height: a positive multiple of 8 pixels (the bundle checks its own sizes)."""

    def parse(text: str) -> int:
        x = at_least(name, 8)(text)
        if x % 8:
            raise argparse.ArgumentTypeError(f"{name} must be a multiple of 8, got {x}")
        return x

    return parse


def size_list(text: str) -> tuple[tuple[int, int], ...]:
    """--sizes: WIDTHxHEIGHT[,WIDTHxHEIGHT...], each a multiple of 8 (`sdxs_edge.sizes`)."""
    from sdxs_edge.sizes import SizeError, check_sizes, parse_sizes

    try:
        return check_sizes(parse_sizes(text))
    except SizeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def size(name: str):
    """--min-size / --max-size: one WIDTHxHEIGHT."""

    def parse(text: str) -> str:
        from sdxs_edge.sizes import SizeError, parse_size

        try:
            parse_size(text)
        except SizeError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    return parse
