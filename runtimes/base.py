"""The one contract every runtime implements: `Session`.

A session runs a bundle's components (text encoder, U-Net, decoder, and a ControlNet when the bundle
has one; `sdxs_edge.components`) on one backend. Subclasses implement only

    _run(component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]

and get, from this base class, input/output checking against the manifest (names, dtypes, shapes,
finite values), per-component timing, `encode_text`, `denoise`, `decode`, the pure-numpy tokenizer
and one-step update, and `generate`. Nothing here imports PyTorch or a backend library, so deploying
the ONNX or Core ML path needs numpy, Pillow and the `regex` package only (after apple/ml-stable-
diffusion's coreml_model.py, which checks inputs against the model's declared spec before running).

Bundles with an encoder component take an image: `generate(prompt, image=..., strength=S)` encodes it,
noises it to the timestep S selects and runs the one step there (`sdxs_edge.sampler`, the PyTorch
pipeline's rule; the image is read by `sdxs_edge.init_image.load_init_image`, numpy and Pillow only).

ControlNet bundles take a control image: `generate(prompt, control_image=...)` runs the ControlNet on
(x_in, context, control) and hands its residuals to the U-Net (a path, PIL image or uint8 array goes
through `sdxs_edge.control.load_control_image`, numpy and Pillow only; a float array in [0, 1] is used as
it is). A control image for a bundle without a ControlNet, or none for a bundle with one, is an error.

Noise: `Session.noise(seed)` draws the latent (shape from the manifest) with `rng="torch"` (the
default) exactly as `torch.randn(shape, generator=torch.Generator().manual_seed(seed))` does on a CPU
(`sdxs_edge.torch_rng`, numpy only), which is the noise diffusers' `StableDiffusionPipeline` and
`SDXSPipeline.noise` draw for that seed: one seed, one picture, on every runtime and in diffusers.
`rng="numpy"` keeps the earlier stream, `np.random.default_rng(seed).standard_normal` in float32.

`session(prompt, num_inference_steps=1, guidance_scale=0.0, seed=0).images` is diffusers' pipeline call
(`SDXSPipeline.__call__` with `seed=` for `generator=`); docs/diffusers-call.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from runtimes.tokenizer import CLIPBPETokenizer
from sdxs_edge import cpu, sampler, sizes, torch_rng
from sdxs_edge.bundle import REQUIRED_COMPONENTS, BundleError, load_manifest
from sdxs_edge.errors import NonFiniteError, SDXSError

# A U-Net input of this name (optimum's layout, `converters.layouts`) is fed the bundle's one-step timestep.
TIMESTEP_INPUT = "timestep"
# Noise generators `Session.noise` offers; the first is the default.
RNGS = ("torch", "numpy")


class RuntimeInputError(SDXSError):
    """An input array does not match the bundle manifest's declared name, dtype or shape."""


class UnsupportedTargetError(SDXSError):
    """A runtime was asked to run a bundle of a target it cannot execute."""


class BackendMissingError(SDXSError):
    """The backend library, execution provider or device a runtime needs is not available here."""


@dataclass(frozen=True)
class TensorSpec:
    """One declared input or output of a bundle component (from manifest.json).

    Args:
        name: tensor name the lowered program uses.
        shape: static shape.
        dtype: numpy dtype name ("float32", "float16", "int32", "int64").
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    @classmethod
    def from_manifest(cls, d: dict) -> TensorSpec:
        return cls(str(d["name"]), tuple(int(s) for s in d["shape"]), str(d["dtype"]))

    def describe(self) -> str:
        return f"{self.name} {self.dtype}{list(self.shape)}"


@dataclass(frozen=True)
class ComponentSpec:
    """Declared inputs and outputs of one component, in the order the lowered program takes them.

    Args:
        name: "text_encoder", "controlnet", "unet" or "decoder".
        file: the component's file inside the bundle.
        inputs: input specs in positional order.
        outputs: output specs in positional order.
    """

    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class GenerationResult:
    """Everything one `Session.generate_arrays` call produced, for reports and parity.

    Args:
        image: decoder output, float32 (B, 3, H, W) in [-1, 1].
        latent: the one-step x0 fed to the decoder, float32 (B, 4, h, w).
        context: text-encoder hidden states, (B, 77, D).
        model_output: the U-Net's output for `initial_latent(noise)` and `context`.
        noise: the unit Gaussian latent used.
        token_ids: int32 (B, 77).
        timings: wall-clock seconds per component (and "tokenize").
        control: the control image fed to the ControlNet, float (B, 3, H, W) in [0, 1]; None without one.
        residuals: the ControlNet's outputs, in the manifest's order (empty without one).
    """

    image: np.ndarray
    latent: np.ndarray
    context: np.ndarray
    model_output: np.ndarray
    noise: np.ndarray
    token_ids: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    control: np.ndarray | None = None
    residuals: tuple[np.ndarray, ...] = ()


@dataclass
class CallOutput:
    """What `Session.__call__` returns, as diffusers' pipeline output: `.images`."""

    images: Any


