"""The react-native-executorch layout: programs that make that library's text-to-image hook draw the bundle's
one-step image.

What the hook does (software-mansion/react-native-executorch, packages/react-native-executorch/):
  src/modules/computer_vision/TextToImageModule.ts  loads five sources: tokenizerSource (tokenizer.json),
      schedulerSource (a JSON read for beta_start, beta_end, num_train_timesteps, steps_offset),
      encoderSource, unetSource, decoderSource (.pte, each run by its "forward" method:
      common/rnexecutorch/models/BaseModel.cpp, `module_->forward`); generate(input, imageSize, numSteps, seed).
  common/rnexecutorch/models/embeddings/text/TextEmbeddings.cpp  the text encoder gets (input_ids int64
      (1, n), attention_mask int64 (1, n)), n = the tokenizer's ids with its post-processor's special tokens
      (pytorch/tokenizers HFTokenizer: no padding, no truncation); an output whose second-to-last dim is
      neither 1 nor n is refused.
  common/rnexecutorch/models/text_to_image/Encoder.cpp  encodes the prompt and "<|startoftext|>" and
      concatenates (uncond, prompt); TextToImage.cpp views the result as float (2, 77, 768).
  TextToImage.cpp  latents (1, 4, s/8, s/8) from std::mt19937 + std::normal_distribution; for t in
      timesteps (numSteps + 1 calls): noise = U-Net(...); noise = uncond * (1 - 7.5) + text * 7.5;
      latents = scheduler.step(latents, noise, t); then latents /= 0.18215; image = decoder(latents), read
      as HWC float RGB already in [0, 255] and cast with static_cast<uint8_t>.
  UNet.cpp  U-Net inputs (latents (2, 4, h, w) = the latents twice, timestep int64 (1,), embeddings).
  Scheduler.cpp  diffusers' PNDM in PLMS mode for v-prediction: scaled_linear betas in float32;
      numSteps < 2 gives timesteps {1} and the loop then reads timesteps[1] (numSteps = 1 is broken);
      numSteps = N >= 2: round(i * T / N) + steps_offset, the second-to-last repeated, reversed; step k
      updates with prev(s, e, t, tp) = s * sqrt(a_tp / a_t) - (e sqrt(a_t) + s sqrt(1 - a_t)) * c(t, tp),
      a_tp = alphas_cumprod[0] for tp < 0.

The adapters, for numSteps = 2 (T = 1000, steps_offset o: timesteps 500 + o, o, o):
  text_encoder.pte  pads the ids to 77 with the pad token (the 77th set to the end token when the prompt is
      longer, as the sdxs-edge tokenizer truncates), runs the bundle's text encoder and returns (1, 1, 77 *
      768): the hidden states zero-padded to width 768 and flattened, so two of them fill (2, 77, 768).
  unet.pte  reads the prompt row (row 1) of latents and embeddings (width sliced back to D), runs the
      one-step rule (`sdxs_edge.sampler`: x_in = x_T * input_scale, x0 = rule(U-Net(x_in), x_T)) and returns
      v in both rows (classifier-free guidance then gives v back). With v1 = v2 = 0 the three PNDM updates
      are linear in (x_T, v0): x_final = A x_T + B v0 (`hook_schedule`), so at t = 500 + o it returns
      v0 = (0.18215 x0 - A x_T) / B, at t = o zero, and NaN at any other timestep (another numSteps fails
      loudly instead of drawing a wrong image).
  decoder.pte  latents / 0.18215 = x0 -> the bundle's decoder -> clip(image / 2 + 0.5, 0, 1) * 255 rounded,
      HWC (1, s, s, 3): integer values, so the hook's cast gives `runtimes.base.to_uint8`'s pixels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sdxs_edge.errors import SDXSError

RNE_DIR = "react-native-executorch"
NUM_STEPS = 2  # the numSteps an app passes to generate()
GUIDANCE = 7.5  # TextToImage.h guidanceScale
LATENTS_SCALE = 0.18215  # TextToImage.h latentsScale
TOKENS, WIDTH = 77, 768  # TextToImage.cpp embeddingsShape (2, 77, 768)
MAX_PROMPT_TOKENS = 1024  # the text encoder program's largest n
FILES = {
    "tokenizer": "tokenizer.json",
    "scheduler": "scheduler_config.json",
    "encoder": "text_encoder.pte",
    "unet": "unet.pte",
    "decoder": "decoder.pte",
}


@dataclass(frozen=True)
class HookSchedule:
    """The hook's timesteps for `NUM_STEPS` and x_final = noise_coef * x_T + v_coef * v0 (v1 = v2 = 0)."""

    first: int
    later: int
    noise_coef: float
    v_coef: float


