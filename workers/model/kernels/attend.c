/* Attention of a few query rows (a decode step, or a verification of up to 7 drafts) over a
 * static KV cache, AVX512F or AVX2 + FMA (as the library is built: see qlinear.py's VARIANTS).
 * Built into the same library as qgemm.c (see qlinear.py).
 *
 * Row t (position start + t) attends to the keys [0, start + t], causal, as a one-token pass at
 * that position would: every (row, kv head) is computed on its own, in one fixed order whatever
 * T and the thread count are, so a verification pass gives bit for bit what decode steps give
 * (batch invariance). Per (row, kv head h), for each of its G query heads:
 *     s_j = scale * q . k_j,  p_j = exp(s_j - max s) / sum_j exp(s_j - max s),  out = sum_j p_j v_j
 * in float32 (bf16 caches are widened exactly).
 *
 * q: [T, KV * G, D] float32 contiguous (query head h * G + g); k, v: the layer's cache,
 * position s of kv head h at (h * head_stride + s * D), float32 or bf16 (cache_bf16);
 * out: [T, KV * G * D] float32. D a multiple of 16, at most 256.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DMAX 256

#if defined(__AVX512F__)

static inline __m512 load16(const void *base, long i, int bf16) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)base + i);
}

/* exp(x) for x <= 0, ~1 ulp: 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, cephes' polynomial. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static void one_head(const float *q, int G, int D, const void *k, const void *v, int bf16, int L, float scale,
                     float *out, float *s) {
    const int C = D / 16;
    for (int j = 0; j < L; j++) { /* scores: s[g * L + j] */
        __m512 kj[DMAX / 16];
        for (int c = 0; c < C; c++) kj[c] = load16(k, (long)j * D + 16 * c, bf16);
        for (int g = 0; g < G; g++) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(q + g * D), kj[0]);
            for (int c = 1; c < C; c++) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + 16 * c), kj[c], acc);
            s[(long)g * L + j] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    for (int g = 0; g < G; g++) {
        float *sg = s + (long)g * L;
        float m = sg[0];
        for (int j = 1; j < L; j++) m = sg[j] > m ? sg[j] : m;
        __m512 vm = _mm512_set1_ps(m), total = _mm512_setzero_ps();
        int j = 0;
        for (; j + 16 <= L; j += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + j), vm));
            _mm512_storeu_ps(sg + j, e);
            total = _mm512_add_ps(total, e);
        }
        if (j < L) {
            __mmask16 tail = (__mmask16)((1u << (L - j)) - 1);
            __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sg + j), vm));
            e = _mm512_maskz_mov_ps(tail, e);
            _mm512_mask_storeu_ps(sg + j, tail, e);
            total = _mm512_add_ps(total, e);
        }
        __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(total));
        __m512 acc[DMAX / 16];
        for (int c = 0; c < C; c++) acc[c] = _mm512_setzero_ps();
        for (j = 0; j < L; j++) {
            __m512 p = _mm512_set1_ps(sg[j]);
            for (int c = 0; c < C; c++) acc[c] = _mm512_fmadd_ps(p, load16(v, (long)j * D + 16 * c, bf16), acc[c]);
        }
        for (int c = 0; c < C; c++) _mm512_storeu_ps(out + g * D + 16 * c, _mm512_mul_ps(acc[c], inv));
    }
}

#elif defined(__AVX2__) && defined(__FMA__)

#include "avx2.h"

static inline __m256 load8(const void *base, long i, int bf16) {
    if (bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)base + i);
}


/* Every chain of FMAs below is one of several independent ones (latency 4, two a cycle): the
 * scores two query heads and two halves of D at a time, the weighted values 8 or 2 registers of
 * D at a time over the positions. bf16 is a constant in each copy (no branch per load). */
