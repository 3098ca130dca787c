/*
 * Native CPU kernels for JEST's chunked joint sampling (jest_trainer.selection): from a pairwise score matrix S
 * (sigmoid loss), and from the exps of two CLIP logit matrices (softmax loss, softmax_chunk_loop further down).
 *
 * Why native: on CPU at JEST's shapes (B in the hundreds, chunks of a few items) the chunk loop is bound by
 * per-call dispatch, not arithmetic. Sixteen chunks cost ~190 us through NumPy (11 calls a chunk) and more
 * through torch; the same loop here is one call of ~30 us, which is what keeps the selection arithmetic a
 * small share of a training step. The semantics are exactly those of the NumPy and torch loops in
 * selection.py, which stay as the fallback (no compiler at install) and the accelerator path; tests check
 * that all three draw the same chunks (up to float rounding in near-ties and the choice among exact ties).
 *
 * pairwise_chunk_loop(scores, noise, per_chunk, out):
 *   scores  C-contiguous [B, B] float32 or float64, finite (the caller validates);
 *   noise   C-contiguous [n, B], same dtype: one row of Gumbel noise per chunk;
 *   out     C-contiguous writable [n * per_chunk] int64, filled chunk by chunk in selection order.
 * Chunk t is the per_chunk largest of c + noise[t] among the items not yet selected, with
 * c(k|A) = S_kk + sum_{j in A} (S_jk + S_kj). Order within a chunk is unspecified (as with
 * topk(sorted=False)); on exact ties the lower index wins (NumPy and torch may pick either).
 *
 * sigmoid_pair_prelude(first, second, magnitudes, hinge, limit) -> bool: the one pass over B^2 logits that the
 * pair-loss difference needs before its sigmoid and log (losses.sigmoid_pair_loss_difference). With a = z*L (z = +1 on
 * the positives, the diagonal; -1 elsewhere) each pair loss is softplus(-a) = -min(a, 0) - log sigmoid(|a|),
 * so S = M^first - M^second = [min(b, 0) - min(a, 0)] + log(sigmoid(|b|) / sigmoid(|a|)): exact for every
 * finite logit (the ratio lies in [1/2, 2]). One vectorised pass instead of torch's stack / negate-diagonal /
 * clamp / abs, plus the check that every |logit| <= limit (False otherwise, and for NaN or inf).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DEFINE_CHUNK_LOOP(NAME, T)                                                                            \
    static void NAME(const T *scores, Py_ssize_t size, const T *noise, Py_ssize_t chunks, Py_ssize_t per_chunk,  \
                     int64_t *out, T *conditional, T *heap_value, unsigned char *taken) {                    \
        for (Py_ssize_t i = 0; i < size; i++) {                                                               \
            conditional[i] = scores[i * size + i];                                                            \
            taken[i] = 0;                                                                                     \
        }                                                                                                     \
        for (Py_ssize_t chunk = 0; chunk < chunks; chunk++) {                                                 \
            const T *gumbel = noise + chunk * size;                                                           \
            int64_t *chosen = out + chunk * per_chunk;                                                        \
            /* the per_chunk largest of c + noise: a min-heap of the best so far, root = the smallest */      \
            Py_ssize_t filled = 0;                                                                            \
            for (Py_ssize_t i = 0; i < size; i++) {                                                           \
                if (taken[i]) continue; /* selected items are skipped, not just scored -inf: unique even */  \
                T value = conditional[i] + gumbel[i]; /* if a sum overflowed, and a NaN ranks lowest */       \
                if (value != value) value = (T)(-INFINITY);                                                   \
                Py_ssize_t slot;                                                                              \
                if (filled < per_chunk) {                                                                     \
                    slot = filled++;                                                                          \
                    while (slot > 0) {                                                                        \
                        Py_ssize_t parent = (slot - 1) / 2;                                                   \
                        if (heap_value[parent] <= value) break;                                               \
                        heap_value[slot] = heap_value[parent];                                                \
                        chosen[slot] = chosen[parent];                                                        \
                        slot = parent;                                                                        \
                    }                                                                                         \
                } else if (value > heap_value[0]) {                                                           \
                    slot = 0;                                                                                 \
                    for (;;) {                                                                                \
                        Py_ssize_t left = 2 * slot + 1, right = left + 1, smallest = slot;                    \
                        T smallest_value = value;                                                             \
                        if (left < per_chunk && heap_value[left] < smallest_value) {                          \
                            smallest = left;                                                                  \
                            smallest_value = heap_value[left];                                                \
                        }                                                                                     \
                        if (right < per_chunk && heap_value[right] < smallest_value) smallest = right;        \
                        if (smallest == slot) break;                                                          \
                        heap_value[slot] = heap_value[smallest];                                              \
                        chosen[slot] = chosen[smallest];                                                      \
                        slot = smallest;                                                                      \
                    }                                                                                         \
                } else {                                                                                      \
                    continue;                                                                                 \
                }                                                                                             \
                heap_value[slot] = value;                                                                     \
                chosen[slot] = (int64_t)i;                                                                    \
            }                                                                                                 \
            if (chunk + 1 == chunks) break;                                                                   \
            /* c += the chunk's rows of S, then its columns (the order NumPy's fallback adds them in) */      \
            for (Py_ssize_t k = 0; k < size; k++) {                                                           \
                T total = scores[chosen[0] * size + k];                                                       \
                for (Py_ssize_t j = 1; j < per_chunk; j++) total += scores[chosen[j] * size + k];             \
                conditional[k] += total;                                                                      \
            }                                                                                                 \
            for (Py_ssize_t k = 0; k < size; k++) {                                                           \
                const T *row = scores + k * size;                                                             \
                T total = row[chosen[0]];                                                                     \
                for (Py_ssize_t j = 1; j < per_chunk; j++) total += row[chosen[j]];                           \
                conditional[k] += total;                                                                      \
            }                                                                                                 \
            for (Py_ssize_t j = 0; j < per_chunk; j++) taken[chosen[j]] = 1;                                  \
        }                                                                                                     \
    }

