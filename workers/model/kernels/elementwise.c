/* The elementwise pieces of a layer in float32, AVX2 + FMA (also in the AVX512 build): RMSNorm,
 * RoPE and the MLP's SiLU gate. Each is a handful of torch ops (RMSNorm ten), and on a small
 * pass torch spends 20-35 us dispatching them, where the arithmetic takes well under 1 us:
 * ~150 us a layer, 4 ms of a 30-layer decode step. Built into the same library as qgemm.c
 * (see qlinear.py); called from elementwise.py.
 *
 * Every row is computed on its own, in one fixed order whatever the row count and the thread
 * count, so a row is bit for bit the same alone or in a batch (batch invariance).
 */
#include <math.h>

#include "avx2.h"

/* out[m] = x[m] * w / sqrt(mean(x[m]^2) + eps), rows of K floats (K a multiple of 8); x and out
 * rows ldx and ldo floats apart. The sum of squares: one 8-lane accumulator over k ascending,
 * then hsum8. Returns 0, or -1 for arguments it does not take. */
int rms_norm(const float *x, int M, int K, long ldx, const float *w, float eps, float *out, long ldo, int threads) {
    if (M < 0 || K < 8 || K % 8) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && (long)M * K >= 65536)
    for (int m = 0; m < M; m++) {
        const float *xr = x + (long)m * ldx;
        float *yr = out + (long)m * ldo;
        __m256 acc = _mm256_setzero_ps();
        for (int k = 0; k < K; k += 8) {
            __m256 v = _mm256_loadu_ps(xr + k);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        const __m256 scale = _mm256_set1_ps(1.0f / sqrtf(hsum8(acc) / (float)K + eps));
        for (int k = 0; k < K; k += 8)
            _mm256_storeu_ps(yr + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), scale), _mm256_loadu_ps(w + k)));
    }
    return 0;
}

/* RoPE in the half-split ("rotate_half") layout: for each of T rows and each of its first `heads`
 * heads of D floats (D a multiple of 16), out = x * cos + swap_halves(x) * sin, with cos, sin the
 * row's [D] table rows (sin's first half negated, as model.rope_tables gives them). x rows ldx
 * floats apart, table rows ldcs apart; out: [T, heads, D] contiguous. Returns 0 or -1. */
int rope_rows(const float *x, int T, long ldx, int heads, int D, const float *cos, const float *sin, long ldcs,
              float *out) {
    if (T < 0 || heads < 1 || D % 16) return -1;
    const int half = D / 2;
    for (int t = 0; t < T; t++) {
        const float *c = cos + (long)t * ldcs, *s = sin + (long)t * ldcs;
        for (int h = 0; h < heads; h++) {
            const float *xh = x + (long)t * ldx + (long)h * D;
            float *yh = out + ((long)t * heads + h) * D;
            for (int d = 0; d < half; d += 8) {
                __m256 lo = _mm256_loadu_ps(xh + d), hi = _mm256_loadu_ps(xh + half + d);
                _mm256_storeu_ps(yh + d, _mm256_fmadd_ps(hi, _mm256_loadu_ps(s + d), _mm256_mul_ps(lo, _mm256_loadu_ps(c + d))));
                _mm256_storeu_ps(yh + half + d, _mm256_fmadd_ps(lo, _mm256_loadu_ps(s + half + d),
                                                                _mm256_mul_ps(hi, _mm256_loadu_ps(c + half + d))));
            }
        }
    }
    return 0;
}

/* The MLP's gate: out[m, i] = silu(g) * u with g = gu[m, i], u = gu[m, I + i] (I a multiple of 8;
 * gu rows ldg floats apart, out rows ldo apart). silu(g) = g * sigmoid(g), sigmoid from
 * e = exp(-|g|): 1 / (1 + e) for g >= 0, e / (1 + e) below. Returns 0 or -1. */
int silu_mul(const float *gu, int M, int I, long ldg, float *out, long ldo, int threads) {
    if (M < 0 || I < 8 || I % 8) return -1;
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && (long)M * I >= 65536)
    for (int m = 0; m < M; m++) {
        const float *g = gu + (long)m * ldg, *u = g + I;
        float *y = out + (long)m * ldo;
        for (int i = 0; i < I; i += 8) {
            __m256 gv = _mm256_loadu_ps(g + i);
            __m256 e = exp8(_mm256_or_ps(gv, sign)); /* exp(-|g|) */
            __m256 denom = _mm256_add_ps(one, e);
            __m256 numer = _mm256_blendv_ps(one, e, gv); /* e where g's sign bit is set */
            __m256 sig = _mm256_div_ps(numer, denom);
            _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_mul_ps(gv, sig), _mm256_loadu_ps(u + i)));
        }
    }
    return 0;
}
