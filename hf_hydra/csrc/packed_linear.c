/* Few-row float32 linear layers for AVX2 + FMA and AVX-512 CPUs, at the memory limit.
 *
 * y (n, out) = x (n, in) @ W (out, in)^T + bias, for the handful of rows a decoding step or a tree verification
 * feeds. The weight is packed once into panels of 16 output columns, Wp (ceil(out / 16), in, 16), so each panel
 * streams from memory as one sequential run of 64-byte lines while a group of rows of x accumulates against it in
 * registers, no horizontal sums: with AVX2 up to 6 rows in 12 ymm registers (2 vector loads and 6 broadcasts per
 * 12 fused multiply-adds), with AVX-512 up to 12 rows in 12 zmm registers (one load of a whole 64-byte line, the
 * broadcasts folded into the multiply-adds). A panel is read from memory once and from cache for each further
 * group (two AVX2 groups take it chunk by chunk, see panel_block). Panels are split over OpenMP threads (torch's
 * runtime: the library is loaded after torch, and both use libgomp.so.1). The AVX-512 functions carry their own
 * target attribute, so one library serves both kinds of CPU.
 *
 * Summation order: each output is one float32 sum over k in order with one rounding per fused multiply-add, in
 * both instruction sets, so the AVX2 and AVX-512 kernels agree bit for bit and results differ from MKL's by
 * rounding only.
 *
 * The panels hold float32 or bfloat16 weights (the `_bf16` functions). A bfloat16 weight is widened to float32 in
 * registers (it is a float32's upper half) and the sums stay float32: half the bytes to stream, for layers that can
 * take bfloat16 weights (draft heads: the base verifies whatever they propose). Each output equals the float32
 * kernel's on the same weights rounded to bfloat16.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define PANEL 16
#define AVX2_GROUP 6    /* 16 ymm registers: 12 accumulators, 2 weight halves, 1 broadcast */
#define AVX512_GROUP 12 /* 32 zmm registers: room to spare; 12 rows cover a tree verification in one group */
#define MAX_GROUP AVX512_GROUP
#define BLOCK_ROWS 48    /* rows whose sums a panel's tile holds at once (3 KB) */
#define AVX2_CHUNK 64    /* steps of k per chunk where two AVX2 groups share a panel (see panel_block) */
/* With several rows the hardware prefetcher falls behind: asking for the line 16 steps ahead (1 KB) lets 2-6 rows
 * stream 30 layers' weights as fast as one row does on an AVX2 EPYC (32 steps left 2-4 rows 10-20% slower, none
 * 3-24% slower still); one row streams as fast without it. */
#define PREFETCH_LINES 16

/* Named accumulators, not arrays: gcc kept an array of them in memory, storing all of them on every step of k
 * (8 stores per step: a third of the FMA rate). Conditions on the constant `rows` vanish at compile time. */
#define ROW_STEP(R)                                                                                               \
    if (rows > R) {                                                                                               \
        const __m256 xr = _mm256_broadcast_ss(x + R * ldx + k);                                                   \
        lo##R = _mm256_fmadd_ps(xr, w_lo, lo##R);                                                                 \
        hi##R = _mm256_fmadd_ps(xr, w_hi, hi##R);                                                                 \
    }
#define ROW_LOAD(R)                                                                                               \
    if (rows > R) {                                                                                               \
        lo##R = _mm256_loadu_ps(y + R * ldy);                                                                     \
        hi##R = _mm256_loadu_ps(y + R * ldy + 8);                                                                 \
    }
