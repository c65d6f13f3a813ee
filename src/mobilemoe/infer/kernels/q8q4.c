/* 8-bit dynamic activations x INT4 weights (8da4w): every INT4 product of the engine, on one weight layout.
 *
 * Written by hand because no library in our stack has int8 x int4 kernels for CPU that take our INT4
 * format and a fused fine-grained MoE (aten's int4 kernel takes bf16 activations; llama.cpp's ggml is a
 * separate runtime). The numbers are the QAT stage's: activations quantized per token, asymmetric int8,
 * exactly as torchao's fake quantizer (`choose_qparams_affine` ASYMMETRIC, `_fake_quantize_per_token`),
 * weights symmetric int4 in groups of 32 with fp16 scales.
 *
 * Weight layout (made by `mobilemoe.infer.q4.pack_q4`): an [N, K] matrix is N/16 blocks of 16 rows; a
 * block is K/8 chunks of 64 bytes; in chunk c byte 4r+j holds row r's weight k = 8c+j in its low nibble and
 * k = 8c+4+j in its high one, as u = q + 8. So one 64-byte load feeds 16 rows x 4 inputs to one integer
 * dot-product instruction per nibble half: AVX-512 VNNI `vpdpbusd` (16 int32 lanes, one per row), AVX-VNNI
 * / AVX2 on the two 32-byte halves, NEON `sdot` on the four 16-byte quarters. Scales are [N/16][K/32][16]
 * fp16, and `corr[n]` = sum_g scale[n,g] * sum_{k in g} q[n,k] carries the activation zero point:
 *   y[n] = s_a * (sum_g scale[n,g] * sum_{k in g} q[n,k] * a[k]  -  zp * corr[n])
 * where a = the int8 activation and (s_a, zp) its token's scale and zero point. The integer sums are exact;
 * only the per-group scaling is floating point.
 *
 * The 8-bit embedding/head is not INT4: `w8_linear` is its weight-only int8 product (float activations).
 *
 * One source, compiled once per instruction set (the Python side picks the variant from the CPU's flags).
 * Threads (OpenMP, torch's runtime) split weight rows; every entry point is one call per layer block.
 */
#include <float.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define VARIANT "avx512_vnni"
#define USE_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define USE_AVX2 1
#if defined(__AVXVNNI__)
#define VARIANT "avx_vnni"
#else
#define VARIANT "avx2"
#endif
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define VARIANT "neon_dot"
#define USE_NEON 1
#else
#define VARIANT "portable"
#endif

#define ROWS 16   /* rows per block */
#define GROUP 32  /* inputs per scale */
#define TILE 4    /* tokens sharing one pass over a weight block */

const char *q4_variant(void) { return VARIANT; }

/* ---- int8 per-token activations --------------------------------------------------------------------- */
typedef struct {
    int8_t *q;      /* [T][K] */
    int32_t *gsum;  /* [T][K/32] sums of q per group (the x86 kernels take unsigned weights u = q_w + 8) */
    float *scale;   /* [T] */
    int32_t *zero;  /* [T] */
} Acts;

static Acts acts_new(int T, int K) {
    Acts a;
    a.q = malloc((size_t)T * K + 64);
    a.gsum = malloc(sizeof(int32_t) * (size_t)T * (K / GROUP));
    a.scale = malloc(sizeof(float) * (size_t)T);
    a.zero = malloc(sizeof(int32_t) * (size_t)T);
    return a;
}

static void acts_free(Acts *a) { free(a->q); free(a->gsum); free(a->scale); free(a->zero); }

/* torchao's asymmetric per-token int8: scale = (max(x,0) - min(x,0)) / 255 clamped to FLT_MIN,
 * zp = clamp(-128 - round(min / scale)), q = clamp(round(x * (1 / scale)) + zp) (round half to even). */
static void quantize_row(const float *x, int K, Acts *a, int t) {
    float lo = 0.0f, hi = 0.0f;
    for (int k = 0; k < K; k++) {
        lo = x[k] < lo ? x[k] : lo;
        hi = x[k] > hi ? x[k] : hi;
    }
    float scale = (hi - lo) / 255.0f;
    if (scale < FLT_MIN) scale = FLT_MIN;
    float zp = -128.0f - nearbyintf(lo / scale);
    zp = zp < -128.0f ? -128.0f : (zp > 127.0f ? 127.0f : zp);
    const float inv = 1.0f / scale;
    int8_t *q = a->q + (size_t)t * K;
    int32_t *gs = a->gsum + (size_t)t * (K / GROUP);
    for (int g = 0; g < K / GROUP; g++) {
        int32_t sum = 0;
        for (int k = g * GROUP; k < (g + 1) * GROUP; k++) {
            float v = nearbyintf(x[k] * inv) + zp;
            v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
            q[k] = (int8_t)v;
            sum += q[k];
        }
        gs[g] = sum;
    }
    a->scale[t] = scale;
    a->zero[t] = (int32_t)zp;
}

static Acts quantize_rows(const float *x, int T, int K) {
    Acts a = acts_new(T, K);
#pragma omp parallel for schedule(static) if (T > 1)
    for (int t = 0; t < T; t++) quantize_row(x + (size_t)t * K, K, &a, t);
    return a;
}

/* Exposed for the tests: the quantized activations of x [T][K]. */
void q8_quantize(const float *x, int T, int K, int8_t *q, float *scale, int32_t *zero) {
    Acts a = quantize_rows(x, T, K);
    memcpy(q, a.q, (size_t)T * K);
    memcpy(scale, a.scale, sizeof(float) * T);
    memcpy(zero, a.zero, sizeof(int32_t) * T);
    acts_free(&a);
}

