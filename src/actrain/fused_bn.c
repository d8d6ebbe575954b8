/* Training-mode batch norm fused with the residual add and ReLU that follow it (issue 7).
 *
 * Tensors are bf16 in channels_last layout, i.e. M x C row-major matrices (M = N*H*W) with C a
 * multiple of 16 (one AVX-512 register of fp32). Statistics and gradients are accumulated in
 * fp32 over blocks of rows and in double across blocks and threads; every output element is
 * rounded to bf16 once. Built at run time by actrain/fused.py with the system's C compiler
 * (-O3 -march=native -fopenmp) and called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 64 /* rows per fp32 partial sum */
#define V 16     /* channels per chunk */

typedef float vf __attribute__((vector_size(V * 4)));
typedef uint32_t vu __attribute__((vector_size(V * 4)));
typedef int32_t vi __attribute__((vector_size(V * 4)));
typedef uint16_t vh __attribute__((vector_size(V * 2)));

static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even; NaN stays a (quiet) NaN. The bf16 bit patterns, in 32-bit lanes:
 * the portable conversion, for CPUs without AVX512-BF16. */
static inline vu bf16_bits(vf f) {
    vu u;
    memcpy(&u, &f, sizeof u);
    vu rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    vu nan = (vu)((u & 0x7FFFFFFFu) > 0x7F800000u);
    return (rounded & ~nan) | (((u >> 16) | 0x40u) & nan);
}

/* Where the CPU has it, one instruction (VCVTNEPS2BF16) instead of the dozen integer ops of
 * bf16_bits: the same rounding, except that it flushes fp32 denormals (|f| < 1.2e-38) to zero,
 * as oneDNN's bf16 kernels do. The kernels are memory-bound; this made them 10-20 % faster. */
static inline vh to_bf16(vf f) {
#if defined(__AVX512BF16__)
    __m512 m;
    memcpy(&m, &f, sizeof m);
    __m256bh b = _mm512_cvtneps_pbh(m);
    vh h;
    memcpy(&h, &b, sizeof h);
    return h;
#else
    return __builtin_convertvector(bf16_bits(f), vh);
#endif
}

static inline void store_bf16(uint16_t *p, vf f) {
    vh h = to_bf16(f);
    memcpy(p, &h, sizeof h);
}