DEFINE_CHUNK_LOOP(chunk_loop_float32, float)
DEFINE_CHUNK_LOOP(chunk_loop_float64, double)

/* The per_chunk largest of value[i] + noise[i] over the items not yet taken (NaN ranks lowest; on exact ties the
 * lower index wins), written into chosen[0..per_chunk) in unspecified order; heap is per_chunk doubles. */
#define DEFINE_TOP_UNTAKEN(NAME, T)                                                                           \
    static void NAME(const double *value, const T *noise, const unsigned char *taken, Py_ssize_t size,        \
                     Py_ssize_t per_chunk, int64_t *chosen, double *heap) {                                  \
        Py_ssize_t filled = 0;                                                                                \
        for (Py_ssize_t i = 0; i < size; i++) {                                                               \
            if (taken[i]) continue;                                                                           \
            double candidate = value[i] + (double)noise[i];                                                   \
            if (candidate != candidate) candidate = -INFINITY;                                                \
            Py_ssize_t slot;                                                                                  \
            if (filled < per_chunk) {                                                                         \
                slot = filled++;                                                                              \
                while (slot > 0) {                                                                            \
                    Py_ssize_t parent = (slot - 1) / 2;                                                       \
                    if (heap[parent] <= candidate) break;                                                     \
                    heap[slot] = heap[parent];                                                                \
                    chosen[slot] = chosen[parent];                                                            \
                    slot = parent;                                                                            \
                }                                                                                             \
            } else if (candidate > heap[0]) {                                                                 \
                slot = 0;                                                                                     \
                for (;;) {                                                                                    \
                    Py_ssize_t left = 2 * slot + 1, right = left + 1, smallest = slot;                        \
                    double smallest_value = candidate;                                                        \
                    if (left < per_chunk && heap[left] < smallest_value) {                                    \
                        smallest = left;                                                                      \
                        smallest_value = heap[left];                                                          \
                    }                                                                                         \
                    if (right < per_chunk && heap[right] < smallest_value) smallest = right;                  \
                    if (smallest == slot) break;                                                              \
                    heap[slot] = heap[smallest];                                                              \
                    chosen[slot] = chosen[smallest];                                                          \
                    slot = smallest;                                                                          \
                }                                                                                             \
            } else {                                                                                          \
                continue;                                                                                     \
            }                                                                                                 \
            heap[slot] = candidate;                                                                           \
            chosen[slot] = (int64_t)i;                                                                        \
        }                                                                                                     \
    }

DEFINE_TOP_UNTAKEN(top_untaken_float32, float)
DEFINE_TOP_UNTAKEN(top_untaken_float64, double)

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) /* ifunc */
/* Built once per x86-64 level and picked at load time (an ifunc): AVX-512 or AVX2+FMA where the CPU has them,
 * the baseline SSE2 build elsewhere. The same arithmetic, so the same draws up to float rounding. */
#define MULTIVERSIONED __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSIONED
#endif

#define LANES 8 /* independent partial sums, so reductions vectorise without reassociating (no -ffast-math) */

