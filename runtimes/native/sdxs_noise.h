// The default noise of sdxs-edge: the stream PyTorch's CPU generator gives for
//   torch.randn(shape, generator=torch.Generator().manual_seed(seed))      (float32, contiguous)
// reproduced without PyTorch.
//
// - The engine is the 32-bit Mersenne Twister seeded with the low 32 bits of the seed (CPUGeneratorImpl:
//   at::mt19937, which std::mt19937 equals).
// - numel >= 16 (normal_fill): every element first gets a uniform float (24 random bits / 2^24); then each
//   block of 16 becomes 16 normals by Box-Muller, u1 = 1 - d[j], u2 = d[j + 8] (j < 8), d[j] = r cos,
//   d[j + 8] = r sin; when numel % 16 != 0 the last 16 elements are drawn again and transformed again.
//   On x86-64 with AVX2, PyTorch transforms with Cephes polynomials (aten/src/ATen/native/cpu/
//   avx_mathfun.h: log256_ps, sincos256_ps, compiled with FMA contraction); the same arithmetic is
//   written here in scalar float with those fused multiply-adds spelled out as std::fma (compile with
//   -ffp-contract=off so the compiler fuses nothing else), so the values are those bits exactly.
//   PyTorch builds without AVX2 (e.g. aarch64) use libm's logf/cosf/sinf there instead and differ from
//   it by an ulp or so in some elements.
// - numel < 16: PyTorch's scalar path, a double Box-Muller per pair of elements from 53-bit uniforms
//   (two 32-bit draws each), r cos first, r sin cached for the next element.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <vector>