/* f rounded to bf16 (and back to fp32), as a bf16 tensor op would leave it. */
static inline vf round_bf16(vf f) {
    vu u = __builtin_convertvector(to_bf16(f), vu) << 16;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline vf vload(const float *p) {
    vf v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* max(v, 0) that keeps NaN (as F.relu does), so a diverging run still shows a NaN loss. */
static inline vf relu_v(vf v) {
    vf zero = {0};
    vi keep = (v > zero) | (v != v);
    vu bits;
    memcpy(&bits, &v, sizeof bits);
    bits &= (vu)keep;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* The ReLU mask, one bit per element (lane j of a 16-channel chunk is bit j): the backward
 * reads it instead of the bf16 output, a sixteenth of the memory traffic. */
static inline uint16_t pack_mask(vf v) {
#if defined(__AVX512F__)
    __m512 m;
    memcpy(&m, &v, sizeof m);
    return (uint16_t)_mm512_cmp_ps_mask(m, _mm512_setzero_ps(), _CMP_GT_OQ);
#else
    uint16_t bits = 0;
    for (int j = 0; j < V; j++) bits |= (uint16_t)((v[j] > 0.f) << j);
    return bits;
#endif
}

static inline vf apply_mask(vf g, uint16_t bits) {
#if defined(__AVX512F__)
    __m512 m;
    memcpy(&m, &g, sizeof m);
    m = _mm512_maskz_mov_ps((__mmask16)bits, m);
    memcpy(&g, &m, sizeof g);
    return g;
#else
    for (int j = 0; j < V; j++)
        if (!((bits >> j) & 1)) g[j] = 0.f;
    return g;
#endif
}

/* The gradient below the ReLU: dy where the output was positive (all of dy without ReLU).
 * dy2, where given, is the gradient of the output's second use (a residual block's shortcut,
 * see fused.py): the two are summed and rounded to bf16 here, as autograd's bf16 sum of the
 * two would, which saves that sum its own pass over memory. */
static inline vf masked_grad(const uint16_t *dy, const uint16_t *dy2, const uint16_t *mask,
                             int64_t i) {
    vf g = load_bf16(dy + i);
    if (dy2) g = round_bf16(g + load_bf16(dy2 + i));
    return mask ? apply_mask(g, mask[i / V]) : g;
}

/* Two per-channel sums over all rows into double: kind 0 (statistics) sums d = x - shift
 * and d^2; kind 1 (backward) sums g = masked_grad and g * d, and writes g to dz if given. */
static int reduce2(int kind, const uint16_t *restrict x, const uint16_t *restrict dy,
                   const uint16_t *restrict dy2, const uint16_t *restrict mask,
                   uint16_t *restrict dz, int64_t M, int64_t C,
                   const float *restrict shift, double *restrict out_a, double *restrict out_b,
                   int nthreads) {
    int64_t nblocks = (M + BLOCK - 1) / BLOCK;
    double *acc = calloc((size_t)nthreads * 2 * C, sizeof(double));
    if (!acc) return -1;
#pragma omp parallel num_threads(nthreads)
    {
        double *sa = acc + (size_t)omp_get_thread_num() * 2 * C, *sb = sa + C;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < nblocks; b++) {
            int64_t end = (b + 1) * BLOCK < M ? (b + 1) * BLOCK : M;
            for (int64_t c0 = 0; c0 < C; c0 += V) {
                vf a = {0}, s = {0}, sh = vload(shift + c0);
                for (int64_t r = b * BLOCK; r < end; r++) {
                    int64_t i = r * C + c0;
                    vf d = load_bf16(x + i) - sh;
                    if (kind == 0) {
                        a += d;
                        s += d * d;
                    } else {
                        vf g = masked_grad(dy, dy2, mask, i);
                        if (dz) store_bf16(dz + i, g); /* exact: g is a bf16 value or 0 */
                        a += g;
                        s += g * d;
                    }
                }
                for (int j = 0; j < V; j++) {
                    sa[c0 + j] += a[j];
                    sb[c0 + j] += s[j];
                }
            }
        }
    }
    for (int64_t c = 0; c < C; c++) out_a[c] = out_b[c] = 0.0;
    for (int t = 0; t < nthreads; t++)
        for (int64_t c = 0; c < C; c++) {
            out_a[c] += acc[(size_t)t * 2 * C + c];
            out_b[c] += acc[(size_t)t * 2 * C + C + c];
        }
    free(acc);
    return 0;
}

/* y = relu?(x * scale + shift + res?) per channel, and its mask (NULL without ReLU): the
 * second pass of the training-mode forward and the whole of the frozen one. */
static void normalise(const uint16_t *x, const uint16_t *res, int64_t M, int64_t C,
                      const float *scale, const float *shift, uint16_t *y, uint16_t *mask,
                      int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t row = 0; row < M; row++) {
        for (int64_t c0 = 0; c0 < C; c0 += V) {
            int64_t i = row * C + c0;
            vf o = load_bf16(x + i) * vload(scale + c0) + vload(shift + c0);
            if (res) o += load_bf16(res + i);
            if (mask) {
                mask[i / V] = pack_mask(o);
                o = relu_v(o);
            }
            store_bf16(y + i, o);
        }
    }
}

/* Forward: batch statistics, running-statistics update, y = relu?(bn(x) + res?) and its
 * ReLU mask; save_mean / save_invstd receive what the backward needs. res may be NULL, mask
 * is NULL without ReLU. Returns 0, or -1 (out of memory). */
int bn_forward(const uint16_t *x, const uint16_t *res, int64_t M, int64_t C,
               const float *weight, const float *bias, float *running_mean,
               float *running_var, double momentum, double eps, uint16_t *y, uint16_t *mask,
               float *save_mean, float *save_invstd, int nthreads) {
    int status = -1;
    float *buf = calloc(3 * (size_t)C, sizeof(float));
    double *sums = malloc(sizeof(double) * 2 * C);
    if (!buf || !sums) goto done;
    float *shift = buf, *scale = buf + C, *offset = buf + 2 * C;
    for (int64_t c = 0; c < C; c++) {
        uint32_t u = (uint32_t)x[c] << 16;
        memcpy(shift + c, &u, 4); /* first row: a sample of each channel, against cancellation */
    }
    if (reduce2(0, x, NULL, NULL, NULL, NULL, M, C, shift, sums, sums + C, nthreads)) goto done;
    for (int64_t c = 0; c < C; c++) {
        double d = sums[c] / M;
        double var = sums[C + c] / M - d * d;
        if (var < 0) var = 0;
        double mean = shift[c] + d;
        double invstd = 1.0 / sqrt(var + eps);
        save_mean[c] = (float)mean;
        save_invstd[c] = (float)invstd;
        running_mean[c] = (float)((1 - momentum) * running_mean[c] + momentum * (float)mean);
        running_var[c] = (float)((1 - momentum) * running_var[c] +
                                 momentum * (float)(var * M / (M - 1)));
        scale[c] = (float)(weight[c] * invstd);
        offset[c] = (float)(bias[c] - mean * weight[c] * invstd);
    }
    normalise(x, res, M, C, scale, offset, y, mask, nthreads);
    status = 0;
done:
    free(buf);
    free(sums);
    return status;
}

/* Backward from dy (+ dy2, NULL if none) and the forward's mask (NULL without ReLU): the
 * masked gradient g to dz (the residual's gradient; NULL if there is none), the batch-norm
 * input gradient dx (+ dxa, the gradient of x's other use, NULL if none), dweight and dbias.
 * Returns 0, or -1 (out of memory). */
int bn_backward(const uint16_t *dy, const uint16_t *dy2, const uint16_t *mask,
                const uint16_t *x, int64_t M, int64_t C, const float *weight,
                const float *mean, const float *invstd, uint16_t *dz, uint16_t *dx,
                const uint16_t *dxa, float *dweight, float *dbias, int nthreads) {
    int status = -1;
    float *buf = calloc(3 * (size_t)C, sizeof(float));
    double *sums = malloc(sizeof(double) * 2 * C);
    if (!buf || !sums) goto done;
    if (reduce2(1, x, dy, dy2, mask, dz, M, C, mean, sums, sums + C, nthreads)) goto done;
    float *k = buf, *p = buf + C, *q = buf + 2 * C;
    for (int64_t c = 0; c < C; c++) {
        double is = invstd[c], kc = weight[c] * is;
        double total = sums[c], dot = sums[C + c];
        dweight[c] = (float)(dot * is);
        dbias[c] = (float)total;
        double pc = -kc * is * is * dot / M;
        k[c] = (float)kc;
        p[c] = (float)pc;
        q[c] = (float)(-kc * total / M - mean[c] * pc);
    }
    /* dx = k g + p x + q: g is read back from dz where it was written, else recomputed */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t row = 0; row < M; row++) {
        for (int64_t c0 = 0; c0 < C; c0 += V) {
            int64_t i = row * C + c0;
            vf g = dz ? load_bf16(dz + i) : masked_grad(dy, dy2, mask, i);
            vf o = g * vload(k + c0) + load_bf16(x + i) * vload(p + c0) + vload(q + c0);
            if (dxa) o += load_bf16(dxa + i);
            store_bf16(dx + i, o);
        }
    }
    status = 0;
done:
    free(buf);
    free(sums);
    return status;
}

