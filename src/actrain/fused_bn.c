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

/* bf16 to fp32 is a 16-bit shift; with AVX-512 one widening load (GCC splits the generic
 * vector conversion into four instructions) */
static inline vf load_bf16(const uint16_t *p) {
#if defined(__AVX512F__)
    __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
#else
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
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
    vh h = to_bf16(f);
    return load_bf16((const uint16_t *)&h);
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
    return mask ? apply_mask(g, mask[(uint64_t)i / V]) : g;
}

/* One row's terms of reduce2's sums, added to a and s. */
static inline void add_row(int kind, const uint16_t *restrict x, const uint16_t *restrict dy,
                           const uint16_t *restrict dy2, const uint16_t *restrict mask,
                           uint16_t *restrict dz, int64_t i, vf shift, vf *a, vf *s) {
    vf d = load_bf16(x + i) - shift;
    if (kind == 0) {
        *a += d;
        *s += d * d;
    } else {
        vf g = masked_grad(dy, dy2, mask, i);
        if (dz) store_bf16(dz + i, g); /* exact: g is a bf16 value or 0 */
        *a += g;
        *s += g * d;
    }
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
                /* even and odd rows in two sets of sums: two chains of dependent adds */
                vf a = {0}, s = {0}, a1 = {0}, s1 = {0}, sh = vload(shift + c0);
                int64_t r = b * BLOCK;
                for (; r + 1 < end; r += 2) {
                    add_row(kind, x, dy, dy2, mask, dz, r * C + c0, sh, &a, &s);
                    add_row(kind, x, dy, dy2, mask, dz, (r + 1) * C + c0, sh, &a1, &s1);
                }
                if (r < end) add_row(kind, x, dy, dy2, mask, dz, r * C + c0, sh, &a, &s);
                a += a1;
                s += s1;
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

/* The elementwise kernels below run over the M x C matrix as one flat sequence of 16-channel
 * vectors with a running channel offset: a loop per row cost as many instructions as the
 * row's one or two vectors at 16 or 32 channels. Inside a parallel region, this thread's
 * share as element offsets [*begin, *end): whole rows, so that each share starts at channel 0.
 */
static inline void thread_share(int64_t M, int64_t C, int64_t *begin, int64_t *end) {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    *begin = M * t / nt * C;
    *end = M * (t + 1) / nt * C;
}

/* y = relu?(x * scale + shift + res?) per channel, and its mask (NULL without ReLU): the
 * second pass of the training-mode forward and the whole of the frozen one. */
static void normalise(const uint16_t *x, const uint16_t *res, int64_t M, int64_t C,
                      const float *scale, const float *shift, uint16_t *y, uint16_t *mask,
                      int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        int64_t c0 = 0, i0, i1;
        thread_share(M, C, &i0, &i1);
        for (int64_t i = i0; i < i1; i += V) {
            vf o = load_bf16(x + i) * vload(scale + c0) + vload(shift + c0);
            if (res) o += load_bf16(res + i);
            if (mask) {
                mask[(uint64_t)i / V] = pack_mask(o);
                o = relu_v(o);
            }
            store_bf16(y + i, o);
            c0 = c0 + V == C ? 0 : c0 + V;
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
#pragma omp parallel num_threads(nthreads)
    {
        int64_t c0 = 0, i0, i1;
        thread_share(M, C, &i0, &i1);
        for (int64_t i = i0; i < i1; i += V) {
            vf g = dz ? load_bf16(dz + i) : masked_grad(dy, dy2, mask, i);
            vf o = g * vload(k + c0) + load_bf16(x + i) * vload(p + c0) + vload(q + c0);
            if (dxa) o += load_bf16(dxa + i);
            store_bf16(dx + i, o);
            c0 = c0 + V == C ? 0 : c0 + V;
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
    for (int64_t i = 0; i < M * C; i += V) {
        vf o = load_bf16(x + i);
        if (res) o += load_bf16(res + i);
        mask[(uint64_t)i / V] = pack_mask(o);
        store_bf16(y + i, relu_v(o));
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
#pragma omp parallel num_threads(nthreads)
    {
        int64_t c0 = 0, i0, i1;
        thread_share(M, C, &i0, &i1);
        for (int64_t i = i0; i < i1; i += V) {
            vf o = masked_grad(dy, dy2, mask, i) * vload(scale + c0);
            if (dxa) o += load_bf16(dxa + i);
            store_bf16(dx + i, o);
            c0 = c0 + V == C ? 0 : c0 + V;
        }
    }
}

/* dst[c][r] = src[r][c] (fp32), in 16 x 16 blocks: the weight gradients come out of the AMX
 * kernels as [kh][kw][i][o] and a channels_last parameter is [o][kh][kw][i]; PyTorch's strided
 * copy took 2.1 ms for 256 channels and 16 ms for 512, one cache miss per element. */
void transpose_f32(const float *restrict src, float *restrict dst, int64_t rows, int64_t cols) {
    for (int64_t r0 = 0; r0 < rows; r0 += 16)
        for (int64_t c0 = 0; c0 < cols; c0 += 16) {
            int64_t r1 = r0 + 16 < rows ? r0 + 16 : rows, c1 = c0 + 16 < cols ? c0 + 16 : cols;
            for (int64_t c = c0; c < c1; c++)
                for (int64_t r = r0; r < r1; r++) dst[c * rows + r] = src[r * cols + c];
        }
}

/* ---- weight gradient of a 3x3, stride-1, padding-1 conv, 16 -> 16 channels, 32 wide ---------
 * oneDNN's bf16 weight gradients run at a third to a half of its forward FLOP rate at these
 * sizes (benchmarks/README.md); this one, on AMX tiles, takes about half of oneDNN's time and
 * accumulates in fp32. Per image: each input row (32 pixels x 16 channels) is transposed in
 * registers into xs[row][channel][1 + w] (zero-padded rows and columns), each output-gradient
 * row is interleaved in pixel pairs (the layout AMX wants for its second operand), and every
 * tap (kh, kw) is one tile product: dW_tap^T[i][o] += xs[h + kh][i][kw ..] . dy[h][..][o].
 * Six taps stay in tiles for the whole pass, the other three are swapped in per image. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BW__)
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Whether the OS lets this process use AMX tiles (asked on every call: it is cheap, and a
 * first call may come from any thread). */
static int amx_permitted(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

/* All eight tiles as 16 rows of 64 bytes, the one shape these kernels use. The barrier keeps
 * GCC from dropping the stores into cfg: it does not see LDTILECFG read them (inlined into a
 * caller, the configuration was loaded half-written and the CPU faulted). */
static void configure_tiles(void) {
    tile_config cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

/* Word index of a permutation that interleaves two 16-word halves (a[0], b[0], a[1], ...):
 * two pixels' 16 channels into channel pairs, the layout of AMX's second operand. */
static const uint16_t PAIRS[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                   8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

/* One transpose stage: within each group of g registers, pair j (registers 2j, 2j + 1)
 * gives out[j] (64-bit lanes picked by lo) and out[j + g / 2] (by hi). */
static void interleave_pairs(const __m512i *in, __m512i *out, int g, __m512i lo, __m512i hi) {
    for (int base = 0; base < 16; base += g)
        for (int j = 0; j < g / 2; j++) {
            __m512i a = in[base + 2 * j], b = in[base + 2 * j + 1];
            out[base + j] = _mm512_permutex2var_epi64(a, lo, b);
            out[base + j + g / 2] = _mm512_permutex2var_epi64(a, hi, b);
        }
}

/* 32 pixels x 16 channels (pixel rows `stride` elements apart) to v[c] = the 32 pixels of
 * channel c: pixel pairs as dwords, then a 16 x 16 dword transpose in four permute stages. */
static void transpose32x16(const uint16_t *x, int64_t stride, __m512i v[16]) {
    const __m512i pairs = _mm512_loadu_si512(PAIRS);
    __m512i d[16], e[16];
    for (int k = 0; k < 16; k++) {
        __m512i two = stride == 16
            ? _mm512_loadu_si512(x + 32 * k)
            : _mm512_inserti64x4(
                  _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(x + 2 * k * stride))),
                  _mm256_loadu_si256((const __m256i *)(x + (2 * k + 1) * stride)), 1);
        d[k] = _mm512_permutexvar_epi16(pairs, two);
    }
    const __m512i lo32 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi32 =
        _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int p = 0; p < 8; p++) {
        e[p] = _mm512_permutex2var_epi32(d[2 * p], lo32, d[2 * p + 1]);
        e[p + 8] = _mm512_permutex2var_epi32(d[2 * p], hi32, d[2 * p + 1]);
    }
    /* 64-bit, then 128-bit units of register pairs, within groups of 8, then 4 registers */
    interleave_pairs(e, d, 8, _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11),
                     _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15));
    interleave_pairs(d, e, 4, _mm512_setr_epi64(0, 1, 8, 9, 2, 3, 10, 11),
                     _mm512_setr_epi64(4, 5, 12, 13, 6, 7, 14, 15));
    for (int c = 0; c < 16; c += 2) { /* e[c]: channels c, c + 1 of pairs 0-7; e[c + 1]: 8-15 */
        v[c] = _mm512_shuffle_i64x2(e[c], e[c + 1], 0x44);
        v[c + 1] = _mm512_shuffle_i64x2(e[c], e[c + 1], 0xEE);
    }
}

/* x[w][i] (32 x 16) to xt[i * 34 + 1 + w] */
static void transpose_row(const uint16_t *x, uint16_t *xt) {
    __m512i v[16];
    transpose32x16(x, 16, v);
    for (int c = 0; c < 16; c++) _mm512_storeu_si512(xt + 34 * c + 1, v[c]);
}

/* The 16 cache lines of one 32-pixel row (16 channels, bf16) to ask the L2 for. */
static inline void prefetch_row(const uint16_t *row) {
    for (int j = 0; j < 16; j++) _mm_prefetch((const char *)(row + 32 * j), _MM_HINT_T1);
}

#define TAP(T, KH, KW)                                                  \
    _tile_loadd(0, xs + (size_t)(h + (KH)) * 16 * 34 + (KW), 68);       \
    _tile_dpbf16ps(T, 0, 1);

/* Images [n0, n1) into out[9][16 i][16 o] (fp32, overwritten). 0, or -1 (out of memory). */
static int wgrad_images(const uint16_t *x, const uint16_t *dy, int64_t n0, int64_t n1,
                        int64_t H, float *out) {
    const __m512i pairs = _mm512_loadu_si512(PAIRS);
    uint16_t *xs = calloc((size_t)(H + 2) * 16 * 34, sizeof(uint16_t));
    uint16_t *bb = aligned_alloc(64, (size_t)H * 1024);
    float *keep = aligned_alloc(64, 3 * 1024), *acc = aligned_alloc(64, 3 * 1024);
    int status = -1;
    if (!xs || !bb || !keep || !acc) goto done;
    memset(acc, 0, 3 * 1024);
    configure_tiles();
    _tile_zero(2); _tile_zero(3); _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t h = 0; h < H; h++) {
            const size_t row = (size_t)(n * H + h) * 32 * 16;
            transpose_row(x + row, xs + (size_t)(h + 1) * 16 * 34);
            for (int k = 0; k < 16; k++)
                _mm512_store_si512(bb + h * 512 + k * 32,
                                   _mm512_permutexvar_epi16(pairs, _mm512_loadu_si512(dy + row + k * 32)));
        }
        /* The next image's rows requested while this one's tiles run: in a train pass x and
         * dy come back from memory, and the rewrite above was memory-bound, then the tiles
         * AMX-bound, one after the other (after a 256 MB write: 1.57 -> 1.20 ms per call at
         * batch 128, the same call back to back 1.03 -> 0.90). Done in the general kernel
         * below, the requests slowed its tiles by as much as they saved. */
        for (int64_t h = 0; h < H; h++) {
            if (n + 1 < n1) {
                prefetch_row(x + (size_t)((n + 1) * H + h) * 32 * 16);
                prefetch_row(dy + (size_t)((n + 1) * H + h) * 32 * 16);
            }
            _tile_loadd(1, bb + h * 512, 64);
            TAP(2, 0, 0) TAP(3, 0, 1) TAP(4, 0, 2) TAP(5, 1, 0) TAP(6, 1, 1) TAP(7, 1, 2)
        }
        _tile_stored(2, keep, 64); _tile_stored(3, keep + 256, 64); _tile_stored(4, keep + 512, 64);
        _tile_loadd(2, acc, 64); _tile_loadd(3, acc + 256, 64); _tile_loadd(4, acc + 512, 64);
        for (int64_t h = 0; h < H; h++) {
            _tile_loadd(1, bb + h * 512, 64);
            TAP(2, 2, 0) TAP(3, 2, 1) TAP(4, 2, 2)
        }
        _tile_stored(2, acc, 64); _tile_stored(3, acc + 256, 64); _tile_stored(4, acc + 512, 64);
        _tile_loadd(2, keep, 64); _tile_loadd(3, keep + 256, 64); _tile_loadd(4, keep + 512, 64);
    }
    _tile_stored(2, out, 64); _tile_stored(3, out + 256, 64); _tile_stored(4, out + 512, 64);
    _tile_stored(5, out + 768, 64); _tile_stored(6, out + 1024, 64); _tile_stored(7, out + 1280, 64);
    memcpy(out + 1536, acc, 3 * 1024);
    _tile_release();
    status = 0;
done:
    free(xs);
    free(bb);
    free(keep);
    free(acc);
    return status;
}

/* x, dy: N x H x 32 x 16 bf16 (channels_last); out: [kh * 3 + kw][i][o] fp32. Returns 0, or
 * -1 where the kernel cannot run (no AMX permission from the kernel, out of memory). */
int wgrad3x3_c16(const uint16_t *x, const uint16_t *dy, int64_t N, int64_t H, float *out,
                 int nthreads) {
    if (!amx_permitted()) return -1;
    if (nthreads > N) nthreads = (int)N;
    if (nthreads < 1) nthreads = 1;
    float *parts = calloc((size_t)nthreads * 2304, sizeof(float));
    if (!parts) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t n0 = N * t / nt, n1 = N * (t + 1) / nt;
        failed |= wgrad_images(x, dy, n0, n1, H, parts + (size_t)t * 2304) != 0;
    }
    for (int j = 0; j < 2304; j++) {
        float s = 0.f;
        for (int t = 0; t < nthreads; t++) s += parts[(size_t)t * 2304 + j];
        out[j] = s;
    }
    free(parts);
    return failed ? -1 : 0;
}