/* ---- one block of 16 rows x up to TILE tokens ---------------------------------------------------------
 * out[t][r] = sum_g scale[r,g] * sum_{k in g} q_w[r,k] * q_a_t[k]   (the zero point is applied by the caller)
 * wb: the block's K/8 chunks; sb: its [K/32][16] fp16 scales; qa[t], gs[t]: token t's int8 row, group sums. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);
    else if (exp != 0) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (man == 0) bits = sign;
    else {  /* subnormal half: normalise */
        int e = -1;
        uint32_t m = man;
        do { e++; m <<= 1; } while (!(m & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline int32_t load_i32(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* ---- fp16 <-> fp32 for the KV cache (round to nearest even, as torch's .to(torch.float16)) ------------
 * F16C / AVX-512 / NEON convert 16 / 8 / 4 values per instruction; the scalar code is the fallback. */
static inline uint16_t float_to_half(float f) {  /* F. Giesen's float_to_half_fast3_rtne */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint16_t h;
    if (u >= (127u + 16) << 23) h = u > 0x7F800000u ? 0x7E00 : 0x7C00;  /* >= 65536, inf: inf; nan: nan */
    else if (u < 113u << 23) {  /* a subnormal half (or zero): let the fp32 adder round at 2^-24 */
        const uint32_t magic_bits = 126u << 23;
        float v, magic;
        memcpy(&v, &u, 4);
        memcpy(&magic, &magic_bits, 4);
        v += magic;
        memcpy(&u, &v, 4);
        h = (uint16_t)(u - magic_bits);
    } else {
        u += ((uint32_t)(15 - 127) << 23) + 0xFFF + ((u >> 13) & 1);
        h = (uint16_t)(u >> 13);
    }
    return h | (uint16_t)(sign >> 16);
}

void f32_from_f16(const uint16_t *src, float *dst, int n) {
    int i = 0;
#if defined(USE_AVX512)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#elif defined(USE_AVX2)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#elif defined(USE_NEON)
    for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
#endif
    for (; i < n; i++) dst[i] = half_to_float(src[i]);
}

void f16_from_f32(const float *src, uint16_t *dst, int n) {
    int i = 0;
#if defined(USE_AVX512)
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i *)(dst + i), _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(USE_AVX2)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#elif defined(USE_NEON)
    for (; i + 4 <= n; i += 4) vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(vld1q_f32(src + i))));
#endif
    for (; i < n; i++) dst[i] = float_to_half(src[i]);
}

/* ---- the KV cache: fp32, fp16, or int8 rows with one scale each ---------------------------------------
 * int8 (as llama.cpp's q8_0, but one scale per (position, kv head) row of hd values instead of per 32): each
 * row symmetric, scale = max |x| / 127 (at least FLT_MIN, so a zero row stays zero), q = round(x / scale)
 * half to even; bitwise the engine's torch `quantize_kv`, so prefill (torch) and decode (here) write the
 * same cache. Scales are fp32, [KVH][max_len] beside the [KVH][max_len][hd] values. */
enum { KV_F32 = 0, KV_F16 = 1, KV_I8 = 2 };

static inline size_t kv_bytes(int type) { return type == KV_F32 ? 4 : type == KV_F16 ? 2 : 1; }

void kv_quantize(const float *x, int n, int hd, int8_t *q, float *scale) {
    for (int r = 0; r < n; r++) {
        const float *xr = x + (size_t)r * hd;
        float amax = 0.0f;
        for (int d = 0; d < hd; d++) amax = fabsf(xr[d]) > amax ? fabsf(xr[d]) : amax;
        float s = amax / 127.0f;
        if (s < FLT_MIN) s = FLT_MIN;
        for (int d = 0; d < hd; d++) {
            float v = nearbyintf(xr[d] / s);
            v = v < -127.0f ? -127.0f : (v > 127.0f ? 127.0f : v);
            q[(size_t)r * hd + d] = (int8_t)v;
        }
        scale[r] = s;
    }
}


#if defined(USE_AVX512)
static inline __attribute__((always_inline)) void block_tile_n(const uint8_t *wb, const uint16_t *sb, int G,
                                                               const int8_t *const *qa, const int32_t *const *gs,
                                                               const int nt, float *out) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[TILE];
    for (int t = 0; t < nt; t++) acc[t] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512i d0[TILE], d1[TILE];
        for (int t = 0; t < nt; t++) d0[t] = d1[t] = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i b = _mm512_loadu_si512((const void *)(wb + (size_t)(g * 4 + c) * 64));
            const __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
            for (int t = 0; t < nt; t++) {
                const int8_t *a = qa[t] + g * GROUP + c * 8;
                d0[t] = _mm512_dpbusd_epi32(d0[t], lo, _mm512_set1_epi32(load_i32(a)));
                d1[t] = _mm512_dpbusd_epi32(d1[t], hi, _mm512_set1_epi32(load_i32(a + 4)));
            }
        }
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + g * ROWS)));
        for (int t = 0; t < nt; t++) {  /* sum (q_w + 8) a - 8 sum a = sum q_w a */
            const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(d0[t], d1[t]), _mm512_set1_epi32(8 * gs[t][g]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[t]);
        }
    }
    for (int t = 0; t < nt; t++) _mm512_storeu_ps(out + t * ROWS, acc[t]);
}
#elif defined(USE_AVX2)
#if defined(__AVXVNNI__)
#define DOT_U8S8(acc, u, a) _mm256_dpbusd_avx_epi32(acc, u, a)
#else  /* u8 x s8 pairs to int16 (|15 * 128 * 2| fits), then pairs to int32 */
#define DOT_U8S8(acc, u, a) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, a), _mm256_set1_epi16(1)))
#endif
static inline __attribute__((always_inline)) void block_tile_n(const uint8_t *wb, const uint16_t *sb, int G,
                                                               const int8_t *const *qa, const int32_t *const *gs,
                                                               const int nt, float *out) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[TILE][2];
    for (int t = 0; t < nt; t++) acc[t][0] = acc[t][1] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256i d[TILE][2];
        for (int t = 0; t < nt; t++) d[t][0] = d[t][1] = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            for (int h = 0; h < 2; h++) {  /* rows 8h .. 8h+7 */
                const __m256i b = _mm256_loadu_si256((const __m256i *)(wb + (size_t)(g * 4 + c) * 64 + h * 32));
                const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
                for (int t = 0; t < nt; t++) {
                    const int8_t *a = qa[t] + g * GROUP + c * 8;
                    d[t][h] = DOT_U8S8(d[t][h], lo, _mm256_set1_epi32(load_i32(a)));
                    d[t][h] = DOT_U8S8(d[t][h], hi, _mm256_set1_epi32(load_i32(a + 4)));
                }
            }
        }
        for (int h = 0; h < 2; h++) {
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sb + g * ROWS + h * 8)));
            for (int t = 0; t < nt; t++) {
                const __m256i v = _mm256_sub_epi32(d[t][h], _mm256_set1_epi32(8 * gs[t][g]));
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(v), s, acc[t][h]);
            }
        }
    }
    for (int t = 0; t < nt; t++) {
        _mm256_storeu_ps(out + t * ROWS, acc[t][0]);
        _mm256_storeu_ps(out + t * ROWS + 8, acc[t][1]);
    }
}
#elif defined(USE_NEON)
static inline __attribute__((always_inline)) void block_tile_n(const uint8_t *wb, const uint16_t *sb, int G,
                                                               const int8_t *const *qa, const int32_t *const *gs,
                                                               const int nt, float *out) {
    (void)gs;  /* signed weights: no correction term */
    const uint8x16_t low = vdupq_n_u8(0x0F), eight = vdupq_n_u8(8);
    float32x4_t acc[TILE][4];
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < 4; h++) acc[t][h] = vdupq_n_f32(0.0f);
    for (int g = 0; g < G; g++) {
        int32x4_t d[TILE][4];
        for (int t = 0; t < nt; t++)
            for (int h = 0; h < 4; h++) d[t][h] = vdupq_n_s32(0);
        for (int c = 0; c < 4; c++) {
            for (int h = 0; h < 4; h++) {  /* rows 4h .. 4h+3 */
                const uint8x16_t b = vld1q_u8(wb + (size_t)(g * 4 + c) * 64 + h * 16);
                const int8x16_t lo = vreinterpretq_s8_u8(vsubq_u8(vandq_u8(b, low), eight));
                const int8x16_t hi = vreinterpretq_s8_u8(vsubq_u8(vshrq_n_u8(b, 4), eight));
                for (int t = 0; t < nt; t++) {
                    const int8_t *a = qa[t] + g * GROUP + c * 8;
                    d[t][h] = vdotq_s32(d[t][h], lo, vreinterpretq_s8_s32(vdupq_n_s32(load_i32(a))));
                    d[t][h] = vdotq_s32(d[t][h], hi, vreinterpretq_s8_s32(vdupq_n_s32(load_i32(a + 4))));
                }
            }
        }
        for (int h = 0; h < 4; h++) {
            const float32x4_t s = vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(sb + g * ROWS + h * 4)));
            for (int t = 0; t < nt; t++) acc[t][h] = vfmaq_f32(acc[t][h], vcvtq_f32_s32(d[t][h]), s);
        }
    }
    for (int t = 0; t < nt; t++)
        for (int h = 0; h < 4; h++) vst1q_f32(out + t * ROWS + h * 4, acc[t][h]);
}
#else
static inline void block_tile_n(const uint8_t *wb, const uint16_t *sb, int G, const int8_t *const *qa,
                                const int32_t *const *gs, const int nt, float *out) {
    (void)gs;
    for (int t = 0; t < nt; t++)
        for (int r = 0; r < ROWS; r++) {
            float acc = 0.0f;
            for (int g = 0; g < G; g++) {
                int32_t d = 0;
                for (int c = 0; c < 4; c++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t b = wb[(size_t)(g * 4 + c) * 64 + r * 4 + j];
                        d += ((b & 15) - 8) * qa[t][g * GROUP + c * 8 + j] + ((b >> 4) - 8) * qa[t][g * GROUP + c * 8 + 4 + j];
                    }
                acc += half_to_float(sb[g * ROWS + r]) * (float)d;
            }
            out[t * ROWS + r] = acc;
        }
}
#endif

/* Dispatch on the tile's token count so each case compiles with constant trip counts (registers, no spills). */
static void block_tile(const uint8_t *wb, const uint16_t *sb, int G, const int8_t *const *qa,
                       const int32_t *const *gs, int nt, float *out) {
    switch (nt) {
        case 1: block_tile_n(wb, sb, G, qa, gs, 1, out); break;
        case 2: block_tile_n(wb, sb, G, qa, gs, 2, out); break;
        case 3: block_tile_n(wb, sb, G, qa, gs, 3, out); break;
        default: block_tile_n(wb, sb, G, qa, gs, 4, out); break;
    }
}

/* ---- a matrix in our layout, and row blocks of products ------------------------------------------------ */
typedef struct {
    const uint8_t *w;
    const uint16_t *s;
    const float *corr;
    int N, K;
} Mat;

static Mat mat_at(const uint8_t *w, const uint16_t *s, const float *corr, int N, int K, int index) {
    Mat m = {w + (size_t)index * N * K / 2, s + (size_t)index * N * (K / GROUP), corr + (size_t)index * N, N, K};
    return m;
}

