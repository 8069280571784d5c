/* Small-batch matmul of float activations with GGUF-style quantized weights, AVX512-VNNI
 * or AVX2 + FMA (one variant per build, chosen by the compiler flags: see qlinear.py's VARIANTS).
 *
 * y[m, n] = sum_k x[m, k] * w[n, k] for M <= 8 rows (a decode step, or a verification
 * of up to 7 drafts), where every group of G consecutive k of a weight row is
 *     w[n, k] = s[n, g] * q[n, k] + o[n, g],  q unsigned (4 bits or 8 bits).
 * Each 32-block of an activation row is quantized to int8 with its own scale (as llama.cpp
 * quantizes activations to Q8), the integer dot products run 64 at a time on vpdpbusd
 * (u8 weights x s8 activations), and per group
 *     sum_k x_k w_k ~= s * dx * sum_k q_k xq_k + o * sum_k x_k     (sum_k x_k exact, float).
 * The weight bytes are read once per pass whatever M is: a verification of k drafts costs
 * about what one decode step costs. Every row is computed on its own, in the same order
 * whatever M and the thread count (batch-invariant): a row's result does not depend on the
 * other rows of the pass.
 *
 * Layouts (made by workers/model/qlinear.py):
 *   nibbles (G = 32): per tile of 16 output rows and per 8 k: 64 bytes, byte 4i+j =
 *       q[n_i][k+j] | q[n_i][k+4+j] << 4   (i < 16, j < 4)
 *   bytes (G = 16 or 32): per tile of 16 rows and per 4 k: 64 bytes, byte 4i+j = q[n_i][k+j]
 *   six bits (Q6_K, G = 16): per tile and per 16 k: 192 bytes: two nibble blocks as above (low
 *       4 bits of k..k+7, then of k+8..k+15) and one block whose byte 4i+j holds the high 2 bits
 *       of q[n_i][k+j], [k+4+j], [k+8+j], [k+12+j] (bits 0-1, 2-3, 4-5, 6-7): 0.75 bytes a weight
 *   scales s, offsets o: [tiles][K/G][16] float32; o == NULL means o = -zero_point * s.
 *   or, for nibbles with half scales (layout NIBBLES_HALF): s and o as above but float16
 *       (IEEE half, passed as `scale` and `offset`): 0.125 bytes a weight instead of 0.25, the
 *       form of a 4-bit re-quantized draft (qlinear.py's QuantParts.quantize_4bit).
 *   or, for Q4_K (super != NULL): s = d * sc, o = -dmin * m with sc, m: [tiles][K/32][16] uint8
 *       (the block's 6-bit scales and mins, passed as `scale` and `offset`) and d, dmin:
 *       super [tiles][K/256][2][16] float32 (d, then -dmin): 0.09 bytes a weight instead of 0.25.
 *   or, for Q6_K (six bits): s = d * sc, o = -32 * s with sc: [tiles][K/16][16] int8 (passed as
 *       `scale`) and d: super [tiles][K/256][16] float32: 0.08 bytes a weight.
 * N is padded to a multiple of 16 (padding rows are zero); K is a multiple of 32.
 *
 * Both variants compute the same integer sums, exactly (see the AVX2 code's notes).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#define MMAX 8

enum { BYTES = 0, NIBBLES = 1, SIX_BITS = 2, NIBBLES_HALF = 3 };
#define NIBBLED(layout) ((layout) == NIBBLES || (layout) == NIBBLES_HALF)
#define WEIGHT_BYTES4(layout) (NIBBLED(layout) ? 2 : (layout) == SIX_BITS ? 3 : 4) /* bytes a weight, x4 */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)

static void quantize_rows(const float *x, int M, int K, int G, int8_t *xq, float *dx, float *sx) {
    for (int m = 0; m < M; m++) {
        const float *row = x + (long)m * K;
        for (int b = 0; b < K / 32; b++) {
            __m512 v0 = _mm512_loadu_ps(row + b * 32), v1 = _mm512_loadu_ps(row + b * 32 + 16);
            __m512 a = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
            float amax = _mm512_reduce_max_ps(a);
            float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
            dx[m * (K / 32) + b] = d;
            __m512 vid = _mm512_set1_ps(id);
            __m128i q0 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vid)));
            __m128i q1 = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vid)));
            _mm_storeu_si128((__m128i *)(xq + (long)m * K + b * 32), q0);
            _mm_storeu_si128((__m128i *)(xq + (long)m * K + b * 32 + 16), q1);
        }
        for (int g = 0; g < K / G; g++) {
            float s = 0.0f;
            for (int k = 0; k < G; k++) s += row[g * G + k];
            sx[m * (K / G) + g] = s;
        }
    }
}

