/* qlab's own CPU kernels: dequantize canonical weight codes into a float or bf16 tile, fast.
 *
 * Large-M weight-only layers dequantize a block of weight rows into a cache-sized tile and hand it to the
 * float GEMM (qlab/kernels/native.py); in torch, the same dequantization costs more than the GEMM itself.
 * The codes are qlab's canonical layout (qlab/core/packing.py): row-major, 4-bit codes two per byte with
 * element 2i in the LOW nibble; signed 4-bit codes are two's complement nibbles.
 *
 * Built by `make` (gcc, no torch headers) into qlab/kernels/_qlab_cpu.so and called through ctypes. Each
 * function has a portable C loop; where the compiler supports it, an AVX2 + FMA version sits beside it and
 * is chosen at run time (__builtin_cpu_supports), so one build runs on any x86-64 CPU.
 * Threads: OpenMP over rows, as many as the caller asks for (torch.get_num_threads()).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QLAB_X86 1
#endif

/* float -> bf16 with round-to-nearest-even (NaN stays NaN: quiet bit set). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#ifdef QLAB_X86
/* Store 16 floats (two vectors) as fp32, or as bf16 rounded to nearest even (the upper 16 bits). */
__attribute__((target("avx2,fma")))
static inline void store16_avx2(__m256 w0, __m256 w1, float *out_f, uint16_t *out_b) {
    if (out_f) {
        _mm256_storeu_ps(out_f, w0);
        _mm256_storeu_ps(out_f + 8, w1);
        return;
    }
    const __m256i r = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    __m256i u0 = _mm256_castps_si256(w0), u1 = _mm256_castps_si256(w1);
    u0 = _mm256_srli_epi32(_mm256_add_epi32(u0, _mm256_add_epi32(r, _mm256_and_si256(_mm256_srli_epi32(u0, 16), one))), 16);
    u1 = _mm256_srli_epi32(_mm256_add_epi32(u1, _mm256_add_epi32(r, _mm256_and_si256(_mm256_srli_epi32(u1, 16), one))), 16);
    _mm256_storeu_si256((__m256i *)out_b, _mm256_permute4x64_epi64(_mm256_packus_epi32(u0, u1), 0xD8));
}
#endif

static int have_avx2(void) {
#ifdef QLAB_X86
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return 0;
#endif
}

/* Row r of the output tile: exactly one of *of (fp32) and *ob (bf16) is set. */
static inline void out_row(void *out, int out_bf16, size_t r, int K, float **of, uint16_t **ob) {
    *of = out_bf16 ? 0 : (float *)out + r * K;
    *ob = out_bf16 ? (uint16_t *)out + r * K : 0;
}

/* ---------------------------------------------------------------- int4 (per group) */
static void dq4_row_scalar(const uint8_t *p, const float *s, const int32_t *z, int K, int g, int is_signed,
                           float *out_f, uint16_t *out_b) {
    for (int k = 0; k < K; k++) {
        int u = (p[k >> 1] >> ((k & 1) * 4)) & 0xF;
        int c = is_signed ? ((u ^ 8) - 8) : u;
        int grp = k / g;
        float w = (float)(c - (z ? z[grp] : 0)) * s[grp];
        if (out_f) out_f[k] = w; else out_b[k] = f32_to_bf16(w);
    }
}

