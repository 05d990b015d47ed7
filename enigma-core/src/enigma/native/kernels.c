/* enigma's native CPU kernels (see __init__.py for how they are built and loaded).
 *
 * Portable C: the compiler vectorises the inner loops (`omp simd`) for the CPU
 * it compiles on, and OpenMP splits the work over torch's threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
static inline int omp_thread(void) { return omp_get_thread_num(); }
#else
static inline int omp_thread(void) { return 0; }
#endif

/* bfloat16 is the top half of a float32: widening is a shift; narrowing rounds to nearest even, as torch
 * does (a NaN stays a quiet NaN). */
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define LOAD_F32(p, i) ((p)[i])
#define LOAD_BF16(p, i) bf16_to_f32((p)[i])

/* The streaming matmul, for float32 weights and for bfloat16 ones widened as they are read.
 *
 * four_rows: four weight rows against the m rows of x, two rows of x at a time (each weight element
 * loaded serves two multiply-adds). linear: y[m, out] = x[m, in] @ w[out, in]^T (+ bias[out]); x, y
 * and bias float32, all contiguous. Few rows of x (decode) make this a stream over the weights, bound
 * by memory bandwidth: each thread walks one contiguous stretch of rows (a static schedule), so the
 * hardware prefetchers see one sequential read per thread. Short rows (a small model's, or a head over
 * a vocabulary at hidden 192) end before the hardware prefetcher has ramped up: the next four are
 * fetched ahead (measured, 32000x192 float32: 12 -> 17 GB/s; for rows of 768 floats and more it gains
 * nothing). A weight hot in L2 loses a quarter to the extra instructions, but in a model's step they
 * are not hot: enigma-tiny decodes 1.1-1.25x faster with it than without, interleaved in one process. */
#define DEFINE_ROWS(SUFFIX, WTYPE, LOAD)                                                                       \
static void four_rows_##SUFFIX(const float *x, int64_t m, int64_t in, const WTYPE *w, float *y, int64_t out) { \
    const WTYPE *w0 = w, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;                                         \
    int64_t t = 0;                                                                                            \
    for (; t + 2 <= m; t += 2) {                                                                              \
        const float *xa = x + t * in, *xb = xa + in;                                                          \
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;                                 \
        _Pragma("omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)")                                     \
        for (int64_t k = 0; k < in; k++) {                                                                    \
            float u = xa[k], v = xb[k];                                                                       \
            float p0 = LOAD(w0, k), p1 = LOAD(w1, k), p2 = LOAD(w2, k), p3 = LOAD(w3, k);                     \
            a0 += p0 * u; a1 += p1 * u; a2 += p2 * u; a3 += p3 * u;                                           \
            b0 += p0 * v; b1 += p1 * v; b2 += p2 * v; b3 += p3 * v;                                           \
        }                                                                                                     \
        float *ya = y + t * out, *yb = ya + out;                                                              \
        ya[0] = a0; ya[1] = a1; ya[2] = a2; ya[3] = a3;                                                       \
        yb[0] = b0; yb[1] = b1; yb[2] = b2; yb[3] = b3;                                                       \
    }                                                                                                         \
    for (; t < m; t++) {                                                                                      \
        const float *xt = x + t * in;                                                                         \
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;                                                                 \
        _Pragma("omp simd reduction(+ : a0, a1, a2, a3)")                                                     \
        for (int64_t k = 0; k < in; k++) {                                                                    \
            float v = xt[k];                                                                                  \
            a0 += LOAD(w0, k) * v; a1 += LOAD(w1, k) * v; a2 += LOAD(w2, k) * v; a3 += LOAD(w3, k) * v;       \
        }                                                                                                     \
        float *yt = y + t * out;                                                                              \
        yt[0] = a0; yt[1] = a1; yt[2] = a2; yt[3] = a3;                                                       \
    }                                                                                                         \
}                                                                                                             \
                                                                                                              \
static void one_row_##SUFFIX(const float *x, int64_t m, int64_t in, const WTYPE *w, float *y, int64_t out) {  \
    for (int64_t t = 0; t < m; t++) {                                                                         \
        const float *xt = x + t * in;                                                                         \
        float a = 0;                                                                                          \
        _Pragma("omp simd reduction(+ : a)")                                                                  \
        for (int64_t k = 0; k < in; k++) a += LOAD(w, k) * xt[k];                                             \
        y[t * out] = a;                                                                                       \
    }                                                                                                         \
}

/* y[t, :] += bias for every row t, the rows shared among the threads of the enclosing parallel region. */
static void add_bias(float *y, const float *bias, int64_t m, int64_t out) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < m; t++)
        for (int64_t j = 0; j < out; j++) y[t * out + j] += bias[j];
}

/* linear_SUFFIX: the rows of the weight split into stretches over the threads, four rows at a time by
 * four_rows_SUFFIX and the rest by one_row_SUFFIX, then the bias. */
#define DEFINE_DRIVER(SUFFIX, WTYPE)                                                                           \
static void linear_##SUFFIX(const float *x, int64_t m, int64_t in, const WTYPE *w, int64_t out,               \
                            const float *bias, float *y, int32_t threads) {                                   \
    int64_t blocks = out / 4;                                                                                 \
    int prefetch = in * (int64_t)sizeof(WTYPE) <= 1024;                                                       \
    _Pragma("omp parallel num_threads(threads)")                                                              \
    {                                                                                                         \
        _Pragma("omp for schedule(static) nowait")                                                            \
        for (int64_t b = 0; b < blocks; b++) {                                                                \
            if (prefetch && b + 1 < blocks) {                                                                 \
                const char *next = (const char *)(w + (b + 1) * 4 * in);                                      \
                for (int64_t at = 0; at < 4 * in * (int64_t)sizeof(WTYPE); at += 64)                         \
                    __builtin_prefetch(next + at, 0, 3);                                                      \
            }                                                                                                 \
            four_rows_##SUFFIX(x, m, in, w + b * 4 * in, y + b * 4, out);                                     \
        }                                                                                                     \
        _Pragma("omp for schedule(static)")                                                                   \
        for (int64_t j = blocks * 4; j < out; j++) one_row_##SUFFIX(x, m, in, w + j * in, y + j, out);        \
        if (bias) add_bias(y, bias, m, out);                                                                  \
    }                                                                                                         \
}

DEFINE_ROWS(f32, float, LOAD_F32)
DEFINE_DRIVER(f32, float)
/* Many rows of x (a verification of drafts, a batch of decodes, a short prefill) make the matmul bound by
 * arithmetic, not memory, and the dot products above spend much of it summing their vectors across. Here x
 * is transposed instead, into groups of 16 rows ([in][16]; a last one of 8, see column_groups), zero-padded, and
 * each weight element, broadcast, multiplies a whole group: no sums across a vector, J weight rows times one
 * or two vectors of accumulators in registers. A block of weight rows is read from memory once for all the
 * groups, and stays in L1 while they pass. bfloat16 weights are widened a block at a time into a float32
 * copy first. Measured on enigma-tiny's layer matrices: 8 rows 1.15x, 16-32 rows 1.3-1.5x faster than the
 * dot products. */
