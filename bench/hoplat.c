/* mma-hoplat: how long a relay chunk takes on the GPUs of this box, hop by
 * hop, against a direct copy of the same bytes. A measuring tool for the
 * engine's design (see bench/results/), not part of the product's data path.
 *
 * For each size, median and p90 over --reps of issue-to-sync wall time (µs):
 *   direct      host -> gpu0 on gpu0's stream
 *   h2d-only    host -> staging on gpu1 (the relay's PCIe hop alone)
 *   hop-only    staging on gpu1 -> gpu0, on gpu1's stream (push)
 *   relay-push  host -> staging on gpu1, event, then staging -> gpu0 on a
 *               second gpu1 stream (what mmad does)
 *   relay-pull  the same, the second hop on gpu0's stream (gpu0 pulls)
 *   relay-1st   both hops in order on one gpu1 stream
 *   3relays     relay-push through gpu1, gpu2 and gpu3 at once (their hops
 *               land in gpu0 together)
 *   3relays-pull  the same with gpu0 pulling each
 * H2D only; every copy is checked (CK) and the bytes of the last relay are
 * compared with the source. */
#define _GNU_SOURCE
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "cuda_check.h"
#include "util.h"

#define MAXG 8

typedef struct {
    int ngpu;
    size_t cap;
    char *host;
    char *dst;                 /* on gpu0 */
    char *stage[MAXG];         /* on each gpu */
    cudaStream_t pcie[MAXG], hop[MAXG], tgt[MAXG]; /* tgt[v]: gpu0 streams, one per relay */
    cudaEvent_t ev[MAXG];
} box_t;

static void sync_all(box_t *b)
{
    for (int g = 0; g < b->ngpu; g++) {
        CK(cudaStreamSynchronize(b->pcie[g]));
        CK(cudaStreamSynchronize(b->hop[g]));
        CK(cudaStreamSynchronize(b->tgt[g]));
    }
}

/* One relay through v of n bytes landing at dst + off; mode 0 push, 1 pull,
 * 2 one stream. */
static void relay(box_t *b, int v, size_t n, size_t off, int mode)
{
    CK(cudaSetDevice(v));
    cudaStream_t first = b->pcie[v];
    CK(cudaMemcpyAsync(b->stage[v], b->host + off, n, cudaMemcpyHostToDevice, first));
    if (mode == 2) {
        CK(cudaMemcpyAsync(b->dst + off, b->stage[v], n, cudaMemcpyDefault, first));
        return;
    }
    CK(cudaEventRecord(b->ev[v], first));
    cudaStream_t second = mode == 0 ? b->hop[v] : b->tgt[v];
    if (mode == 1)
        CK(cudaSetDevice(0));
    CK(cudaStreamWaitEvent(second, b->ev[v], 0));
    CK(cudaMemcpyAsync(b->dst + off, b->stage[v], n, cudaMemcpyDefault, second));
}

static void run(box_t *b, const char *name, int kind, size_t n, int reps)
{
    double *t = malloc(sizeof *t * (size_t)reps);
    if (!t)
        exit(1);
    for (int r = -3; r < reps; r++) {
        sync_all(b);
        double t0 = mma_now_us();
        switch (kind) {
        case 0:
            CK(cudaSetDevice(0));
            CK(cudaMemcpyAsync(b->dst, b->host, n, cudaMemcpyHostToDevice, b->pcie[0]));
            break;
        case 1:
            CK(cudaSetDevice(1));
            CK(cudaMemcpyAsync(b->stage[1], b->host, n, cudaMemcpyHostToDevice, b->pcie[1]));
            break;
        case 2:
            CK(cudaSetDevice(1));
            CK(cudaMemcpyAsync(b->dst, b->stage[1], n, cudaMemcpyDefault, b->hop[1]));
            break;
        case 3:
        case 4:
        case 5:
            relay(b, 1, n, 0, kind - 3);
            break;
        case 6:
        case 7:
            for (int v = 1; v < b->ngpu; v++)
                relay(b, v, n, (size_t)v * n, kind == 6 ? 0 : 1);
            break;
        }
        sync_all(b);
        if (r >= 0)
            t[r] = mma_now_us() - t0;
    }
    qsort(t, (size_t)reps, sizeof *t, mma_cmp_double);
    printf("%-13s %8zu KiB %9.1f %9.1f\n", name, n >> 10, t[reps / 2], t[reps * 9 / 10]);
    free(t);
}

