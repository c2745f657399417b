"""Trust boundaries: a bundle names only its own files (every runtime checks it the same way), the torch
reference runs only source weights it has checked and downloads nothing unless asked, and every writer
goes through the one atomic-write helper."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_cache import cached_bundle, need

from sdxs_edge.atomic import WriteError, atomic_dir, atomic_file, remove_stale, write_atomic
from sdxs_edge.bundle import BundleError, load_manifest
from sdxs_edge.errors import SDXSError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def bundle(tmp_path) -> Path:
    """A private copy of the tiny preset's ONNX fp32 bundle, safe to damage."""
    need("onnxruntime")
    return Path(shutil.copytree(cached_bundle("tiny", "onnx", "fp32"), tmp_path / "b"))


def _edit(bundle: Path, change) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    change(m)
    (bundle / "manifest.json").write_text(json.dumps(m))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- containment ---------------------------------------------------------------------------------
def test_a_component_outside_the_bundle_is_refused_even_with_its_sha256(bundle):
    shutil.move(bundle / "decoder.onnx", bundle.parent / "decoder.onnx")
    _edit(bundle, lambda m: m["components"]["decoder"].update(file="../decoder.onnx"))
    with pytest.raises(BundleError, match=r"decoder.file: '../decoder.onnx' must be a relative path inside the bundle"):
        load_manifest(bundle)


@pytest.mark.parametrize(
    "where,value",
    [
        ("file", "/etc/passwd"),
        ("file", "/"),  # would hash the whole file system
        ("file", "./decoder.onnx"),
        ("file", "sub/../decoder.onnx"),
        ("file", "C:/decoder.onnx"),
        ("file", "a\\b.onnx"),
        ("file", ""),
        ("file", "decoder.onnx\0"),
        ("tokenizer", "../tok"),
        ("tokenizer", "/tmp"),
    ],
)
def test_every_path_a_manifest_names_must_be_relative_and_normalised(bundle, where, value):
    if where == "tokenizer":
        _edit(bundle, lambda m: m["tokenizer"].update(dir=value))
    else:
        _edit(bundle, lambda m: m["components"]["decoder"].update(file=value))
    with pytest.raises(BundleError, match="must be a relative path inside the bundle"):
        load_manifest(bundle, verify=False)


def test_a_symlink_leading_out_is_refused_wherever_it_sits(bundle, tmp_path):
    outside = tmp_path / "outside.onnx"
    shutil.move(bundle / "decoder.onnx", outside)
    (bundle / "decoder.onnx").symlink_to(outside)  # same bytes, same sha256: only the place is wrong
    with pytest.raises(BundleError, match="decoder.onnx leads outside the bundle"):
        load_manifest(bundle)
    (bundle / "decoder.onnx").unlink()
    shutil.move(outside, bundle / "decoder.onnx")
    vocab = bundle / "tokenizer" / "vocab.json"  # a file the tokenizer reads, inside a named folder
    shutil.move(vocab, tmp_path / "vocab.json")
    vocab.symlink_to(tmp_path / "vocab.json")
    with pytest.raises(BundleError, match="tokenizer/vocab.json leads outside the bundle"):
        load_manifest(bundle, verify=False)
    (bundle / "tokenizer").rename(bundle / "tok-real")  # a symlinked folder pointing out
    shutil.move(bundle / "tok-real", tmp_path / "tok")
    (bundle / "tokenizer").symlink_to(tmp_path / "tok")
    with pytest.raises(BundleError, match="leads outside the bundle"):
        load_manifest(bundle, verify=False)


def test_a_symlink_that_stays_inside_is_accepted(bundle):
    (bundle / "programs").mkdir()
    shutil.move(bundle / "decoder.onnx", bundle / "programs" / "decoder.onnx")
    (bundle / "decoder.onnx").symlink_to("programs/decoder.onnx")
    assert load_manifest(bundle)["components"]["decoder"]["file"] == "decoder.onnx"


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m["components"]["decoder"].update(sha256="../../x"), "is not a sha256"),
        (lambda m: m["components"]["decoder"].update(sha256="A" * 64), "is not a sha256"),
        (lambda m: m["source"].update(sha256="0" * 63), "source.sha256"),
        (lambda m: m["components"]["unet"]["inputs"][0].update(name="latent; rm -rf /"), "is not a tensor name"),
        (lambda m: m["components"]["unet"]["inputs"][1].update(name="latent"), "appears twice"),
        (lambda m: m["components"]["unet"]["inputs"][0].update(shape=[10**30, 4]), "out of bounds"),
        (lambda m: m["components"]["unet"]["inputs"][0].update(shape=[65536, 65536, 65536]), "out of bounds"),
        (lambda m: m["components"]["unet"]["inputs"][0].update(shape=[]), "out of bounds"),
        (
            lambda m: m["components"]["decoder"].update(external_data=[{"file": "../w.bin", "sha256": "0" * 64}]),
            "external_data",
        ),
        (lambda m: m.update(resolution=10**9), "resolution"),
        (lambda m: m["sampler"].update(sigma=float("nan")), "not a finite number"),
        (
            lambda m: m["sampler"].update({"": 1}),
            r"\$.sampler: unknown key ''",
        ),  # found by test_fuzz_manifests_structured
        (lambda m: m["tokenizer"].update(max_length=10**12), "max_length"),
        (lambda m: m["conversion"]["config"].update(lora_sha256="x"), "lora_sha256"),
    ],
)
def test_sha256s_names_and_shapes_are_checked_before_any_backend(bundle, change, message):
    _edit(bundle, change)
    with pytest.raises(BundleError, match=message):
        load_manifest(bundle, verify=False)


