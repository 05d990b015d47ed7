/* Matrix products with weights in their GGUF blocks, as llama.cpp's CPU backend computes them.
 *
 * The activations are quantized per block first — Q8_K (a float scale per 256 values, int8 values and
 * sums of each 16) for the k-quants, Q8_0 (a half scale per 32) for Q8_0 — and every block product is an
 * integer dot product scaled once: the weights are never widened to floats, so a decode step reads
 * their bytes and nothing more. Block layouts are ggml's (ggml-common.h). Portable C written for the
 * vectoriser, and on AVX2 machines the block products in intrinsics as llama.cpp writes them (unsigned x
 * signed byte multiply-adds, the sub-block scales folded into the 16-bit pair sums); OpenMP splits the
 * output features over torch's threads, and each weight row is read once for all the activation rows. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "ggml_common.h"

#define QK_K 256
#define PREFETCH_ROWS 4
#define QK8_0 32

enum { TYPE_Q4_0 = 2, TYPE_Q4_1 = 3, TYPE_Q5_0 = 6, TYPE_Q5_1 = 7, TYPE_Q8_0 = 8, TYPE_Q4_K = 12, TYPE_Q5_K = 13,
       TYPE_Q6_K = 14 };   /* ggml_type values */

typedef struct { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; } block_q8_K;

static inline int64_t block_values(int type) { return type >= TYPE_Q4_K ? QK_K : QK8_0; }

static inline int64_t block_bytes(int type) {     /* ggml-common.h's block sizes; 0 for types not here */
    switch (type) {
        case TYPE_Q4_0: return 18;
        case TYPE_Q4_1: return 20;
        case TYPE_Q5_0: return 22;
        case TYPE_Q5_1: return 24;
        case TYPE_Q8_0: return 34;
        case TYPE_Q4_K: return 144;
        case TYPE_Q5_K: return 176;
        case TYPE_Q6_K: return 210;
        default: return 0;
    }
}
typedef struct { uint16_t d; int8_t qs[QK8_0]; } block_q8_0;

/* ---------------------------------------------------------------- activations */

