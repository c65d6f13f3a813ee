/* Kernel self-test for builds that Python cannot load here (the NEON variant under qemu-aarch64):
 * includes the kernels, fills one matrix in the layout with fixed pseudo-random bytes and scales, runs
 * q4_linear on a few tokens, then decode attention over an fp16 KV cache (written by f16_from_f32) and an
 * int8 one (written by kv_quantize), then the 8-bit head's product (w8_linear), and prints the outputs, one
 * per line. tests/test_infer.py compares the output of each build with the same program built as the
 * portable variant. */
#include "../../src/mobilemoe/infer/kernels/q8q4.c"

#include <stdio.h>

static uint32_t state = 12345u;
static uint32_t next(void) { state = state * 1664525u + 1013904223u; return state >> 8; }

int main(void) {
    enum { N = 48, K = 96, T = 5 };
    static uint8_t w[N * K / 2];
    static uint16_t s[N * K / 32];
    static float corr[N], x[T * K], y[T * N];
    for (int i = 0; i < N * K / 2; i++) w[i] = (uint8_t)next();
    for (int i = 0; i < N * K / 32; i++) s[i] = (uint16_t)(0x2000 + next() % 0x800);  /* fp16 ~ 0.008 .. 0.03 */
    for (int n = 0; n < N; n++) {  /* corr[n] = sum_g scale * sum q, from the layout */
        float c = 0.0f;
        for (int g = 0; g < K / GROUP; g++) {
            int sum = 0;
            for (int ch = 0; ch < 4; ch++)
                for (int j = 0; j < 4; j++) {
                    const uint8_t b = w[(size_t)(n / ROWS) * K * 8 + (g * 4 + ch) * 64 + (n % ROWS) * 4 + j];
                    sum += (b & 15) - 8 + (b >> 4) - 8;
                }
            c += half_to_float(s[(size_t)(n / ROWS) * (K / GROUP) * ROWS + g * ROWS + n % ROWS]) * (float)sum;
        }
        corr[n] = c;
    }
    for (int i = 0; i < T * K; i++) x[i] = (float)((int)(next() % 2001) - 1000) / 250.0f;
    for (int t = 1; t <= T; t += 4) {  /* one token (decode) and a tile of four */
        q4_linear(x, t, K, N, w, s, corr, y);
        for (int i = 0; i < t * N; i++) printf("%.9g\n", y[i]);
    }
    enum { H = 4, KVH = 2, HD = 16, LEN = 37 };  /* fp16 KV cache: the conversions and the attention */
    static float q[H * HD], kv[2][KVH * LEN * HD], att[H * HD];
    static uint16_t kv16[2][KVH * LEN * HD];
    for (int i = 0; i < H * HD; i++) q[i] = (float)((int)(next() % 2001) - 1000) / 500.0f;
    for (int c = 0; c < 2; c++) {
        for (int i = 0; i < KVH * LEN * HD; i++) kv[c][i] = (float)((int)(next() % 2001) - 1000) / 300.0f;
        f16_from_f32(kv[c], kv16[c], KVH * LEN * HD);
    }
    attention_decode(q, kv16[0], kv16[1], NULL, NULL, H, KVH, HD, LEN, LEN, KV_F16, att);
    for (int i = 0; i < H * HD; i++) printf("%.9g\n", att[i]);
    static int8_t kv8[2][KVH * LEN * HD];  /* int8 KV cache: its quantization and the attention */
    static float kv_scale[2][KVH * LEN];
    for (int c = 0; c < 2; c++) kv_quantize(kv[c], KVH * LEN, HD, kv8[c], kv_scale[c]);
    for (int i = 0; i < KVH * LEN * HD; i += 7) printf("%d\n", kv8[1][i]);
    for (int i = 0; i < KVH * LEN; i++) printf("%.9g\n", kv_scale[0][i]);
    attention_decode(q, kv8[0], kv8[1], kv_scale[0], kv_scale[1], H, KVH, HD, LEN, LEN, KV_I8, att);
    for (int i = 0; i < H * HD; i++) printf("%.9g\n", att[i]);
    enum { WN = 21, WK = 37, WM = 5 };  /* the 8-bit head's product: a tile of 4 tokens and one alone, tails */
    static int8_t hw[WN * WK];
    static float hs[WN], hx[WM * WK], hy[WM * WN];
    for (int i = 0; i < WN * WK; i++) hw[i] = (int8_t)(next() % 255 - 127);
    for (int i = 0; i < WN; i++) hs[i] = (float)(next() % 1000 + 1) / 1e5f;
    for (int i = 0; i < WM * WK; i++) hx[i] = (float)((int)(next() % 2001) - 1000) / 250.0f;
    w8_linear(hx, WM, WK, WN, hw, hs, hy);
    for (int i = 0; i < WM * WN; i++) printf("%.9g\n", hy[i]);
    printf("%s\n", q4_variant());
    return 0;
}
