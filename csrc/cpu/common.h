// Shared helpers for the C++ CPU kernels.
#pragma once
#include <cmath>
#include <cstdint>

// The extension is built for a portable x86-64 baseline; hot loops are cloned by GCC for AVX2
// and AVX-512 and the best clone is picked when the library loads (ifunc).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define DLCORE_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DLCORE_MULTIVERSION
#endif

namespace dlcore::cpu {

// exp(x) for float without libm calls, so loops that use it auto-vectorise. Cody-Waite range
// reduction and a degree-6 polynomial: relative error below 2 ulp over the normal range; inputs
// below -87.3 flush to 0, above 88.7 saturate to +inf.
inline float fast_expf(float x) {
  x = x < -87.33654f ? -87.33654f : (x > 88.72283f ? 88.72283f : x);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t e = static_cast<int32_t>(n) + 127;
  union {
    int32_t i;
    float f;
  } scale{e << 23};
  return x <= -87.33654f ? 0.0f : p * scale.f;
}

}  // namespace dlcore::cpu