/* ---- weight gradient of a 3x3, padding-1 conv, stride 1 or 2, on AMX tiles ----------------
 * dW[kh][kw][i][o] = sum over output pixels p of x[p + tap offset][i] * dy[p][o]: a matrix
 * product whose reduction runs over pixels. The positions are laid out flat, row after row,
 * with one zero column after each row (the right padding of one row is the left padding of
 * the next) and one zero row after each image, so that a tap is a fixed offset into the flat
 * layout and a tile may run across rows and images. x goes to xt[plane][i][flat]
 * (channel-major, the tiles' first operand; for stride 2 its four row/column parities are four
 * planes of the output's size, and each tap reads one of them), dy to pixel pairs interleaved
 * per channel (the second operand), and each tap is sum_f xt[i][f] dy[f - offset][o], dy's
 * side a run of whole rows (see wgrad_chunks for odd offsets). Each thread rewrites
 * a group of images at a time into buffers that stay in its L2 cache, so x and dy are read
 * from memory once, as a plain convolution backward reads them; a whole-batch rewrite written
 * back to memory and read again cost more than the kernel saved. The 16-channel kernel above
 * stays the faster one for its shape. */

typedef struct {
    int64_t N, Ho, Wo, P, chunks, L, D0, R, Ci, Co;
    int stride;
} wg_geom;