/* Weights are prefetched this many bytes ahead (a tile's later blocks, then the next tile's):
 * one core's own requests do not keep enough loads in flight to stream at its bandwidth, and
 * from 5 rows on the dot products leave the loads no slack to catch up (Zen5, 1 thread, Q4_K
 * 1536x8960, ms a call without -> with, 1 / 5 / 8 rows: 0.22 -> 0.16, 0.36 -> 0.27,
 * 0.80 -> 0.40; 4096 bytes ahead gave 0.19, 0.30, 0.42). Each variant sets its own distance. */
#define AHEAD 8192

/* Integer dot products accumulate in CHAINS(M) independent registers per row (summed exactly
 * at the end of a group): with one row, a single accumulator would wait on vpdpbusd's latency
 * at every step. Float accumulation has one fixed order whatever M is (batch invariance). */
#define CHAINS(M) ((M) == 1 ? 4 : (M) == 2 ? 2 : 1)

static inline __attribute__((always_inline)) void tile(
    const int M, const int layout, const int G, int t, int K, const uint8_t *w, const float *scale,
    const float *offset, float zero_point, const float *super, const int8_t *xq, const float *dx, const float *sx,
    float *y, int ldy) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int groups = K / G;
    const int C = CHAINS(M);
    __m512 acc[MMAX];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    const uint8_t *wt = w + (long)t * 16 * K * WEIGHT_BYTES4(layout) / 4;
    for (int g = 0; g < groups; g++) {
        __m512i iacc[4][MMAX];
        for (int c = 0; c < C; c++)
            for (int m = 0; m < M; m++) iacc[c][m] = _mm512_setzero_si512();
        const int k0 = g * G;
        int step = 0;
        if (layout == SIX_BITS) {  /* G == 16: one 192-byte block */
            const uint8_t *blk = wt + (long)(k0 / 16) * 192;
            const __m512i three = _mm512_set1_epi8(3);
            for (int i = 0; i < 3; i++) _mm_prefetch((const char *)blk + 64 * i + AHEAD, _MM_HINT_T0);
            __m512i na = _mm512_loadu_si512(blk), nb = _mm512_loadu_si512(blk + 64), hb = _mm512_loadu_si512(blk + 128);
            __m512i v[4];
            v[0] = _mm512_or_si512(_mm512_and_si512(na, low), _mm512_slli_epi16(_mm512_and_si512(hb, three), 4));
            v[1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(na, 4), low),
                                   _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 2), three), 4));
            v[2] = _mm512_or_si512(_mm512_and_si512(nb, low),
                                   _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 4), three), 4));
            v[3] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(nb, 4), low),
                                   _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(hb, 6), three), 4));
            for (int j = 0; j < 4; j++, step++) {  /* v[j] holds k0 + 4j .. k0 + 4j + 3 */
                const int c0 = step % C;
                for (int m = 0; m < M; m++) {
                    const int8_t *a = xq + (long)m * K + k0 + 4 * j;
                    iacc[c0][m] = _mm512_dpbusd_epi32(iacc[c0][m], v[j], _mm512_set1_epi32(*(const int32_t *)a));
                }
            }
        } else if (NIBBLED(layout)) {
            for (int k = k0; k < k0 + G; k += 8, step += 2) {
                _mm_prefetch((const char *)(wt + (long)(k / 8) * 64) + AHEAD, _MM_HINT_T0);
                __m512i b = _mm512_loadu_si512(wt + (long)(k / 8) * 64);
                __m512i lo = _mm512_and_si512(b, low);
                __m512i hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
                const int c0 = step % C, c1 = (step + 1) % C;
                for (int m = 0; m < M; m++) {
                    const int8_t *a = xq + (long)m * K + k;
                    iacc[c0][m] = _mm512_dpbusd_epi32(iacc[c0][m], lo, _mm512_set1_epi32(*(const int32_t *)a));
                    iacc[c1][m] = _mm512_dpbusd_epi32(iacc[c1][m], hi, _mm512_set1_epi32(*(const int32_t *)(a + 4)));
                }
            }
        } else {
            for (int k = k0; k < k0 + G; k += 4, step++) {
                _mm_prefetch((const char *)(wt + (long)(k / 4) * 64) + AHEAD, _MM_HINT_T0);
                __m512i b = _mm512_loadu_si512(wt + (long)(k / 4) * 64);
                const int c0 = step % C;
                for (int m = 0; m < M; m++) {
                    const int8_t *a = xq + (long)m * K + k;
                    iacc[c0][m] = _mm512_dpbusd_epi32(iacc[c0][m], b, _mm512_set1_epi32(*(const int32_t *)a));
                }
            }
        }
        const long sidx = ((long)t * groups + g) * 16;
        __m512 s, o;
        if (layout == SIX_BITS) {  /* Q6_K: s = d * sc (int8), o = -32 * s */
            const int8_t *sc = (const int8_t *)scale + sidx;
            s = _mm512_mul_ps(_mm512_loadu_ps(super + ((long)t * (K / 256) + g / 16) * 16),
                              _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)sc))));
            o = _mm512_mul_ps(s, _mm512_set1_ps(-zero_point));
        } else if (layout == NIBBLES_HALF) {
            s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)scale + sidx)));
            o = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)offset + sidx)));
        } else if (super) {  /* Q4_K: s = d * sc, o = (-dmin) * m, exact in float32 (17-bit products) */
            const float *sd = super + ((long)t * (K / 256) + g / 8) * 32;
            const uint8_t *sc = (const uint8_t *)scale + sidx, *mn = (const uint8_t *)offset + sidx;
            s = _mm512_mul_ps(_mm512_loadu_ps(sd), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sc))));
            o = _mm512_mul_ps(_mm512_loadu_ps(sd + 16), _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)mn))));
        } else {
            s = _mm512_loadu_ps(scale + sidx);
            o = offset ? _mm512_loadu_ps(offset + sidx) : _mm512_mul_ps(s, _mm512_set1_ps(-zero_point));
        }
        for (int m = 0; m < M; m++) {
            __m512i isum = iacc[0][m];
            for (int c = 1; c < C; c++) isum = _mm512_add_epi32(isum, iacc[c][m]);
            __m512 sd = _mm512_mul_ps(s, _mm512_set1_ps(dx[m * (K / 32) + k0 / 32]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), sd, acc[m]);
            acc[m] = _mm512_fmadd_ps(o, _mm512_set1_ps(sx[m * groups + g]), acc[m]);
        }
    }
    for (int m = 0; m < M; m++) _mm512_storeu_ps(y + (long)m * ldy + t * 16, acc[m]);
}

