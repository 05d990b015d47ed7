/* EXL2 weights multiplied in their packed form: y[rows, out] = x[rows, in] @ W^T.
 *
 * A weight is described by struct exl2_weight (built by kernels.py). Stored row r of the packed weight holds
 * input perm[r]; rows come in groups of one bit width, each group's values packed down the columns as one
 * LSB-first bit stream per column, and column c of group g has the scale code^2 * scale_max[g] / 256. So
 *
 *   y[r, c] = sum_g scale[g, c] * (sum_{i in g} xp[r, i] * q[i, c]  -  zero_g * sum_{i in g} xp[r, i])
 *
 * with xp the permuted activations. Work is split over blocks of COLS output columns (OpenMP): a block's
 * words of a packed row are contiguous, so the inner loop over columns is plain vector code (shift, mask,
 * convert, multiply-add) the compiler vectorises for the CPU it was built for.
 */
#include <stdint.h>
#include <string.h>

#define COLS 64
#define MAX_ROWS 16

struct exl2_weight {
    const int32_t *q_weight;   /* [qrows, columns] */
    const int32_t *q_scale;    /* [groups, columns / 8] */
    const float *scale_max;    /* [groups]: q_scale_max / 256, float32 */
    const int32_t *group_bits; /* [groups] */
    const int32_t *group_rows; /* [groups] */
    const int32_t *group_qrow; /* [groups] */
    const int64_t *perm;       /* [in] */
    int64_t groups, columns, in, out;
};

static inline void decode_row(const int32_t *words, int64_t columns, int64_t i, int bits, int64_t c0, int n,
                              float *v) {
    const int64_t bit = i * bits;
    const uint32_t *w0 = (const uint32_t *)words + (bit >> 5) * columns + c0;
    const int shift = (int)(bit & 31);
    const uint32_t mask = (1u << bits) - 1u;
    if (shift + bits <= 32) {
        for (int c = 0; c < n; c++) v[c] = (float)(int32_t)((w0[c] >> shift) & mask);
    } else {
        const uint32_t *w1 = w0 + columns;
        for (int c = 0; c < n; c++) v[c] = (float)(int32_t)(((w0[c] >> shift) | (w1[c] << (32 - shift))) & mask);
    }
}

static void column_block(const struct exl2_weight *w, const float *xp, int64_t rows, int64_t c0, float *y) {
    const int n = (int)((w->out - c0) < COLS ? (w->out - c0) : COLS);
    float total[MAX_ROWS][COLS], acc[MAX_ROWS][COLS], v[COLS];
    memset(total, 0, sizeof(total));
    int64_t first = 0;
    for (int64_t g = 0; g < w->groups; g++) {
        const int bits = w->group_bits[g];
        const int64_t count = w->group_rows[g];
        const int32_t *words = w->q_weight + (int64_t)w->group_qrow[g] * w->columns;
        float xsum[MAX_ROWS];
        for (int64_t r = 0; r < rows; r++) {
            memset(acc[r], 0, sizeof(float) * COLS);
            xsum[r] = 0.0f;
        }
        for (int64_t i = 0; i < count; i++) {
            decode_row(words, w->columns, i, bits, c0, n, v);
            for (int64_t r = 0; r < rows; r++) {
                const float xi = xp[r * w->in + first + i];
                xsum[r] += xi;
                float *a = acc[r];
                for (int c = 0; c < n; c++) a[c] += xi * v[c];
            }
        }
        const float zero = (float)(1 << (bits - 1));
        float scale[COLS];
        const uint32_t *codes = (const uint32_t *)w->q_scale + g * (w->columns / 8);
        for (int c = 0; c < n; c++) {
            const int64_t col = c0 + c;
            const float code = (float)(int32_t)(((codes[col >> 3] >> (4 * (col & 7))) & 15u) + 1u);
            scale[c] = code * code * w->scale_max[g];
        }
        for (int64_t r = 0; r < rows; r++)
            for (int c = 0; c < n; c++) total[r][c] += scale[c] * (acc[r][c] - zero * xsum[r]);
        first += count;
    }
    for (int64_t r = 0; r < rows; r++) memcpy(y + r * w->out + c0, total[r], sizeof(float) * n);
}

