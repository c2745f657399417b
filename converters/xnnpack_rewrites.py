"""Exact module rewrites that keep a whole component inside the XNNPACK delegate (ExecuTorch).

XNNPACK has no group norm, nearest-neighbour upsampling or tensor split, and `torch.matmul` on 3-D
operands exports with broadcasting copies it does not take either. Every such op runs on ExecuTorch's
portable CPU kernels, and every one of them cuts the delegated graph in two: each cut converts the
activations from XNNPACK's channels-last layout back to channels-first and, in int8, dequantizes them.
Measured on the sdxs-512 U-Net at 512x512 in int8 (2 threads): 77 partitions, with 64 ms of its 333 ms
outside XNNPACK (group norm 29 ms, broadcasting copies 15 ms, GEGLU's split 8 ms, upsampling 6 ms); the
TAESD decoder spent 29 ms of 115 ms upsampling outside XNNPACK, in float32, at up to 512x512x64.

The rewrites compute the same function from ops XNNPACK runs (differences are float rounding):
- `nn.GroupNorm` -> per-channel means of x and x^2 (global average pooling), averaged over each group
  and broadcast back by two small constant matrix products, then one scale and shift per channel;
- nearest 2x upsampling (`nn.Upsample`, diffusers' `Upsample2D`) without a plain 3x3 convolution after
  it (that pair: next item) -> for up to 256 channels a 2x2 transposed convolution with stride 2 and identity weights (channel c to channel c), which copies each
  pixel into its 2x2 block; it runs as four 1x1 GEMMs and in int8 is quantized like the convolutions
  around it, exactly (unit weights, same range in and out). A depthwise one would need no multiplies,
  but XNNPACK runs grouped transposed convolutions one group at a time: 550 ms for the decoder's last
  upsampling in float32. Measured on conv -> upsample 256->512 -> conv with 64 channels, int8: 69 ms
  with the portable upsampling, 47 ms with this. Above 256 channels (the U-Net's 640 and 1280) the C^2
  weights cost more than copying: there it is two concatenations and reshapes (int8, conv -> upsample
  -> conv at 1280 channels 16->32: portable 25.1 ms, concatenation 26.1 ms, transposed convolution
  33.1 ms; the gain is the cut it removes);
- nearest 2x upsampling followed by a plain 3x3 convolution (diffusers' `Upsample2D` in the U-Net, and
  `nn.Upsample` then a convolution in a Sequential: TAESD's decoder) -> `SubpixelUpsampleConv`: one 2x2
  convolution at the input resolution with four output blocks, one per output phase, interleaved into
  the 2x output; 4 instead of 9 multiplies per input channel and output pixel, and no upsampled tensor
  (int8, 2 threads: sdxs-512 U-Net 261 -> 242 ms, decoder 89.0 -> 83.6 ms, random weights);
- `nn.LayerNorm` over the last dimension -> mean and variance as products with a constant (C, 1)
  column of 1/C (XNNPACK's reductions take only the two spatial dimensions of 4-D tensors), then one
  scale and shift;
- diffusers' `GEGLU` -> two slices instead of `chunk`;
- diffusers attention with its standard processor (`F.scaled_dot_product_attention`) -> the same
  arithmetic with every head in one `bmm` (`sdxs_edge.attention.BatchedHeadsBmmAttnProcessor`); the
  split-heads variant keeps its own processor, which is already in `bmm`;
- in a text encoder run on token ids alone (`sdxs_edge.components.TextEncoder`, so the only mask is
  CLIP's causal one), each CLIP attention -> batched products over (batch x heads) with a constant causal
  mask, instead of transformers' mask construction and attention interface (49 cuts in CLIP-L).
They run on a copy: the caller's modules are untouched. int8 quantizes only convolutions (transposed
ones included) and linears (`converters.to_executorch`), so the other ops added here stay in float32
inside the delegate.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class GroupNormXnnpack(nn.Module):
    """`nn.GroupNorm` on (N, C, H, W) from global average pooling, matrix products and elementwise ops."""

    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        c, g = gn.num_channels, gn.num_groups
        self.eps = gn.eps
        member = torch.kron(torch.eye(g), torch.ones(c // g, 1))  # (C, G): channel c belongs to group g
        self.register_buffer("group_mean", member / (c // g), persistent=False)
        self.register_buffer("to_channels", member.t().contiguous(), persistent=False)
        self.weight = gn.weight if gn.affine else None
        self.bias = gn.bias if gn.affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:  # the decomposition is written for images; other ranks keep the native op
            return nn.functional.group_norm(x, self.group_mean.shape[1], self.weight, self.bias, self.eps)
        n, c = x.shape[:2]
        mean_c = x.mean(dim=(2, 3), keepdim=True).view(n, c)
        sq_c = (x * x).mean(dim=(2, 3), keepdim=True).view(n, c)
        mean_g = torch.mm(mean_c, self.group_mean)
        var_g = torch.mm(sq_c, self.group_mean) - mean_g * mean_g
        rstd_g = torch.rsqrt(torch.clamp(var_g, min=0.0) + self.eps)
        scale = torch.mm(rstd_g, self.to_channels)
        shift = -torch.mm(mean_g * rstd_g, self.to_channels)
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        return x * scale.view(n, c, 1, 1) + shift.view(n, c, 1, 1)


class LayerNormXnnpack(nn.Module):
    """`nn.LayerNorm` over the last dimension from matrix products with a constant column and elementwise ops."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        (c,) = ln.normalized_shape
        self.eps = ln.eps
        self.register_buffer("average", torch.full((c, 1), 1.0 / c), persistent=False)
        self.weight = ln.weight
        self.bias = ln.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        centred = flat - torch.mm(flat, self.average)
        y = centred * torch.rsqrt(torch.mm(centred * centred, self.average) + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(shape)


class NearestUp2x(nn.Module):
    """Nearest-neighbour 2x upsampling of (N, C, H, W) in ops XNNPACK runs.

    Up to `DENSE_MAX_CHANNELS` channels: a transposed convolution with identity weights. Above, where its
    C^2 weights would cost more than the copies: each pixel repeated along a new last axis and a new row
    axis by concatenation, then reshaped.
    """

    DENSE_MAX_CHANNELS = 256

    def __init__(self, channels: int):
        super().__init__()
        self.up = None
        if channels <= self.DENSE_MAX_CHANNELS:
            self.up = nn.ConvTranspose2d(channels, channels, 2, stride=2, bias=False)
            weight = torch.zeros(channels, channels, 2, 2)
            weight[range(channels), range(channels)] = 1.0
            self.up.weight.data.copy_(weight)
            self.up.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.up is not None:
            return self.up(x)
        n, c, h, w = x.shape
        # `* 1.0`: XNNPACK's partitioner counts distinct input nodes, and turns down a concatenation of a
        # tensor with itself ("got 1 tensors"); left in the portable kernels, each such cat split the
        # sdxs-512 U-Net into another delegate call (7 instead of 1).
        cols = x.unsqueeze(-1)
        rows = torch.cat([cols, cols * 1.0], dim=-1).view(n, c, h, 1, 2 * w)
        return torch.cat([rows, rows * 1.0], dim=3).view(n, c, 2 * h, 2 * w)


def _plain_3x3(conv) -> bool:
    """Whether `conv` is a 3x3 `nn.Conv2d` with stride 1, zero padding 1, no dilation and no groups."""
    return (
        isinstance(conv, nn.Conv2d)
        and conv.kernel_size == (3, 3)
        and conv.stride == (1, 1)
        and conv.padding == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


# Sub-pixel form of nearest 2x upsampling then a 3x3 convolution. Along each axis, output 2i+a sees two
# input rows: x[i-1], x[i] for a = 0 and x[i], x[i+1] for a = 1, through these sums of the 3 conv taps
# (rows: the 2 taps of phase a, columns: conv taps 0..2).
_PHASE_TAPS = (((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0)))


class SubpixelUpsampleConv(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 convolution (stride 1, zero padding 1), computed at the
    input resolution: one 2x2 convolution with padding 1 and 4 C_out outputs (one block per output phase
    (a, b)), then each phase's window cut out and the four interleaved into the 2x output.

    4 C_in C_out multiplies per output pixel instead of 9 (plus the (H+1)(W+1) border of the padded 2x2
    convolution), and no upsampled input. Measured on conv -> upsample -> conv -> conv, int8, 2 threads:
    640 channels 32->64 30.7 ms, against 44.2 ms with the concatenation form of `NearestUp2x` and a 3x3
    convolution and 44.1 ms with the equal 4x4 transposed convolution (XNNPACK runs it at about a third
    of its convolution rate); 64 channels 256->512 48.0 ms against 52.9 ms transposed.

    The interleave is cheap only with `converters.xnnpack_layout` (channels-last reshapes; without it the
    same module costs three extra transposes: 33.8 ms at 640 channels). The slices, reshapes and
    concatenations only move values: in int8 they share the convolution's quantization parameters
    (`converters.to_executorch` ties each concatenation of moves of one tensor to that tensor's), so they
    run as byte copies.
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if not _plain_3x3(conv):
            raise ValueError(
                f"SubpixelUpsampleConv needs a 3x3 convolution with stride 1 and zero padding 1, got {conv}"
            )
        taps = torch.tensor(_PHASE_TAPS, dtype=conv.weight.dtype)
        with torch.no_grad():
            weight = torch.cat(
                [torch.einsum("ak,oikl,bl->oiab", taps[a], conv.weight, taps[b]) for a in (0, 1) for b in (0, 1)]
            )
        self.out_channels = conv.out_channels
        self.conv = nn.Conv2d(conv.in_channels, 4 * conv.out_channels, 2, padding=1, bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(weight)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.repeat(4))
        self.conv.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        c = self.out_channels
        y = self.conv(x)  # (N, 4C, H+1, W+1): phase (a, b) is block 2a+b at rows a..a+H, columns b..b+W
        # The channel block first: the two spatial slices then copy a quarter of the tensor each.
        phase = [
            y[:, (2 * a + b) * c : (2 * a + b + 1) * c][:, :, a : a + h][:, :, :, b : b + w]
            for a in (0, 1)
            for b in (0, 1)
        ]
        # Columns: the two phases of a row side by side in channels, then channels to width. Rows: the two
        # interleaved rows side by side in width, then a view. In XNNPACK's channels-last memory both
        # reshapes move nothing (converters.xnnpack_layout), so the copies are the slices and the cats.
        rows = [
            torch.cat(phase[2 * a : 2 * a + 2], dim=1)
            .view(n, 2, c, h, w)
            .permute(0, 2, 3, 4, 1)
            .reshape(n, c, h, 2 * w)
            for a in (0, 1)
        ]
        return torch.cat(rows, dim=3).view(n, c, 2 * h, 2 * w)


class Upsample2DXnnpack(nn.Module):
    """diffusers' `Upsample2D` (interpolating, no norm): the upsampling and its plain 3x3 convolution as
    `SubpixelUpsampleConv`; without such a convolution, the upsampling as `NearestUp2x` then the rest."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        conv = (inner.conv if inner.name == "conv" else inner.Conv2d_0) if inner.use_conv else None
        self.subpixel = None
        if _plain_3x3(conv):
            self.subpixel = SubpixelUpsampleConv(conv)
        self.up = None if self.subpixel is not None else NearestUp2x(inner.channels)

    def forward(self, hidden_states, output_size=None, *args, **kwargs):
        h, w = hidden_states.shape[-2:]
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return self.inner(hidden_states, output_size, *args, **kwargs)
        if self.subpixel is not None:
            return self.subpixel(hidden_states)
        hidden_states = self.up(hidden_states)
        if self.inner.use_conv:
            hidden_states = (
                self.inner.conv(hidden_states) if self.inner.name == "conv" else self.inner.Conv2d_0(hidden_states)
            )
        return hidden_states


class GEGLUXnnpack(nn.Module):
    """diffusers' `GEGLU` with its two halves taken by slicing."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, hidden_states, *args, **kwargs):
        hidden_states = self.inner.proj(hidden_states)
        half = hidden_states.shape[-1] // 2
        return hidden_states[..., :half] * self.inner.gelu(hidden_states[..., half:])


class CausalSelfAttentionXnnpack(nn.Module):
    """CLIP text self-attention, causal and without a padding mask, as two `bmm` and a constant mask."""

    def __init__(self, inner, max_len: int):
        super().__init__()
        self.inner = inner
        self.register_buffer(
            "causal", torch.full((max_len, max_len), torch.finfo(torch.float32).min).triu(1), persistent=False
        )

    def forward(self, hidden_states, attention_mask=None, *args, **kwargs):
        from sdxs_edge.attention import BatchedHeadsBmmAttnProcessor

        a, n = self.inner, hidden_states.shape[1]
        q, k, v = a.q_proj(hidden_states), a.k_proj(hidden_states), a.v_proj(hidden_states)
        return a.out_proj(BatchedHeadsBmmAttnProcessor.attend(q, k, v, self.causal[:n, :n], a.num_heads, a.scale)), None


def _upsample_channels(module: nn.Module, example) -> dict[str, int]:
    """Input channels of every nearest 2x `nn.Upsample`, from one forward pass on the example."""
    seen: dict[str, int] = {}
    hooks = []
    for name, m in module.named_modules():
        if (
            isinstance(m, nn.Upsample)
            and m.mode == "nearest"
            and m.size is None
            and m.scale_factor in (2, 2.0, (2, 2), (2.0, 2.0))
        ):
            hooks.append(
                m.register_forward_pre_hook(
                    lambda mod, args, name=name: (
                        seen.__setitem__(name, args[0].shape[1]) if args[0].dim() == 4 else None
                    )
                )
            )
    if hooks:
        try:
            with torch.no_grad():
                module(*example)
        finally:
            for h in hooks:
                h.remove()
    return seen


def rewrite_for_xnnpack(module: nn.Module, example) -> tuple[nn.Module, dict[str, int]]:
    """A copy of `module` with the rewrites above applied; returns it and how many of each were made.

    Args:
        module: the component wrapper to export.
        example: its example inputs (tensors), used to find the channel count of `nn.Upsample` layers.
    """
    from diffusers.models.activations import GEGLU
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
    from diffusers.models.upsampling import Upsample2D
    from transformers.models.clip.modeling_clip import CLIPAttention

    from sdxs_edge.attention import BatchedHeadsBmmAttnProcessor
    from sdxs_edge.components import TextEncoder

    module = copy.deepcopy(module)
    causal_text = isinstance(module, TextEncoder)  # token ids only: CLIP's causal mask is the only mask
    max_len = getattr(getattr(getattr(module, "text_encoder", None), "config", None), "max_position_embeddings", 0)
    channels = _upsample_channels(module, example)
    counts = {
        "group_norm": 0,
        "layer_norm": 0,
        "upsample_nearest_2x": 0,
        "upsample_conv_subpixel": 0,
        "geglu": 0,
        "causal_attention": 0,
        "attention_bmm": 0,
    }
    for m in module.modules():
        if isinstance(m, Attention) and isinstance(m.processor, AttnProcessor | AttnProcessor2_0):
            m.set_processor(BatchedHeadsBmmAttnProcessor())
            counts["attention_bmm"] += 1
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, GroupNormXnnpack(child))
                counts["group_norm"] += 1
            elif isinstance(child, nn.LayerNorm) and len(child.normalized_shape) == 1:
                setattr(parent, name, LayerNormXnnpack(child))
                counts["layer_norm"] += 1
            elif (
                isinstance(child, Upsample2D)
                and child.interpolate
                and not child.use_conv_transpose
                and child.norm is None
            ):
                setattr(parent, name, rewritten := Upsample2DXnnpack(child))
                counts["upsample_conv_subpixel" if rewritten.subpixel is not None else "upsample_nearest_2x"] += 1
            elif causal_text and isinstance(child, CLIPAttention) and max_len:
                setattr(parent, name, CausalSelfAttentionXnnpack(child, max_len))
                counts["causal_attention"] += 1
            elif isinstance(child, GEGLU):
                setattr(parent, name, GEGLUXnnpack(child))
                counts["geglu"] += 1
    for qualified, c in channels.items():
        *path, name = qualified.split(".")
        parent = module.get_submodule(".".join(path)) if path else module
        following = (
            parent[int(name) + 1]
            if isinstance(parent, nn.Sequential) and name.isdigit() and int(name) + 1 < len(parent)
            else None
        )
        if _plain_3x3(following):  # upsampling then a 3x3 convolution in a Sequential (TAESD's decoder)
            parent[int(name)], parent[int(name) + 1] = nn.Identity(), SubpixelUpsampleConv(following)
            counts["upsample_conv_subpixel"] += 1
        else:
            setattr(parent, name, NearestUp2x(c))
            counts["upsample_nearest_2x"] += 1
    return module, counts
