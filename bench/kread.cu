/* mma-kread: what do one-hop relay kernels' host reads cost under the box's
 * shared host-side ceiling? A measuring tool for the engine's design (see
 * bench/results/), not the product's data path.
 *
 * The H2D ceiling is every GPU's copy engine reading host memory at once
 * (~41 GB/s each on 4x H200). With one-hop relays, one GPU's copy engine
 * (the direct path) and the other GPUs' kernels (loads over their PCIe
 * links) share that ceiling. This runs, with every GPU busy at once and
 * PER bytes each (aggregate = all bytes / time until the last GPU is done):
 *   ce4              every GPU's copy engine into its own memory (the ceiling)
 *   ce+k3 <v> local  gpu0's copy engine; gpus 1..3 a kernel of variant v into their own memory
 *   ce+k3 <v> peer   the same, but the kernels write gpu0's memory (a one-hop relay)
 * and, one GPU alone, ce1 (gpu1's copy engine) against k1 <v> (its kernel),
 * and split64 <v>: one 64 MiB copy into gpu0, a quarter on its copy engine,
 * the rest in equal parts on kernels of gpus 1..3 (what mmad does at 64 MiB).
 * Kernel variants:
 *   grid   mmad's relay kernel (daemon/relay_kernel.cu): 16-byte loads,
 *          grid-stride, four in flight a thread
 *   l2pf   the same loop with ld.global.nc.L2::256B (ask L2 for 256 B)
 *   tma    Hopper bulk copies: one thread a block moves TILE-byte tiles
 *          host -> shared memory -> destination (cp.async.bulk), STAGES in flight
 * Configurations run in turns, ROUNDS times; each figure is the median.
 * The bytes of every configuration's last run are checked.
 *   mma-kread [per_gpu_MiB=256] [rounds=5] */
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"
#include "relay_kernel.h"
#include "util.h"

#define NG 4
#define TMA_THREADS 32

__global__ void k_l2pf(uint4 *__restrict__ dst, const uint4 *__restrict__ src, uint64_t n16)
{
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 v[4];
        for (int k = 0; k < 4; k++)
            asm volatile("ld.global.nc.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                         : "=r"(v[k].x), "=r"(v[k].y), "=r"(v[k].z), "=r"(v[k].w)
                         : "l"(src + i + k * stride));
        for (int k = 0; k < 4; k++)
            dst[i + k * stride] = v[k];
    }
    for (; i < n16; i += stride)
        dst[i] = src[i];
}

/* Each block's thread 0 moves tiles b, b + nb, b + 2nb, ... of `tile`
 * bytes: a bulk load into one of `stages` shared-memory buffers (completion
 * counted on that buffer's mbarrier), then a bulk store from it. A buffer
 * is loaded again only after the stores before have read it. n must be a
 * multiple of tile, tile of 16. */
__global__ void k_tma(char *dst, const char *src, uint64_t n, uint32_t tile, int stages)
{
    extern __shared__ __align__(128) char smem[];
    __shared__ __align__(8) uint64_t bar[8];
    if (threadIdx.x != 0)
        return;
    uint32_t sbase = (uint32_t)__cvta_generic_to_shared(smem);
    uint32_t bbase = (uint32_t)__cvta_generic_to_shared(bar);
    for (int s = 0; s < stages; s++)
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(bbase + 8 * s));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    uint64_t ntiles = n / tile;
    uint64_t mine = ntiles > blockIdx.x ? (ntiles - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    /* load tile j (the block's j-th) into stage j % stages */
#define TMA_LOAD(j)                                                                                         \
    do {                                                                                                    \
        uint64_t t_ = blockIdx.x + (uint64_t)(j) * gridDim.x;                                               \
        uint32_t st_ = (uint32_t)((j) % stages), b_ = bbase + 8 * st_, s_ = sbase + st_ * tile;              \
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(b_), "r"(tile) : "memory"); \
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" \
                     ::"r"(s_), "l"(src + t_ * tile), "r"(tile), "r"(b_)                                    \
                     : "memory");                                                                           \
    } while (0)
    uint64_t pre = mine < (uint64_t)stages ? mine : (uint64_t)stages;
    for (uint64_t j = 0; j < pre; j++)
        TMA_LOAD(j);
    for (uint64_t j = 0; j < mine; j++) {
        uint32_t st = (uint32_t)(j % stages), b = bbase + 8 * st;
        uint32_t parity = (uint32_t)((j / stages) & 1);
        uint32_t done = 0;
        while (!done)
            asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                         : "=r"(done)
                         : "r"(b), "r"(parity)
                         : "memory");
        uint64_t t = blockIdx.x + j * gridDim.x;
        asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(dst + t * tile),
                     "r"(sbase + st * tile), "r"(tile)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        if (j + stages < mine) {
            /* stage st is loaded again: its store must have read it */
            asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
            TMA_LOAD(j + stages);
        }
    }
    asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