/* The attack passes' BN-free blocks (batch norm folded into the convs): y = relu(x + res?)
 * and its mask, res may be NULL. */
void relu_forward(const uint16_t *x, const uint16_t *res, int64_t M, int64_t C, uint16_t *y,
                  uint16_t *mask, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t row = 0; row < M; row++) {
        for (int64_t c0 = 0; c0 < C; c0 += V) {
            int64_t i = row * C + c0;
            vf o = load_bf16(x + i);
            if (res) o += load_bf16(res + i);
            mask[i / V] = pack_mask(o);
            store_bf16(y + i, relu_v(o));
        }
    }
}

/* g = dy (+ dy2) where the forward output was positive: the gradient of x (and of res). */
void relu_backward(const uint16_t *dy, const uint16_t *dy2, const uint16_t *mask, int64_t n,
                   uint16_t *g, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i += V) store_bf16(g + i, masked_grad(dy, dy2, mask, i));
}

/* g = dy (+ dy2) where y, the output of a convolution with ReLU fused into it (oneDNN
 * post-op, see fused.py), is positive. */
void relu_backward_from_output(const uint16_t *dy, const uint16_t *dy2, const uint16_t *y,
                               int64_t n, uint16_t *g, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i += V) {
        vf grad = masked_grad(dy, dy2, NULL, i);
        store_bf16(g + i, apply_mask(grad, pack_mask(load_bf16(y + i))));
    }
}

/* Eval-mode batch norm that could not be folded into a conv (it follows a residual add, as in
 * pre-activation blocks), as the constant per-channel map of the attack passes:
 * y = relu?(x * scale + shift) and its mask (NULL without ReLU). */
void affine_forward(const uint16_t *x, int64_t M, int64_t C, const float *scale,
                    const float *shift, uint16_t *y, uint16_t *mask, int nthreads) {
    normalise(x, NULL, M, C, scale, shift, y, mask, nthreads);
}

/* dx = (dy + dy2) * scale where the output was positive (everywhere without ReLU), + dxa. */
void affine_backward(const uint16_t *dy, const uint16_t *dy2, const uint16_t *mask, int64_t M,
                     int64_t C, const float *scale, uint16_t *dx, const uint16_t *dxa,
                     int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t row = 0; row < M; row++) {
        for (int64_t c0 = 0; c0 < C; c0 += V) {
            int64_t i = row * C + c0;
            vf o = masked_grad(dy, dy2, mask, i) * vload(scale + c0);
            if (dxa) o += load_bf16(dxa + i);
            store_bf16(dx + i, o);
        }
    }
}
