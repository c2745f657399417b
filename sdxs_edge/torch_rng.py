"""PyTorch's CPU `torch.randn` in numpy, so a bundle runtime draws diffusers' noise without PyTorch.

`randn(shape, seed)` returns what `torch.randn(shape, generator=torch.Generator().manual_seed(seed))`
returns on a CPU (float32), following ATen (after apple/ml-stable-diffusion's torch RNG source):

1. `manual_seed` seeds a 32-bit Mersenne Twister (mt19937) with `seed mod 2**32` by the standard
   `init_genrand` recurrence (numpy's legacy `RandomState(seed)` seeds it the same way, so its raw
   32-bit draws are the stream).
2. numel >= 16 (`normal_fill`, DistributionTemplates.h / DistributionKernels.cpp): draw numel uniforms
   u = (r & 0xFFFFFF) * 2**-24, then Box-Muller over blocks of 16: for j < 8,
   radius = sqrt(-2 log(1 - u[j])), theta = 2 pi u[j + 8], out[j] = radius cos(theta),
   out[j + 8] = radius sin(theta). When numel is not a multiple of 16, 16 more uniforms are drawn
   and the last 16 outputs are recomputed from them.
   On x86 CPUs PyTorch runs this block with AVX2 (`normal_fill_16_AVX2`: avx_mathfun's cephes
   `log256_ps` / `sincos256_ps`, compiled with fused multiply-adds); this module evaluates those same
   float32 polynomials with the same fused operations, so the result is bitwise PyTorch's there.
   Builds that take the scalar path instead (AVX-512 dispatch, ARM) use libm's logf/cosf/sinf, which
   differ from this in the last bit or two (<= 2e-6 absolute).
3. numel < 16 (`normal_distribution<double>`): each pair of values takes two 53-bit doubles
   u = (((r1 << 32) | r2) & (2**53 - 1)) * 2**-53, radius = sqrt(-2 log(1 - u2)), theta = 2 pi u1;
   the first value is radius cos(theta), the next radius sin(theta), cast to float32.

Nothing here imports PyTorch; `tests/test_torch_rng.py` compares it with PyTorch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sdxs_edge.errors import SDXSError

_F32 = np.float32
_F64 = np.float64


def randn(shape: Sequence[int] | int, seed: int) -> np.ndarray:
    """`torch.randn(shape, generator=torch.Generator().manual_seed(seed))` on a CPU, as float32 numpy.

    Args:
        shape: output shape (an int is a 1-D length).
        seed: the generator seed, any integer `torch.Generator.manual_seed` accepts.
    """
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise SDXSError(f"randn: negative dimension in shape {list(shape)}")
    if not isinstance(seed, (int, np.integer)) or not -(2**63) <= int(seed) < 2**64:
        raise SDXSError(f"randn: seed must be an integer in [-2**63, 2**64), got {seed!r}")
    n = math.prod(shape)
    if n < 16:
        return _scalar_normals(_mt19937(int(seed), 4 * n), n).reshape(shape)
    raw = _mt19937(int(seed), n + (16 if n % 16 else 0))
    u = (raw & 0xFFFFFF).astype(_F32) * _F32(2.0**-24)
    out = u[:n].copy()
    full = n // 16 * 16
    out[:full] = _box_muller_16(out[:full])
    if n % 16:
        out[n - 16 :] = _box_muller_16(u[n:])
    return out.reshape(shape)


def _mt19937(seed: int, count: int) -> np.ndarray:
    """The first `count` raw 32-bit outputs of mt19937 seeded as `torch.Generator().manual_seed(seed)`."""
    state = np.random.RandomState(seed & 0xFFFFFFFF)
    return state.randint(0, 2**32, size=count, dtype=np.uint32)


def _scalar_normals(raw: np.ndarray, n: int) -> np.ndarray:
    """numel < 16: `at::normal_distribution<double>`, one Box-Muller pair per four 32-bit draws."""
    out = np.empty(n, _F32)
    r = raw.astype(np.uint64)
    for i in range(0, n, 2):
        k = 2 * i  # four draws per pair: u1 from draws k, k+1; u2 from k+2, k+3
        u1 = float(((r[k] << np.uint64(32)) | r[k + 1]) & np.uint64(2**53 - 1)) * 2.0**-53
        u2 = float(((r[k + 2] << np.uint64(32)) | r[k + 3]) & np.uint64(2**53 - 1)) * 2.0**-53
        radius = math.sqrt(-2.0 * math.log1p(-u2))
        theta = 2.0 * math.pi * u1
        out[i] = radius * math.cos(theta)
        if i + 1 < n:
            out[i + 1] = radius * math.sin(theta)
    return out


def _box_muller_16(u: np.ndarray) -> np.ndarray:
    """`normal_fill_16_AVX2` over consecutive blocks of 16 uniforms (float32 in, float32 out)."""
    blocks = u.reshape(-1, 16)
    radius = np.sqrt(_F32(-2.0) * _log_ps(_F32(1.0) - blocks[:, :8]))
    sin, cos = _sincos_ps(_F32(2.0 * math.pi) * blocks[:, 8:])
    return np.concatenate([radius * cos, radius * sin], axis=1).reshape(-1)


def _fma(a, b, c) -> np.ndarray:
    """float32 a * b + c with one rounding (the FMA instruction).

    a * b is exact in float64 and a * b + c is exact up to its float64 rounding error e (two-sum);
    rounding that sum to float32 rounds once more, which is wrong only when the float64 sum lies on a
    float32 halfway point and e != 0; then the sum is nudged toward e before the final rounding.
    """
    p = np.asarray(a, _F64) * np.asarray(b, _F64)
    c = np.asarray(c, _F64)
    s = p + c
    bb = s - p
    err = (p - (s - bb)) + (c - bb)
    s32 = s.astype(_F32)
    other = np.nextafter(s32, np.where(s > s32, _F32(np.inf), _F32(-np.inf)))  # the far float32 neighbour
    tie = (s32 != s) & ((s32.astype(_F64) + other.astype(_F64)) * 0.5 == s)
    nudged = np.where(err > 0, np.nextafter(s, np.inf), np.nextafter(s, -np.inf)).astype(_F32)
    return np.where(tie & (err != 0), nudged, s32)


# avx_mathfun.h constants (cephes single precision)
_LOG_P = (
    7.0376836292e-2,
    -1.1514610310e-1,
    1.1676998740e-1,
    -1.2420140846e-1,
    1.4249322787e-1,
    -1.6668057665e-1,
    2.0000714765e-1,
    -2.4999993993e-1,
    3.3333331174e-1,
)
_LOG_Q1, _LOG_Q2 = -2.12194440e-4, 0.693359375
_DP = (-0.78515625, -2.4187564849853515625e-4, -3.77489497744594108e-8)
_SIN_P = (-1.9515295891e-4, 8.3321608736e-3, -1.6666654611e-1)
_COS_P = (2.443315711809948e-5, -1.388731625493765e-3, 4.166664568298827e-2)


def _log_ps(x: np.ndarray) -> np.ndarray:
    """avx_mathfun `log256_ps` for x in (0, 1] as compiled with FMA contraction."""
    x = np.maximum(x, _F32(1.17549435e-38)).astype(_F32)
    bits = x.view(np.int32)
    e = ((bits >> 23) - 0x7F).astype(_F32) + _F32(1.0)
    x = ((bits & ~0x7F800000) | np.int32(0x3F000000)).view(_F32)  # mantissa in [0.5, 1)
    small = x < _F32(0.707106781186547524)
    e = e - np.where(small, _F32(1.0), _F32(0.0))
    x = (x - _F32(1.0)) + np.where(small, x, _F32(0.0))
    z = x * x
    y = np.full_like(x, _F32(_LOG_P[0]))
    for p in _LOG_P[1:]:
        y = _fma(y, x, _F32(p))
    y = _fma(y * x, z, e * _F32(_LOG_Q1))
    y = _fma(-z, _F32(0.5), y)
    return _fma(e, _F32(_LOG_Q2), x + y)


def _sincos_ps(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """avx_mathfun `sincos256_ps` for x >= 0 as compiled with FMA contraction: (sin x, cos x)."""
    j = ((x * _F32(1.27323954473516)).astype(np.int32) + 1) & ~1  # octant, rounded up to even
    y = j.astype(_F32)
    for dp in _DP:  # x - j * pi / 4 in extended precision
        x = _fma(y, _F32(dp), x)
    z = x * x
    yc = np.full_like(x, _F32(_COS_P[0]))
    for p in _COS_P[1:]:
        yc = _fma(yc, z, _F32(p))
    yc = _fma(yc * z, z, -(z * _F32(0.5))) + _F32(1.0)
    ys = np.full_like(x, _F32(_SIN_P[0]))
    for p in _SIN_P[1:]:
        ys = _fma(ys, z, _F32(p))
    ys = _fma(ys * z, x, x)
    use_sin_poly = (j & 2) == 0
    sin = np.where(use_sin_poly, ys, yc)
    cos = np.where(use_sin_poly, yc, ys)
    sin = np.where((j & 4) != 0, -sin, sin)
    cos = np.where((~(j - 2) & 4) != 0, -cos, cos)
    return sin, cos