typedef float enigma_v8 __attribute__((vector_size(32)));

static inline enigma_v8 v8_load(const float *p) {
    enigma_v8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline enigma_v8 v8_splat(float f) { return (enigma_v8){f, f, f, f, f, f, f, f}; }

static inline float v8_sum(enigma_v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

typedef uint16_t enigma_u16x8 __attribute__((vector_size(16)));
typedef uint32_t enigma_u32x8 __attribute__((vector_size(32)));

#define LOAD_F32V8(p) v8_load(p)
#define LOAD_BF16V8(p) v8_load_bf16(p)

/* Eight bfloat16 values widened to float32. */
static inline enigma_v8 v8_load_bf16(const uint16_t *p) {
    enigma_u16x8 narrow;
    memcpy(&narrow, p, sizeof narrow);
    enigma_u32x8 wide = __builtin_convertvector(narrow, enigma_u32x8) << 16;
    enigma_v8 v;
    memcpy(&v, &wide, sizeof v);
    return v;
}

#define COLUMN_ROWS_MIN 7   /* fewer rows of x run the dot products (faster, and nothing to transpose) */
#define COLUMN_BLOCK 24     /* weight rows at a time: 4 x 6 (two vectors), 3 x 8 (one), 6 x 4 (dot products) */

/* columns1_J / columns2_J: J weight rows (w, rows of `in`) against one group of 8 / 16 transposed rows of
 * x; acc[r][t] is output row r's result for the group's row t. */
#define DEFINE_COLUMN_KERNELS(J)                                                                               \
static inline void columns1_##J(const float *xt, int64_t in, const float *w, float acc[][16]) {               \
    enigma_v8 a[J];                                                                                           \
    for (int r = 0; r < J; r++) a[r] = v8_splat(0);                                                           \
    for (int64_t k = 0; k < in; k++) {                                                                        \
        enigma_v8 group = v8_load(xt + k * 8);                                                                \
        for (int r = 0; r < J; r++) a[r] += v8_splat(w[r * in + k]) * group;                                  \
    }                                                                                                         \
    for (int r = 0; r < J; r++) memcpy(acc[r], &a[r], sizeof a[r]);                                           \
}                                                                                                             \
static inline void columns2_##J(const float *xt, int64_t in, const float *w, float acc[][16]) {               \
    enigma_v8 a[J], b[J];                                                                                     \
    for (int r = 0; r < J; r++) a[r] = b[r] = v8_splat(0);                                                    \
    for (int64_t k = 0; k < in; k++) {                                                                        \
        enigma_v8 low = v8_load(xt + k * 16), high = v8_load(xt + k * 16 + 8);                                \
        for (int r = 0; r < J; r++) {                                                                         \
            enigma_v8 weight = v8_splat(w[r * in + k]);                                                       \
            a[r] += weight * low;                                                                             \
            b[r] += weight * high;                                                                            \
        }                                                                                                     \
    }                                                                                                         \
    for (int r = 0; r < J; r++) {                                                                             \
        memcpy(acc[r], &a[r], sizeof a[r]);                                                                   \
        memcpy(acc[r] + 8, &b[r], sizeof b[r]);                                                               \
    }                                                                                                         \
}
DEFINE_COLUMN_KERNELS(1)
DEFINE_COLUMN_KERNELS(4)
DEFINE_COLUMN_KERNELS(6)
DEFINE_COLUMN_KERNELS(8)

/* How x's m rows are grouped: the first `wide` rows in groups of 16, then up to `narrow` a group of 8, the
 * rest by the dot products. Measured on enigma-tiny's matrices: a last 14-15 rows are cheapest as a padded
 * 16, 9-13 as 8 and dot products (10 rows: 1.2x faster than 16 with six of zeros), 7-8 as 8, and fewer
 * than COLUMN_ROWS_MIN by the dot products alone (5 rows: 1.2x faster than 8 with three of zeros). */
static void column_groups(int64_t m, int64_t *wide, int64_t *narrow) {
    int64_t left = m % 16;
    *wide = left >= 14 ? m : m - left;
    *narrow = left >= 14 ? m : left >= COLUMN_ROWS_MIN ? *wide + (left > 8 ? 8 : left) : *wide;
}

/* x's rows in column_groups' layout (group at xt + first_row * in), zero-padded; NULL if out of memory. */
static float *transpose_rows(const float *x, int64_t m, int64_t in) {
    int64_t wide, narrow;
    column_groups(m, &wide, &narrow);
    float *xt = calloc((size_t)((m + 15) / 16 * 16 * in), sizeof(float));
    if (xt == NULL) return NULL;
    for (int64_t t = 0; t < narrow; t += 16) {
        int64_t width = t < wide ? 16 : 8, count = narrow - t < width ? narrow - t : width;
        float *group = xt + t * in;
        for (int64_t r = 0; r < count; r++)
            for (int64_t k = 0; k < in; k++) group[k * width + r] = x[(t + r) * in + k];
    }
    return xt;
}

static void scatter(float acc[][16], int64_t rows, int64_t first, int64_t count, float *y, int64_t out) {
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t = 0; t < count; t++) y[(first + t) * out + r] = acc[r][t];
}

/* y[:, 0:J] (row stride out) = x @ w[0:J]^T for J = COLUMN_BLOCK, 4 or 1 weight rows. */
#define DEFINE_COLUMN_BLOCK(J, J2, J1)                                                                     \
static void column_block_##J(const float *x, const float *xt, int64_t m, int64_t in, const float *w, float *y,\
                             int64_t out) {                                                                   \
    float acc[J][16];                                                                                         \
    int64_t wide, narrow, t = 0;                                                                              \
    column_groups(m, &wide, &narrow);                                                                         \
    for (; t < wide; t += 16) {                                                                               \
        for (int64_t r = 0; r < J; r += J2) columns2_##J2(xt + t * in, in, w + r * in, acc + r);              \
        scatter(acc, J, t, m - t < 16 ? m - t : 16, y, out);                                                  \
    }                                                                                                         \
    if (t < narrow) {                                                                                         \
        for (int64_t r = 0; r < J; r += J1) columns1_##J1(xt + t * in, in, w + r * in, acc + r);              \
        scatter(acc, J, t, narrow - t, y, out);                                                               \
        t = narrow;                                                                                           \
    }                                                                                                         \
    if (t < m) {                                                                                              \
        if (J % 4 == 0)                                                                                       \
            for (int64_t r = 0; r < J; r += 4) four_rows_f32(x + t * in, m - t, in, w + r * in, y + t * out + r, out); \
        else                                                                                                  \
            one_row_f32(x + t * in, m - t, in, w, y + t * out, out);                                          \
    }                                                                                                         \
}
DEFINE_COLUMN_BLOCK(24, 6, 8)
DEFINE_COLUMN_BLOCK(4, 4, 4)
DEFINE_COLUMN_BLOCK(1, 1, 1)