#elif defined(__AVX2__) && defined(__FMA__)

#include "avx2.h"

/* AVX2 + FMA. A 64-byte block of the layouts above is two 32-byte halves: rows 0-7 of the
 * tile, then rows 8-15. vpdpbusd is emulated by vpmaddubsw (u8 x s8, adjacent pairs summed
 * into int16, saturating) then vpmaddwd by ones (int16 pairs into int32). No int16 sum may
 * saturate, so the operands are kept small enough and the integer sums are exact (|xq| <= 128):
 *   nibbles (q <= 15): a pair is at most 2*15*128 = 3840, the 8 of a group 30720;
 *   six bits (q <= 63): a pair at most 16128, so two steps are summed in int16, not four;
 *   bytes up to 255 (Q8_0; a pair would reach 65280): each byte split into its nibbles,
 *       q = 16 * hi + lo, each summed as nibbles are, then 16 * sum(hi x) + sum(lo x);
 *   bytes with a zero point of at most 16 or 32 (Q5_0, Q6_K as bytes), which hold
 *       q < 2 * zero_point (qlinear.py checks): q itself, 4 or 2 steps summed in int16.
 * The float steps are the AVX512 code's, in the same order, except the sums of x per group
 * (pairwise here), so the two variants may differ in the last bits; each is batch-invariant. */

