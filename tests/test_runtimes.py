"""Runtimes: the pure-Python tokenizer, the shared Session contract, parity per runtime x precision on the
tiny preset, and every bad input as one clear SDXSError."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import cached_bundle, need

import runtimes
from runtimes.base import BackendMissingError, RuntimeInputError, Session, UnsupportedTargetError
from runtimes.parity import FLOORS, check_floors, run_parity
from runtimes.tokenizer import CLIPBPETokenizer
from sdxs_edge.bundle import BundleError, load_manifest, sha256_path
from sdxs_edge.errors import ParityError, SDXSError
from sdxs_edge.metrics import snr_db

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a small red circle at the top on a white background"


# ---- bundles ---------------------------------------------------------------------------------------


# Converted test bundles are cached between runs (tests/bundle_cache.py). These tests check the runtimes;
# the bundle is their input (the converters' own tests check conversion).


@pytest.fixture(scope="module")
def make_bundle():
    """(target, precision) -> a tiny-preset bundle from `converters.convert` (cached, see bundle_cache).

    Skips only when the backend package is absent or the converters have no backend for the target;
    a conversion that fails is a test error.
    """
    built: dict[tuple[str, str], Path] = {}

    def get(target: str, precision: str) -> Path:
        if (target, precision) not in built:  # one key per run, even if sources change meanwhile
            built[(target, precision)] = cached_bundle("tiny", target, precision)
        return built[(target, precision)]

    return get


@pytest.fixture()
def onnx_bundle(make_bundle, tmp_path) -> Path:
    """A private copy of the onnx fp32 bundle, safe to damage."""
    return Path(shutil.copytree(make_bundle("onnx", "fp32"), tmp_path / "b"))


# ---- tokenizer -------------------------------------------------------------------------------------
ODD = [
    "",
    "   ",
    "Hello,   WORLD!!",
    "it's a dog's life, isn't it? we'll see; they'd've",
    "naïve café résumé e\u0301",
    "日本語のテキスト 漢字 हिन्दी",
    "emoji 🎉🚀 ok",
    "numbers 12345 3.14 1e-5",
    "tabs\tand\nnewlines\r\n \u00a0nbsp\u2003em",
    "&amp; <b>html</b> a_b-c/d\\e",
    "<|endoftext|> inside <|ENDOFTEXT|>x<|startoftext|>",
    "''s !'s 'S 'LL",
    "İstanbul ß ǅ ﬁ ①②",
    "a " * 100,
]


@pytest.mark.parametrize("pad", ["<|endoftext|>", "!"])
def test_tokenizer_matches_transformers(tmp_path, pad):
    """Identical ids to transformers' CLIPTokenizer on all 1152 SHAPES-64 captions and odd strings."""
    from sdxs_edge.shapes import all_captions
    from sdxs_edge.tokenizer import load_clip_tokenizer, write_clip_tokenizer

    write_clip_tokenizer(tmp_path, pad_token=pad)
    texts = all_captions() + ODD
    assert len(all_captions()) == 1152
    want = load_clip_tokenizer(tmp_path)(
        texts, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    ).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = CLIPBPETokenizer.from_dir(tmp_path)(texts)
    bad = [t for t, a, b in zip(texts, got, want) if not np.array_equal(a, b)]
    assert not bad, f"{len(bad)} texts tokenize differently, e.g. {bad[:3]}"


def test_tokenizer_truncates_with_warning_and_pads(tmp_path):
    from sdxs_edge.tokenizer import write_clip_tokenizer

    tok = CLIPBPETokenizer.from_dir(write_clip_tokenizer(tmp_path, pad_token="!"))
    with pytest.warns(UserWarning, match="truncated"):
        ids = tok(["word " * 90])
    assert ids.shape == (1, 77) and ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id
    short = tok(["hi"])[0]
    assert list(short[:3]) == [tok.bos_id, tok.encoder["hi</w>"], tok.eos_id] and (short[3:] == tok.encoder["!"]).all()


def test_tokenizer_missing_files_is_clear(tmp_path):
    with pytest.raises(SDXSError, match="merges.txt is missing"):
        (tmp_path / "vocab.json").write_text("{}")
        CLIPBPETokenizer.from_dir(tmp_path)