int main(int argc, char **argv)
{
    int reps = 200;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--reps") && i + 1 < argc) {
            reps = atoi(argv[++i]);
        } else {
            fprintf(stderr, "usage: mma-hoplat [--reps N]\n"
                            "Per size, issue-to-sync time (us, p50 and p90) of a direct H2D copy into gpu0 and\n"
                            "of relays through peers: each hop alone, push (the peer's stream), pull (gpu0's\n"
                            "stream), one stream, and three relays at once. Needs 2+ GPUs with peer access.\n");
            return strcmp(argv[i], "--help") ? 2 : 0;
        }
    }
    if (reps < 10)
        reps = 10;
    box_t b;
    memset(&b, 0, sizeof b);
    if (cudaGetDeviceCount(&b.ngpu) != cudaSuccess || b.ngpu < 2) {
        fprintf(stderr, "mma-hoplat: needs at least 2 GPUs\n");
        return 77;
    }
    if (b.ngpu > 4)
        b.ngpu = 4;
    b.cap = 8u << 20;
    CK(cudaMallocHost((void **)&b.host, b.cap * (size_t)b.ngpu));
    for (size_t i = 0; i < b.cap * (size_t)b.ngpu; i++)
        b.host[i] = (char)(i * 131 + 7);
    for (int g = 0; g < b.ngpu; g++) {
        CK(cudaSetDevice(g));
        for (int p = 0; p < b.ngpu; p++)
            if (p != g) {
                cudaError_t e = cudaDeviceEnablePeerAccess(p, 0);
                if (e == cudaErrorPeerAccessAlreadyEnabled)
                    (void)cudaGetLastError();
                else
                    CK(e);
            }
        CK(cudaMalloc((void **)&b.stage[g], b.cap));
        CK(cudaStreamCreateWithFlags(&b.pcie[g], cudaStreamNonBlocking));
        CK(cudaStreamCreateWithFlags(&b.hop[g], cudaStreamNonBlocking));
        CK(cudaEventCreateWithFlags(&b.ev[g], cudaEventDisableTiming));
    }
    CK(cudaSetDevice(0));
    CK(cudaMalloc((void **)&b.dst, b.cap * (size_t)b.ngpu));
    for (int g = 0; g < b.ngpu; g++)
        CK(cudaStreamCreateWithFlags(&b.tgt[g], cudaStreamNonBlocking));
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("mma-hoplat | %d x %s | %d reps | us from issue to sync, H2D into gpu0\n", b.ngpu, prop.name, reps);
    printf("%-13s %12s %9s %9s\n", "case", "size", "p50", "p90");
    const char *names[] = {"direct", "h2d-only", "hop-only", "relay-push", "relay-pull", "relay-1st", "3relays",
                           "3relays-pull"};
    size_t sizes[] = {512u << 10, 2u << 20, 8u << 20};
    for (size_t s = 0; s < sizeof sizes / sizeof sizes[0]; s++)
        for (int k = 0; k < 8; k++) {
            if (k >= 6 && b.ngpu < 4)
                continue;
            run(&b, names[k], k, sizes[s], reps);
        }
    /* The last case left the relays' bytes at dst + v * n: compare them. */
    size_t n = sizes[2];
    char *back = malloc(n * (size_t)b.ngpu);
    if (!back)
        return 1;
    CK(cudaMemcpy(back, b.dst, n * (size_t)b.ngpu, cudaMemcpyDeviceToHost));
    int ok = 1;
    for (int v = 1; v < b.ngpu && b.ngpu >= 4; v++)
        ok &= memcmp(back + (size_t)v * n, b.host + (size_t)v * n, n) == 0;
    printf("relayed bytes %s\n", ok ? "match" : "MISMATCH");
    free(back);
    return ok ? 0 : 1;
}