static void quantize_q8_K(const float *x, block_q8_K *y, int64_t blocks) {
    for (int64_t i = 0; i < blocks; i++, x += QK_K) {
        float max = 0.f, amax = 0.f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        if (amax == 0.f) {
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = round_nearest(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[i].qs[16 * j + l];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1.f / iscale;
    }
}

static void quantize_q8_0(const float *x, block_q8_0 *y, int64_t blocks) {
    for (int64_t i = 0; i < blocks; i++, x += QK8_0) {
        float amax = 0.f;
        for (int j = 0; j < QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / 127.f;
        const float id = d ? 1.f / d : 0.f;
        y[i].d = to_half(d);
        for (int j = 0; j < QK8_0; j++) y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

/* ---------------------------------------------------------------- block dot products */

static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *scale, uint8_t *min) {
    if (j < 4) {
        *scale = q[j] & 63;
        *min = q[j + 4] & 63;
    } else {
        *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static float dot_q8_0(const uint8_t *w, const void *xq, int64_t blocks) {
    const block_q8_0 *x = xq;
    float sum = 0.f;
    for (int64_t i = 0; i < blocks; i++, w += 34) {
        uint16_t dw;
        memcpy(&dw, w, 2);
        const int8_t *q = (const int8_t *)(w + 2);
        int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int l = 0; l < QK8_0; l++) acc += q[l] * x[i].qs[l];
        sum += (float)acc * (from_half(dw) * from_half(x[i].d));
    }
    return sum;
}

/* The legacy 32-value types against Q8_0 activations. `offset` types (Q4_0, Q5_0) store q + 8 or q + 16;
 * the others (Q4_1, Q5_1) add a minimum: sum d_w * d_x * (q . x) + m_w * d_x * sum(x). */
static inline void legacy_values(int type, const uint8_t *b, int8_t *q, float *d, float *m) {
    uint16_t dh, mh = 0;
    memcpy(&dh, b, 2);
    const int has_min = type == TYPE_Q4_1 || type == TYPE_Q5_1, five = type == TYPE_Q5_0 || type == TYPE_Q5_1;
    if (has_min) memcpy(&mh, b + 2, 2);
    const uint8_t *qs = b + 2 + 2 * has_min + 4 * five;
    uint32_t qh = 0;
    if (five) memcpy(&qh, b + 2 + 2 * has_min, 4);
    const int bias = has_min ? 0 : (five ? 16 : 8);
    for (int l = 0; l < 16; l++) {
        q[l] = (int8_t)(((qs[l] & 0xF) | (five ? ((qh >> l) & 1) << 4 : 0)) - bias);
        q[l + 16] = (int8_t)(((qs[l] >> 4) | (five ? ((qh >> (l + 16)) & 1) << 4 : 0)) - bias);
    }
    *d = from_half(dh);
    *m = has_min ? from_half(mh) : 0.f;
}

static float dot_legacy(int type, const uint8_t *w, const void *xq, int64_t blocks) {
    const block_q8_0 *x = xq;
    const int64_t size = type == TYPE_Q4_0 ? 18 : type == TYPE_Q4_1 ? 20 : type == TYPE_Q5_0 ? 22 : 24;
    float sum = 0.f;
    int8_t q[QK8_0];
    for (int64_t i = 0; i < blocks; i++, w += size) {
        float d, m;
        legacy_values(type, w, q, &d, &m);
        int32_t acc = 0, xs = 0;
        for (int l = 0; l < QK8_0; l++) {
            acc += q[l] * x[i].qs[l];
            xs += x[i].qs[l];
        }
        const float dx = from_half(x[i].d);
        sum += d * dx * (float)acc + m * dx * (float)xs;
    }
    return sum;
}

static float dot_q4_0(const uint8_t *w, const void *x, int64_t n) { return dot_legacy(TYPE_Q4_0, w, x, n); }
static float dot_q4_1(const uint8_t *w, const void *x, int64_t n) { return dot_legacy(TYPE_Q4_1, w, x, n); }
static float dot_q5_0(const uint8_t *w, const void *x, int64_t n) { return dot_legacy(TYPE_Q5_0, w, x, n); }
static float dot_q5_1(const uint8_t *w, const void *x, int64_t n) { return dot_legacy(TYPE_Q5_1, w, x, n); }

/* The 256 values of a k-quant block, unpacked to bytes first (simple loops the vectoriser turns into
 * shuffles and masks), then one int8 dot product per 16 values: sums16[j] = sum of q[16j..16j+15] * q8. */
static inline void dot16(const int8_t *q, const int8_t *q8, int32_t *sums16) {
    for (int j = 0; j < QK_K / 16; j++) {
        int32_t acc = 0;
#pragma omp simd reduction(+ : acc)
        for (int l = 0; l < 16; l++) acc += q[16 * j + l] * q8[16 * j + l];
        sums16[j] = acc;
    }
}

static inline void unpack_q4(const uint8_t *qs, int8_t *q) {
    for (int c = 0; c < 4; c++) {
#pragma omp simd
        for (int l = 0; l < 32; l++) {
            q[64 * c + l] = (int8_t)(qs[32 * c + l] & 0xF);
            q[64 * c + 32 + l] = (int8_t)(qs[32 * c + l] >> 4);
        }
    }
}

static float dot_q45_K(const uint8_t *w, const block_q8_K *x, int64_t blocks, int five) {
    const int64_t size = five ? 176 : 144;
    float sum = 0.f;
    int8_t q[QK_K];
    int32_t sums16[QK_K / 16];
    for (int64_t i = 0; i < blocks; i++, w += size) {
        uint16_t dh, mh;
        memcpy(&dh, w, 2);
        memcpy(&mh, w + 2, 2);
        const uint8_t *packed = w + 4;
        unpack_q4(w + (five ? 48 : 16), q);
        if (five) {
            const uint8_t *qh = w + 16;
            for (int s_ = 0; s_ < 8; s_++) {
#pragma omp simd
                for (int l = 0; l < 32; l++) q[32 * s_ + l] |= (int8_t)(((qh[l] >> s_) & 1) << 4);
            }
        }
        dot16(q, x[i].qs, sums16);
        int32_t sumi = 0, summ = 0;
        for (int s_ = 0; s_ < 8; s_++) {
            uint8_t scale, min;
            scale_min_k4(s_, packed, &scale, &min);
            sumi += scale * (sums16[2 * s_] + sums16[2 * s_ + 1]);
            summ += min * (x[i].bsums[2 * s_] + x[i].bsums[2 * s_ + 1]);
        }
        sum += x[i].d * (from_half(dh) * (float)sumi - from_half(mh) * (float)summ);
    }
    return sum;
}

static float dot_q4_K(const uint8_t *w, const void *xq, int64_t blocks) {
    return dot_q45_K(w, xq, blocks, 0);
}

static float dot_q5_K(const uint8_t *w, const void *xq, int64_t blocks) {
    return dot_q45_K(w, xq, blocks, 1);
}

#if defined(__AVX2__)
static float dot_q45_K_avx2(const uint8_t *w, const block_q8_K *x, int64_t blocks, int five);
static float dot_q4_K_avx2(const uint8_t *w, const void *xq, int64_t blocks) {
    return dot_q45_K_avx2(w, xq, blocks, 0);
}
static float dot_q5_K_avx2(const uint8_t *w, const void *xq, int64_t blocks) {
    return dot_q45_K_avx2(w, xq, blocks, 1);
}
#endif

static float dot_q6_K(const uint8_t *w, const void *xq, int64_t blocks) {
    const block_q8_K *x = xq;
    float sum = 0.f;
    int8_t q[QK_K];
    int32_t sums16[QK_K / 16];
    for (int64_t i = 0; i < blocks; i++, w += 210) {
        const uint8_t *ql = w, *qh = w + 128;
        const int8_t *scales = (const int8_t *)(w + 192);
        uint16_t dh;
        memcpy(&dh, w + 208, 2);
        for (int half = 0; half < 2; half++) {
            const uint8_t *l_ = ql + 64 * half, *h_ = qh + 32 * half;
            int8_t *out = q + 128 * half;
#pragma omp simd
            for (int l = 0; l < 32; l++) {
                out[l] = (int8_t)(((l_[l] & 0xF) | ((h_[l] & 3) << 4)) - 32);
                out[32 + l] = (int8_t)(((l_[32 + l] & 0xF) | (((h_[l] >> 2) & 3) << 4)) - 32);
                out[64 + l] = (int8_t)(((l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4)) - 32);
                out[96 + l] = (int8_t)(((l_[32 + l] >> 4) | (((h_[l] >> 6) & 3) << 4)) - 32);
            }
        }
        dot16(q, x[i].qs, sums16);
        int32_t sumi = 0;
        for (int j = 0; j < QK_K / 16; j++) sumi += scales[j] * sums16[j];
        sum += x[i].d * from_half(dh) * (float)sumi;
    }
    return sum;
}

#if defined(__AVX2__)
/* ---------------------------------------------------------------- AVX2 block products */

static inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

static inline float hsum_f32(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum over pairs of (unsigned u * signed s), each 16-bit pair sum times `scale16`, as 8 int32 lanes */
static inline __m256i scaled_dot(__m256i u, __m256i s, __m256i scale16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), scale16);
}

static float dot_q8_0_avx2(const uint8_t *w, const void *xq, int64_t blocks) {
    const block_q8_0 *x = xq;
    __m256 acc = _mm256_setzero_ps();
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t i = 0; i < blocks; i++, w += 34) {
        uint16_t dw;
        memcpy(&dw, w, 2);
        const __m256i q = _mm256_loadu_si256((const __m256i *)(w + 2));
        const __m256i y = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i sums = scaled_dot(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q), ones);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(from_half(dw) * from_half(x[i].d)), _mm256_cvtepi32_ps(sums), acc);
    }
    return hsum_f32(acc);
}

/* 0xFF in byte k where bit k of the 32 bits at `bits` is set */
static inline __m256i bytes_from_bits(const uint8_t *bits) {
    uint32_t word;
    memcpy(&word, bits, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)word), _mm256_set_epi64x(
        0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
    const __m256i mask = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask);
}

