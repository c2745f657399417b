"""Fuzzing, bounded in examples and time: every untrusted input sdxs-edge reads (bundle manifests, prompt
and calibration files, control images, LoRA safetensors headers, and in C++ the runner's SDXT tensor
files and --serve requests) ends in success or one one-line SDXSError: never a traceback, a hang or,
for the C++ side under AddressSanitizer + UndefinedBehaviorSanitizer, a memory error.

Example counts are fixed (`max_examples`); `deadline` bounds each example. The example database is off
so a run writes nothing outside its temporary folders, and the example sequence is derandomized (fixed) so
`make test` is repeatable; set SDXS_FUZZ_RANDOM=1 to explore new examples.
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import cached_bundle, need
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converters.calibration import read_prompts as read_calibration
from runtimes.parity import read_prompts as read_parity_prompts
from sdxs_edge.control import load_control_image
from sdxs_edge.errors import SDXSError
from sdxs_edge.evaluate import read_prompt_file
from sdxs_edge.lora import load_lora

ROOT = Path(__file__).resolve().parents[1]
FUZZ = dict(
    deadline=5000,
    database=None,
    derandomize=not os.environ.get("SDXS_FUZZ_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)


def one_line(e: BaseException) -> None:
    assert isinstance(e, SDXSError), f"{type(e).__name__}: {e}"
    assert str(e) and "\n" not in str(e) and len(str(e)) < 1000, str(e)


def outcome(fn, *args):
    """fn(*args), or the SDXSError it raised (checked to be one line); anything else fails the test."""
    try:
        return fn(*args)
    except SDXSError as e:
        one_line(e)
        return e


# ---- manifests ----------------------------------------------------------------------------------------
ODD_TEXT = st.sampled_from(
    [
        "",
        "..",
        "../x",
        "/",
        "/etc/passwd",
        "a\0b",
        "\u202e.onnx",
        "💥",
        "é" * 300,
        "C:\\x",
        "~",
        " ",
        "decoder.onnx/",
        "tokenizer/../tokenizer",
    ]
)
LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    ODD_TEXT,
)
JSON = st.recursive(
    LEAF,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12,
)


def _paths(obj, prefix=()):
    """Every key path into a JSON value."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@st.composite
def mutated_manifest(draw, base: dict):
    m = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(m) if p]
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(JSON)
        else:
            parent[path[-1]] = draw(JSON)
    return m


@pytest.fixture(scope="module")
def fuzz_bundle(tmp_path_factory) -> Path:
    need("onnxruntime")
    return Path(shutil.copytree(cached_bundle("tiny", "onnx", "fp32"), tmp_path_factory.mktemp("fuzz") / "b"))


def _manifest_cases(fuzz_bundle: Path):
    from sdxs_edge.bundle import load_manifest

    base = json.loads((fuzz_bundle / "manifest.json").read_text())

    def check(text: bytes) -> None:
        (fuzz_bundle / "manifest.json").write_bytes(text)
        got = outcome(load_manifest, fuzz_bundle, False)  # hashing is not what is fuzzed here
        if isinstance(got, dict):  # accepted: a runtime opens it, or refuses in one line
            import runtimes

            s = outcome(lambda b: runtimes.load(b, "onnxruntime", verify=False), fuzz_bundle)
            if not isinstance(s, SDXSError):
                s.close()

    return base, check


MANIFEST_EXAMPLES = 150
MANIFEST_BYTES_EXAMPLES = 100


def test_fuzz_manifests_structured(fuzz_bundle):
    base, check = _manifest_cases(fuzz_bundle)

    @settings(max_examples=MANIFEST_EXAMPLES, **FUZZ)
    @given(mutated_manifest(base))
    def run(m):
        check(json.dumps(m).encode())

    try:
        run()
    finally:
        (fuzz_bundle / "manifest.json").write_text(json.dumps(base))


def test_fuzz_manifests_bytes(fuzz_bundle):
    base, check = _manifest_cases(fuzz_bundle)
    raw = json.dumps(base).encode()

    @settings(max_examples=MANIFEST_BYTES_EXAMPLES, **FUZZ)
    @given(st.integers(0, len(raw)), st.binary(max_size=16), st.sampled_from(["cut", "insert", "deep"]))
    def run(at, junk, how):
        text = {"cut": raw[:at], "insert": raw[:at] + junk + raw[at:], "deep": b"[" * 100_000 + b"]" * 100_000}[how]
        check(text)

    try:
        run()
    finally:
        (fuzz_bundle / "manifest.json").write_text(json.dumps(base))


# ---- prompt and calibration files ----------------------------------------------------------------------
PROMPT_EXAMPLES = 200
TEXTISH = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.lists(
        st.sampled_from(
            ["a large cyan triangle at the bottom left on a black background", "", " ", "\r", "\x00", "💥", "a" * 500]
        ),
        max_size=6,
    ).map(lambda l: "\n".join(l).encode()),
)


