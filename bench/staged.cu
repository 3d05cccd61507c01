/* mma-staged: what a staged relay can reach on the GPUs alone, without
 * mmad's engine. A measuring tool for the engine's design (see
 * bench/results/), not the product's data path.
 *
 * mmad's staged copies (256 MiB and up) reach ~94% of the box ceiling
 * copy by copy, and each relay path runs ~5% below what a copy engine
 * gets natively under that ceiling. Is that the GPUs (the NVLink hops
 * sharing copy engines with the PCIe legs) or the engine thread (issue
 * times, polling)? Here every call is issued before a gate opens (a spin
 * kernel on gpu0 that every stream waits for), so the figures carry no
 * issue cost at all. One H2D copy of S bytes into gpu0: gpu0's copy engine
 * moves a quarter directly; gpus 1..3 a quarter each in CHUNK pieces, each
 * through one of SLOTS staging buffers in the via GPU's memory, then over
 * NVLink into gpu0, the hop done
 *   target   by gpu0's copy engine (a stream of gpu0 pulls; mmad's default)
 *   via      by the via GPU's copy engine (a second stream there pushes)
 *   kernel   by a copy kernel on gpu0 (mmad's relay kernel, 16 blocks), so
 *            no copy engine carries a hop
 * against
 *   ce4      every GPU's copy engine moving S/4 into its own memory (the
 *            ceiling for these bytes), and
 *   onehop   gpus 1..3 each a relay kernel reading host memory and writing
 *            gpu0 (mmad below 128 MiB), gpu0 its copy engine,
 * and one mode not behind the gate:
 *   dyn2     as mmad issues: every path (the direct one too) in CHUNK
 *            pieces, two in flight a path, the next issued once the oldest
 *            is seen done (an event after it, queried); hops as in target.
 *   dyn2f    the same, each chunk's end a host word its stream writes
 *            (cuStreamWriteValue64, as mmad's --completion=flags), polled
 *            (without the memory barrier before the write the driver
 *            refused it on 4x H200: CUDA_ERROR_INVALID_VALUE)
 *   dyn2i    dyn2 with the chunks dealt out in turn (path p takes chunks
 *            p, p+4, p+8, ... of the copy, as mmad's paths take a copy's
 *            chunks from one queue) instead of each path its own quarter
 * Each mode runs on each kind of pinned host memory (see host_alloc) and
 * into each kind of destination (dsts: this process's allocation, or
 * another process's opened through cudaIpc, as mmad sees a client's), all
 * in turns, ROUNDS times; each figure is the median, and "%ce4" is the
 * median of each round's time against that round's ce4 on cudaHostAlloc'ed
 * memory. Every configuration's destination is checked against the host
 * after its last run.
 * At most 64 chunks a path: every call waits behind the gate, and a stream
 * holds only so many before the issuing call would block.
 *   mma-staged [size_MiB=256] [chunk_MiB=8] [rounds=7] [slots=4] */
#include <cuda.h>
#include <cuda_runtime_api.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cuda_check.h"
#include "relay_kernel.h"
#include "util.h"

#define NG 4
#define MAXSLOTS 16
#define KBLOCKS 16

enum { M_CE4, M_TARGET, M_VIA, M_KERNEL, M_ONEHOP, M_DYN, M_DYNF, M_DYNI, NM };
static const char *mode_name[NM] = {"ce4", "target", "via", "kernel", "onehop", "dyn2", "dyn2f", "dyn2i"};

static size_t S, Q, CH; /* copy, quarter, chunk */
static int slots;
/* The host buffer, S bytes, pinned, portable, mapped, of one of these kinds:
 *   alloc    cudaHostAlloc
 *   memfd    a memfd mapping, cudaHostRegister'ed (what mma_host_alloc gives)
 * (On 4x H200 the two ran alike, and so did a memfd with MADV_HUGEPAGE,
 * where shmem THP was off; MFD_HUGETLB had no pages reserved: commit
 * d63d44e's mma-staged, bench/results/2026-11-27-4xH200-staged/.) */