static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
}


static void quantize_rows(const float *x, int M, int K, int G, int8_t *xq, float *dx, float *sx) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int m = 0; m < M; m++) {
        const float *row = x + (long)m * K;
        for (int b = 0; b < K / 32; b++) {
            __m256 v0 = _mm256_loadu_ps(row + b * 32), v1 = _mm256_loadu_ps(row + b * 32 + 8);
            __m256 v2 = _mm256_loadu_ps(row + b * 32 + 16), v3 = _mm256_loadu_ps(row + b * 32 + 24);
            __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                     _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
            float amax = hmax8(a);
            float d = amax / 127.0f, id = amax > 0 ? 127.0f / amax : 0.0f;
            dx[m * (K / 32) + b] = d;
            __m256 vid = _mm256_set1_ps(id);
            __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vid)), q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vid));
            __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vid)), q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vid));
            /* saturating packs, as _mm512_cvtsepi32_epi8; in-lane, so dwords come out as
             * q0[0:4] q1[0:4] q2[0:4] q3[0:4] q0[4:8] q1[4:8] q2[4:8] q3[4:8] */
            __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
            _mm256_storeu_si256((__m256i *)(xq + (long)m * K + b * 32), _mm256_permutevar8x32_epi32(q, order));
            /* sums of x per group, pairwise in 8 lanes (the AVX512 code adds them one by one) */
            __m256 s01 = _mm256_add_ps(v0, v1), s23 = _mm256_add_ps(v2, v3);
            if (G == 32) {
                sx[m * (K / 32) + b] = hsum8(_mm256_add_ps(s01, s23));
            } else {
                sx[m * (K / 16) + 2 * b] = hsum8(s01);
                sx[m * (K / 16) + 2 * b + 1] = hsum8(s23);
            }
        }
    }
}

static inline __m256i bcast4(const int8_t *a) { return _mm256_broadcastd_epi32(_mm_loadu_si32(a)); }

#define INLINE static inline __attribute__((always_inline))

/* Weights are prefetched this many bytes ahead (a tile's later blocks, then the next tile's):
 * one core's own requests do not keep enough loads in flight to stream at its bandwidth
 * (Zen3, 1 thread, Q4_K 1536x8960 at 1 row: 0.43 -> 0.32 ms a call). */
#define AHEAD 4096

/* What a tile's rows share in one group g of G columns starting at k0. */
typedef struct {
    int K, G, g, k0, groups;
    const int8_t *xq;
    const float *dx, *sx;
    __m256 s[2], o[2]; /* the group's scales and offsets: rows 0-7, 8-15 of the tile */
} Group;

/* acc += cvt(isum) * (s * dx) + o * sx for row m, half h: the AVX512 code's float step. */
INLINE __m256 group_step(const Group *gr, int m, int h, __m256i isum, __m256 acc) {
    __m256 sd = _mm256_mul_ps(gr->s[h], _mm256_set1_ps(gr->dx[m * (gr->K / 32) + gr->k0 / 32]));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), sd, acc);
    return _mm256_fmadd_ps(gr->o[h], _mm256_set1_ps(gr->sx[m * gr->groups + gr->g]), acc);
}

/* Rows m0 .. m0 + R - 1 (R <= 4) of a nibble group (G = 32): their int16 sums, 2 a row, stay in
 * registers while each 8 k of the group's weights are loaded and unpacked once (the loop kept:
 * gcc unrolls it otherwise and spills the sums). */
INLINE void nibble_rows(const int R, const int m0, const Group *gr, const uint8_t *wt, __m256 (*acc)[2]) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256i s16[4][2];
    for (int r = 0; r < R; r++) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
    const uint8_t *blk = wt + (long)(gr->k0 / 8) * 64;
    const int8_t *a = gr->xq + (long)m0 * gr->K + gr->k0;
