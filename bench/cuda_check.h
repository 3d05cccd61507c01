/* The GPU measuring tools (mma-callcost, mma-hoplat, mma-kcopy, ...): a CUDA
 * runtime call that fails ends the run, saying where and which call; and
 * peer access, where a tool needs it. */
#ifndef MMA_BENCH_CUDA_CHECK_H
#define MMA_BENCH_CUDA_CHECK_H

#include <cuda_runtime_api.h>
#include <stdio.h>
#include <stdlib.h>

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e_ = (x);                                                                  \
        if (e_ != cudaSuccess) {                                                               \
            fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

/* With GPU g current: let it reach GPU p's memory (peer access). 0, and
 * the reason on stderr after `prefix` (the tool's name), where it cannot. */
static inline int peer_on(int g, int p, const char *prefix)
{
    int can = 0;
    CK(cudaDeviceCanAccessPeer(&can, g, p));
    if (!can) {
        fprintf(stderr, "%sgpu%d cannot reach gpu%d's memory\n", prefix, g, p);
        return 0;
    }
    CK(cudaDeviceEnablePeerAccess(p, 0));
    return 1;
}

#endif