# ---- the contract ------------------------------------------------------------------------------------
def test_onnx_path_runs_without_torch(make_bundle):
    """Deploying an onnx bundle needs numpy, Pillow, regex and onnxruntime only: PyTorch is never imported."""
    need("onnxruntime")
    bundle = make_bundle("onnx", "fp32")
    code = (
        "import sys, runtimes\n"
        f"s = runtimes.load({str(bundle)!r}, 'onnxruntime')\n"
        f"img = s.generate({PROMPT!r}, seed=1)\n"
        "assert img.size == (64, 64), img.size\n"
        "bad = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_generate_is_deterministic_per_seed(make_bundle):
    need("onnxruntime")
    with runtimes.load(make_bundle("onnx", "fp32"), "onnxruntime") as s:
        a, b, c = (s.generate_arrays(PROMPT, seed=k) for k in (3, 3, 4))
        assert np.array_equal(a.image, b.image) and not np.array_equal(a.image, c.image)
        assert set(a.timings) == {"tokenize", "text_encoder", "unet", "decoder"}
        explicit = s.generate_arrays(PROMPT, noise=s.noise(3))
        assert np.array_equal(explicit.image, a.image)
        assert a.image.shape == (1, 3, 64, 64) and a.latent.shape == (1, 4, 8, 8)


def test_subclass_gets_contract_for_free_with_fp16_io(onnx_bundle):
    """A Session subclass implements only `_run`; fp16-I/O manifests get fp16 inputs from `generate`."""
    m = json.loads((onnx_bundle / "manifest.json").read_text())
    for comp in m["components"].values():
        for t in comp["inputs"] + comp["outputs"]:
            t["dtype"] = "float16" if t["dtype"] == "float32" else t["dtype"]
    (onnx_bundle / "manifest.json").write_text(json.dumps(m))
    seen: dict[str, dict] = {}

    class Echo(Session):
        name = "echo"

        def _run(self, component, inputs):
            seen[component] = {k: v.dtype.name for k, v in inputs.items()}
            out = self.specs[component].outputs[0]
            return {out.name: np.full(out.shape, 0.5, out.dtype)}

    s = Echo(onnx_bundle)
    image = s.generate(PROMPT, seed=0)
    assert image.size == (64, 64)
    assert seen == {
        "text_encoder": {"input_ids": "int32"},
        "unet": {"latent": "float16", "context": "float16"},
        "decoder": {"latent": "float16"},
    }
    with pytest.raises(RuntimeInputError, match="latent: dtype float32 does not match the manifest \\(latent float16"):
        s.decode(np.zeros((1, 4, 8, 8), np.float32))

    class Broken(Echo):
        def _run(self, component, inputs):
            return {
                self.specs[component].outputs[0].name: np.full(
                    self.specs[component].outputs[0].shape, np.nan, np.float16
                )
            }

    with pytest.raises(SDXSError, match="text_encoder produced non-finite values"):
        Broken(onnx_bundle).generate(PROMPT)


def test_torch_reference_matches_pipeline(make_bundle):
    """The torch runtime is SDXSPipeline itself: same noise and prompt give the same image."""
    import torch

    from sdxs_edge.pipeline import SDXSPipeline

    pipe = SDXSPipeline.load("tiny")
    with runtimes.load(make_bundle("onnx", "fp32"), "torch", reference=pipe) as s:
        res = s.generate_arrays(PROMPT, seed=5)
    want = pipe.generate(PROMPT, noise=torch.from_numpy(res.noise), output="tensor").images.numpy()
    np.testing.assert_allclose(res.image, want, atol=1e-5)  # same ops; only float summation order may differ


# ---- parity per runtime x precision ---------------------------------------------------------------------
def _parity(bundle: Path, runtime: str, tmp_path: Path, **options) -> dict:
    out = tmp_path / "parity.json"
    rep = run_parity(bundle, runtime, seeds=(0, 1), runtime_options=options, json_out=out)
    assert json.loads(out.read_text())["passed"] is True
    floor = FLOORS[rep["precision"]].component_snr_db
    for c, r in rep["components"].items():
        snr = float(r["snr_db"])
        assert snr >= floor, f"{c}: {snr:.1f} dB < {floor} dB"
    assert rep["samples"] == 8
    assert rep["all_correct"]["status"].startswith(("n/a", "measured"))
    return rep


def test_parity_torch_vs_torch_is_exact(make_bundle, tmp_path):
    rep = _parity(make_bundle("onnx", "fp32"), "torch", tmp_path)
    assert all(r["snr_db"] == "inf" for r in rep["components"].values())


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_parity_onnxruntime(make_bundle, tmp_path, precision):
    need("onnxruntime")
    _parity(make_bundle("onnx", precision), "onnxruntime", tmp_path)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("int8", marks=pytest.mark.heavy)])
def test_parity_executorch(make_bundle, tmp_path, precision):
    need("executorch")
    _parity(make_bundle("executorch", precision), "executorch", tmp_path)


