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
 *   ce1         gpu1's copy engine alone moving all n bytes between host memory
 *               and gpu0's (one cudaMemcpyAsync on a gpu1 stream, gpu0's memory
 *               reached through peer access)
 *   split-ce    as split, but each peer's part is such a copy on its own copy
 *               engine instead of a kernel
 *   split-d2d, split-peer, split-drv
 *               as split-ce, but the peer's copy named otherwise, in case the
 *               call decides which engine and link carry it: the runtime's
 *               DeviceToDevice kind with the host pointer as a device
 *               pointer; cudaMemcpyPeerAsync with host memory named as the
 *               peer's; the driver's cuMemcpyDtoDAsync. A call the CUDA
 *               version refuses prints "refused" and the error.
 *   ceil        the box ceiling for the same bytes: every GPU copies n/ngpu
 *               between host memory and its own memory, all at once
 * Whether a peer's copy engine rides the peer's own PCIe link shows in
 * split-ce against native and ceil: were it routed over gpu0's link, four
 * paths would move no more than native.
 * The bytes of every run's last repetition are checked (ceil: gpu0's part). */
#include <cuda.h> /* driver API types; cuMemcpyDtoDAsync is fetched at run time */
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_check.h"
#include "relay_kernel.h" /* the copy kernel mmad's one-hop relays run */
#include "util.h"

#define MAXG 8

/* How a peer's part goes where `blocks` is not a kernel's (> 0). */
enum { HOW_CE = 0, HOW_CEIL = -1, HOW_D2D = -2, HOW_PEER = -3, HOW_DRV = -4 };

typedef CUresult (*dtod_fn)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
static dtod_fn drv_dtod;
/* The first error of a split-d2d/peer/drv call: that way is refused. */
static cudaError_t how_err;

#define TRY(x)                             \
    do {                                   \
        cudaError_t e_ = (x);              \
        if (e_ != cudaSuccess && !how_err) \
            how_err = e_;                  \
    } while (0)

typedef struct {
    int ngpu;
    char *host;  /* source (H2D) / destination (D2H), pinned, portable, mapped */
    char *dev;   /* on gpu0 */
    char *own[MAXG]; /* ceil: each GPU's own buffer (own[0] == dev) */
    cudaStream_t s[MAXG];
} box_t;

/* ceil: every GPU moves its n/ngpu between its slice of host memory and its
 * own memory, on its own stream. */
static void issue_ceil(box_t *b, int d, size_t n)
{
    size_t part = (n / (size_t)b->ngpu) & ~(size_t)4095, off = 0;
    for (int g = 0; g < b->ngpu; g++) {
        size_t len = g == b->ngpu - 1 ? n - off : part;
        CK(cudaSetDevice(g));
        if (d == 0)
            CK(cudaMemcpyAsync(b->own[g] + off, b->host + off, len, cudaMemcpyHostToDevice, b->s[g]));
        else
            CK(cudaMemcpyAsync(b->host + off, b->own[g] + off, len, cudaMemcpyDeviceToHost, b->s[g]));
        off += len;
    }
}

/* Issue one copy of n bytes in direction d (0 H2D, 1 D2H): share `dshare` of
 * it on gpu0's copy engine, the rest split evenly over gpus 1..npeer: kernels
 * of `blocks` blocks, or with blocks 0 copies on the peers' copy engines.
 * npeer 0 is the native copy; blocks -1 the box ceiling (issue_ceil). */
static void issue(box_t *b, int d, size_t n, double dshare, int npeer, int blocks, int on_peer1_only)
{
    if (blocks == HOW_CEIL) {
        issue_ceil(b, d, n);
        return;
    }
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
        char *dst = d == 0 ? b->dev + off : b->host + off, *src = d == 0 ? b->host + off : b->dev + off;
        if (blocks == HOW_CE)
            CK(cudaMemcpyAsync(dst, src, part, cudaMemcpyDefault, b->s[k]));
        else if (blocks == HOW_D2D)
            TRY(cudaMemcpyAsync(dst, src, part, cudaMemcpyDeviceToDevice, b->s[k]));
        else if (blocks == HOW_PEER)
            TRY(cudaMemcpyPeerAsync(dst, d == 0 ? 0 : k, src, d == 0 ? k : 0, part, b->s[k]));
        else if (blocks == HOW_DRV)
            TRY(drv_dtod((CUdeviceptr)(uintptr_t)dst, (CUdeviceptr)(uintptr_t)src, part, (CUstream)b->s[k]) ==
                        CUDA_SUCCESS
                    ? cudaSuccess
                    : cudaErrorUnknown);
        else
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
        for (int g = 1; g < b->ngpu; g++) {
            CK(cudaSetDevice(g));
            CK(cudaMemcpy(b->own[g], b->host, n, cudaMemcpyHostToDevice));
        }
        CK(cudaSetDevice(0));
        memset(b->host, 0xA5, n);
    } else {
        for (int g = 0; g < b->ngpu; g++) {
            CK(cudaSetDevice(g));
            CK(cudaMemset(b->own[g], 0x5A, n));
        }
    }
}

