/* enigma's native CPU kernels (see __init__.py for how they are built and loaded).
 *
 * Portable C: the compiler vectorises the inner loops (`omp simd`) for the CPU
 * it compiles on, and OpenMP splits the work over torch's threads.
 */
#include <math.h>
#include <stdint.h>

/* Four weight rows against the m rows of x, two rows of x at a time: each
 * weight element loaded serves two multiply-adds. */
static void four_rows(const float *x, int64_t m, int64_t in, const float *w, float *y, int64_t out) {
    const float *w0 = w, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
    int64_t t = 0;
    for (; t + 2 <= m; t += 2) {
        const float *xa = x + t * in, *xb = xa + in;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0, b1 = 0, b2 = 0, b3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, b0, b1, b2, b3)
        for (int64_t k = 0; k < in; k++) {
            float u = xa[k], v = xb[k];
            float p0 = w0[k], p1 = w1[k], p2 = w2[k], p3 = w3[k];
            a0 += p0 * u; a1 += p1 * u; a2 += p2 * u; a3 += p3 * u;
            b0 += p0 * v; b1 += p1 * v; b2 += p2 * v; b3 += p3 * v;
        }
        float *ya = y + t * out, *yb = ya + out;
        ya[0] = a0; ya[1] = a1; ya[2] = a2; ya[3] = a3;
        yb[0] = b0; yb[1] = b1; yb[2] = b2; yb[3] = b3;
    }
    for (; t < m; t++) {
        const float *xt = x + t * in;
        float a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
        for (int64_t k = 0; k < in; k++) {
            float v = xt[k];
            a0 += w0[k] * v; a1 += w1[k] * v; a2 += w2[k] * v; a3 += w3[k] * v;
        }
        float *yt = y + t * out;
        yt[0] = a0; yt[1] = a1; yt[2] = a2; yt[3] = a3;
    }
}

static void one_row(const float *x, int64_t m, int64_t in, const float *w, float *y, int64_t out) {
    for (int64_t t = 0; t < m; t++) {
        const float *xt = x + t * in;
        float a = 0;
#pragma omp simd reduction(+ : a)
        for (int64_t k = 0; k < in; k++) a += w[k] * xt[k];
        y[t * out] = a;
    }
}

/* y[m, out] = x[m, in] @ w[out, in]^T (+ bias[out]); all contiguous float32.
 *
 * Few rows of x (decode) make this a stream over the weights, bound by memory
 * bandwidth: each thread walks one contiguous stretch of rows (a static
 * schedule), so the hardware prefetchers see one sequential read per thread. */
void enigma_linear(const float *x, int64_t m, int64_t in, const float *w, int64_t out,
                   const float *bias, float *y, int32_t threads) {
    int64_t blocks = out / 4;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; b++) four_rows(x, m, in, w + b * 4 * in, y + b * 4, out);
#pragma omp for schedule(static)
        for (int64_t j = blocks * 4; j < out; j++) one_row(x, m, in, w + j * in, y + j, out);
        if (bias) {
#pragma omp for schedule(static)
            for (int64_t t = 0; t < m; t++)
                for (int64_t j = 0; j < out; j++) y[t * out + j] += bias[j];
        }
    }
}

/* One sequence's query heads that share KV head `keys`/`values` (`group` of
 * them, [group, dim] at q) over its cached positions first..seq_len-1, read
 * block by block through its block table: online softmax, one pass over the
 * keys and values (flash-decoding's recurrence, a block at a time).
 * Returns nonzero if the table is too short or names a block outside the pool. */
static int attend_group(const float *q, int64_t group, int64_t dim, const float *keys, const float *values,
                        const int64_t *table, int64_t table_len, int64_t num_blocks, int64_t block_size,
                        int64_t first, int64_t seq_len, float scale, float *o) {
    float maxima[group], sums[group], scores[block_size];
    for (int64_t g = 0; g < group; g++) {
        maxima[g] = -INFINITY;
        sums[g] = 0;
        for (int64_t d = 0; d < dim; d++) o[g * dim + d] = 0;
    }
    for (int64_t start = first - first % block_size; start < seq_len; start += block_size) {
        if (start / block_size >= table_len) return 1;
        int64_t block = table[start / block_size];
        if (block < 0 || block >= num_blocks) return 1;
        const float *kb = keys + block * block_size * dim, *vb = values + block * block_size * dim;
        int64_t lo = (first > start ? first : start) - start;
        int64_t hi = (seq_len < start + block_size ? seq_len : start + block_size) - start;
        for (int64_t g = 0; g < group; g++) {
            const float *qg = q + g * dim;
            float *og = o + g * dim;
            float block_max = -INFINITY;
            for (int64_t t = lo; t < hi; t++) {
                const float *kt = kb + t * dim;
                float dot = 0;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < dim; d++) dot += qg[d] * kt[d];
                scores[t] = dot * scale;
                if (scores[t] > block_max) block_max = scores[t];
            }
            if (block_max > maxima[g]) {
                float correction = expf(maxima[g] - block_max);  /* 0 for the first block */
                sums[g] *= correction;
                for (int64_t d = 0; d < dim; d++) og[d] *= correction;
                maxima[g] = block_max;
            }
            for (int64_t t = lo; t < hi; t++) {
                float p = expf(scores[t] - maxima[g]);
                const float *vt = vb + t * dim;
                sums[g] += p;
#pragma omp simd
                for (int64_t d = 0; d < dim; d++) og[d] += p * vt[d];
            }
        }
    }
    for (int64_t g = 0; g < group; g++) {
        float inverse = 1.0f / sums[g];
        for (int64_t d = 0; d < dim; d++) o[g * dim + d] *= inverse;
    }
    return 0;
}

/* Decode attention over the paged cache, read in place: each sequence's one
 * query ([num_seqs, heads, dim]) over its seq_lens[s] cached keys and values
 * (the last `window` of them when window > 0), the blocks named by
 * block_tables[s] ([num_seqs, max_blocks]). kv_cache is the torch backend's
 * layout, [2, kv_heads, num_blocks, block_size, dim]; query heads h*group ..
 * (h+1)*group-1 share KV head h. Sequences and KV heads run in parallel.
 * Returns the number of (sequence, KV head) pairs whose table was too short
 * or named a block outside the pool (their output is undefined); 0 when all
 * is well. */
int64_t enigma_decode_attention(const float *query, int64_t num_seqs, int64_t heads, int64_t kv_heads,
                                int64_t dim, const float *kv_cache, int64_t num_blocks, int64_t block_size,
                                const int64_t *block_tables, int64_t max_blocks, const int64_t *seq_lens,
                                int64_t window, float scale, float *out, int32_t threads) {
    int64_t group = heads / kv_heads, head_stride = num_blocks * block_size * dim;
    int64_t bad = 0;
#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads) reduction(+ : bad)
    for (int64_t s = 0; s < num_seqs; s++) {
        for (int64_t h = 0; h < kv_heads; h++) {
            int64_t seq_len = seq_lens[s];
            int64_t first = window > 0 && seq_len > window ? seq_len - window : 0;
            const float *keys = kv_cache + h * head_stride, *values = keys + kv_heads * head_stride;
            int64_t offset = (s * heads + h * group) * dim;
            bad += attend_group(query + offset, group, dim, keys, values, block_tables + s * max_blocks,
                                max_blocks, num_blocks, block_size, first, seq_len, scale, out + offset);
        }
    }
    return bad;
}