def hook_alphas_cumprod(beta_start: float, beta_end: float, num_train_timesteps: int) -> np.ndarray:
    """alphasCumprod as Scheduler.cpp's constructor computes it, in float32."""
    f = np.float32
    start, end = np.sqrt(f(beta_start)), np.sqrt(f(beta_end))
    step = (end - start) / f(num_train_timesteps - 1)
    out, running = np.empty(num_train_timesteps, np.float32), f(1.0)
    for i in range(num_train_timesteps):
        value = start + step * f(i)
        running = running * (f(1.0) - value * value)
        out[i] = running
    return out


def _update(acp: np.ndarray, t: int, tp: int) -> tuple[float, float]:
    """(K, L) of Scheduler.cpp's getPrevSample: prev = K * sample - L * noise."""
    a = acp[t]
    ap = acp[tp] if tp >= 0 else acp[0]
    f = np.float32
    c = (ap - a) / (a * np.sqrt(f(1) - ap) + np.sqrt(a * (f(1) - a) * ap))
    return float(np.sqrt(ap / a)) - float(c) * float(np.sqrt(f(1) - a)), float(c) * float(np.sqrt(a))


def hook_schedule(config: dict) -> HookSchedule:
    """The coefficients of the hook's three PNDM updates at numSteps = 2 (Scheduler.cpp setTimesteps/step)."""
    acp = hook_alphas_cumprod(config["beta_start"], config["beta_end"], int(config["num_train_timesteps"]))
    offset = int(config["steps_offset"])
    ratio = np.float32(len(acp)) / np.float32(NUM_STEPS)
    first, later = int(np.round(ratio)) + offset, offset
    k0, l0 = _update(acp, first, int(np.float32(first) - ratio))  # steps 0 and 1: (500 + o) -> o
    kb, lb = _update(acp, later, int(np.float32(later) - ratio))  # step 2: o -> alphas_cumprod[0]
    return HookSchedule(first, later, kb * k0, (lb - kb * l0) / 2)


def scheduler_json(scheduler_config: dict) -> dict:
    """scheduler_config.json: the four keys TextToImageModule.ts reads (the model's own values)."""
    return {
        "beta_start": float(scheduler_config.get("beta_start", 0.00085)),
        "beta_end": float(scheduler_config.get("beta_end", 0.012)),
        "num_train_timesteps": int(scheduler_config.get("num_train_timesteps", 1000)),
        "steps_offset": int(scheduler_config.get("steps_offset", 1)),
    }


def tokenizer_json(tokenizer_dir: Path) -> str:
    """The bundle's CLIP BPE tokenizer as a Hugging Face tokenizer.json, without padding or truncation
    (the hook's HFTokenizer applies neither; the text encoder program pads)."""
    from transformers import CLIPTokenizerFast

    backend = CLIPTokenizerFast.from_pretrained(str(tokenizer_dir)).backend_tokenizer
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str(pretty=True)


def _torch_modules():
    import torch

    class HookTextEncoder(torch.nn.Module):
        """(input_ids int64 (1, n), attention_mask int64 (1, n)) -> float (1, 1, 77 * 768)."""

        def __init__(self, text_encoder, pad_id: int, eos_id: int, width: int):
            super().__init__()
            self.text_encoder, self.pad_id, self.eos_id, self.width = text_encoder, pad_id, eos_id, width

        def forward(self, input_ids, attention_mask):
            pad = torch.full((1, TOKENS), self.pad_id, dtype=input_ids.dtype)
            ids = torch.cat([input_ids, pad], 1)[:, :TOKENS]
            n = torch.ones_like(attention_mask).sum()
            last = torch.where(n > TOKENS, torch.full_like(ids[:, -1:], self.eos_id), ids[:, -1:])
            hidden = self.text_encoder(torch.cat([ids[:, :-1], last], 1))
            hidden = torch.nn.functional.pad(hidden, (0, WIDTH - self.width))
            return hidden.reshape(1, 1, TOKENS * WIDTH)

    class HookUNet(torch.nn.Module):
        """(latents (2, 4, h, w), timestep int64 (1,), embeddings (2, 77, 768)) -> v (2, 4, h, w)."""

        def __init__(self, unet, constants, width: int, schedule: HookSchedule):
            super().__init__()
            self.unet, self.c, self.width, self.s = unet, constants, width, schedule

        def forward(self, latents, timestep, embeddings):
            from sdxs_edge import sampler

            x = latents[1:2]
            x0 = sampler.denoised(
                self.unet(sampler.initial_latent(x, self.c), embeddings[1:2, :, : self.width]), x, self.c
            )
            v = (x0 * LATENTS_SCALE - x * self.s.noise_coef) * (1.0 / self.s.v_coef)
            t = timestep.to(torch.float32)
            zero, nan = torch.zeros_like(v), torch.full_like(v, float("nan"))
            v = torch.where(t == float(self.s.first), v, torch.where(t == float(self.s.later), zero, nan))
            return torch.cat([v, v])

    class HookDecoder(torch.nn.Module):
        """latents (1, 4, h, w) = x0 -> pixels float (1, s, s, 3), integers in [0, 255]."""

        def __init__(self, decoder):
            super().__init__()
            self.decoder = decoder

        def forward(self, latents):
            image = torch.clamp(self.decoder(latents) / 2.0 + 0.5, 0.0, 1.0)
            return (image.permute(0, 2, 3, 1) * 255.0).round()

    return HookTextEncoder, HookUNet, HookDecoder