static inline int64_t flat_pos(const wg_geom *g, int64_t n, int64_t h, int64_t w) {
    return (n * (g->Ho + 1) + h + 1) * g->P + w;
}

/* lanes [lane0, lane0 + len) of v to dst[0 .. len) */
static inline void store_lanes(uint16_t *dst, __m512i v, int lane0, int len) {
    __mmask32 m = (__mmask32)((len == 32 ? 0xFFFFFFFFu : ((1u << len) - 1u)) << lane0);
    _mm512_mask_storeu_epi16(dst - lane0, m, v);
}

/* x (N x H x W x Ci, bf16) into the planes; W divides 32 or 32 divides W. */
static void fill_xt(const uint16_t *x, const wg_geom *g, int64_t H, int64_t W, uint16_t *xt) {
    const int64_t blocks = g->N * H * W / 32, Ci = g->Ci;
    const int seg = W < 32 ? (int)W : 32;
    uint16_t ix[32];
    for (int j = 0; j < 32; j++) { /* stride 2: each segment's even pixels, then its odd */
        int s = j / seg, r = j % seg, half = seg / 2;
        ix[j] = (uint16_t)(s * seg + (r < half ? 2 * r : 2 * (r - half) + 1));
    }
    const __m512i split = _mm512_loadu_si512(ix);
    for (int64_t b = 0; b < blocks; b++) {
        __m512i v[16];
        for (int64_t ib = 0; ib < Ci; ib += 16) {
            transpose32x16(x + b * 32 * Ci + ib, Ci, v);
            if (g->stride == 2)
                for (int c = 0; c < 16; c++) v[c] = _mm512_permutexvar_epi16(split, v[c]);
            for (int s = 0; s < 32 / seg; s++) {
                int64_t p = b * 32 + s * seg; /* first pixel of the segment */
                int64_t w0 = p % W, h = (p / W) % H, n = p / (W * H);
                for (int c = 0; c < 16; c++) {
                    if (g->stride == 1) {
                        uint16_t *dst = xt + (ib + c) * g->L + flat_pos(g, n, h, w0);
                        store_lanes(dst, v[c], s * seg, seg);
                    } else {
                        int64_t pl = (h & 1) * 2;
                        int64_t f = flat_pos(g, n, h >> 1, w0 >> 1);
                        uint16_t *e = xt + (pl * Ci + ib + c) * g->L + f;
                        uint16_t *o = xt + ((pl + 1) * Ci + ib + c) * g->L + f;
                        store_lanes(e, v[c], s * seg, seg / 2);
                        store_lanes(o, v[c], s * seg + seg / 2, seg / 2);
                    }
                }
            }
        }
    }
}

