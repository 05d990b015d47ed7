/* What the plugin's C files share: ggml's half-precision conversions and its round-to-nearest, in plain C
 * (the same values as ggml's, bit for bit; F16C's one-instruction form where the CPU has it). */
#ifndef ENIGMA_GGML_COMMON_H
#define ENIGMA_GGML_COMMON_H
#include <stdint.h>
#include <string.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

static inline int round_nearest(float value) {   /* exact for |value| < 2^22, ties to even */
    float shifted = value + 12582912.f;
    int32_t bits;
    memcpy(&bits, &shifted, sizeof bits);
    return (bits & 0x007fffff) - 0x00400000;
}

static inline uint16_t to_half(float value) {     /* IEEE binary16, round to nearest even */
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    const uint32_t sign = (bits >> 16) & 0x8000u;
    uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude >= 0x7f800000u) {                /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (magnitude > 0x7f800000u ? 0x200u : 0u));
    }
    if (magnitude >= 0x477ff000u) {                /* rounds past the largest half */
        return (uint16_t)(sign | 0x7c00u);
    }
    if (magnitude < 0x38800000u) {                 /* a subnormal half (or zero) */
        float f;
        memcpy(&f, &magnitude, sizeof f);
        f += 0.5f;                                 /* the add rounds to the 2^-24 grid, to nearest even */
        uint32_t r;
        memcpy(&r, &f, sizeof r);
        return (uint16_t)(sign | (r - 0x3f000000u));
    }
    const uint32_t odd = (magnitude >> 13) & 1u;
    magnitude += 0xc8000fffu + odd;                /* rebias the exponent and round */
    return (uint16_t)(sign | (magnitude >> 13));
}

static inline float from_half(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else {                                   /* subnormal: normalize */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400u)) { mantissa <<= 1; exponent--; }
            mantissa &= 0x3ffu;
            bits = sign | (exponent << 23) | (mantissa << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
#endif
}
#endif