enum { H_ALLOC, H_MEMFD, NH };
static const char *host_name[NH] = {"alloc", "memfd"};
static char *hosts[NH];
static char *host; /* the one in use */
/* The destination, S bytes of gpu0's memory, as GPU g addresses it:
 *   local  cudaMalloc'ed here (peer access reaches it from every GPU)
 *   ipc    another process's allocation (a child's, as a client's is to
 *          mmad), opened through cudaIpc on every GPU, as mmad does */
enum { D_LOCAL, D_IPC, ND };
static const char *dst_name[ND] = {"local", "ipc"};
static char *dsts[ND][NG];
static char **dstp; /* the kind in use */
#define dst0 dstp[0]
static char *own[NG];                   /* ce4: each GPU's own S/4 (gpu0's is dst0) */
static char *stage[NG];                 /* via GPUs: slots x CH */
static cudaStream_t leg[NG];            /* the PCIe legs (gpu0's: the direct quarter) */
static cudaStream_t push[NG], pull[NG]; /* via v's hop: on gpu v (push), on gpu0 (pull) */
static cudaEvent_t ready[NG][MAXSLOTS]; /* a slot's PCIe leg done */
static cudaEvent_t freed[2][NG][MAXSLOTS]; /* a slot's hop done: [0] on gpu0 (pull), [1] on the via GPU */
/* An event belongs to one GPU: go and t_end[0][*] are gpu0's, started[g]
 * and t_end[1][g] gpu g's (a path's end is recorded where its last call runs) */
static cudaEvent_t go, started[NG], t_end[2][NG];
static cudaStream_t gate_st;
static volatile int *gate_flag;

__global__ void k_gate(volatile int *flag)
{
    while (*flag == 0)
        ;
}

/* Wait until every GPU has finished all it was given. */
static void sync_all(void)
{
    for (int g = 0; g < NG; g++) {
        CK(cudaSetDevice(g));
        CK(cudaDeviceSynchronize());
    }
}

/* Every stream of a run waits for the gate, shut until gate_open(). */
static void gate_shut(void)
{
    *gate_flag = 0;
    __sync_synchronize();
    CK(cudaSetDevice(0));
    k_gate<<<1, 1, 0, gate_st>>>(gate_flag);
    CK(cudaGetLastError());
    CK(cudaEventRecord(go, gate_st));
    for (int g = 0; g < NG; g++) {
        CK(cudaSetDevice(g));
        CK(cudaStreamWaitEvent(leg[g], go, 0));
        CK(cudaEventRecord(started[g], leg[g]));
        CK(cudaStreamWaitEvent(push[g], go, 0));
        CK(cudaSetDevice(0));
        CK(cudaStreamWaitEvent(pull[g], go, 0));
    }
}

static void gate_open(void)
{
    __sync_synchronize();
    *gate_flag = 1;
    __sync_synchronize();
}

/* Whether path g's last call runs on gpu0 (a pull) in mode m. */
static int ends_on_gpu0(int m, int g)
{
    return g == 0 || m == M_TARGET || m == M_KERNEL;
}

/* Issue mode m's whole copy behind the gate; t_end[..][g] marks when path
 * g is done. */