/* dy (N x Ho x Wo x Co) into dyv[ob][row][32]: pixel pairs interleaved per channel, row j
 * holding positions 2j - D0 and 2j + 1 - D0. */
static void fill_dyv(const uint16_t *dy, const wg_geom *g, uint16_t *dyv) {
    const __m512i pairs = _mm512_loadu_si512(PAIRS);
    const int64_t Co = g->Co, Wo = g->Wo, NB = Co / 16;
    for (int64_t row = 0; row < g->N * g->Ho; row++) {
        int64_t n = row / g->Ho, h = row % g->Ho, u0 = flat_pos(g, n, h, 0) + g->D0;
        const uint16_t *src = dy + row * Wo * Co;
        for (int64_t j = u0 >> 1; j <= (u0 + Wo - 1) >> 1; j++) {
            int64_t a = 2 * j - u0, b = a + 1; /* pixels of the pair within the row */
            for (int64_t ob = 0; ob < NB; ob++) {
                __m256i lo = a >= 0 ? _mm256_loadu_si256((const __m256i *)(src + a * Co + ob * 16))
                                    : _mm256_setzero_si256();
                __m256i hi = b < Wo ? _mm256_loadu_si256((const __m256i *)(src + b * Co + ob * 16))
                                    : _mm256_setzero_si256();
                __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                _mm512_storeu_si512(dyv + (ob * g->R + j) * 32, _mm512_permutexvar_epi16(pairs, v));
            }
        }
    }
}