#undef TMA_LOAD
}

typedef struct {
    const char *name;
    int blocks;
    uint32_t tile;
    int stages;
} variant_t;

static const variant_t V[] = {
    {"grid", 16, 0, 0},     {"grid", 32, 0, 0},          {"l2pf", 16, 0, 0},        {"l2pf", 32, 0, 0},
    {"tma", 16, 32768, 4},  {"tma", 32, 32768, 4},       {"tma", 64, 16384, 4},     {"tma", 132, 65536, 2},
};
#define NV (int)(sizeof V / sizeof V[0])

static char *host;          /* NG * per bytes, pinned, portable, mapped */
static char *dev[NG];       /* each GPU's own destination */
static char *dev0;          /* gpu0: NG * per bytes, where one-hop kernels write */
static cudaStream_t s[NG];
static cudaEvent_t ev0[NG], ev1[NG];
static int ngpu;

static void kernel(int g, const variant_t *v, char *dst, const char *src, size_t n)
{
    CK(cudaSetDevice(g));
    if (!strcmp(v->name, "grid")) {
        CK(mmad_relay_kernel_launch(dst, src, n, v->blocks, s[g]));
    } else if (!strcmp(v->name, "l2pf")) {
        k_l2pf<<<v->blocks, MMAD_RELAY_THREADS, 0, s[g]>>>((uint4 *)dst, (const uint4 *)src, n / 16);
        CK(cudaGetLastError());
    } else {
        k_tma<<<v->blocks, TMA_THREADS, (size_t)v->tile * v->stages, s[g]>>>(dst, src, n, v->tile, v->stages);
        CK(cudaGetLastError());
    }
}

static void ce(int g, char *dst, const char *src, size_t n)
{
    CK(cudaSetDevice(g));
    CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyHostToDevice, s[g]));
}

enum { M_CE4, M_LOCAL, M_PEER, M_CE1, M_K1, M_SPLIT };
static const char *mode_name[] = {"ce4", "ce+k3 local", "ce+k3 peer", "ce1", "k1", "split64"};

/* Whether GPU g takes part in mode m, and what it copies there: *n bytes
 * from *src into *dst. Peer and split modes write gpu0's memory at the
 * source's offset (gpu0's own copy in peer mode stays in its own memory);
 * the others each GPU's own memory. */
static int part(int m, int g, size_t per, const char **src, char **dst, size_t *n)
{
    if ((m == M_CE1 || m == M_K1) && g != 1)
        return 0;
    *n = m == M_SPLIT ? ((size_t)16 << 20) : per;
    *src = host + g * *n;
    *dst = (m == M_PEER && g != 0) || m == M_SPLIT ? dev0 + (*src - host) : dev[g];
    return 1;
}

/* One run of mode m (variant v where it has kernels); returns wall µs and
 * each GPU's own GB/s (0 where idle) in gbps. */
