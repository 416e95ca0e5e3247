/* Decode attention over each row's own keys: the kernel behind models/ragged_attention.py.
 *
 * One new query per row and head attends over keys 0..lengths[b]-1 of that row's cache. Keys past a
 * row's length are never read, so a batch of rows of many lengths costs what its rows hold, where a
 * masked attention over the longest row's length reads every row that far. Memory-bound: it reads each
 * key and value once, with software prefetch a few keys ahead (each row's keys are a run of a few kB,
 * too short for the hardware prefetcher to lock on).
 *
 * Built at start-up with the machine's C compiler (-O3 -march=native -fopenmp); it shares torch's OpenMP
 * runtime (torch's wheel brings libgomp.so.1, loaded before this library), so its threads are torch's.
 */
#include <math.h>
#include <stdint.h>

#define KEY_BLOCK 64      /* keys scored before their values are summed: the scores stay in L1 */
#define MAX_GROUP 16      /* query heads per key/value head */
#define MAX_DIM 256       /* head dimension */
#define PREFETCH_KEYS 8   /* how far ahead a key (or value) vector is prefetched */

static inline __attribute__((always_inline)) void prefetch_vector(const float* vector, int64_t dim) {
    for (int64_t d = 0; d < dim; d += 16) __builtin_prefetch(vector + d);  /* 16 floats: a 64-byte line */
}

/* One (row, key/value head): its `group` query heads over its `length` keys. `dim` is a constant in the
   specialised callers below, so the inner loops unroll. */
static inline __attribute__((always_inline)) void attend(
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
    if (kv_heads <= 0 || heads % kv_heads != 0 || heads / kv_heads > MAX_GROUP || dim <= 0 || dim > MAX_DIM)
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
        if (dim == 64)
            attend(row_query, row_keys, row_values, row_out, length, group, 64, key_stride, value_stride, scale);
        else if (dim == 128)
            attend(row_query, row_keys, row_values, row_out, length, group, 128, key_stride, value_stride, scale);
        else
            attend(row_query, row_keys, row_values, row_out, length, group, dim, key_stride, value_stride, scale);
    }
    return 0;
}