static void issue(int m)
{
    if (m == M_CE4) {
        for (int g = 0; g < NG; g++) {
            CK(cudaSetDevice(g));
            CK(cudaMemcpyAsync(own[g], host + g * Q, Q, cudaMemcpyHostToDevice, leg[g]));
            CK(cudaEventRecord(t_end[!ends_on_gpu0(m, g)][g], leg[g]));
        }
        return;
    }
    CK(cudaSetDevice(0));
    CK(cudaMemcpyAsync(dst0, host, Q, cudaMemcpyHostToDevice, leg[0]));
    CK(cudaEventRecord(t_end[0][0], leg[0]));
    if (m == M_ONEHOP) {
        for (int v = 1; v < NG; v++) {
            CK(cudaSetDevice(v));
            CK(mmad_relay_kernel_launch(dstp[v] + v * Q, host + v * Q, Q, KBLOCKS, leg[v]));
            CK(cudaEventRecord(t_end[1][v], leg[v]));
        }
        return;
    }
    size_t nch = (Q + CH - 1) / CH;
    /* chunk by chunk across the via GPUs, so that each starts at once */
    for (size_t k = 0; k < nch; k++)
        for (int v = 1; v < NG; v++) {
            int sl = (int)(k % (size_t)slots);
            size_t off = v * Q + k * CH, n = Q - k * CH < CH ? Q - k * CH : CH;
            char *st = stage[v] + (size_t)sl * CH;
            CK(cudaSetDevice(v));
            int pushed = m == M_VIA;
            if (k >= (size_t)slots)
                CK(cudaStreamWaitEvent(leg[v], freed[pushed][v][sl], 0));
            CK(cudaMemcpyAsync(st, host + off, n, cudaMemcpyHostToDevice, leg[v]));
            CK(cudaEventRecord(ready[v][sl], leg[v]));
            cudaStream_t h = pushed ? push[v] : pull[v];
            CK(cudaSetDevice(pushed ? v : 0));
            CK(cudaStreamWaitEvent(h, ready[v][sl], 0));
            if (m == M_KERNEL)
                CK(mmad_relay_kernel_launch(dst0 + off, st, n, KBLOCKS, h));
            else
                CK(cudaMemcpyAsync(dstp[pushed ? v : 0] + off, st, n, cudaMemcpyDeviceToDevice, h));
            CK(cudaEventRecord(freed[pushed][v][sl], h));
            if (k == nch - 1)
                CK(cudaEventRecord(t_end[pushed][v], h));
        }
}

/* cuStreamWriteValue64, fetched at run time (the runtime is linked, not
 * the driver), and the host words the dyn2f chunks' marks write. */
static CUresult (*write64)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
static volatile uint64_t *flags; /* [NG][MAXSLOTS] */
static uint64_t flag_seq;

/* dyn2: as mmad issues a copy: every path (gpu0's direct one too) in CH
 * chunks, at most DYN_DEPTH in flight a path, the next issued once the
 * oldest is seen done (cudaEventQuery, polled); relays hop as in target.
 * Returns wall µs; end_us: when each path was seen done. */
#define DYN_DEPTH 2
static cudaEvent_t dyn_done[NG][MAXSLOTS]; /* gpu0's: a path's chunk done */

/* Mark path g's chunk in slot sl done on st (a stream of gpu0, current);
 * 0, or the driver's error for a flag that could not be queued. */
static int mark(int m, int g, int sl, cudaStream_t st, unsigned wflags, uint64_t want[NG][MAXSLOTS])
{
    if (m != M_DYNF) {
        CK(cudaEventRecord(dyn_done[g][sl], st));
        return 0;
    }
    want[g][sl] = ++flag_seq;
    return (int)write64((CUstream)st, (CUdeviceptr)(uintptr_t)&flags[g * MAXSLOTS + sl], want[g][sl], wflags);
}

