"""libsdxs (runtimes/native/sdxs.h), sdxs-run and the executorch-capi runtime: the C++ tokenizer against
the Python one, the C++ noise against torch.randn, images against the Python executorch runtime, every
bad bundle and prompt as an error code and one message (once under AddressSanitizer), and parity.

The library is built by runtimes/native/build_host.sh (`make host-runner`; rebuilt only when a source
changed); the ASan build lives in build/host/asan/.
"""

from __future__ import annotations

import ctypes
import json
import random
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import cached_bundle, need

import runtimes
from runtimes.base import to_uint8
from runtimes.capi_session import E_BUNDLE, E_PROMPT, E_UNSUPPORTED, CapiError, check, load_library
from runtimes.parity import FLOORS, run_parity
from runtimes.tokenizer import CLIPBPETokenizer
from sdxs_edge.bundle import BundleError
from sdxs_edge.metrics import snr_db

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "runtimes" / "native" / "build_host.sh"
HOST = ROOT / "build" / "host"
PROMPT = "a small red circle at the top on a white background"
ODD = [
    "",
    "   ",
    "Hello,   WORLD!!",
    "it's a dog's life, isn't it? we'll see; they'd've 'S 'LL ''s",
    "naïve café résumé e\u0301 a\u0301\u0327 e\u0308\u0301",
    "日本語のテキスト 漢字 हिन्दी 한국어 텍스트 ᄀ\u1161\u11a8",
    "emoji 🎉🚀 ok 👍🏽 👨‍👩‍👧",
    "numbers 12345 3.14 1e-5 ⅣⅫ ①② ٣٤",
    "tabs\tand\nnewlines\r\n \u00a0nbsp\u2003em\u2028\u2029\x1c\x85",
    '&amp; <b>html</b> a_b-c/d\\e ~!@#$%^&*()_+{}|:"<>?',
    "<|endoftext|> inside <|ENDOFTEXT|>x<|startoftext|> <|ſtartoftext|>",
    "İstanbul ß ẞ ǅ ǈ ﬁ ſt K",
    "ΟΔΟΣ Σ aΣ ΣΑΣ. ὈΔΥΣΣΕΎΣ ΑΣ\u0345 ΑΣ\u0345Α",
    "a" * 300,
    "word " * 90,
]


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    """libsdxs, built (or found up to date) by build_host.sh."""
    need("executorch")
    if shutil.which("g++") is None:
        pytest.skip("no C++ compiler (build_host.sh installs g++ with apt-get as root)")
    proc = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return load_library(HOST / "libsdxs.so")


@pytest.fixture(scope="module")
def et_fp32() -> Path:
    return cached_bundle("tiny", "executorch", "fp32")


def _random_texts(n: int, seed: int) -> list[str]:
    """Strings of random code points from blocks with case, marks, scripts and spaces."""
    rng = random.Random(seed)
    blocks = [
        (0x20, 0x7E),
        (0xA0, 0x24F),
        (0x300, 0x36F),
        (0x370, 0x3FF),
        (0x400, 0x4FF),
        (0x1100, 0x11FF),
        (0x1E00, 0x1FFF),
        (0x2000, 0x206F),
        (0x2150, 0x24FF),
        (0x3040, 0x30FF),
        (0xAC00, 0xAC40),
        (0xFB00, 0xFB4F),
        (0x1F300, 0x1F64F),
        (0x1D400, 0x1D7FF),
    ]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(1, 40)):
            a, b = rng.choice(blocks)
            chars.append(chr(rng.randint(a, b)))
        out.append("".join(chars))
    return out


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_ids_match_python(lib, tmp_path, pad):
    """The C++ tokenizer gives the Python tokenizer's ids on all 1,152 SHAPES-64 captions, odd strings
    (unicode, punctuation, case, specials, over-long) and 300 random strings."""
    from sdxs_edge.shapes import all_captions
    from sdxs_edge.tokenizer import write_clip_tokenizer

    write_clip_tokenizer(tmp_path, pad_token=pad)
    texts = all_captions() + ODD + _random_texts(300, seed=len(pad))
    assert len(all_captions()) == 1152
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = CLIPBPETokenizer.from_dir(tmp_path)(texts)
    tok = lib.sdxs_tokenizer_open(str(tmp_path).encode(), 77)
    assert tok, lib.sdxs_last_error()
    try:
        got = np.empty((len(texts), 77), np.int64)
        n = ctypes.c_int(0)
        for row, text in enumerate(texts):
            check(lib, lib.sdxs_tokenizer_ids(tok, text.encode("utf-8"), got[row].ctypes.data, ctypes.byref(n)))
    finally:
        lib.sdxs_tokenizer_close(tok)
    bad = [t for t, a, b in zip(texts, got, want) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} texts tokenize differently, e.g. {bad[:3]!r}"