/* Weight rows 0 .. rows-1 of w: blocks of COLUMN_BLOCK, then of 4, then one by one. */
static void column_rows(const float *x, const float *xt, int64_t m, int64_t in, const float *w, int64_t rows,
                        float *y, int64_t out) {
    int64_t r = 0;
    for (; r + COLUMN_BLOCK <= rows; r += COLUMN_BLOCK) column_block_24(x, xt, m, in, w + r * in, y + r, out);
    for (; r + 4 <= rows; r += 4) column_block_4(x, xt, m, in, w + r * in, y + r, out);
    for (; r < rows; r++) column_block_1(x, xt, m, in, w + r * in, y + r, out);
}

/* linear_columns_SUFFIX: linear_SUFFIX for COLUMN_ROWS_MIN rows of x or more, COLUMN_BLOCK weight rows at
 * a time by the column kernels (bfloat16 ones widened into a float32 block first); linear_SUFFIX itself
 * where memory for the transposed x cannot be had. */
#define DEFINE_COLUMN_DRIVER(SUFFIX, WTYPE, LOAD)                                                              \
static void linear_columns_##SUFFIX(const float *x, int64_t m, int64_t in, const WTYPE *w, int64_t out,       \
                                    const float *bias, float *y, int32_t threads) {                           \
    float *xt = transpose_rows(x, m, in);                                                                     \
    int widen = sizeof(WTYPE) != sizeof(float);                                                               \
    float *blocks_f32 = widen && xt ? malloc((size_t)(threads * COLUMN_BLOCK * in) * sizeof(float)) : NULL;   \
    if (xt == NULL || (widen && blocks_f32 == NULL)) {                                                        \
        free(xt);                                                                                             \
        linear_##SUFFIX(x, m, in, w, out, bias, y, threads);                                                  \
        return;                                                                                               \
    }                                                                                                         \
    int64_t blocks = (out + COLUMN_BLOCK - 1) / COLUMN_BLOCK;                                                 \
    _Pragma("omp parallel num_threads(threads)")                                                              \
    {                                                                                                         \
        float *mine = widen ? blocks_f32 + (int64_t)omp_thread() * COLUMN_BLOCK * in : NULL;                  \
        _Pragma("omp for schedule(static)")                                                                   \
        for (int64_t b = 0; b < blocks; b++) {                                                                \
            int64_t first = b * COLUMN_BLOCK, rows = out - first < COLUMN_BLOCK ? out - first : COLUMN_BLOCK; \
            const float *block = (const float *)(const void *)(w + first * in);                               \
            if (widen) {                                                                                      \
                for (int64_t i = 0; i < rows * in; i++) mine[i] = LOAD(w + first * in, i);                    \
                block = mine;                                                                                 \
            }                                                                                                 \
            column_rows(x, xt, m, in, block, rows, y + first, out);                                           \
        }                                                                                                     \
        if (bias) add_bias(y, bias, m, out);                                                                  \
    }                                                                                                         \
    free(blocks_f32);                                                                                         \
    free(xt);                                                                                                 \
}

DEFINE_ROWS(bf16_any, uint16_t, LOAD_BF16)
DEFINE_DRIVER(bf16_any, uint16_t)
DEFINE_COLUMN_DRIVER(f32, float, LOAD_F32)
DEFINE_COLUMN_DRIVER(bf16_any, uint16_t, LOAD_BF16)

/* bfloat16 weights of even width, read as 32-bit pairs: the low half of a pair is an even element and
 * the high half an odd one, so one shift or one mask makes each a float, half the work of widening
 * element by element (a 5632x2048 weight, one row, 2 threads: 1.49 -> 0.74 ms warm in the L3; see
 * BENCHMARKS.md). x is first split per row into its even and odd elements ([x0 x2 .. | x1 x3 ..]). */
