/* enigma's native CPU kernels (see __init__.py for how they are built and loaded).
 *
 * Portable C: the compiler vectorises the inner loops (`omp simd`) for the CPU
 * it compiles on, and OpenMP splits the work over torch's threads.
 */
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