/* Helpers of the softmax loop over one line of B entries of type T, accumulated in float64. */
#define DEFINE_LINE_HELPERS(SUFFIX, T)                                                                        \
    static inline double line_sum_##SUFFIX(const T *restrict line, Py_ssize_t size) {                         \
        double lane[LANES] = {0.0};                                                                           \
        Py_ssize_t k = 0;                                                                                     \
        for (; k + LANES <= size; k += LANES)                                                                 \
            for (int l = 0; l < LANES; l++) lane[l] += (double)line[k + l];                                   \
        double total = 0.0;                                                                                   \
        for (int l = 0; l < LANES; l++) total += lane[l];                                                     \
        for (; k < size; k++) total += (double)line[k];                                                       \
        return total;                                                                                         \
    }                                                                                                         \
    static inline void line_add_##SUFFIX(double *restrict total, const T *restrict line, Py_ssize_t size) {   \
        for (Py_ssize_t k = 0; k < size; k++) total[k] += (double)line[k];                                    \
    }                                                                                                         \
    /* product[k] *= 1 + line[k] * inverse: one selected row's (or column's) partition growth for every      \
     * candidate at once, as product += product * (line * inverse) so a tiny ratio is not lost in 1 + x */    \
    static inline void line_growth_##SUFFIX(double *restrict product, const T *restrict line, double inverse, \
                                            Py_ssize_t size) {                                               \
        for (Py_ssize_t k = 0; k < size; k++) product[k] += product[k] * ((double)line[k] * inverse);         \
    }

DEFINE_LINE_HELPERS(float32, float)
DEFINE_LINE_HELPERS(float64, double)

/* Move each product's binary exponent into scale (product = mantissa in [1, 2) * 2^scale): products are finite,
 * normal and >= 1 here, so this is exact, and far cheaper than a log per entry. */
static inline void renormalise(double *restrict product, double *restrict scale, Py_ssize_t size) {
    for (Py_ssize_t k = 0; k < size; k++) {
        uint64_t bits;
        memcpy(&bits, product + k, sizeof bits);
        scale[k] += (double)((int64_t)(bits >> 52) - 1023);
        bits = (bits & UINT64_C(0x000FFFFFFFFFFFFF)) | UINT64_C(0x3FF0000000000000);
        memcpy(product + k, &bits, sizeof bits);
    }
}

/* Products are renormalised before the next factor could take them past this bound. Each factor is at most
 * 1 + 1 / E_ii <= 1 + e^600 ~ 4e260 (entries are at most 1, and the caller's gap limit), so a product stays below
 * ~1e301. */
#define PRODUCT_LIMIT 1e40

#define LN2 0.69314718055994530942

/*
 * softmax_chunk_loop(exps, signs, noise, per_chunk, out): JEST's chunked Gumbel top-k for the softmax (CLIP) loss,
 * with the exact conditional learnability of jest_trainer.selection, computed in the exp domain.
 *
 *   exps   C-contiguous [M, B, B] float32 or float64, M in {1, 2}: E_m = exp(L_m - max L_m) for model m's logits,
 *          so every entry is at most 1, and every diagonal entry far above underflow (the caller checks that);
 *   signs  M floats, each +1 or -1 (learner +1, reference -1);
 *   noise  C-contiguous [n, B], the dtype of exps; out as for pairwise_chunk_loop.
 *
 * With the summed CLIP loss Lsum(A) = sum_{i in A} CE_row_i + sum_{j in A} CE_col_j over the sub-matrix of A, and
 * rowZ_k = sum_{j in A} E_kj, colZ_k = sum_{i in A} E_ik (partitions over A), the change of one model's Lsum
 * when k joins A is
 *     log(1 + rowZ_k / E_kk) + log(1 + colZ_k / E_kk)                       (k's own row and column)
 *   + sum_{i in A} log(1 + E_ik / rowZ_i) + sum_{j in A} log(1 + E_kj / colZ_j)  (every selected row and column
 *                                                                                 gains k)
 * and c(k|A) = sum_m sign_m * change_m. The sums of logs are kept as products (one multiply-add per entry instead
 * of a log) whose binary exponents are moved aside whenever a running bound says the next factor could overflow,
 * so a chunk costs O(M * B * |A|) multiply-adds and B logs. Chunk 1 (A empty) is scored by each example's
 * learnability in the whole super-batch: sum_m sign_m * (CE_row_k + CE_col_k) over all B, i.e.
 * log(rowsum_k / E_kk) + log(colsum_k / E_kk). Accumulators are float64 whatever the dtype of exps.
 */