/* One row (a decode step), a full block of ONE columns: the sums stay in registers through each group. */
#define ONE 128
static void column_block_one(const struct exl2_weight *w, const float *xp, int64_t c0, float *y) {
    float total[ONE] = {0};
    int64_t first = 0;
    for (int64_t g = 0; g < w->groups; g++) {
        const int bits = w->group_bits[g];
        const uint32_t mask = (1u << bits) - 1u;
        const int64_t count = w->group_rows[g];
        const uint32_t *words = (const uint32_t *)w->q_weight + (int64_t)w->group_qrow[g] * w->columns + c0;
        float acc[ONE] = {0}, xsum = 0.0f;
        for (int64_t i = 0; i < count; i++) {
            const float xi = xp[first + i];
            const int64_t bit = i * bits;
            const uint32_t *w0 = words + (bit >> 5) * w->columns;
            const int shift = (int)(bit & 31);
            xsum += xi;
            if (shift + bits <= 32) {
                for (int c = 0; c < ONE; c++) acc[c] += xi * (float)(int32_t)((w0[c] >> shift) & mask);
            } else {
                const uint32_t *w1 = w0 + w->columns;
                for (int c = 0; c < ONE; c++)
                    acc[c] += xi * (float)(int32_t)(((w0[c] >> shift) | (w1[c] << (32 - shift))) & mask);
            }
        }
        const float zero = (float)(1 << (bits - 1));
        const uint32_t *codes = (const uint32_t *)w->q_scale + g * (w->columns / 8) + c0 / 8;
        for (int c = 0; c < ONE; c++) {
            const float code = (float)(int32_t)(((codes[c >> 3] >> (4 * (c & 7))) & 15u) + 1u);
            total[c] += code * code * w->scale_max[g] * (acc[c] - zero * xsum);
        }
        first += count;
    }
    for (int c = 0; c < ONE; c++) y[c0 + c] = total[c];
}

/* The core's native-decoder signature (enigma_qmatmul's): kind is unused, weight a struct exl2_weight,
 * scratch rows * in floats. Returns nonzero for what it refuses. */
int enigma_exl2_qmatmul(int kind, const void *weight, int64_t out, int64_t in, const float *x, int64_t rows,
                        uint8_t *scratch, float *y, int threads) {
    (void)kind;
    const struct exl2_weight *w = (const struct exl2_weight *)weight;
    if (rows < 1 || rows > MAX_ROWS || out != w->out || in != w->in) return 1;
    float *xp = (float *)scratch;
    for (int64_t r = 0; r < rows; r++)
        for (int64_t i = 0; i < in; i++) xp[r * in + i] = x[r * in + w->perm[i]];
    if (rows == 1) {
        const int64_t full = out / ONE;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t b = 0; b < full; b++) column_block_one(w, xp, b * ONE, y);
        for (int64_t c0 = full * ONE; c0 < out; c0 += COLS) column_block(w, xp, 1, c0, y);  /* the rest */
        return 0;
    }
    const int64_t blocks = (out + COLS - 1) / COLS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) column_block(w, xp, rows, b * COLS, y);
    return 0;
}

/* Columns [c0, c1) of the weight as float32 [in, c1 - c0] in stored row order (prefill: the caller multiplies
 * the permuted activations by it). */
int enigma_exl2_dequantize(const void *weight, int64_t c0, int64_t c1, float *out, int threads) {
    const struct exl2_weight *w = (const struct exl2_weight *)weight;
    if (c0 < 0 || c1 > w->out || c0 >= c1) return 1;
    const int64_t width = c1 - c0;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < w->groups; g++) {
        const int bits = w->group_bits[g];
        const int32_t *words = w->q_weight + (int64_t)w->group_qrow[g] * w->columns;
        const uint32_t *codes = (const uint32_t *)w->q_scale + g * (w->columns / 8);
        const float zero = (float)(1 << (bits - 1));
        int64_t first = 0;
        for (int64_t h = 0; h < g; h++) first += w->group_rows[h];
        float v[COLS], scale[COLS];
        for (int64_t b = c0; b < c1; b += COLS) {
            const int n = (int)((c1 - b) < COLS ? (c1 - b) : COLS);
            for (int c = 0; c < n; c++) {
                const int64_t col = b + c;
                const float code = (float)(int32_t)(((codes[col >> 3] >> (4 * (col & 7))) & 15u) + 1u);
                scale[c] = code * code * w->scale_max[g];
            }
            for (int64_t i = 0; i < w->group_rows[g]; i++) {
                decode_row(words, w->columns, i, bits, b, n, v);
                float *row = out + (first + i) * width + (b - c0);
                for (int c = 0; c < n; c++) row[c] = (v[c] - zero) * scale[c];
            }
        }
    }
    return 0;
}
