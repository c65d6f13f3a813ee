/* MoE decode for one token in a single call: the k chosen experts' SwiGLU on aten's CPU int4pack layout.
 *
 * Written by hand because aten has no grouped int4 kernel: running k experts through
 * `_weight_int4pack_mm_for_cpu` costs 2k calls per layer, each tens of microseconds on an expert-sized
 * matrix. This kernel reads the same packed weights (no second copy) and does all of it in one call.
 *
 * Layout (aten's AVX-512 int4pack, BLOCK_N = 64): an [N, K] weight is stored as [N/64][K][32] bytes; in
 * block b, byte j of column k holds row 64b+j in its low nibble and row 64b+32+j in its high nibble, as
 * unsigned u with value (u - 8) * scale. Scales-and-zeros are [K/32][N][2] bf16; our zeros are always 0
 * (symmetric INT4), so only the scale is read. The Python side checks this layout before using the kernel.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* out[0..63] = rows 64*block .. 64*block+63 of W (N x K, packed) times x (K floats), AVX-512.
 * Per column k: 32 bytes -> 64 nibbles -> 4 x 16 floats, each FMA'd with x[k] broadcast. The -8 offset
 * is applied once per group of 32: sum_k (u - 8) x_k = sum_k u x_k - 8 sum_k x_k. */
static void gemv_block(const uint8_t *packed, const uint16_t *scales_zeros, int N, int K, int block,
                       const float *x, float *out) {
    const __m128i low_nibble = _mm_set1_epi8(0x0F);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    const uint8_t *base = packed + (size_t)block * K * 32;
    for (int g = 0; g < K / 32; g++) {
        __m512 part[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int kk = 0; kk < 32; kk++) {
            const uint8_t *b = base + (size_t)(g * 32 + kk) * 32;
            const __m128i b0 = _mm_loadu_si128((const __m128i *)b), b1 = _mm_loadu_si128((const __m128i *)(b + 16));
            const __m512 xv = _mm512_set1_ps(x[g * 32 + kk]);
            /* byte j: row j in the low nibble, row j + 32 in the high one */
            const __m128i nib[4] = {_mm_and_si128(b0, low_nibble), _mm_and_si128(b1, low_nibble),
                                    _mm_and_si128(_mm_srli_epi16(b0, 4), low_nibble),
                                    _mm_and_si128(_mm_srli_epi16(b1, 4), low_nibble)};
            for (int q = 0; q < 4; q++)
                part[q] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(nib[q])), xv, part[q]);
        }
        const float x_sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x + g * 32),
                                                               _mm512_loadu_ps(x + g * 32 + 16)));
        const __m512 offset = _mm512_set1_ps(8.0f * x_sum);
        /* (scale, zero) bf16 pairs as 32-bit words: shifting left by 16 leaves the scale as an fp32 */
        const uint16_t *sz = scales_zeros + ((size_t)g * N + (size_t)block * 64) * 2;
        for (int q = 0; q < 4; q++) {
            const __m512i pairs = _mm512_loadu_si512((const void *)(sz + q * 32));
            const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            acc[q] = _mm512_fmadd_ps(_mm512_sub_ps(part[q], offset), scale, acc[q]);
        }
    }
    for (int q = 0; q < 4; q++) _mm512_storeu_ps(out + q * 16, acc[q]);
}

/* y[D] = sum_j weights[j] * down_e(silu(gate_e(x)) * up_e(x)), e = experts[j], j < k.
 * gate_up: [E][2I/64][D][32] bytes, gate_up_sz: [E][D/32][2I][2]; down: [E][D/64][I][32], down_sz:
 * [E][I/32][D][2]; hidden: scratch of k*2I floats. */
void moe_decode(const float *x, const int64_t *experts, const float *weights, int k, int D, int I,
                const uint8_t *gate_up, const uint16_t *gate_up_sz, const uint8_t *down,
                const uint16_t *down_sz, float *hidden, float *y) {
    const int N1 = 2 * I, blocks1 = N1 / 64, blocks2 = D / 64;
    const size_t gu_bytes = (size_t)N1 * D / 2, gu_sz = (size_t)(D / 32) * N1 * 2;
    const size_t dn_bytes = (size_t)D * I / 2, dn_sz = (size_t)(I / 32) * D * 2;
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int r = 0; r < k * blocks1; r++) {
            const int j = r / blocks1, block = r % blocks1;
            const int64_t e = experts[j];
            gemv_block(gate_up + e * gu_bytes, gate_up_sz + e * gu_sz, N1, D, block, x,
                       hidden + (size_t)j * N1 + block * 64);
        }
#pragma omp for schedule(static)
        for (int r = 0; r < k * I; r++) {  /* SwiGLU in place: hidden[j][i] = silu(gate) * up */
            const int j = r / I, i = r % I;
            const float gate = hidden[(size_t)j * N1 + i], up = hidden[(size_t)j * N1 + I + i];
            hidden[(size_t)j * N1 + i] = gate / (1.0f + expf(-gate)) * up;
        }
#pragma omp for schedule(static)
        for (int block = 0; block < blocks2; block++) {
            float acc[64] = {0}, out[64];
            for (int j = 0; j < k; j++) {
                const int64_t e = experts[j];
                gemv_block(down + e * dn_bytes, down_sz + e * dn_sz, D, I, block, hidden + (size_t)j * N1, out);
                for (int n = 0; n < 64; n++) acc[n] += weights[j] * out[n];
            }
            memcpy(y + block * 64, acc, sizeof acc);
        }
    }
}