#define ROW_STORE(R)                                                                                              \
    if (rows > R) {                                                                                               \
        _mm256_storeu_ps(y + R * ldy, lo##R);                                                                     \
        _mm256_storeu_ps(y + R * ldy + 8, hi##R);                                                                 \
    }

/* Weights 1 KB ahead (16 64-byte lines) of the step k reading `wp`, whatever the weight type. */
#define PREFETCH_AHEAD() \
    _mm_prefetch((const char *)(wp + k * PANEL) + ahead, _MM_HINT_T0)

/* Panel row k as two halves of 8 float32 columns. */
#define LOAD_AVX2_float(w_lo, w_hi)                                                                               \
    const __m256 w_lo = _mm256_loadu_ps(wp + k * PANEL), w_hi = _mm256_loadu_ps(wp + k * PANEL + 8);
#define LOAD_AVX2_uint16_t(w_lo, w_hi)                                                                            \
    const __m256i w_bits = _mm256_loadu_si256((const __m256i *)(wp + k * PANEL));                                \
    const __m256 w_lo = bf16x8_to_ps(_mm256_castsi256_si128(w_bits));                                            \
    const __m256 w_hi = bf16x8_to_ps(_mm256_extracti128_si256(w_bits, 1));

static inline __m256 bf16x8_to_ps(__m128i bits) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

#define PANEL_KERNEL(NAME, WT, ROWS)                                                                              \
    static void NAME##_##ROWS(const float *x, int64_t ldx, int64_t steps, const void *panel, int64_t ahead,      \
                              int accumulate, float *y, int64_t ldy) {                                         \
        enum { rows = ROWS };                                                                                  \
        const WT *wp = (const WT *)panel;                                                                      \
        __m256 lo0 = _mm256_setzero_ps(), lo1 = lo0, lo2 = lo0, lo3 = lo0, lo4 = lo0, lo5 = lo0;               \
        __m256 hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0, hi4 = lo0, hi5 = lo0;                               \
        if (accumulate) {                                                                                      \
            ROW_LOAD(0) ROW_LOAD(1) ROW_LOAD(2) ROW_LOAD(3) ROW_LOAD(4) ROW_LOAD(5)                            \
        }                                                                                                      \
        for (int64_t k = 0; k < steps; k++) {                                                                  \
            if (ahead) PREFETCH_AHEAD();                                                                       \
            LOAD_AVX2_##WT(w_lo, w_hi)                                                                         \
            ROW_STEP(0) ROW_STEP(1) ROW_STEP(2) ROW_STEP(3) ROW_STEP(4) ROW_STEP(5)                            \
        }                                                                                                      \
        ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3) ROW_STORE(4) ROW_STORE(5)                           \
    }
#define PANEL_KERNELS(NAME, WT)                                                                                   \
    PANEL_KERNEL(NAME, WT, 1)                                                                                     \
    PANEL_KERNEL(NAME, WT, 2)                                                                                     \
    PANEL_KERNEL(NAME, WT, 3)                                                                                     \
    PANEL_KERNEL(NAME, WT, 4)                                                                                     \
    PANEL_KERNEL(NAME, WT, 5)                                                                                     \
    PANEL_KERNEL(NAME, WT, 6)

PANEL_KERNELS(panel, float)
PANEL_KERNELS(panel_bf16, uint16_t)

/* AVX-512: one zmm register is a whole panel row of 16 columns, one load a whole 64-byte line. */
#define ROW_STEP_512(R)                                                                                           \
    if (rows > R) acc##R = _mm512_fmadd_ps(_mm512_set1_ps(x[R * ldx + k]), w, acc##R);
#define ROW_LOAD_512(R)                                                                                           \
    if (rows > R) acc##R = _mm512_loadu_ps(y + R * ldy);
