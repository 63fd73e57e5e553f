/* Decode attention over the engine's paged KV cache on the CPU: one query token per sequence,
   reading each sequence's keys and values where they lie in the cache (no gather into a padded
   copy first). Built at first use by orchestrator/inference/kernels.py and called through ctypes.

   Layout (GenerationEngine): one layer's keys k and values v are (slots, kv_heads, dim), slot
   block * block_size + offset, rows slot_stride floats apart. Sequence b's position p lies in
   block table[b * width + p / block_size]; it attends over positions 0 .. lengths[b] - 1. Query
   head h reads KV head h / (heads / kv_heads). out: (n, heads, dim), contiguous.

   One sequence per task, its heads together: a slot's keys (then values) of every head are read
   once, front to back. Softmax in fp32 over the scores (the largest subtracted first), the
   probabilities normalised before the values are summed by them. Returns 0, or 1 if memory for
   the scores ran out (out is then incomplete). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__GNUC__) && defined(__x86_64__)
/* glibc's vector expf (libmvec), for the exponentials of a head's scores in one loop. */
float expf(float) __attribute__((simd("notinbranch")));
#endif

int paged_decode_attention(const float *q, int64_t q_batch_stride, int64_t q_head_stride,
                           const float *k, const float *v, int64_t slot_stride,
                           const int64_t *table, int64_t width, const int64_t *lengths,
                           int64_t n, int64_t heads, int64_t kv_heads, int64_t dim, int64_t block_size,
                           float scale, int threads, float *out) {
    const int64_t group = heads / kv_heads;
    int failed = 0;
    #pragma omp parallel num_threads(threads)
    {
        int64_t cap = 0;
        float *scores = NULL;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t b = 0; b < n; b++) {
            const int64_t len = lengths[b];
            if (len > cap) {
                free(scores);
                cap = len;
                scores = malloc(sizeof(float) * (size_t)(cap * heads));
                if (scores == NULL) {
                    cap = 0;
                    #pragma omp atomic write
                    failed = 1;
                    continue;
                }
            }
            const int64_t *blocks = table + b * width;
            const float *qb = q + b * q_batch_stride;
            float *ob = out + b * heads * dim;
            for (int64_t p = 0; p < len; p++) {
                const float *kp = k + (blocks[p / block_size] * block_size + p % block_size) * slot_stride;
                for (int64_t h = 0; h < heads; h++) {
                    const float *qh = qb + h * q_head_stride, *kh = kp + (h / group) * dim;
                    float dot = 0.f;
                    #pragma omp simd reduction(+:dot)
                    for (int64_t d = 0; d < dim; d++) dot += qh[d] * kh[d];
                    scores[h * len + p] = dot * scale;
                }
            }
            for (int64_t h = 0; h < heads; h++) {
                float *s = scores + h * len, top = -INFINITY, sum = 0.f;
                for (int64_t p = 0; p < len; p++) top = s[p] > top ? s[p] : top;
                #pragma omp simd reduction(+:sum)
                for (int64_t p = 0; p < len; p++) {
                    s[p] = expf(s[p] - top);
                    sum += s[p];
                }
                const float inv = 1.f / sum;
                for (int64_t p = 0; p < len; p++) s[p] *= inv;
            }
            for (int64_t i = 0; i < heads * dim; i++) ob[i] = 0.f;
            for (int64_t p = 0; p < len; p++) {
                const float *vp = v + (blocks[p / block_size] * block_size + p % block_size) * slot_stride;
                for (int64_t h = 0; h < heads; h++) {
                    const float w = scores[h * len + p], *vh = vp + (h / group) * dim;
                    float *oh = ob + h * dim;
                    #pragma omp simd
                    for (int64_t d = 0; d < dim; d++) oh[d] += w * vh[d];
                }
            }
        }
        free(scores);
    }
    return failed;
}