def draw_noise(shape: Sequence[int], seed: int, rng: str = "torch") -> np.ndarray:
    """Unit Gaussian float32 array of `shape` from one of `RNGS` (see `Session.noise`)."""
    if rng == "torch":
        return torch_rng.randn(shape, seed)
    if rng == "numpy":
        return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)
    raise RuntimeInputError(f"unknown rng {rng!r}; choose one of: {', '.join(RNGS)}")


def to_pil(image: np.ndarray) -> list:
    """Decoder output in [-1, 1] (B, 3, H, W) -> PIL images, rounded as `sdxs_edge.pipeline.to_pil` does."""
    from PIL import Image

    arr = to_uint8(image)
    return [Image.fromarray(a) for a in arr]


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Decoder output in [-1, 1] (B, 3, H, W) -> uint8 (B, H, W, 3) (same rounding as the PyTorch pipeline)."""
    x = np.clip(np.asarray(image, np.float32) / np.float32(2) + np.float32(0.5), 0, 1)
    return (x.transpose(0, 2, 3, 1) * np.float32(255)).round().astype(np.uint8)


_WARNED: set[tuple[str, str]] = set()


def warn_unchecked_class(bundle: Path, manifest: dict, cls: str | None) -> None:
    """One line on stderr, once per bundle and class in a process, when an int8 bundle runs on a CPU class
    its conversion did not check (int8 kernels differ by instruction set; not an error)."""
    if cls is None or manifest["precision"] != "int8":
        return
    checked = cpu.checked_classes(manifest)
    key = (str(Path(bundle).resolve()), cls)
    if cls in checked or key in _WARNED:
        return
    _WARNED.add(key)
    was = f"was checked on {', '.join(checked)}" if checked else "records no CPU class check"
    print(
        f"warning: {bundle} {was}; its int8 accuracy on this CPU ({cls}) is unchecked (convert --cpu-classes {cls})",
        file=sys.stderr,
    )


class Session:
    """A bundle loaded on one backend. Subclass and implement `_run` (and `close` if it holds resources).

    Subclasses set `name` (the registry name) and `targets` (bundle targets they execute; empty means
    any target, as the PyTorch reference, which runs the bundle's source model). A subclass's
    `__init__` takes the bundle path plus keyword-only options, calls `super().__init__(bundle,
    verify=verify)` first, then loads its programs.

    Args:
        bundle: the bundle directory (manifest.json + component files + tokenizer/).
        verify: check every component file's sha256 against the manifest before loading.
    """

    name: ClassVar[str] = ""
    targets: ClassVar[tuple[str, ...]] = ()
    # The CPU class whose kernels run the bundle (`sdxs_edge.cpu`): "host" for this machine's, a class name
    # for a runtime that runs as another (emulation, a device), None where no CPU int8 kernel runs it.
    cpu_class: ClassVar[str | None] = "host"

    def __init__(self, bundle: str | Path, *, verify: bool = True):
        self.bundle = Path(bundle)
        self.manifest: dict[str, Any] = load_manifest(self.bundle, verify=verify)
        target = self.manifest["target"]
        if self.targets and target not in self.targets:
            from runtimes import DEFAULT_FOR_TARGET

            raise UnsupportedTargetError(
                f"runtime {self.name!r} cannot run {self.bundle} (target {target}); it runs {', '.join(self.targets)} bundles"
                f" - use --runtime {DEFAULT_FOR_TARGET.get(target, 'torch')} for this one"
            )
        self.constants = sampler.OneStepConstants(**self.manifest["sampler"])
        self.specs: dict[str, ComponentSpec] = {
            comp: ComponentSpec(
                comp,
                d["file"],
                tuple(TensorSpec.from_manifest(t) for t in d["inputs"]),
                tuple(TensorSpec.from_manifest(t) for t in d["outputs"]),
            )
            for comp, d in self.manifest["components"].items()
        }
        for comp in REQUIRED_COMPONENTS:
            if comp not in self.specs:
                raise SDXSError(f"{self.bundle}: the bundle has no {comp} component; a runtime needs all three")
        extra = self._residual_names()
        if extra and "controlnet" not in self.specs:
            raise BundleError(
                f"{self.bundle}: its U-Net takes ControlNet residuals ({', '.join(extra)}) but the bundle has no controlnet component; convert it with the controlnet component"
            )
        self.sizes: tuple[tuple[int, int], ...] = sizes.bundle_sizes(self.manifest)
        self.timings: dict[str, float] = {}
        warn_unchecked_class(self.bundle, self.manifest, self.runs_as())
        # Read now, so load time includes it and the first `generate` measures tokenizing only.
        self.tokenizer = CLIPBPETokenizer.from_dir(
            self.bundle / self.manifest["tokenizer"]["dir"], max_length=self.max_length
        )

    def runs_as(self) -> str | None:
        """The CPU class this session's kernels compute as (None: not a CPU int8 runtime)."""
        return cpu.host_class() if self.cpu_class == "host" else self.cpu_class

    # ---- to implement ------------------------------------------------------------------------------
    def _run(self, component: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one component on the backend.

        Args:
            component: "text_encoder", "controlnet", "unet" or "decoder".
            inputs: input name -> array, already checked against `self.specs[component].inputs`.

        Returns:
            output name -> array for every declared output (checked by the caller).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _run(component, inputs)")

    def close(self) -> None:
        """Release backend resources (files, devices, subprocesses). Safe to call twice."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- checked execution ---------------------------------------------------------------------------
    @property
    def batch(self) -> int:
        """The batch the bundle's shapes declare: its static batch, or 1 for a dynamic one (`max_batch`)."""
        return self.specs["unet"].inputs[0].shape[0]

    @property
    def max_batch(self) -> int:
        """The largest batch the bundle takes (`sdxs_edge.sizes`)."""
        return sizes.max_batch(self.manifest)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The latent shape at the default size and declared batch."""
        return self.specs["unet"].inputs[0].shape

    def latent_shape_at(self, batch: int, width: int, height: int) -> tuple[int, ...]:
        """The latent shape at `batch` and image size `width` x `height`."""
        return sizes.shape_at(self.latent_shape, self.sizes[0], (width, height), batch)

    def check_size(self, width: int | None, height: int | None, batch: int) -> tuple[int, int]:
        """(width, height) with the default for None; one line listing what the bundle takes otherwise."""
        H, W = self.image_size
        size = (W if width is None else int(width), H if height is None else int(height))
        try:
            sizes.check_request(self.manifest, size[0], size[1], int(batch))
        except sizes.SizeError as e:
            raise RuntimeInputError(f"{self.bundle}: {e}") from None
        return size

    def specs_at(self, component: str, batch: int, size: tuple[int, int]) -> ComponentSpec:
        """A component's declared specs at `batch` and image `size` (width, height)."""
        spec = self.specs[component]
        at = lambda t: TensorSpec(t.name, sizes.shape_at(t.shape, self.sizes[0], size, batch), t.dtype)
        return ComponentSpec(spec.name, spec.file, tuple(map(at, spec.inputs)), tuple(map(at, spec.outputs)))

    def _spec_for(self, component: str, inputs: dict[str, Any]) -> ComponentSpec:
        """The specs at the batch and size the inputs imply, when the bundle takes them; the declared ones
        otherwise (whose check then names the mismatch)."""
        batch, size = self.shape_of(component, inputs)
        if size not in self.sizes or batch not in sizes.batches(self.manifest):
            return self.specs[component]
        return self.specs_at(component, batch, size)

    def shape_of(self, component: str, inputs: dict[str, Any]) -> tuple[int, tuple[int, int]]:
        """(batch, (width, height)) that a component's inputs imply: the first input's first dimension and
        the size its first 4-D input scales to (the default size where none tells; batch -1 where the
        first input is not an array)."""
        spec = self.specs[component]
        first = inputs.get(spec.inputs[0].name)
        batch = first.shape[0] if getattr(first, "ndim", 0) else -1
        for t in spec.inputs:
            a = inputs.get(t.name)
            if len(t.shape) == 4 and hasattr(a, "shape"):
                return batch, sizes.size_of(a.shape, t.shape, self.sizes[0]) or self.sizes[0]
        return batch, self.sizes[0]

    @property
    def has_controlnet(self) -> bool:
        """Whether the bundle holds a ControlNet (and so `generate` needs a control image)."""
        return "controlnet" in self.specs

    @property
    def has_encoder(self) -> bool:
        """Whether the bundle holds an encoder (and so takes image-to-image inputs; its U-Net takes the timestep)."""
        return "encoder" in self.specs

    def strength_constants(self, strength: float) -> sampler.OneStepConstants:
        """The one-step constants at the timestep image-to-image strength `strength` in (0, 1] selects."""
        sch = self.manifest["scheduler"]
        cfg = {**sch, "prediction_type": self.constants.prediction_type}
        t = sampler.strength_timestep(strength, int(sch["num_train_timesteps"]))
        return sampler.one_step_constants(cfg, self.constants.latent_scaling, t)

    def encode_image(self, image: np.ndarray) -> np.ndarray:
        """Encoder: image (B, 3, H, W) in [-1, 1] -> latent (B, 4, h, w) in the U-Net's space."""
        if not self.has_encoder:
            raise RuntimeInputError(self._no_encoder())
        spec = self.specs["encoder"]
        return self.run("encoder", {spec.inputs[0].name: image})[spec.outputs[0].name]

    def _no_encoder(self) -> str:
        return f"{self.bundle} has no encoder component, so it takes no image (convert a trained model with --encoder)"

    @property
    def control_shape(self) -> tuple[int, ...]:
        """Shape of the ControlNet's control input (B, 3, H, W); an error for a bundle without one."""
        if not self.has_controlnet:
            raise RuntimeInputError(
                f"{self.bundle} has no ControlNet, so it takes no control image (convert it with --controlnet PATH)"
            )
        return self.specs["controlnet"].inputs[2].shape

    @property
    def max_length(self) -> int:
        return int(self.manifest["tokenizer"]["max_length"])

    def check_inputs(self, component: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Check `inputs` against the manifest; raise RuntimeInputError naming the first mismatch.

        Args:
            component: component name.
            inputs: input name -> numpy array.
        """
        if component not in self.specs:
            raise RuntimeInputError(f"unknown component {component!r} (bundle has: {', '.join(self.specs)})")
        spec = self._spec_for(component, inputs)
        want = [s.name for s in spec.inputs]
        if sorted(inputs) != sorted(want):
            raise RuntimeInputError(f"{component}: inputs {sorted(inputs)} do not match the manifest's {want}")
        out = {}
        for s in spec.inputs:
            a = inputs[s.name]
            if not isinstance(a, np.ndarray):
                raise RuntimeInputError(f"{component}.{s.name}: expected a numpy array, got {type(a).__name__}")
            if a.dtype != np.dtype(s.dtype):
                raise RuntimeInputError(
                    f"{component}.{s.name}: dtype {a.dtype} does not match the manifest ({s.describe()})"
                )
            if tuple(a.shape) != s.shape:
                takes = "" if len(self.sizes) == 1 and self.max_batch == self.batch else self._takes()
                raise RuntimeInputError(
                    f"{component}.{s.name}: shape {list(a.shape)} does not match the manifest ({s.describe()}){takes}"
                )
            out[s.name] = np.ascontiguousarray(a)
        return out

    def _takes(self) -> str:
        b = sizes.batches(self.manifest)
        return f"; the bundle takes sizes {', '.join(map(sizes.fmt, self.sizes))} and batch {b[0]}" + (
            f" to {b[-1]}" if len(b) > 1 else ""
        )

    def _check_outputs(
        self, component: str, outputs: dict[str, np.ndarray], spec: ComponentSpec | None = None
    ) -> dict[str, np.ndarray]:
        spec = spec or self.specs[component]
        for s in spec.outputs:
            if s.name not in outputs:
                raise SDXSError(f"{self.name} runtime returned no {component}.{s.name} (got {sorted(outputs)})")
            a = np.asarray(outputs[s.name])
            if tuple(a.shape) != s.shape:
                raise SDXSError(
                    f"{self.name} runtime returned {component}.{s.name} of shape {list(a.shape)}; the manifest declares {s.describe()}"
                )
            if a.dtype.kind == "f" and not np.isfinite(a).all():
                raise NonFiniteError(f"{component} produced non-finite values (NaN/Inf) on the {self.name} runtime")
            outputs[s.name] = a
        return outputs

    def run(self, component: str, inputs: dict[str, Any]) -> dict[str, np.ndarray]:
        """Check inputs, run one component, check outputs and record its wall-clock time in `timings`.

        Args:
            component: "text_encoder", "controlnet", "unet" or "decoder".
            inputs: input name -> numpy array matching the manifest exactly (name, dtype, shape).
        """
        checked = self.check_inputs(component, inputs)
        t = time.perf_counter()
        outputs = self._run(component, checked)
        self.timings[component] = time.perf_counter() - t
        return self._check_outputs(component, dict(outputs), self._spec_for(component, checked))

    def cast_input(self, component: str, index: int, a: np.ndarray) -> np.ndarray:
        """Cast a float array to the float dtype input `index` of `component` declares (fp16 I/O bundles).

        Args:
            component: component name.
            index: position of the input in the manifest.
            a: the array; integer arrays pass unchanged.
        """
        s = self.specs[component].inputs[index]
        return a.astype(s.dtype) if a.dtype.kind == "f" and np.dtype(s.dtype).kind == "f" else a

    # ---- the components ----------------------------------------------------------------------------
    def encode_text(self, token_ids: np.ndarray) -> np.ndarray:
        """Token ids (B, 77) of the manifest's dtype -> hidden states (B, 77, D)."""
        spec = self.specs["text_encoder"]
        return self.run("text_encoder", {spec.inputs[0].name: token_ids})[spec.outputs[0].name]

    def control_residuals(self, latent: np.ndarray, context: np.ndarray, control: np.ndarray) -> tuple[np.ndarray, ...]:
        """ControlNet: x_in (B, 4, h, w), context (B, 77, D) and control image (B, 3, H, W) in [0, 1] ->
        its residuals (down_res_0 .., mid_res), in the manifest's order, already scaled."""
        if not self.has_controlnet:
            raise RuntimeInputError(
                f"{self.bundle} has no ControlNet, so it takes no control image (convert it with --controlnet PATH)"
            )
        spec = self.specs["controlnet"]
        out = self.run(
            "controlnet", {spec.inputs[0].name: latent, spec.inputs[1].name: context, spec.inputs[2].name: control}
        )
        return tuple(out[s.name] for s in spec.outputs)

    def denoise(
        self, latent: np.ndarray, context: np.ndarray, residuals: Sequence[np.ndarray] = (), timestep: int | None = None
    ) -> np.ndarray:
        """U-Net input x_in (B, 4, h, w) and context (B, 77, D) -> model output at the one-step timestep
        (baked in, or fed to the U-Net of a bundle with an encoder).

        Args:
            latent: x_in.
            context: text-encoder hidden states.
            residuals: the ControlNet's outputs (`control_residuals`), for a bundle with a ControlNet.
            timestep: image-to-image: the strength's timestep (bundles with an encoder only).
        """
        spec = self.specs["unet"]
        if timestep is not None and timestep != self.constants.timestep and not self.has_encoder:
            raise RuntimeInputError(self._no_encoder())
        t = self.constants.timestep if timestep is None else timestep
        names = self._residual_names()
        if len(residuals) != len(names):
            raise RuntimeInputError(
                f"unet: takes {len(names)} ControlNet residual(s) ({', '.join(names) or 'none'}), got {len(residuals)}"
            )
        feeds = {spec.inputs[0].name: latent, spec.inputs[1].name: context, **dict(zip(names, residuals))}
        for s in spec.inputs:  # the U-Net of a bundle with an encoder, or of optimum's layout, takes the timestep
            if s.name == TIMESTEP_INPUT:
                feeds[s.name] = np.full((len(latent),), t, s.dtype)  # one per image of the batch
        return self.run("unet", feeds)[spec.outputs[0].name]

    def _residual_names(self) -> list[str]:
        """The U-Net's ControlNet residual inputs: those after latent and context, but a timestep input."""
        return [s.name for s in self.specs["unet"].inputs[2:] if s.name != TIMESTEP_INPUT]

    def decode(self, latent: np.ndarray) -> np.ndarray:
        """x0 in the U-Net's latent space (B, 4, h, w) -> image (B, 3, H, W) in [-1, 1]."""
        spec = self.specs["decoder"]
        return self.run("decoder", {spec.inputs[0].name: latent})[spec.outputs[0].name]

    # ---- tokens, noise and generation ------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Token ids (B, max_length) in the text encoder's declared dtype; long prompts truncated with a warning."""
        ids = self.tokenizer(list(prompts))
        return ids.astype(self.specs["text_encoder"].inputs[0].dtype)

    def noise(
        self,
        seed: int,
        rng: str = "torch",
        batch: int | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> np.ndarray:
        """Unit Gaussian latent of the bundle's shape (at `batch` and `width` x `height` when given), float32.

        Args:
            seed: the seed.
            batch: the batch (default: the declared one).
            width: image width (default: the bundle's default size).
            height: image height (default: the bundle's default size).
            rng: "torch" draws PyTorch's CPU `torch.randn` under `torch.Generator().manual_seed(seed)`
                (diffusers' noise; `sdxs_edge.torch_rng`); "numpy" draws
                `np.random.default_rng(seed).standard_normal`.
        """
        b = self.batch if batch is None else batch
        return draw_noise(self.latent_shape_at(b, *self.check_size(width, height, b)), seed, rng)

    def _prompts(self, prompt: str | Sequence[str]) -> list[str]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        allowed = sizes.batches(self.manifest)
        if len(prompts) not in allowed:
            if len(allowed) == 1:
                raise RuntimeInputError(f"the bundle was lowered for batch {self.batch}; got {len(prompts)} prompt(s)")
            raise RuntimeInputError(
                f"{len(prompts)} prompt(s) are over the bundle's batch bound ({allowed[-1]}; convert with a larger --max-batch)"
            )
        return prompts

    def prepare_control(self, control_image) -> np.ndarray:
        """A control image as the ControlNet's input: float (B, 3, H, W) in [0, 1] in the manifest's dtype.

        Args:
            control_image: a float array (1 or B, 3, H, W) in [0, 1], used as it is (one image is repeated
                over the batch); or a path, PIL image or uint8 array (H, W) / (H, W, 3), read by
                `sdxs_edge.control.load_control_image` (resized with a warning when its size differs;
                non-square or unreadable images are refused); or a list of `batch` of those.
        """
        from sdxs_edge.control import load_control_image

        B, _, H, W = self.control_shape
        if isinstance(control_image, (list, tuple)):
            if len(control_image) != B:
                raise RuntimeInputError(f"{len(control_image)} control images for a bundle of batch {B}")
            return np.concatenate([self.prepare_control(c)[:1] for c in control_image])
        if isinstance(control_image, np.ndarray) and control_image.dtype.kind == "f":
            a = control_image
            if a.ndim != 4 or a.shape[0] not in (1, B) or tuple(a.shape[1:]) != (3, H, W):
                batch = "1" if B == 1 else f"1 or {B}"
                raise RuntimeInputError(
                    f"control image array: expected float ({batch}, 3, {H}, {W}) in [0, 1], got {a.dtype}{list(a.shape)}"
                )
            if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
                raise RuntimeInputError(
                    f"control image array: values must be finite and in [0, 1], got [{np.nanmin(a):g}, {np.nanmax(a):g}]"
                )
        else:
            a = load_control_image(control_image, H)
        if a.shape[0] == 1 and B > 1:
            a = np.repeat(a, B, axis=0)
        return np.ascontiguousarray(a, dtype=self.specs["controlnet"].inputs[2].dtype)

    def generate_arrays(
        self,
        prompt: str | Sequence[str],
        seed: int = 0,
        noise: np.ndarray | None = None,
        control_image=None,
        rng: str = "torch",
        image=None,
        strength: float | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> GenerationResult:
        """Prompt -> tokens -> text encoder -> (ControlNet ->) one U-Net step (arXiv 2403.16627 Sec. 4) ->
        decoder, as arrays.

        Args:
            prompt: one prompt, or a list of `batch` prompts.
            seed: noise seed (`Session.noise`); ignored when `noise` is given.
            noise: explicit unit Gaussian latent of shape `latent_shape` (float32).
            control_image: for a bundle with a ControlNet (required there, refused elsewhere): see
                `prepare_control`.
            rng: noise generator for `seed` (`Session.noise`): "torch" (diffusers' noise) or "numpy".
            image: image-to-image input, for a bundle with an encoder: a path, PIL image, uint8 array
                (H, W, 3) or float array (1, 3, H, W) in [-1, 1], one for the batch
                (`sdxs_edge.init_image.load_init_image`: resized with a warning if its size differs).
            strength: image-to-image strength in (0, 1] (default 0.8, as the PyTorch pipeline).
            width: image width, one of the bundle's sizes (default: its first).
            height: image height, one of the bundle's sizes (default: its first).
        """
        if control_image is not None and not self.has_controlnet:
            raise RuntimeInputError(
                f"{self.bundle} has no ControlNet, so it takes no control image (convert it with --controlnet PATH)"
            )
        if control_image is None and self.has_controlnet:
            raise RuntimeInputError(
                f"{self.bundle} has a ControlNet: give a control image (control_image=..., --control IMAGE)"
            )
        prompts = self._prompts(prompt)
        size = self.check_size(width, height, len(prompts))
        shape = self.latent_shape_at(len(prompts), *size)
        c, init = self._init_latent(image, strength, len(prompts), size)
        control = self.prepare_control(control_image) if control_image is not None else None
        timings: dict[str, float] = {}
        t = time.perf_counter()
        ids = self.tokenize(prompts)
        timings["tokenize"] = time.perf_counter() - t
        if noise is None:
            noise = draw_noise(shape, seed, rng)
        noise = np.asarray(noise)
        if tuple(noise.shape) != shape or noise.dtype.kind != "f":
            raise RuntimeInputError(f"noise: expected float {list(shape)}, got {noise.dtype}{list(noise.shape)}")
        noise = noise.astype(np.float32)
        context = self.encode_text(ids)
        timings["text_encoder"] = self.timings["text_encoder"]
        x_in = sampler.initial_latent(noise, c, init).astype(np.float32)
        residuals: tuple[np.ndarray, ...] = ()
        if control is not None:
            residuals = self.control_residuals(
                self.cast_input("controlnet", 0, x_in), self.cast_input("controlnet", 1, context), control
            )
            timings["controlnet"] = self.timings["controlnet"]
        out = self.denoise(
            self.cast_input("unet", 0, x_in),
            self.cast_input("unet", 1, context),
            [self.cast_input("unet", 2 + i, r) for i, r in enumerate(residuals)],
            c.timestep,
        )
        timings["unet"] = self.timings["unet"]
        if init is not None:
            timings["encoder"] = self.timings["encoder"]
        latent = sampler.denoised(out.astype(np.float32), noise, c, init).astype(np.float32)
        image = self.decode(self.cast_input("decoder", 0, latent))
        timings["decoder"] = self.timings["decoder"]
        return GenerationResult(image.astype(np.float32), latent, context, out, noise, ids, timings, control, residuals)

    def _init_latent(
        self, image, strength: float | None, batch: int, size: tuple[int, int]
    ) -> tuple[sampler.OneStepConstants, np.ndarray | None]:
        """(constants, encoded image repeated over the batch) for image-to-image at `size` (width, height);
        (constants, None) without."""
        if image is None:
            if strength is not None:
                raise RuntimeInputError("strength is for image-to-image: give an image too (image=..., --image PATH)")
            return self.constants, None
        if not self.has_encoder:
            raise RuntimeInputError(self._no_encoder())
        from sdxs_edge.init_image import load_init_image

        c = self.strength_constants(0.8 if strength is None else strength)
        x = np.repeat(load_init_image(image, size[1], size[0]), batch, axis=0)
        init = self.encode_image(self.cast_input("encoder", 0, x)).astype(np.float32)
        return c, init

    def generate(
        self,
        prompt: str | Sequence[str],
        seed: int = 0,
        noise: np.ndarray | None = None,
        control_image=None,
        rng: str = "torch",
        image=None,
        strength: float | None = None,
        width: int | None = None,
        height: int | None = None,
    ):
        """Generate: a PIL image for one prompt, a list of them for a list of prompts.

        Args:
            prompt: one prompt, or a list of `batch` prompts.
            seed: noise seed (`Session.noise`); ignored when `noise` is given.
            noise: explicit unit Gaussian latent of shape `latent_shape` (float32).
            control_image: for a bundle with a ControlNet: a path, PIL image, uint8 array or float array
                in [0, 1] (see `prepare_control`).
            rng: noise generator for `seed`: "torch" (diffusers' noise, the default) or "numpy".
            image: image-to-image input, for a bundle with an encoder (see `generate_arrays`).
            strength: image-to-image strength in (0, 1] (default 0.8).
            width: image width, one of the bundle's sizes (default: its first).
            height: image height, one of the bundle's sizes (default: its first).
        """
        images = to_pil(
            self.generate_arrays(prompt, seed, noise, control_image, rng, image, strength, width, height).image
        )
        return images[0] if isinstance(prompt, str) else images

    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int = 0,
        image=None,
        strength: float | None = None,
        output_type: str = "pil",
        rng: str = "torch",
    ) -> CallOutput:
        """diffusers' pipeline call on a bundle: `session(prompt, seed=0).images` (`SDXSPipeline.__call__`
        with `seed=` for `generator=`; the same seed gives diffusers' image with the default rng).

        Args:
            prompt: a prompt or a list of prompts; with `num_images_per_prompt` they must fill the
                bundle's batch exactly.
            num_inference_steps: must be 1 (a bundle holds the one-step U-Net).
            guidance_scale: must be <= 1 (no classifier-free guidance in a one-step bundle; SDXS runs 0).
            height: image height, one of the bundle's sizes (default: its first).
            width: image width, one of the bundle's sizes (default: its first).
            num_images_per_prompt: images per prompt (each prompt's images together, as diffusers).
            seed: noise seed (`Session.noise`).
            image: image-to-image input, for a bundle with an encoder (see `generate_arrays`); refused
                by a bundle without one.
            strength: image-to-image strength in (0, 1] (default 0.8 with an image).
            output_type: "pil", "np" (float (B, H, W, 3) in [0, 1]) or "latent" (the one-step latents).
            rng: noise generator for `seed`: "torch" (diffusers' noise) or "numpy".
        """
        if output_type not in ("pil", "np", "latent"):
            raise RuntimeInputError(f"output_type must be pil, np or latent for a bundle, got {output_type!r}")
        if int(num_inference_steps) != 1:
            raise RuntimeInputError(
                f"a bundle runs the one-step U-Net: num_inference_steps must be 1, got {num_inference_steps}"
            )
        if float(guidance_scale) > 1.0:
            raise RuntimeInputError(
                f"a one-step bundle runs without classifier-free guidance: guidance_scale must be <= 1, got {guidance_scale:g}"
            )
        if int(num_images_per_prompt) < 1:
            raise RuntimeInputError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(int(num_images_per_prompt))]
        res = self.generate_arrays(
            prompts, seed=seed, rng=rng, image=image, strength=strength, width=width, height=height
        )
        if output_type == "latent":
            return CallOutput(res.latent)
        if output_type == "np":
            return CallOutput(np.clip(res.image / np.float32(2) + np.float32(0.5), 0, 1).transpose(0, 2, 3, 1))
        return CallOutput(to_pil(res.image))

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the images the bundle draws by default (its first size)."""
        return tuple(self.specs["decoder"].outputs[0].shape[2:4])