#define DEFINE_SOFTMAX_LOOP(SUFFIX, T)                                                                        \
    MULTIVERSIONED static void softmax_loop_##SUFFIX(const T *exps, Py_ssize_t models, Py_ssize_t size,       \
                                                     const double *signs, const T *noise, Py_ssize_t chunks,   \
                                                     Py_ssize_t per_chunk, int64_t *out, double *work,         \
                                                     T *gathered, unsigned char *taken) {                      \
        Py_ssize_t selected_max = chunks * per_chunk;                                                         \
        double *score = work, *heap = score + size;                                                           \
        double *per_model = heap + per_chunk; /* per model 7 arrays of B: rowZ colZ 1/E_kk growth x2 scale total */ \
        for (Py_ssize_t k = 0; k < size; k++) {                                                               \
            score[k] = 0.0;                                                                                   \
            taken[k] = 0;                                                                                     \
        }                                                                                                     \
        for (Py_ssize_t m = 0; m < models; m++) {                                                             \
            const T *e = exps + m * size * size;                                                              \
            double *row_z = per_model + m * 7 * size, *col_z = row_z + size, *inverse_diagonal = col_z + size; \
            double *row_sum = inverse_diagonal + size, *col_sum = row_sum + size;                             \
            for (Py_ssize_t k = 0; k < size; k++) {                                                           \
                inverse_diagonal[k] = 1.0 / (double)e[k * size + k];                                          \
                row_z[k] = col_z[k] = col_sum[k] = 0.0;                                                       \
            }                                                                                                 \
            for (Py_ssize_t i = 0; i < size; i++) {                                                           \
                const T *line = e + i * size;                                                                 \
                row_sum[i] = line_sum_##SUFFIX(line, size);                                                   \
                line_add_##SUFFIX(col_sum, line, size);                                                       \
            }                                                                                                 \
            for (Py_ssize_t k = 0; k < size; k++)                                                             \
                score[k] += signs[m] * (log(row_sum[k] * inverse_diagonal[k]) +                               \
                                        log(col_sum[k] * inverse_diagonal[k]));                               \
        }                                                                                                     \
        for (Py_ssize_t chunk = 0;; chunk++) {                                                                \
            Py_ssize_t have = chunk * per_chunk;                                                              \
            if (chunk > 0) {                                                                                  \
                for (Py_ssize_t m = 0; m < models; m++) {                                                     \
                    const T *e = exps + m * size * size, *columns = gathered + m * selected_max * size;       \
                    double *row_z = per_model + m * 7 * size, *col_z = row_z + size;                          \
                    double *inverse_diagonal = col_z + size, *row_growth = inverse_diagonal + size;           \
                    double *col_growth = row_growth + size, *scale = col_growth + size, *total = scale + size; \
                    for (Py_ssize_t k = 0; k < size; k++) {                                                   \
                        row_growth[k] = col_growth[k] = 1.0;                                                  \
                        scale[k] = 0.0;                                                                       \
                    }                                                                                         \
                    for (int side = 0; side < 2; side++) {                                                    \
                        double *product = side ? col_growth : row_growth;                                     \
                        const double *partition = side ? col_z : row_z;                                       \
                        double running = 1.0; /* a bound on every product so far */                           \
                        for (Py_ssize_t s = 0; s < have; s++) {                                               \
                            double inverse = 1.0 / partition[out[s]];                                         \
                            double factor = 1.0 + inverse; /* every entry is at most 1 */                     \
                            if (running * factor > PRODUCT_LIMIT && running > 2.0) {                          \
                                renormalise(product, scale, size);                                            \
                                running = 2.0;                                                                \
                            }                                                                                 \
                            running *= factor;                                                                \
                            line_growth_##SUFFIX(product, side ? columns + s * size : e + out[s] * size,      \
                                                 inverse, size);                                              \
                        }                                                                                     \
                    }                                                                                         \
                    for (Py_ssize_t k = 0; k < size; k++)                                                     \
                        total[k] = (1.0 + row_z[k] * inverse_diagonal[k]) * (1.0 + col_z[k] * inverse_diagonal[k]) \
                                   * row_growth[k] * col_growth[k];                                           \
                }                                                                                             \
                for (Py_ssize_t k = 0; k < size; k++) {                                                       \
                    /* every factor is >= 1, so each total is >= 1: one log of the ratio, unless a total          \
                     * overflowed (or is NaN), then a log per factor */                                      \
                    double numerator = 1.0, denominator = 1.0, exponent = 0.0;                                \
                    int finite = 1;                                                                           \
                    for (Py_ssize_t m = 0; m < models; m++) {                                                 \
                        const double *scale = per_model + m * 7 * size + 5 * size;                            \
                        double value = scale[size + k];                                                       \
                        finite &= value <= DBL_MAX;                                                           \
                        exponent += signs[m] * scale[k];                                                      \
                        if (signs[m] > 0) numerator *= value;                                                 \
                        else denominator *= value;                                                            \
                    }                                                                                         \
                    double ratio = numerator / denominator;                                                   \
                    if (finite && numerator <= DBL_MAX && ratio >= DBL_MIN) {                                 \
                        score[k] = log(ratio) + LN2 * exponent;                                               \
                        continue;                                                                             \
                    }                                                                                         \
                    score[k] = LN2 * exponent;                                                                \
                    for (Py_ssize_t m = 0; m < models; m++) {                                                 \
                        const double *row_z = per_model + m * 7 * size, *col_z = row_z + size;                \
                        const double *inverse_diagonal = col_z + size, *row_growth = inverse_diagonal + size; \
                        score[k] += signs[m] * (log1p(row_z[k] * inverse_diagonal[k]) +                       \
                                                log1p(col_z[k] * inverse_diagonal[k]) + log(row_growth[k]) +  \
                                                log(row_growth[size + k]));                                   \
                    }                                                                                         \
                }                                                                                             \
            }                                                                                                 \
            top_untaken_##SUFFIX(score, noise + chunk * size, taken, size, per_chunk, out + have, heap);      \
            if (chunk + 1 == chunks) break;                                                                   \
            for (Py_ssize_t s = have; s < have + per_chunk; s++) taken[out[s]] = 1;                           \
            for (Py_ssize_t m = 0; m < models; m++) {                                                         \
                const T *e = exps + m * size * size;                                                          \
                double *row_z = per_model + m * 7 * size, *col_z = row_z + size;                              \
                T *columns = gathered + (m * selected_max + have) * size;                                     \
                /* the chunk's columns, row by row of E (one pass over the rows, not one per column) */       \
                for (Py_ssize_t k = 0; k < size; k++)                                                         \
                    for (Py_ssize_t s = 0; s < per_chunk; s++) columns[s * size + k] = e[k * size + out[have + s]]; \
                for (Py_ssize_t s = 0; s < per_chunk; s++) {                                                  \
                    line_add_##SUFFIX(row_z, columns + s * size, size);                                       \
                    line_add_##SUFFIX(col_z, e + out[have + s] * size, size);                                 \
                }                                                                                             \
            }                                                                                                 \
        }                                                                                                     \
    }