/* For tokens rows[0..n) of a (n <= TILE) and rows 16*nb .. 16*nb+15 of m:
 * dst[i * ld + r] (+)= coef[i] * y  (coef NULL: 1, accumulate 0: overwrite). */
static void product_tile(const Mat *m, int nb, const Acts *a, const int *rows, int n, float *const *dst,
                         const float *coef, int accumulate) {
    const int G = m->K / GROUP;
    /* every caller fills rows 0 .. n-1, n >= 1; zeroed anyway, as gcc -Wall cannot see that through block_tile
     * ("may be used uninitialized" in the portable build) */
    const int8_t *qa[TILE] = {0};
    const int32_t *gs[TILE] = {0};
    float out[TILE * ROWS];
    for (int i = 0; i < n; i++) {
        qa[i] = a->q + (size_t)rows[i] * m->K;
        gs[i] = a->gsum + (size_t)rows[i] * G;
    }
    block_tile(m->w + (size_t)nb * m->K * 8, m->s + (size_t)nb * G * ROWS, G, qa, gs, n, out);
    const float *corr = m->corr + nb * ROWS;
    for (int i = 0; i < n; i++) {
        const float sa = a->scale[rows[i]] * (coef ? coef[i] : 1.0f), zp = (float)a->zero[rows[i]];
        float *y = dst[i] + nb * ROWS;
        for (int r = 0; r < ROWS; r++) {
            const float v = sa * (out[i * ROWS + r] - zp * corr[r]);
            y[r] = accumulate ? y[r] + v : v;
        }
    }
}

/* ---- entry points ----------------------------------------------------------------------------------- */
/* y[T][N] = 8da4w(x[T][K]) @ W^T. */
void q4_linear(const float *x, int T, int K, int N, const uint8_t *w, const uint16_t *s, const float *corr,
               float *y) {
    Acts a = quantize_rows(x, T, K);
    const Mat m = {w, s, corr, N, K};
    const int blocks = N / ROWS, tiles = (T + TILE - 1) / TILE;
#pragma omp parallel for collapse(2) schedule(static)
    for (int nb = 0; nb < blocks; nb++)
        for (int tile = 0; tile < tiles; tile++) {
            int rows[TILE];
            float *dst[TILE];
            const int n = T - tile * TILE < TILE ? T - tile * TILE : TILE;
            for (int i = 0; i < n; i++) {
                rows[i] = tile * TILE + i;
                dst[i] = y + (size_t)rows[i] * N;
            }
            product_tile(&m, nb, &a, rows, n, dst, NULL, 0);
        }
    acts_free(&a);
}

/* SwiGLU experts over groups of token slots: for expert e (of E), slots start[e] .. start[e+1] hold
 * tokens token[slot] with weights coef[slot] (NULL: 1); y[token] (+)= coef * down_e(silu(gate_e x) * up_e x).
 * gate_up: E matrices [2I, D] (gate rows first); down: E matrices [D, I]. x is already quantized (a). */
static void swiglu_experts(const Acts *a, int D, int I, int E, const int *start, const int *token,
                           const float *coef, const uint8_t *gu_w, const uint16_t *gu_s, const float *gu_c,
                           const uint8_t *dn_w, const uint16_t *dn_s, const float *dn_c, float *y, int accumulate) {
    const int S = start[E];
    int *active = malloc(sizeof(int) * (E + 1)), n_active = 0;
    for (int e = 0; e < E; e++)
        if (start[e + 1] > start[e]) active[n_active++] = e;
    float *hidden = malloc(sizeof(float) * (size_t)S * 2 * I);
    Acts h = acts_new(S, I);
    const int blocks_up = 2 * I / ROWS, blocks_down = D / ROWS;
#pragma omp parallel
    {
#pragma omp for collapse(2) schedule(static)
        for (int ia = 0; ia < n_active; ia++)
            for (int nb = 0; nb < blocks_up; nb++) {
                const int e = active[ia];
                const Mat m = mat_at(gu_w, gu_s, gu_c, 2 * I, D, e);
                for (int s0 = start[e]; s0 < start[e + 1]; s0 += TILE) {
                    const int n = start[e + 1] - s0 < TILE ? start[e + 1] - s0 : TILE;
                    float *dst[TILE];
                    for (int i = 0; i < n; i++) dst[i] = hidden + (size_t)(s0 + i) * 2 * I;
                    product_tile(&m, nb, a, token + s0, n, dst, NULL, 0);
                }
            }
#pragma omp for schedule(static)
        for (int slot = 0; slot < S; slot++) {  /* silu(gate) * up, then quantized like any activation */
            float *row = hidden + (size_t)slot * 2 * I;
            for (int i = 0; i < I; i++) row[i] = row[i] / (1.0f + expf(-row[i])) * row[I + i];
            quantize_row(row, I, &h, slot);
        }
#pragma omp for schedule(static)
        for (int nb = 0; nb < blocks_down; nb++) {
            if (!accumulate)
                for (int slot = 0; slot < S; slot++) memset(y + (size_t)token[slot] * D + nb * ROWS, 0, sizeof(float) * ROWS);
            for (int ia = 0; ia < n_active; ia++) {
                const int e = active[ia];
                const Mat m = mat_at(dn_w, dn_s, dn_c, D, I, e);
                for (int s0 = start[e]; s0 < start[e + 1]; s0 += TILE) {
                    const int n = start[e + 1] - s0 < TILE ? start[e + 1] - s0 : TILE;
                    int slots[TILE];
                    float *dst[TILE];
                    for (int i = 0; i < n; i++) {
                        slots[i] = s0 + i;
                        dst[i] = y + (size_t)token[s0 + i] * D;
                    }
                    product_tile(&m, nb, &h, slots, n, dst, coef ? coef + s0 : NULL, 1);
                }
            }
        }
    }
    acts_free(&h);
    free(hidden);
    free(active);
}

/* A dense SwiGLU FFN: y[T][D] = down(silu(gate x) * up x). */
void q4_ffn(const float *x, int T, int D, int I, const uint8_t *gu_w, const uint16_t *gu_s, const float *gu_c,
            const uint8_t *dn_w, const uint16_t *dn_s, const float *dn_c, float *y) {
    Acts a = quantize_rows(x, T, D);
    int *token = malloc(sizeof(int) * T), start[2] = {0, T};
    for (int t = 0; t < T; t++) token[t] = t;
    swiglu_experts(&a, D, I, 1, start, token, NULL, gu_w, gu_s, gu_c, dn_w, dn_s, dn_c, y, 0);
    free(token);
    acts_free(&a);
}

/* A MoE block after routing: y[t] = shared(x[t]) + sum_j weights[t][j] * expert_{experts[t][j]}(x[t]).
 * x quantized once for the shared expert and all routed ones. I_shared = 0: no shared expert. */
void q4_moe(const float *x, int T, int D, const int64_t *experts, const float *weights, int k, int E, int I,
            const uint8_t *gu_w, const uint16_t *gu_s, const float *gu_c, const uint8_t *dn_w,
            const uint16_t *dn_s, const float *dn_c, int I_shared, const uint8_t *sgu_w, const uint16_t *sgu_s,
            const float *sgu_c, const uint8_t *sdn_w, const uint16_t *sdn_s, const float *sdn_c, float *y) {
    Acts a = quantize_rows(x, T, D);
    const int S = T * k;
    int *start = calloc(E + 1, sizeof(int)), *token = malloc(sizeof(int) * S), *fill = malloc(sizeof(int) * E);
    float *coef = malloc(sizeof(float) * S);
    for (int i = 0; i < S; i++) start[experts[i] + 1]++;
    for (int e = 0; e < E; e++) start[e + 1] += start[e];
    memcpy(fill, start, sizeof(int) * E);
    for (int i = 0; i < S; i++) {  /* counting sort by expert, stable in token order */
        const int slot = fill[experts[i]]++;
        token[slot] = i / k;
        coef[slot] = weights[i];
    }
    if (I_shared > 0) {
        int *all = malloc(sizeof(int) * T), all_start[2] = {0, T};
        for (int t = 0; t < T; t++) all[t] = t;
        swiglu_experts(&a, D, I_shared, 1, all_start, all, NULL, sgu_w, sgu_s, sgu_c, sdn_w, sdn_s, sdn_c, y, 0);
        free(all);
    } else {
        memset(y, 0, sizeof(float) * (size_t)T * D);
    }
    swiglu_experts(&a, D, I, E, start, token, coef, gu_w, gu_s, gu_c, dn_w, dn_s, dn_c, y, 1);
    free(start); free(token); free(fill); free(coef);
    acts_free(&a);
}

