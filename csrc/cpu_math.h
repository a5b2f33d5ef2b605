// Small vectorizable math helpers shared by the CPU ops (logprobs.cpp, gae.cpp).
//
// Written as branch-free scalar code so that GCC turns the `#pragma omp simd` loops that call it
// into AVX2/FMA (or whatever -march=native offers). Built with -fno-math-errno -fno-trapping-math
// (without the latter GCC keeps float compares as branches and vectorizes nothing) but not
// -ffast-math, which would assume no infinities: the model's padded vocabulary columns are -inf
// after a temperature < 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace megarlhf {

// Below this argument exp() returns exactly 0 (exp(-87.3) ~ 1.2e-38 is the smallest normal float);
// padded vocabulary columns (finfo.min or -inf) land here and get exactly zero probability.
constexpr float kExpUnderflow = -87.3f;

static inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

static inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// exp(x) to about 2 ulp (Cephes expf: range reduction by ln 2, degree-6 polynomial, exponent
// built from bits). Exactly 0 for x < kExpUnderflow (including -inf); x is expected <= ~88.
static inline float fast_exp(float x) {
  // Ternaries, not std::fmin/fmax: those keep NaN semantics GCC will not vectorize.
  const float lo = x > kExpUnderflow ? x : kExpUnderflow;
  const float xc = lo < 88.3f ? lo : 88.3f;
  // Round to nearest by the 1.5 * 2^23 trick (|xc * log2 e| < 2^22); std::floor would be a libm
  // call that blocks vectorization unless -fno-trapping-math.
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  const float scale = bits_to_float(static_cast<uint32_t>(e) << 23);
  return x < kExpUnderflow ? 0.0f : p * scale;
}

static inline float bf16_bits_to_float(uint16_t h) {
  return bits_to_float(static_cast<uint32_t>(h) << 16);
}

// Round to nearest even, as torch does (NaN stays NaN).
static inline uint16_t float_to_bf16_bits(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
  return std::isnan(f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded >> 16);
}

}  // namespace megarlhf