static float dot_legacy_avx2(int type, const uint8_t *w, const void *xq, int64_t blocks) {
    const block_q8_0 *x = xq;
    const int has_min = type == TYPE_Q4_1 || type == TYPE_Q5_1, five = type == TYPE_Q5_0 || type == TYPE_Q5_1;
    const int64_t size = 18 + 2 * has_min + 4 * five;
    const __m256i low4 = _mm256_set1_epi8(0xF), ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    const __m256i bias = _mm256_set1_epi8(five ? 16 : 8), high_bit = _mm256_set1_epi8(0x10);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < blocks; i++, w += size) {
        uint16_t dh, mh = 0;
        memcpy(&dh, w, 2);
        if (has_min) memcpy(&mh, w + 2, 2);
        const __m128i packed = _mm_loadu_si128((const __m128i *)(w + 2 + 2 * has_min + 4 * five));
        const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
        __m256i q = _mm256_and_si256(both, low4);                      /* elements 0..15 low, 16..31 high */
        if (five) q = _mm256_or_si256(q, _mm256_and_si256(bytes_from_bits(w + 2 + 2 * has_min), high_bit));
        const __m256i y = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const float dx = from_half(x[i].d);
        __m256i sums;
        if (has_min) {                                                  /* q unsigned: u8 x s8 directly */
            sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), ones16);
            const __m256i xs = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, y), ones16);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(from_half(mh) * dx), _mm256_cvtepi32_ps(xs), acc);
        } else {                                                        /* signed: the sign trick */
            q = _mm256_sub_epi8(q, bias);
            sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q)), ones16);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(from_half(dh) * dx), _mm256_cvtepi32_ps(sums), acc);
    }
    return hsum_f32(acc);
}