DEFINE_SOFTMAX_LOOP(float32, float)
DEFINE_SOFTMAX_LOOP(float64, double)

/* One row segment of the prelude, all of it with the same sign z (the diagonal is a segment of one): a = z*L
 * (and b = z*L* for two models) -> |a|, |b| and the hinge min(b, 0) - min(a, 0) (or -min(a, 0) for one model).
 * Returns nonzero if any |logit| exceeds `limit` or is NaN (NaN fails `<=`; inf exceeds any finite limit).
 * Written without branches so that gcc -O3 vectorises it; no -ffast-math, so the NaN test stays exact. */
#define DEFINE_PRELUDE_SEGMENT(NAME, T, ABS, FLAG)                                                            \
    __attribute__((noinline)) static int NAME(const T *restrict first, const T *restrict second,             \
                                              T *restrict first_magnitude, T *restrict second_magnitude,      \
                                              T *restrict hinge, Py_ssize_t n, T sign, T limit) {             \
        FLAG bad = 0; /* as wide as T, so the mask of each comparison vectorises */                           \
        if (second == NULL) {                                                                                 \
            for (Py_ssize_t j = 0; j < n; j++) {                                                              \
                T a = sign * first[j];                                                                        \
                T magnitude = ABS(a);                                                                         \
                first_magnitude[j] = magnitude;                                                               \
                T negative_part = a < 0 ? a : (T)0;                                                           \
                hinge[j] = -negative_part;                                                                    \
                bad |= !(magnitude <= limit);                                                                 \
            }                                                                                                 \
            return bad != 0;                                                                                  \
        }                                                                                                     \
        for (Py_ssize_t j = 0; j < n; j++) {                                                                  \
            T a = sign * first[j], b = sign * second[j];                                                      \
            T first_size = ABS(a), second_size = ABS(b);                                                      \
            first_magnitude[j] = first_size;                                                                  \
            second_magnitude[j] = second_size;                                                                \
            T first_negative = a < 0 ? a : (T)0;                                                              \
            T second_negative = b < 0 ? b : (T)0;                                                             \
            hinge[j] = second_negative - first_negative;                                                      \
            bad |= !(first_size <= limit);                                                                    \
            bad |= !(second_size <= limit);                                                                   \
        }                                                                                                     \
        return bad != 0;                                                                                      \
    }

#define OFFSET(pointer, offset) ((pointer) ? (pointer) + (offset) : NULL)