def _host_runner() -> None:
    """Build the host runner (idempotent, seconds when up to date); skip where there is no compiler."""
    if shutil.which("g++") is None:
        pytest.skip("the host runner needs g++")
    subprocess.run([str(ROOT / "runtimes" / "native" / "build_host.sh")], check=True, capture_output=True)


@pytest.mark.parametrize("precision", ["fp32", pytest.param("int8", marks=pytest.mark.heavy)])
def test_parity_executorch_native(make_bundle, tmp_path, precision):
    """The same .pte programs in one `sdxs_runner --serve` process: the floors against PyTorch, and the
    ExecuTorch Python runtime's outputs to float rounding (same kernels, same threads)."""
    need("executorch")
    _host_runner()
    bundle = make_bundle("executorch", precision)
    _parity(bundle, "executorch-native", tmp_path)
    with runtimes.load(bundle, "executorch-native", threads=2) as nat, runtimes.load(bundle, "executorch") as py:
        assert (
            nat.threads == 2
            and nat.workspace_sharing == "global"
            and set(nat.load_ms) == {"text_encoder", "unet", "decoder"}
        )
        sizes = {c: (bundle / e["file"]).stat().st_size for c, e in load_manifest(bundle)["components"].items()}
        assert nat.load_order == sorted(sizes, key=sizes.get, reverse=True)
        a, b = (
            nat.generate_arrays("a small red circle at the top on a white background", seed=3),
            py.generate_arrays("a small red circle at the top on a white background", seed=3),
        )
        assert snr_db(b.image, a.image) > 60.0
        assert all(t["run_ms"][0] > 0 for t in nat.runner_timings.values())
        assert 1 < nat.peak_rss_mb() < 400  # the runner: ExecuTorch's libraries and the programs, no PyTorch


def test_executorch_native_errors_are_one_line(make_bundle, tmp_path):
    need("executorch")
    _host_runner()
    from runtimes.native_io import RunnerError

    with pytest.raises(BackendMissingError, match="make host-runner"):
        runtimes.load(make_bundle("executorch", "fp32"), "executorch-native", runner=tmp_path / "nope")
    bundle = Path(shutil.copytree(make_bundle("executorch", "fp32"), tmp_path / "b"))
    (bundle / "decoder.pte").write_bytes(b"\0" * 64)  # damaged: the runner fails to load it, and exits
    with pytest.raises(RunnerError) as e:
        runtimes.load(bundle, "executorch-native", verify=False)
    assert "\n" not in str(e.value) and "decoder.pte" in str(e.value), e.value
    with runtimes.load(make_bundle("executorch", "fp32"), "executorch-native") as s:
        io = tmp_path / "io"
        io.mkdir()
        s._proc.stdin.write(f"run unet {io}\n".encode())  # a request the runner refuses: it keeps serving
        s._proc.stdin.flush()
        with pytest.raises(RunnerError, match="in0.bin: cannot open"):
            s._reply("SDXS_TIMING ", "unet")
        assert s.decode(np.zeros(s.latent_shape, np.float32)).shape[-1] == 64
    with pytest.raises(RunnerError, match="closed"):
        s.decode(np.zeros(s.latent_shape, np.float32))


@pytest.mark.skipif(
    sys.platform != "darwin",
    reason="Core ML prediction needs macOS (Apple's Core ML framework); this is " + sys.platform,
)
@pytest.mark.parametrize("units", ["CPU_ONLY", "ALL"])
def test_parity_coreml(make_bundle, tmp_path, units):
    need("coremltools")
    _parity(make_bundle("coreml", "fp16"), "coreml", tmp_path, compute_units=units)


def test_parity_below_floor_raises_and_still_writes_json(make_bundle, tmp_path):
    """A reference with other weights (seed 1) is far below every floor: ParityError, report written first."""
    from sdxs_edge.pipeline import SDXSPipeline

    out = tmp_path / "p.json"
    with pytest.raises(ParityError, match="below its parity floors: text_encoder SNR"):
        run_parity(
            make_bundle("onnx", "fp32"), "onnxruntime", reference=SDXSPipeline.load("tiny", seed=1), json_out=out
        )
    rep = json.loads(out.read_text())
    assert rep["passed"] is False and len(rep["failures"]) == 3
    check_floors({**rep, "failures": []})  # the same report with no failures passes


