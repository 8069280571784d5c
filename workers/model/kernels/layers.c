/* The decoder layers of a pass (decode steps, verifications and prefill chunks, of one sequence
 * or several) in one call: for each layer, RMSNorm, the fused q/k/v projection, RoPE,
 * attention over the KV cache (writing the new keys and values), the output projection and the
 * residual add, then RMSNorm, gate/up, the SiLU gate, the down projection and the residual add.
 *
 * Why: each of those steps is already a kernel of this library (qgemm.c, sgemm.c, attend.c,
 * elementwise.c), but called one by one from Python a layer costs ~0.4 ms of interpreter,
 * torch dispatch and ctypes work around them, ~12 ms of the real target's 60 ms decode step
 * on the 2-core AVX2 machine (its qgemm calls with their quantization of the rows ~42 ms).
 * This file calls the same kernels with the same arguments in the same order, and adds the
 * biases and residuals as torch adds them (one float32 add each), so its rows are bit for bit
 * those of the Python path for segments of up to 8 rows (workers/model/layers.py checks where it
 * applies and builds the plan below; tests/unit/test_fused_layers.py compares the two). A longer
 * segment (a prefill chunk) attends row by row too (attend.c), where the Python path runs one
 * masked pass: its rows are the same up to rounding, and bit for bit what it gets alone.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ROWS 8  /* rows of one qgemm call (its MMAX) */
#define MAX_PARTS 3 /* parts of a linear (layers.py's MAX_PARTS: q, k, v) */

int qgemm(const float *x, int M, int K, const uint8_t *w, int layout, int G, const float *scale, const float *offset,
          float zero_point, const float *super, int tiles, float *y, int ldy, void *scratch, int threads);
int sgemm(const float *x, int M, int K, const float *w, int N, const float *bias, float *y, int ldy, int threads);
int rms_norm(const float *x, int M, int K, long ldx, const float *w, float eps, float *out, long ldo, int threads);
int rope_rows(const float *x, int T, long ldx, int heads, int D, const float *cos, const float *sin, long ldcs,
              float *out);
int silu_mul(const float *gu, int M, int I, long ldg, float *out, long ldo, int threads);
int attend_segments(const float *q, const void *kn, const void *vn, int nseg, const int *T, const int *start,
                    const int64_t *kcache, const int64_t *vcache, const int64_t *head_stride, int KV, int G, int D,
                    int cache_bf16, float scale, float *out, int threads);

/* One kernel call of a linear: a qgemm weight (QLinear) or a float32 one (Float32Linear). */
typedef struct {
    const void *w;                       /* qgemm: packed weights; sgemm: [N, K] float32 */
    const float *scale, *offset, *super; /* qgemm's (see qgemm.c) */
    const float *bias;                   /* sgemm's bias, added by the kernel (else NULL) */
    float zero_point;                    /* qgemm */
    int sgemm;                           /* 1: w is float32, computed by sgemm */
    int layout, group, tiles;            /* qgemm */
    int n;                               /* sgemm: N */
    int col;                             /* the part's first output column */
} Part;

/* A linear: one part, or several side by side along the output (ConcatLinear). */
typedef struct {
    Part part[MAX_PARTS];
    int parts;
    int K;             /* in features */
    int width;         /* the output rows' stride: qgemm writes whole tiles of 16 columns */
    int out;           /* the output columns that count */
    const float *bias; /* [out], added after the kernels (qgemm linears), or NULL */
} Linear;

typedef struct {
    const float *attn_norm, *ffn_norm; /* RMSNorm weights [dim] */
    Linear wqkv, wo, w13, w2;
} Layer;

/* What every layer shares. */
typedef struct {
    int dim, heads, kv_heads, head_dim, hidden;
    float eps, scale;
    int max_width; /* the widest linear output row */
} Shape;

static int linear(const Linear *l, const float *x, int M, float *y, void *scratch, int threads) {
    for (int i = 0; i < l->parts; i++) {
        const Part *p = &l->part[i];
        if (p->sgemm) {
            if (sgemm(x, M, l->K, (const float *)p->w, p->n, p->bias, y + p->col, l->width, threads)) return -1;
            continue;
        }
        for (int m0 = 0; m0 < M; m0 += MAX_ROWS) /* qgemm takes up to MAX_ROWS rows a call */
            if (qgemm(x + (long)m0 * l->K, M - m0 < MAX_ROWS ? M - m0 : MAX_ROWS, l->K, (const uint8_t *)p->w,
                      p->layout, p->group, p->scale, p->offset, p->zero_point, p->super, p->tiles,
                      y + (long)m0 * l->width + p->col, l->width, scratch, threads))
                return -1;
    }
    if (l->bias)
        for (int m = 0; m < M; m++)
            for (int n = 0; n < l->out; n++) y[(long)m * l->width + n] += l->bias[n];
    return 0;
}

