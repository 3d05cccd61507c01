/* The box ceiling as mma-bench and mma-ab take it: every GPU copies into
 * (D2H: out of) its own memory at once, natively, each on a stream of its
 * own. Whoever allocates the buffers (mma-bench: libmma's host memory,
 * mma-ab: cudaHostAlloc) fills in a bench_box_t. */
#ifndef MMA_BENCH_CEILING_H
#define MMA_BENCH_CEILING_H

#include <cuda_runtime_api.h>
#include <stddef.h>

#include "bench_util.h"
#include "cuda_check.h"
#include "util.h"

#define BENCH_MAXG 16

typedef struct bench_box {
    int ngpu;
    int home;   /* the GPU made current again after each round */
    size_t cap; /* bytes each GPU's buffers hold; 0: none yet */
    char *host[BENCH_MAXG], *dev[BENCH_MAXG];
    cudaStream_t st[BENCH_MAXG];
} bench_box_t;

/* One round: every GPU copies per bytes (at most b->cap) at once. GB/s of
 * all of them until the last ends; end[g] (if not NULL): when GPU g's copy
 * ended, in seconds from the start (does the host side serve every link
 * alike?). */
static inline double bench_ceil_round(const bench_box_t *b, int dir, size_t per, double *end)
{
    int n = b->ngpu, done[BENCH_MAXG] = {0};
    double at[BENCH_MAXG] = {0};
    for (int g = 0; g < n; g++)
        CK(cudaStreamSynchronize(b->st[g]));
    double t0 = mma_now_s();
    for (int g = 0; g < n; g++) {
        CK(cudaSetDevice(g));
        if (dir == 0)
            CK(cudaMemcpyAsync(b->dev[g], b->host[g], per, cudaMemcpyHostToDevice, b->st[g]));
        else
            CK(cudaMemcpyAsync(b->host[g], b->dev[g], per, cudaMemcpyDeviceToHost, b->st[g]));
    }
    for (int left = n; left > 0;)
        for (int g = 0; g < n; g++) {
            if (done[g])
                continue;
            cudaError_t q = cudaStreamQuery(b->st[g]);
            if (q == cudaErrorNotReady) {
                (void)cudaGetLastError(); /* still copying: not an error */
                continue;
            }
            CK(q);
            at[g] = mma_now_s() - t0;
            done[g] = 1;
            left--;
        }
    CK(cudaSetDevice(b->home));
    double all = 0;
    for (int g = 0; g < n; g++) {
        all = at[g] > all ? at[g] : all;
        if (end)
            end[g] = at[g];
    }
    return (double)per * n / all / 1e9;
}

/* The same-bytes ceiling of an n-byte copy: every GPU copies n/ngpu bytes
 * at once, after one such round that warms up; the median of `rounds`
 * (at most 16), in GB/s of all n bytes. It pays a copy's start and end as
 * one copy of n does; a ceiling of large copies a GPU has none of them.
 * 0 where n/ngpu does not fit the buffers. */
static inline double bench_same_ceiling(const bench_box_t *b, int dir, size_t n, int rounds)
{
    size_t per = (n / (size_t)b->ngpu) & ~(size_t)4095;
    if (!per || per > b->cap || rounds < 1 || rounds > 16)
        return 0;
    double r[16];
    (void)bench_ceil_round(b, dir, per, NULL);
    for (int i = 0; i < rounds; i++)
        r[i] = bench_ceil_round(b, dir, per, NULL);
    return bench_median(r, rounds);
}

#endif