static float dot_q4_0_avx2(const uint8_t *w, const void *x, int64_t n) { return dot_legacy_avx2(TYPE_Q4_0, w, x, n); }
static float dot_q4_1_avx2(const uint8_t *w, const void *x, int64_t n) { return dot_legacy_avx2(TYPE_Q4_1, w, x, n); }
static float dot_q5_0_avx2(const uint8_t *w, const void *x, int64_t n) { return dot_legacy_avx2(TYPE_Q5_0, w, x, n); }
static float dot_q5_1_avx2(const uint8_t *w, const void *x, int64_t n) { return dot_legacy_avx2(TYPE_Q5_1, w, x, n); }

/* The eight 6-bit scales and eight 6-bit mins of a Q4_K/Q5_K block's 12 bytes, as bytes: scales in
 * words 0-1, mins in words 2-3 (the same values as scale_min_k4, four at a time by 32-bit masks). */
static inline void scales_mins_k4(const uint8_t *packed, uint32_t out[4]) {
    uint32_t w[3];
    memcpy(w, packed, 12);
    out[0] = w[0] & 0x3f3f3f3f;
    out[1] = (w[2] & 0x0f0f0f0f) | (((w[0] >> 6) & 0x03030303) << 4);
    out[2] = w[1] & 0x3f3f3f3f;
    out[3] = ((w[2] >> 4) & 0x0f0f0f0f) | (((w[1] >> 6) & 0x03030303) << 4);
}