/* ceil H2D: each GPU's slice is checked in its own memory. */
static int check(box_t *b, int d, size_t n, unsigned salt, int ceil)
{
    uint32_t *h = (uint32_t *)malloc(n);
    if (!h)
        exit(1);
    if (d == 0 && ceil) {
        size_t part = (n / (size_t)b->ngpu) & ~(size_t)4095, off = 0;
        for (int g = 0; g < b->ngpu; g++) {
            size_t len = g == b->ngpu - 1 ? n - off : part;
            CK(cudaSetDevice(g));
            CK(cudaMemcpy((char *)h + off, b->own[g] + off, len, cudaMemcpyDeviceToHost));
            off += len;
        }
    } else if (d == 0) {
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
    how_err = cudaSuccess;
    for (int r = -3; r < reps; r++) {
        sync_all(b);
        double t0 = mma_now_us();
        issue(b, d, n, dshare, npeer, blocks, p1);
        if (how_err) { /* a way this CUDA refuses: say so, go on */
            (void)cudaGetLastError();
            sync_all(b);
            printf("%s,%s,%zu,,,%d,refused: %s\n", d ? "D2H" : "H2D", name, n, blocks, cudaGetErrorString(how_err));
            fflush(stdout);
            free(t);
            return;
        }
        sync_all(b);
        if (r >= 0)
            t[r] = mma_now_us() - t0;
    }
    int ok = check(b, d, n, salt, blocks == HOW_CEIL);
    qsort(t, (size_t)reps, sizeof *t, mma_cmp_double);
    double p50 = t[reps / 2], p90 = t[reps * 9 / 10];
    printf("%s,%s,%zu,%s,%.2f,%d,%.1f,%.1f,%.1f,%s\n", d ? "D2H" : "H2D", name, n,
           "", dshare, blocks, p50, p90, n / p50 / 1e3, ok ? "ok" : "BAD");
    fflush(stdout);
    free(t);
    if (!ok && blocks > HOW_D2D) /* the named-otherwise ways may copy wrongly: shown, not fatal */
        exit(2);
}

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 50;
    /* "short": 8, 64 and 256 MiB; native, ceil, kernels and copy engines */
    int brief = argc > 2 && strcmp(argv[2], "short") == 0;
    if (reps < 4 || (argc > 2 && !brief)) {
        fprintf(stderr, "usage: mma-kcopy [REPS>=4] [short]\n");
        return 2;
    }
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
    for (int g = b.ngpu - 1; g >= 0; g--) {
        CK(cudaSetDevice(g));
        CK(cudaMalloc((void **)&b.own[g], cap));
    }
    b.dev = b.own[0];
    void *fn = NULL;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuMemcpyDtoDAsync", &fn, 12000, cudaEnableDefault, &found) == cudaSuccess &&
        found == cudaDriverEntryPointSuccess)
        drv_dtod = (dtod_fn)fn;
    else
        (void)cudaGetLastError();
    struct cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("# mma-kcopy on %d x %s, %d SMs, %d reps, %d threads a block\n", b.ngpu, p.name,
           p.multiProcessorCount, reps, MMAD_RELAY_THREADS);
    printf("dir,what,bytes,,direct_share,blocks,p50_us,p90_us,GBps,bytes_ok\n");
    int np = b.ngpu - 1;
    for (int d = 0; d < 2; d++) {
        /* one peer alone: how many blocks a link needs; its copy engine */
        int bl[] = {4, 8, 16, 32, 64, 132};
        for (size_t i = 0; !brief && i < sizeof bl / sizeof bl[0]; i++)
            measure(&b, d, (size_t)64 << 20, 0, 1, bl[i], 1, reps / 2 + 3, "k1");
        measure(&b, d, (size_t)64 << 20, 0, 1, 0, 1, reps / 2 + 3, "ce1");
        size_t sizes[] = {(size_t)1 << 20, (size_t)2 << 20, (size_t)4 << 20, (size_t)8 << 20,
                          (size_t)16 << 20, (size_t)64 << 20, (size_t)256 << 20};
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
            size_t n = sizes[i];
            if (brief && n != ((size_t)8 << 20) && n != ((size_t)64 << 20) && n != ((size_t)256 << 20))
                continue;
            int r = n >= ((size_t)64 << 20) ? reps / 2 + 3 : reps;
            measure(&b, d, n, 1, 0, 0, 0, r, "native");
            measure(&b, d, n, 0, 0, HOW_CEIL, 0, r, "ceil");
            measure(&b, d, n, 0.25, np, 32, 0, r, "split");
            measure(&b, d, n, 0.25, np, 0, 0, r, "split-ce");
            measure(&b, d, n, 0.22, np, 0, 0, r, "split-ce");
            measure(&b, d, n, 0.25, np, HOW_D2D, 0, r, "split-d2d");
            measure(&b, d, n, 0.25, np, HOW_PEER, 0, r, "split-peer");
            if (drv_dtod)
                measure(&b, d, n, 0.25, np, HOW_DRV, 0, r, "split-drv");
            if (!brief) {
                measure(&b, d, n, 0.30, np, 32, 0, r, "split");
                measure(&b, d, n, 0.25, np, 16, 0, r, "split");
                measure(&b, d, n, 0.25, np, 64, 0, r, "split");
            }
            measure(&b, d, n, 0, 0, HOW_CEIL, 0, r, "ceil");
            measure(&b, d, n, 1, 0, 0, 0, r, "native");
        }
    }
    return 0;
}