static double run(int m, const variant_t *v, size_t per, double *gbps)
{
    size_t bytes[NG] = {0};
    int used[NG] = {0};
    for (int g = 0; g < ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaStreamSynchronize(s[g]));
    }
    double t0 = mma_now_us();
    for (int g = 0; g < ngpu; g++) {
        const char *src;
        char *dst;
        size_t n;
        if (!part(m, g, per, &src, &dst, &n))
            continue;
        CK(cudaSetDevice(g));
        CK(cudaEventRecord(ev0[g], s[g]));
        used[g] = 1;
        bytes[g] = n;
        if (m == M_CE4 || m == M_CE1 || (g == 0 && m != M_K1))
            ce(g, dst, src, n);
        else
            kernel(g, v, dst, src, n);
        CK(cudaEventRecord(ev1[g], s[g]));
    }
    for (int g = 0; g < ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaStreamSynchronize(s[g]));
    }
    double us = mma_now_us() - t0;
    for (int g = 0; g < ngpu; g++) {
        float ms = 0;
        gbps[g] = 0;
        if (used[g]) {
            CK(cudaEventElapsedTime(&ms, ev0[g], ev1[g]));
            gbps[g] = bytes[g] / (ms * 1e6);
        }
    }
    return us;
}

/* After a mode's last run: every destination byte it wrote against host. */
static int check(int m, size_t per)
{
    size_t n = m == M_SPLIT ? ((size_t)16 << 20) : per;
    char *h = (char *)malloc(n);
    if (!h)
        exit(1);
    int ok = 1;
    for (int g = 0; g < ngpu; g++) {
        const char *src;
        char *d;
        if (!part(m, g, per, &src, &d, &n))
            continue;
        CK(cudaSetDevice(g));
        CK(cudaMemcpy(h, d, n, cudaMemcpyDeviceToHost));
        if (memcmp(h, src, n)) {
            fprintf(stderr, "mma-kread: %s: gpu%d's bytes differ\n", mode_name[m], g);
            ok = 0;
        }
    }
    free(h);
    return ok;
}

typedef struct {
    int m, v;
    double *us, *gb; /* rounds; gb: rounds x NG */
} conf_t;