def test_tokenizer_refuses_invalid_utf8_and_bad_folders(lib, tmp_path):
    from sdxs_edge.tokenizer import write_clip_tokenizer

    ids = np.empty(77, np.int64)
    missing = lib.sdxs_tokenizer_open(str(tmp_path / "none").encode(), 77)
    assert not missing and lib.sdxs_last_error_code() == E_BUNDLE and b"vocab.json is missing" in lib.sdxs_last_error()
    tok = lib.sdxs_tokenizer_open(str(write_clip_tokenizer(tmp_path)).encode(), 77)
    try:
        for bad in (b"\xff", b"ok \xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80"):
            assert lib.sdxs_tokenizer_ids(tok, bad, ids.ctypes.data, None) == E_PROMPT, bad
            assert b"not valid UTF-8" in lib.sdxs_last_error()
    finally:
        lib.sdxs_tokenizer_close(tok)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**32 + 7, 2**63 + 5])
def test_noise_is_torch_randn(lib, seed):
    """sdxs_noise equals torch.randn(n, generator=torch.Generator().manual_seed(seed)) bit for bit: the
    scalar path (n < 16), whole blocks of 16 and the recomputed tail (n % 16 != 0)."""
    torch = pytest.importorskip("torch")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("PyTorch transforms with libm here, not with its AVX2 Cephes code (sdxs_noise.h)")
    for n in (1, 2, 3, 15, 16, 17, 31, 100, 256, 4 * 64 * 64, 4 * 64 * 64 + 3):
        want = torch.randn(n, generator=torch.Generator().manual_seed(seed)).numpy()
        got = np.empty(n, np.float32)
        check(lib, lib.sdxs_noise(seed, n, got.ctypes.data))
        assert np.array_equal(got, want), f"seed {seed}, n {n}: {int((got != want).sum())} elements differ"