/* tap t = kh * 3 + kw: its plane and offset in the flat layout */
static void tap_source(const wg_geom *g, int t, int64_t *plane, int64_t *offset) {
    int kh = t / 3, kw = t % 3;
    if (g->stride == 1) {
        *plane = 0;
        *offset = (kh - 1) * g->P + (kw - 1);
    } else { /* input row 2h + kh - 1: kh 1 -> even rows, h; kh 0 -> odd, h - 1; kh 2 -> odd, h */
        *plane = (kh != 1) * 2 + (kw != 1);
        *offset = -(kh == 0) * g->P - (kw == 0);
    }
}

/* Chunks of 32 positions per block of the reduction: a block's second operands (two 16-channel
 * blocks of dy) and one input-channel block of x's rows stay in L1 while the nine taps of that
 * block run over them (consecutive a share the channel block); longer blocks spill L1. */
#define KB 8

/* chunks [c0, c1) into acc[tap][i][o] (fp32; accumulated, or overwritten where `fresh`):
 * C[tap][i][o] += xt[plane(tap)][i][f] . dy[f - offset(tap)][o] over the chunks' positions f,
 * so that x's tiles are shared by the taps that read one plane and each tap's dy tile is a run
 * of whole rows of dyv; where that run would start mid-pair (an odd offset), both sides move
 * one position: x's tile starts at f + 1, dy's at the pair boundary. */
