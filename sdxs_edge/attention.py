"""Attention variants a conversion can lower (`sdxs-edge convert --attention`).

"standard": diffusers' own processor (`F.scaled_dot_product_attention`), which exporters lower to one
batched Q K^T over every head, a softmax and one batched product with V.

"split-heads": the same arithmetic, one head at a time, as Apple's ml-stable-diffusion does for the Neural
Engine (its SPLIT_EINSUM variant): each head's Q K^T, softmax and product with V is its own small op, so
no tensor spans every head. On the Neural Engine that keeps each op within its tiling limits; on CPU
runtimes it caps the largest intermediate at one head's attention map: at 512x512 the first stage of an
SD-2.1-style U-Net attends over 4,096 tokens with 5 heads, so the scores and probabilities shrink from 2 x
335 MB to 2 x 67 MB.

Both give the same outputs up to float rounding (`tests/test_converters.py`).
"""

from __future__ import annotations

ATTENTION_VARIANTS = ("standard", "split-heads")


class SplitHeadAttnProcessor:
    """A diffusers attention processor computing each head separately (`Attention.set_processor`).

    It mirrors diffusers' `AttnProcessor` (spatial and group norms, cross-attention norm, masks,
    residual connection, output rescale) and differs only in the per-head loop.
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):

        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch, seq, _ = hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        mask = attn.prepare_attention_mask(attention_mask, seq, batch)  # (batch * heads, 1 or query, seq) or None
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        hidden_states = self.attend(query, key, value, mask, attn.heads, attn.scale)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def attend(query, key, value, mask, heads: int, scale: float):
        """(batch, tokens, heads * d) query, key and value -> the attended (batch, tokens, heads * d)."""
        import torch

        batch = query.shape[0]
        d = query.shape[-1] // heads
        if mask is not None:
            mask = mask.reshape(batch, heads, *mask.shape[1:])
        outs = []
        for h in range(heads):
            q, k, v = (t[..., h * d : (h + 1) * d] for t in (query, key, value))
            # bmm, not matmul: matmul on 3-D operands exports with broadcasting copies (expand) that
            # ExecuTorch's XNNPACK delegate does not take, cutting its graph at every head.
            scores = torch.bmm(q, k.transpose(1, 2)) * scale
            if mask is not None:
                scores = scores + mask[:, h]
            outs.append(torch.bmm(scores.softmax(dim=-1).to(v.dtype), v))
        return torch.cat(outs, dim=-1)


class BatchedHeadsBmmAttnProcessor(SplitHeadAttnProcessor):
    """diffusers' attention with every head in one `bmm` over (batch x heads): the "standard" variant's
    arithmetic in ops ExecuTorch's XNNPACK delegate runs (`converters.xnnpack_rewrites`), where
    `F.scaled_dot_product_attention` exports with mask handling and broadcasting copies it does not."""

    @staticmethod
    def attend(query, key, value, mask, heads: int, scale: float):
        import torch

        batch, n, m = query.shape[0], query.shape[1], key.shape[1]
        d = query.shape[-1] // heads

        def split(t, length):
            return t.view(batch, length, heads, d).transpose(1, 2).reshape(batch * heads, length, d)

        scores = torch.bmm(split(query, n), split(key, m).transpose(1, 2)) * scale
        if mask is not None:
            scores = scores + mask
        out = torch.bmm(scores.softmax(dim=-1).to(value.dtype), split(value, m))
        return out.view(batch, heads, n, d).transpose(1, 2).reshape(batch, n, heads * d)


def set_attention(module, variant: str) -> int:
    """Give every diffusers `Attention` inside `module` the variant's processor; returns how many.

    Args:
        module: a U-Net, ControlNet or VAE (anything holding diffusers `Attention` blocks).
        variant: one of ATTENTION_VARIANTS.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    if variant not in ATTENTION_VARIANTS:
        raise ValueError(f"attention variant must be one of {', '.join(ATTENTION_VARIANTS)}; got {variant!r}")
    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.set_processor(SplitHeadAttnProcessor() if variant == "split-heads" else AttnProcessor2_0())
            n += 1
    return n