/* ---- weight-only int8 rows: the 8-bit embedding/head (`Int4Scheme(embedding_bits=8)`) ------------------
 * y[m][n] = scale[n] * sum_k x[m][k] * w[n][k]: x fp32 [M][K], w int8 [N][K] (the checkpoint's rows as they
 * are), scale fp32 [N]. x is not quantized (QAT trains the 8-bit head against float inputs). Each int8 weight
 * is converted to fp32 in registers and FMA'd; the sum of each (m, n) runs in the same lanes and order for
 * every M and every tile, so a row's logits do not depend on how many positions are computed with it.
 * Written by hand: aten's `_weight_int8pack_mm` read SmolLM2's 49,152 x 576 table at 1.5-3 GB/s here. */
#if defined(USE_AVX512)
enum { W8_LANES = 16 };
typedef __m512 W8Vec;
static inline W8Vec w8_zero(void) { return _mm512_setzero_ps(); }
static inline W8Vec w8_x(const float *p) { return _mm512_loadu_ps(p); }
static inline W8Vec w8_w(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline W8Vec w8_fma(W8Vec a, W8Vec b, W8Vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float w8_sum(W8Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(USE_AVX2)
enum { W8_LANES = 8 };
typedef __m256 W8Vec;
static inline W8Vec w8_zero(void) { return _mm256_setzero_ps(); }
static inline W8Vec w8_x(const float *p) { return _mm256_loadu_ps(p); }
static inline W8Vec w8_w(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline W8Vec w8_fma(W8Vec a, W8Vec b, W8Vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float w8_sum(W8Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#elif defined(USE_NEON)
enum { W8_LANES = 4 };
typedef float32x4_t W8Vec;
static inline W8Vec w8_zero(void) { return vdupq_n_f32(0.0f); }
static inline W8Vec w8_x(const float *p) { return vld1q_f32(p); }
static inline W8Vec w8_w(const int8_t *p) {
    const int8x8_t b = vreinterpret_s8_s32(vdup_n_s32(load_i32(p)));  /* 4 weights, twice */
    return vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(b))));
}
static inline W8Vec w8_fma(W8Vec a, W8Vec b, W8Vec c) { return vfmaq_f32(c, a, b); }
static inline float w8_sum(W8Vec v) { return vaddvq_f32(v); }
#else
enum { W8_LANES = 8 };
typedef struct { float v[W8_LANES]; } W8Vec;
static inline W8Vec w8_zero(void) { W8Vec r = {{0}}; return r; }
static inline W8Vec w8_x(const float *p) { W8Vec r; memcpy(r.v, p, sizeof(r.v)); return r; }
static inline W8Vec w8_w(const int8_t *p) { W8Vec r; for (int i = 0; i < W8_LANES; i++) r.v[i] = (float)p[i]; return r; }
static inline W8Vec w8_fma(W8Vec a, W8Vec b, W8Vec c) {
    for (int i = 0; i < W8_LANES; i++) c.v[i] += a.v[i] * b.v[i];
    return c;
}
static inline float w8_sum(W8Vec v) {
    return ((v.v[0] + v.v[4]) + (v.v[2] + v.v[6])) + ((v.v[1] + v.v[5]) + (v.v[3] + v.v[7]));
}
#endif

/* TM tokens (x rows K apart) x TR weight rows (K apart): y[i * N + j], one accumulator per pair; each x vector
 * serves TR rows and each converted weight vector TM tokens. TM, TR are constants where it is inlined. */
static inline __attribute__((always_inline)) void w8_tile(const float *x, const int8_t *w, const float *scale, int K,
                                                          int N, float *y, const int TM, const int TR) {
    W8Vec acc[4][8];
    for (int i = 0; i < TM; i++)
        for (int j = 0; j < TR; j++) acc[i][j] = w8_zero();
    int k = 0;
    for (; k + W8_LANES <= K; k += W8_LANES) {
        W8Vec xv[4];
        for (int i = 0; i < TM; i++) xv[i] = w8_x(x + (size_t)i * K + k);
        for (int j = 0; j < TR; j++) {
            const W8Vec wv = w8_w(w + (size_t)j * K + k);
            for (int i = 0; i < TM; i++) acc[i][j] = w8_fma(xv[i], wv, acc[i][j]);
        }
    }
    for (int i = 0; i < TM; i++)
        for (int j = 0; j < TR; j++) {
            float s = w8_sum(acc[i][j]);
            for (int kk = k; kk < K; kk++) s += x[(size_t)i * K + kk] * (float)w[(size_t)j * K + kk];
            y[(size_t)i * N + j] = s * scale[j];
        }
}

#define W8_BLOCK 64  /* weight rows per work item: 36 KB at K = 576, re-read from cache for every 4 tokens */
/* A token alone streams the table once: its rows are prefetched this many bytes ahead. The hardware prefetcher
 * alone left SmolLM2's head (28 MB, from DRAM: the cache flushed between calls) at 0.62x / 0.74x of this speed
 * at 1 / 2 threads here. */
#define W8_AHEAD 4096

/* bytes from .. from + n of w (total bytes) into the cache */
static inline void w8_prefetch(const int8_t *w, size_t from, size_t n, size_t total) {
    for (size_t b = from; b < from + n && b < total; b += 64) __builtin_prefetch(w + b);
}

void w8_linear(const float *x, int M, int K, int N, const int8_t *w, const float *scale, float *y) {
#pragma omp parallel for schedule(static)
    for (int n0 = 0; n0 < N; n0 += W8_BLOCK) {
        const int n1 = n0 + W8_BLOCK < N ? n0 + W8_BLOCK : N;
        int m = 0;
        for (; m + 4 <= M; m += 4) {  /* 4 tokens x 4 rows */
            const float *xm = x + (size_t)m * K;
            int n = n0;
            for (; n + 4 <= n1; n += 4) w8_tile(xm, w + (size_t)n * K, scale + n, K, N, y + (size_t)m * N + n, 4, 4);
            for (; n < n1; n++) w8_tile(xm, w + (size_t)n * K, scale + n, K, N, y + (size_t)m * N + n, 4, 1);
        }
        for (; m < M; m++) {  /* a token alone (decode): 1 x 8 rows */
            const float *xm = x + (size_t)m * K;
            int n = n0;
            for (; n + 8 <= n1; n += 8) {
                w8_prefetch(w, (size_t)n * K + W8_AHEAD, (size_t)8 * K, (size_t)N * K);
                w8_tile(xm, w + (size_t)n * K, scale + n, K, N, y + (size_t)m * N + n, 1, 8);
            }
            for (; n < n1; n++) w8_tile(xm, w + (size_t)n * K, scale + n, K, N, y + (size_t)m * N + n, 1, 1);
        }
    }
}

/* a dot product in 16 partial sums added up as a tree, so the compiler vectorizes it (a plain float sum
 * must keep its order) */
static inline __attribute__((always_inline)) float dot16(const float *a, const float *b, const int n) {
    float part[16] = {0};
    int d0 = 0;
    for (; d0 + 16 <= n; d0 += 16)
        for (int l = 0; l < 16; l++) part[l] += a[d0 + l] * b[d0 + l];
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; l++) part[l] += part[l + w];
    float dot = part[0];
    for (; d0 < n; d0++) dot += a[d0] * b[d0];
    return dot;
}

/* the largest and the sum of n floats, in 16 partial results combined as a tree, so the loops vectorize (a
 * plain float max or sum keeps one chain of dependent instructions: ~4 cycles a position at long contexts) */
static inline float max16(const float *a, const int n) {
    float part[16];
    for (int l = 0; l < 16; l++) part[l] = -INFINITY;
    int j0 = 0;
    for (; j0 + 16 <= n; j0 += 16)
        for (int l = 0; l < 16; l++) part[l] = a[j0 + l] > part[l] ? a[j0 + l] : part[l];
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; l++) part[l] = part[l + w] > part[l] ? part[l + w] : part[l];
    float top = part[0];
    for (; j0 < n; j0++) top = a[j0] > top ? a[j0] : top;
    return top;
}

static inline float sum16(const float *a, const int n) {
    float part[16] = {0};
    int j0 = 0;
    for (; j0 + 16 <= n; j0 += 16)
        for (int l = 0; l < 16; l++) part[l] += a[j0 + l];
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; l++) part[l] += part[l + w];
    float sum = part[0];
    for (; j0 < n; j0++) sum += a[j0];
    return sum;
}