#define ROW_STORE_512(R)                                                                                          \
    if (rows > R) _mm512_storeu_ps(y + R * ldy, acc##R);

#define LOAD_512_float(w) const __m512 w = _mm512_loadu_ps(wp + k * PANEL);
#define LOAD_512_uint16_t(w) const __m512 w = bf16x16_to_ps(_mm256_loadu_si256((const __m256i *)(wp + k * PANEL)));

__attribute__((target("avx512f"))) static inline __m512 bf16x16_to_ps(__m256i bits) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

#define PANEL_KERNEL_512(NAME, WT, ROWS)                                                                          \
    __attribute__((target("avx512f"))) static void NAME##_##ROWS(const float *x, int64_t ldx, int64_t steps,    \
                                                                  const void *panel, int64_t ahead,            \
                                                                  int accumulate, float *y, int64_t ldy) {     \
        enum { rows = ROWS };                                                                                  \
        const WT *wp = (const WT *)panel;                                                                      \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0, acc4 = acc0, acc5 = acc0;     \
        __m512 acc6 = acc0, acc7 = acc0, acc8 = acc0, acc9 = acc0, acc10 = acc0, acc11 = acc0;                  \
        if (accumulate) {                                                                                      \
            ROW_LOAD_512(0) ROW_LOAD_512(1) ROW_LOAD_512(2) ROW_LOAD_512(3) ROW_LOAD_512(4) ROW_LOAD_512(5)    \
            ROW_LOAD_512(6) ROW_LOAD_512(7) ROW_LOAD_512(8) ROW_LOAD_512(9) ROW_LOAD_512(10) ROW_LOAD_512(11)  \
        }                                                                                                      \
        for (int64_t k = 0; k < steps; k++) {                                                                  \
            if (ahead) PREFETCH_AHEAD();                                                                       \
            LOAD_512_##WT(w)                                                                                   \
            ROW_STEP_512(0) ROW_STEP_512(1) ROW_STEP_512(2) ROW_STEP_512(3) ROW_STEP_512(4) ROW_STEP_512(5)    \
            ROW_STEP_512(6) ROW_STEP_512(7) ROW_STEP_512(8) ROW_STEP_512(9) ROW_STEP_512(10) ROW_STEP_512(11)  \
        }                                                                                                      \
        ROW_STORE_512(0) ROW_STORE_512(1) ROW_STORE_512(2) ROW_STORE_512(3) ROW_STORE_512(4) ROW_STORE_512(5)  \
        ROW_STORE_512(6) ROW_STORE_512(7) ROW_STORE_512(8) ROW_STORE_512(9) ROW_STORE_512(10)                  \
        ROW_STORE_512(11)                                                                                      \
    }
#define PANEL_KERNELS_512(NAME, WT)                                                                               \
    PANEL_KERNEL_512(NAME, WT, 1)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 2)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 3)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 4)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 5)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 6)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 7)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 8)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 9)                                                                                 \
    PANEL_KERNEL_512(NAME, WT, 10)                                                                                \
    PANEL_KERNEL_512(NAME, WT, 11)                                                                                \
    PANEL_KERNEL_512(NAME, WT, 12)

PANEL_KERNELS_512(panel512, float)
PANEL_KERNELS_512(panel512_bf16, uint16_t)

typedef void (*panel_fn)(const float *, int64_t, int64_t, const void *, int64_t, int, float *, int64_t);
typedef struct {
    int64_t max_group;
    int64_t weight_bytes;            /* 4: float32 panels, 2: bfloat16 */
    int64_t chunk_steps;             /* 0: each group streams the whole panel (see panel_block) */
    panel_fn kernels[MAX_GROUP + 1]; /* kernels[r]: a group of r rows */
} instruction_set;

