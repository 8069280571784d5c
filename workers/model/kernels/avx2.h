/* Small AVX2 helpers shared by qgemm.c and attend.c (their AVX2 builds). */
#ifndef TANDEM_KERNELS_AVX2_H
#define TANDEM_KERNELS_AVX2_H

#include <immintrin.h>

/* The sum of v's 8 lanes, in one fixed order. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

#endif