static double run_dyn(int m, double *end_us)
{
    /* how a chunk's end is marked: an event (dyn2, dyn2i), or a host word
     * written by the stream, as mmad's --completion=flags (dyn2f) */
    unsigned wflags = CU_STREAM_WRITE_VALUE_DEFAULT;
    int dealt = m == M_DYNI; /* path g's k-th chunk is the copy's chunk k * NG + g */
    uint64_t want[NG][MAXSLOTS];
    sync_all();
    size_t nch = (Q + CH - 1) / CH, next[NG] = {0}, oldest[NG] = {0};
    int left = NG, err = 0;
    double t0 = mma_now_us();
    while (left > 0)
        for (int g = 0; g < NG; g++) {
            if (oldest[g] == nch)
                continue;
            if (oldest[g] < next[g]) {
                int sl = (int)(oldest[g] % (size_t)slots);
                cudaError_t q = cudaSuccess;
                if (m != M_DYNF) {
                    CK(cudaSetDevice(0));
                    q = cudaEventQuery(dyn_done[g][sl]);
                } else if (__atomic_load_n(&flags[g * MAXSLOTS + sl], __ATOMIC_ACQUIRE) != want[g][sl]) {
                    q = cudaErrorNotReady;
                }
                if (q == cudaErrorNotReady) {
                    (void)cudaGetLastError();
                } else {
                    CK(q);
                    if (++oldest[g] == nch) {
                        end_us[g] = mma_now_us() - t0;
                        left--;
                        continue;
                    }
                }
            }
            while (next[g] < nch && next[g] - oldest[g] < DYN_DEPTH) {
                size_t k = next[g]++, off = dealt ? (k * NG + g) * CH : g * Q + k * CH;
                size_t n = Q - k * CH < CH ? Q - k * CH : CH; /* dyn2i: Q is a multiple of CH */
                int sl = (int)(k % (size_t)slots);
                if (g == 0) {
                    CK(cudaSetDevice(0));
                    CK(cudaMemcpyAsync(dst0 + off, host + off, n, cudaMemcpyHostToDevice, leg[0]));
                    if ((err = mark(m, 0, sl, leg[0], wflags, want)) != 0)
                        goto failed;
                    continue;
                }
                char *st = stage[g] + (size_t)sl * CH;
                CK(cudaSetDevice(g));
                CK(cudaMemcpyAsync(st, host + off, n, cudaMemcpyHostToDevice, leg[g]));
                CK(cudaEventRecord(ready[g][sl], leg[g]));
                CK(cudaSetDevice(0));
                CK(cudaStreamWaitEvent(pull[g], ready[g][sl], 0));
                CK(cudaMemcpyAsync(dst0 + off, st, n, cudaMemcpyDeviceToDevice, pull[g]));
                if ((err = mark(m, g, sl, pull[g], wflags, want)) != 0)
                    goto failed;
            }
        }
    return mma_now_us() - t0;
failed:
    /* what was queued runs out; the mode is reported as not run */
    fprintf(stderr, "mma-staged: %s: cuStreamWriteValue64 failed (CUresult %d) on a stream of gpu0\n", mode_name[m],
            err);
    sync_all();
    return -1;
}

/* One run of mode m: wall µs from the gate's opening until every path is
 * done (host clock), and each path's end (µs after the gate's event). */
static double run(int m, double *end_us)
{
    if (m >= M_DYN)
        return run_dyn(m, end_us);
    sync_all();
    gate_shut();
    issue(m);
    double t0 = mma_now_us();
    gate_open();
    for (int g = 0; g < NG; g++) {
        int on0 = ends_on_gpu0(m, g);
        CK(cudaSetDevice(on0 ? 0 : g));
        CK(cudaEventSynchronize(t_end[!on0][g]));
    }
    double us = mma_now_us() - t0;
    for (int g = 0; g < NG; g++) {
        int on0 = ends_on_gpu0(m, g);
        float ms = 0;
        CK(cudaSetDevice(on0 ? 0 : g));
        CK(cudaEventElapsedTime(&ms, on0 ? go : started[g], t_end[!on0][g]));
        end_us[g] = ms * 1e3;
    }
    return us;
}

/* After a run of m: its destination against the host. */
static int check(int m)
{
    char *h = (char *)malloc(S);
    if (!h)
        exit(1);
    int ok = 1;
    if (m == M_CE4) {
        for (int g = 0; g < NG && ok; g++) {
            CK(cudaSetDevice(g));
            CK(cudaMemcpy(h, own[g], Q, cudaMemcpyDeviceToHost));
            ok = memcmp(h, host + g * Q, Q) == 0;
        }
    } else {
        CK(cudaSetDevice(0));
        CK(cudaMemcpy(h, dst0, S, cudaMemcpyDeviceToHost));
        ok = memcmp(h, host, S) == 0;
    }
    free(h);
    if (!ok)
        fprintf(stderr, "mma-staged: %s: the destination's bytes differ from the host's\n", mode_name[m]);
    return ok;
}