#define AVX2_SET(NAME, BYTES)                                                                                     \
    {AVX2_GROUP, BYTES, AVX2_CHUNK, {0, NAME##_1, NAME##_2, NAME##_3, NAME##_4, NAME##_5, NAME##_6}}
#define AVX512_SET(NAME, BYTES)                                                                                   \
    {AVX512_GROUP, BYTES, 0,                                                                                      \
     {0, NAME##_1, NAME##_2, NAME##_3, NAME##_4, NAME##_5, NAME##_6, NAME##_7, NAME##_8, NAME##_9, NAME##_10,        \
      NAME##_11, NAME##_12}}
static const instruction_set AVX2 = AVX2_SET(panel, 4);
static const instruction_set AVX2_BF16 = AVX2_SET(panel_bf16, 2);
static const instruction_set AVX512 = AVX512_SET(panel512, 4);
static const instruction_set AVX512_BF16 = AVX512_SET(panel512_bf16, 2);

/* Rows in a group: near-equal groups of at most max_group rows over the `remaining` ones. */
static int64_t group_rows(const instruction_set *isa, int64_t remaining) {
    const int64_t groups = (remaining + isa->max_group - 1) / isa->max_group;
    return (remaining + groups - 1) / groups;
}

/* n rows against one panel, their sums into a tile (n, PANEL). One group streams the panel once. Several groups
 * (AVX2: more than 6 rows) would each stream it in turn, the first from memory and the others from cache, so the
 * memory would idle during the others' arithmetic; where isa->chunk_steps is set they take the panel in chunks of
 * that many steps instead (4 KB of float32, in L1): every group runs over a chunk while the groups after the first
 * ask for the next one. Each output stays one in-order sum over k: the tile holds it between chunks. Over
 * SmolLM2's layers on an AVX2 EPYC, one thread, that made 7 and 8 rows 15-17% faster and 10 and 12 rows 9%
 * (chunks of 32 or 128 steps gained less); three groups and more (13-32 rows) came out within noise, -10% to +6%,
 * so only two groups take chunks. The AVX-512 kernels keep 12-row groups over the whole panel, as measured there. */
static void panel_block(const instruction_set *isa, const float *x, int64_t n, int64_t in, const char *wp,
                        float *tile) {
    const int64_t ahead = PREFETCH_LINES * 64, step_bytes = PANEL * isa->weight_bytes;
    const int chunked = isa->chunk_steps && n > isa->max_group && n <= 2 * isa->max_group;
    const int64_t chunk = chunked ? isa->chunk_steps : in;
    /* one row streams as fast without asking ahead; whole-panel groups ask 16 lines ahead; in chunks the first
     * group asks twice as far and the second for the next chunk */
    const int64_t first_ahead = n == 1 ? 0 : chunked ? 2 * ahead : ahead;
    const int64_t later_ahead = chunked ? chunk * step_bytes : ahead;
    for (int64_t k0 = 0; k0 < in; k0 += chunk) {
        const int64_t steps = in - k0 < chunk ? in - k0 : chunk;
        for (int64_t r = 0, rows; r < n; r += rows) {
            rows = group_rows(isa, n - r);
            const int64_t prefetch = r == 0 ? first_ahead : later_ahead;
            isa->kernels[rows](x + r * in + k0, in, steps, wp + k0 * step_bytes, prefetch, k0 > 0, tile + r * PANEL,
                               PANEL);
        }
    }
}

/* One panel against all n rows, in blocks of up to BLOCK_ROWS; y points at the panel's columns, `width` real. */
static void panel_rows(const instruction_set *isa, const float *x, int64_t n, int64_t in, const char *wp,
                       const float *bias, float *y, int64_t ldy, int64_t width) {
    float tile[BLOCK_ROWS * PANEL];
    for (int64_t r0 = 0; r0 < n; r0 += BLOCK_ROWS) {
        const int64_t rows = n - r0 < BLOCK_ROWS ? n - r0 : BLOCK_ROWS;
        panel_block(isa, x + r0 * in, rows, in, wp, tile);
        for (int64_t i = 0; i < rows; i++) {
            float *out = y + (r0 + i) * ldy;
            memcpy(out, tile + i * PANEL, width * sizeof(float));
            if (bias)
                for (int64_t c = 0; c < width; c++) out[c] += bias[c];
        }
    }
}

static void packed_linear(const instruction_set *isa, const float *x, int64_t n, int64_t in, const void *wp,
                          int64_t out, const float *bias, float *y) {
    const int64_t panels = (out + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) if (panels * in >= 8192)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t column = p * PANEL;
        const int64_t width = out - column < PANEL ? out - column : PANEL;
        const char *panel = (const char *)wp + column * in * isa->weight_bytes;
        panel_rows(isa, x, n, in, panel, bias ? bias + column : 0, y + column, out, width);
    }
}

/* x (n, in), wp (ceil(out / 16), in, 16), bias (out,) or NULL, y (n, out); all contiguous, float32 except the
 * `_bf16` functions' wp (bfloat16 bits). The avx512 functions only where hh_has_avx512() says so. */
void hh_packed_linear_avx2(const float *x, int64_t n, int64_t in, const void *wp, int64_t out, const float *bias,
                           float *y) {
    packed_linear(&AVX2, x, n, in, wp, out, bias, y);
}

void hh_packed_linear_avx2_bf16(const float *x, int64_t n, int64_t in, const void *wp, int64_t out,
                                const float *bias, float *y) {
    packed_linear(&AVX2_BF16, x, n, in, wp, out, bias, y);
}

void hh_packed_linear_avx512(const float *x, int64_t n, int64_t in, const void *wp, int64_t out,
                             const float *bias, float *y) {
    packed_linear(&AVX512, x, n, in, wp, out, bias, y);
}

void hh_packed_linear_avx512_bf16(const float *x, int64_t n, int64_t in, const void *wp, int64_t out,
                                  const float *bias, float *y) {
    packed_linear(&AVX512_BF16, x, n, in, wp, out, bias, y);
}

int hh_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

int hh_panel_width(void) { return PANEL; }
