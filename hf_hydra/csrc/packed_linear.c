/* Few-row float32 linear layers for AVX2 + FMA CPUs, at the memory limit.
 *
 * y (n, out) = x (n, in) @ W (out, in)^T + bias, for the handful of rows a decoding step or a tree verification
 * feeds. The weight is packed once into panels of 16 output columns, Wp (ceil(out / 16), in, 16), so each panel
 * streams from memory as one sequential run of 64-byte lines while up to 6 rows of x accumulate against it in
 * registers: 2 vector loads and 6 broadcasts per 12 fused multiply-adds, no horizontal sums. A panel is read from
 * memory once and from cache for each further group of rows. Panels are split over OpenMP threads (torch's
 * runtime: the library is loaded after torch, and both use libgomp.so.1).
 *
 * Summation order: each output is one float32 sum over k in order, so results differ from MKL's by rounding only.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define PANEL 16
#define MAX_GROUP 6
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

typedef void (*panel_fn)(const float *, int64_t, const float *, float *, int64_t);
static const panel_fn PANEL_KERNELS[MAX_GROUP + 1] = {0, panel_1, panel_2, panel_3, panel_4, panel_5, panel_6};

/* One panel against all n rows, in near-equal groups of at most MAX_GROUP rows; y points at the panel's columns. */
static void panel_rows(const float *x, int64_t n, int64_t in, const float *wp, const float *bias, float *y,
                       int64_t ldy, int64_t width) {
    float tail[MAX_GROUP * PANEL];
    for (int64_t r = 0; r < n;) {
        const int64_t groups = (n - r + MAX_GROUP - 1) / MAX_GROUP;
        const int64_t rows = (n - r + groups - 1) / groups;
        if (width == PANEL) {
            PANEL_KERNELS[rows](x + r * in, in, wp, y + r * ldy, ldy);
        } else { /* the last, partial panel: its padding columns are computed into a scratch tile */
            PANEL_KERNELS[rows](x + r * in, in, wp, tail, PANEL);
            for (int64_t i = 0; i < rows; i++) memcpy(y + (r + i) * ldy, tail + i * PANEL, width * sizeof(float));
        }
        r += rows;
    }
    if (bias)
        for (int64_t r = 0; r < n; r++)
            for (int64_t c = 0; c < width; c++) y[r * ldy + c] += bias[c];
}

/* x (n, in), wp (ceil(out / 16), in, 16), bias (out,) or NULL, y (n, out); all contiguous float32. */
void hh_packed_linear(const float *x, int64_t n, int64_t in, const float *wp, int64_t out, const float *bias,
                      float *y) {
    const int64_t panels = (out + PANEL - 1) / PANEL;
#pragma omp parallel for schedule(static) if (panels * in >= 8192)
    for (int64_t p = 0; p < panels; p++) {
        const int64_t column = p * PANEL;
        const int64_t width = out - column < PANEL ? out - column : PANEL;
        panel_rows(x, n, in, wp + column * in, bias ? bias + column : 0, y + column, out, width);
    }
}

int hh_panel_width(void) { return PANEL; }
