/* CPU kernels for the decode step, built at start-up by models/native_build.py and called through ctypes.
 *
 * - ragged_decode_attention (models/ragged_attention.py): a batched step's attention, each row over its
 *   own keys only.
 * - decode_one (models/native_step.py): a whole one-row decode step of a Llama-family model in fp32, the
 *   weights read where the model keeps them.
 * - decode_rows (models/native_step.py): the same for a batch of rows, its products through a packed
 *   matrix-matrix kernel (multiply_rows).
 * Both read int8 weights with a scale per row where the model is quantized (RIVULET_QUANT=int8).
 *
 * Built with -O3 -march=native -fopenmp; the library shares torch's OpenMP runtime (torch's wheel brings
 * libgomp.so.1, loaded before this library), so its threads are torch's.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define KEY_BLOCK 64      /* keys scored before their values are summed: the scores stay in L1 */
#define MAX_GROUP 16      /* query heads per key/value head */
#define MAX_DIM 256       /* head dimension */
#define PREFETCH_KEYS 8   /* how far ahead a key (or value) vector is prefetched: each row's keys are a
                             run of a few kB, too short for the hardware prefetcher to lock on */
#define PREFETCH_FP32 12288  /* floats ahead in an fp32 weight row: 48 kB, measured best of 8-64 kB (2-7% over
                                8 kB in 1-4 row steps, with the weights in 2 MiB pages or not) */
#define PREFETCH_INT8 8192   /* int8 weights ahead: 8 kB (32 kB measured 3-4% slower at one row) */

static inline __attribute__((always_inline)) void prefetch_vector(const float* vector, int64_t dim) {
    for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(vector + d);  /* 16 floats: a 64-byte line */
}

/* Eight floats as one value, in GCC's (and clang's) vector extension rather than intrinsics, so every x86-64
   level (and ARM) builds the kernels; -march=native makes them AVX2 or AVX-512 and fuses multiply-adds. */
typedef float vec8 __attribute__((vector_size(32)));
typedef int32_t int32x8 __attribute__((vector_size(32)));
typedef float vec8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));

static inline __attribute__((always_inline)) vec8 load8(const float* p) { return *(const vec8_unaligned*)p; }
static inline __attribute__((always_inline)) void store8(float* p, vec8 v) { *(vec8_unaligned*)p = v; }
/* One float in every lane (written out: `zero + s` would cost an add, as -0.0 + 0.0 is not -0.0). */
static inline __attribute__((always_inline)) vec8 splat(float s) { return (vec8){s, s, s, s, s, s, s, s}; }

#if defined(__clang__)
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shufflevector(a, b, i0, i1, i2, i3, i4, i5, i6, i7)
#else
#define SHUFFLE8(a, b, i0, i1, i2, i3, i4, i5, i6, i7) __builtin_shuffle(a, b, (int32x8){i0, i1, i2, i3, i4, i5, i6, i7})
#endif