#pragma GCC unroll 1
    for (int step = 0; step < 4; step++, blk += 64, a += 8) {
        if (m0 == 0) _mm_prefetch((const char *)blk + AHEAD, _MM_HINT_T0);
        __m256i b0 = _mm256_loadu_si256((const __m256i *)blk), b1 = _mm256_loadu_si256((const __m256i *)(blk + 32));
        __m256i lo0 = _mm256_and_si256(b0, low), hi0 = _mm256_and_si256(_mm256_srli_epi16(b0, 4), low);
        __m256i lo1 = _mm256_and_si256(b1, low), hi1 = _mm256_and_si256(_mm256_srli_epi16(b1, 4), low);
        for (int r = 0; r < R; r++) {
            __m256i a0 = bcast4(a + (long)r * gr->K), a1 = bcast4(a + (long)r * gr->K + 4);
            s16[r][0] = _mm256_add_epi16(s16[r][0], _mm256_maddubs_epi16(lo0, a0));
            s16[r][1] = _mm256_add_epi16(s16[r][1], _mm256_maddubs_epi16(lo1, a0));
            s16[r][0] = _mm256_add_epi16(s16[r][0], _mm256_maddubs_epi16(hi0, a1));
            s16[r][1] = _mm256_add_epi16(s16[r][1], _mm256_maddubs_epi16(hi1, a1));
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) acc[m0 + r][h] = group_step(gr, m0 + r, h, _mm256_madd_epi16(s16[r][h], ones), acc[m0 + r][h]);
}

/* Rows m0 .. m0 + R - 1 (R <= 2) of a byte group, both halves of the tile per 4 k. span 0: q up
 * to 255 (Q8_0), each byte split into nibbles, q = 16 hi + lo, each summed as nibbles are (4 int16
 * sums a row); span 4 or 2: q < 32 or q < 64 (Q5_0, Q6_K), maddubs on q itself, span steps summed
 * in int16 (at most 2 * 31 * 128 * 4 or 2 * 63 * 128 * 2 = 32256), then widened. */
INLINE void byte_rows(const int R, const int m0, const int span, const Group *gr, const uint8_t *wt, __m256 (*acc)[2]) {
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
    __m256i slo[2][2], shi[2][2], isum[2][2];
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) slo[r][h] = shi[r][h] = isum[r][h] = _mm256_setzero_si256();
    const uint8_t *p = wt + (long)(gr->k0 / 4) * 64;
    const int8_t *a = gr->xq + (long)m0 * gr->K + gr->k0;
    if (span) {
#pragma GCC unroll 1
        for (int j0 = 0; j0 < gr->G / 4; j0 += span) {
            for (int j = 0; j < span; j++, p += 64, a += 4) {
                if (m0 == 0) _mm_prefetch((const char *)p + AHEAD, _MM_HINT_T0);
                __m256i b[2] = {_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 32))};
                for (int r = 0; r < R; r++) {
                    __m256i x = bcast4(a + (long)r * gr->K);
                    for (int h = 0; h < 2; h++) slo[r][h] = _mm256_add_epi16(slo[r][h], _mm256_maddubs_epi16(b[h], x));
                }
            }
            for (int r = 0; r < R; r++)
                for (int h = 0; h < 2; h++) {
                    isum[r][h] = _mm256_add_epi32(isum[r][h], _mm256_madd_epi16(slo[r][h], ones));
                    slo[r][h] = _mm256_setzero_si256();
                }
        }
    } else {
        for (int j = 0; j < gr->G / 4; j++, p += 64, a += 4) {
            if (m0 == 0) _mm_prefetch((const char *)p + AHEAD, _MM_HINT_T0);
            __m256i b[2] = {_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)(p + 32))};
            __m256i lo[2], hi[2];
            for (int h = 0; h < 2; h++) lo[h] = _mm256_and_si256(b[h], low), hi[h] = _mm256_and_si256(_mm256_srli_epi16(b[h], 4), low);
            for (int r = 0; r < R; r++) {
                __m256i x = bcast4(a + (long)r * gr->K);
                for (int h = 0; h < 2; h++) {
                    slo[r][h] = _mm256_add_epi16(slo[r][h], _mm256_maddubs_epi16(lo[h], x));
                    shi[r][h] = _mm256_add_epi16(shi[r][h], _mm256_maddubs_epi16(hi[h], x));
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int h = 0; h < 2; h++) {
            if (!span) isum[r][h] = _mm256_add_epi32(_mm256_madd_epi16(shi[r][h], sixteen), _mm256_madd_epi16(slo[r][h], ones));
            acc[m0 + r][h] = group_step(gr, m0 + r, h, isum[r][h], acc[m0 + r][h]);
        }
}

