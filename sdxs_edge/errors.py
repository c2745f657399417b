"""Typed errors. The CLI prints `str(err)` as one line and exits 2; `--debug` shows the traceback."""


class SDXSError(Exception):
    """Base class for every error sdxs-edge raises on purpose (bad input, missing files, failed checks)."""


class ModelLoadError(SDXSError):
    """A model folder, preset or weights file cannot be used."""


class NonFiniteError(SDXSError):
    """A component produced NaN or Inf."""


class ParityError(SDXSError):
    """A lowered model does not match the PyTorch reference within its precision's floor."""


class LoRAError(SDXSError):
    """A LoRA file cannot be read, or does not fit the U-Net it is fused into."""