static inline float even_bf16(uint32_t pair) {
    uint32_t u = pair << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float odd_bf16(uint32_t pair) {
    uint32_t u = pair & 0xffff0000u;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static void four_rows_bf16_pairs(const float *xs, int64_t m, int64_t in, const uint16_t *w, float *y,
                                 int64_t out) {
    const int64_t half = in / 2;
    const uint32_t *w0 = (const uint32_t *)(const void *)w, *w1 = w0 + half, *w2 = w1 + half, *w3 = w2 + half;
    int64_t t = 0;
    for (; t + 2 <= m; t += 2) {
        const float *ea = xs + t * in, *oa = ea + half, *eb = ea + in, *ob = eb + half;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
        for (int64_t k = 0; k < half; k++) {
            uint32_t u0 = w0[k], u1 = w1[k], u2 = w2[k], u3 = w3[k];
            float e0 = even_bf16(u0), e1 = even_bf16(u1), e2 = even_bf16(u2), e3 = even_bf16(u3);
            float o0 = odd_bf16(u0), o1 = odd_bf16(u1), o2 = odd_bf16(u2), o3 = odd_bf16(u3);
            float xe = ea[k], xo = oa[k], ye = eb[k], yo = ob[k];
            a0 += e0 * xe + o0 * xo; a1 += e1 * xe + o1 * xo; a2 += e2 * xe + o2 * xo; a3 += e3 * xe + o3 * xo;
            b0 += e0 * ye + o0 * yo; b1 += e1 * ye + o1 * yo; b2 += e2 * ye + o2 * yo; b3 += e3 * ye + o3 * yo;
        }
        float *ya = y + t * out, *yb = ya + out;
        ya[0] = a0; ya[1] = a1; ya[2] = a2; ya[3] = a3;
        yb[0] = b0; yb[1] = b1; yb[2] = b2; yb[3] = b3;
    }
    for (; t < m; t++) {
        const float *et = xs + t * in, *ot = et + half;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < half; k++) {
            uint32_t u0 = w0[k], u1 = w1[k], u2 = w2[k], u3 = w3[k];
            float xe = et[k], xo = ot[k];
            a0 += even_bf16(u0) * xe + odd_bf16(u0) * xo;
            a1 += even_bf16(u1) * xe + odd_bf16(u1) * xo;
            a2 += even_bf16(u2) * xe + odd_bf16(u2) * xo;
            a3 += even_bf16(u3) * xe + odd_bf16(u3) * xo;
        }
        float *yt = y + t * out;
        yt[0] = a0; yt[1] = a1; yt[2] = a2; yt[3] = a3;
    }
}

static void one_row_bf16_pairs(const float *xs, int64_t m, int64_t in, const uint16_t *row, float *y,
                               int64_t out) {
    const int64_t half = in / 2;
    const uint32_t *w = (const uint32_t *)(const void *)row;
    for (int64_t t = 0; t < m; t++) {
        const float *et = xs + t * in, *ot = et + half;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (int64_t k = 0; k < half; k++) a += even_bf16(w[k]) * et[k] + odd_bf16(w[k]) * ot[k];
        y[t * out] = a;
    }
}

DEFINE_DRIVER(bf16_pairs, uint16_t)

/* bfloat16 weights: in pairs when the rows are of even width and 4-byte aligned (x split into its even and
 * odd elements first), else element by element. */
static void linear_bf16(const float *x, int64_t m, int64_t in, const uint16_t *w, int64_t out,
                        const float *bias, float *y, int32_t threads) {
    if (m >= COLUMN_ROWS_MIN) {
        linear_columns_bf16_any(x, m, in, w, out, bias, y, threads);
        return;
    }
    float *xs = in % 2 == 0 && ((uintptr_t)w & 3) == 0 ? malloc((size_t)(m * in) * sizeof(float)) : NULL;
    if (xs == NULL) {
        linear_bf16_any(x, m, in, w, out, bias, y, threads);
        return;
    }
    const int64_t half = in / 2;
    for (int64_t t = 0; t < m; t++)
        for (int64_t k = 0; k < half; k++) {
            xs[t * in + k] = x[t * in + 2 * k];
            xs[t * in + half + k] = x[t * in + 2 * k + 1];
        }
    linear_bf16_pairs(xs, m, in, w, out, bias, y, threads);
    free(xs);
}

/* y[m, out] = x[m, in] @ w[out, in]^T (+ bias[out]); all contiguous float32. */
void enigma_linear(const float *x, int64_t m, int64_t in, const float *w, int64_t out,
                   const float *bias, float *y, int32_t threads) {
    if (m >= COLUMN_ROWS_MIN) linear_columns_f32(x, m, in, w, out, bias, y, threads);
    else linear_f32(x, m, in, w, out, bias, y, threads);
}

/* The same with w in bfloat16 (x, bias and y float32). */
void enigma_linear_bf16(const float *x, int64_t m, int64_t in, const uint16_t *w, int64_t out,
                        const float *bias, float *y, int32_t threads) {
    linear_bf16(x, m, in, w, out, bias, y, threads);
}

/* e^x on eight floats, written out in vectors (libm's expf is a call per element: the polynomial in its
 * place took enigma-tiny's attention of 9 rows over 200 positions from 170 to 128 us a layer, scalar; the
 * compiler does not vectorise a scalar version either, its clamps and floor being branches to it): x = n ln2 + r,
 * |r| <= ln2 / 2, e^r by Cephes' expf polynomial, 2^n put into the exponent bits. Relative error at most
 * 8.5e-8 against exp in double over [-87, 88] (14M points). x is clamped to that range: below, e^-87
 * (~1e-38) where expf gives less, nothing next to a softmax's largest weight (1) or to SiLU's 1 + e^-g;
 * above, 2^127-odd instead of infinity, after which SiLU's g / (1 + e^-g) is still 0 to float precision. */
typedef int32_t enigma_i32x8 __attribute__((vector_size(32)));

static inline enigma_v8 v8_select(enigma_i32x8 mask, enigma_v8 yes, enigma_v8 no) {
    enigma_i32x8 a, b;
    memcpy(&a, &yes, sizeof a);
    memcpy(&b, &no, sizeof b);
    enigma_i32x8 bits = (mask & a) | (~mask & b);
    enigma_v8 v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static inline enigma_v8 v8_exp(enigma_v8 x) {
    const enigma_v8 low = v8_splat(-87.0f), high = v8_splat(88.0f);
    x = v8_select(x < low, low, x);
    x = v8_select(x > high, high, x);
    enigma_v8 y = x * v8_splat(1.44269504088896341f) + v8_splat(0.5f);
    enigma_i32x8 n = __builtin_convertvector(y, enigma_i32x8);  /* toward zero: one too many below zero */
    n += __builtin_convertvector(n, enigma_v8) > y;             /* a true comparison is -1: floor(y) */
    enigma_v8 nf = __builtin_convertvector(n, enigma_v8);
    enigma_v8 r = x - nf * v8_splat(0.693359375f) + nf * v8_splat(2.12194440e-4f);
    enigma_v8 p = v8_splat(1.9875691500e-4f);
    p = p * r + v8_splat(1.3981999507e-3f);
    p = p * r + v8_splat(8.3334519073e-3f);
    p = p * r + v8_splat(4.1665795894e-2f);
    p = p * r + v8_splat(1.6666665459e-1f);
    p = p * r + v8_splat(5.0000001201e-1f);
    p = p * r * r + r + v8_splat(1.0f);
    enigma_i32x8 bits = (n + 127) << 23;
    enigma_v8 two_n;
    memcpy(&two_n, &bits, sizeof two_n);
    return p * two_n;
}

/* The online softmax's step to a new block: when the block's largest score passes the running maximum,
 * the sum and the output so far are scaled down to it (from nothing, for the first block). */
static inline void softmax_rescale(float block_max, float *maximum, float *sum, float *o, int64_t dim) {
    if (block_max > *maximum) {
        float correction = expf(*maximum - block_max);
        *sum *= correction;
        for (int64_t d = 0; d < dim; d++) o[d] *= correction;
        *maximum = block_max;
    }
}

/* One sequence's query heads that share KV head `keys`/`values` (`group` of
 * them, [group, dim] at q) over its cached positions first..seq_len-1, read
 * block by block through its block table: online softmax, one pass over the
 * keys and values (flash-decoding's recurrence, a block at a time). The cache
 * holds float32 or bfloat16 (widened as read).
 * Returns nonzero if the table is too short or names a block outside the pool.
 *
 * decode_attention: each sequence's one query ([num_seqs, heads, dim]) over
 * its seq_lens[s] cached keys and values (the last `window` of them when
 * window > 0), the blocks named by block_tables[s] ([num_seqs, max_blocks]).
 * kv_cache is the torch backend's layout, [2, kv_heads, num_blocks,
 * block_size, dim]; query heads h*group .. (h+1)*group-1 share KV head h.
 * Rows of one sequence at consecutive positions (a verification) run together
 * (attend_run). Runs and KV heads run in parallel. Returns the number of (run,
 * KV head) pairs whose table was too short or named a block outside the pool
 * (their output is undefined); 0 when all is well. */
#define DEFINE_ATTENTION(SUFFIX, CTYPE, LOAD)                                                                  \
static int attend_group_##SUFFIX(const float *q, int64_t group, int64_t dim, const CTYPE *keys,               \
                                 const CTYPE *values, const int64_t *table, int64_t table_len,                \
                                 int64_t num_blocks, int64_t block_size, int64_t first, int64_t seq_len,      \
                                 float scale, float *o) {                                                     \
    float maxima[group], sums[group], scores[block_size];                                                     \
    for (int64_t g = 0; g < group; g++) {                                                                     \
        maxima[g] = -INFINITY;                                                                                \
        sums[g] = 0;                                                                                          \
        for (int64_t d = 0; d < dim; d++) o[g * dim + d] = 0;                                                 \
    }                                                                                                         \
    for (int64_t start = first - first % block_size; start < seq_len; start += block_size) {                  \
        if (start / block_size >= table_len) return 1;                                                        \
        int64_t block = table[start / block_size];                                                            \
        if (block < 0 || block >= num_blocks) return 1;                                                       \
        const CTYPE *kb = keys + block * block_size * dim, *vb = values + block * block_size * dim;           \
        int64_t lo = (first > start ? first : start) - start;                                                 \
        int64_t hi = (seq_len < start + block_size ? seq_len : start + block_size) - start;                   \
        for (int64_t g = 0; g < group; g++) {                                                                 \
            const float *qg = q + g * dim;                                                                    \
            float *og = o + g * dim;                                                                          \
            float block_max = -INFINITY;                                                                      \
            for (int64_t t = lo; t < hi; t++) {                                                               \
                const CTYPE *kt = kb + t * dim;                                                               \
                float dot = 0;                                                                                \
                if (dim % 8 == 0) {                                                                           \
                    enigma_v8 sum = v8_splat(0);                                                              \
                    for (int64_t d = 0; d < dim; d += 8) sum += v8_load(qg + d) * LOAD##V8(kt + d);           \
                    dot = v8_sum(sum);                                                                        \
                } else {                                                                                      \
                    _Pragma("omp simd reduction(+ : dot)")                                                    \
                    for (int64_t d = 0; d < dim; d++) dot += qg[d] * LOAD(kt, d);                             \
                }                                                                                             \
                scores[t] = dot * scale;                                                                      \
                if (scores[t] > block_max) block_max = scores[t];                                             \
            }                                                                                                 \
            softmax_rescale(block_max, &maxima[g], &sums[g], og, dim);                                        \
            float block_sum = 0;                                                                              \
            for (int64_t t = lo; t < hi; t += 8) {  /* e^x eight at a time */                                 \
                float chunk[8] = {0};                                                                         \
                int64_t count = hi - t < 8 ? hi - t : 8;                                                      \
                memcpy(chunk, scores + t, (size_t)count * sizeof(float));                                     \
                enigma_v8 weights = v8_exp(v8_load(chunk) - v8_splat(maxima[g]));                             \
                memcpy(chunk, &weights, sizeof weights);                                                      \
                for (int64_t i = 0; i < count; i++) {                                                         \
                    scores[t + i] = chunk[i];                                                                 \
                    block_sum += chunk[i];                                                                    \
                }                                                                                             \
            }                                                                                                 \
            sums[g] += block_sum;                                                                             \
            if (dim % 8 == 0) {  /* each 8 of og in a register while the block's values pass */             \
                for (int64_t d = 0; d < dim; d += 8) {                                                        \
                    enigma_v8 sum = v8_load(og + d);                                                          \
                    for (int64_t t = lo; t < hi; t++) sum += v8_splat(scores[t]) * LOAD##V8(vb + t * dim + d); \
                    memcpy(og + d, &sum, sizeof sum);                                                         \
                }                                                                                             \
            } else {                                                                                          \
                for (int64_t t = lo; t < hi; t++) {                                                           \
                    float p = scores[t];                                                                      \
                    const CTYPE *vt = vb + t * dim;                                                           \
                    _Pragma("omp simd")                                                                       \
                    for (int64_t d = 0; d < dim; d++) og[d] += p * LOAD(vt, d);                               \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    for (int64_t g = 0; g < group; g++) {                                                                     \
        float inverse = 1.0f / sums[g];                                                                       \
        for (int64_t d = 0; d < dim; d++) o[g * dim + d] *= inverse;                                          \
    }                                                                                                         \
    return 0;                                                                                                 \
}                                                                                                             \
                                                                                                              \
/* attend_run_SUFFIX: rows consecutive rows of one sequence (a verification's drafts, a short prompt; one    \
 * block table, lengths[j] = lengths[0] + j) over KV head `keys`/`values`, each row's `group` query heads at   \
 * query + j * row_stride, for block_size 16 and dim a multiple of 8. Each block's keys are transposed once   \
 * ([dim][16]) for all the run's queries: a query's 16 scores are then two vectors of multiply-adds down the  \
 * dimensions, with no sums across a vector, and its outputs stay in registers while the values pass. */      \
static int attend_run_##SUFFIX(const float *query, int64_t row_stride, int64_t rows, int64_t group,          \
                               int64_t dim, const CTYPE *keys, const CTYPE *values, const int64_t *table,    \
                               int64_t table_len, int64_t num_blocks, const int64_t *lengths, int64_t window,\
                               float scale, float *out) {                                                     \
    enum { BLOCK = 16 };                                                                                      \
    const int64_t queries = rows * group;                                                                     \
    float kt[dim * BLOCK], maxima[queries], sums[queries], scores[BLOCK];                                      \
    int64_t firsts[rows];                                                                                     \
    for (int64_t j = 0; j < rows; j++) firsts[j] = window > 0 && lengths[j] > window ? lengths[j] - window : 0; \
    for (int64_t n = 0; n < queries; n++) {                                                                   \
        maxima[n] = -INFINITY;                                                                                \
        sums[n] = 0;                                                                                          \
        float *o = out + (n / group) * row_stride + (n % group) * dim;                                        \
        for (int64_t d = 0; d < dim; d++) o[d] = 0;                                                           \
    }                                                                                                         \
    const int64_t end = lengths[rows - 1];                                                                    \
    for (int64_t start = firsts[0] - firsts[0] % BLOCK; start < end; start += BLOCK) {                        \
        if (start / BLOCK >= table_len) return 1;                                                             \
        int64_t block = table[start / BLOCK];                                                                 \
        if (block < 0 || block >= num_blocks) return 1;                                                       \
        const CTYPE *kb = keys + block * BLOCK * dim, *vb = values + block * BLOCK * dim;                    \
        int64_t filled = end - start < BLOCK ? end - start : BLOCK;                                           \
        for (int64_t t = 0; t < filled; t++)                                                                  \
            for (int64_t d = 0; d < dim; d++) kt[d * BLOCK + t] = LOAD(kb + t * dim, d);                      \
        for (int64_t t = filled; t < BLOCK; t++)                                                              \
            for (int64_t d = 0; d < dim; d++) kt[d * BLOCK + t] = 0;                                          \
        for (int64_t n = 0; n < queries; n++) {                                                               \
            int64_t j = n / group;                                                                            \
            int64_t lo = firsts[j] > start ? firsts[j] - start : 0;                                           \
            int64_t hi = lengths[j] - start < BLOCK ? lengths[j] - start : BLOCK;                              \
            if (hi <= lo) continue;                                                                           \
            const float *q = query + j * row_stride + (n % group) * dim;                                      \
            float *o = out + j * row_stride + (n % group) * dim;                                              \
            enigma_v8 low[4] = {0}, high[4] = {0};  /* four chains: a multiply-add waits on the one before */ \
            for (int64_t d = 0; d < dim; d += 4)                                                              \
                for (int c = 0; c < 4; c++) {                                                                 \
                    enigma_v8 qd = v8_splat(q[d + c]);                                                        \
                    low[c] += qd * v8_load(kt + (d + c) * BLOCK);                                             \
                    high[c] += qd * v8_load(kt + (d + c) * BLOCK + 8);                                        \
                }                                                                                             \
            enigma_v8 low_sum = (low[0] + low[1]) + (low[2] + low[3]);                                        \
            enigma_v8 high_sum = (high[0] + high[1]) + (high[2] + high[3]);                                   \
            memcpy(scores, &low_sum, sizeof low_sum);                                                         \
            memcpy(scores + 8, &high_sum, sizeof high_sum);                                                   \
            float block_max = -INFINITY;                                                                      \
            for (int64_t t = lo; t < hi; t++) {                                                               \
                scores[t] *= scale;                                                                           \
                if (scores[t] > block_max) block_max = scores[t];                                             \
            }                                                                                                 \
            softmax_rescale(block_max, &maxima[n], &sums[n], o, dim);                                         \
            enigma_v8 top = v8_splat(maxima[n]);                                                              \
            enigma_v8 weights_low = v8_exp(v8_load(scores) - top), weights_high = v8_exp(v8_load(scores + 8) - top); \
            memcpy(scores, &weights_low, sizeof weights_low);                                                 \
            memcpy(scores + 8, &weights_high, sizeof weights_high);                                           \
            for (int64_t t = 0; t < lo; t++) scores[t] = 0;                                                   \
            for (int64_t t = hi; t < BLOCK; t++) scores[t] = 0;                                               \
            float block_sum = 0;                                                                              \
            for (int64_t t = lo; t < hi; t++) block_sum += scores[t];                                         \
            sums[n] += block_sum;                                                                             \
            for (int64_t d = 0; d < dim; d += 8) {  /* two chains, even and odd positions */                  \
                enigma_v8 even = v8_load(o + d), odd = v8_splat(0);                                           \
                for (int64_t t = lo - lo % 2; t < hi; t += 2) {                                               \
                    even += v8_splat(scores[t]) * LOAD##V8(vb + t * dim + d);                                 \
                    if (t + 1 < hi) odd += v8_splat(scores[t + 1]) * LOAD##V8(vb + (t + 1) * dim + d);        \
                }                                                                                             \
                enigma_v8 sum = even + odd;                                                                   \
                memcpy(o + d, &sum, sizeof sum);                                                              \
            }                                                                                                 \
        }                                                                                                     \
    }                                                                                                         \
    for (int64_t n = 0; n < queries; n++) {                                                                   \
        float inverse = 1.0f / sums[n], *o = out + (n / group) * row_stride + (n % group) * dim;              \
        for (int64_t d = 0; d < dim; d++) o[d] *= inverse;                                                    \
    }                                                                                                         \
    return 0;                                                                                                 \
}                                                                                                             \
                                                                                                              \
static int64_t decode_attention_##SUFFIX(const float *query, int64_t num_seqs, int64_t heads, int64_t kv_heads,\
                                         int64_t dim, const CTYPE *kv_cache, int64_t num_blocks,              \
                                         int64_t block_size, const int64_t *block_tables, int64_t max_blocks, \
                                         const int64_t *seq_lens, int64_t window, float scale, float *out,    \
                                         int32_t threads) {                                                   \
    int64_t group = heads / kv_heads, head_stride = num_blocks * block_size * dim;                            \
    int64_t bad = 0;                                                                                          \
    /* runs of rows of one sequence (consecutive positions, the same table; at most RUN_MAX rows) where       \
     * attend_run can take them (blocks of 16, dim in vectors of 8), else every row a run of its own */       \
    enum { RUN_MAX = 16 };                                                                                    \
    const int runs_allowed = block_size == 16 && dim % 8 == 0 && dim <= 512;                                  \
    int64_t runs[num_seqs + 1], count = 0;                                                                    \
    for (int64_t s = 0; s < num_seqs; s++)                                                                    \
        if (s == 0 || !runs_allowed || s - runs[count - 1] >= RUN_MAX || seq_lens[s] != seq_lens[s - 1] + 1   \
            || memcmp(block_tables + s * max_blocks, block_tables + (s - 1) * max_blocks,                     \
                      (size_t)max_blocks * sizeof(int64_t)) != 0)                                             \
            runs[count++] = s;                                                                                \
    runs[count] = num_seqs;                                                                                   \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads) reduction(+ : bad)")      \
    for (int64_t r = 0; r < count; r++) {                                                                     \
        for (int64_t h = 0; h < kv_heads; h++) {                                                              \
            int64_t s = runs[r], first = window > 0 && seq_lens[s] > window ? seq_lens[s] - window : 0;       \
            const CTYPE *keys = kv_cache + h * head_stride, *values = keys + kv_heads * head_stride;          \
            int64_t offset = (s * heads + h * group) * dim;                                                   \
            if (runs[r + 1] - s == 1)  /* a lone decode: transposing would cost more than it saves */         \
                bad += attend_group_##SUFFIX(query + offset, group, dim, keys, values, block_tables + s * max_blocks,\
                                             max_blocks, num_blocks, block_size, first, seq_lens[s], scale,   \
                                             out + offset);                                                   \
            else                                                                                              \
                bad += attend_run_##SUFFIX(query + offset, heads * dim, runs[r + 1] - s, group, dim, keys, values,\
                                           block_tables + s * max_blocks, max_blocks, num_blocks, seq_lens + s,\
                                           window, scale, out + offset);                                      \
        }                                                                                                     \
    }                                                                                                         \
    return bad;                                                                                               \
}

DEFINE_ATTENTION(f32, float, LOAD_F32)
DEFINE_ATTENTION(bf16, uint16_t, LOAD_BF16)

/* Decode attention over a float32 paged cache, read in place (see decode_attention above). */
int64_t enigma_decode_attention(const float *query, int64_t num_seqs, int64_t heads, int64_t kv_heads,
                                int64_t dim, const float *kv_cache, int64_t num_blocks, int64_t block_size,
                                const int64_t *block_tables, int64_t max_blocks, const int64_t *seq_lens,
                                int64_t window, float scale, float *out, int32_t threads) {
    return decode_attention_f32(query, num_seqs, heads, kv_heads, dim, kv_cache, num_blocks, block_size,
                                block_tables, max_blocks, seq_lens, window, scale, out, threads);
}

/* ------------------------------------------------------------------ the decoder stack in one call
 *
 * A decode step of a Llama-family model, every layer (RMSNorm, q/k/v, rotary, KV write, paged
 * attention, o, RMSNorm, gate/up, SiLU * up, down, residuals) and the final norm, for a few rows:
 * in torch each of those is an operator dispatch and a Python call, ~10 us apiece, which is most of a
 * small model's step. The matmuls go through function pointers with enigma_qmatmul's signature, so
 * a plugin's kernels (the ggml plugin's GGUF block products) run inside the same call; float32
 * weights run enigma_f32_matmul. Layouts are enigma.native.decoder's ctypes structures. */

typedef int (*enigma_matmul_fn)(int kind, const void *weight, int64_t out, int64_t in, const float *x,
                                int64_t rows, uint8_t *scratch, float *y, int threads);

typedef struct {
    enigma_matmul_fn fn;
    const void *weight;
    const float *bias;     /* [out] or NULL */
    int64_t kind;          /* the kernel's own tag (ggml's type number for the block kernels) */
    int64_t out;
} enigma_projection;

typedef struct {
    const float *input_norm, *post_norm;
    enigma_projection qkv[3];      /* n_qkv 1: one fused [q; k; v]; 3: q, k, v */
    enigma_projection o;
    enigma_projection gate_up[2];  /* n_gate_up 1: one fused [gate; up]; 2: gate, up */
    enigma_projection down;
    int64_t n_qkv, n_gate_up;
    int64_t window;                /* 0: full attention */
} enigma_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    const float *inv_freq;         /* [head_dim / 2] */
    const float *final_norm;       /* [hidden] or NULL */
    int64_t cache_bf16;            /* 1: the caches hold bfloat16 (a bfloat16 model's); 0: float32 */
} enigma_decoder;

int enigma_f32_matmul(int kind, const void *weight, int64_t out, int64_t in, const float *x, int64_t rows,
                      uint8_t *scratch, float *y, int threads) {
    (void)kind; (void)scratch;
    enigma_linear(x, rows, in, (const float *)weight, out, NULL, y, threads);
    return 0;
}

/* The same for bfloat16 weights, widened as they are streamed: half the bytes of float32 a step. */
int enigma_bf16_matmul(int kind, const void *weight, int64_t out, int64_t in, const float *x, int64_t rows,
                       uint8_t *scratch, float *y, int threads) {
    (void)kind; (void)scratch;
    linear_bf16(x, rows, in, (const uint16_t *)weight, out, NULL, y, threads);
    return 0;
}

static void rms_norm(const float *x, const float *w, int64_t rows, int64_t n, float eps, float *y) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; i++) sum += xr[i] * xr[i];
        float inverse = 1.0f / sqrtf(sum / (float)n + eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++) y[r * n + i] = xr[i] * inverse * w[i];
    }
}