INLINE void byte_group(const int M, const int span, const Group *gr, const uint8_t *wt, __m256 (*acc)[2]) {
    for (int m0 = 0; m0 < M; m0 += 2) byte_rows(M - m0 < 2 ? M - m0 : 2, m0, span, gr, wt, acc);
}

/* A six-bit group (G = 16, one 192-byte block), every row: v[h][j] holds k0 + 4j .. k0 + 4j + 3
 * of rows 8h .. 8h + 7; each activation broadcast serves both halves. */
INLINE void six_bit_rows(const int M, const Group *gr, const uint8_t *wt, __m256 (*acc)[2]) {
    const __m256i low = _mm256_set1_epi8(0x0F), high = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
    __m256i v[2][4];
    for (int i = 0; i < 3; i++) _mm_prefetch((const char *)wt + (long)(gr->k0 / 16) * 192 + 64 * i + AHEAD, _MM_HINT_T0);
    for (int h = 0; h < 2; h++) {
        const uint8_t *blk = wt + (long)(gr->k0 / 16) * 192 + 32 * h;
        __m256i na = _mm256_loadu_si256((const __m256i *)blk), nb = _mm256_loadu_si256((const __m256i *)(blk + 64));
        __m256i hb = _mm256_loadu_si256((const __m256i *)(blk + 128));
        /* bits 2j, 2j+1 of hb to bits 4, 5 (16-bit shifts: the mask drops what crosses a byte) */
        v[h][0] = _mm256_or_si256(_mm256_and_si256(na, low), _mm256_and_si256(_mm256_slli_epi16(hb, 4), high));
        v[h][1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(na, 4), low), _mm256_and_si256(_mm256_slli_epi16(hb, 2), high));
        v[h][2] = _mm256_or_si256(_mm256_and_si256(nb, low), _mm256_and_si256(hb, high));
        v[h][3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(nb, 4), low), _mm256_and_si256(_mm256_srli_epi16(hb, 2), high));
    }
    for (int m = 0; m < M; m++) {
        const int8_t *a = gr->xq + (long)m * gr->K + gr->k0;
        __m256i p[2][2]; /* [half][steps 0-1, 2-3]: two steps summed in int16 (at most 2 * 16128) */
        for (int j = 0; j < 4; j++) {
            __m256i x = bcast4(a + 4 * j);
            for (int h = 0; h < 2; h++) {
                __m256i d = _mm256_maddubs_epi16(v[h][j], x);
                p[h][j / 2] = j % 2 ? _mm256_add_epi16(p[h][j / 2], d) : d;
            }
        }
        for (int h = 0; h < 2; h++)
            acc[m][h] = group_step(gr, m, h, _mm256_add_epi32(_mm256_madd_epi16(p[h][0], ones), _mm256_madd_epi16(p[h][1], ones)), acc[m][h]);
    }
}