static char *host_alloc(int kind)
{
    void *p = NULL;
    if (kind == H_ALLOC) {
        CK(cudaHostAlloc(&p, S, cudaHostAllocPortable | cudaHostAllocMapped));
        return (char *)p;
    }
    int fd = memfd_create(host_name[kind], MFD_CLOEXEC);
    if (fd < 0 || ftruncate(fd, (off_t)S) != 0) {
        printf("# host memory %s: not here (%s)\n", host_name[kind], strerror(errno));
        if (fd >= 0)
            close(fd);
        return NULL;
    }
    p = mmap(NULL, S, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        printf("# host memory %s: not here (mmap: %s)\n", host_name[kind], strerror(errno));
        return NULL;
    }
    memset(p, 0, S); /* the pages exist before they are pinned */
    CK(cudaHostRegister(p, S, cudaHostRegisterPortable | cudaHostRegisterMapped));
    return (char *)p;
}

/* A child process owns the ipc destination, as a client owns what it
 * hands mmad: forked before this process touches CUDA (a forked child
 * cannot use it after), it allocates S bytes on gpu0, sends the handle
 * down `out` and holds the memory until `hold` closes. */
static void ipc_owner(int out, int hold)
{
    void *p = NULL;
    cudaIpcMemHandle_t h;
    memset(&h, 0, sizeof h);
    if (cudaSetDevice(0) != cudaSuccess || cudaMalloc(&p, S) != cudaSuccess || cudaIpcGetMemHandle(&h, p) != cudaSuccess)
        memset(&h, 0, sizeof h); /* all zero: the parent reports it */
    if (write(out, &h, sizeof h) != (ssize_t)sizeof h)
        _exit(1);
    char c;
    while (read(hold, &c, 1) > 0)
        ;
    _exit(0);
}

static void clear(void)
{
    for (int g = 0; g < NG; g++) {
        CK(cudaSetDevice(g));
        CK(cudaMemset(own[g], 0, Q));
        CK(cudaDeviceSynchronize());
    }
    CK(cudaSetDevice(0));
    CK(cudaMemset(dst0, 0, S));
    CK(cudaDeviceSynchronize());
}

