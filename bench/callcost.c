/* mma-callcost: what issuing one relay chunk costs the CPU, by API and by
 * thread layout, on the GPUs of this box. A measuring tool for the engine's
 * design (see bench/results/), not part of the product's data path.
 *
 * A relay chunk into gpu0 through gpu v is: host -> staging on v (PCIe hop),
 * then staging -> gpu0 (NVLink hop), then a completion mark. Variants:
 *   rt-2stream   runtime: setDevice, memcpy, eventRecord, streamWaitEvent,
 *                memcpyPeer, eventRecord (what backend_cuda.c does today)
 *   drv-2stream  driver: the same five calls through cu* entry points, the
 *                completion mark a cuStreamWriteValue64 to host memory
 *   drv-1stream  driver: both hops on one stream and the mark (three calls)
 * each issued from one thread (round-robin over the vias) or from one thread
 * per via. Copies are 64 KiB so the GPUs keep up; only the time inside the
 * issuing calls is counted (queues are drained between batches, untimed).
 * Also: cudaEventQuery on a completed event, and reading a host flag. */
#define _GNU_SOURCE
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "cuda_check.h"
#include "util.h"

#define DK(x)                                                                   \
    do {                                                                        \
        CUresult r_ = (x);                                                      \
        if (r_ != CUDA_SUCCESS) {                                               \
            fprintf(stderr, "%s:%d %s: CUresult %d\n", __FILE__, __LINE__, #x, (int)r_); \
            exit(1);                                                            \
        }                                                                       \
    } while (0)

typedef CUresult (*htod_fn)(CUdeviceptr, const void *, size_t, CUstream);
typedef CUresult (*dtod_fn)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
typedef CUresult (*evrec_fn)(CUevent, CUstream);
typedef CUresult (*swe_fn)(CUstream, CUevent, unsigned int);
typedef CUresult (*w64_fn)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
typedef CUresult (*ctxset_fn)(CUcontext);
typedef CUresult (*pctx_fn)(CUcontext *, CUdevice);

static htod_fn p_htod;
static dtod_fn p_dtod;
static evrec_fn p_evrec;
static swe_fn p_swe;
static w64_fn p_w64;
static ctxset_fn p_ctxset;
static pctx_fn p_pctx;

static void *entry(const char *sym)
{
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult q;
    CK(cudaGetDriverEntryPointByVersion(sym, &fn, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || !fn) {
        fprintf(stderr, "no driver entry point %s\n", sym);
        exit(1);
    }
    return fn;
}

static size_t CHUNK = 64 << 10;
#define MAXCHUNK (8u << 20)
#define BATCH 32
#define REPS 3000

static int ngpu;
static char *host;          /* pinned source */
static char *host_alloc, *host_reg;
static char *dst0;          /* on gpu0 */
static char *stage[8];      /* on each via */
static cudaStream_t s_a[8], s_b[8];
static cudaEvent_t ev_hop[8], ev_done[8];
static volatile uint64_t *flags; /* host-mapped, one per via */
static CUcontext ctx[8];

static void issue(int variant, int v, uint64_t seq)
{
    switch (variant) {
    case 0:
        CK(cudaSetDevice(v));
        CK(cudaMemcpyAsync(stage[v], host, CHUNK, cudaMemcpyDefault, s_a[v]));
        CK(cudaEventRecord(ev_hop[v], s_a[v]));
        CK(cudaStreamWaitEvent(s_b[v], ev_hop[v], 0));
        CK(cudaMemcpyPeerAsync(dst0, 0, stage[v], v, CHUNK, s_b[v]));
        CK(cudaEventRecord(ev_done[v], s_b[v]));
        break;
    case 1:
        DK(p_htod((CUdeviceptr)stage[v], host, CHUNK, (CUstream)s_a[v]));
        DK(p_evrec((CUevent)ev_hop[v], (CUstream)s_a[v]));
        DK(p_swe((CUstream)s_b[v], (CUevent)ev_hop[v], 0));
        DK(p_dtod((CUdeviceptr)dst0, (CUdeviceptr)stage[v], CHUNK, (CUstream)s_b[v]));
        DK(p_w64((CUstream)s_b[v], (CUdeviceptr)(uintptr_t)&flags[v], seq, 0));
        break;
    case 2:
        DK(p_htod((CUdeviceptr)stage[v], host, CHUNK, (CUstream)s_a[v]));
        DK(p_dtod((CUdeviceptr)dst0, (CUdeviceptr)stage[v], CHUNK, (CUstream)s_a[v]));
        DK(p_w64((CUstream)s_a[v], (CUdeviceptr)(uintptr_t)&flags[v], seq, 0));
        break;
    }
}

static void drain_via(int v)
{
    CK(cudaSetDevice(v));
    CK(cudaStreamSynchronize(s_a[v]));
    CK(cudaStreamSynchronize(s_b[v]));
}

typedef struct job {
    int variant;
    int vias[8];
    int nvia;
    double us; /* time inside issue() */
    int count;
    pthread_barrier_t *bar;
} job_t;

static void *run_job(void *arg)
{
    job_t *j = arg;
    if (j->variant > 0)
        DK(p_ctxset(ctx[j->vias[0]]));
    if (j->bar)
        pthread_barrier_wait(j->bar);
    uint64_t seq = 1;
    for (int r = 0; r < REPS / BATCH; r++) {
        double t0 = mma_now_us();
        for (int b = 0; b < BATCH; b++) {
            int v = j->vias[b % j->nvia];
            if (j->variant > 0 && j->nvia > 1)
                DK(p_ctxset(ctx[v]));
            issue(j->variant, v, seq++);
            j->count++;
        }
        j->us += mma_now_us() - t0;
        for (int i = 0; i < j->nvia; i++)
            drain_via(j->vias[i]);
    }
    return NULL;
}

static const char *vname[] = {"rt-2stream (today)", "drv-2stream + flag", "drv-1stream + flag"};

int main(void)
{
    CK(cudaGetDeviceCount(&ngpu));
    if (ngpu < 2) {
        printf("mma-callcost: needs 2+ GPUs, found %d\n", ngpu);
        return 77;
    }
    if (ngpu > 8)
        ngpu = 8;
    p_htod = (htod_fn)entry("cuMemcpyHtoDAsync");
    p_dtod = (dtod_fn)entry("cuMemcpyDtoDAsync");
    p_evrec = (evrec_fn)entry("cuEventRecord");
    p_swe = (swe_fn)entry("cuStreamWaitEvent");
    p_w64 = (w64_fn)entry("cuStreamWriteValue64");
    p_ctxset = (ctxset_fn)entry("cuCtxSetCurrent");
    p_pctx = (pctx_fn)entry("cuDevicePrimaryCtxRetain");
    CK(cudaHostAlloc((void **)&host_alloc, MAXCHUNK, cudaHostAllocPortable | cudaHostAllocMapped));
    host = host_alloc;
    /* like mmad's: client memory mapped from a memfd, then registered */
    host_reg = mmap(NULL, MAXCHUNK, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (host_reg == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    CK(cudaHostRegister(host_reg, MAXCHUNK, cudaHostRegisterPortable));
    CK(cudaHostAlloc((void **)&flags, 64 * sizeof(uint64_t), cudaHostAllocPortable | cudaHostAllocMapped));
    CK(cudaSetDevice(0));
    CK(cudaMalloc((void **)&dst0, MAXCHUNK));
    for (int v = 0; v < ngpu; v++) {
        CK(cudaSetDevice(v));
        for (int p = 0; p < ngpu; p++)
            if (p != v) {
                cudaError_t e = cudaDeviceEnablePeerAccess(p, 0);
                if (e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled)
                    CK(e);
                (void)cudaGetLastError();
            }
        CK(cudaMalloc((void **)&stage[v], MAXCHUNK));
        CK(cudaStreamCreateWithFlags(&s_a[v], cudaStreamNonBlocking));
        CK(cudaStreamCreateWithFlags(&s_b[v], cudaStreamNonBlocking));
        CK(cudaEventCreateWithFlags(&ev_hop[v], cudaEventDisableTiming));
        CK(cudaEventCreateWithFlags(&ev_done[v], cudaEventDisableTiming));
        DK(p_pctx(&ctx[v], v));
    }
    int nvia = ngpu - 1;
    printf("mma-callcost: %d GPUs, relay chunks of %d KiB into gpu0 through gpu1..gpu%d, %d chunks per case\n",
           ngpu, (int)(CHUNK >> 10), nvia, REPS);
    printf("%-22s %-22s %12s %14s\n", "variant", "threads", "us/chunk", "chunks/ms all");
    for (int variant = 0; variant < 3; variant++) {
        /* one thread, round-robin */
        job_t one = {.variant = variant, .nvia = nvia};
        for (int i = 0; i < nvia; i++)
            one.vias[i] = i + 1;
        run_job(&one); /* warm-up */
        one.us = 0;
        one.count = 0;
        run_job(&one);
        printf("%-22s %-22s %12.2f %14.1f\n", vname[variant], "1 (round-robin)", one.us / one.count,
               one.count / one.us * 1000.0);
        /* one thread per via */
        pthread_t th[8];
        job_t js[8];
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, (unsigned)nvia);
        double t0 = mma_now_us();
        for (int i = 0; i < nvia; i++) {
            js[i] = (job_t){.variant = variant, .nvia = 1, .bar = &bar};
            js[i].vias[0] = i + 1;
            pthread_create(&th[i], NULL, run_job, &js[i]);
        }
        double worst = 0, sum = 0;
        int cnt = 0;
        for (int i = 0; i < nvia; i++) {
            pthread_join(th[i], NULL);
            if (js[i].us > worst)
                worst = js[i].us;
            sum += js[i].us;
            cnt += js[i].count;
        }
        (void)t0;
        pthread_barrier_destroy(&bar);
        char lbl[32];
        snprintf(lbl, sizeof lbl, "%d (one per via)", nvia);
        printf("%-22s %-22s %12.2f %14.1f\n", vname[variant], lbl, sum / cnt, cnt / worst * 1000.0);
    }
    /* chunk size and host memory kind, one thread, 8 chunks per batch */
    printf("%-22s %-10s %-22s %12s\n", "variant", "chunk", "host memory", "us/chunk");
    size_t sizes[] = {64u << 10, 1u << 20, 8u << 20};
    for (int hk = 0; hk < 2; hk++)
        for (size_t si = 0; si < 3; si++)
            for (int variant = 0; variant < 2; variant++) {
                CHUNK = sizes[si];
                host = hk ? host_reg : host_alloc;
                job_t one = {.variant = variant, .nvia = nvia};
                for (int i = 0; i < nvia; i++)
                    one.vias[i] = i + 1;
                double us = 0;
                int count = 0;
                for (int r = 0; r < 40; r++) {
                    double t0 = mma_now_us();
                    for (int b = 0; b < 6; b++) {
                        int v = one.vias[b % nvia];
                        if (variant > 0)
                            DK(p_ctxset(ctx[v]));
                        issue(variant, v, (uint64_t)r * 16 + (uint64_t)b + 5000000);
                        count++;
                    }
                    if (r > 0)
                        us += mma_now_us() - t0;
                    else
                        count = 0;
                    for (int i = 0; i < nvia; i++)
                        drain_via(one.vias[i]);
                }
                char cl[32];
                snprintf(cl, sizeof cl, "%zu KiB", CHUNK >> 10);
                printf("%-22s %-10s %-22s %12.2f\n", vname[variant], cl, hk ? "registered mmap" : "cudaHostAlloc",
                       us / count);
            }
    CHUNK = 64 << 10;
    host = host_alloc;
    /* polling a completed chunk */
    CK(cudaSetDevice(1));
    CK(cudaEventRecord(ev_done[1], s_b[1]));
    CK(cudaEventSynchronize(ev_done[1]));
    double t0 = mma_now_us();
    for (int i = 0; i < 100000; i++) {
        CK(cudaSetDevice(1 + i % nvia));
        CK(cudaEventQuery(ev_done[1 + i % nvia]));
    }
    double t1 = mma_now_us();
    volatile uint64_t sink = 0;
    for (int i = 0; i < 100000; i++)
        sink += flags[1 + i % nvia];
    double t2 = mma_now_us();
    printf("poll: setDevice+cudaEventQuery %.3f us, host flag read %.4f us\n", (t1 - t0) / 1e5, (t2 - t1) / 1e5);
    /* GPU-side latency of a flag write: issue a tiny chain, spin on the flag */
    double lat[200];
    for (int i = 0; i < 200; i++) {
        uint64_t want = 1000000 + (uint64_t)i;
        DK(p_ctxset(ctx[1]));
        double a = mma_now_us();
        issue(2, 1, want);
        while (flags[1] != want)
            ;
        lat[i] = mma_now_us() - a;
    }
    for (int i = 1; i < 200; i++)
        for (int k = i; k > 0 && lat[k] < lat[k - 1]; k--) {
            double tmp = lat[k];
            lat[k] = lat[k - 1];
            lat[k - 1] = tmp;
        }
    printf("drv-1stream 64 KiB relay, issue to flag seen: p50 %.1f us, p99 %.1f us\n", lat[100], lat[198]);
    return 0;
}