static void wgrad_chunks(const wg_geom *g, const uint16_t *xt, const uint16_t *dyv, int64_t c0,
                         int64_t c1, float *acc, int fresh) {
    const int64_t NI = g->Ci / 16, NB = g->Co / 16, planes = g->stride == 1 ? 1 : 4;
    const int64_t astride = g->L * 2, cstride = g->Co * 4;
    int64_t plane_of[9], dy_row[9], x_shift[9];
    for (int t = 0; t < 9; t++) {
        int64_t off;
        tap_source(g, t, &plane_of[t], &off);
        x_shift[t] = (g->D0 - off) & 1;
        dy_row[t] = (g->D0 - off + x_shift[t]) / 2;
    }
    for (int64_t k0 = c0; k0 < c1; k0 += KB) {
        int64_t k1 = k0 + KB < c1 ? k0 + KB : c1;
        int zero = fresh && k0 == c0;
        for (int64_t part = 0; part < 2 * planes; part++) { /* taps of one plane and shift */
            int64_t pl = part / 2, shift = part % 2;
            int taps[9], nt = 0;
            for (int t = 0; t < 9; t++)
                if (plane_of[t] == pl && x_shift[t] == shift) taps[nt++] = t;
            const int64_t nbi = nt * NB; /* (ob, tap) pairs, ob-major: neighbours share dy */
            for (int64_t ib = 0; ib < NI && nt; ib += 2) {
                int two_a = ib + 1 < NI;
                const uint16_t *a0 = xt + (pl * g->Ci + ib * 16) * g->L + shift;
                const uint16_t *a1 = a0 + 16 * g->L;
                for (int64_t bi = 0; bi < nbi; bi += 2) {
                    int two_b = bi + 1 < nbi;
                    int64_t ob0 = bi / nt, t0 = taps[bi % nt];
                    int64_t ob1 = two_b ? (bi + 1) / nt : ob0, t1 = two_b ? taps[(bi + 1) % nt] : t0;
                    const uint16_t *b0 = dyv + (dy_row[t0] + ob0 * g->R) * 32;
                    const uint16_t *b1 = dyv + (dy_row[t1] + ob1 * g->R) * 32;
                    float *c00 = acc + (t0 * g->Ci + ib * 16) * g->Co + ob0 * 16;
                    float *c01 = acc + (t1 * g->Ci + ib * 16) * g->Co + ob1 * 16;
                    float *c10 = c00 + 16 * g->Co, *c11 = c01 + 16 * g->Co;
                    if (zero) {
                        _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
                    } else {
                        _tile_loadd(4, c00, cstride);
                        if (two_b) _tile_loadd(5, c01, cstride);
                        if (two_a) _tile_loadd(6, c10, cstride);
                        if (two_a && two_b) _tile_loadd(7, c11, cstride);
                    }
                    /* tile numbers must be constants: one loop per block shape */
#define A0 _tile_loadd(0, a0 + k * 32, astride);
#define A1 _tile_loadd(1, a1 + k * 32, astride);
#define B0 _tile_loadd(2, b0 + k * 512, 64);
#define B1 _tile_loadd(3, b1 + k * 512, 64);
#define CHUNKS(BODY) for (int64_t k = k0; k < k1; k++) { BODY }
                    if (two_a && two_b)
                        CHUNKS(A0 B0 _tile_dpbf16ps(4, 0, 2); B1 _tile_dpbf16ps(5, 0, 3);
                               A1 _tile_dpbf16ps(6, 1, 2); _tile_dpbf16ps(7, 1, 3);)
                    else if (two_a)
                        CHUNKS(B0 A0 _tile_dpbf16ps(4, 0, 2); A1 _tile_dpbf16ps(6, 1, 2);)
                    else if (two_b)
                        CHUNKS(A0 B0 _tile_dpbf16ps(4, 0, 2); B1 _tile_dpbf16ps(5, 0, 3);)
                    else
                        CHUNKS(A0 B0 _tile_dpbf16ps(4, 0, 2);)
#undef CHUNKS
#undef B1
#undef B0
#undef A1
#undef A0
                    _tile_stored(4, c00, cstride);
                    if (two_b) _tile_stored(5, c01, cstride);
                    if (two_a) _tile_stored(6, c10, cstride);
                    if (two_a && two_b) _tile_stored(7, c11, cstride);
                }
            }
        }
    }
}

