/* Small-batch matmul of float activations with GGUF-style quantized weights, AVX512-VNNI.
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
 *   or, for Q4_K (super != NULL): s = d * sc, o = -dmin * m with sc, m: [tiles][K/32][16] uint8
 *       (the block's 6-bit scales and mins, passed as `scale` and `offset`) and d, dmin:
 *       super [tiles][K/256][2][16] float32 (d, then -dmin): 0.09 bytes a weight instead of 0.25.
 *   or, for Q6_K (six bits): s = d * sc, o = -32 * s with sc: [tiles][K/16][16] int8 (passed as
 *       `scale`) and d: super [tiles][K/256][16] float32: 0.08 bytes a weight.
 * N is padded to a multiple of 16 (padding rows are zero); K is a multiple of 32.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MMAX 8

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

/* Integer dot products accumulate in CHAINS(M) independent registers per row (summed exactly
 * at the end of a group): with one row, a single accumulator would wait on vpdpbusd's latency
 * at every step. Float accumulation has one fixed order whatever M is (batch invariance). */
#define CHAINS(M) ((M) == 1 ? 4 : (M) == 2 ? 2 : 1)

enum { BYTES = 0, NIBBLES = 1, SIX_BITS = 2 };

static inline __attribute__((always_inline)) void tile(
    const int M, const int layout, const int G, int t, int K, const uint8_t *w, const float *scale,
    const float *offset, float zero_point, const float *super, const int8_t *xq, const float *dx, const float *sx,
    float *y, int ldy) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int groups = K / G;
    const int C = CHAINS(M);
    __m512 acc[MMAX];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    const uint8_t *wt = w + (long)t * 16 * K * (layout == NIBBLES ? 2 : layout == SIX_BITS ? 3 : 4) / 4;
    for (int g = 0; g < groups; g++) {
        __m512i iacc[4][MMAX];
        for (int c = 0; c < C; c++)
            for (int m = 0; m < M; m++) iacc[c][m] = _mm512_setzero_si512();
        const int k0 = g * G;
        int step = 0;
        if (layout == SIX_BITS) {  /* G == 16: one 192-byte block */
            const uint8_t *blk = wt + (long)(k0 / 16) * 192;
            const __m512i three = _mm512_set1_epi8(3);
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
        } else if (layout == NIBBLES) {
            for (int k = k0; k < k0 + G; k += 8, step += 2) {
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

#define TILES(MV, LAYOUT, GV)                                                                     \
    {                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1)")     \
        for (int t = 0; t < tiles; t++)                                                        \
            tile(MV, LAYOUT, GV, t, K, w, scale, offset, zero_point, super, xq, dx, sx, y, ldy);  \
    }

#define DISPATCH(MV)                                 \
    case MV:                                         \
        if (layout == NIBBLES) TILES(MV, NIBBLES, 32)        \
        else if (layout == SIX_BITS) TILES(MV, SIX_BITS, 16) \
        else if (G == 16) TILES(MV, BYTES, 16)               \
        else TILES(MV, BYTES, 32)                            \
        break;

/* x: [M, K] float32 (M <= 8); y: [M, ldy] float32, ldy >= 16 * tiles; scratch: at least
 * M*K bytes + M*(K/16)*4*2 bytes. Returns 0, or -1 for arguments it does not take. */
/* layout: 0 bytes, 1 nibbles, 2 six bits (see above). */
int qgemm(const float *x, int M, int K, const uint8_t *w, int layout, int G, const float *scale,
          const float *offset, float zero_point, const float *super, int tiles, float *y, int ldy, void *scratch,
          int threads) {
    if (M < 1 || M > MMAX || K % 32 || (G != 16 && G != 32) || layout < 0 || layout > 2) return -1;
    if (layout == NIBBLES && G != 32) return -1;
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