int main(int argc, char **argv)
{
    S = (size_t)(argc > 1 ? atoi(argv[1]) : 256) << 20;
    CH = (size_t)(argc > 2 ? atof(argv[2]) * 1048576.0 : 8 << 20);
    int rounds = argc > 3 ? atoi(argv[3]) : 7;
    slots = argc > 4 ? atoi(argv[4]) : 4;
    if (S < ((size_t)4 << 20) || S % ((size_t)4 << 16) || CH < 65536 || CH % 65536 || rounds < 1 || rounds > 64 ||
        slots < DYN_DEPTH || slots > MAXSLOTS || S / NG / CH > 64) {
        fprintf(stderr, "usage: mma-staged [size_MiB>=4, a multiple of 256 KiB=256] [chunk_MiB, a multiple of 64 KiB=8] "
                        "[rounds 1-64=7] [slots %d-%d=4]; at most 64 chunks a path\n",
                DYN_DEPTH, MAXSLOTS);
        return 2;
    }
    /* A kernel's first launch may load its module, which waits for the GPU:
     * behind a shut gate that waits forever. Load every module up front. */
    setenv("CUDA_MODULE_LOADING", "EAGER", 1);
    setvbuf(stdout, NULL, _IOLBF, 0);
    int hpipe[2], hold[2];
    if (pipe(hpipe) != 0 || pipe(hold) != 0) {
        perror("mma-staged: pipe");
        return 1;
    }
    pid_t owner = fork();
    if (owner < 0) {
        perror("mma-staged: fork");
        return 1;
    }
    if (owner == 0) {
        close(hpipe[0]);
        close(hold[1]);
        ipc_owner(hpipe[1], hold[0]);
    }
    close(hpipe[1]);
    close(hold[0]);
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < NG) {
        fprintf(stderr, "mma-staged: needs %d GPUs, found %d\n", NG, n);
        return 77;
    }
    Q = S / NG;
    for (int h = 0; h < NH; h++) {
        hosts[h] = host_alloc(h);
        if (!hosts[h])
            continue;
        for (size_t i = 0; i < S / 4; i++)
            ((uint32_t *)hosts[h])[i] = (uint32_t)(i * 2654435761u);
    }
    host = hosts[H_ALLOC];
    CK(cudaHostAlloc((void **)&gate_flag, sizeof(int), cudaHostAllocPortable | cudaHostAllocMapped));
    CK(cudaHostAlloc((void **)&flags, NG * MAXSLOTS * sizeof(uint64_t), cudaHostAllocPortable | cudaHostAllocMapped));
    memset((void *)flags, 0, NG * MAXSLOTS * sizeof(uint64_t));
    void *fn = NULL;
    cudaDriverEntryPointQueryResult found;
    CK(cudaGetDriverEntryPointByVersion("cuStreamWriteValue64", &fn, 12000, cudaEnableDefault, &found));
    if (found != cudaDriverEntryPointSuccess || !fn) {
        fprintf(stderr, "mma-staged: no cuStreamWriteValue64 in this driver\n");
        return 77;
    }
    write64 = (CUresult(*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int))fn;
    for (int g = 0; g < NG; g++) {
        CK(cudaSetDevice(g));
        for (int p = 0; p < NG; p++) {
            if (p != g && !peer_on(g, p, "mma-staged: "))
                return 77;
        }
        CK(cudaStreamCreateWithFlags(&leg[g], cudaStreamNonBlocking));
        CK(cudaStreamCreateWithFlags(&push[g], cudaStreamNonBlocking));
        CK(cudaEventCreate(&t_end[1][g]));
        CK(cudaEventCreate(&started[g]));
        for (int k = 0; k < slots; k++) {
            CK(cudaEventCreateWithFlags(&ready[g][k], cudaEventDisableTiming));
            CK(cudaEventCreateWithFlags(&freed[1][g][k], cudaEventDisableTiming));
        }
        if (g) {
            CK(cudaMalloc((void **)&own[g], Q));
            CK(cudaMalloc((void **)&stage[g], (size_t)slots * CH));
        }
    }
    CK(cudaSetDevice(0));
    CK(cudaMalloc((void **)&dsts[D_LOCAL][0], S));
    for (int g = 1; g < NG; g++)
        dsts[D_LOCAL][g] = dsts[D_LOCAL][0];
    cudaIpcMemHandle_t ih, zero;
    memset(&zero, 0, sizeof zero);
    if (read(hpipe[0], &ih, sizeof ih) != (ssize_t)sizeof ih || !memcmp(&ih, &zero, sizeof ih)) {
        fprintf(stderr, "mma-staged: the child could not allocate or export gpu0 memory\n");
        return 1;
    }
    for (int g = 0; g < NG; g++) {
        CK(cudaSetDevice(g));
        CK(cudaIpcOpenMemHandle((void **)&dsts[D_IPC][g], ih, cudaIpcMemLazyEnablePeerAccess));
    }
    CK(cudaSetDevice(0));
    dstp = dsts[D_LOCAL];
    CK(cudaMalloc((void **)&own[0], Q));
    CK(cudaStreamCreateWithFlags(&gate_st, cudaStreamNonBlocking));
    CK(cudaEventCreate(&go));
    for (int g = 0; g < NG; g++) {
        CK(cudaStreamCreateWithFlags(&pull[g], cudaStreamNonBlocking));
        CK(cudaEventCreate(&t_end[0][g]));
        for (int k = 0; k < slots; k++) {
            CK(cudaEventCreateWithFlags(&freed[0][g][k], cudaEventDisableTiming));
            CK(cudaEventCreateWithFlags(&dyn_done[g][k], cudaEventDisableTiming));
        }
    }
    /* and each kernel once on every GPU, the gate open */
    *gate_flag = 1;
    for (int g = 0; g < NG; g++) {
        CK(cudaSetDevice(g));
        k_gate<<<1, 1, 0, leg[g]>>>(gate_flag);
        CK(cudaGetLastError());
        CK(mmad_relay_kernel_launch(own[g], host, 65536, KBLOCKS, leg[g]));
        CK(cudaDeviceSynchronize());
    }
    struct cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("# mma-staged on %d x %s: one H2D copy of %zu MiB into gpu0, a quarter a path, %.2f MiB chunks, %d "
           "staging slots a via GPU, every call issued before a gate opens; %d rounds in turns, medians\n",
           NG, p.name, S >> 20, CH / 1048576.0, slots, rounds);

    /* configurations: every mode on every kind of host memory and
     * destination; ce4 (each GPU's own memory) once a host kind */
    enum { NCFG = NM * NH * ND };
    static double us[NCFG][64], pct[NCFG][64], end[NCFG][64][NG];
    double e[NG];
    int cfg[NCFG], nc = 0, broken[NCFG] = {0}; /* (h * ND + d) * NM + m; broken: could not run */
    for (int h = 0; h < NH; h++)
        for (int d = 0; d < ND; d++)
            for (int m = 0; m < NM; m++)
                if (hosts[h] && (m != M_CE4 || d == D_LOCAL) && (m != M_DYNI || Q % CH == 0))
                    cfg[nc++] = (h * ND + d) * NM + m;
