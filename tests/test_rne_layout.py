"""`convert --layout react-native-executorch`: the hook's five sources, run as the hook runs them.

`hook_generate` re-implements react-native-executorch's text-to-image driver
(packages/react-native-executorch/common/rnexecutorch/models/text_to_image/TextToImage.cpp, Scheduler.cpp,
UNet.cpp, Decoder.cpp, Encoder.cpp and models/embeddings/text/TextEmbeddings.cpp) line by line in float32
numpy, transcribed from that source independently of `converters.rne_layout`: the tokenizer.json through
Hugging Face `tokenizers` (ids with the post-processor's special tokens, no padding, as the hook's
HFTokenizer gives them), each program's "forward" method through `executorch.runtime`, guidance 7.5 on the
(uncond, prompt) U-Net batch, the PNDM scheduler from scheduler_config.json, latents / 0.18215, the decoder's
HWC output cast to uint8. Its image must equal the `executorch` runtime's on the sdxs-edge files of the same
folder, for the same noise (the hook draws its noise with std::mt19937, which this does not reproduce).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from bundle_cache import cached_bundle, need

from converters.registry import UnsupportedConversion
from converters.request import ConversionRequest

F = np.float32
RNE = "react-native-executorch"
PROMPTS = ("a small red circle at the top on a white background", "a blue square")
LONG = " ".join(["a big green triangle beside a small yellow star"] * 12)  # > 77 tokens


class HookScheduler:
    """Scheduler.cpp (PNDM, PLMS steps, v-prediction), float32 as the C++ computes it."""

    def __init__(self, cfg: dict):
        t = int(cfg["num_train_timesteps"])
        start, end = np.sqrt(F(cfg["beta_start"])), np.sqrt(F(cfg["beta_end"]))
        step = (end - start) / F(t - 1)
        self.T, self.offset, run, acp = t, int(cfg["steps_offset"]), F(1), []
        for i in range(t):
            value = start + step * F(i)
            run = run * (F(1) - value * value)
            acp.append(run)
        self.acp = acp

    def set_timesteps(self, n: int) -> None:
        self.n, self.ets, self.first = n, [], None
        if n < 2:
            self.timesteps = [1]
            return
        ratio = F(self.T) / F(n)
        ts = [int(math.floor(float(F(i) * ratio) + 0.5)) + self.offset for i in range(n)]  # std::round
        ts.insert(len(ts) - 1, ts[n - 2])
        self.timesteps = ts[::-1]

    def _prev(self, sample, noise, t: int, tp: int):
        a = self.acp[t]
        ap = self.acp[tp] if tp >= 0 else self.acp[0]
        b, bp = F(1) - a, F(1) - ap
        nc = (ap - a) / (a * np.sqrt(bp) + np.sqrt(a * b * ap))
        return sample * np.sqrt(ap / a) - (noise * np.sqrt(a) + sample * np.sqrt(b)) * nc

    def step(self, sample, noise, t: int):
        ratio = F(self.T) / F(self.n)
        prev = int(F(t) - ratio)
        if not self.ets:
            self.ets, self.first = [noise], sample
            return self._prev(sample, noise, t, prev)
        if len(self.ets) == 1 and self.first is not None:
            out = self._prev(self.first, (noise + self.ets[0]) / F(2), int(F(t) + ratio), t)
            self.first = None
            return out
        self.ets.append(noise)
        e = self.ets
        if len(e) == 2:
            eo = (e[1] * F(3) - e[0]) / F(2)
        elif len(e) == 3:
            eo = ((e[2] * F(23) - e[1] * F(16)) + e[0] * F(5)) / F(12)
        else:
            self.ets = e = e[-4:]
            eo = (e[3] * F(55) - e[2] * F(59) + e[1] * F(37) - e[0] * F(9)) / F(24)
        return self._prev(sample, eo, t, prev)


class Hook:
    """The hook's driver over one folder (TextToImage::generate)."""

    def __init__(self, folder: Path):
        from executorch.runtime import Runtime
        from tokenizers import Tokenizer

        rt = Runtime.get()
        load = lambda f: rt.load_program(str(folder / f)).load_method("forward")
        self.encoder, self.unet, self.decoder = (load(f) for f in ("text_encoder.pte", "unet.pte", "decoder.pte"))
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.scheduler = HookScheduler(json.loads((folder / "scheduler_config.json").read_text()))

    def embed(self, text: str) -> np.ndarray:
        """TextEmbeddings::generate: ids int64 (1, n) and mask (ids != 0) -> the output, flattened."""
        import torch

        ids = np.asarray([self.tokenizer.encode(text).ids], np.int64)
        out = self.encoder.execute([torch.from_numpy(ids), torch.from_numpy((ids != 0).astype(np.int64))])[0]
        assert out.shape[-2] in (1, ids.shape[1])  # TextEmbeddings::buildResult's check
        return out.numpy().reshape(-1)

    def generate(self, prompt: str, latents: np.ndarray, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """(final latents / 0.18215, uint8 HWC image) for the initial `latents` (1, 4, h, w)."""
        import torch

        emb = np.concatenate([self.embed("<|startoftext|>"), self.embed(prompt)]).reshape(2, 77, 768)
        self.scheduler.set_timesteps(num_steps)
        x = latents.astype(F).reshape(-1)
        for t in range(num_steps + 1):
            ts = self.scheduler.timesteps[t]
            batch = np.concatenate([x, x]).reshape(2, *latents.shape[1:])
            args = [torch.from_numpy(batch), torch.tensor([ts], dtype=torch.int64), torch.from_numpy(emb)]
            out = self.unet.execute(args)[0].numpy().reshape(-1)
            half = out.size // 2
            noise = out[:half] * (F(1) - F(7.5)) + out[half:] * F(7.5)
            x = self.scheduler.step(x, noise, ts)
        x = (x / F(0.18215)).reshape(latents.shape)
        if not np.isfinite(x).all():
            return x, None
        pixels = self.decoder.execute([torch.from_numpy(x)])[0].numpy()
        side = latents.shape[-1] * 8
        return x, pixels.reshape(side, side, 3).astype(np.uint8)  # static_cast<uint8_t>


@pytest.fixture(scope="module")
def rne_bundle() -> Path:
    need("executorch")
    need("tokenizers")
    return cached_bundle("tiny", "executorch", "fp32", label="rne", layout=RNE)


def _same_image(bundle: Path, prompt: str, seed: int, num_steps: int = 2) -> tuple[int, np.ndarray]:
    import runtimes
    from runtimes.base import to_uint8

    with runtimes.load(bundle, "executorch") as s:
        noise = s.noise(seed)
        ours = to_uint8(s.generate_arrays(prompt, noise=noise).image)[0]
    _, hook = Hook(bundle / RNE).generate(prompt, noise, num_steps)
    return int(np.abs(hook.astype(int) - ours.astype(int)).max()), ours


@pytest.mark.heavy
def test_layout_files_and_manifest(rne_bundle):
    from sdxs_edge.bundle import load_manifest, sha256_path

    m = load_manifest(rne_bundle, verify=True)
    rec = m["conversion"]["react_native_executorch"]
    assert (m["conversion"]["layout"], rec["num_steps"], rec["image_size"]) == (RNE, 2, 64)
    assert len(rec["files"]) == 5
    for name, digest in rec["files"].items():
        assert sha256_path(rne_bundle / name) == digest, name
    sched = json.loads((rne_bundle / RNE / "scheduler_config.json").read_text())
    assert set(sched) == {"beta_start", "beta_end", "num_train_timesteps", "steps_offset"}  # TextToImageModule.ts


@pytest.mark.heavy
@pytest.mark.parametrize("prompt,seed", [(PROMPTS[0], 0), (PROMPTS[1], 7)])
def test_hook_draws_the_bundles_image(rne_bundle, prompt, seed):
    diff, ours = _same_image(rne_bundle, prompt, seed)
    assert diff <= 1 and ours.std() > 0


@pytest.mark.heavy
def test_text_encoder_pads_and_truncates_as_the_bundle_tokenizer(rne_bundle):
    import runtimes

    hook = Hook(rne_bundle / RNE)
    with runtimes.load(rne_bundle, "executorch") as s:
        for prompt in (*PROMPTS, LONG):
            ids = hook.tokenizer.encode(prompt).ids
            assert ids[1:-1] == s.tokenizer.encode(prompt), prompt  # same BPE ids as the bundle's tokenizer
            with pytest.warns(UserWarning) if prompt == LONG else _nothing():
                ctx = s.encode_text(s.tokenize([prompt]))[0]
            got = hook.embed(prompt).reshape(77, 768)
            np.testing.assert_allclose(got[:, : ctx.shape[-1]], ctx, atol=1e-5)
            assert not got[:, ctx.shape[-1] :].any()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.heavy
@pytest.mark.parametrize("num_steps", [3, 5])
def test_another_num_steps_fails_loudly(rne_bundle, num_steps):
    """The U-Net returns NaN at a timestep numSteps = 2 never feeds: no image, instead of a wrong one."""
    import runtimes

    with runtimes.load(rne_bundle, "executorch") as s:
        noise = s.noise(0)
    latents, image = Hook(rne_bundle / RNE).generate(PROMPTS[0], noise, num_steps)
    assert image is None and np.isnan(latents).all()


@pytest.mark.heavy
def test_run_and_parity_still_work(rne_bundle, tmp_path):
    from sdxs_edge.cli import main

    assert main(["parity", str(rne_bundle), "--runtime", "executorch", "--reference", "none"]) == 0
    out = tmp_path / "x.png"
    assert main(["run", str(rne_bundle), PROMPTS[0], "--runtime", "executorch", "--out", str(out)]) == 0
    assert out.stat().st_size > 0


@pytest.mark.slow
def test_shipped_model_hook_draws_its_image():
    """The embedded model converted with the layout (minutes: `make test-slow`)."""
    need("tokenizers")
    bundle = cached_bundle("default", "executorch", "fp32", label="rne", layout=RNE)
    for prompt, seed in ((PROMPTS[0], 0), (LONG, 3)):
        diff, ours = _same_image(bundle, prompt, seed)
        assert diff <= 1 and ours.std() > 0


@pytest.mark.parametrize(
    "target,kw,msg",
    [
        ("onnx", {}, "layout react-native-executorch is for target executorch bundles, not onnx"),
        ("coreml", {"precision": "fp16"}, "for target executorch bundles, not coreml"),
        ("executorch", {"precision": "int8"}, "fp32 XNNPACK bundles"),
        ("executorch", {"components": ["unet", "decoder"]}, "needs text_encoder, unet and decoder"),
    ],
)
def test_layout_refused_before_converting(tmp_path, target, kw, msg):
    precision = kw.pop("precision", "fp32")
    with pytest.raises(UnsupportedConversion, match=msg):
        ConversionRequest("tiny", target, precision, tmp_path / "b", layout=RNE, **kw)
    assert not (tmp_path / "b").exists()


def test_cli_refuses_the_layout_for_onnx_in_one_line(tmp_path, capsys):
    from sdxs_edge.cli import main

    code = main(
        ["convert", "tiny", "--target", "onnx", "--precision", "fp32", "--layout", RNE, "--out", str(tmp_path / "b")]
    )
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "not onnx" in err
    assert not (tmp_path / "b").exists()
