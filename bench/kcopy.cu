/* mma-kcopy: can a peer GPU's SMs carry a relay in one hop? A measuring tool
 * for the engine's design (see bench/results/), not the product's data path.
 *
 * A staged relay (what mmad does by default) is two copy-engine copies: host
 * -> staging on peer k over k's PCIe link, then staging -> target over
 * NVLink. A kernel on peer k can do both at once: its loads read pinned host
 * memory (they travel k's PCIe link) and its stores land in the target's
 * memory (they travel NVLink); D2H mirrors it. No staging, no second copy,
 * no event between hops. The kernel is mmad's own (daemon/relay_kernel.cu).
 *
 * Every figure is the median (and p90) of --reps issue-to-sync wall times:
 *   native      one cudaMemcpyAsync host <-> gpu0
 *   k1@B        a kernel of B blocks on gpu1 alone moving all n bytes
 *   split       gpu0's copy engine moves a share, kernels on gpu1..3 the rest,
 *               all issued at once
 * The bytes of every split run's last repetition are checked. */
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"
#include "relay_kernel.h" /* the copy kernel mmad's one-hop relays run */
#include "util.h"

#define MAXG 8

typedef struct {
    int ngpu;
    char *host;  /* source (H2D) / destination (D2H), pinned, portable, mapped */
    char *dev;   /* on gpu0 */
    cudaStream_t s[MAXG];
} box_t;

/* Issue one copy of n bytes in direction d (0 H2D, 1 D2H): share `dshare` of
 * it on gpu0's copy engine, the rest split evenly over kernels of `blocks`
 * blocks on gpus 1..npeer. npeer 0 is the native copy. */
static void issue(box_t *b, int d, size_t n, double dshare, int npeer, int blocks, int on_peer1_only)
{
    size_t direct = npeer ? ((size_t)(n * dshare) & ~(size_t)4095) : n;
    if (on_peer1_only)
        direct = 0;
    if (direct) {
        CK(cudaSetDevice(0));
        if (d == 0)
            CK(cudaMemcpyAsync(b->dev, b->host, direct, cudaMemcpyHostToDevice, b->s[0]));
        else
            CK(cudaMemcpyAsync(b->host, b->dev, direct, cudaMemcpyDeviceToHost, b->s[0]));
    }
    size_t rest = n - direct, off = direct;
    int np = on_peer1_only ? 1 : npeer;
    for (int k = 1; k <= np; k++) {
        size_t part = k == np ? n - off : (rest / np) & ~(size_t)4095;
        CK(cudaSetDevice(k));
        CK(mmad_relay_kernel_launch(d == 0 ? b->dev + off : b->host + off, d == 0 ? b->host + off : b->dev + off,
                                    part, blocks, b->s[k]));
        off += part;
    }
}

static void sync_all(box_t *b)
{
    for (int g = 0; g < b->ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaStreamSynchronize(b->s[g]));
    }
}

static void fill(box_t *b, int d, size_t n, unsigned salt)
{
    /* H2D: pattern in host, garbage on gpu0; D2H: the reverse. */
    uint32_t *h = (uint32_t *)b->host;
    for (size_t i = 0; i < n / 4; i++)
        h[i] = (uint32_t)(i * 2654435761u) ^ salt;
    CK(cudaSetDevice(0));
    if (d == 1) {
        CK(cudaMemcpy(b->dev, b->host, n, cudaMemcpyHostToDevice));
        memset(b->host, 0xA5, n);
    } else {
        CK(cudaMemset(b->dev, 0x5A, n));
    }
}

static int check(box_t *b, int d, size_t n, unsigned salt)
{
    uint32_t *h = (uint32_t *)malloc(n);
    if (!h)
        exit(1);
    if (d == 0) {
        CK(cudaSetDevice(0));
        CK(cudaMemcpy(h, b->dev, n, cudaMemcpyDeviceToHost));
    } else {
        memcpy(h, b->host, n);
    }
    size_t bad = 0;
    for (size_t i = 0; i < n / 4; i++)
        bad += h[i] != ((uint32_t)(i * 2654435761u) ^ salt);
    free(h);
    return bad == 0;
}