/* The flat layout of images [0, N) (see above) */
static wg_geom geometry(int64_t N, int64_t H, int64_t W, int64_t Ci, int64_t Co, int stride) {
    wg_geom g = {N, (H - 1) / stride + 1, (W - 1) / stride + 1, 0, 0, 0, 0, 0, Ci, Co, stride};
    g.P = g.Wo + 1;
    g.chunks = ((N * (g.Ho + 1) + 1) * g.P + 31) / 32;
    g.L = ((g.chunks + 1) | 1) * 32; /* odd 64-byte lines (a tile's rows in 16 cache sets), */
                                      /* with room for the last tile read one position on */
    g.D0 = (g.P + 2) & ~(int64_t)1; /* dy's margin: taps shift by up to P + 1 positions */
    g.R = (g.D0 + g.chunks * 32 + g.D0) / 2 + 1;
    return g;
}

/* Each thread keeps the rewrite buffers of the last shapes it saw: data lands on the same
 * places for every group of one shape, so their padding is zeroed once, not on every call.
 * A ResNet-18 takes 12 shapes (a conv's full groups and its last one differ); with room for 8
 * they were dropped and zeroed again on every pass, 4-6 ms of a 85 ms width-16 train pass. */
#define WG_CACHED 32
typedef struct {
    int64_t key[6];
    uint16_t *xt, *dyv;
} wg_buffers;
static __thread wg_buffers wg_cache[WG_CACHED];
static __thread int wg_oldest;

static wg_buffers *buffers_for(const wg_geom *g) {
    const int64_t key[6] = {g->N, g->Ho, g->Wo, g->Ci, g->Co, g->stride};
    for (int j = 0; j < WG_CACHED; j++)
        if (wg_cache[j].xt && !memcmp(wg_cache[j].key, key, sizeof key)) return &wg_cache[j];
    wg_buffers *b = &wg_cache[wg_oldest];
    wg_oldest = (wg_oldest + 1) % WG_CACHED;
    free(b->xt);
    free(b->dyv);
    size_t xt_bytes = (size_t)((g->stride == 1 ? 1 : 4) * g->Ci * g->L) * 2;
    size_t dyv_bytes = (size_t)(g->Co / 16 * g->R * 32) * 2;
    b->xt = aligned_alloc(64, xt_bytes);
    b->dyv = aligned_alloc(64, dyv_bytes);
    if (!b->xt || !b->dyv) {
        free(b->xt);
        free(b->dyv);
        b->xt = b->dyv = NULL;
        return NULL;
    }
    memset(b->xt, 0, xt_bytes);
    memset(b->dyv, 0, dyv_bytes);
    memcpy(b->key, key, sizeof key);
    return b;
}