/* h[m, :dim] += y[m, :dim] (y rows ld apart): the residual add. */
static void add_rows(float *h, int M, int dim, const float *y, int ld) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < dim; n++) h[(long)m * dim + n] += y[(long)m * ld + n];
}

/* A pass of nseg sequences (segments), segment j with T[j] new rows at positions start[j]..
 * over its own float32 cache: k[j], v[j] its keys and values [n_layers, kv_heads, S_j, head_dim]
 * (layer_stride[j] = kv_heads * S_j * head_dim, head_stride[j] = S_j * head_dim floats), where
 * the new keys and values are written at start[j]. h: [N, dim] float32, N = sum T[j], the
 * segments' rows one after another, updated in place through n_layers layers. cos, sin: the
 * RoPE tables [P, head_dim] (see model.rope_tables), P > start[j] + T[j]. scratch: N * (max(dim,
 * hidden) + max_width + (3 H + 3 KV) D) floats; qscratch: qgemm's for MAX_ROWS rows of the widest K.
 * Each segment's rows are bit for bit what a pass of that segment alone gives (every kernel
 * computes a row on its own). Returns 0, or -1 where a kernel refused its arguments (the layers
 * before it are then done: the caller's pass is lost). */
int decode_layers(const Layer *layers, int n_layers, const Shape *s, float *h, int nseg, const int *T,
                  const int *start, const int64_t *k, const int64_t *v, const int64_t *layer_stride,
                  const int64_t *head_stride, const float *cos, const float *sin, float *scratch, void *qscratch,
                  int threads) {
    const int H = s->heads, KV = s->kv_heads, D = s->head_dim;
    int N = 0;
    for (int j = 0; j < nseg; j++) {
        if (T[j] < 1 || start[j] < 0) return -1;
        N += T[j];
    }
    float *xn = scratch;                        /* [N, max(dim, hidden)]: normed rows, then the gate's output */
    float *y = xn + (long)N * (s->dim > s->hidden ? s->dim : s->hidden); /* [N, max_width] */
    float *qk = y + (long)N * s->max_width;     /* [N, H + KV, D] */
    float *q = qk + (long)N * (H + KV) * D;     /* [N, H, D] */
    float *kn = q + (long)N * H * D;            /* [N, KV, D] */
    float *vn = kn + (long)N * KV * D;          /* [N, KV, D] */
    float *att = vn + (long)N * KV * D;         /* [N, H * D] */
    int64_t *kl = malloc(sizeof(int64_t) * 2 * (nseg > 0 ? nseg : 1)), *vl = kl + nseg; /* this layer's caches */
    if (!kl) return -1;
    int rc = 0;
    for (int i = 0; i < n_layers && !rc; i++) {
        const Layer *l = &layers[i];
        for (int j = 0; j < nseg; j++) {
            kl[j] = k[j] + i * layer_stride[j] * (int64_t)sizeof(float);
            vl[j] = v[j] + i * layer_stride[j] * (int64_t)sizeof(float);
        }
        rc = rms_norm(h, N, s->dim, s->dim, l->attn_norm, s->eps, xn, s->dim, threads) ||
             linear(&l->wqkv, xn, N, y, qscratch, threads);
        for (int j = 0, r = 0; j < nseg && !rc; r += T[j], j++)
            rc = rope_rows(y + (long)r * l->wqkv.width, T[j], l->wqkv.width, H + KV, D, cos + (long)start[j] * D,
                           sin + (long)start[j] * D, D, qk + (long)r * (H + KV) * D);
        if (rc) break;
        for (int r = 0; r < N; r++) {
            memcpy(q + (long)r * H * D, qk + (long)r * (H + KV) * D, sizeof(float) * H * D);
            memcpy(kn + (long)r * KV * D, qk + ((long)r * (H + KV) + H) * D, sizeof(float) * KV * D);
            memcpy(vn + (long)r * KV * D, y + (long)r * l->wqkv.width + (H + KV) * D, sizeof(float) * KV * D);
        }
        rc = attend_segments(q, kn, vn, nseg, T, start, kl, vl, head_stride, KV, H / KV, D, 0, s->scale, att, threads) ||
             linear(&l->wo, att, N, y, qscratch, threads);
        if (rc) break;
        add_rows(h, N, s->dim, y, l->wo.width);
        rc = rms_norm(h, N, s->dim, s->dim, l->ffn_norm, s->eps, xn, s->dim, threads) ||
             linear(&l->w13, xn, N, y, qscratch, threads) ||
             silu_mul(y, N, s->hidden, l->w13.width, xn, s->hidden, threads) ||
             linear(&l->w2, xn, N, y, qscratch, threads);
        if (!rc) add_rows(h, N, s->dim, y, l->w2.width);
    }
    free(kl);
    return rc ? -1 : 0;
}