static inline __attribute__((always_inline)) void tile(
    const int M, const int layout, const int G, int t, int K, const uint8_t *w, const float *scale,
    const float *offset, float zero_point, const float *super, const int8_t *xq, const float *dx, const float *sx,
    float *y, int ldy) {
    /* nibbles: rows in at most two chunks of at most 4 (5 = 3 + 2), each with its sums in registers */
    const int first = M <= 4 ? M : (M + 1) / 2;
    /* bytes with one zero point hold q < 2 * zero_point (Q5_0: 16, Q6_K: 32, Q8_0: 128; qlinear.py
     * checks): steps summed in int16 before they are widened (0: split into nibbles) */
    const int span = layout != BYTES || offset || !(zero_point >= 1.0f) ? 0 : zero_point <= 16.0f ? 4 : zero_point <= 32.0f ? 2 : 0;
    __m256 acc[MMAX][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    const uint8_t *wt = w + (long)t * 16 * K * WEIGHT_BYTES4(layout) / 4;
    Group gr = {K, G, 0, 0, K / G, xq, dx, sx, {}, {}};
    for (int g = 0; g < K / G; g++) {
        gr.g = g, gr.k0 = g * G;
        const long sidx = ((long)t * gr.groups + g) * 16;
        if (layout == BYTES) _mm_prefetch((const char *)(scale + sidx) + AHEAD / 8, _MM_HINT_T0); /* 64 bytes a group */
        for (int h = 0; h < 2; h++) {
            if (layout == SIX_BITS) { /* Q6_K: s = d * sc (int8), o = -32 * s */
                const int8_t *sc = (const int8_t *)scale + sidx + 8 * h;
                gr.s[h] = _mm256_mul_ps(_mm256_loadu_ps(super + ((long)t * (K / 256) + g / 16) * 16 + 8 * h),
                                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)sc))));
                gr.o[h] = _mm256_mul_ps(gr.s[h], _mm256_set1_ps(-zero_point));
            } else if (layout == NIBBLES_HALF) {
                gr.s[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)scale + sidx + 8 * h)));
                gr.o[h] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)offset + sidx + 8 * h)));
            } else if (super) { /* Q4_K: s = d * sc, o = (-dmin) * m */
                const float *sd = super + ((long)t * (K / 256) + g / 8) * 32 + 8 * h;
                const uint8_t *sc = (const uint8_t *)scale + sidx + 8 * h, *mn = (const uint8_t *)offset + sidx + 8 * h;
                gr.s[h] = _mm256_mul_ps(_mm256_loadu_ps(sd), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc))));
                gr.o[h] = _mm256_mul_ps(_mm256_loadu_ps(sd + 16), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)mn))));
            } else {
                gr.s[h] = _mm256_loadu_ps(scale + sidx + 8 * h);
                gr.o[h] = offset ? _mm256_loadu_ps(offset + sidx + 8 * h) : _mm256_mul_ps(gr.s[h], _mm256_set1_ps(-zero_point));
            }
        }
        if (layout == SIX_BITS) {
            six_bit_rows(M, &gr, wt, acc);
        } else if (NIBBLED(layout)) {
            nibble_rows(first, 0, &gr, wt, acc);
            if (M > first) nibble_rows(M - first, first, &gr, wt, acc);
        } else {
            if (span == 4) byte_group(M, 4, &gr, wt, acc);
            else if (span == 2) byte_group(M, 2, &gr, wt, acc);
            else byte_group(M, 0, &gr, wt, acc);
        }
    }
    for (int m = 0; m < M; m++) {
        _mm256_storeu_ps(y + (long)m * ldy + t * 16, acc[m][0]);
        _mm256_storeu_ps(y + (long)m * ldy + t * 16 + 8, acc[m][1]);
    }
}

#else
#error "qgemm.c needs AVX512-VNNI (+BW) or AVX2 + FMA: see VARIANTS in qlinear.py"
#endif

/* The tiles are split as a static schedule splits them, one contiguous share per thread, each
 * streamed from its front; a thread done with its share then takes the tiles left in the others'
 * from their back, one at a time, so no thread waits at the end for a slower one. A share is
 * [lo, hi) in one 64-bit word, changed by compare-and-swap. Which thread computes a tile does
 * not change its sums. Why: with the static split alone, one of two threads sat idle at the end
 * of a call for ~12% of the real target's qgemm time (rdtsc at each thread's end: 3.4 + 1.8 ms
 * of a 1-token pass; noise from the machine, not uneven work), and a dynamic schedule (chunks of
 * 4 tiles) was 10% slower than static: it breaks each thread's contiguous stream. Measured with
 * the layers in one call (same process, builds alternated, 2 threads, 200 positions): the
 * target's 1-token pass 43.0 -> 41.3 and 43.5 -> 40.4 ms, its 4-token pass 81.9 -> 76.3 ms;
 * the draft's 1-token pass 12.2 -> 12.1 (noise). */
#define MAX_SHARES 64
#define FRONT_TILES 2 /* tiles a thread takes at once from its own share */
typedef struct {
    _Alignas(64) int64_t span; /* lo | (int64_t)hi << 32 */
} Share;

/* Up to n tiles from the front of s (front), or one from its back: the first, with their count
 * in *got; -1 once s is empty. */