/* y[:, column:column+p->out] of a [rows, width] matrix = x @ W^T + bias; tmp holds rows * p->out. */
static int project(const enigma_projection *p, int64_t in, const float *x, int64_t rows, float *y, int64_t width,
                   int64_t column, float *tmp, uint8_t *qscratch, int threads) {
    float *target = (width == p->out && column == 0) ? y : tmp;
    if (p->fn(p->kind, p->weight, p->out, in, x, rows, qscratch, target, threads)) return 1;
    for (int64_t r = 0; r < rows; r++) {
        float *dst = y + r * width + column;
        const float *src = target + r * p->out;
        if (target != y) for (int64_t j = 0; j < p->out; j++) dst[j] = src[j];
        if (p->bias) for (int64_t j = 0; j < p->out; j++) dst[j] += p->bias[j];
    }
    return 0;
}

/* Halves-layout rotary (Llama checkpoints): for i < d/2, (x_i, x_{i+d/2}) turned by position * inv_freq_i. */
static void rotate(float *x, int64_t heads, int64_t dim, const float *cos_, const float *sin_) {
    int64_t half = dim / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *xh = x + h * dim;
        for (int64_t i = 0; i < half; i++) {
            float a = xh[i], b = xh[i + half];
            xh[i] = a * cos_[i] - b * sin_[i];
            xh[i + half] = b * cos_[i] + a * sin_[i];
        }
    }
}