#define CFG_H(c) ((c) / NM / ND)
#define CFG_D(c) ((c) / NM % ND)
#define CFG_M(c) ((c) % NM)
    for (int r = -1; r < rounds; r++) /* round -1 warms up */
        for (int i = 0; i < nc; i++) {
            host = hosts[CFG_H(cfg[i])];
            dstp = dsts[CFG_D(cfg[i])];
            if (broken[i])
                continue;
            double t = run(CFG_M(cfg[i]), e);
            broken[i] = t < 0;
            if (r < 0)
                continue;
            us[i][r] = t;
            memcpy(end[i][r], e, sizeof e);
        }
    /* cfg[0] is ce4 on cudaHostAlloc'ed memory: every row against it */
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < nc; i++)
            pct[i][r] = broken[i] ? 0 : 100.0 * us[0][r] / us[i][r];
    printf("%-6s %-6s %-8s %10s %9s %8s   path ends, us after the gate (gpu0 direct, then via gpu1..3)\n", "host",
           "dst", "mode", "wall us", "GB/s", "%ce4");
    for (int i = 0; i < nc; i++) {
        if (broken[i]) {
            printf("%-6s %-6s %-8s   not run (see the error above)\n", host_name[CFG_H(cfg[i])],
                   dst_name[CFG_D(cfg[i])], mode_name[CFG_M(cfg[i])]);
            continue;
        }
        qsort(us[i], (size_t)rounds, sizeof(double), mma_cmp_double);
        qsort(pct[i], (size_t)rounds, sizeof(double), mma_cmp_double);
        double t = us[i][rounds / 2];
        printf("%-6s %-6s %-8s %10.1f %9.1f %7.1f%%  ", host_name[CFG_H(cfg[i])], dst_name[CFG_D(cfg[i])],
               mode_name[CFG_M(cfg[i])], t, S / t / 1e3, pct[i][rounds / 2]);
        for (int g = 0; g < NG; g++) {
            double col[64];
            for (int r = 0; r < rounds; r++)
                col[r] = end[i][r][g];
            qsort(col, (size_t)rounds, sizeof(double), mma_cmp_double);
            printf(" %8.1f", col[rounds / 2]);
        }
        printf("\n");
    }
    int bad = 0;
    for (int i = 0; i < nc; i++) {
        host = hosts[CFG_H(cfg[i])];
        dstp = dsts[CFG_D(cfg[i])];
        if (broken[i])
            continue;
        clear();
        run(CFG_M(cfg[i]), e);
        if (!check(CFG_M(cfg[i]))) {
            fprintf(stderr, "mma-staged: (%s host memory, %s destination)\n", host_name[CFG_H(cfg[i])],
                    dst_name[CFG_D(cfg[i])]);
            bad++;
        }
    }
    printf("bytes %s\n", bad ? "DIFFER" : "ok (every configuration's destination checked against the host)");
    close(hold[1]); /* the owner may go */
    waitpid(owner, NULL, 0);
    return bad ? 1 : 0;
}