/* The eight lanes' sums of s[0..7], in one vector: lane t holds the sum of s[t]'s lanes. */
static inline __attribute__((always_inline)) vec8 sum_each(const vec8 s[8]) {
    const vec8 a0 = SHUFFLE8(s[0], s[1], 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE8(s[0], s[1], 1, 9, 3, 11, 5, 13, 7, 15);
    const vec8 a1 = SHUFFLE8(s[2], s[3], 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE8(s[2], s[3], 1, 9, 3, 11, 5, 13, 7, 15);
    const vec8 a2 = SHUFFLE8(s[4], s[5], 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE8(s[4], s[5], 1, 9, 3, 11, 5, 13, 7, 15);
    const vec8 a3 = SHUFFLE8(s[6], s[7], 0, 8, 2, 10, 4, 12, 6, 14) + SHUFFLE8(s[6], s[7], 1, 9, 3, 11, 5, 13, 7, 15);
    /* a0: s0 and s1's lanes summed in pairs, interleaved; likewise a1..a3 */
    const vec8 b0 = SHUFFLE8(a0, a1, 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE8(a0, a1, 2, 3, 10, 11, 6, 7, 14, 15);
    const vec8 b1 = SHUFFLE8(a2, a3, 0, 1, 8, 9, 4, 5, 12, 13) + SHUFFLE8(a2, a3, 2, 3, 10, 11, 6, 7, 14, 15);
    /* b0: s0..s3 summed over each half; b1: s4..s7 */
    return SHUFFLE8(b0, b1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(b0, b1, 4, 5, 6, 7, 12, 13, 14, 15);
}

/* exp of each lane, for softmax weights (x <= 0): Cephes' expf (a degree-6 polynomial after taking out
   a power of two), within 2 ulp of expf; below -87.3 (where expf's result is denormal) it gives
   exp(-87.3), about 1e-38, which no softmax sum tells from 0. */
static inline __attribute__((always_inline)) vec8 exp8(vec8 x) {
    const vec8 low = splat(-87.3f), high = splat(88.3f);
    x = (vec8)(((int32x8)(x < low) & (int32x8)low) | (~(int32x8)(x < low) & (int32x8)x));
    x = (vec8)(((int32x8)(x > high) & (int32x8)high) | (~(int32x8)(x > high) & (int32x8)x));
    const vec8 round = splat(12582912.0f);  /* 1.5 * 2^23: adding it rounds to an integer */
    const vec8 n = (x * splat(1.44269504088896341f) + round) - round;
    const vec8 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
    vec8 p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * (r * r) + r + splat(1.0f);
    const int32x8 power = (__builtin_convertvector(n, int32x8) + 127) << 23;  /* 2^n as a float's bits */
    return p * (vec8)power;
}

/* attend() for a head dimension that is a multiple of 64 (64 and 128, as Llama-family models have): the
   scores eight keys at a time (eight independent sums, not one chain of dependent adds a key), the
   softmax weights eight at a time, and the values summed 64 dimensions at a time in registers. */
static inline __attribute__((always_inline)) void attend_by_vectors(
    const float* query, const float* keys, const float* values, float* out, int64_t length, int64_t group,
    const int64_t dim, int64_t key_stride, int64_t value_stride, float scale)
{
    float acc[MAX_GROUP][MAX_DIM] __attribute__((aligned(32)));
    float running_max[MAX_GROUP], running_sum[MAX_GROUP];
    float weights[MAX_GROUP][KEY_BLOCK] __attribute__((aligned(32)));
    for (int64_t i = 0; i < group; i++) {
        running_max[i] = -INFINITY;
        running_sum[i] = 0.0f;
        for (int64_t d = 0; d < dim; d++) acc[i][d] = 0.0f;
    }
    for (int64_t first = 0; first < length; first += KEY_BLOCK) {
        const int64_t n = length - first < KEY_BLOCK ? length - first : KEY_BLOCK;
        const float* block_keys = keys + first * key_stride;
        const float* block_values = values + first * value_stride;
        for (int64_t i = 0; i < group; i++) {
            const float* q = query + i * dim;
            int64_t j = 0;
            for (; j + 8 <= n; j += 8) {
                vec8 s[8];
                for (int t = 0; t < 8; t++) s[t] = splat(0.0f);
                for (int64_t c = 0; c < dim; c += 8) {
                    const vec8 qc = load8(q + c);
                    for (int t = 0; t < 8; t++) s[t] += qc * load8(block_keys + (j + t) * key_stride + c);
                }
                store8(&weights[i][j], sum_each(s) * splat(scale));
            }
            for (; j < n; j++) {
                vec8 s = splat(0.0f);
                for (int64_t c = 0; c < dim; c += 8) s += load8(q + c) * load8(block_keys + j * key_stride + c);
                float dot = 0.0f;
                for (int t = 0; t < 8; t++) dot += s[t];
                weights[i][j] = dot * scale;
            }
            /* Online softmax: a block whose maximum exceeds the running one rescales what came before. */
            float block_max = running_max[i];
            for (j = 0; j < n; j++) block_max = weights[i][j] > block_max ? weights[i][j] : block_max;
            const float rescale = expf(running_max[i] - block_max);
            running_max[i] = block_max;
            float sum = running_sum[i] * rescale;
            for (j = 0; j + 8 <= n; j += 8) {
                const vec8 w = exp8(load8(&weights[i][j]) - splat(block_max));
                store8(&weights[i][j], w);
                for (int t = 0; t < 8; t++) sum += w[t];
            }
            for (; j < n; j++) {
                weights[i][j] = expf(weights[i][j] - block_max);
                sum += weights[i][j];
            }
            running_sum[i] = sum;
            for (int64_t c0 = 0; c0 < dim; c0 += 64) {
                vec8 a[8];
                for (int t = 0; t < 8; t++) a[t] = load8(&acc[i][c0 + 8 * t]) * splat(rescale);
                for (j = 0; j < n; j++) {
                    const float* value = block_values + j * value_stride + c0;
                    const vec8 w = splat(weights[i][j]);
                    for (int t = 0; t < 8; t++) a[t] += w * load8(value + 8 * t);
                }
                for (int t = 0; t < 8; t++) store8(&acc[i][c0 + 8 * t], a[t]);
            }
        }
    }
    for (int64_t i = 0; i < group; i++) {
        const float inverse = running_sum[i] > 0.0f ? 1.0f / running_sum[i] : 0.0f;
        for (int64_t d = 0; d < dim; d++) out[i * dim + d] = acc[i][d] * inverse;
    }
}

/* attend() for any other head dimension. */
static inline __attribute__((always_inline)) void attend_by_scalars(
    const float* query, const float* keys, const float* values, float* out, int64_t length, int64_t group,
    const int64_t dim, int64_t key_stride, int64_t value_stride, float scale)
{
    float acc[MAX_GROUP][MAX_DIM];
    float running_max[MAX_GROUP], running_sum[MAX_GROUP];
    float weights[MAX_GROUP][KEY_BLOCK];
    for (int64_t i = 0; i < group; i++) {
        running_max[i] = -INFINITY;
        running_sum[i] = 0.0f;
        for (int64_t d = 0; d < dim; d++) acc[i][d] = 0.0f;
    }
    for (int64_t first = 0; first < length; first += KEY_BLOCK) {
        const int64_t n = length - first < KEY_BLOCK ? length - first : KEY_BLOCK;
        for (int64_t j = 0; j < n; j++) {
            const float* key = keys + (first + j) * key_stride;
            prefetch_vector(key + PREFETCH_KEYS * key_stride, dim);
            for (int64_t i = 0; i < group; i++) {
                const float* q = query + i * dim;
                float dot = 0.0f;
                #pragma omp simd reduction(+:dot)
                for (int64_t d = 0; d < dim; d++) dot += q[d] * key[d];
                weights[i][j] = dot * scale;
            }
        }
        /* Online softmax: a block whose maximum exceeds the running one rescales what came before. */
        for (int64_t i = 0; i < group; i++) {
            float block_max = running_max[i];
            for (int64_t j = 0; j < n; j++) block_max = weights[i][j] > block_max ? weights[i][j] : block_max;
            const float rescale = expf(running_max[i] - block_max);
            running_max[i] = block_max;
            running_sum[i] *= rescale;
            for (int64_t d = 0; d < dim; d++) acc[i][d] *= rescale;
            for (int64_t j = 0; j < n; j++) {
                weights[i][j] = expf(weights[i][j] - block_max);
                running_sum[i] += weights[i][j];
            }
        }
        for (int64_t j = 0; j < n; j++) {
            const float* value = values + (first + j) * value_stride;
            prefetch_vector(value + PREFETCH_KEYS * value_stride, dim);
            for (int64_t i = 0; i < group; i++) {
                const float w = weights[i][j];
                #pragma omp simd
                for (int64_t d = 0; d < dim; d++) acc[i][d] += w * value[d];
            }
        }
    }
    for (int64_t i = 0; i < group; i++) {
        const float inverse = running_sum[i] > 0.0f ? 1.0f / running_sum[i] : 0.0f;
        for (int64_t d = 0; d < dim; d++) out[i * dim + d] = acc[i][d] * inverse;
    }
}

/* One (row, key/value head): its `group` query heads over its `length` keys. */
static inline __attribute__((always_inline)) void attend_dim(
    const float* query, const float* keys, const float* values, float* out, int64_t length, int64_t group,
    const int64_t dim, int64_t key_stride, int64_t value_stride, float scale)
{
    if (dim % 64 == 0)
        attend_by_vectors(query, keys, values, out, length, group, dim, key_stride, value_stride, scale);
    else
        attend_by_scalars(query, keys, values, out, length, group, dim, key_stride, value_stride, scale);
}

/* The same, with the head sizes of Llama-family models (64, 128) as constants, so the loops unroll. */
static void attend(const float* query, const float* keys, const float* values, float* out, int64_t length,
                   int64_t group, int64_t dim, int64_t key_stride, int64_t value_stride, float scale) {
    if (dim == 64)
        attend_dim(query, keys, values, out, length, group, 64, key_stride, value_stride, scale);
    else if (dim == 128)
        attend_dim(query, keys, values, out, length, group, 128, key_stride, value_stride, scale);
    else
        attend_dim(query, keys, values, out, length, group, dim, key_stride, value_stride, scale);
}

/* ---- a batched step's attention, each row over its own keys ---------------------------------------- */

/* query, out: [batch, heads, dim], contiguous. keys, values: a cache [rows, kv_heads, positions, dim] with
   the given strides (in floats; the last dimension contiguous). lengths: [batch], each clamped to
   `max_length` (the cache's positions), so no length can read past the cache.
   Returns 0, or -1 for a shape this kernel does not take (nothing is written). */
int ragged_decode_attention(
    const float* query, const float* keys, const float* values, float* out, const int64_t* lengths,
    int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t max_length,
    int64_t key_row_stride, int64_t key_head_stride, int64_t key_stride,
    int64_t value_row_stride, int64_t value_head_stride, int64_t value_stride,
    float scale, int threads)
{
    if (kv_heads <= 0 || heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP || dim <= 0
            || dim > MAX_DIM)
        return -1;
    const int64_t group = heads / kv_heads;
    const int64_t tasks = batch * kv_heads;
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; task++) {
        const int64_t row = task / kv_heads, head = task % kv_heads;
        int64_t length = lengths[row];
        length = length < 0 ? 0 : (length > max_length ? max_length : length);
        const float* row_keys = keys + row * key_row_stride + head * key_head_stride;
        const float* row_values = values + row * value_row_stride + head * value_head_stride;
        const float* row_query = query + (row * heads + head * group) * dim;
        float* row_out = out + (row * heads + head * group) * dim;
        attend(row_query, row_keys, row_values, row_out, length, group, dim, key_stride, value_stride, scale);
    }
    return 0;
}


/* ---- a one-row decode step ---------------------------------------------------------------------------- */

/* A weight [rows, cols] as loaded: each row's cols floats contiguous, rows row_stride floats apart.
   Quantized (RIVULET_QUANT=int8, models/quantize.py) when `quantized` is set: row r's weights are
   quantized[r][c] * scales[r], the int8 rows contiguous (cols apart), and the products read those (a quarter
   of the bytes) instead of `data`. */
typedef struct {
    const float* data;
    int64_t rows, cols, row_stride;
    const int8_t* quantized;   /* [rows, cols] or NULL */
    const float* scales;       /* [rows] where quantized */
} Matrix;

typedef struct {
    const float* input_norm;   /* [hidden] */
    const float* post_norm;    /* [hidden] */
    Matrix qkv;                /* [(heads + 2 kv_heads) dim, hidden] */
    Matrix o;                  /* [hidden, heads dim] */
    Matrix gate_up;            /* [2 intermediate, hidden] */
    Matrix down;               /* [hidden, intermediate] */
    float* keys;               /* this layer's cache, row 0: [kv_heads, positions, dim] */
    float* values;
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, dim, intermediate, vocab, layers;
    int64_t positions;         /* per cache row */
    int64_t rotary_positions;  /* rows of the cos/sin tables */
    float eps;
    const float* embed;        /* [vocab, hidden], rows contiguous */
    const float* final_norm;   /* [hidden] */
    Matrix lm_head;            /* [vocab, hidden] */
    const float* cos;          /* [rotary_positions, dim] */
    const float* sin;
    const Layer* layer;        /* [layers] */
    int64_t cache_rows;        /* rows of each layer's cache (decode_rows' batch at most); row r of a
                                  layer's keys starts r * kv_heads * positions * dim floats past row 0 */
} Model;

/* Eight int8 weights widened to floats. With AVX2, one sign-extending load and one conversion: the only
   intrinsics here, because GCC turns the vector extension's conversion of eight bytes into eight scalar
   loads and inserts (measured: slower than reading fp32). Elsewhere the portable form. */
#if defined(__AVX2__)
#include <immintrin.h>
static inline __attribute__((always_inline)) vec8 widen8(const int8_t* p) {
    return (vec8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
}
#else
typedef int8_t int8x8_unaligned __attribute__((vector_size(8), aligned(1), may_alias));
static inline __attribute__((always_inline)) vec8 widen8(const int8_t* p) {
    return __builtin_convertvector(__builtin_convertvector(*(const int8x8_unaligned*)p, int32x8), vec8);
}
#endif

static inline __attribute__((always_inline)) float sum8(vec8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* Weights c..c+7 of a row as floats: fp32 as they lie, int8 widened and times the row's scale, rounded
   once: exactly the fp32 weight the quantized model's fp32 copy holds (models/quantize.py), so every
   product over int8 rows gives the same bits as over that copy. */
static inline __attribute__((always_inline)) vec8 weights8(const float* f, const int8_t* q, vec8 scale,
                                                           int64_t c, const int quantized) {
    return quantized ? widen8(q + c) * scale : load8(f + c);
}

static inline __attribute__((always_inline)) float weight1(const float* f, const int8_t* q, float scale,
                                                           int64_t c, const int quantized) {
    return quantized ? (float)q[c] * scale : f[c];
}

/* Prefetch the line `c` of a weight row will need a while on, once per 64-byte line (16 floats, 64 int8). */
static inline __attribute__((always_inline)) void prefetch_ahead(const float* f, const int8_t* q, int64_t c,
                                                                 const int quantized) {
    if (!quantized)
        __builtin_prefetch(f + c + PREFETCH_FP32);
    else if ((c & 63) == 0)
        __builtin_prefetch(q + c + PREFETCH_INT8);
}

/* Every product below sums an output over its inputs in one order: two vector accumulators, a over the
   first eight of each 16 inputs and b over the second eight, then sum8(a + b), then the inputs past the
   last multiple of 16 one by one, each a fused multiply-add written out (left to the compiler, the fp32
   and int8 tails were fused differently). So a row's outputs are the same bits whether a one-row step
   (four_rows) or a batch of at most FEW_ROWS (few_rows) computed them. */

/* y[r..r+3] = W[r..r+3] x (fewer where the matrix ends): four weight rows streamed at once, x read once for
   the four, two accumulators a row so eight independent multiply-add chains keep the FMA units busy
   while the rows stream in. `quantized` is a constant in each caller, so each kind of weight gets its own
   loop. Written with vectors rather than `omp simd`: GCC made the `omp simd` reduction per block of
   columns (vector sums spilled and reduced each block), and the int8 loop 32 wide through 16-bit steps. */
static inline __attribute__((always_inline)) void four_rows(const Matrix* w, int64_t r, const float* restrict x,
                                                            float* restrict y, const int quantized) {
    const int64_t cols = w->cols, body = cols & ~(int64_t)15;
    const int64_t count = w->rows - r < 4 ? w->rows - r : 4;
    /* missing rows repeat the last (their sums are not stored); int8 rows lie `cols` apart */
    const int64_t stride = quantized ? cols : w->row_stride;
    const float* f[4];
    const int8_t* q[4];
    float scale[4];
    for (int64_t i = 0; i < 4; i++) {
        const int64_t row = r + (i < count ? i : count - 1);
        f[i] = quantized ? NULL : w->data + row * stride;
        q[i] = quantized ? w->quantized + row * stride : NULL;
        scale[i] = quantized ? w->scales[row] : 1.0f;
    }
    const vec8 s0 = splat(scale[0]), s1 = splat(scale[1]), s2 = splat(scale[2]), s3 = splat(scale[3]);
    const vec8 zero = {0};
    vec8 a0 = zero, b0 = zero, a1 = zero, b1 = zero, a2 = zero, b2 = zero, a3 = zero, b3 = zero;
    for (int64_t c = 0; c < body; c += 16) {
        prefetch_ahead(f[0], q[0], c, quantized); prefetch_ahead(f[1], q[1], c, quantized);
        prefetch_ahead(f[2], q[2], c, quantized); prefetch_ahead(f[3], q[3], c, quantized);
        const vec8 x0 = load8(x + c), x1 = load8(x + c + 8);
        a0 += weights8(f[0], q[0], s0, c, quantized) * x0; b0 += weights8(f[0], q[0], s0, c + 8, quantized) * x1;
        a1 += weights8(f[1], q[1], s1, c, quantized) * x0; b1 += weights8(f[1], q[1], s1, c + 8, quantized) * x1;
        a2 += weights8(f[2], q[2], s2, c, quantized) * x0; b2 += weights8(f[2], q[2], s2, c + 8, quantized) * x1;
        a3 += weights8(f[3], q[3], s3, c, quantized) * x0; b3 += weights8(f[3], q[3], s3, c + 8, quantized) * x1;
    }
    float sums[4] = {sum8(a0 + b0), sum8(a1 + b1), sum8(a2 + b2), sum8(a3 + b3)};
    for (int64_t i = 0; i < count; i++) {
        for (int64_t c = body; c < cols; c++) sums[i] = fmaf(weight1(f[i], q[i], scale[i], c, quantized), x[c], sums[i]);
        y[r + i] = sums[i];
    }
}

/* y = W x, inside a parallel region: the output rows are shared out among the threads, four at a time. */
static void matvec(const Matrix* w, const float* restrict x, float* restrict y) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < w->rows; r += 4) {
        if (w->quantized != NULL)
            four_rows(w, r, x, y, 1);
        else
            four_rows(w, r, x, y, 0);
    }
}

/* out = x / rms(x) * weight, as models/llama.py's RMSNorm in fp32. */
static void rms_norm(const float* restrict x, const float* restrict weight, float* restrict out, int64_t n,
                     float eps) {
    float squares = 0.0f;
    #pragma omp simd reduction(+:squares)
    for (int64_t i = 0; i < n; i++) squares += x[i] * x[i];
    const float scale = 1.0f / sqrtf(squares / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = weight[i] * (x[i] * scale);
}

/* HF's "rotate half": (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) over the two halves of a head. */
static void rotate(float* x, const float* cos, const float* sin, int64_t dim) {
    const int64_t half = dim / 2;
    for (int64_t i = 0; i < half; i++) {
        const float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}

/* Scratch floats decode_one needs. */
int64_t decode_one_scratch(const Model* m) {
    return 3 * m->hidden + (m->heads + 2 * m->kv_heads) * m->dim + m->heads * m->dim + 3 * m->intermediate;
}

/* One token `token` at `position` of cache row 0: writes its keys and values there, attends over
   positions 0..position, and -> logits [vocab]. Returns 0, or -1 for a token or position out of range
   (nothing is written). */
int decode_one(const Model* m, int64_t token, int64_t position, float* logits, float* scratch, int threads) {
    if (token < 0 || token >= m->vocab || position < 0 || position >= m->positions
            || position >= m->rotary_positions || m->kv_heads <= 0 || m->heads % m->kv_heads != 0
            || m->heads / m->kv_heads > MAX_GROUP || m->dim <= 0 || m->dim > MAX_DIM || m->dim % 2 != 0)
        return -1;
    const int64_t hidden = m->hidden, dim = m->dim, heads = m->heads, kv_heads = m->kv_heads;
    const int64_t group = heads / kv_heads, qkv_rows = (heads + 2 * kv_heads) * dim;
    float* x = scratch;                     /* the residual stream [hidden] */
    float* normed = x + hidden;             /* [hidden] */
    float* delta = normed + hidden;         /* a block's output [hidden] */
    float* qkv = delta + hidden;            /* [qkv_rows] */
    float* attended = qkv + qkv_rows;       /* [heads dim] */
    float* gate_up = attended + heads * dim;  /* [2 intermediate] */
    float* act = gate_up + 2 * m->intermediate;  /* [intermediate] */
    const float* cos = m->cos + position * dim;
    const float* sin = m->sin + position * dim;
    const float scale = 1.0f / sqrtf((float)dim);
    memcpy(x, m->embed + token * hidden, hidden * sizeof(float));
    #pragma omp parallel num_threads(threads)
    {
        for (int64_t l = 0; l < m->layers; l++) {
            const Layer* layer = &m->layer[l];
            #pragma omp single
            rms_norm(x, layer->input_norm, normed, hidden, m->eps);
            matvec(&layer->qkv, normed, qkv);
            #pragma omp single
            {
                for (int64_t h = 0; h < heads + kv_heads; h++) rotate(qkv + h * dim, cos, sin, dim);
                const float* k = qkv + heads * dim;
                const float* v = k + kv_heads * dim;
                for (int64_t h = 0; h < kv_heads; h++) {
                    memcpy(layer->keys + (h * m->positions + position) * dim, k + h * dim, dim * sizeof(float));
                    memcpy(layer->values + (h * m->positions + position) * dim, v + h * dim, dim * sizeof(float));
                }
            }
            #pragma omp for schedule(dynamic, 1)
            for (int64_t h = 0; h < kv_heads; h++) {
                const float* keys = layer->keys + h * m->positions * dim;
                const float* values = layer->values + h * m->positions * dim;
                attend(qkv + h * group * dim, keys, values, attended + h * group * dim, position + 1, group, dim,
                       dim, dim, scale);
            }
            matvec(&layer->o, attended, delta);
            #pragma omp single
            {
                for (int64_t i = 0; i < hidden; i++) x[i] += delta[i];
                rms_norm(x, layer->post_norm, normed, hidden, m->eps);
            }
            matvec(&layer->gate_up, normed, gate_up);
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < m->intermediate; i++) {
                const float gate = gate_up[i];
                act[i] = gate / (1.0f + expf(-gate)) * gate_up[m->intermediate + i];
            }
            matvec(&layer->down, act, delta);
            #pragma omp single
            for (int64_t i = 0; i < hidden; i++) x[i] += delta[i];
        }
        #pragma omp single
        rms_norm(x, m->final_norm, normed, hidden, m->eps);
        matvec(&m->lm_head, normed, logits);
    }
    return 0;
}


/* ---- a batched decode step ---------------------------------------------------------------------------- */

/* With B rows a step multiplies a B x in matrix by every weight: arithmetic, not memory, bounds it past a
   few rows, and torch's kernels reach about half of what the cores' FMA units do on these shapes. The
   product below keeps the weight in its loaded layout ([out, in], each output's inputs contiguous) and
   packs the few input rows instead: panels of PANEL rows, stored [in][PANEL], so one step of the inner
   loop multiplies one input column of a panel (two vectors) by one weight of each of TILE_ROWS weight
   rows (broadcast). Each weight tile is read from memory once and stays in L1 for every panel. Each
   output is summed over `in` in order, whatever the batch: a row's result does not depend on the rows
   beside it. Written with GCC's vector extension, not intrinsics, so every x86-64 level (and ARM) builds
   it; the compiler fuses the multiply-adds where the CPU has FMA. */

#define PANEL 16          /* input rows per packed panel: two vectors of 8 */
#define TILE_ROWS 6       /* weight rows per tile: 12 accumulators + 2 inputs + 1 weight = 15 registers */


/* A panel's width: PANEL rows, or 8 for a last panel of at most 8 (so a small batch does half the work). */
static inline int64_t panel_width(int64_t panel, int64_t rows) {
    return rows - panel * PANEL <= 8 ? 8 : PANEL;
}

/* Floats the packed panels of `rows` rows of `cols` take. */
static inline int64_t packed_size(int64_t rows, int64_t cols) {
    const int64_t full = rows / PANEL, rest = rows - full * PANEL;
    return (full * PANEL + (rest == 0 ? 0 : (rest <= 8 ? 8 : PANEL))) * cols;
}

/* x [rows, cols] (rows `stride` floats apart) -> panels, padding rows zero. Inside a parallel region. */
static void pack_rows(const float* restrict x, int64_t rows, int64_t cols, int64_t stride, float* restrict packed) {
    const int64_t padded = packed_size(rows, cols) / cols;
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < padded; r++) {
        const int64_t panel = r / PANEL, lane = r % PANEL, width = panel_width(panel, rows);
        float* out = packed + panel * PANEL * cols + lane;
        if (r < rows) {
            const float* in = x + r * stride;
            for (int64_t c = 0; c < cols; c++) out[c * width] = in[c];
        } else {
            for (int64_t c = 0; c < cols; c++) out[c * width] = 0.0f;
        }
    }
}

/* One tile: `tile_rows` (<= TILE_ROWS) weight rows from `w` times one panel of width 16 or 8 ->
   out[TILE_ROWS][PANEL]. Missing weight rows repeat the first (their results are not stored). */
static inline __attribute__((always_inline)) void multiply_tile(
    const float* w, int64_t row_stride, int64_t tile_rows, const float* panel, int64_t width, int64_t cols,
    float out[TILE_ROWS][PANEL])
{
    const float* w0 = w;
    const float* w1 = w + (tile_rows > 1) * row_stride;
    const float* w2 = w + (tile_rows > 2) * 2 * row_stride;
    const float* w3 = w + (tile_rows > 3) * 3 * row_stride;
    const float* w4 = w + (tile_rows > 4) * 4 * row_stride;
    const float* w5 = w + (tile_rows > 5) * 5 * row_stride;
    const vec8 zero = {0};
    vec8 c00 = zero, c10 = zero, c20 = zero, c30 = zero, c40 = zero, c50 = zero;
    if (width == PANEL) {
        vec8 c01 = zero, c11 = zero, c21 = zero, c31 = zero, c41 = zero, c51 = zero;
        for (int64_t k = 0; k < cols; k++) {
            const vec8 b0 = load8(panel + k * PANEL), b1 = load8(panel + k * PANEL + 8);
            vec8 a;
            a = splat(w0[k]); c00 += a * b0; c01 += a * b1;
            a = splat(w1[k]); c10 += a * b0; c11 += a * b1;
            a = splat(w2[k]); c20 += a * b0; c21 += a * b1;
            a = splat(w3[k]); c30 += a * b0; c31 += a * b1;
            a = splat(w4[k]); c40 += a * b0; c41 += a * b1;
            a = splat(w5[k]); c50 += a * b0; c51 += a * b1;
        }
        store8(out[0] + 8, c01); store8(out[1] + 8, c11); store8(out[2] + 8, c21);
        store8(out[3] + 8, c31); store8(out[4] + 8, c41); store8(out[5] + 8, c51);
    } else {
        for (int64_t k = 0; k < cols; k++) {
            const vec8 b0 = load8(panel + k * 8);
            c00 += splat(w0[k]) * b0; c10 += splat(w1[k]) * b0; c20 += splat(w2[k]) * b0;
            c30 += splat(w3[k]) * b0; c40 += splat(w4[k]) * b0; c50 += splat(w5[k]) * b0;
        }
    }
    store8(out[0], c00); store8(out[1], c10); store8(out[2], c20);
    store8(out[3], c30); store8(out[4], c40); store8(out[5], c50);
}

/* This thread's buffer of at least `floats` floats, kept for its next products (the OpenMP threads live as
   long as the process). NULL-safe callers are not needed: an allocation failure aborts, as torch's would. */
static float* widening_buffer(int64_t floats) {
    static __thread float* buffer = NULL;
    static __thread int64_t capacity = 0;
    if (floats > capacity) {
        free(buffer);
        buffer = malloc((size_t)floats * sizeof(float));
        if (buffer == NULL) abort();
        capacity = floats;
    }
    return buffer;
}

/* Quantized weight rows first..first+count-1 as floats (each int8 times its row's scale) -> out [count, cols]. */
static inline void widen_rows(const Matrix* w, int64_t first, int64_t count, float* restrict out) {
    for (int64_t i = 0; i < count; i++) {
        const int8_t* q = w->quantized + (first + i) * w->cols;
        const float scale = w->scales[first + i];
        const vec8 scales = splat(scale);
        float* o = out + i * w->cols;
        int64_t c = 0;
        for (; c + 8 <= w->cols; c += 8) store8(o + c, weights8(NULL, q, scales, c, 1));
        for (; c < w->cols; c++) o[c] = weight1(NULL, q, scale, c, 1);
    }
}

/* y[r][o] = (accumulate ? y[r][o] : 0) + sum_c x[r][c] w[o][c] for the `rows` rows packed in `packed`;
   y's rows `y_stride` floats apart. Inside a parallel region: the weight's rows are shared out. */
static void multiply_rows(const Matrix* w, const float* restrict packed, int64_t rows, float* restrict y,
                          int64_t y_stride, int accumulate) {
    const int64_t tiles = (w->rows + TILE_ROWS - 1) / TILE_ROWS, panels = (rows + PANEL - 1) / PANEL;
    const int64_t cols = w->cols;
    /* A quantized tile is widened to floats (scaled) once, then multiplied by every panel from L1/L2 as an
       fp32 tile is: the conversion is paid once per weight, not once per panel. */
    float* widened = w->quantized != NULL ? widening_buffer(TILE_ROWS * cols) : NULL;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t first = t * TILE_ROWS;
        const int64_t tile_rows = w->rows - first < TILE_ROWS ? w->rows - first : TILE_ROWS;
        /* a quantized weight's `data` may be NULL (models/native_step.py's Int8Product): never read */
        const float* tile = widened != NULL ? widened : w->data + first * w->row_stride;
        const int64_t tile_stride = widened != NULL ? cols : w->row_stride;
        if (widened != NULL) widen_rows(w, first, tile_rows, widened);
        for (int64_t p = 0; p < panels; p++) {
            float out[TILE_ROWS][PANEL];
            const int64_t width = panel_width(p, rows);
            const int64_t count = rows - p * PANEL < PANEL ? rows - p * PANEL : PANEL;
            multiply_tile(tile, tile_stride, tile_rows, packed + p * PANEL * cols, width, cols, out);
            for (int64_t j = 0; j < count; j++) {
                float* target = y + (p * PANEL + j) * y_stride + first;
                if (accumulate)
                    for (int64_t i = 0; i < tile_rows; i++) target[i] += out[i][j];
                else
                    for (int64_t i = 0; i < tile_rows; i++) target[i] = out[i][j];
            }
        }
    }
}

#define FEW_ROWS 8  /* up to this many rows, a product reads each weight row once for all of them, unpacked */
#define SEGMENT 512  /* columns of a weight row multiplied by each group of four rows in turn, from L1 */

/* y[j][o] = (accumulate ? y[j][o] : 0) + W[o] x[j] for the `rows` (<= FEW_ROWS) rows of x, `x_stride`
   floats apart, and every weight row o: one weight row at a time against every input row, two
   accumulators each, in four_rows' order. The packed panels below would pad a few rows to 8 and multiply
   the padding too (twice the arithmetic at 4 rows, which then bounded the step); here a few rows cost
   what one does, the weights' reading. Past
   four rows the accumulators do not all fit in registers: the weight row is taken a segment at a time,
   each group of four rows multiplying it in turn while it is in L1, their sums carried across segments
   (so each output is still summed in the same order). Inside a parallel region. */
static inline __attribute__((always_inline)) void few_rows(
    const Matrix* w, const float* restrict x, int64_t x_stride, const int64_t rows, float* restrict y,
    int64_t y_stride, int accumulate, const int quantized)
{
    const int64_t cols = w->cols, body = cols & ~(int64_t)15;
    const int64_t segment = rows <= 4 ? body : SEGMENT;  /* one group of rows: the whole row at once */
    const float* xs[FEW_ROWS];
    for (int64_t j = 0; j < FEW_ROWS; j++) xs[j] = x + (j < rows ? j : 0) * x_stride;
    #pragma omp for schedule(static)
    for (int64_t o = 0; o < w->rows; o++) {
        const float* f = quantized ? NULL : w->data + o * w->row_stride;
        const int8_t* q = quantized ? w->quantized + o * cols : NULL;
        const float scale = quantized ? w->scales[o] : 1.0f;
        const vec8 s = splat(scale), zero = {0};
        vec8 a[FEW_ROWS], b[FEW_ROWS];
        for (int64_t j = 0; j < FEW_ROWS; j++) a[j] = b[j] = zero;
        for (int64_t start = 0; start < body; start += segment) {
            const int64_t end = body - start < segment ? body : start + segment;
            for (int64_t g = 0; g < rows; g += 4) {  /* `rows` is a constant here: unrolled */
                const int64_t n = rows - g < 4 ? rows - g : 4;
                vec8 a0 = a[g], b0 = b[g];
                vec8 a1 = n > 1 ? a[g + 1] : zero, b1 = n > 1 ? b[g + 1] : zero;
                vec8 a2 = n > 2 ? a[g + 2] : zero, b2 = n > 2 ? b[g + 2] : zero;
                vec8 a3 = n > 3 ? a[g + 3] : zero, b3 = n > 3 ? b[g + 3] : zero;
                const float *x0 = xs[g], *x1 = xs[n > 1 ? g + 1 : g];
                const float *x2 = xs[n > 2 ? g + 2 : g], *x3 = xs[n > 3 ? g + 3 : g];
                for (int64_t c = start; c < end; c += 16) {
                    if (g == 0) prefetch_ahead(f, q, c, quantized);
                    const vec8 wa = weights8(f, q, s, c, quantized), wb = weights8(f, q, s, c + 8, quantized);
                    a0 += wa * load8(x0 + c); b0 += wb * load8(x0 + c + 8);
                    if (n > 1) { a1 += wa * load8(x1 + c); b1 += wb * load8(x1 + c + 8); }
                    if (n > 2) { a2 += wa * load8(x2 + c); b2 += wb * load8(x2 + c + 8); }
                    if (n > 3) { a3 += wa * load8(x3 + c); b3 += wb * load8(x3 + c + 8); }
                }
                a[g] = a0; b[g] = b0;
                if (n > 1) { a[g + 1] = a1; b[g + 1] = b1; }
                if (n > 2) { a[g + 2] = a2; b[g + 2] = b2; }
                if (n > 3) { a[g + 3] = a3; b[g + 3] = b3; }
            }
        }
        for (int64_t j = 0; j < rows; j++) {
            float sum = sum8(a[j] + b[j]);
            for (int64_t c = body; c < cols; c++) sum = fmaf(weight1(f, q, scale, c, quantized), xs[j][c], sum);
            float* target = y + j * y_stride + o;
            *target = accumulate ? *target + sum : sum;
        }
    }
}

/* few_rows with its row count and weight kind as constants, so each loop is unrolled for them. */
static void multiply_few(const Matrix* w, const float* restrict x, int64_t x_stride, int64_t rows,
                         float* restrict y, int64_t y_stride, int accumulate) {
#define FEW_CASE(n) case n: \
        if (w->quantized != NULL) few_rows(w, x, x_stride, n, y, y_stride, accumulate, 1); \
        else few_rows(w, x, x_stride, n, y, y_stride, accumulate, 0); \
        break;
    switch (rows) { FEW_CASE(1) FEW_CASE(2) FEW_CASE(3) FEW_CASE(4) FEW_CASE(5) FEW_CASE(6) FEW_CASE(7) FEW_CASE(8) }
#undef FEW_CASE
}

/* y [rows, w->rows] (+)= x [rows, w->cols] W^T, x's rows x_stride apart: a few rows unpacked, more packed
   into `packed` and multiplied tile by panel. Inside a parallel region. */
static void product(const Matrix* w, const float* restrict x, int64_t x_stride, int64_t rows,
                    float* restrict packed, float* restrict y, int64_t y_stride, int accumulate) {
    if (rows <= FEW_ROWS) {
        multiply_few(w, x, x_stride, rows, y, y_stride, accumulate);
        return;
    }
    pack_rows(x, rows, w->cols, x_stride, packed);
    multiply_rows(w, packed, rows, y, y_stride, accumulate);
}

/* y [rows, w->rows] = x [rows, w->cols] W^T, x and y contiguous; `packed`: packed_size(rows, cols) floats.
   The product of the batched step on its own, for tests and benchmarks. Returns 0, or -1 for no rows. */
int multiply_rows_by(const Matrix* w, const float* x, int64_t rows, float* y, float* packed, int threads) {
    if (rows <= 0 || w->rows <= 0 || w->cols <= 0) return -1;
    #pragma omp parallel num_threads(threads)
    {
        product(w, x, w->cols, rows, packed, y, w->rows, 0);
    }
    return 0;
}

int64_t multiply_rows_scratch(int64_t rows, int64_t cols) { return packed_size(rows, cols); }

static int64_t max3(int64_t a, int64_t b, int64_t c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* Scratch floats decode_rows needs for `rows` rows. */
int64_t decode_rows_scratch(const Model* m, int64_t rows) {
    const int64_t per_row = 2 * m->hidden + (m->heads + 2 * m->kv_heads) * m->dim + m->heads * m->dim
                            + 3 * m->intermediate;
    return rows * per_row + packed_size(rows, max3(m->hidden, m->heads * m->dim, m->intermediate));
}

/* One step for cache rows 0..rows-1: row r's token tokens[r] at positions[r] (its keys and values written
   there, attending over positions 0..positions[r]) -> logits [rows, vocab]. Returns 0, or -1 for a row
   count, token or position out of range (nothing is written). */
int decode_rows(const Model* m, const int64_t* tokens, const int64_t* positions, int64_t rows, float* logits,
                float* scratch, int threads) {
    if (rows <= 0 || rows > m->cache_rows || m->kv_heads <= 0 || m->heads % m->kv_heads != 0
            || m->heads / m->kv_heads > MAX_GROUP || m->dim <= 0 || m->dim > MAX_DIM || m->dim % 2 != 0)
        return -1;
    for (int64_t r = 0; r < rows; r++)
        if (tokens[r] < 0 || tokens[r] >= m->vocab || positions[r] < 0 || positions[r] >= m->positions
                || positions[r] >= m->rotary_positions)
            return -1;
    const int64_t hidden = m->hidden, dim = m->dim, heads = m->heads, kv_heads = m->kv_heads;
    const int64_t group = heads / kv_heads, qkv_rows = (heads + 2 * kv_heads) * dim;
    const int64_t intermediate = m->intermediate, head_stride = m->positions * dim;
    const int64_t row_stride = kv_heads * head_stride;
    float* x = scratch;                            /* the residual streams [rows, hidden] */
    float* normed = x + rows * hidden;             /* [rows, hidden] */
    float* qkv = normed + rows * hidden;           /* [rows, qkv_rows] */
    float* attended = qkv + rows * qkv_rows;       /* [rows, heads dim] */
    float* gate_up = attended + rows * heads * dim;  /* [rows, 2 intermediate] */
    float* act = gate_up + rows * 2 * intermediate;  /* [rows, intermediate] */
    float* packed = act + rows * intermediate;     /* the input rows of a product, packed */
    const float scale = 1.0f / sqrtf((float)dim);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            memcpy(x + r * hidden, m->embed + tokens[r] * hidden, hidden * sizeof(float));
        for (int64_t l = 0; l < m->layers; l++) {
            const Layer* layer = &m->layer[l];
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                rms_norm(x + r * hidden, layer->input_norm, normed + r * hidden, hidden, m->eps);
            product(&layer->qkv, normed, hidden, rows, packed, qkv, qkv_rows, 0);
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                float* q = qkv + r * qkv_rows;
                const int64_t position = positions[r];
                const float* cos = m->cos + position * dim;
                const float* sin = m->sin + position * dim;
                for (int64_t h = 0; h < heads + kv_heads; h++) rotate(q + h * dim, cos, sin, dim);
                const float* k = q + heads * dim;
                const float* v = k + kv_heads * dim;
                for (int64_t h = 0; h < kv_heads; h++) {
                    const int64_t slot = r * row_stride + h * head_stride + position * dim;
                    memcpy(layer->keys + slot, k + h * dim, dim * sizeof(float));
                    memcpy(layer->values + slot, v + h * dim, dim * sizeof(float));
                }
            }
            #pragma omp for schedule(dynamic, 1)
            for (int64_t task = 0; task < rows * kv_heads; task++) {
                const int64_t r = task / kv_heads, h = task % kv_heads, length = positions[r] + 1;
                const float* query = qkv + r * qkv_rows + h * group * dim;
                const float* keys = layer->keys + r * row_stride + h * head_stride;
                const float* values = layer->values + r * row_stride + h * head_stride;
                float* out = attended + (r * heads + h * group) * dim;
                attend(query, keys, values, out, length, group, dim, dim, dim, scale);
            }
            product(&layer->o, attended, heads * dim, rows, packed, x, hidden, 1);  /* the residual add, in place */
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++)
                rms_norm(x + r * hidden, layer->post_norm, normed + r * hidden, hidden, m->eps);
            product(&layer->gate_up, normed, hidden, rows, packed, gate_up, 2 * intermediate, 0);
            #pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                const float* g = gate_up + r * 2 * intermediate;
                float* a = act + r * intermediate;
                for (int64_t i = 0; i < intermediate; i++)
                    a[i] = g[i] / (1.0f + expf(-g[i])) * g[intermediate + i];
            }
            product(&layer->down, act, intermediate, rows, packed, x, hidden, 1);
        }
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++)
            rms_norm(x + r * hidden, m->final_norm, normed + r * hidden, hidden, m->eps);
        product(&m->lm_head, normed, hidden, rows, packed, logits, m->vocab, 0);
    }
    return 0;
}