/* Floats of scratch enigma_decode_layers needs for `rows` rows. */
int64_t enigma_decoder_scratch_floats(const enigma_decoder *m, int64_t rows) {
    int64_t q = m->heads * m->head_dim, kv = m->kv_heads * m->head_dim;
    int64_t widest = q + 2 * kv > 2 * m->intermediate ? q + 2 * kv : 2 * m->intermediate;
    if (m->hidden > widest) widest = m->hidden;
    return rows * (m->hidden + (q + 2 * kv) + q + q + 2 * m->intermediate + m->intermediate + widest + m->head_dim);
}

/* Runs layers 0..num_layers-1 over x ([rows, hidden], the embeddings; updated in place as the residual
 * stream), then the final norm into out ([rows, hidden]; x itself when the decoder has none). Row r is
 * at position positions[r], writes its key and value to cache slot slots[r] of each layer's cache
 * (caches[l], the torch backend's [2, kv_heads, num_blocks, block_size, head_dim], float32 or bfloat16 as
 * m->cache_bf16 says; activations stay float32 throughout) and attends over the
 * first lengths[r] positions of the blocks in tables[r] ([rows, max_blocks]). scratch holds
 * enigma_decoder_scratch_floats floats, qscratch what the largest matmul's kernel asks per row times
 * rows. Returns 0; 1 when a matmul kernel refused, 2 for a slot outside the pool, 3 for a block table
 * too short or naming a block outside the pool. */