#define DEFINE_PRELUDE(NAME, SEGMENT, T)                                                                      \
    static int NAME(const T *first, const T *second, Py_ssize_t size, T *magnitudes, T *hinge, T limit) {     \
        int bad = 0;                                                                                          \
        T *second_magnitudes = second ? magnitudes + size * size : NULL;                                      \
        for (Py_ssize_t i = 0; i < size; i++) {                                                               \
            /* three segments of row i: before the diagonal (z = -1), the diagonal (z = +1), after it */      \
            Py_ssize_t starts[3] = {i * size, i * size + i, i * size + i + 1};                                \
            Py_ssize_t lengths[3] = {i, 1, size - i - 1};                                                     \
            for (int part = 0; part < 3; part++) {                                                            \
                Py_ssize_t at = starts[part];                                                                 \
                bad |= SEGMENT(first + at, OFFSET(second, at), magnitudes + at, OFFSET(second_magnitudes, at), \
                               hinge + at, lengths[part], part == 1 ? (T)1 : (T)-1, limit);                    \
            }                                                                                                 \
        }                                                                                                     \
        return !bad;                                                                                          \
    }

DEFINE_PRELUDE_SEGMENT(prelude_segment_float32, float, fabsf, int32_t)
DEFINE_PRELUDE_SEGMENT(prelude_segment_float64, double, fabs, int64_t)
DEFINE_PRELUDE(sigmoid_pair_prelude_float32, prelude_segment_float32, float)
DEFINE_PRELUDE(sigmoid_pair_prelude_float64, prelude_segment_float64, double)

static int get_buffer(PyObject *object, Py_buffer *view, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) == 0) return 0;
    PyObject *type, *value, *traceback; /* name the argument, keep the reason the buffer was refused */
    PyErr_Fetch(&type, &value, &traceback);
    PyErr_NormalizeException(&type, &value, &traceback);
    PyErr_Format(PyExc_ValueError, "%s: expected a C-contiguous%s array (%S)", name, writable ? " writable" : "",
                 value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
    return -1;
}

/* The one-letter struct code of a native-byte-order buffer ('?' for anything else). */
static char format_code(const Py_buffer *view) {
    const char *format = view->format ? view->format : "B";
    const char native_order = PY_LITTLE_ENDIAN ? '<' : '>';
    if (format[0] == native_order || format[0] == '=' || format[0] == '@') format++;
    return format[0] != '\0' && format[1] == '\0' ? format[0] : '?';
}