static inline __attribute__((always_inline)) void head(const float *q, int G, int D, const void *k, const void *v,
                                                       const int bf16, int L, float scale, float *out, float *s) {
    const int C = D / 8; /* even: D is a multiple of 16 */
    for (int j = 0; j < L; j++) { /* scores: s[g * L + j] */
        __m256 kj[DMAX / 8];
        for (int c = 0; c < C; c++) kj[c] = load8(k, (long)j * D + 8 * c, bf16);
        for (int g = 0; g < G; g += 2) {
            const float *qa = q + g * D, *qb = q + (g + 1 < G ? g + 1 : g) * D;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
            for (int c = 0; c < C; c += 2) {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qa + 8 * c), kj[c], a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qa + 8 * c + 8), kj[c + 1], a1);
                b0 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + 8 * c), kj[c], b0);
                b1 = _mm256_fmadd_ps(_mm256_loadu_ps(qb + 8 * c + 8), kj[c + 1], b1);
            }
            s[(long)g * L + j] = hsum8(_mm256_add_ps(a0, a1)) * scale;
            if (g + 1 < G) s[(long)(g + 1) * L + j] = hsum8(_mm256_add_ps(b0, b1)) * scale;
        }
    }
    for (int g = 0; g < G; g++) {
        float *sg = s + (long)g * L;
        float m = sg[0];
        for (int j = 1; j < L; j++) m = sg[j] > m ? sg[j] : m;
        __m256 vm = _mm256_set1_ps(m), total = _mm256_setzero_ps();
        int j = 0;
        for (; j + 8 <= L; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), vm));
            _mm256_storeu_ps(sg + j, e);
            total = _mm256_add_ps(total, e);
        }
        if (j < L) {
            __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(L - j), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(sg + j, tail), vm));
            e = _mm256_and_ps(e, _mm256_castsi256_ps(tail));
            _mm256_maskstore_ps(sg + j, tail, e);
            total = _mm256_add_ps(total, e);
        }
        __m256 inv = _mm256_set1_ps(1.0f / hsum8(total));
        for (int c0 = 0; c0 < C;) { /* out[8 c0 ..] = sum_j p_j v_j, 8 registers (or 2) over every j */
            if (c0 + 8 <= C) {
                __m256 acc[8];
                for (int c = 0; c < 8; c++) acc[c] = _mm256_setzero_ps();
                for (j = 0; j < L; j++) {
                    __m256 p = _mm256_set1_ps(sg[j]);
                    for (int c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(p, load8(v, (long)j * D + 8 * (c0 + c), bf16), acc[c]);
                }
                for (int c = 0; c < 8; c++) _mm256_storeu_ps(out + g * D + 8 * (c0 + c), _mm256_mul_ps(acc[c], inv));
                c0 += 8;
            } else {
                __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
                for (j = 0; j < L; j++) {
                    __m256 p = _mm256_set1_ps(sg[j]);
                    acc0 = _mm256_fmadd_ps(p, load8(v, (long)j * D + 8 * c0, bf16), acc0);
                    acc1 = _mm256_fmadd_ps(p, load8(v, (long)j * D + 8 * c0 + 8, bf16), acc1);
                }
                _mm256_storeu_ps(out + g * D + 8 * c0, _mm256_mul_ps(acc0, inv));
                _mm256_storeu_ps(out + g * D + 8 * c0 + 8, _mm256_mul_ps(acc1, inv));
                c0 += 2;
            }
        }
    }
}

static void one_head(const float *q, int G, int D, const void *k, const void *v, int bf16, int L, float scale,
                     float *out, float *s) {
    if (bf16)
        head(q, G, D, k, v, 1, L, scale, out, s);
    else
        head(q, G, D, k, v, 0, L, scale, out, s);
}

#else
#error "attend.c needs AVX512F or AVX2 + FMA: see VARIANTS in qlinear.py"
#endif

/* kn, vn (may be NULL): the T new keys and values, in the cache's dtype, row t's kv head h at
 * t * ld_k + h * D (t * ld_v + h * D) elements; copied into the cache at start first (else the
 * caller wrote them). Returns 0, or -1 for arguments it does not take (then nothing was written). */
