/* llama.cpp's reference k-quant quantizers (no importance matrix), reimplemented so that the bytes are
 * llama.cpp's bytes: the same search over scales, the same float32 arithmetic in the same order
 * (compiled with -ffp-contract=off, so no fused multiply-adds the reference does not have), the same
 * round-to-nearest of the "magic number" kind, and IEEE half conversion rounding to nearest even.
 * Block layouts are ggml's (ggml-common.h): Q4_K 144 bytes, Q5_K 176, Q6_K 210 per 256 values. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "ggml_common.h"

#define QK_K 256
#define GROUP_EPS 1e-15f


/* Scale and min for values x (weights w) on 0..nmax levels: a grid of candidate scales, each refined by
 * weighted least squares; the best error wins. Returns the scale, the negated min in *neg_min. */
static float fit_scale_min(int n, int nmax, const float *x, const float *w, uint8_t *L, float *neg_min,
                           uint8_t *trial, float rmin, float rdelta, int nstep) {
    float lo = x[0], hi = x[0], sum_w = w[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; ++i) {
        if (x[i] < lo) lo = x[i];
        if (x[i] > hi) hi = x[i];
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if (lo > 0) lo = 0;
    if (hi == lo) {
        memset(L, 0, (size_t)n);
        *neg_min = -lo;
        return 0.f;
    }
    float iscale = nmax / (hi - lo), scale = 1 / iscale, best = 0;
    for (int i = 0; i < n; ++i) {
        int l = round_nearest(iscale * (x[i] - lo));
        L[i] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        float diff = scale * L[i] + lo - x[i];
        best += w[i] * (diff * diff);
    }
    for (int step = 0; step <= nstep; ++step) {
        iscale = (rmin + rdelta * step + nmax) / (hi - lo);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; ++i) {
            int l = round_nearest(iscale * (x[i] - lo));
            l = l < 0 ? 0 : l > nmax ? nmax : l;
            trial[i] = (uint8_t)l;
            sum_l += w[i] * l;
            sum_l2 += w[i] * l * l;
            sum_xl += w[i] * l * x[i];
        }
        float det = sum_w * sum_l2 - sum_l * sum_l;
        if (det > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float error = 0;
            for (int i = 0; i < n; ++i) {
                float diff = this_scale * trial[i] + this_min - x[i];
                error += w[i] * (diff * diff);
            }
            if (error < best) {
                memcpy(L, trial, (size_t)n);
                best = error;
                scale = this_scale;
                lo = this_min;
            }
        }
    }
    *neg_min = -lo;
    return scale;
}

