/* CPU kernels for the decode step, built at start-up by models/native_build.py and called through ctypes.
 *
 * - ragged_decode_attention (models/ragged_attention.py): a batched step's attention, each row over its
 *   own keys only.
 * - decode_one (models/native_step.py): a whole one-row decode step of a Llama-family model in fp32, the
 *   weights read where the model keeps them.
 *
 * Built with -O3 -march=native -fopenmp; the library shares torch's OpenMP runtime (torch's wheel brings
 * libgomp.so.1, loaded before this library), so its threads are torch's.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define KEY_BLOCK 64      /* keys scored before their values are summed: the scores stay in L1 */
#define MAX_GROUP 16      /* query heads per key/value head */
#define MAX_DIM 256       /* head dimension */
#define PREFETCH_KEYS 8   /* how far ahead a key (or value) vector is prefetched: each row's keys are a
                             run of a few kB, too short for the hardware prefetcher to lock on */
#define PREFETCH_WEIGHTS 2048  /* floats ahead in a weight row (8 kB: past the next 4 kB page) */

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
        if (dim == 64)
            attend(row_query, row_keys, row_values, row_out, length, group, 64, key_stride, value_stride, scale);
        else if (dim == 128)
            attend(row_query, row_keys, row_values, row_out, length, group, 128, key_stride, value_stride, scale);
        else
            attend(row_query, row_keys, row_values, row_out, length, group, dim, key_stride, value_stride, scale);
    }
    return 0;
}


/* ---- a one-row decode step ---------------------------------------------------------------------------- */

/* A weight [rows, cols] as loaded: each row's cols floats contiguous, rows row_stride floats apart. */
typedef struct {
    const float* data;
    int64_t rows, cols, row_stride;
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
} Model;

/* y = W x, inside a parallel region: the output rows are shared out among the threads. */
static void matvec(const Matrix* w, const float* restrict x, float* restrict y) {
    const int64_t rows = w->rows, cols = w->cols;
    /* A dot product per row, four rows at a time (x is read once for four). */
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r += 4) {
        const float* w0 = w->data + r * w->row_stride;
        if (r + 4 <= rows) {
            const float *w1 = w0 + w->row_stride, *w2 = w1 + w->row_stride, *w3 = w2 + w->row_stride;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
            for (int64_t c0 = 0; c0 < cols; c0 += 16) {
                __builtin_prefetch(w0 + c0 + PREFETCH_WEIGHTS);
                __builtin_prefetch(w1 + c0 + PREFETCH_WEIGHTS);
                __builtin_prefetch(w2 + c0 + PREFETCH_WEIGHTS);
                __builtin_prefetch(w3 + c0 + PREFETCH_WEIGHTS);
                const int64_t end = cols - c0 < 16 ? cols : c0 + 16;
                #pragma omp simd reduction(+:a0, a1, a2, a3)
                for (int64_t c = c0; c < end; c++) {
                    a0 += w0[c] * x[c];
                    a1 += w1[c] * x[c];
                    a2 += w2[c] * x[c];
                    a3 += w3[c] * x[c];
                }
            }
            y[r] = a0; y[r + 1] = a1; y[r + 2] = a2; y[r + 3] = a3;
        } else {
            for (int64_t k = r; k < rows; k++) {
                const float* wk = w->data + k * w->row_stride;
                float a = 0.0f;
                #pragma omp simd reduction(+:a)
                for (int64_t c = 0; c < cols; c++) a += wk[c] * x[c];
                y[k] = a;
            }
        }
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
                if (dim == 64)
                    attend(qkv + h * group * 64, keys, values, attended + h * group * 64, position + 1, group, 64,
                           64, 64, scale);
                else if (dim == 128)
                    attend(qkv + h * group * 128, keys, values, attended + h * group * 128, position + 1, group,
                           128, 128, 128, scale);
                else
                    attend(qkv + h * group * dim, keys, values, attended + h * group * dim, position + 1, group,
                           dim, dim, dim, scale);
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