static float dot_q45_K_avx2(const uint8_t *w, const block_q8_K *x, int64_t blocks, int five) {
    const int64_t size = five ? 176 : 144;
    const __m256i low4 = _mm256_set1_epi8(0xF), bit = _mm256_set1_epi8(1);
    /* byte shuffles broadcasting 16-bit scale k to every lane of a 128-bit half */
    __m256i spread[8];
    for (int k = 0; k < 8; k++) spread[k] = _mm256_set1_epi16((short)((2 * k) | ((2 * k + 1) << 8)));
    __m256 total = _mm256_setzero_ps();
    __m128 total_mins = _mm_setzero_ps();
    for (int64_t i = 0; i < blocks; i++, w += size) {
        uint16_t dh, mh;
        memcpy(&dh, w, 2);
        memcpy(&mh, w + 2, 2);
        uint32_t packed[4];
        scales_mins_k4(w + 4, packed);
        const __m256i scales_mins = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)packed));
        const __m128i mins = _mm256_extracti128_si256(scales_mins, 1);
        const __m256i scales = _mm256_permute2x128_si256(scales_mins, scales_mins, 0x00);  /* both halves */
        /* mins: sum over the eight 32-value groups of min * (sum of the group's activations) */
        const __m256i bsums = _mm256_loadu_si256((const __m256i *)x[i].bsums);
        const __m128i pair_sums = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256(bsums, 1));
        total_mins = _mm_fmadd_ps(_mm_set1_ps(x[i].d * from_half(mh)), _mm_cvtepi32_ps(_mm_madd_epi16(mins, pair_sums)),
                                  total_mins);
        const uint8_t *qs = w + (five ? 48 : 16);
        const __m256i high = five ? _mm256_loadu_si256((const __m256i *)(w + 16)) : _mm256_setzero_si256();
        __m256i acc = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_and_si256(bytes, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4);
            if (five) {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(high, 2 * c), bit), 4));
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(
                    _mm256_and_si256(_mm256_srli_epi16(high, 2 * c + 1), bit), 4));
            }
            const __m256i y_lo = _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * c));
            const __m256i y_hi = _mm256_loadu_si256((const __m256i *)(x[i].qs + 64 * c + 32));
            acc = _mm256_add_epi32(acc, scaled_dot(lo, y_lo, _mm256_shuffle_epi8(scales, spread[2 * c])));
            acc = _mm256_add_epi32(acc, scaled_dot(hi, y_hi, _mm256_shuffle_epi8(scales, spread[2 * c + 1])));
        }
        total = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d * from_half(dh)), _mm256_cvtepi32_ps(acc), total);
    }
    __m128 m = _mm_add_ps(total_mins, _mm_movehl_ps(total_mins, total_mins));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    return hsum_f32(total) - _mm_cvtss_f32(m);
}

static float dot_q6_K_avx2(const uint8_t *w, const void *xq, int64_t blocks) {
    const block_q8_K *x = xq;
    const __m256i low4 = _mm256_set1_epi8(0xF), three = _mm256_set1_epi8(3);
    /* byte shuffles that spread scales 2g and 2g+1 over 8 lanes each, for g = 0..3 of a half */
    const __m128i spread[4] = {
        _mm_set_epi8(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
        _mm_set_epi8(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
        _mm_set_epi8(5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4),
        _mm_set_epi8(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6)};
    __m256 total = _mm256_setzero_ps();
    for (int64_t i = 0; i < blocks; i++, w += 210) {
        const __m128i all_scales = _mm_loadu_si128((const __m128i *)(w + 192));
        uint16_t dh;
        memcpy(&dh, w + 208, 2);
        __m256i acc = _mm256_setzero_si256();
        for (int half = 0; half < 2; half++) {
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(w + 64 * half));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(w + 64 * half + 32));
            const __m256i h = _mm256_loadu_si256((const __m256i *)(w + 128 + 32 * half));
            const __m128i sc = half ? _mm_srli_si128(all_scales, 8) : all_scales;
            const int8_t *y = x[i].qs + 128 * half;
            const __m256i q0 = _mm256_or_si256(_mm256_and_si256(l0, low4),
                                               _mm256_slli_epi16(_mm256_and_si256(h, three), 4));
            const __m256i q1 = _mm256_or_si256(_mm256_and_si256(l1, low4),
                                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), three), 4));
            const __m256i q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), three), 4));
            const __m256i q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                               _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), three), 4));
            acc = _mm256_add_epi32(acc, scaled_dot(q0, _mm256_loadu_si256((const __m256i *)(y + 0)),
                                                   _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, spread[0]))));
            acc = _mm256_add_epi32(acc, scaled_dot(q1, _mm256_loadu_si256((const __m256i *)(y + 32)),
                                                   _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, spread[1]))));
            acc = _mm256_add_epi32(acc, scaled_dot(q2, _mm256_loadu_si256((const __m256i *)(y + 64)),
                                                   _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, spread[2]))));
            acc = _mm256_add_epi32(acc, scaled_dot(q3, _mm256_loadu_si256((const __m256i *)(y + 96)),
                                                   _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc, spread[3]))));
        }
        /* the values are stored +32: subtract 32 * scale * (sum of the 16 activations) per scale */
        const __m256i bsums = _mm256_loadu_si256((const __m256i *)x[i].bsums);
        const __m256i offset = _mm256_madd_epi16(bsums, _mm256_cvtepi8_epi16(all_scales));
        acc = _mm256_sub_epi32(acc, _mm256_slli_epi32(offset, 5));
        total = _mm256_fmadd_ps(_mm256_set1_ps(x[i].d * from_half(dh)), _mm256_cvtepi32_ps(acc), total);
    }
    return hsum_f32(total);
}
#endif