/* Images [n0, n1) into acc (see wgrad_chunks), a group of G at a time. 0, or -1 (out of
 * memory). */
static int wgrad_images3x3(const uint16_t *x, const uint16_t *dy, int64_t n0, int64_t n1,
                           int64_t G, int64_t H, int64_t W, int64_t Ci, int64_t Co, int stride,
                           float *acc) {
    configure_tiles();
    int status = 0;
    for (int64_t n = n0; n < n1; n += G) {
        int64_t count = n + G < n1 ? G : n1 - n;
        wg_geom g = geometry(count, H, W, Ci, Co, stride);
        wg_buffers *b = buffers_for(&g);
        if (!b) {
            status = -1;
            break;
        }
        fill_xt(x + n * H * W * Ci, &g, H, W, b->xt);
        fill_dyv(dy + n * g.Ho * g.Wo * Co, &g, b->dyv);
        wgrad_chunks(&g, b->xt, b->dyv, 0, g.chunks, acc, n == n0);
    }
    _tile_release();
    return status;
}

/* x: N x H x W x Ci, dy: N x Ho x Wo x Co (bf16, channels_last), Ci and Co multiples of 16,
 * 32 divisible by W or W by 32, H * W a multiple of 32 or N even; out: [kh][kw][i][o] fp32.
 * Returns 0, or -1 where the kernel cannot run (no AMX permission, out of memory). */
int wgrad3x3(const uint16_t *x, const uint16_t *dy, int64_t N, int64_t H, int64_t W, int64_t Ci,
             int64_t Co, int stride, float *out, int nthreads) {
    if (!amx_permitted()) return -1;
    const int64_t Ho = (H - 1) / stride + 1, Wo = (W - 1) / stride + 1;
    const int64_t unit = (H * W) % 32 == 0 ? 1 : 2; /* images per 32-pixel transpose block */
    int64_t G = 2048 / ((Ho + 1) * (Wo + 1)); /* about 64 tile columns of the reduction */
    G = G < unit ? unit : G - G % unit;
    if (nthreads > N / unit) nthreads = (int)(N / unit);
    if (nthreads < 1) nthreads = 1;
    const int64_t size = 9 * Ci * Co;
    float *parts = nthreads > 1 ? malloc(sizeof(float) * size * (nthreads - 1)) : NULL;
    if (nthreads > 1 && !parts) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t units = N / unit, n0 = units * t / nt * unit, n1 = units * (t + 1) / nt * unit;
        float *acc = t == 0 ? out : parts + (size_t)(t - 1) * size; /* overwritten */
        failed |= wgrad_images3x3(x, dy, n0, n1, G, H, W, Ci, Co, stride, acc) != 0;
    }
    for (int t = 1; t < nthreads; t++) {
        const float *p = parts + (size_t)(t - 1) * size;
        for (int64_t j = 0; j < size; j++) out[j] += p[j];
    }
    free(parts);
    return failed ? -1 : 0;
}

#else
int wgrad3x3(const uint16_t *x, const uint16_t *dy, int64_t N, int64_t H, int64_t W, int64_t Ci,
             int64_t Co, int stride, float *out, int nthreads) {
    (void)x, (void)dy, (void)N, (void)H, (void)W, (void)Ci, (void)Co, (void)stride, (void)out;
    (void)nthreads;
    return -1;
}
int wgrad3x3_c16(const uint16_t *x, const uint16_t *dy, int64_t N, int64_t H, float *out,
                 int nthreads) {
    (void)x, (void)dy, (void)N, (void)H, (void)out, (void)nthreads;
    return -1;
}
#endif