static void measure(box_t *b, int d, size_t n, double dshare, int npeer, int blocks, int p1,
                    int reps, const char *name)
{
    double *t = (double *)malloc(sizeof *t * (size_t)reps);
    if (!t)
        exit(1);
    unsigned salt = (unsigned)(n ^ (size_t)(dshare * 1000) ^ (size_t)blocks);
    fill(b, d, n, salt);
    for (int r = -3; r < reps; r++) {
        sync_all(b);
        double t0 = mma_now_us();
        issue(b, d, n, dshare, npeer, blocks, p1);
        sync_all(b);
        if (r >= 0)
            t[r] = mma_now_us() - t0;
    }
    int ok = check(b, d, n, salt);
    qsort(t, (size_t)reps, sizeof *t, mma_cmp_double);
    double p50 = t[reps / 2], p90 = t[reps * 9 / 10];
    printf("%s,%s,%zu,%s,%.2f,%d,%.1f,%.1f,%.1f,%s\n", d ? "D2H" : "H2D", name, n,
           "", dshare, blocks, p50, p90, n / p50 / 1e3, ok ? "ok" : "BAD");
    fflush(stdout);
    free(t);
    if (!ok)
        exit(2);
}

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 50;
    box_t b;
    memset(&b, 0, sizeof b);
    CK(cudaGetDeviceCount(&b.ngpu));
    if (b.ngpu < 2) {
        fprintf(stderr, "mma-kcopy: needs 2+ GPUs, found %d\n", b.ngpu);
        return 77;
    }
    if (b.ngpu > 4)
        b.ngpu = 4;
    size_t cap = (size_t)256 << 20;
    CK(cudaHostAlloc((void **)&b.host, cap, cudaHostAllocPortable | cudaHostAllocMapped));
    for (int g = 0; g < b.ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaStreamCreateWithFlags(&b.s[g], cudaStreamNonBlocking));
        if (g && !peer_on(g, 0, ""))
            return 77;
    }
    CK(cudaSetDevice(0));
    CK(cudaMalloc((void **)&b.dev, cap));
    struct cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("# mma-kcopy on %d x %s, %d SMs, %d reps, %d threads a block\n", b.ngpu, p.name,
           p.multiProcessorCount, reps, MMAD_RELAY_THREADS);
    printf("dir,what,bytes,,direct_share,blocks,p50_us,p90_us,GBps,bytes_ok\n");
    int np = b.ngpu - 1;
    for (int d = 0; d < 2; d++) {
        /* one peer alone: how many blocks a link needs */
        int bl[] = {4, 8, 16, 32, 64, 132};
        for (size_t i = 0; i < sizeof bl / sizeof bl[0]; i++)
            measure(&b, d, (size_t)64 << 20, 0, 1, bl[i], 1, reps / 2 + 3, "k1");
        size_t sizes[] = {(size_t)1 << 20, (size_t)2 << 20, (size_t)4 << 20, (size_t)8 << 20,
                          (size_t)16 << 20, (size_t)64 << 20, (size_t)256 << 20};
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            size_t n = sizes[i];
            int r = n >= ((size_t)64 << 20) ? reps / 2 + 3 : reps;
            measure(&b, d, n, 1, 0, 0, 0, r, "native");
            measure(&b, d, n, 0.25, np, 32, 0, r, "split");
            measure(&b, d, n, 0.30, np, 32, 0, r, "split");
            measure(&b, d, n, 0.25, np, 16, 0, r, "split");
            measure(&b, d, n, 0.25, np, 64, 0, r, "split");
            measure(&b, d, n, 1, 0, 0, 0, r, "native");
        }
    }
    return 0;
}
