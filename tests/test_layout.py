"""The codebase's shape: short functions in the upper layers, and no layer importing the CLI."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 80


def long_functions(folders=("converters", "training", "benchmarks"), limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function (methods and nested ones included) longer than `limit` lines, decorators excluded."""
    found = []
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_upper_layers_is_over_80_lines():
    assert long_functions() == []


def test_the_length_check_sees_a_long_function(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert long_functions(("pkg",)) == ["pkg/m.py:5 long (81 lines)"]


CLI_MODULES = (
    "sdxs_edge.cli",
    "sdxs_edge.cli_args",
    "converters.cli",
    "runtimes.cli",
    "benchmarks.cli",
    "training.cli",
)


def test_layers_import_no_cli_module():
    """`import converters, runtimes, training` (and the core and benchmark modules a library user reaches)
    loads no CLI module and no argparse: the CLI is the top floor, nothing below imports it."""
    code = (
        "import sys, converters, runtimes, training, benchmarks.bench, sdxs_edge.lora, sdxs_edge.controlnet\n"
        f"print(sorted(m for m in sys.modules if m in {CLI_MODULES!r} or m == 'argparse'))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_no_core_module_imports_an_upper_layer():
    """sdxs_edge/ is the floor: only its CLI dispatcher imports converters, runtimes, training or benchmarks."""
    upper = ("converters", "runtimes", "training", "benchmarks")
    offenders = []
    for path in sorted((ROOT / "sdxs_edge").rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in upper]
    assert offenders == []


def test_one_table_of_parity_floors():
    """The converters' check and `sdxs-edge parity` read the same floors (`sdxs_edge.floors`)."""
    from converters.registry import PRECISION_SPECS
    from runtimes import parity
    from sdxs_edge.floors import FLOORS

    assert parity.FLOORS is FLOORS
    for (_, precision), spec in PRECISION_SPECS.items():
        floors = FLOORS[precision]
        assert spec.tolerance.snr_db == floors.component_snr_db
        assert spec.tolerance.image_psnr_db == (floors.image_psnr_db if floors.image_at_conversion else None)


def test_one_image_writer(tmp_path):
    from PIL import Image

    from sdxs_edge.errors import SDXSError
    from sdxs_edge.images import save_image

    img = Image.new("RGB", (8, 8), (255, 0, 0))
    for name, fmt in (("a.png", "PNG"), ("sub/b.jpg", "JPEG"), ("c.webp", "WEBP")):
        out = save_image(img, tmp_path / name)
        assert Image.open(out).format == fmt
    with pytest.raises(SDXSError, match=r"\.png, \.jpg or \.webp"):
        save_image(img, tmp_path / "d.gif")
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["a.png", "b.jpg", "c.webp"]


def test_generated_figures_match_their_result_files():
    """README.md and docs/ quote benchmark figures through generated blocks (`benchmarks.doc_tables`)."""
    from benchmarks import doc_tables

    assert doc_tables.stale() == []
    readme = (ROOT / "README.md").read_text()
    assert "<!-- generated:headline -->" in readme
    figure = re.search(r"\*\*[0-9.]+ s per image\*\*", readme).group(0)
    changed = readme.replace(figure, "**0.3 s per image**")
    assert changed != readme and doc_tables.render(changed) != changed  # a hand-edited figure is caught


def test_readme_is_a_front_door_and_links_stay_in_the_repository():
    import re

    assert len((ROOT / "README.md").read_bytes()) < 12_000
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        for target in re.findall(r"\]\(([^)]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = (doc.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT) and path.exists(), f"{doc.name} links to {target}"