def test_every_runtime_goes_through_the_containment_check(bundle):
    """Each registered runtime (incl. the native driver, arm64 emulation and the Android push) refuses
    the bundle from the manifest alone, before it looks for its backend."""
    import runtimes

    shutil.move(bundle / "decoder.onnx", bundle.parent / "decoder.onnx")
    _edit(bundle, lambda m: m["components"]["decoder"].update(file="../decoder.onnx"))
    for name in runtimes.RUNTIMES:
        with pytest.raises(BundleError, match="must be a relative path inside the bundle"):
            runtimes.load(bundle, name, verify=False)


def test_the_cli_refuses_an_escaping_bundle_in_one_line(bundle):
    _edit(bundle, lambda m: m["components"]["decoder"].update(file="/etc/hostname"))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdxs_edge.cli",
            "run",
            str(bundle),
            "a red circle",
            "--runtime",
            "onnxruntime",
            "--out",
            str(bundle.parent / "x.png"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "inside the bundle" in r.stderr, r.stderr
    assert not (bundle.parent / "x.png").exists()


# ---- the torch reference ---------------------------------------------------------------------------
def test_torch_reference_checks_the_source_weights(bundle, tmp_path):
    from runtimes.torch_session import TorchSession
    from sdxs_edge.pipeline import SDXSPipeline

    with TorchSession(bundle, verify=False) as s:  # the tiny preset, seed 0: the recorded weights
        assert s.pipeline.name == "tiny"
    folder = SDXSPipeline.load("tiny", seed=1).save_pretrained(tmp_path / "other")
    _edit(bundle, lambda m: m["source"].update(model=str(folder)))
    with pytest.raises(
        BundleError, match=rf"{folder}/{{text_encoder,unet,vae}}/\*.safetensors\) differ .*source.sha256 mismatch"
    ):
        TorchSession(bundle, verify=False)


def test_nothing_is_downloaded_unless_asked(bundle, monkeypatch):
    import huggingface_hub

    from runtimes.torch_session import TorchSession
    from sdxs_edge import cli

    calls = []

    def fake_snapshot(repo_id, **kw):
        calls.append(kw["local_files_only"])
        raise OSError("offline (test)")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    _edit(bundle, lambda m: m["source"].update(model="someone/not-cached"))
    with pytest.raises(SDXSError, match="not in the local cache.*pass --allow-download"):
        TorchSession(bundle, verify=False)
    assert calls == [True]
    assert cli.main(["generate", "x", "--model", "someone/not-cached"]) == 2
    assert calls == [True, True]
    assert cli.main(["--allow-download", "run", str(bundle), "x", "--runtime", "torch"]) == 2  # asked: it tries
    assert calls[2] is False


# ---- the atomic-write helper -------------------------------------------------------------------------
def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_file_replaces_the_old_only_when_complete(tmp_path):
    f = write_atomic(tmp_path / "r.json", "old")
    seen = []
    with pytest.raises(RuntimeError):
        with atomic_file(f) as tmp:
            seen.append(tmp)
            tmp.write_text("half")
            raise RuntimeError("writer died")
    assert f.read_text() == "old" and _siblings(tmp_path) == ["r.json"]
    with atomic_file(f) as tmp2:
        tmp2.write_bytes(b"new")
    assert f.read_text() == "new" and tmp2 != seen[0] and str(os.getpid()) in tmp2.name
    assert _siblings(tmp_path) == ["r.json"]


def test_atomic_dir_never_deletes_first_and_restores_on_a_failed_rename(tmp_path, monkeypatch):
    final = tmp_path / "model"
    with atomic_dir(final) as tmp:
        (tmp / "w").write_text("v1")
    with pytest.raises(SDXSError, match="exists; pass --overwrite"):
        with atomic_dir(final):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "w").write_text("v2")
            raise RuntimeError("conversion failed")
    assert (final / "w").read_text() == "v1" and _siblings(tmp_path) == ["model"]
    real = os.replace

    def failing(src, dst):
        if ".partial-" in str(src):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(WriteError, match="the disk is full; the previous version, if any, is unchanged"):
        with atomic_dir(final, overwrite=True) as tmp:
            (tmp / "w").write_text("v3")
    assert (final / "w").read_text() == "v1" and _siblings(tmp_path) == ["model"]


def test_atomic_dir_locks_its_destination(tmp_path):
    final = tmp_path / "bundle"
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("first")
        with pytest.raises(WriteError, match="being written by another process"):
            with atomic_dir(final, overwrite=True):
                pass
    assert (final / "a").read_text() == "first" and _siblings(tmp_path) == ["bundle"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    live = str(os.getppid())
    for name in (
        f".bundle.partial-{dead}-0",
        f".bundle.work-{dead}-1",
        f".bundle.old-{dead}-2",
        f".bundle.partial-{live}-0",
    ):
        (tmp_path / name).mkdir()
    (tmp_path / f".bundle.tmp-{dead}-3").write_text("x")
    (tmp_path / ".other.partial-1-0").mkdir()  # another destination's: not ours to judge
    with atomic_dir(tmp_path / "bundle") as tmp:
        (tmp / "m").write_text("ok")
    assert _siblings(tmp_path) == [f".bundle.partial-{live}-0", ".other.partial-1-0", "bundle"]
    assert remove_stale(tmp_path / "bundle") == []


def test_no_hand_written_rename_writer_is_left():
    """Every writer goes through sdxs_edge.atomic: no other module calls os.replace / Path.rename."""
    hits = []
    for d in ("sdxs_edge", "runtimes", "training", "converters", "benchmarks"):
        for f in (ROOT / d).rglob("*.py"):
            if f.name == "atomic.py":
                continue
            text = f.read_text()
            hits += [
                f"{f.relative_to(ROOT)}" for needle in ("os.replace(", ".rename(", "tmp.replace(") if needle in text
            ]
    assert hits == []