# ---- bad input ----------------------------------------------------------------------------------------
def test_missing_and_altered_files(onnx_bundle):
    need("onnxruntime")
    with (onnx_bundle / "unet.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"unet file unet.onnx was altered \(sha256 mismatch\)"):
        runtimes.load(onnx_bundle, "onnxruntime")
    (onnx_bundle / "unet.onnx").unlink()
    with pytest.raises(BundleError, match="unet file unet.onnx is missing"):
        runtimes.load(onnx_bundle, "onnxruntime")


def test_external_data_is_verified(onnx_bundle):
    """Weights beside a program (ONNX external data) are hashed like the program itself."""
    data = onnx_bundle / "decoder.onnx.data"
    data.write_bytes(b"weights")
    m = json.loads((onnx_bundle / "manifest.json").read_text())
    m["components"]["decoder"]["external_data"] = [{"file": data.name, "sha256": sha256_path(data)}]
    (onnx_bundle / "manifest.json").write_text(json.dumps(m))
    runtimes.load(onnx_bundle, "onnxruntime").close()
    data.write_bytes(b"weightz")
    with pytest.raises(
        BundleError, match=r"decoder external data file decoder.onnx.data was altered \(sha256 mismatch\)"
    ):
        runtimes.load(onnx_bundle, "onnxruntime")
    data.unlink()
    with pytest.raises(BundleError, match="decoder external data file decoder.onnx.data is missing"):
        runtimes.load(onnx_bundle, "onnxruntime", verify=False)


def test_unknown_format_version(onnx_bundle):
    m = json.loads((onnx_bundle / "manifest.json").read_text())
    m["format_version"] = 99
    (onnx_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format version 99 is not supported"):
        runtimes.load(onnx_bundle, "onnxruntime")


def test_runtime_cannot_run_target(make_bundle):
    with pytest.raises(
        UnsupportedTargetError, match="runtime 'executorch' cannot run .* \\(target onnx\\).* use --runtime onnxruntime"
    ):
        runtimes.load(make_bundle("onnx", "fp32"), "executorch")
    with pytest.raises(UnsupportedTargetError, match="runtime 'coreml' cannot run"):
        runtimes.load(make_bundle("onnx", "fp32"), "coreml")


def test_unknown_runtime_and_option(make_bundle):
    with pytest.raises(
        runtimes.UnknownRuntimeError,
        match="valid runtimes: torch, onnxruntime, executorch, executorch-native, executorch-capi, coreml, android, arm64-emulated",
    ):
        runtimes.load(make_bundle("onnx", "fp32"), "tensorrt")
    with pytest.raises(
        SDXSError, match="does not take option\\(s\\) compute_units \\(it takes: providers, threads, verify\\)"
    ):
        runtimes.load(make_bundle("onnx", "fp32"), "onnxruntime", compute_units="ALL")


def test_unavailable_execution_provider(make_bundle):
    need("onnxruntime")
    with pytest.raises(
        BackendMissingError, match="NnapiExecutionProvider not available .*available: .*CPUExecutionProvider"
    ):
        runtimes.load(make_bundle("onnx", "fp32"), "onnxruntime", providers=["nnapi"])


def test_inputs_checked_against_manifest(make_bundle):
    need("onnxruntime")
    with runtimes.load(make_bundle("onnx", "fp32"), "onnxruntime") as s:
        ids = s.tokenize([PROMPT])
        with pytest.raises(
            RuntimeInputError,
            match=r"text_encoder.input_ids: dtype int64 does not match the manifest \(input_ids int32\[1, 77\]\)",
        ):
            s.encode_text(ids.astype(np.int64))
        with pytest.raises(RuntimeInputError, match=r"text_encoder.input_ids: shape \[1, 76\] does not match"):
            s.encode_text(ids[:, :76])
        ctx = s.encode_text(ids)
        with pytest.raises(RuntimeInputError, match=r"unet.latent: shape \[1, 4, 16, 16\]"):
            s.denoise(np.zeros((1, 4, 16, 16), np.float32), ctx)
        with pytest.raises(RuntimeInputError, match=r"unet.context: dtype float64"):
            s.denoise(np.zeros((1, 4, 8, 8), np.float32), ctx.astype(np.float64))
        with pytest.raises(
            RuntimeInputError, match=r"decoder: inputs \['x'\] do not match the manifest's \['latent'\]"
        ):
            s.run("decoder", {"x": np.zeros((1, 4, 8, 8), np.float32)})
        with pytest.raises(RuntimeInputError, match=r"noise: expected float \[1, 4, 8, 8\]"):
            s.generate(PROMPT, noise=np.zeros((1, 4, 4, 4), np.float32))
        with pytest.raises(RuntimeInputError, match="lowered for batch 1; got 2 prompt"):
            s.generate([PROMPT, PROMPT])


def test_program_that_disagrees_with_manifest(onnx_bundle):
    """The .onnx file is checked against the manifest too (a manifest edited by hand, here)."""
    need("onnxruntime")
    m = json.loads((onnx_bundle / "manifest.json").read_text())
    m["components"]["decoder"]["inputs"][0]["name"] = "z"
    (onnx_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        BundleError, match="decoder.onnx: program inputs .*'latent'.* do not match the manifest's .*'z'"
    ):
        runtimes.load(onnx_bundle, "onnxruntime")


@pytest.mark.skipif(sys.platform == "darwin", reason="checks the non-macOS message; on macOS Core ML runs")
def test_coreml_off_macos_is_one_clear_line(onnx_bundle):
    """A coreml bundle on Linux: one line saying Core ML needs macOS (files are checked first)."""
    m = json.loads((onnx_bundle / "manifest.json").read_text())
    m["target"] = "coreml"
    (onnx_bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BackendMissingError, match="the coreml runtime needs macOS") as e:
        runtimes.load(onnx_bundle, "coreml", compute_units="CPU_AND_NE")
    assert "\n" not in str(e.value)
    with pytest.raises(SDXSError, match="unknown Core ML compute units 'GPU'"):
        runtimes.load(onnx_bundle, "coreml", compute_units="GPU")


def test_registered_device_runtimes_are_sessions():
    """android and arm64-emulated (another module's) resolve to Session subclasses by their lazy paths."""
    for name in ("android", "arm64-emulated"):
        module = runtimes.RUNTIMES[name].split(":")[0]
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not in this checkout yet")
        assert issubclass(runtimes.session_class(name), Session)


# ---- CLI ------------------------------------------------------------------------------------------------
def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sdxs_edge.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_cli_run_and_parity(make_bundle, tmp_path):
    need("onnxruntime")
    bundle = str(make_bundle("onnx", "fp32"))
    r = _cli("run", bundle, PROMPT, "--runtime", "onnxruntime", "--out", str(tmp_path / "a.png"), "--seed", "2")
    assert r.returncode == 0, r.stderr
    assert "unet" in r.stdout and "decoder" in r.stdout and (tmp_path / "a.png").is_file()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n\na large blue cross at the top left on a black background\n")
    r = _cli(
        "parity", bundle, "--runtime", "onnxruntime", "--prompts", str(prompts), "--json", str(tmp_path / "p.json")
    )
    assert r.returncode == 0, r.stderr
    assert "text_encoder" in r.stdout and "PASSED" in r.stdout and "all-correct" in r.stdout
    assert json.loads((tmp_path / "p.json").read_text())["samples"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", "{b}", "x", "--runtime", "tensorrt"],
            "unknown runtime 'tensorrt'; valid runtimes: torch, onnxruntime",
        ),
        (["run", "{b}", "x", "--runtime", "executorch"], "cannot run"),
        (["run", "{b}", "x", "--runtime", "onnxruntime", "--out", "a.gif"], "--out must end in .png"),
        (
            ["parity", "{b}", "--runtime", "onnxruntime", "--prompts", "/nonexistent.txt"],
            "prompt file /nonexistent.txt does not exist",
        ),
        (["run", "/nonexistent", "x", "--runtime", "onnxruntime"], "is not a bundle (no manifest.json)"),
    ],
)
def test_cli_bad_input_is_one_line(make_bundle, args, message):
    b = str(make_bundle("onnx", "fp32"))
    r = _cli(*[a.format(b=b) for a in args])
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], r.stderr