int enigma_decode_layers(const enigma_decoder *m, const enigma_layer *layers, int64_t num_layers,
                         void *const *caches, int64_t num_blocks, int64_t block_size, float *x, int64_t rows,
                         const int64_t *positions, const int64_t *slots, const int64_t *tables, int64_t max_blocks,
                         const int64_t *lengths, float *scratch, uint8_t *qscratch, float *out, int threads) {
    const int64_t hidden = m->hidden, dim = m->head_dim, q = m->heads * dim, kv = m->kv_heads * dim;
    const int64_t qkv_width = q + 2 * kv, inter = m->intermediate, half = dim / 2;
    const int64_t pool = num_blocks * block_size;
    float *h = scratch, *qkv = h + rows * hidden, *query = qkv + rows * qkv_width, *attn = query + rows * q;
    float *gate_up = attn + rows * q, *act = gate_up + rows * 2 * inter, *tmp = act + rows * inter;
    int64_t widest = qkv_width > 2 * inter ? qkv_width : 2 * inter;
    if (hidden > widest) widest = hidden;
    float *cos_ = tmp + rows * widest, *sin_ = cos_ + rows * half;  /* rows * dim floats: cos, sin halves */
    for (int64_t r = 0; r < rows; r++) {
        if (slots[r] < 0 || slots[r] >= pool) return 2;
        for (int64_t i = 0; i < half; i++) {
            float angle = (float)positions[r] * m->inv_freq[i];
            cos_[r * half + i] = cosf(angle);
            sin_[r * half + i] = sinf(angle);
        }
    }
    for (int64_t l = 0; l < num_layers; l++) {
        const enigma_layer *layer = layers + l;
        rms_norm(x, layer->input_norm, rows, hidden, m->eps, h);
        for (int64_t p = 0, column = 0; p < layer->n_qkv; column += layer->qkv[p].out, p++)
            if (project(&layer->qkv[p], hidden, h, rows, qkv, qkv_width, column, tmp, qscratch, threads)) return 1;
        void *cache = caches[l];
        for (int64_t r = 0; r < rows; r++) {
            float *row = qkv + r * qkv_width;
            rotate(row, m->heads + m->kv_heads, dim, cos_ + r * half, sin_ + r * half);  /* q and k */
            for (int64_t j = 0; j < q; j++) query[r * q + j] = row[j];
            for (int64_t k = 0; k < m->kv_heads; k++) {
                int64_t key_at = (k * pool + slots[r]) * dim, value_at = ((m->kv_heads + k) * pool + slots[r]) * dim;
                const float *key = row + q + k * dim, *value = row + q + kv + k * dim;
                if (m->cache_bf16) {
                    uint16_t *c = (uint16_t *)cache;
                    for (int64_t d = 0; d < dim; d++) {
                        c[key_at + d] = f32_to_bf16(key[d]);
                        c[value_at + d] = f32_to_bf16(value[d]);
                    }
                } else {
                    float *c = (float *)cache;
                    for (int64_t d = 0; d < dim; d++) {
                        c[key_at + d] = key[d];
                        c[value_at + d] = value[d];
                    }
                }
            }
        }
        int64_t bad = m->cache_bf16
            ? decode_attention_bf16(query, rows, m->heads, m->kv_heads, dim, (const uint16_t *)cache, num_blocks,
                                    block_size, tables, max_blocks, lengths, layer->window, m->scale, attn, threads)
            : decode_attention_f32(query, rows, m->heads, m->kv_heads, dim, (const float *)cache, num_blocks,
                                   block_size, tables, max_blocks, lengths, layer->window, m->scale, attn, threads);
        if (bad) return 3;
        if (project(&layer->o, q, attn, rows, tmp, hidden, 0, tmp, qscratch, threads)) return 1;
        for (int64_t i = 0; i < rows * hidden; i++) x[i] += tmp[i];
        rms_norm(x, layer->post_norm, rows, hidden, m->eps, h);
        for (int64_t p = 0, column = 0; p < layer->n_gate_up; column += layer->gate_up[p].out, p++)
            if (project(&layer->gate_up[p], hidden, h, rows, gate_up, 2 * inter, column, tmp, qscratch, threads))
                return 1;
        for (int64_t r = 0; r < rows; r++) {
            const float *g = gate_up + r * 2 * inter, *u = g + inter;
            float *a = act + r * inter;
            int64_t j = 0;
            for (; j + 8 <= inter; j += 8) {
                enigma_v8 gate = v8_load(g + j), silu = gate / (v8_splat(1.0f) + v8_exp(-gate)) * v8_load(u + j);
                memcpy(a + j, &silu, sizeof silu);
            }
            if (j < inter) {  /* the last few, padded to eight */
                float gate[8] = {0}, up[8] = {0};
                memcpy(gate, g + j, (size_t)(inter - j) * sizeof(float));
                memcpy(up, u + j, (size_t)(inter - j) * sizeof(float));
                enigma_v8 tail = v8_load(gate), silu = tail / (v8_splat(1.0f) + v8_exp(-tail)) * v8_load(up);
                memcpy(a + j, &silu, (size_t)(inter - j) * sizeof(float));
            }
        }
        if (project(&layer->down, inter, act, rows, tmp, hidden, 0, tmp, qscratch, threads)) return 1;
        for (int64_t i = 0; i < rows * hidden; i++) x[i] += tmp[i];
    }
    if (m->final_norm) rms_norm(x, m->final_norm, rows, hidden, m->eps, out);
    else if (out != x) for (int64_t i = 0; i < rows * hidden; i++) out[i] = x[i];
    return 0;
}