namespace sdxs {
namespace noise_detail {

inline float bits_or(float x, uint32_t bits) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u ^= bits;
  std::memcpy(&x, &u, 4);
  return x;
}

// Cephes logf as PyTorch's AVX2 path computes it, for 0 < x <= 1.
inline float cephes_log(float x) {
  const float sqrthf = static_cast<float>(0.707106781186547524);
  const float p[9] = {static_cast<float>(7.0376836292E-2), static_cast<float>(-1.1514610310E-1), static_cast<float>(1.1676998740E-1),
                      static_cast<float>(-1.2420140846E-1), static_cast<float>(1.4249322787E-1), static_cast<float>(-1.6668057665E-1),
                      static_cast<float>(2.0000714765E-1), static_cast<float>(-2.4999993993E-1), static_cast<float>(3.3333331174E-1)};
  const float q1 = static_cast<float>(-2.12194440e-4), q2 = static_cast<float>(0.693359375);
  float min_norm;
  const uint32_t min_norm_bits = 0x00800000u;
  std::memcpy(&min_norm, &min_norm_bits, 4);
  if (x < min_norm) x = min_norm;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  float e = static_cast<float>(static_cast<int32_t>(u >> 23) - 0x7f);
  u = (u & ~0x7f800000u) | 0x3f000000u;  // the mantissa, in [0.5, 1)
  std::memcpy(&x, &u, 4);
  e = e + 1.0f;
  const bool below = x < sqrthf;
  const float tmp = below ? x : 0.0f;
  x = x - 1.0f;
  e = e - (below ? 1.0f : 0.0f);
  x = x + tmp;
  const float z = x * x;
  float y = p[0];
  for (int i = 1; i < 9; ++i) y = std::fma(y, x, p[i]);
  y = y * x;
  y = std::fma(y, z, e * q1);
  y = std::fma(-z, 0.5f, y);
  x = std::fma(e, q2, x + y);
  return x;
}

// Cephes sinf and cosf of x >= 0 together, as PyTorch's AVX2 sincos computes them.
inline void cephes_sincos(float x, float* s, float* c) {
  const float fopi = static_cast<float>(1.27323954473516);
  const float dp1 = static_cast<float>(-0.78515625), dp2 = static_cast<float>(-2.4187564849853515625e-4),
              dp3 = static_cast<float>(-3.77489497744594108e-8);
  const float s0 = static_cast<float>(-1.9515295891E-4), s1 = static_cast<float>(8.3321608736E-3), s2 = static_cast<float>(-1.6666654611E-1);
  const float c0 = static_cast<float>(2.443315711809948E-005), c1 = static_cast<float>(-1.388731625493765E-003),
              c2 = static_cast<float>(4.166664568298827E-002);
  uint32_t sign_sin = 0;
  if (std::signbit(x)) {
    sign_sin = 0x80000000u;
    x = -x;
  }
  int32_t j = static_cast<int32_t>(x * fopi);
  j = (j + 1) & ~1;
  const float y = static_cast<float>(j);
  sign_sin ^= (static_cast<uint32_t>(j & 4)) << 29;
  const bool sine_is_odd_poly = (j & 2) == 0;
  const uint32_t sign_cos = static_cast<uint32_t>(~(j - 2) & 4) << 29;
  x = std::fma(y, dp1, x);
  x = std::fma(y, dp2, x);
  x = std::fma(y, dp3, x);
  const float z = x * x;
  float yc = std::fma(c0, z, c1);
  yc = std::fma(yc, z, c2);
  yc = yc * z;
  yc = std::fma(yc, z, -(z * 0.5f));
  yc = yc + 1.0f;
  float ys = std::fma(s0, z, s1);
  ys = std::fma(ys, z, s2);
  ys = ys * z;
  ys = std::fma(ys, x, x);
  // The vector code selects with masks and adds a zero to the chosen polynomial.
  const float sin_v = sine_is_odd_poly ? 0.0f + ys : yc + 0.0f;
  const float cos_v = sine_is_odd_poly ? yc + 0.0f : 0.0f + ys;
  *s = bits_or(sin_v, sign_sin);
  *c = bits_or(cos_v, sign_cos);
}

inline float uniform24(std::mt19937& eng) { return static_cast<float>(eng() & 0xFFFFFFu) * (1.0f / 16777216.0f); }

inline void normal_fill_16(float* d) {
  const float two_pi = static_cast<float>(2.0f * 3.14159265358979323846);
  for (int j = 0; j < 8; ++j) {
    const float u1 = 1.0f - d[j];
    const float u2 = d[j + 8];
    const float radius = std::sqrt(-2.0f * cephes_log(u1));
    float s, c;
    cephes_sincos(two_pi * u2, &s, &c);
    d[j] = radius * c;
    d[j + 8] = radius * s;
  }
}

}  // namespace noise_detail

// `numel` unit Gaussian floats: torch.randn(numel, generator=torch.Generator().manual_seed(seed)).
inline std::vector<float> torch_randn(uint64_t seed, int64_t numel) {
  using namespace noise_detail;
  std::mt19937 eng(static_cast<uint32_t>(seed & 0xFFFFFFFFu));
  std::vector<float> d(static_cast<size_t>(numel));
  if (numel >= 16) {
    for (auto& v : d) v = uniform24(eng);
    for (int64_t i = 0; i + 16 <= numel; i += 16) normal_fill_16(d.data() + i);
    if (numel % 16 != 0) {
      float* tail = d.data() + numel - 16;
      for (int j = 0; j < 16; ++j) tail[j] = uniform24(eng);
      normal_fill_16(tail);
    }
    return d;
  }
  std::optional<double> cached;
  for (auto& v : d) {
    if (cached) {
      v = static_cast<float>(*cached);
      cached.reset();
      continue;
    }
    double u[2];
    for (double& x : u) {
      const uint64_t hi = eng(), lo = eng();
      x = static_cast<double>(((hi << 32) | lo) & ((uint64_t{1} << 53) - 1)) * (1.0 / 9007199254740992.0);
    }
    const double r = std::sqrt(-2.0 * std::log1p(-u[1]));
    const double theta = 2.0 * 3.14159265358979323846 * u[0];
    cached = r * std::sin(theta);
    v = static_cast<float>(r * std::cos(theta));
  }
  return d;
}

}  // namespace sdxs
