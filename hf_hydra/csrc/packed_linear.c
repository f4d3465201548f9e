/* Few-row float32 linear layers for AVX2 + FMA and AVX-512 CPUs, at the memory limit.
 *
 * y (n, out) = x (n, in) @ W (out, in)^T + bias, for the handful of rows a decoding step or a tree verification
 * feeds. The weight is packed once into panels of 16 output columns, Wp (ceil(out / 16), in, 16), so each panel
 * streams from memory as one sequential run of 64-byte lines while a group of rows of x accumulates against it in
 * registers, no horizontal sums: with AVX2 up to 6 rows in 12 ymm registers (2 vector loads and 6 broadcasts per
 * 12 fused multiply-adds), with AVX-512 up to 12 rows in 12 zmm registers (one load of a whole 64-byte line, the
 * broadcasts folded into the multiply-adds). A panel is read from memory once and from cache for each further
 * group. Panels are split over OpenMP threads (torch's runtime: the library is loaded after torch, and both use
 * libgomp.so.1). The AVX-512 functions carry their own target attribute, so one library serves both kinds of CPU.
 *
 * Summation order: each output is one float32 sum over k in order with one rounding per fused multiply-add, in
 * both instruction sets, so the AVX2 and AVX-512 kernels agree bit for bit and results differ from MKL's by
 * rounding only.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define PANEL 16
#define AVX2_GROUP 6    /* 16 ymm registers: 12 accumulators, 2 weight halves, 1 broadcast */
#define AVX512_GROUP 12 /* 32 zmm registers: room to spare; 12 rows cover a tree verification in one group */
#define MAX_GROUP AVX512_GROUP
/* With several rows the hardware prefetcher falls behind: asking for the line 16 steps ahead (1 KB) lets 2-6 rows
 * stream 30 layers' weights as fast as one row does on an AVX2 EPYC (32 steps left 2-4 rows 10-20% slower, none
 * 3-24% slower still); one row streams as fast without it. */
#define PREFETCH_LINES 16

/* Named accumulators, not arrays: gcc kept an array of them in memory, storing all of them on every step of k
 * (8 stores per step: a third of the FMA rate). Conditions on the constant `rows` vanish at compile time. */
#define ROW_STEP(R)                                                                                               \
    if (rows > R) {                                                                                               \
        const __m256 xr = _mm256_broadcast_ss(x + R * in + k);                                                    \
        lo##R = _mm256_fmadd_ps(xr, w_lo, lo##R);                                                                 \
        hi##R = _mm256_fmadd_ps(xr, w_hi, hi##R);                                                                 \
    }