int main(int argc, char **argv)
{
    size_t per = (size_t)(argc > 1 ? atoi(argv[1]) : 256) << 20;
    int rounds = argc > 2 ? atoi(argv[2]) : 5;
    if (cudaGetDeviceCount(&ngpu) != cudaSuccess)
        ngpu = 0;
    if (ngpu < NG) {
        fprintf(stderr, "mma-kread: needs %d GPUs, found %d\n", NG, ngpu);
        return 77;
    }
    ngpu = NG;
    if (per < ((size_t)16 << 20) || per % 65536) {
        fprintf(stderr, "mma-kread: per_gpu_MiB must be at least 16\n");
        return 2;
    }
    CK(cudaHostAlloc((void **)&host, NG * per, cudaHostAllocPortable | cudaHostAllocMapped));
    for (size_t i = 0; i < NG * per / 4; i++)
        ((uint32_t *)host)[i] = (uint32_t)(i * 2654435761u);
    for (int g = 0; g < ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaStreamCreateWithFlags(&s[g], cudaStreamNonBlocking));
        CK(cudaEventCreate(&ev0[g]));
        CK(cudaEventCreate(&ev1[g]));
        CK(cudaMalloc((void **)&dev[g], per));
        CK(cudaFuncSetAttribute(k_tma, cudaFuncAttributeMaxDynamicSharedMemorySize, 160 * 1024));
        if (g && !peer_on(g, 0, "mma-kread: "))
            return 77;
    }
    CK(cudaSetDevice(0));
    CK(cudaMalloc((void **)&dev0, NG * per));
    struct cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("# mma-kread on %d x %s, %zu MiB a GPU, %d rounds in turns, medians\n", ngpu, p.name, per >> 20,
           rounds);

    conf_t c[64];
    int nc = 0;
    c[nc++] = (conf_t){M_CE4, -1, 0, 0};
    c[nc++] = (conf_t){M_CE1, -1, 0, 0};
    for (int v = 0; v < NV; v++) {
        c[nc++] = (conf_t){M_K1, v, 0, 0};
        c[nc++] = (conf_t){M_LOCAL, v, 0, 0};
        c[nc++] = (conf_t){M_PEER, v, 0, 0};
        c[nc++] = (conf_t){M_SPLIT, v, 0, 0};
    }
    c[nc++] = (conf_t){M_SPLIT, -2, 0, 0}; /* split64 with gpu0's copy engine alone: native 64 MiB */
    for (int i = 0; i < nc; i++) {
        c[i].us = (double *)calloc((size_t)rounds, sizeof(double));
        c[i].gb = (double *)calloc((size_t)rounds * NG, sizeof(double));
        if (!c[i].us || !c[i].gb)
            return 1;
    }
    double gb[NG];
    for (int r = -1; r < rounds; r++) /* round -1 warms up */
        for (int i = 0; i < nc; i++) {
            const variant_t *v = c[i].v >= 0 ? &V[c[i].v] : NULL;
            double us;
            if (c[i].v == -2) {
                /* native 64 MiB into gpu0 */
                for (int g = 0; g < ngpu; g++) {
                    CK(cudaSetDevice(g));
                    CK(cudaStreamSynchronize(s[g]));
                }
                double t0 = mma_now_us();
                ce(0, dev0, host, (size_t)64 << 20);
                CK(cudaStreamSynchronize(s[0]));
                us = mma_now_us() - t0;
                memset(gb, 0, sizeof gb);
            } else {
                us = run(c[i].m, v, per, gb);
            }
            if (r >= 0) {
                c[i].us[r] = us;
                memcpy(c[i].gb + (size_t)r * NG, gb, sizeof gb);
            }
        }
    int bad = 0;
    double ceil_gbps = 0;
    printf("%-12s %-5s %6s %6s %6s %10s %9s %8s   per GPU GB/s (own time)\n", "mode", "kern", "blocks", "tile",
           "stages", "wall us", "agg GB/s", "%ceil");
    for (int i = 0; i < nc; i++) {
        const variant_t *v = c[i].v >= 0 ? &V[c[i].v] : NULL;
        qsort(c[i].us, (size_t)rounds, sizeof(double), mma_cmp_double);
        double us = c[i].us[rounds / 2];
        int m = c[i].m;
        size_t total = m == M_SPLIT ? ((size_t)64 << 20) : (m == M_CE1 || m == M_K1) ? per : NG * per;
        double agg = total / us / 1e3;
        if (m == M_CE4)
            ceil_gbps = agg;
        printf("%-12s %-5s %6d %6u %6d %10.1f %9.1f %7.1f%%  ", c[i].v == -2 ? "native64" : mode_name[m],
               v ? v->name : "ce", v ? v->blocks : 0, v ? v->tile : 0, v ? v->stages : 0, us, agg,
               100 * agg / ceil_gbps);
        for (int g = 0; g < NG; g++) {
            double col[64];
            for (int r = 0; r < rounds; r++)
                col[r] = c[i].gb[(size_t)r * NG + g];
            qsort(col, (size_t)rounds, sizeof(double), mma_cmp_double);
            printf(" %6.1f", col[rounds / 2]);
        }
        printf("\n");
        fflush(stdout);
    }
    /* the bytes: each mode's last run, once more per variant */
    for (int v = 0; v < NV; v++)
        for (int m = M_LOCAL; m <= M_SPLIT; m++) {
            if (m == M_CE1)
                continue;
            /* cudaMemset runs on the legacy stream, which the copies'
             * non-blocking streams do not wait for: wait here */
            CK(cudaSetDevice(0));
            CK(cudaMemset(dev0, 0, NG * per));
            for (int g = 0; g < ngpu; g++) {
                CK(cudaSetDevice(g));
                CK(cudaMemset(dev[g], 0, per));
                CK(cudaDeviceSynchronize());
            }
            run(m, &V[v], per, gb);
            if (!check(m, per))
                bad++;
        }
    run(M_CE4, NULL, per, gb);
    if (!check(M_CE4, per))
        bad++;
    printf("bytes %s\n", bad ? "DIFFER" : "ok (every configuration's destination checked against host)");
    return bad ? 1 : 0;
}