@settings(max_examples=PROMPT_EXAMPLES, **FUZZ)
@given(TEXTISH)
def test_fuzz_prompt_and_calibration_files(data):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "prompts.txt"
        f.write_bytes(data)
        for reader in (read_prompt_file, read_parity_prompts, read_calibration):
            got = outcome(reader, f)
            if not isinstance(got, SDXSError):
                assert got and all(isinstance(p, str) and p.strip() for p in got)


# ---- control images ------------------------------------------------------------------------------------
IMAGE_EXAMPLES = 200


def _encode(fmt: str, side: int, seed: int) -> bytes:
    from PIL import Image

    a = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def _huge_png(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h (CRC correct) followed by almost no data."""
    import zlib

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["cut", "flip", "empty", "huge", "junk"]))
    if kind == "empty":
        return b""
    if kind == "junk":
        return draw(st.binary(max_size=200))
    if kind == "huge":
        return _huge_png(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    raw = _encode(
        draw(st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "WEBP"])),
        draw(st.sampled_from([1, 8, 64])),
        draw(st.integers(0, 9)),
    )
    if kind == "cut":
        return raw[: draw(st.integers(0, len(raw)))]
    at = draw(st.integers(0, len(raw) - 1))
    return raw[:at] + bytes([raw[at] ^ draw(st.integers(1, 255))]) + raw[at + 1 :]


@settings(max_examples=IMAGE_EXAMPLES, **FUZZ)
@given(image_bytes())
def test_fuzz_control_images(data):
    import warnings

    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mode and size conversions warn; that is not an outcome
        f = Path(d) / "control.img"
        f.write_bytes(data)
        got = outcome(load_control_image, f, 64)
        if not isinstance(got, SDXSError):
            assert got.shape == (1, 3, 64, 64) and got.dtype == np.float32


def test_a_huge_image_is_refused_from_its_header(tmp_path):
    from sdxs_edge.control import ControlImageError

    f = tmp_path / "huge.png"
    f.write_bytes(_huge_png(100_000, 100_000))  # 10^10 pixels, 150 bytes on disk
    with pytest.raises(ControlImageError, match="images above 67108864 pixels are refused"):
        load_control_image(f, 64)


# ---- a bundle's tokenizer files --------------------------------------------------------------------------
TOKENIZER_EXAMPLES = 150


@st.composite
def tokenizer_files(draw):
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}
    files = {
        "vocab.json": draw(
            st.one_of(
                st.just(json.dumps(vocab).encode()),
                JSON.map(lambda v: json.dumps(v).encode()),
                st.binary(max_size=40),
                st.just(b"[" * 50_000),
            )
        ),
        "merges.txt": draw(
            st.one_of(
                st.just(b"#version: 0.2\na </w>\n"),
                st.binary(max_size=40),
                st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
            )
        ),
    }
    if draw(st.booleans()):
        files["special_tokens_map.json"] = draw(
            st.one_of(
                JSON.map(lambda v: json.dumps(v).encode()),
                st.just(b'{"pad_token": {"content": 5}}'),
                st.binary(max_size=20),
            )
        )
    return files


@settings(max_examples=TOKENIZER_EXAMPLES, **FUZZ)
@given(tokenizer_files())
def test_fuzz_tokenizer_files(files):
    from runtimes.tokenizer import CLIPBPETokenizer

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            (Path(d) / name).write_bytes(data)
        tok = outcome(CLIPBPETokenizer.from_dir, Path(d))
        if not isinstance(tok, SDXSError):
            assert outcome(tok, ["a a"]) is not None


# ---- LoRA safetensors headers ---------------------------------------------------------------------------
LORA_EXAMPLES = 200
DTYPES = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "XX", ""])


@st.composite
def lora_file(draw):
    name = draw(st.sampled_from(["down_blocks.0.attentions.0.proj_in", "x", "", "a" * 300]))
    entries = {}
    offset = 0
    for role in draw(
        st.lists(
            st.sampled_from(["lora_A.weight", "lora_B.weight", "alpha", "lora_down.weight"]), max_size=3, unique=True
        )
    ):
        shape = draw(st.lists(st.integers(0, 2**40) if draw(st.booleans()) else st.integers(0, 8), max_size=4))
        size = draw(st.integers(0, 64))
        entries[f"{name}.{role}"] = {"dtype": draw(DTYPES), "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = draw(st.one_of(st.just(entries), JSON))
    text = json.dumps(header).encode() if draw(st.booleans()) else draw(st.binary(max_size=64))
    declared = draw(st.one_of(st.just(len(text)), st.integers(0, 2**64 - 1)))
    body = draw(st.one_of(st.just(b"\0" * offset), st.binary(max_size=80)))
    return struct.pack("<Q", declared) + text + body


@settings(max_examples=LORA_EXAMPLES, **FUZZ)
@given(lora_file())
def test_fuzz_lora_headers(data):
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "lora.safetensors"
        f.write_bytes(data)
        got = outcome(load_lora, f)
        if not isinstance(got, SDXSError):
            assert isinstance(got, dict)


# ---- the native runner: SDXT reader and --serve requests, under ASan + UBSan ------------------------------
SDXT_EXAMPLES = 300
SERVE_EXAMPLES = 200
SANITIZER_MARKS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "UndefinedBehaviorSanitizer")


@pytest.fixture(scope="module")
def harness() -> Path:
    if shutil.which("g++") is None and shutil.which("clang++") is None:
        pytest.skip("no C++ compiler (g++ or clang++) to build the sanitised harness")
    r = subprocess.run(
        [str(ROOT / "runtimes" / "native" / "build_fuzz.sh")], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def _sanitised(cmd: list[str], stdin: bytes = b"") -> list[str]:
    r = subprocess.run(
        cmd,
        input=stdin,
        capture_output=True,
        timeout=60,
        env={"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0", "UBSAN_OPTIONS": "print_stacktrace=1"},
    )
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 0 and not any(m in err for m in SANITIZER_MARKS), err[-4000:]
    return r.stdout.decode(errors="replace").splitlines()


def _sdxt(dtype: int, dims: list[int], data: bytes, ndim: int | None = None, magic: bytes = b"SDXT") -> bytes:
    n = len(dims) if ndim is None else ndim
    return magic + struct.pack("<II", dtype, n) + b"".join(struct.pack("<q", d) for d in dims) + data


@st.composite
def sdxt_bytes(draw):
    kind = draw(st.sampled_from(["valid", "header", "cut", "junk"]))
    if kind == "junk":
        return draw(st.binary(max_size=64))
    dtype = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 11])) if kind != "header" else draw(st.integers(0, 2**32 - 1))
    dims = draw(st.lists(st.integers(0, 6), max_size=4))
    esize = {0: 1, 1: 1, 11: 1, 2: 2, 5: 2, 3: 4, 6: 4, 4: 8, 7: 8}.get(dtype, 1)
    data = b"\x01" * (int(np.prod(dims)) * esize)
    if kind == "valid":
        return _sdxt(dtype, dims, data)
    if kind == "header":  # lies in the header: huge or negative dims, ndim beyond the dims present
        dims = draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=17))
        return _sdxt(
            dtype,
            dims,
            draw(st.binary(max_size=32)),
            ndim=draw(st.one_of(st.just(len(dims)), st.integers(0, 2**32 - 1))),
        )
    raw = _sdxt(dtype, dims, data)
    return raw[: draw(st.integers(0, max(0, len(raw) - 1)))]


def test_fuzz_native_sdxt_reader(harness, tmp_path):
    seen = {"ok": 0, "error": 0}

    @settings(max_examples=SDXT_EXAMPLES, **FUZZ)
    @given(st.lists(sdxt_bytes(), min_size=1, max_size=8))
    def run(files):
        paths = []
        for i, data in enumerate(files):
            p = tmp_path / f"t{i}.bin"
            p.write_bytes(data)
            paths.append(str(p))
        lines = _sanitised([str(harness), "read", *paths, str(tmp_path), str(tmp_path / "missing.bin")])
        assert len(lines) == len(paths) + 2 and all(l.startswith(("ok ", "error ")) for l in lines), lines
        assert lines[-2].startswith("error ") and lines[-1].startswith("error ")  # a folder, a missing file
        for l in lines[:-2]:
            seen[l.split()[0]] += 1

    run()
    assert seen["ok"] and seen["error"]  # both outcomes were exercised


def test_fuzz_native_serve_requests(harness, tmp_path):
    good = tmp_path / "io"
    good.mkdir()
    (good / "in0.bin").write_bytes(_sdxt(6, [1, 2], b"\0" * 8))

    request = st.one_of(
        st.binary(max_size=120).map(lambda b: b.replace(b"\n", b" ")),
        st.builds(
            lambda verb, name, d: f"{verb} {name} {d}".encode("utf-8", "surrogatepass"),
            st.sampled_from(["run", "RUN", "", "quit2"]),
            st.sampled_from(["unet", "decoder", "", "x" * 300, "ü"]),
            st.sampled_from([str(good), str(tmp_path), "/nonexistent", "", str(good) + " ", "a" * 9000]),
        ),
    )

    @settings(max_examples=SERVE_EXAMPLES, **FUZZ)
    @given(st.lists(request, min_size=1, max_size=10))
    def run(lines):
        stdin = (
            b"\n".join(lines) + b"\nrun unet " + str(good).encode() + b"\nquit\nrun unet " + str(good).encode() + b"\n"
        )
        out = _sanitised([str(harness), "serve", "unet", "decoder"], stdin)
        assert out and out[-1] == "request 0 ok 6 [1,2] 8", out  # still serving after the noise; nothing after quit
        assert all(l.startswith(("request ", "error ")) for l in out), out

    run()