/* Greedy decoding in one call (a draft model's drafting): `steps` single-token steps for `rows` sequences.
 * Step s feeds row r's token (first_tokens[r], then its previous argmax) at position starts[r] + s:
 * embedding row (float32, or bfloat16 when embedding_bf16), enigma_decode_layers, the head (head, `vocab`
 * outputs; its bias added) and the argmax, into out[r * steps + s]. tables as enigma_decode_layers reads
 * them (one row per sequence); x, hidden ([rows, hidden]), logits ([rows, vocab]) and positions, slots,
 * lengths ([rows]) are the caller's scratch, scratch and qscratch enigma_decode_layers' (qscratch also
 * the head's). Returns enigma_decode_layers' status, or 4 for a token outside the vocabulary. */
int enigma_decode_greedy(const enigma_decoder *m, const enigma_layer *layers, int64_t num_layers,
                         void *const *caches, int64_t num_blocks, int64_t block_size, const void *embedding,
                         int64_t embedding_bf16, const enigma_projection *head, int64_t vocab, int64_t rows,
                         const int64_t *first_tokens, const int64_t *starts, const int64_t *tables,
                         int64_t max_blocks, int64_t steps, int64_t *out, float *x, float *hidden, float *logits,
                         int64_t *positions, int64_t *slots, int64_t *lengths, float *scratch, uint8_t *qscratch,
                         int threads) {
    const int64_t width = m->hidden;
    for (int64_t step = 0; step < steps; step++) {
        for (int64_t r = 0; r < rows; r++) {
            int64_t token = step == 0 ? first_tokens[r] : out[r * steps + step - 1];
            if (token < 0 || token >= vocab) return 4;
            if (embedding_bf16) {
                const uint16_t *row = (const uint16_t *)embedding + token * width;
                for (int64_t i = 0; i < width; i++) x[r * width + i] = bf16_to_f32(row[i]);
            } else {
                memcpy(x + r * width, (const float *)embedding + token * width, (size_t)width * sizeof(float));
            }
            positions[r] = starts[r] + step;
            int64_t block = positions[r] / block_size;
            if (block >= max_blocks) return 3;
            slots[r] = tables[r * max_blocks + block] * block_size + positions[r] % block_size;
            lengths[r] = positions[r] + 1;
        }
        int status = enigma_decode_layers(m, layers, num_layers, caches, num_blocks, block_size, x, rows, positions,
                                          slots, tables, max_blocks, lengths, scratch, qscratch, hidden, threads);
        if (status) return status;
        if (head->fn(head->kind, head->weight, head->out, width, hidden, rows, qscratch, logits, threads)) return 1;
        for (int64_t r = 0; r < rows; r++) {
            const float *row = logits + r * vocab;
            int64_t best = 0;
            float top = head->bias ? row[0] + head->bias[0] : row[0];
            for (int64_t j = 1; j < vocab; j++) {
                float value = head->bias ? row[j] + head->bias[j] : row[j];
                if (value > top) {
                    top = value;
                    best = j;
                }
            }
            out[r * steps + step] = best;
        }
    }
    return 0;
}