def _lower(module, example: tuple, dynamic_shapes=None) -> bytes:
    """torch.export -> XNNPACK-delegated ExecuTorch program bytes (the executorch target's lowering path)."""
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from converters.xnnpack_layout import free_channels_last_reshapes

    try:
        with torch.no_grad():
            ep = torch.export.export(module.eval(), example, dynamic_shapes=dynamic_shapes, strict=False)
        with free_channels_last_reshapes():
            edge = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()])
        return edge.to_executorch().buffer
    except Exception as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise SDXSError(
            f"lowering the react-native-executorch {type(module).__name__} failed: {type(e).__name__}: {first}"
        ) from e


def hook_programs(pipe, manifest: dict, tokenizer) -> dict[str, bytes]:
    """The three .pte programs of the layout from the loaded pipeline (fp32, XNNPACK)."""
    import torch

    from converters.xnnpack_rewrites import rewrite_for_xnnpack
    from sdxs_edge import sampler
    from sdxs_edge.components import wrappers

    mods = wrappers(pipe)
    c = sampler.OneStepConstants(**manifest["sampler"])
    latent = manifest["components"]["unet"]["inputs"][0]["shape"][1:]
    width = manifest["components"]["text_encoder"]["outputs"][0]["shape"][-1]
    ids = torch.full((1, TOKENS), tokenizer.pad_id, dtype=torch.int64)
    ctx = torch.zeros(1, TOKENS, width)
    x = torch.randn(1, *latent)
    inner = {
        "encoder": rewrite_for_xnnpack(mods["text_encoder"], (ids.int(),))[0],
        "unet": rewrite_for_xnnpack(mods["unet"], (x, ctx))[0],
        "decoder": rewrite_for_xnnpack(mods["decoder"], (x,))[0],
    }
    TextEnc, UNet, Dec = _torch_modules()
    n = torch.export.Dim("tokens", min=2, max=MAX_PROMPT_TOKENS)
    enc = TextEnc(inner["encoder"], tokenizer.pad_id, tokenizer.eos_id, width)
    unet = UNet(inner["unet"], c, width, hook_schedule(pipe.c.scheduler_config))
    ex_ids = torch.tensor([[tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id]], dtype=torch.int64)
    return {
        "encoder": _lower(enc, (ex_ids, torch.ones_like(ex_ids)), ({1: n}, {1: n})),
        "unet": _lower(unet, (torch.cat([x, x]), torch.tensor([1]), torch.zeros(2, TOKENS, WIDTH))),
        "decoder": _lower(Dec(inner["decoder"]), (x,)),
    }


def check_bundle(manifest: dict) -> None:
    """What the hook's fixed contract needs of the bundle; one line otherwise."""
    res = manifest["resolution"]
    width = manifest["components"]["text_encoder"]["outputs"][0]["shape"][-1]
    shape = manifest["components"]["unet"]["inputs"][0]["shape"]
    if res % 32 or shape[-1] != shape[-2] or shape[0] != 1:
        raise SDXSError(
            f"layout {RNE_DIR} needs square images of a multiple of 32 pixels at batch 1 (the hook's imageSize)"
        )
    if manifest["tokenizer"]["max_length"] != TOKENS or width > WIDTH:
        raise SDXSError(
            f"layout {RNE_DIR} needs {TOKENS} tokens and a text width of at most {WIDTH} (the hook's (2, 77, 768))"
        )


def write_layout(pipe, manifest: dict, bundle: Path) -> list[str]:
    """Write RNE_DIR/ beside the sdxs-edge bundle and record its files in the manifest."""
    from runtimes.tokenizer import CLIPBPETokenizer
    from sdxs_edge.bundle import sha256_path

    check_bundle(manifest)
    tok_dir = bundle / manifest["tokenizer"]["dir"]
    tokenizer = CLIPBPETokenizer.from_dir(tok_dir, max_length=TOKENS)
    folder = bundle / RNE_DIR
    folder.mkdir()
    for key, data in hook_programs(pipe, manifest, tokenizer).items():
        (folder / FILES[key]).write_bytes(data)
    (folder / FILES["tokenizer"]).write_text(tokenizer_json(tok_dir))
    sched = scheduler_json(pipe.c.scheduler_config)
    (folder / FILES["scheduler"]).write_text(json.dumps(sched, indent=2) + "\n")
    manifest.setdefault("conversion", {})["layout"] = RNE_DIR
    manifest["conversion"][RNE_DIR.replace("-", "_")] = {
        "num_steps": NUM_STEPS,
        "image_size": manifest["resolution"],
        "files": {f"{RNE_DIR}/{name}": sha256_path(folder / name) for name in sorted(FILES.values())},
    }
    return [RNE_DIR]