/* Symmetric scale for x on -nmax..nmax-1 (stored +nmax), weights x^2: nineteen candidate scales. */
static float fit_scale_symmetric(int n, int nmax, const float *x, int8_t *L) {
    float peak = 0, amax = 0;
    for (int i = 0; i < n; ++i) {
        float a = fabsf(x[i]);
        if (a > amax) { amax = a; peak = x[i]; }
    }
    if (amax < GROUP_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / peak, sum_lx = 0, sum_l2 = 0;
    for (int i = 0; i < n; ++i) {
        int l = round_nearest(iscale * x[i]);
        l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sum_lx += w * x[i] * l;
        sum_l2 += w * l * l;
    }
    float scale = sum_l2 ? sum_lx / sum_l2 : 0.0f, best = scale * sum_lx;
    for (int step = -9; step <= 9; ++step) {
        if (step == 0) continue;
        iscale = -(nmax + 0.1f * step) / peak;
        sum_lx = sum_l2 = 0;
        for (int i = 0; i < n; ++i) {
            int l = round_nearest(iscale * x[i]);
            l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
            float w = x[i] * x[i];
            sum_lx += w * x[i] * l;
            sum_l2 += w * l * l;
        }
        if (sum_l2 > 0 && sum_lx * sum_lx > best * sum_l2) {
            for (int i = 0; i < n; ++i) {
                int l = round_nearest(iscale * x[i]);
                L[i] = (int8_t)(nmax + (l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l));
            }
            scale = sum_lx / sum_l2;
            best = scale * sum_lx;
        }
    }
    return scale;
}

static void scale_min_of(int j, const uint8_t *q, uint8_t *scale, uint8_t *min) {
    if (j < 4) {
        *scale = q[j] & 63;
        *min = q[j + 4] & 63;
    } else {
        *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* One Q4_K (bits 4) or Q5_K (bits 5) super-block: d, dmin, 12 bytes of 6-bit scales and mins, [qh,] qs. */
static void quantize_block_k(const float *x, uint8_t *out, int bits) {
    const int nmax = (1 << bits) - 1;
    uint8_t L[QK_K], trial[32];
    float weights[32], mins[8], scales[8], max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; ++j) {
        const float *xs = x + 32 * j;
        float sum_x2 = 0;
        for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; ++l) weights[l] = av_x + fabsf(xs[l]);
        scales[j] = bits == 4 ? fit_scale_min(32, nmax, xs, weights, L + 32 * j, &mins[j], trial, -1.f, 0.1f, 20)
                              : fit_scale_min(32, nmax, xs, weights, L + 32 * j, &mins[j], trial, -0.5f, 0.1f, 15);
        if (scales[j] > max_scale) max_scale = scales[j];
        if (mins[j] > max_min) max_min = mins[j];
    }
    uint16_t d = to_half(max_scale / 63.f), dmin = to_half(max_min / 63.f);
    uint8_t *packed = out + 4;
    memset(packed, 0, 12);
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f, inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    for (int j = 0; j < 8; ++j) {
        uint8_t ls = (uint8_t)round_nearest(inv_scale * scales[j]), lm = (uint8_t)round_nearest(inv_min * mins[j]);
        ls = ls > 63 ? 63 : ls;
        lm = lm > 63 ? 63 : lm;
        if (j < 4) {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            packed[j - 4] |= (uint8_t)((ls >> 4) << 6);
            packed[j] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    memcpy(out, &d, 2);
    memcpy(out + 2, &dmin, 2);
    for (int j = 0; j < 8; ++j) {
        uint8_t sc, m;
        scale_min_of(j, packed, &sc, &m);
        const float step = from_half(d) * sc;
        if (!step) continue;
        const float offset = from_half(dmin) * m;
        for (int i = 0; i < 32; ++i) {
            int l = round_nearest((x[32 * j + i] + offset) / step);
            L[32 * j + i] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        }
    }
    if (bits == 4) {
        uint8_t *qs = out + 16;
        for (int c = 0; c < 4; ++c)
            for (int l = 0; l < 32; ++l) qs[32 * c + l] = (uint8_t)(L[64 * c + l] | (L[64 * c + 32 + l] << 4));
    } else {
        uint8_t *qh = out + 16, *qs = out + 48;
        memset(qh, 0, 32);
        uint8_t high1 = 1, high2 = 2;
        for (int c = 0; c < 4; ++c) {
            for (int l = 0; l < 32; ++l) {
                int low = L[64 * c + l], up = L[64 * c + 32 + l];
                if (low > 15) { low -= 16; qh[l] |= high1; }
                if (up > 15) { up -= 16; qh[l] |= high2; }
                qs[32 * c + l] = (uint8_t)(low | (up << 4));
            }
            high1 <<= 2;
            high2 <<= 2;
        }
    }
}

/* One Q6_K super-block: ql[128], qh[64], 16 int8 scales, d (last). */
static void quantize_block_q6_k(const float *x, uint8_t *out) {
    int8_t L[QK_K];
    float scales[16], max_scale = 0, max_abs = 0;
    for (int ib = 0; ib < 16; ++ib) {
        scales[ib] = fit_scale_symmetric(16, 32, x + 16 * ib, L + 16 * ib);
        float a = fabsf(scales[ib]);
        if (a > max_abs) { max_abs = a; max_scale = scales[ib]; }
    }
    uint8_t *ql = out, *qh = out + 128;
    int8_t *sc = (int8_t *)(out + 192);
    if (max_abs < GROUP_EPS) {
        memset(out, 0, 210);
        return;
    }
    float iscale = -128.f / max_scale;
    uint16_t d = to_half(1 / iscale);
    memcpy(out + 208, &d, 2);
    for (int ib = 0; ib < 16; ++ib) {
        int s = round_nearest(iscale * scales[ib]);
        sc[ib] = (int8_t)(s > 127 ? 127 : s);
    }
    for (int j = 0; j < 16; ++j) {
        float step = from_half(d) * sc[j];
        if (!step) continue;
        for (int i = 0; i < 16; ++i) {
            int l = round_nearest(x[16 * j + i] / step);
            l = l < -32 ? -32 : l > 31 ? 31 : l;
            L[16 * j + i] = (int8_t)(l + 32);
        }
    }
    for (int half = 0; half < 2; ++half) {
        const int8_t *q = L + 128 * half;
        uint8_t *low = ql + 64 * half, *high = qh + 32 * half;
        for (int l = 0; l < 32; ++l) {
            low[l] = (uint8_t)((q[l] & 0xF) | ((q[l + 64] & 0xF) << 4));
            low[l + 32] = (uint8_t)((q[l + 32] & 0xF) | ((q[l + 96] & 0xF) << 4));
            high[l] = (uint8_t)((q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6));
        }
    }
}

/* Quantize rows x [rows][n] (n a multiple of 256) into out, block after block; bits 4, 5 or 6. */
int enigma_quantize_k(const float *x, uint8_t *out, int64_t rows, int64_t n, int bits) {
    if (n % QK_K || (bits != 4 && bits != 5 && bits != 6)) return -1;
    const int64_t blocks = rows * (n / QK_K);
    const int size = bits == 4 ? 144 : bits == 5 ? 176 : 210;
    #pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        if (bits == 6) quantize_block_q6_k(x + b * QK_K, out + b * size);
        else quantize_block_k(x + b * QK_K, out + b * size, bits);
    }
    return 0;
}