/* ---------------------------------------------------------------- dequantization (prefill) */

/* One row of `blocks` blocks to floats, in gguf.quants' order of operations (built without contraction,
 * so the values are the same floats). */
static void dequantize_row(int type, const uint8_t *w, int64_t blocks, float *y) {
    for (int64_t i = 0; i < blocks; i++) {
        if (type == TYPE_Q8_0) {
            const uint8_t *b = w + 34 * i;
            uint16_t dh;
            memcpy(&dh, b, 2);
            const float d = from_half(dh);
            const int8_t *q = (const int8_t *)(b + 2);
#pragma omp simd
            for (int l = 0; l < QK8_0; l++) y[32 * i + l] = (float)q[l] * d;
            continue;
        }
        float *out = y + QK_K * i;
        if (type == TYPE_Q6_K) {
            const uint8_t *b = w + 210 * i, *ql = b, *qh = b + 128;
            const int8_t *scales = (const int8_t *)(b + 192);
            uint16_t dh;
            memcpy(&dh, b + 208, 2);
            const float d = from_half(dh);
            int8_t q[QK_K];
            for (int half = 0; half < 2; half++) {
                const uint8_t *l_ = ql + 64 * half, *h_ = qh + 32 * half;
                int8_t *o = q + 128 * half;
#pragma omp simd
                for (int l = 0; l < 32; l++) {
                    o[l] = (int8_t)(((l_[l] & 0xF) | ((h_[l] & 3) << 4)) - 32);
                    o[32 + l] = (int8_t)(((l_[32 + l] & 0xF) | (((h_[l] >> 2) & 3) << 4)) - 32);
                    o[64 + l] = (int8_t)(((l_[l] >> 4) | (((h_[l] >> 4) & 3) << 4)) - 32);
                    o[96 + l] = (int8_t)(((l_[32 + l] >> 4) | (((h_[l] >> 6) & 3) << 4)) - 32);
                }
            }
            for (int j = 0; j < 16; j++) {
                const float scale = d * (float)scales[j];
#pragma omp simd
                for (int l = 0; l < 16; l++) out[16 * j + l] = scale * (float)q[16 * j + l];
            }
            continue;
        }
        const int five = type == TYPE_Q5_K;
        const uint8_t *b = w + (five ? 176 : 144) * i;
        uint16_t dh, mh;
        memcpy(&dh, b, 2);
        memcpy(&mh, b + 2, 2);
        const float d = from_half(dh), dmin = from_half(mh);
        int8_t q[QK_K];
        unpack_q4(b + (five ? 48 : 16), q);
        if (five) {
            for (int s_ = 0; s_ < 8; s_++) {
#pragma omp simd
                for (int l = 0; l < 32; l++) q[32 * s_ + l] |= (int8_t)(((b[16 + l] >> s_) & 1) << 4);
            }
        }
        for (int s_ = 0; s_ < 8; s_++) {
            uint8_t scale, min;
            scale_min_k4(s_, b + 4, &scale, &min);
            const float ds = d * (float)scale, dm = dmin * (float)min;
#pragma omp simd
            for (int l = 0; l < 32; l++) out[32 * s_ + l] = ds * (float)q[32 * s_ + l] - dm;
        }
    }
}