#ifdef QLAB_X86
__attribute__((target("avx2,fma")))
static void dq4_row_avx2(const uint8_t *p, const float *s, const int32_t *z, int K, int g, int is_signed,
                         float *out_f, uint16_t *out_b) {
    /* 16 codes (8 bytes) at a time: split the nibbles, interleave them back into element order. */
    if (g % 16) {  /* groups that do not hold whole 16-code blocks take the portable loop */
        dq4_row_scalar(p, s, z, K, g, is_signed, out_f, out_b);
        return;
    }
    for (int k0 = 0; k0 < K; k0 += g) {
        const int grp = k0 / g;
        const __m256 vs = _mm256_set1_ps(s[grp]);
        /* w = (c - z) * s, with c = u - 8 for signed nibbles (u = c + 8 after xor 8): fold into one offset */
        const float off = (float)((z ? z[grp] : 0) + (is_signed ? 8 : 0));
        const __m256 vneg = _mm256_set1_ps(-off);
        for (int k = k0; k < k0 + g; k += 16) {
            __m128i b = _mm_loadl_epi64((const __m128i *)(p + (k >> 1)));         /* 8 bytes */
            if (is_signed) b = _mm_xor_si128(b, _mm_set1_epi8((char)0x88));          /* c -> c + 8 */
            __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
            __m128i codes = _mm_unpacklo_epi8(lo, hi);                               /* 16 codes in order */
            __m256i c0 = _mm256_cvtepu8_epi32(codes);
            __m256i c1 = _mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8));
            __m256 w0 = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(c0), vneg), vs);
            __m256 w1 = _mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(c1), vneg), vs);
            store16_avx2(w0, w1, out_f ? out_f + k : 0, out_b ? out_b + k : 0);
        }
    }
}
#endif

/* rows [n0, n1) of an (N, K) 4-bit weight -> out (n1 - n0, K), fp32 if out_bf16 == 0 else bf16.
 * packed: N * K / 2 bytes (K even); scale, zero: (N, K / g); zero may be NULL (symmetric). */
int qlab_dequant_int4(const uint8_t *packed, const float *scale, const int32_t *zero, int n0, int n1, int K, int g,
                      int is_signed, void *out, int out_bf16, int nthreads) {
    if (K % 2 || g <= 0 || K % g) return -1;
    const int G = K / g;
    const int use_avx2 = have_avx2();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = n0; n < n1; n++) {
        const uint8_t *p = packed + (size_t)n * (K / 2);
        const float *s = scale + (size_t)n * G;
        const int32_t *z = zero ? zero + (size_t)n * G : 0;
        float *of;
        uint16_t *ob;
        out_row(out, out_bf16, (size_t)(n - n0), K, &of, &ob);
#ifdef QLAB_X86
        if (use_avx2) { dq4_row_avx2(p, s, z, K, g, is_signed, of, ob); continue; }
#endif
        dq4_row_scalar(p, s, z, K, g, is_signed, of, ob);
    }
    return 0;
}

/* ---------------------------------------------------------------- int8 (per row or per tensor) */
#ifdef QLAB_X86
__attribute__((target("avx2,fma")))
static void dq8_row_avx2(const int8_t *q, float s, int K, float *out_f, uint16_t *out_b) {
    const __m256 vs = _mm256_set1_ps(s);
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m128i b = _mm_loadu_si128((const __m128i *)(q + k));
        __m256 w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vs);
        __m256 w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), vs);
        store16_avx2(w0, w1, out_f ? out_f + k : 0, out_b ? out_b + k : 0);
    }
    for (; k < K; k++) {
        float w = (float)q[k] * s;
        if (out_f) out_f[k] = w; else out_b[k] = f32_to_bf16(w);
    }
}
#endif

/* rows [n0, n1) of an (N, K) int8 weight with scale[n] (per_row) or scale[0] -> out (n1 - n0, K). */
int qlab_dequant_int8(const int8_t *q, const float *scale, int per_row, int n0, int n1, int K, void *out,
                      int out_bf16, int nthreads) {
    const int use_avx2 = have_avx2();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = n0; n < n1; n++) {
        const int8_t *row = q + (size_t)n * K;
        const float s = per_row ? scale[n] : scale[0];
        float *of;
        uint16_t *ob;
        out_row(out, out_bf16, (size_t)(n - n0), K, &of, &ob);
#ifdef QLAB_X86
        if (use_avx2) { dq8_row_avx2(row, s, K, of, ob); continue; }
#endif
        for (int k = 0; k < K; k++) {
            float w = (float)row[k] * s;
            if (of) of[k] = w; else ob[k] = f32_to_bf16(w);
        }
    }
    return 0;
}

int qlab_abi_version(void) { return 1; }