/* e^x for x <= 0 without a library call, so a loop of them vectorizes: Cephes' expf (range reduction by
 * ln 2 in two parts, degree-6 polynomial, 2^n from the exponent bits), within ~2e-7 relative of expf */
static inline float exp_nonpositive(float x) {
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)(x < -87.0f ? 0.0f : n) + 127) << 23};
    return x < -87.0f ? 0.0f : y * scale.f;
}

#define KV_CHUNK 4096  /* floats of keys or values handled at a time: 16 KB, stays in L1 */

/* one kv head of a cache: its keys and values, and (int8) their scales per position */
typedef struct {
    const void *k, *v;
    const float *k_scale, *v_scale;
} KVHead;

/* positions j0 .. j0+n-1 of one cache head (its keys or values) as fp32: the fp32 cache itself, or converted
 * into buf (int8: q * scale, as torch's dequantization) */
static inline const float *kv_rows(const void *head, const float *scale, int type, int j0, int n, int hd,
                                   float *buf) {
    if (type == KV_F32) return (const float *)head + (size_t)j0 * hd;
    if (type == KV_F16) {
        f32_from_f16((const uint16_t *)head + (size_t)j0 * hd, buf, n * hd);
    } else {
        for (int j = 0; j < n; j++) {
            const int8_t *q = (const int8_t *)head + (size_t)(j0 + j) * hd;
            const float s = scale[j0 + j];
            for (int d = 0; d < hd; d++) buf[(size_t)j * hd + d] = (float)q[d] * s;
        }
    }
    return buf;
}

#if defined(USE_AVX512)
/* q . k_j for 16 positions j (rows hd apart; hd a multiple of 16): each position's 16 partial sums are
 * reduced together with the other 15 positions' (a transpose of adds: ~3 instructions a position instead of
 * one horizontal sum each) */
static inline __attribute__((always_inline)) __m512 dot_16_rows(const float *q, const float *k, const int hd) {
    __m512 v[16], u[8], x[4];
    for (int j = 0; j < 16; j++) {
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(q), _mm512_loadu_ps(k + (size_t)j * hd));
        for (int d = 16; d < hd; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + (size_t)j * hd + d), a);
        v[j] = a;
    }
    for (int i = 0; i < 8; i++)  /* per 128-bit block: (a, b, a, b) partial sums of positions 2i, 2i+1 */
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* per block: positions 4i .. 4i+3, each summed over the block */
        const __m512d c = _mm512_castps_pd(u[2 * i]), d = _mm512_castps_pd(u[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(c, d)), _mm512_castpd_ps(_mm512_unpackhi_pd(c, d)));
    }
    /* across the four blocks: lane 4i+l of the result = sum over blocks of x[i]'s lane l */
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x88), _mm512_shuffle_f32x4(x[0], x[1], 0xDD));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x88), _mm512_shuffle_f32x4(x[2], x[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}
#endif

#if defined(USE_AVX512)
/* qq . k_j for 16 rows of 64 key bytes stored as k + 128 (unsigned: vpdpbusd multiplies unsigned by signed
 * bytes), so each sum is qq . k_j + 128 * sum(qq); reduced across the 16 positions as dot_16_rows does */
static inline __attribute__((always_inline)) __m512i idot_16_rows(const __m512i qq, const uint8_t *k) {
    __m512i v[16], u[8], x[4];
    for (int j = 0; j < 16; j++) v[j] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(k + 64 * j), qq);
    for (int i = 0; i < 8; i++)
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        x[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(u[2 * i], u[2 * i + 1]), _mm512_unpackhi_epi64(u[2 * i], u[2 * i + 1]));
    const __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[0], x[1], 0x88), _mm512_shuffle_i32x4(x[0], x[1], 0xDD));
    const __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[2], x[3], 0x88), _mm512_shuffle_i32x4(x[2], x[3], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, 0x88), _mm512_shuffle_i32x4(s01, s23, 0xDD));
}
#endif

/* p[j] = scale * q . k_j for positions j < m (rows hd apart) */
static inline __attribute__((always_inline)) void scores(const float *q, const float *k, const int hd, int m,
                                                         float scale, float *p) {
    int j = 0;
#if defined(USE_AVX512)
    if (hd % 16 == 0)
        for (; j + 16 <= m; j += 16)
            _mm512_storeu_ps(p + j, _mm512_mul_ps(dot_16_rows(q, k + (size_t)j * hd, hd), _mm512_set1_ps(scale)));
#endif
    for (; j < m; j++) p[j] = dot16(q, k + (size_t)j * hd, hd) * scale;
}

/* An int8 cache's scores: each query head is quantized as the keys are (`kv_quantize`: int8 qq, scale sq), so
 * q . k_j is an exact integer dot product, the same on every variant; score_j = dot * (scale * sq) * k_scale_j
 * (as llama.cpp, which quantizes the query to the int8 cache's type for the dot product). */
static inline void quantize_queries(const float *q, int n, int hd, float scale, int8_t *qq, float *c) {
    kv_quantize(q, n, hd, qq, c);
    for (int i = 0; i < n; i++) c[i] *= scale;
}

/* p[j] = score of positions j < m: qq (one head's int8 query, c its scale), k / ks: the chunk's keys / scales */
static inline void scores_i8(const int8_t *qq, float c, const int8_t *k, const float *ks, int hd, int m, float *p) {
    for (int j = 0; j < m; j++) {
        int32_t dot = 0;
        for (int d = 0; d < hd; d++) dot += (int32_t)qq[d] * k[(size_t)j * hd + d];
        p[j] = (float)dot * c * ks[j];
    }
}

/* n query heads (q [n][hd]) that share one kv head, over its positions 0..len-1: keys and values are read
 * (and converted, from an fp16 or int8 cache) once per chunk of positions for all n heads; each head's output
 * accumulates in local arrays, which stay in registers when hd is a constant (attend_heads dispatches
 * hd = 64). p: [n][len] scratch; out: [n][hd]. The same floating-point steps for every cache type, but an int8
 * cache's scores: integer dot products with the quantized queries (`scores_i8`). */
static inline __attribute__((always_inline)) void attend_heads_n(const float *q, int n, const KVHead kv,
                                                                 int type, const int hd, int len, float scale,
                                                                 float *p, float *out) {
    float buf[KV_CHUNK], qc[n];
    int8_t qq[n * hd];
    const int chunk = KV_CHUNK / hd;
    if (type == KV_I8) quantize_queries(q, n, hd, scale, qq, qc);
    for (int j0 = 0; j0 < len; j0 += chunk) {
        const int m = len - j0 < chunk ? len - j0 : chunk;
        if (type == KV_I8) {
            for (int i = 0; i < n; i++)
                scores_i8(qq + (size_t)i * hd, qc[i], (const int8_t *)kv.k + (size_t)j0 * hd, kv.k_scale + j0, hd, m,
                          p + (size_t)i * len + j0);
            continue;
        }
        const float *k = kv_rows(kv.k, kv.k_scale, type, j0, m, hd, buf);
        for (int i = 0; i < n; i++) scores(q + (size_t)i * hd, k, hd, m, scale, p + (size_t)i * len + j0);
    }
    for (int i = 0; i < n; i++) {
        float *pi = p + (size_t)i * len;
        const float top = max16(pi, len);
        for (int j = 0; j < len; j++) pi[j] = exp_nonpositive(pi[j] - top);
        const float inv = 1.0f / sum16(pi, len);
        for (int j = 0; j < len; j++) pi[j] *= inv;
        for (int d = 0; d < hd; d++) out[(size_t)i * hd + d] = 0.0f;
    }
    for (int j0 = 0; j0 < len; j0 += chunk) {
        const int m = len - j0 < chunk ? len - j0 : chunk;
        const float *v = kv_rows(kv.v, kv.v_scale, type, j0, m, hd, buf);
        for (int i = 0; i < n; i++) {
            const float *pi = p + (size_t)i * len + j0;
            float *o = out + (size_t)i * hd, acc[256], acc_odd[256];  /* two chains of adds, not one */
            for (int d = 0; d < hd; d++) acc[d] = o[d], acc_odd[d] = 0.0f;
            int j = 0;
            for (; j + 2 <= m; j += 2)
                for (int d = 0; d < hd; d++) {
                    acc[d] += pi[j] * v[(size_t)j * hd + d];
                    acc_odd[d] += pi[j + 1] * v[(size_t)(j + 1) * hd + d];
                }
            for (; j < m; j++)
                for (int d = 0; d < hd; d++) acc[d] += pi[j] * v[(size_t)j * hd + d];
            for (int d = 0; d < hd; d++) o[d] = acc[d] + acc_odd[d];
        }
    }
}