static PyObject *pairwise_chunk_loop(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *scores_object, *noise_object, *out_object;
    Py_ssize_t per_chunk;
    if (!PyArg_ParseTuple(args, "OOnO", &scores_object, &noise_object, &per_chunk, &out_object)) return NULL;

    Py_buffer scores = {0}, noise = {0}, out = {0};
    PyObject *result = NULL;
    void *workspace = NULL;
    if (get_buffer(scores_object, &scores, 0, "scores") != 0) return NULL;
    if (get_buffer(noise_object, &noise, 0, "noise") != 0) goto done;
    if (get_buffer(out_object, &out, 1, "out") != 0) goto done;

    char code = format_code(&scores);
    if ((code != 'f' && code != 'd') || format_code(&noise) != code) {
        PyErr_SetString(PyExc_TypeError, "scores, noise: expected float32 or float64 arrays of the same dtype");
        goto done;
    }
    if (out.itemsize != 8 || (format_code(&out) != 'l' && format_code(&out) != 'q')) {
        PyErr_SetString(PyExc_TypeError, "out: expected an int64 array");
        goto done;
    }
    if (scores.ndim != 2 || scores.shape[0] != scores.shape[1] || scores.shape[0] < 1) {
        PyErr_SetString(PyExc_ValueError, "scores: expected a non-empty square [B, B] array");
        goto done;
    }
    Py_ssize_t size = scores.shape[0];
    if (noise.ndim != 2 || noise.shape[1] != size || noise.shape[0] < 1) {
        PyErr_SetString(PyExc_ValueError, "noise: expected an [n_chunks, B] array");
        goto done;
    }
    Py_ssize_t chunks = noise.shape[0];
    if (per_chunk < 1 || per_chunk > size || chunks > size / per_chunk) { /* no product that could overflow */
        PyErr_SetString(PyExc_ValueError, "per_chunk: expected 1 <= per_chunk and n_chunks * per_chunk <= B");
        goto done;
    }
    if (out.ndim != 1 || out.shape[0] != chunks * per_chunk) {
        PyErr_SetString(PyExc_ValueError, "out: expected n_chunks * per_chunk int64 slots");
        goto done;
    }

    workspace = malloc((size_t)(size + per_chunk) * (size_t)scores.itemsize + (size_t)size);
    if (workspace == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (code == 'f') {
        float *conditional = (float *)workspace;
        chunk_loop_float32((const float *)scores.buf, size, (const float *)noise.buf, chunks, per_chunk,
                           (int64_t *)out.buf, conditional, conditional + size,
                           (unsigned char *)(conditional + size + per_chunk));
    } else {
        double *conditional = (double *)workspace;
        chunk_loop_float64((const double *)scores.buf, size, (const double *)noise.buf, chunks, per_chunk,
                           (int64_t *)out.buf, conditional, conditional + size,
                           (unsigned char *)(conditional + size + per_chunk));
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);

done:
    free(workspace);
    if (out.obj) PyBuffer_Release(&out);
    if (noise.obj) PyBuffer_Release(&noise);
    if (scores.obj) PyBuffer_Release(&scores);
    return result;
}

static PyObject *softmax_chunk_loop(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *exps_object, *signs_object, *noise_object, *out_object;
    Py_ssize_t per_chunk;
    if (!PyArg_ParseTuple(args, "OOOnO", &exps_object, &signs_object, &noise_object, &per_chunk, &out_object)) {
        return NULL;
    }
    Py_buffer exps = {0}, noise = {0}, out = {0};
    PyObject *result = NULL, *signs_sequence = NULL;
    void *workspace = NULL;
    double signs[2];
    if (get_buffer(exps_object, &exps, 0, "exps") != 0) return NULL;
    if (get_buffer(noise_object, &noise, 0, "noise") != 0) goto done;
    if (get_buffer(out_object, &out, 1, "out") != 0) goto done;

    char code = format_code(&exps);
    if ((code != 'f' && code != 'd') || format_code(&noise) != code) {
        PyErr_SetString(PyExc_TypeError, "exps, noise: expected float32 or float64 arrays of the same dtype");
        goto done;
    }
    if (out.itemsize != 8 || (format_code(&out) != 'l' && format_code(&out) != 'q')) {
        PyErr_SetString(PyExc_TypeError, "out: expected an int64 array");
        goto done;
    }
    if (exps.ndim != 3 || exps.shape[0] < 1 || exps.shape[0] > 2 || exps.shape[1] != exps.shape[2] ||
        exps.shape[1] < 1) {
        PyErr_SetString(PyExc_ValueError, "exps: expected a non-empty [M, B, B] array with M = 1 or 2");
        goto done;
    }
    Py_ssize_t models = exps.shape[0], size = exps.shape[1];
    signs_sequence = PySequence_Fast(signs_object, "signs: expected a sequence of floats");
    if (signs_sequence == NULL) goto done;
    if (PySequence_Fast_GET_SIZE(signs_sequence) != models) {
        PyErr_SetString(PyExc_ValueError, "signs: expected one sign per model in exps");
        goto done;
    }
    for (Py_ssize_t m = 0; m < models; m++) {
        signs[m] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(signs_sequence, m));
        if (signs[m] == -1.0 && PyErr_Occurred()) goto done;
        if (signs[m] != 1.0 && signs[m] != -1.0) {
            PyErr_SetString(PyExc_ValueError, "signs: each sign must be +1 or -1");
            goto done;
        }
    }
    if (noise.ndim != 2 || noise.shape[1] != size || noise.shape[0] < 1) {
        PyErr_SetString(PyExc_ValueError, "noise: expected an [n_chunks, B] array");
        goto done;
    }
    Py_ssize_t chunks = noise.shape[0];
    if (per_chunk < 1 || per_chunk > size || chunks > size / per_chunk) { /* no product that could overflow */
        PyErr_SetString(PyExc_ValueError, "per_chunk: expected 1 <= per_chunk and n_chunks * per_chunk <= B");
        goto done;
    }
    if (out.ndim != 1 || out.shape[0] != chunks * per_chunk) {
        PyErr_SetString(PyExc_ValueError, "out: expected n_chunks * per_chunk int64 slots");
        goto done;
    }
    Py_ssize_t selected_max = chunks * per_chunk;
    size_t doubles = (size_t)size + (size_t)per_chunk + (size_t)models * 7 * (size_t)size;
    size_t gathered_items = (size_t)models * (size_t)selected_max * (size_t)size;
    workspace = malloc(doubles * sizeof(double) + gathered_items * (size_t)exps.itemsize + (size_t)size);
    if (workspace == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    double *work = (double *)workspace;
    char *gathered = (char *)(work + doubles);
    unsigned char *taken = (unsigned char *)(gathered + gathered_items * (size_t)exps.itemsize);
    Py_BEGIN_ALLOW_THREADS
    if (code == 'f') {
        softmax_loop_float32((const float *)exps.buf, models, size, signs, (const float *)noise.buf, chunks,
                             per_chunk, (int64_t *)out.buf, work, (float *)gathered, taken);
    } else {
        softmax_loop_float64((const double *)exps.buf, models, size, signs, (const double *)noise.buf, chunks,
                             per_chunk, (int64_t *)out.buf, work, (double *)gathered, taken);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);

done:
    free(workspace);
    Py_XDECREF(signs_sequence);
    if (out.obj) PyBuffer_Release(&out);
    if (noise.obj) PyBuffer_Release(&noise);
    if (exps.obj) PyBuffer_Release(&exps);
    return result;
}

static PyObject *sigmoid_pair_prelude(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *first_object, *second_object, *magnitudes_object, *hinge_object;
    double limit;
    if (!PyArg_ParseTuple(args, "OOOOd", &first_object, &second_object, &magnitudes_object, &hinge_object,
                          &limit)) {
        return NULL;
    }
    int models = second_object == Py_None ? 1 : 2;
    Py_buffer first = {0}, second = {0}, magnitudes = {0}, hinge = {0};
    PyObject *result = NULL;
    if (get_buffer(first_object, &first, 0, "first") != 0) return NULL;
    if (models == 2 && get_buffer(second_object, &second, 0, "second") != 0) goto done;
    if (get_buffer(magnitudes_object, &magnitudes, 1, "magnitudes") != 0) goto done;
    if (get_buffer(hinge_object, &hinge, 1, "hinge") != 0) goto done;
    char code = format_code(&first);
    if ((code != 'f' && code != 'd') || (models == 2 && format_code(&second) != code) ||
        format_code(&magnitudes) != code || format_code(&hinge) != code) {
        PyErr_SetString(PyExc_TypeError, "first, second, magnitudes, hinge: expected float32 or float64 arrays of "
                                         "one dtype");
        goto done;
    }
    Py_ssize_t size = first.ndim == 2 ? first.shape[0] : -1;
    if (size < 1 || first.shape[1] != size) {
        PyErr_SetString(PyExc_ValueError, "first: expected a non-empty square [B, B] array");
        goto done;
    }
    if (models == 2 && (second.ndim != 2 || second.shape[0] != size || second.shape[1] != size)) {
        PyErr_SetString(PyExc_ValueError, "second: expected the shape of first");
        goto done;
    }
    if (magnitudes.ndim != 3 || magnitudes.shape[0] != models || magnitudes.shape[1] != size ||
        magnitudes.shape[2] != size) {
        PyErr_SetString(PyExc_ValueError, "magnitudes: expected [models, B, B]");
        goto done;
    }
    if (hinge.ndim != 2 || hinge.shape[0] != size || hinge.shape[1] != size) {
        PyErr_SetString(PyExc_ValueError, "hinge: expected the shape of first");
        goto done;
    }
    int bounded;
    Py_BEGIN_ALLOW_THREADS
    if (code == 'f') {
        float single_limit = limit < FLT_MAX ? (float)limit : FLT_MAX;
        bounded = sigmoid_pair_prelude_float32((const float *)first.buf, (const float *)second.buf, size,
                                               (float *)magnitudes.buf, (float *)hinge.buf, single_limit);
    } else {
        bounded = sigmoid_pair_prelude_float64((const double *)first.buf, (const double *)second.buf, size,
                                               (double *)magnitudes.buf, (double *)hinge.buf, limit);
    }
    Py_END_ALLOW_THREADS
    result = PyBool_FromLong(bounded);

done:
    if (hinge.obj) PyBuffer_Release(&hinge);
    if (magnitudes.obj) PyBuffer_Release(&magnitudes);
    if (second.obj) PyBuffer_Release(&second);
    if (first.obj) PyBuffer_Release(&first);
    return result;
}

static PyMethodDef methods[] = {
    {"sigmoid_pair_prelude", sigmoid_pair_prelude, METH_VARARGS,
     "sigmoid_pair_prelude(first, second, magnitudes, hinge, limit) -> bool: with a = z*first, b = z*second\n"
     "(z = +1 on the diagonal, -1 elsewhere) writes |a|, |b| into magnitudes and min(b, 0) - min(a, 0) into\n"
     "hinge (second None: |a| and -min(a, 0)); False if any |logit| exceeds limit or is NaN."},
    {"softmax_chunk_loop", softmax_chunk_loop, METH_VARARGS,
     "softmax_chunk_loop(exps, signs, noise, per_chunk, out): JEST's chunked Gumbel top-k for the softmax (CLIP)\n"
     "loss from shifted exps [M, B, B] = exp(L_m - max L_m) and one sign per model, written into out chunk by\n"
     "chunk (see jest_trainer.selection)."},
    {"pairwise_chunk_loop", pairwise_chunk_loop, METH_VARARGS,
     "pairwise_chunk_loop(scores, noise, per_chunk, out): JEST's chunked Gumbel top-k from a pairwise score\n"
     "matrix, written into out chunk by chunk (see jest_trainer.selection)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "jest_trainer._selection_native",
    .m_doc = "Native CPU kernels of JEST's selection (optional; selection.py and losses.py fall back to "
             "NumPy/torch).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__selection_native(void) { return PyModule_Create(&module); }
