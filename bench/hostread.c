/* mma-hostread: can four GPUs read one host buffer as fast as four buffers?
 *
 * mmad's paths into one GPU all read the client's one buffer, in chunks;
 * the box ceiling has each GPU read a buffer of its own in one copy. This
 * times, natively (no mmad), every GPU copying host -> its own memory at once:
 *   own     each GPU one copy of PER bytes from a buffer of its own (the ceiling);
 *   quarter each GPU one copy of PER bytes from its quarter of one shared buffer;
 *   chunks  each GPU the chunks k, k+n, k+2n, ... of CHUNK bytes of the shared
 *           buffer (as mmad's paths take a copy), two in flight per GPU.
 * Host memory is mmap'ed and registered Portable (as libmma's), so the
 * three differ only in which bytes each GPU reads. Aggregate GB/s = all
 * bytes / time until the last GPU is done; median of REPS, modes in turns.
 *   mma-hostread [per_gpu_MiB=256] [chunk_MiB=8] [reps=9] */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <cuda_runtime_api.h>

#include "cuda_check.h"
#include "util.h"

#define MAXG 16

static void *host_buf(size_t n)
{
    void *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
        perror("mmap");
        exit(1);
    }
    memset(p, 0x5a, n);
    CK(cudaHostRegister(p, n, cudaHostRegisterPortable));
    return p;
}

static int cmp(const void *a, const void *b)
{
    return mma_cmp_double(a, b);
}

int main(int argc, char **argv)
{
    size_t per = (size_t)(argc > 1 ? atoi(argv[1]) : 256) << 20;
    size_t chunk = (size_t)(argc > 2 ? atoi(argv[2]) : 8) << 20;
    int reps = argc > 3 ? atoi(argv[3]) : 9;
    int n = 0;
    CK(cudaGetDeviceCount(&n));
    if (n < 2 || per == 0 || chunk == 0 || per % chunk || reps < 1 || reps > 99) {
        fprintf(stderr, "need 2+ GPUs, per_gpu a multiple of chunk, 1-99 reps (have %d GPUs)\n", n);
        return n < 2 ? 77 : 2;
    }
    if (n > MAXG)
        n = MAXG;
    char *own[MAXG], *dev[MAXG];
    cudaStream_t st[MAXG][2];
    char *shared = host_buf(per * (size_t)n);
    for (int g = 0; g < n; g++) {
        own[g] = host_buf(per);
        CK(cudaSetDevice(g));
        CK(cudaMalloc((void **)&dev[g], per));
        CK(cudaStreamCreateWithFlags(&st[g][0], cudaStreamNonBlocking));
        CK(cudaStreamCreateWithFlags(&st[g][1], cudaStreamNonBlocking));
    }
    const char *names[] = {"own", "quarter", "chunks"};
    double gbps[3][100];
    for (int r = -1; r < reps; r++)
        for (int m = 0; m < 3; m++) {
            double t0 = mma_now_s();
            for (int g = 0; g < n; g++) {
                CK(cudaSetDevice(g));
                if (m == 0)
                    CK(cudaMemcpyAsync(dev[g], own[g], per, cudaMemcpyHostToDevice, st[g][0]));
                else if (m == 1)
                    CK(cudaMemcpyAsync(dev[g], shared + (size_t)g * per, per, cudaMemcpyHostToDevice, st[g][0]));
                else
                    for (size_t k = 0; k < per / chunk; k++)
                        CK(cudaMemcpyAsync(dev[g] + k * chunk, shared + (k * (size_t)n + (size_t)g) * chunk, chunk,
                                           cudaMemcpyHostToDevice, st[g][k & 1]));
            }
            for (int g = 0; g < n; g++) {
                CK(cudaSetDevice(g));
                CK(cudaStreamSynchronize(st[g][0]));
                CK(cudaStreamSynchronize(st[g][1]));
            }
            if (r >= 0)
                gbps[m][r] = (double)per * n / (mma_now_s() - t0) / 1e9;
        }
    printf("mma-hostread: %d GPUs each copy %zu MiB host -> own memory at once; chunks of %zu MiB; %d reps\n", n,
           per >> 20, chunk >> 20, reps);
    printf("%-8s %10s %10s %10s\n", "mode", "p50 GB/s", "min", "max");
    for (int m = 0; m < 3; m++) {
        qsort(gbps[m], (size_t)reps, sizeof(double), cmp);
        printf("%-8s %10.1f %10.1f %10.1f\n", names[m], gbps[m][reps / 2], gbps[m][0], gbps[m][reps - 1]);
    }
    return 0;
}