#if defined(USE_AVX512)
/* e^x for x <= 0 on 16 lanes: exp_nonpositive's steps, 2^n applied by vscalefps */
static inline __m512 exp16_nonpositive(const __m512 x) {
    const __m512 t = _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f),
                                     _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(_mm512_mul_ps(y, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_GE_OQ), _mm512_scalef_ps(y, n));
}

#define ATT_CHUNK 64  /* positions per pass: their fp32 keys (16 KB at hd 64) stay in L1 */

static inline __mmask16 first_lanes(int n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

/* attend_heads_n for hd = 64 on AVX-512, B (<= 6) query heads sharing one kv head, in one pass over the
 * positions (online softmax, as FlashAttention: arXiv 2205.14135): per chunk of 64 positions the keys are
 * converted once into an L1 buffer for the B heads' scores, the chunk's exponentials are taken against the
 * running max (the sums and outputs so far rescaled when it grows), and each value row is converted in
 * registers and multiplied into all B heads' outputs, which stay in registers (B x 4 of them). An int8
 * cache: the scores are integer dot products with the quantized queries (`quantize_queries`; AVX-512 VNNI on
 * the chunk's keys stored once as k + 128), each times its key's scale; values are converted unscaled in
 * registers (vpmovsxbd + vcvtdq2ps) and a value's scale multiplies its softmax weight (the sum of the weights
 * is taken without it). A head's numbers do not depend on B
 * (the same steps in the same order), so the C step and the per-head torch path agree. */
static inline __attribute__((always_inline)) void attend_group_64(const float *q, const int B, const KVHead kv,
                                                                   const int type, int len, float scale,
                                                                   float *out) {
    enum { HD = 64 };
    const char *kh = kv.k, *vh = kv.v;
    float kbuf[ATT_CHUNK * HD], s[6][ATT_CHUNK], top[6], sum[6], qc[6];
    int8_t qq[6 * HD];
    __m512i qv[6], qcorr[6];
    if (type == KV_I8) {
        quantize_queries(q, B, HD, scale, qq, qc);
        for (int i = 0; i < B; i++) {
            int32_t total = 0;
            for (int d = 0; d < HD; d++) total += qq[i * HD + d];
            qv[i] = _mm512_loadu_si512(qq + i * HD);
            qcorr[i] = _mm512_set1_epi32(128 * total);
        }
    }
    __m512 acc[6][4];
    for (int i = 0; i < B; i++)
        for (int d = 0; d < 4; d++) acc[i][d] = _mm512_setzero_ps();
    for (int i = 0; i < B; i++) top[i] = -INFINITY, sum[i] = 0.0f;
    for (int j0 = 0; j0 < len; j0 += ATT_CHUNK) {
        const int m = len - j0 < ATT_CHUNK ? len - j0 : ATT_CHUNK;
        if (type == KV_I8) {  /* the chunk's keys as k + 128, whole groups of 16 (rows past m: zeros, masked below) */
            uint8_t *kb = (uint8_t *)kbuf;
            for (int j = 0; j < m; j++)
                _mm512_storeu_si512(kb + j * HD, _mm512_xor_si512(_mm512_loadu_si512(kh + (size_t)(j0 + j) * HD),
                                                                  _mm512_set1_epi8((char)0x80)));
            for (int j = m; j % 16; j++) _mm512_storeu_si512(kb + j * HD, _mm512_setzero_si512());
            for (int i = 0; i < B; i++)
                for (int j = 0; j < m; j += 16) {
                    const __m512i dot = _mm512_sub_epi32(idot_16_rows(qv[i], kb + j * HD), qcorr[i]);
                    const __m512 ks = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), first_lanes(m - j), kv.k_scale + j0 + j);
                    _mm512_storeu_ps(s[i] + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(qc[i])), ks));
                }
        }
        const float *k = type == KV_I8 ? NULL : kv_rows(kh, NULL, type, j0, m, HD, kbuf);
        for (int i = 0; i < B; i++) {
            if (type != KV_I8) scores(q + i * HD, k, HD, m, scale, s[i]);
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < m; j += 16)  /* lanes past the chunk's end read as -inf */
                mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first_lanes(m - j), s[i] + j));
            const float chunk_top = _mm512_reduce_max_ps(mx);
            if (chunk_top > top[i]) {  /* rescale what was summed against the old max */
                const float r = exp_nonpositive(top[i] - chunk_top);
                for (int d = 0; d < 4; d++) acc[i][d] = _mm512_mul_ps(acc[i][d], _mm512_set1_ps(r));
                sum[i] *= r;
                top[i] = chunk_top;
            }
            __m512 total = _mm512_setzero_ps();
            for (int j = 0; j < m; j += 16) {
                const __m512 x = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), first_lanes(m - j), s[i] + j);
                const __m512 e = exp16_nonpositive(_mm512_sub_ps(x, _mm512_set1_ps(top[i])));  /* -inf: 0 */
                _mm512_storeu_ps(s[i] + j, type == KV_I8 ? _mm512_mul_ps(e, _mm512_maskz_loadu_ps(first_lanes(m - j),
                                                                          kv.v_scale + j0 + j))
                                                         : e);  /* int8: the weight times the value's scale */
                total = _mm512_add_ps(total, e);
            }
            sum[i] += _mm512_reduce_add_ps(total);
        }
        for (int j = 0; j < m; j++) {
            const size_t row = (size_t)(j0 + j) * HD;
            if (j0 + ATT_CHUNK + j < len) {  /* the next chunk's key and value rows, while this one computes */
                const size_t ahead = row + (size_t)ATT_CHUNK * HD;
                const size_t bytes = kv_bytes(type);
                for (size_t o = 0; o < HD * bytes; o += 64) {
                    _mm_prefetch(kh + ahead * bytes + o, _MM_HINT_T0);
                    _mm_prefetch(vh + ahead * bytes + o, _MM_HINT_T0);
                }
            }
            __m512 v[4];
            for (int d = 0; d < 4; d++)
                v[d] = type == KV_F16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)vh + row + 16 * d)))
                     : type == KV_I8 ? _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(vh + row + 16 * d))))
                     : _mm512_loadu_ps((const float *)vh + row + 16 * d);
            for (int i = 0; i < B; i++) {
                const __m512 pj = _mm512_set1_ps(s[i][j]);
                for (int d = 0; d < 4; d++) acc[i][d] = _mm512_fmadd_ps(pj, v[d], acc[i][d]);
            }
        }
    }
    for (int i = 0; i < B; i++) {
        const __m512 inv = _mm512_set1_ps(1.0f / sum[i]);
        for (int d = 0; d < 4; d++)
            _mm512_storeu_ps(out + i * HD + 16 * d, _mm512_mul_ps(acc[i][d], inv));
    }
}

static void attend_group_64_any(const float *q, int n, const KVHead kv, int type, int len, float scale, float *out) {
#define ATTEND(b)                                                           \
    if (type == KV_F16) attend_group_64(q, b, kv, KV_F16, len, scale, out); \
    else if (type == KV_I8) attend_group_64(q, b, kv, KV_I8, len, scale, out); \
    else attend_group_64(q, b, kv, KV_F32, len, scale, out);              \
    break
    switch (n) {
        case 1: ATTEND(1);
        case 2: ATTEND(2);
        case 3: ATTEND(3);
        case 4: ATTEND(4);
        case 5: ATTEND(5);
        default: ATTEND(6);
    }
#undef ATTEND
}
#endif

static void attend_heads(const float *q, int n, const KVHead kv, int type, int hd, int len, float scale, float *p,
                         float *out) {
#if defined(USE_AVX512)
    if (hd == 64) {
        for (int i = 0; i < n; i += 6) {  /* at most 6 heads' outputs (24 registers) at a time */
            const int b = n - i < 6 ? n - i : 6;
            attend_group_64_any(q + (size_t)i * 64, b, kv, type, len, scale, out + (size_t)i * 64);
        }
        return;
    }
#endif
    if (hd == 64) attend_heads_n(q, n, kv, type, 64, len, scale, p, out);
    else attend_heads_n(q, n, kv, type, hd, len, scale, p, out);
}

/* kv head g of a cache: values [KVH][max_len][hd] of `type`, scales [KVH][max_len] (int8 only, else NULL) */
static inline KVHead kv_head(void *k_cache, void *v_cache, const float *k_scale, const float *v_scale, int type,
                             int g, int max_len, int hd) {
    const size_t values = (size_t)g * max_len * hd * kv_bytes(type), scales = (size_t)g * max_len;
    KVHead kv = {(char *)k_cache + values, (char *)v_cache + values, k_scale ? k_scale + scales : NULL,
                 v_scale ? v_scale + scales : NULL};
    return kv;
}