def test_all_correct_drop_is_judged_only_from_enough_prompts(monkeypatch):
    """One image moves the rate of 4 prompts by 25 points: shown, not judged; from 64 prompts on, judged."""
    import numpy as np

    from runtimes import parity
    from sdxs_edge import shapes

    class Fake:  # classifies the reference right, and the runtime's first image wrong
        def classify(self, images):
            labels = {a: np.array(v) for a, v in self.labels.items()}
            if images is self.rt:
                labels["color"] = labels["color"].copy()
                labels["color"][0] = (labels["color"][0] + 1) % len(shapes.COLORS)
            return labels

    fake = Fake()
    monkeypatch.setattr(parity, "_load_evaluator", lambda: (fake, None))
    for n, judged in ((4, False), (64, True)):
        prompts = [s.caption for s in shapes.eval_scenes(n, 0)]
        fake.labels = parity._shapes_labels(prompts)
        ref, fake.rt = np.zeros((n, 64, 64, 3), np.uint8), np.zeros((n, 64, 64, 3), np.uint8)
        ac = parity._all_correct(prompts, ref, fake.rt, (64, 64), parity.FLOORS["int8"])
        assert ac["enforced"] is judged and ac["points"] == pytest.approx(100 / n)
        assert ac["ok"] is (None if not judged else True)