/* W[out][in] in its blocks to float32 (`y`, out x in). Returns 0, or -1 for a type it does not take. */
int enigma_dequantize(int type, const uint8_t *weight, int64_t out, int64_t in, float *y, int threads) {
    const int64_t bytes = block_bytes(type), blocks = in / block_values(type), wrow = blocks * bytes;
    if (type != TYPE_Q8_0 && type != TYPE_Q4_K && type != TYPE_Q5_K && type != TYPE_Q6_K) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < out; o++) dequantize_row(type, weight + o * wrow, blocks, y + o * in);
    return 0;
}

/* ---------------------------------------------------------------- entry points */

/* Bytes of one row of `values` activations, quantized for weights of `type` (0: unsupported). */
int64_t enigma_activation_row_bytes(int type, int64_t values) {
    if (block_bytes(type) == 0 || values % block_values(type)) return 0;
    return values / block_values(type) * (int64_t)(type >= TYPE_Q4_K ? sizeof(block_q8_K) : sizeof(block_q8_0));
}

/* y[rows][out] = x[rows][in] @ W[out][in]^T for W in its GGUF blocks (`weight`, out rows of row_bytes).
 * `scratch` holds enigma_activation_row_bytes(type, in) per row. Returns 0, or -1 for a type or shape the
 * kernels do not take. */
int enigma_qmatmul(int type, const uint8_t *weight, int64_t out, int64_t in, const float *x, int64_t rows,
                   uint8_t *scratch, float *y, int threads) {
    const int64_t xrow = enigma_activation_row_bytes(type, in);
    if (xrow == 0) return -1;
    float (*dot)(const uint8_t *, const void *, int64_t);
    switch (type) {
        case TYPE_Q4_0: dot = dot_q4_0; break;
        case TYPE_Q4_1: dot = dot_q4_1; break;
        case TYPE_Q5_0: dot = dot_q5_0; break;
        case TYPE_Q5_1: dot = dot_q5_1; break;
        case TYPE_Q8_0: dot = dot_q8_0; break;
        case TYPE_Q4_K: dot = dot_q4_K; break;
        case TYPE_Q5_K: dot = dot_q5_K; break;
        default: dot = dot_q6_K; break;
    }
    const int64_t blocks = in / block_values(type), wrow = blocks * block_bytes(type);
#if defined(__AVX2__)
    switch (type) {
        case TYPE_Q4_0: dot = dot_q4_0_avx2; break;
        case TYPE_Q4_1: dot = dot_q4_1_avx2; break;
        case TYPE_Q5_0: dot = dot_q5_0_avx2; break;
        case TYPE_Q5_1: dot = dot_q5_1_avx2; break;
        case TYPE_Q8_0: dot = dot_q8_0_avx2; break;
        case TYPE_Q4_K: dot = dot_q4_K_avx2; break;
        case TYPE_Q5_K: dot = dot_q5_K_avx2; break;
        default: dot = dot_q6_K_avx2; break;
    }
#endif
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (type < TYPE_Q4_K) quantize_q8_0(x + r * in, (block_q8_0 *)(scratch + r * xrow), blocks);
            else quantize_q8_K(x + r * in, (block_q8_K *)(scratch + r * xrow), blocks);
        }
#pragma omp for schedule(static)
        for (int64_t o = 0; o < out; o++) {
            const uint8_t *row = weight + o * wrow;
            if (o + PREFETCH_ROWS < out) {       /* keep loads in flight while this row computes */
                const uint8_t *ahead = row + PREFETCH_ROWS * wrow;
                for (int64_t b = 0; b < wrow; b += 64) __builtin_prefetch(ahead + b, 0, 0);
            }
            for (int64_t r = 0; r < rows; r++) y[r * out + o] = dot(row, scratch + r * xrow, blocks);
        }
    }
    return 0;
}