#define ROW_STORE(R)                                                                                              \
    if (rows > R) {                                                                                               \
        _mm256_storeu_ps(y + R * ldy, lo##R);                                                                     \
        _mm256_storeu_ps(y + R * ldy + 8, hi##R);                                                                 \
    }

#define PANEL_KERNEL(ROWS)                                                                                        \
    static void panel_##ROWS(const float *x, int64_t in, const float *wp, float *y, int64_t ldy) {             \
        enum { rows = ROWS };                                                                                  \
        __m256 lo0 = _mm256_setzero_ps(), lo1 = lo0, lo2 = lo0, lo3 = lo0, lo4 = lo0, lo5 = lo0;               \
        __m256 hi0 = lo0, hi1 = lo0, hi2 = lo0, hi3 = lo0, hi4 = lo0, hi5 = lo0;                               \
        for (int64_t k = 0; k < in; k++) {                                                                     \
            if (ROWS > 1) _mm_prefetch((const char *)(wp + (k + PREFETCH_LINES) * PANEL), _MM_HINT_T0);         \
            const __m256 w_lo = _mm256_loadu_ps(wp + k * PANEL), w_hi = _mm256_loadu_ps(wp + k * PANEL + 8);   \
            ROW_STEP(0) ROW_STEP(1) ROW_STEP(2) ROW_STEP(3) ROW_STEP(4) ROW_STEP(5)                            \
        }                                                                                                      \
        ROW_STORE(0) ROW_STORE(1) ROW_STORE(2) ROW_STORE(3) ROW_STORE(4) ROW_STORE(5)                           \
    }

PANEL_KERNEL(1)
PANEL_KERNEL(2)
PANEL_KERNEL(3)
PANEL_KERNEL(4)
PANEL_KERNEL(5)
PANEL_KERNEL(6)

/* AVX-512: one zmm register is a whole panel row of 16 columns, one load a whole 64-byte line. */
#define ROW_STEP_512(R)                                                                                           \
    if (rows > R) acc##R = _mm512_fmadd_ps(_mm512_set1_ps(x[R * in + k]), w, acc##R);
#define ROW_STORE_512(R)                                                                                          \
    if (rows > R) _mm512_storeu_ps(y + R * ldy, acc##R);

#define PANEL_KERNEL_512(ROWS)                                                                                    \
    __attribute__((target("avx512f"))) static void panel512_##ROWS(const float *x, int64_t in, const float *wp, \
                                                                    float *y, int64_t ldy) {                   \
        enum { rows = ROWS };                                                                                  \
        __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0, acc4 = acc0, acc5 = acc0;     \
        __m512 acc6 = acc0, acc7 = acc0, acc8 = acc0, acc9 = acc0, acc10 = acc0, acc11 = acc0;                  \
        for (int64_t k = 0; k < in; k++) {                                                                     \
            if (ROWS > 1) _mm_prefetch((const char *)(wp + (k + PREFETCH_LINES) * PANEL), _MM_HINT_T0);         \
            const __m512 w = _mm512_loadu_ps(wp + k * PANEL);                                                  \
            ROW_STEP_512(0) ROW_STEP_512(1) ROW_STEP_512(2) ROW_STEP_512(3) ROW_STEP_512(4) ROW_STEP_512(5)    \
            ROW_STEP_512(6) ROW_STEP_512(7) ROW_STEP_512(8) ROW_STEP_512(9) ROW_STEP_512(10) ROW_STEP_512(11)  \
        }                                                                                                      \
        ROW_STORE_512(0) ROW_STORE_512(1) ROW_STORE_512(2) ROW_STORE_512(3) ROW_STORE_512(4) ROW_STORE_512(5)  \
        ROW_STORE_512(6) ROW_STORE_512(7) ROW_STORE_512(8) ROW_STORE_512(9) ROW_STORE_512(10)                  \
        ROW_STORE_512(11)                                                                                      \
    }

PANEL_KERNEL_512(1)
PANEL_KERNEL_512(2)
PANEL_KERNEL_512(3)
PANEL_KERNEL_512(4)
PANEL_KERNEL_512(5)
PANEL_KERNEL_512(6)
PANEL_KERNEL_512(7)
PANEL_KERNEL_512(8)
PANEL_KERNEL_512(9)
PANEL_KERNEL_512(10)
PANEL_KERNEL_512(11)
PANEL_KERNEL_512(12)

typedef void (*panel_fn)(const float *, int64_t, const float *, float *, int64_t);
typedef struct {
    int64_t max_group;
    panel_fn kernels[MAX_GROUP + 1]; /* kernels[r]: a group of r rows */
} instruction_set;

static const instruction_set AVX2 = {AVX2_GROUP, {0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6}};
static const instruction_set AVX512 = {AVX512_GROUP,
                                       {0, panel512_1, panel512_2, panel512_3, panel512_4, panel512_5, panel512_6,
                                        panel512_7, panel512_8, panel512_9, panel512_10, panel512_11, panel512_12}};

/* One panel against all n rows, in near-equal groups of at most max_group rows; y points at the panel's columns. */
static void panel_rows(const instruction_set *isa, const float *x, int64_t n, int64_t in, const float *wp,
                       const float *bias, float *y, int64_t ldy, int64_t width) {
    float tail[MAX_GROUP * PANEL];
    for (int64_t r = 0; r < n;) {
        const int64_t groups = (n - r + isa->max_group - 1) / isa->max_group;
        const int64_t rows = (n - r + groups - 1) / groups;
        if (width == PANEL) {
            isa->kernels[rows](x + r * in, in, wp, y + r * ldy, ldy);
        } else { /* the last, partial panel: its padding columns are computed into a scratch tile */
            isa->kernels[rows](x + r * in, in, wp, tail, PANEL);
            for (int64_t i = 0; i < rows; i++) memcpy(y + (r + i) * ldy, tail + i * PANEL, width * sizeof(float));
        }
        r += rows;
    }
    if (bias)
        for (int64_t r = 0; r < n; r++)
            for (int64_t c = 0; c < width; c++) y[r * ldy + c] += bias[c];
}

static void packed_linear(const instruction_set *isa, const float *x, int64_t n, int64_t in, const float *wp,
                          int64_t out, const float *bias, float *y) {
    const int64_t panels = (out + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) if (panels * in >= 8192)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t column = p * PANEL;
        const int64_t width = out - column < PANEL ? out - column : PANEL;
        panel_rows(isa, x, n, in, wp + column * in, bias ? bias + column : 0, y + column, out, width);
    }
}

/* x (n, in), wp (ceil(out / 16), in, 16), bias (out,) or NULL, y (n, out); all contiguous float32. */
void hh_packed_linear_avx2(const float *x, int64_t n, int64_t in, const float *wp, int64_t out, const float *bias,
                           float *y) {
    packed_linear(&AVX2, x, n, in, wp, out, bias, y);
}

/* The same on AVX-512F; call it only where hh_has_avx512() says so. */
void hh_packed_linear_avx512(const float *x, int64_t n, int64_t in, const float *wp, int64_t out,
                             const float *bias, float *y) {
    packed_linear(&AVX512, x, n, in, wp, out, bias, y);
}

int hh_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

int hh_panel_width(void) { return PANEL; }