/* Decode attention for one token over the filled part of the cache only (positions 0 .. len-1).
 * q [H][hd]; caches [KVH][max_len][hd] of `type` (KV_F32, KV_F16, or KV_I8 with scales [KVH][max_len]);
 * out [H][hd]. Grouped-query: head h reads kv head h / (H/KVH). */
void attention_decode(const float *q, void *k_cache, void *v_cache, const float *k_scale, const float *v_scale,
                      int H, int KVH, int hd, int max_len, int len, int type, float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel for schedule(static)
    for (int h = 0; h < H; h++) {
        float *p = malloc(sizeof(float) * len);
        const KVHead kv = kv_head(k_cache, v_cache, k_scale, v_scale, type, h / (H / KVH), max_len, hd);
        attend_heads(q + (size_t)h * hd, 1, kv, type, hd, len, scale, p, out + (size_t)h * hd);
        free(p);
    }
}

/* ---- the whole decode step ------------------------------------------------------------------------------
 * One token through every layer and the head in one call and one OpenMP parallel region: the threads stay
 * alive across the step and meet at a barrier only where the next phase needs the last one's output (about
 * ten per layer). Serial work between the products (norms, RoPE, routing, quantizing an input) is a few
 * microseconds and runs on one thread. Numbers are the eager engine's: the same kernels and the same order
 * of the floating-point steps (norm, RoPE, softmax, expert weights, shared expert then routed experts in
 * ascending id), so they differ from it only by summation order inside a norm or a dot product. */
typedef struct {
    const float *attn_norm, *ffn_norm;  /* [D] */
    Mat qkv, o;                         /* q, k, v rows in one matrix */
    void *k_cache, *v_cache;            /* [KVH][max_len][hd] of the model's kv_type */
    float *k_scale, *v_scale;           /* [KVH][max_len]: an int8 cache's scales (else NULL) */
    Mat gate_up, down;                  /* the dense FFN, or the shared expert (gate_up.N == 0: none) */
    const float *router, *expert_bias;  /* [E][D], [E]; router NULL: a dense layer */
    Mat expert_gate_up, expert_down;    /* expert 0's matrices; the others follow at equal strides */
} DecodeLayer;

typedef struct {
    int n_layers, D, H, KVH, hd, max_len, E, top_k, qk_norm, sigmoid, norm_topk, kv_type;
    float eps, route_scale;
    const float *inv_freq;   /* [hd/2] */
    Mat embed, head;         /* head.N == 0: the caller applies the head to `hidden` */
    const float *final_norm;
    const DecodeLayer *layers;
} DecodeModel;

static void rms_norm(const float *x, const float *w, int n, float eps, float *out) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = w ? x[i] * r * w[i] : x[i] * r;
}

/* rotate-half RoPE of one head in place (cos/sin over the first half, repeated for the second) */
static void rope(float *x, const float *cs, const float *sn, int hd) {
    const int h = hd / 2;
    for (int i = 0; i < h; i++) {
        const float a = x[i], b = x[i + h];
        x[i] = a * cs[i] + -b * sn[i];
        x[i + h] = b * cs[i] + a * sn[i];
    }
}

static void embed_row(const Mat *m, int token, float *out) {
    const int nb = token / ROWS, r = token % ROWS, K = m->K;
    const uint8_t *wb = m->w + (size_t)nb * K * 8;
    const uint16_t *sb = m->s + (size_t)nb * (K / GROUP) * ROWS;
    for (int c = 0; c < K / 8; c++)
        for (int j = 0; j < 4; j++) {
            const uint8_t b = wb[(size_t)c * 64 + r * 4 + j];
            const float s = half_to_float(sb[(8 * c / GROUP) * ROWS + r]);
            out[8 * c + j] = (float)((b & 15) - 8) * s;
            out[8 * c + 4 + j] = (float)((b >> 4) - 8) * s;
        }
}

/* rows nb*16 .. nb*16+15 of m times activation row `row` of a into y (+)= coef * (m x) */
static inline void gemv_block(const Mat *m, int nb, const Acts *a, int row, float *y, const float *coef,
                              int accumulate) {
#if defined(USE_AVX512)
    /* product_tile for one token with its epilogue in registers (no tile buffer, no scalar loop): the same
     * floating-point steps, so the same numbers. It also prefetches the matrix's next block: the hardware
     * prefetcher alone left decode 10-13% slower (S and Pro, 1 and 2 threads, BENCHMARKS.md). */
    const int K = m->K, G = K / GROUP;
    const uint8_t *wb = m->w + (size_t)nb * K * 8;
    const uint16_t *sb = m->s + (size_t)nb * G * ROWS;
    const int8_t *qa = a->q + (size_t)row * K;
    const int32_t *gs = a->gsum + (size_t)row * G;
    const __m512i low = _mm512_set1_epi8(0x0F);
    const int more = nb + 1 < m->N / ROWS;
    __m512 acc = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
        if (more) {  /* the next block's weights and scales, while this one computes */
            for (int c = 0; c < 4; c++)
                _mm_prefetch((const char *)(wb + (size_t)K * 8 + (size_t)(g * 4 + c) * 64), _MM_HINT_T0);
            if (g % 2 == 0) _mm_prefetch((const char *)(sb + (size_t)G * ROWS + g * ROWS), _MM_HINT_T0);
        }
        for (int c = 0; c < 4; c++) {
            const __m512i b = _mm512_loadu_si512((const void *)(wb + (size_t)(g * 4 + c) * 64));
            d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(b, low), _mm512_set1_epi32(load_i32(qa + g * GROUP + c * 8)));
            d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(b, 4), low),
                                     _mm512_set1_epi32(load_i32(qa + g * GROUP + c * 8 + 4)));
        }
        const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sb + g * ROWS)));
        const __m512i d = _mm512_sub_epi32(_mm512_add_epi32(d0, d1), _mm512_set1_epi32(8 * gs[g]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc);
    }
    const float sa = a->scale[row] * (coef ? coef[0] : 1.0f), zp = (float)a->zero[row];
    /* sa * (acc - zp * corr), rounded as the compiler contracts product_tile's scalar steps (one fnmadd) */
    const __m512 v = _mm512_mul_ps(_mm512_set1_ps(sa), _mm512_fnmadd_ps(_mm512_set1_ps(zp),
                                                                        _mm512_loadu_ps(m->corr + nb * ROWS), acc));
    float *out = y + nb * ROWS;
    _mm512_storeu_ps(out, accumulate ? _mm512_add_ps(_mm512_loadu_ps(out), v) : v);
#else
    float *dst[1] = {y};
    product_tile(m, nb, a, &row, 1, dst, coef, accumulate);
#endif
}

static Mat mat_index(const Mat *m, int index) { return mat_at(m->w, m->s, m->corr, m->N, m->K, index); }

/* hidden [D]: in, the token's embedding when m->embed.N == 0; out, the final-normed hidden state.
 * logits [head.N]: written when m->head.N > 0. */
/* hidden [D]: in, the token's embedding when m->embed.N == 0; out, the final-normed hidden state.
 * logits [head.N]: written when m->head.N > 0. */