int attend_rows(const float *q, int T, int KV, int G, int D, const void *k, const void *v, int cache_bf16,
                long head_stride, int start, float scale, float *out, const void *kn, long ld_k, const void *vn,
                long ld_v, int threads) {
    if (T < 1 || KV < 1 || G < 1 || D % 16 || D > DMAX || start < 0) return -1;
    const int elem = cache_bf16 ? 2 : 4;
    if (kn && vn)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < KV; h++) {
                const long dst = ((long)h * head_stride + (long)(start + t) * D) * elem;
                memcpy((char *)k + dst, (const char *)kn + ((long)t * ld_k + (long)h * D) * elem, (size_t)D * elem);
                memcpy((char *)v + dst, (const char *)vn + ((long)t * ld_v + (long)h * D) * elem, (size_t)D * elem);
            }
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && T * KV > 1)
    for (int task = 0; task < T * KV; task++) {
        const int t = task / KV, h = task % KV, L = start + t + 1;
        float *s = malloc(sizeof(float) * (long)G * L);
        if (!s) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        const long off = (long)h * head_stride * elem;
        one_head(q + ((long)t * KV + h) * G * D, G, D, (const char *)k + off, (const char *)v + off, cache_bf16, L, scale,
                 out + ((long)t * KV + h) * G * D, s);
        free(s);
    }
    return failed ? -1 : 0;
}

/* A batched pass's attention in one call: nseg segments (requests), segment i with T[i] rows
 * (decode steps and verifications; prefill chunks from layers.c) at positions start[i].., over its own
 * cache (kcache[i], vcache[i]: this layer's [KV, S_i, D], head_stride[i] = S_i * D).
 * First each segment's new keys and values (kn, vn: [N, KV, D] in the cache's dtype, the
 * segments' rows one after another, N = sum T[i]) are copied into its cache at start[i]; then
 * every (row, kv head) is computed exactly as attend_rows computes it (one_head, the same L),
 * so each segment gets bit for bit what it gets alone. q: [N, KV * G, D] float32; out: [N,
 * KV * G * D] float32. Returns 0, or -1 for arguments it does not take. */
int attend_segments(const float *q, const void *kn, const void *vn, int nseg, const int *T, const int *start,
                    const int64_t *kcache, const int64_t *vcache, const int64_t *head_stride, int KV, int G, int D,
                    int cache_bf16, float scale, float *out, int threads) {
    if (nseg < 1 || KV < 1 || G < 1 || D % 16 || D > DMAX) return -1;
    const int elem = cache_bf16 ? 2 : 4;
    const long row_bytes = (long)D * elem;
    int N = 0;
    for (int i = 0; i < nseg; i++) {
        if (T[i] < 0 || start[i] < 0) return -1;
        N += T[i];
    }
    if (N == 0) return 0;
    int *seg_of = malloc(sizeof(int) * (long)N * 2); /* row -> segment, row -> its t */
    if (!seg_of) return -1;
    for (int i = 0, r = 0; i < nseg; i++)
        for (int t = 0; t < T[i]; t++, r++) seg_of[2 * r] = i, seg_of[2 * r + 1] = t;
    for (int r = 0; r < N; r++) {
        const int i = seg_of[2 * r], t = seg_of[2 * r + 1];
        for (int h = 0; h < KV; h++) {
            const long dst = ((long)h * head_stride[i] + (long)(start[i] + t) * D) * elem;
            const long src = ((long)r * KV + h) * row_bytes;
            memcpy((char *)(intptr_t)kcache[i] + dst, (const char *)kn + src, row_bytes);
            memcpy((char *)(intptr_t)vcache[i] + dst, (const char *)vn + src, row_bytes);
        }
    }
    int failed = 0;
    /* the tasks dealt out in turn: a prefill chunk's later rows attend to more keys (in blocks,
     * one thread took its last rows: 512 rows, 2 threads, 989 -> 948 ms for the whole pass) */
#pragma omp parallel for num_threads(threads) schedule(static, 1) if (threads > 1 && N * KV > 1)
    for (int task = 0; task < N * KV; task++) {
        const int r = task / KV, h = task % KV, i = seg_of[2 * r], t = seg_of[2 * r + 1], L = start[i] + t + 1;
        float *s = malloc(sizeof(float) * (long)G * L);
        if (!s) {
#pragma omp atomic write
            failed = 1;
            continue;
        }
        const long off = (long)h * head_stride[i] * elem;
        one_head(q + ((long)r * KV + h) * G * D, G, D, (const char *)(intptr_t)kcache[i] + off,
                 (const char *)(intptr_t)vcache[i] + off, cache_bf16, L, scale, out + ((long)r * KV + h) * G * D, s);
        free(s);
    }
    free(seg_of);
    return failed ? -1 : 0;
}