def test_sdxs_run_writes_the_python_runtimes_image(lib, et_fp32, tmp_path):
    """sdxs-run's PNG and the executorch-capi arrays equal the Python executorch runtime's image for the same
    bundle, prompt and seed (torch.randn's noise fed to it), to the precision's floor (on x86-64 they are
    bit-identical)."""
    import torch
    from PIL import Image

    precision = json.loads((et_fp32 / "manifest.json").read_text())["precision"]
    with runtimes.load(et_fp32, "executorch") as py, runtimes.load(et_fp32, "executorch-capi") as capi:
        for seed in (0, 3):
            noise = torch.randn(py.latent_shape, generator=torch.Generator().manual_seed(seed)).numpy()
            want = py.generate_arrays(PROMPT, noise=noise).image
            got = capi.generate_arrays(PROMPT, seed=seed).image
            out = tmp_path / f"s{seed}.png"
            proc = subprocess.run(
                [str(HOST / "sdxs-run"), str(et_fp32), PROMPT, "--seed", str(seed), "--out", str(out)],
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0 and proc.stderr == "", proc.stderr
            png = np.asarray(Image.open(out))
            assert snr_db(want, got) >= FLOORS[precision].component_snr_db
            assert np.array_equal(png, to_uint8(got)[0])
            assert np.abs(png.astype(int) - to_uint8(want)[0]).max() <= 1


def _bad_bundles(good: Path, root: Path) -> dict[str, tuple[Path, int, str]]:
    """name -> (bundle, expected sdxs.h code, message fragment)."""
    out = {}

    def variant(name: str, code: int, fragment: str, edit=None, manifest=None) -> None:
        b = Path(shutil.copytree(good, root / name))
        if manifest is not None:
            m = json.loads((b / "manifest.json").read_text())
            manifest(m)
            (b / "manifest.json").write_text(json.dumps(m))
        if edit is not None:
            edit(b)
        out[name] = (b, code, fragment)

    variant("no-manifest", E_BUNDLE, "no manifest.json", edit=lambda b: (b / "manifest.json").unlink())
    variant("not-json", E_BUNDLE, "invalid JSON", edit=lambda b: (b / "manifest.json").write_text("{nope"))
    variant("version-2", E_UNSUPPORTED, "format version 2", manifest=lambda m: m.update(format_version=2))
    variant("onnx-target", E_UNSUPPORTED, "onnx bundle", manifest=lambda m: m.update(target="onnx"))
    variant(
        "coreml-delegate",
        E_UNSUPPORTED,
        "coreml programs",
        manifest=lambda m: m.setdefault("conversion", {}).setdefault("config", {}).update(delegate="coreml"),
    )
    variant("missing-unet", E_BUNDLE, "unet file unet.pte is missing", edit=lambda b: (b / "unet.pte").unlink())
    variant("altered-unet", E_BUNDLE, "was altered", edit=lambda b: (b / "unet.pte").open("ab").write(b"x"))
    variant(
        "escaping-path",
        E_BUNDLE,
        "not a path inside the bundle",
        manifest=lambda m: m["components"]["unet"].update(file="../unet.pte"),
    )
    variant(
        "controlnet",
        E_UNSUPPORTED,
        "ControlNet",
        manifest=lambda m: m["components"].update(controlnet=dict(m["components"]["unet"])),
    )
    variant("no-vocab", E_BUNDLE, "vocab.json is missing", edit=lambda b: (b / "tokenizer" / "vocab.json").unlink())
    return out


def test_bad_bundles_are_one_error_each(lib, et_fp32, tmp_path):
    """Every bad bundle: NULL from sdxs_open with its code and message; sdxs-run exits 1 with one line."""
    for name, (bundle, code, fragment) in _bad_bundles(et_fp32, tmp_path).items():
        assert not lib.sdxs_open_flags(str(bundle).encode(), 0), name
        msg = lib.sdxs_last_error().decode()
        assert lib.sdxs_last_error_code() == code and fragment in msg, (name, lib.sdxs_last_error_code(), msg)
        proc = subprocess.run(
            [str(HOST / "sdxs-run"), str(bundle), PROMPT, "--out", str(tmp_path / "x.png")],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and fragment in proc.stderr, (name, proc.stderr)
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(BundleError, match="was altered"):
        runtimes.load(tmp_path / "altered-unet", "executorch-capi")


def test_sdxs_run_bad_prompt_size_and_output(lib, et_fp32, tmp_path):
    def run(*args):
        return subprocess.run(
            [str(HOST / "sdxs-run"), *(a if isinstance(a, bytes) else str(a) for a in args)], capture_output=True
        )

    out = tmp_path / "o.png"
    for args, fragment in [
        ((et_fp32, b"caf\xe9", "--out", out), b"not valid UTF-8"),
        ((et_fp32, PROMPT, "--width", 128, "--out", out), b"128x64 was asked"),
        ((et_fp32, PROMPT, "--out", tmp_path / "no" / "dir.png"), b"cannot write"),
    ]:
        proc = run(*args)
        assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1 and fragment in proc.stderr, proc.stderr
    for args in [(et_fp32,), (et_fp32, PROMPT, "--seed", "-1"), (et_fp32, PROMPT, "--bogus")]:
        proc = run(*args)
        assert proc.returncode == 2 and proc.stderr.startswith(b"sdxs-run: error:"), proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.tmp-*"))
    proc = run(et_fp32, "word " * 90, "--out", out)
    assert proc.returncode == 0 and b"truncated" in proc.stderr and out.is_file()
    with runtimes.load(et_fp32, "executorch-capi") as s, pytest.raises(CapiError, match="not valid UTF-8") as e:
        s.generate_arrays(b"\xff")
    assert e.value.code == E_PROMPT


def test_c_tests_under_address_sanitizer(lib, et_fp32, tmp_path):
    """runtimes/native/test_capi.c, built with -fsanitize=address (cached in build/host/asan/): every bad
    bundle, NULL arguments, invalid UTF-8, a wrong size, an over-long prompt and one generation."""
    proc = subprocess.run(["bash", str(BUILD), "--asan"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    bad = [str(b) for b, _, _ in _bad_bundles(et_fp32, tmp_path).values()] + [str(tmp_path / "absent")]
    env = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=23", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [str(HOST / "asan" / "test_capi"), str(et_fp32), *bad], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "0 failure(s)" in proc.stdout and "FAIL" not in proc.stdout and "AddressSanitizer" not in proc.stderr


def test_parity_executorch_capi(lib, et_fp32, tmp_path):
    """`parity` measures the C API like the other runtimes, and it reaches the fp32 floors."""
    report = run_parity(et_fp32, "executorch-capi", prompts=[PROMPT], seeds=[0], json_out=tmp_path / "p.json")
    assert report["runtime"] == "executorch-capi" and report["passed"], report["failures"]
    assert all(report["components"][c]["ok"] for c in ("text_encoder", "unet", "decoder")), report["components"]


def test_capi_tokenize_and_noise_feed_the_session(lib, et_fp32):
    import torch

    with runtimes.load(et_fp32, "executorch-capi", threads=1) as s:
        assert s.threads == 1
        with runtimes.load(et_fp32, "executorch") as py:
            assert np.array_equal(s.tokenize([PROMPT]), py.tokenize([PROMPT]))
        want = torch.randn(s.latent_shape, generator=torch.Generator().manual_seed(9)).numpy()
        assert np.array_equal(s.noise(9), want)
        r = s.generate_arrays(PROMPT, seed=9)
        assert np.array_equal(r.noise, want) and set(r.timings) >= {"text_encoder", "unet", "decoder"}


def test_docs_example_compiles_and_runs(lib, et_fp32, tmp_path):
    """The C example of docs/c-api.md, compiled against build/host/libsdxs.so, writes the library's image."""
    text = (ROOT / "docs" / "c-api.md").read_text()
    src = text.split("```c\n", 1)[1].split("```", 1)[0]
    (tmp_path / "gen.c").write_text(src)
    cc = shutil.which("gcc") or shutil.which("cc")
    build = subprocess.run(
        [
            cc,
            "-std=c11",
            "-Wall",
            "-Werror",
            str(tmp_path / "gen.c"),
            "-I",
            str(ROOT / "runtimes" / "native"),
            "-L",
            str(HOST),
            "-lsdxs",
            f"-Wl,-rpath,{HOST}",
            "-o",
            str(tmp_path / "gen"),
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    proc = subprocess.run(
        [str(tmp_path / "gen"), str(et_fp32), PROMPT, str(tmp_path / "x.ppm")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    ppm = (tmp_path / "x.ppm").read_bytes()
    header = b"P6\n64 64\n255\n"
    assert ppm.startswith(header)
    with runtimes.load(et_fp32, "executorch-capi") as s:
        want = to_uint8(s.generate_arrays(PROMPT, seed=0).image)[0]
    assert np.array_equal(np.frombuffer(ppm[len(header) :], np.uint8).reshape(64, 64, 3), want)
    bad = subprocess.run(
        [str(tmp_path / "gen"), str(tmp_path), PROMPT, str(tmp_path / "y.ppm")], capture_output=True, text=True
    )
    assert bad.returncode == 1 and "error 2:" in bad.stderr and "no manifest.json" in bad.stderr


def test_bench_worker_measures_executorch_capi(lib, et_fp32, tmp_path):
    """The benchmark's session worker runs the executorch-capi path: pinned threads read back, every
    component timed on every run."""
    from benchmarks.jobs import Job
    from benchmarks.worker import run_session

    job = Job(
        kind="session",
        model="tiny",
        resolution=64,
        threads=2,
        runs=2,
        warmup=1,
        result=str(tmp_path / "r.json"),
        runtime="executorch-capi",
        precision="fp32",
        bundle=str(et_fp32),
    )
    r = run_session(job)
    assert r["threads"] == {"threadpool_threads": 2}
    assert r["components"]["unet"]["runs"] == 2 and r["end_to_end"]["runs"] == 2 and r["end_to_end"]["median_s"] > 0


@pytest.mark.shipped
def test_sdxs_run_under_aarch64_emulation(lib, et_fp32, tmp_path):
    """The cross-built sdxs-run (make arm64-runner) under qemu-aarch64-static: XNNPACK's NEON kernels give
    the x86-64 image to the fp32 floor; a bad prompt is the same one-line error there."""
    from PIL import Image

    arm = ROOT / "build" / "arm64" / "sdxs-run"
    if shutil.which("qemu-aarch64-static") is None or not arm.is_file():
        pytest.skip("the aarch64 sdxs-run or qemu-aarch64-static is missing (make arm64-runner)")
    qemu = ["qemu-aarch64-static", "-cpu", "cortex-a76", "-L", "/usr/aarch64-linux-gnu", str(arm)]
    for exe, out in ((qemu, tmp_path / "arm.png"), ([str(HOST / "sdxs-run")], tmp_path / "x86.png")):
        proc = subprocess.run(
            [*exe, str(et_fp32), PROMPT, "--seed", "3", "--out", str(out)], capture_output=True, text=True, timeout=600
        )
        assert proc.returncode == 0, proc.stderr
    a, b = (np.asarray(Image.open(p)).astype(np.float64) for p in (tmp_path / "arm.png", tmp_path / "x86.png"))
    assert snr_db(b, a) >= FLOORS["fp32"].component_snr_db
    proc = subprocess.run(
        [*qemu, str(et_fp32), b"\xff\xfe", "--out", str(tmp_path / "bad.png")], capture_output=True, timeout=600
    )
    assert proc.returncode == 1 and proc.stderr.count(b"\n") == 1 and b"not valid UTF-8" in proc.stderr


@pytest.mark.slow
def test_unicode_tables_are_current():
    """unicode_tables.inc is what gen_unicode_tables.py writes from this Python and regex (about 30 s)."""
    proc = subprocess.run(
        [
            str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv").is_dir() else "python3",
            str(ROOT / "runtimes" / "native" / "gen_unicode_tables.py"),
            "--check",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