void decode_step(const DecodeModel *m, int token, int pos, float *hidden, float *logits) {
    const int D = m->D, H = m->H, KVH = m->KVH, hd = m->hd, len = pos + 1, k = m->top_k, type = m->kv_type;
    int I_max = 1, I_routed = 1;
    for (int l = 0; l < m->n_layers; l++) {
        const DecodeLayer *L = &m->layers[l];
        if (L->gate_up.N / 2 > I_max) I_max = L->gate_up.N / 2;
        if (L->router) I_routed = L->expert_gate_up.N / 2;
    }
    const int qkv_n = m->layers[0].qkv.N;
    float *x = malloc(sizeof(float) * D), *xn = malloc(sizeof(float) * D), *y = malloc(sizeof(float) * D);
    float *qkv = malloc(sizeof(float) * qkv_n), *att = malloc(sizeof(float) * H * hd);
    float *cs = malloc(sizeof(float) * hd), *sn = cs + hd / 2, *p = malloc(sizeof(float) * (size_t)H * len);
    float *h_shared = malloc(sizeof(float) * 2 * I_max), *h_routed = malloc(sizeof(float) * (k > 0 ? k : 1) * 2 * I_routed);
    float *scores = malloc(sizeof(float) * (m->E > 0 ? m->E : 1));
    int *chosen = malloc(sizeof(int) * (k > 0 ? k : 1));
    float *coef = malloc(sizeof(float) * (k > 0 ? k : 1));
    Acts ax = acts_new(1, D), aatt = acts_new(1, H * hd), ahs = acts_new(1, I_max);
    Acts ahr = acts_new(k > 0 ? k : 1, I_routed);
    for (int i = 0; i < hd / 2; i++) {
        const float f = (float)pos * m->inv_freq[i];
        cs[i] = cosf(f);
        sn[i] = sinf(f);
    }
    if (m->embed.N > 0) embed_row(&m->embed, token, x);
    else memcpy(x, hidden, sizeof(float) * D);  /* the caller looked the token up */
    const float scale = 1.0f / sqrtf((float)hd);
#pragma omp parallel
    for (int l = 0; l < m->n_layers; l++) {
        const DecodeLayer *L = &m->layers[l];
        const int shared_blocks = L->gate_up.N / ROWS, has_router = L->router != NULL;
        const int expert_blocks = has_router ? L->expert_gate_up.N / ROWS : 0, n_routed = has_router ? k : 0;
#pragma omp single
        {
            rms_norm(x, L->attn_norm, D, m->eps, xn);
            quantize_row(xn, D, &ax, 0);
        }
#pragma omp for schedule(static)
        for (int nb = 0; nb < L->qkv.N / ROWS; nb++) gemv_block(&L->qkv, nb, &ax, 0, qkv, NULL, 0);
#pragma omp for schedule(static)
        for (int h = 0; h < H + KVH; h++) {  /* q heads, then k heads (and their v into the cache) */
            float *v = qkv + (size_t)h * hd;
            if (m->qk_norm) rms_norm(v, NULL, hd, m->eps, v);
            rope(v, cs, sn, hd);
            if (h >= H) {  /* this position's key and value into the cache */
                const float *value = qkv + (size_t)(H + KVH + h - H) * hd;
                const KVHead kv = kv_head(L->k_cache, L->v_cache, L->k_scale, L->v_scale, type, h - H, m->max_len, hd);
                char *k_at = (char *)kv.k + (size_t)pos * hd * kv_bytes(type);
                char *v_at = (char *)kv.v + (size_t)pos * hd * kv_bytes(type);
                if (type == KV_F16) {
                    f16_from_f32(v, (uint16_t *)k_at, hd);
                    f16_from_f32(value, (uint16_t *)v_at, hd);
                } else if (type == KV_I8) {
                    kv_quantize(v, 1, hd, (int8_t *)k_at, (float *)kv.k_scale + pos);
                    kv_quantize(value, 1, hd, (int8_t *)v_at, (float *)kv.v_scale + pos);
                } else {
                    memcpy(k_at, v, sizeof(float) * hd);
                    memcpy(v_at, value, sizeof(float) * hd);
                }
            }
        }
        {  /* each thread a contiguous range of query heads; those in it that share a kv head go together */
            const int nt = omp_get_num_threads(), t = omp_get_thread_num(), G = H / KVH;
            for (int h = H * t / nt, end = H * (t + 1) / nt; h < end;) {
                const int g = h / G, n = (end < (g + 1) * G ? end : (g + 1) * G) - h;
                attend_heads(qkv + (size_t)h * hd, n,
                             kv_head(L->k_cache, L->v_cache, L->k_scale, L->v_scale, type, g, m->max_len, hd), type,
                             hd, len, scale, p + (size_t)h * len, att + (size_t)h * hd);
                h += n;
            }
        }
#pragma omp barrier
#pragma omp single
        quantize_row(att, H * hd, &aatt, 0);
#pragma omp for schedule(static)
        for (int nb = 0; nb < D / ROWS; nb++) gemv_block(&L->o, nb, &aatt, 0, y, NULL, 0);
#pragma omp single
        {
            for (int i = 0; i < D; i++) x[i] = x[i] + y[i];
            rms_norm(x, L->ffn_norm, D, m->eps, xn);
            quantize_row(xn, D, &ax, 0);
            if (has_router) {  /* Router.forward: select by score (+ bias for sigmoid), weight by the score */
                float top = -INFINITY, total = 0.0f;
                for (int e = 0; e < m->E; e++) {
                    const float dot = dot16(xn, L->router + (size_t)e * D, D);
                    scores[e] = dot;
                    top = dot > top ? dot : top;
                }
                for (int e = 0; e < m->E; e++) {
                    if (m->sigmoid) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
                    else total += (scores[e] = expf(scores[e] - top));
                }
                if (!m->sigmoid)
                    for (int e = 0; e < m->E; e++) scores[e] /= total;
                unsigned char taken[1024] = {0};
                for (int j = 0; j < k; j++) {  /* top-k, ties to the lower id */
                    int best = -1;
                    float best_v = -INFINITY;
                    for (int e = 0; e < m->E; e++) {
                        const float v = scores[e] + (m->sigmoid ? L->expert_bias[e] : 0.0f);
                        if (!taken[e] && (best < 0 || v > best_v)) best = e, best_v = v;
                    }
                    taken[best] = 1;
                    chosen[j] = best;
                }
                float wsum = 0.0f;
                for (int j = 0; j < k; j++) wsum += scores[chosen[j]];
                for (int j = 0; j < k; j++) {
                    float w = scores[chosen[j]];
                    if (m->norm_topk) w = w / (wsum > 1e-20f ? wsum : 1e-20f);
                    coef[j] = w * m->route_scale;
                }
                for (int a = 1; a < k; a++)  /* ascending expert id: the eager kernel's order of the sum */
                    for (int b = a; b > 0 && chosen[b - 1] > chosen[b]; b--) {
                        const int ti = chosen[b]; chosen[b] = chosen[b - 1]; chosen[b - 1] = ti;
                        const float tf = coef[b]; coef[b] = coef[b - 1]; coef[b - 1] = tf;
                    }
            }
        }
#pragma omp for schedule(static)
        for (int u = 0; u < shared_blocks + n_routed * expert_blocks; u++) {
            if (u < shared_blocks) {
                gemv_block(&L->gate_up, u, &ax, 0, h_shared, NULL, 0);
            } else {
                const int j = (u - shared_blocks) / expert_blocks, nb = (u - shared_blocks) % expert_blocks;
                const Mat e = mat_index(&L->expert_gate_up, chosen[j]);
                gemv_block(&e, nb, &ax, 0, h_routed + (size_t)j * 2 * I_routed, NULL, 0);
            }
        }
#pragma omp for schedule(static)
        for (int s = 0; s < (shared_blocks > 0) + n_routed; s++) {  /* silu(gate) * up, quantized */
            const int is_shared = shared_blocks > 0 && s == 0, j = s - (shared_blocks > 0);
            const int I = is_shared ? shared_blocks * ROWS / 2 : I_routed;
            float *row = is_shared ? h_shared : h_routed + (size_t)j * 2 * I_routed;
            for (int i = 0; i < I; i++) row[i] = row[i] / (1.0f + expf(-row[i])) * row[I + i];
            if (is_shared) quantize_row(row, I, &ahs, 0);
            else quantize_row(row, I, &ahr, j);
        }
#pragma omp for schedule(static)
        for (int nb = 0; nb < D / ROWS; nb++) {
            if (shared_blocks > 0) gemv_block(&L->down, nb, &ahs, 0, y, NULL, 0);
            else memset(y + nb * ROWS, 0, sizeof(float) * ROWS);
            for (int j = 0; j < n_routed; j++) {
                const Mat e = mat_index(&L->expert_down, chosen[j]);
                gemv_block(&e, nb, &ahr, j, y, coef + j, 1);
            }
        }
#pragma omp single
        for (int i = 0; i < D; i++) x[i] = x[i] + y[i];
    }
    rms_norm(x, m->final_norm, D, m->eps, hidden);
    if (m->head.N > 0) {
        quantize_row(hidden, D, &ax, 0);
#pragma omp parallel for schedule(static)
        for (int nb = 0; nb < m->head.N / ROWS; nb++) gemv_block(&m->head, nb, &ax, 0, logits, NULL, 0);
    }
    acts_free(&ax); acts_free(&aatt); acts_free(&ahs); acts_free(&ahr);
    free(x); free(xn); free(y); free(qkv); free(att); free(cs); free(p); free(h_shared); free(h_routed);
    free(scores); free(chosen); free(coef);
}