static inline int take(Share *s, int front, int n, int *got) {
    int64_t old = __atomic_load_n(&s->span, __ATOMIC_RELAXED);
    for (;;) {
        const int lo = (int)(uint32_t)old, hi = (int)(old >> 32);
        if (lo >= hi) return -1;
        const int k = front ? (hi - lo < n ? hi - lo : n) : 1;
        const int64_t next = front ? ((int64_t)hi << 32) | (uint32_t)(lo + k) : ((int64_t)(hi - 1) << 32) | (uint32_t)lo;
        if (__atomic_compare_exchange_n(&s->span, &old, next, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED)) {
            *got = k;
            return front ? lo : hi - 1;
        }
    }
}

#define TILE(MV, LAYOUT, GV, t) tile(MV, LAYOUT, GV, t, K, w, scale, offset, zero_point, super, xq, dx, sx, y, ldy)
#define TILES(MV, LAYOUT, GV)                                                                          \
    {                                                                                                  \
    if (threads <= 1 || threads > MAX_SHARES || tiles < 2 * threads) {                                 \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1)")            \
        for (int t = 0; t < tiles; t++) TILE(MV, LAYOUT, GV, t);                                        \
    } else {                                                                                           \
        Share shares[MAX_SHARES];                                                                      \
        for (int i = 0; i < threads; i++)                                                              \
            shares[i].span = (long)tiles * i / threads | (int64_t)((long)tiles * (i + 1) / threads) << 32; \
        _Pragma("omp parallel num_threads(threads)")                                                  \
        {                                                                                              \
            const int me = omp_get_thread_num();                                                       \
            int got;                                                                                   \
            for (int t; (t = take(&shares[me], 1, FRONT_TILES, &got)) >= 0;)                          \
                for (int u = t; u < t + got; u++) TILE(MV, LAYOUT, GV, u);                              \
            for (int o = 1; o < threads; o++)                                                          \
                for (int t; (t = take(&shares[(me + o) % threads], 0, 1, &got)) >= 0;) TILE(MV, LAYOUT, GV, t); \
        }                                                                                              \
    }                                                                                                  \
    }

#define DISPATCH(MV)                                 \
    case MV:                                         \
        if (layout == NIBBLES) TILES(MV, NIBBLES, 32)        \
        else if (layout == NIBBLES_HALF) TILES(MV, NIBBLES_HALF, 32) \
        else if (layout == SIX_BITS) TILES(MV, SIX_BITS, 16) \
        else if (G == 16) TILES(MV, BYTES, 16)               \
        else TILES(MV, BYTES, 32)                            \
        break;

/* x: [M, K] float32 (M <= 8); y: [M, ldy] float32, ldy >= 16 * tiles; scratch: at least
 * M*K bytes + M*(K/16)*4*2 bytes. Returns 0, or -1 for arguments it does not take. */
/* layout: 0 bytes, 1 nibbles, 2 six bits, 3 nibbles with half scales (see above). */
int qgemm(const float *x, int M, int K, const uint8_t *w, int layout, int G, const float *scale,
          const float *offset, float zero_point, const float *super, int tiles, float *y, int ldy, void *scratch,
          int threads) {
    if (M < 1 || M > MMAX || K % 32 || (G != 16 && G != 32) || layout < 0 || layout > 3) return -1;
    if (NIBBLED(layout) && G != 32) return -1;
    if (layout == NIBBLES_HALF && (super || !offset)) return -1;
    if (layout == SIX_BITS && (G != 16 || !super || K % 256)) return -1;
    if (layout == NIBBLES && super && (K % 256 || !offset)) return -1;
    int8_t *xq = (int8_t *)scratch;
    float *dx = (float *)(xq + ((long)M * K + 63) / 64 * 64);
    float *sx = dx + M * (K / 32);
    quantize_rows(x, M, K, G, xq, dx, sx);
    switch (M) {
        DISPATCH(1)
        DISPATCH(2)
        DISPATCH(3)
        DISPATCH(4)
        DISPATCH(5)
        DISPATCH(6)
        DISPATCH(7)
        DISPATCH(8)
    }
    return 0;
}
