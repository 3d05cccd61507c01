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
 * The bytes of every run's last repetition are checked (ceil: gpu0's part).
 *
 * "hosts" mode (mma-kcopy REPS hosts) asks whether the kind of pinned host
 * memory changes what these ways move: mmad's relay kernels read (H2D) or
 * write (D2H) memory that libmma maps from a memfd and cudaHostRegisters,
 * where the static split above used cudaHostAlloc. In rounds, each kind in
 * turn, at 8 and 64 MiB: native, ceil, split (32 and 16 blocks) and k1@16.
 *   alloc    cudaHostAlloc (Portable | Mapped)
 *   memfd    memfd_create + mmap + cudaHostRegister, as mma_host_alloc
 *   memfd-thp  the same after madvise(MADV_HUGEPAGE) (shmem THP, where the
 *            kernel allows it: shmem_enabled is printed)
 *   anon-thp   private anonymous memory, 2 MiB aligned, MADV_HUGEPAGE,
 *            registered (not shareable; shows whether page size matters)
 *   numa     the driver's own pinned host memory: cuMemCreate on host NUMA
 *            node 0 with a POSIX fd handle (shareable), mapped for the CPU
 *            and every GPU
 *
 * "cold" mode (mma-kcopy REPS cold [GAP_US]) asks the same of copies after a
 * pause (10 ms unless given), as a sporadic KV fetch finds the box: one
 * native copy between gpu0 and each kind's memory, 2 and 8 MiB, each copy
 * after the pause, the kinds taken in turns copy by copy (so that drift
 * falls on all alike); per kind the median and p90 of REPS copies, and the
 * median against alloc's.
 *
 * "mix" mode (mma-kcopy REPS mix): can a peer's copy engine fill what its
 * relay kernel leaves of its link? A kernel's host reads carry ~92% of a
 * copy engine's on one link. On gpu1's link alone (link1), then the whole box
 * (box, a quarter direct): each peer's part goes partly by its kernel in one
 * hop and, at once on a second stream, a fraction (frac) by its copy engine
 * through its own memory, staged (host -> peer, then the NVLink hop; "nohop":
 * the staged bytes stay on the peer). link1 frac 1 nohop is the copy engine
 * alone, frac 0 the kernel alone; ceil rows are the same bytes' ceiling. */
#include <cuda.h> /* driver API types; cuMemcpyDtoDAsync is fetched at run time */
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>
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
enum { HOW_CE = 0, HOW_CEIL = -1, HOW_D2D = -2, HOW_PEER = -3, HOW_DRV = -4, HOW_MIX = -5 };
/* HOW_MIX (mix mode): each peer's part is copied by a kernel of mix_blocks
 * blocks in one hop and, at the same time on a second stream, mix_frac of it
 * by the peer's copy engine through its own memory (staged: host -> peer,
 * then the NVLink hop peer -> gpu0; D2H the reverse); mix_hop 0 leaves the
 * hop out (the staged bytes stay on the peer: what the link carries alone). */
static double mix_frac;
static int mix_blocks = 16, mix_hop = 1;

typedef CUresult (*dtod_fn)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
static dtod_fn drv_dtod;
/* The 4th column of a row: the host memory's kind in hosts mode. */
static const char *row_tag = "";
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
    cudaStream_t s2[MAXG]; /* mix mode: the peers' staged pieces */
} box_t;

/* ceil: every GPU moves its n/ngpu between its slice of host memory and its
 * own memory, on its own stream. */
/* GPU g's slice of n bytes in ceil: [*off, *off + *len), n/ngpu rounded
 * down to 4 KiB, the last GPU taking the rest. */
static void ceil_slice(const box_t *b, size_t n, int g, size_t *off, size_t *len)
{
    size_t part = (n / (size_t)b->ngpu) & ~(size_t)4095;
    *off = part * (size_t)g;
    *len = g == b->ngpu - 1 ? n - *off : part;
}

static void issue_ceil(box_t *b, int d, size_t n)
{
    for (int g = 0; g < b->ngpu; g++) {
        size_t off, len;
        ceil_slice(b, n, g, &off, &len);
        CK(cudaSetDevice(g));
        if (d == 0)
            CK(cudaMemcpyAsync(b->own[g] + off, b->host + off, len, cudaMemcpyHostToDevice, b->s[g]));
        else
            CK(cudaMemcpyAsync(b->host + off, b->own[g] + off, len, cudaMemcpyDeviceToHost, b->s[g]));
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
        else if (blocks == HOW_MIX) {
            size_t sp = (size_t)((double)part * mix_frac) & ~(size_t)4095, kp = part - sp;
            /* the staged piece first: H2D its hop then hides behind the kernel's
             * bytes; D2H its hop comes first, so too */
            if (sp && d == 0) {
                CK(cudaMemcpyAsync(b->own[k] + off, b->host + off, sp, cudaMemcpyHostToDevice, b->s2[k]));
                if (mix_hop)
                    CK(cudaMemcpyPeerAsync(b->dev + off, 0, b->own[k] + off, k, sp, b->s2[k]));
            } else if (sp) {
                if (mix_hop)
                    CK(cudaMemcpyPeerAsync(b->own[k] + off, k, b->dev + off, 0, sp, b->s2[k]));
                CK(cudaMemcpyAsync(b->host + off, b->own[k] + off, sp, cudaMemcpyDeviceToHost, b->s2[k]));
            }
            if (kp)
                CK(mmad_relay_kernel_launch(dst + sp, src + sp, kp, mix_blocks, b->s[k]));
        } else if (blocks == HOW_DRV)
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
        if (b->s2[g])
            CK(cudaStreamSynchronize(b->s2[g]));
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
        for (int g = 0; g < b->ngpu; g++) {
            size_t off, len;
            ceil_slice(b, n, g, &off, &len);
            CK(cudaSetDevice(g));
            CK(cudaMemcpy((char *)h + off, b->own[g] + off, len, cudaMemcpyDeviceToHost));
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
    /* mix without the hop leaves the staged H2D bytes on the peer: nothing to check on gpu0 */
    int unchecked = blocks == HOW_MIX && !mix_hop && d == 0 && mix_frac > 0;
    int ok = unchecked ? 1 : check(b, d, n, salt, blocks == HOW_CEIL);
    qsort(t, (size_t)reps, sizeof *t, mma_cmp_double);
    double p50 = t[reps / 2], p90 = t[reps * 9 / 10];
    printf("%s,%s,%zu,%s,%.2f,%d,%.1f,%.1f,%.1f,%s\n", d ? "D2H" : "H2D", name, n,
           row_tag, dshare, blocks, p50, p90, n / p50 / 1e3, unchecked ? "n/a" : ok ? "ok" : "BAD");
    fflush(stdout);
    free(t);
    if (!ok && blocks > HOW_D2D) /* the named-otherwise ways may copy wrongly: shown, not fatal */
        exit(2);
}

/* ---- hosts mode: the kind of pinned host memory ---- */

enum { HK_ALLOC, HK_MEMFD, HK_MEMFD_THP, HK_ANON_THP, HK_NUMA, NHK };
static const char *hk_name[NHK] = {"alloc", "memfd", "memfd-thp", "anon-thp", "numa"};

typedef CUresult (*gran_fn)(size_t *, const CUmemAllocationProp *, CUmemAllocationGranularity_flags);
typedef CUresult (*create_fn)(CUmemGenericAllocationHandle *, size_t, const CUmemAllocationProp *, unsigned long long);
typedef CUresult (*reserve_fn)(CUdeviceptr *, size_t, size_t, CUdeviceptr, unsigned long long);
typedef CUresult (*map_fn)(CUdeviceptr, size_t, size_t, CUmemGenericAllocationHandle, unsigned long long);
typedef CUresult (*access_fn)(CUdeviceptr, size_t, const CUmemAccessDesc *, size_t);
typedef CUresult (*export_fn)(void *, CUmemGenericAllocationHandle, CUmemAllocationHandleType, unsigned long long);

/* The driver entry point `name` (CUDA version `version`), or NULL where
 * this driver lacks it. */
static void *drv(const char *name, int version)
{
    void *fn = NULL;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion(name, &fn, version, cudaEnableDefault, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return fn;
}

/* cap bytes of host memory of kind k, or NULL (and why on stdout) where
 * this machine cannot give it. */
static char *host_get(int k, size_t cap, int ngpu)
{
    void *p = NULL;
    if (k == HK_ALLOC) {
        CK(cudaHostAlloc(&p, cap, cudaHostAllocPortable | cudaHostAllocMapped));
        return (char *)p;
    }
    if (k == HK_NUMA) {
        gran_fn gran = (gran_fn)drv("cuMemGetAllocationGranularity", 12020);
        create_fn create = (create_fn)drv("cuMemCreate", 12020);
        reserve_fn reserve = (reserve_fn)drv("cuMemAddressReserve", 12020);
        map_fn map = (map_fn)drv("cuMemMap", 12020);
        access_fn access = (access_fn)drv("cuMemSetAccess", 12020);
        export_fn exp = (export_fn)drv("cuMemExportToShareableHandle", 12020);
        if (!gran || !create || !reserve || !map || !access || !exp) {
            printf("# host memory numa: no cuMem* entry points here\n");
            return NULL;
        }
        CUmemAllocationProp prop;
        memset(&prop, 0, sizeof prop);
        prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
        prop.location.type = CU_MEM_LOCATION_TYPE_HOST_NUMA;
        prop.location.id = 0;
        prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
        size_t g = 0;
        CUresult r = gran(&g, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED);
        if (r != CUDA_SUCCESS || !g) {
            printf("# host memory numa: cuMemGetAllocationGranularity: %d\n", (int)r);
            return NULL;
        }
        size_t sz = (cap + g - 1) / g * g;
        CUmemGenericAllocationHandle h;
        CUdeviceptr va;
        if ((r = create(&h, sz, &prop, 0)) != CUDA_SUCCESS || (r = reserve(&va, sz, g, 0, 0)) != CUDA_SUCCESS ||
            (r = map(va, sz, 0, h, 0)) != CUDA_SUCCESS) {
            printf("# host memory numa: cuMemCreate/Reserve/Map: %d\n", (int)r);
            return NULL;
        }
        CUmemAccessDesc ad[MAXG + 1];
        memset(ad, 0, sizeof ad);
        for (int d = 0; d < ngpu; d++) {
            ad[d].location.type = CU_MEM_LOCATION_TYPE_DEVICE;
            ad[d].location.id = d;
            ad[d].flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        }
        ad[ngpu].location.type = CU_MEM_LOCATION_TYPE_HOST_NUMA;
        ad[ngpu].location.id = 0;
        ad[ngpu].flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        if ((r = access(va, sz, ad, (size_t)ngpu + 1)) != CUDA_SUCCESS) {
            printf("# host memory numa: cuMemSetAccess: %d\n", (int)r);
            return NULL;
        }
        int fd = -1;
        r = exp(&fd, h, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0);
        printf("# host memory numa: granularity %zu KiB, POSIX fd export %s\n", g >> 10,
               r == CUDA_SUCCESS ? "ok" : "refused");
        if (fd >= 0)
            close(fd);
        return (char *)(uintptr_t)va;
    }
    size_t al = (size_t)2 << 20, sz = cap + al;
    char *m;
    if (k == HK_ANON_THP) {
        m = (char *)mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    } else {
        int fd = memfd_create(hk_name[k], MFD_CLOEXEC);
        if (fd < 0 || ftruncate(fd, (off_t)sz) != 0) {
            printf("# host memory %s: memfd: %s\n", hk_name[k], strerror(errno));
            return NULL;
        }
        m = (char *)mmap(NULL, sz, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        close(fd);
    }
    if (m == MAP_FAILED) {
        printf("# host memory %s: mmap: %s\n", hk_name[k], strerror(errno));
        return NULL;
    }
    if (k != HK_MEMFD) {
        /* memfd-thp keeps the memfd's offset 0 at the mapping's start (a
         * shared mapping's huge pages follow file offsets; mmap of 2 MiB+
         * is usually 2 MiB aligned there anyway); anon-thp aligns */
        if (k == HK_ANON_THP)
            m = (char *)(((uintptr_t)m + al - 1) & ~(uintptr_t)(al - 1));
        if (madvise(m, cap, MADV_HUGEPAGE) != 0)
            printf("# host memory %s: madvise: %s\n", hk_name[k], strerror(errno));
    }
    memset(m, 0, cap); /* fault it in (huge pages where granted) before pinning */
    CK(cudaHostRegister(m, cap, cudaHostRegisterPortable | cudaHostRegisterMapped));
    return m;
}

/* Kilobytes of AnonHugePages / ShmemHugePages in /proc/meminfo. */
static void print_huge(const char *when)
{
    FILE *f = fopen("/proc/meminfo", "r");
    char line[256];
    printf("# %s:", when);
    while (f && fgets(line, sizeof line, f))
        if (strncmp(line, "AnonHugePages", 13) == 0 || strncmp(line, "ShmemHugePages", 14) == 0) {
            line[strcspn(line, "\n")] = 0;
            printf(" %s;", line);
        }
    printf("\n");
    if (f)
        fclose(f);
    f = fopen("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "r");
    if (f && fgets(line, sizeof line, f))
        printf("# shmem_enabled: %s", line);
    if (f)
        fclose(f);
}

static void hosts_get(box_t *b, char **host, size_t cap);

static int hosts_mode(box_t *b, int reps)
{
    size_t cap = (size_t)64 << 20;
    char *host[NHK];
    hosts_get(b, host, cap);
    int np = b->ngpu - 1;
    printf("dir,what,bytes,host,direct_share,blocks,p50_us,p90_us,GBps,bytes_ok\n");
    size_t sizes[] = {(size_t)8 << 20, (size_t)64 << 20};
    for (int round = 0; round < 3; round++)
        for (int d = 0; d < 2; d++)
            for (size_t i = 0; i < 2; i++)
                for (int k = 0; k < NHK; k++) {
                    if (!host[k])
                        continue;
                    b->host = host[k];
                    size_t n = sizes[i];
                    char tag[48];
                    snprintf(tag, sizeof tag, "%s r%d", hk_name[k], round);
                    row_tag = tag;
                    measure(b, d, n, 1, 0, 0, 0, reps, "native");
                    measure(b, d, n, 0, 0, HOW_CEIL, 0, reps, "ceil");
                    measure(b, d, n, 0.25, np, 32, 0, reps, "split");
                    measure(b, d, n, 0.25, np, 16, 0, reps, "split");
                    if (n == ((size_t)64 << 20))
                        measure(b, d, n, 0, 1, 16, 1, reps, "k1");
                }
    return 0;
}

/* The kinds of host memory this machine gives (others NULL, said why),
 * each checked usable by gpu0's copy engine and a kernel on gpu1. */
static void hosts_get(box_t *b, char **host, size_t cap)
{
    print_huge("before");
    for (int k = 0; k < NHK; k++) {
        CK(cudaSetDevice(0));
        host[k] = host_get(k, cap, b->ngpu);
        /* a kind the copy engine or a peer's kernel cannot use is left out, said why */
        cudaError_t e = cudaSuccess;
        if (host[k]) {
            e = cudaMemcpy(b->own[0], host[k], 4096, cudaMemcpyHostToDevice);
            if (e == cudaSuccess) {
                CK(cudaSetDevice(1));
                e = mmad_relay_kernel_launch(b->own[0], host[k], 4096, 1, b->s[1]);
                if (e == cudaSuccess)
                    e = cudaStreamSynchronize(b->s[1]);
            }
        }
        if (e != cudaSuccess) {
            printf("# host memory %s: unusable: %s\n", hk_name[k], cudaGetErrorString(e));
            (void)cudaGetLastError();
            host[k] = NULL;
        }
    }
    print_huge("after");
}

static int cold_mode(box_t *b, int reps, unsigned gap_us)
{
    size_t cap = (size_t)8 << 20;
    char *host[NHK];
    hosts_get(b, host, cap);
    double *t = (double *)calloc((size_t)NHK * reps, sizeof(double));
    if (!t)
        return 1;
    printf("# native copies between gpu0 and each kind of host memory, each after %u us, kinds in turns\n", gap_us);
    printf("dir,bytes,host,p50_us,p90_us,GBps,vs_alloc,bytes_ok\n");
    CK(cudaSetDevice(0));
    size_t sizes[] = {(size_t)2 << 20, (size_t)8 << 20};
    for (int d = 0; d < 2; d++)
        for (size_t i = 0; i < 2; i++) {
            size_t n = sizes[i];
            for (int k = 0; k < NHK; k++)
                if (host[k])
                    for (size_t j = 0; j < n; j++)
                        host[k][j] = (char)(j * 7 + k);
            for (int r = 0; r < reps; r++)
                for (int q = 0; q < NHK; q++) {
                    int k = (q + r) % NHK; /* which goes first rotates */
                    if (!host[k])
                        continue;
                    usleep(gap_us);
                    double t0 = mma_now_us();
                    if (d == 0)
                        CK(cudaMemcpyAsync(b->dev, host[k], n, cudaMemcpyHostToDevice, b->s[0]));
                    else
                        CK(cudaMemcpyAsync(host[k], b->dev, n, cudaMemcpyDeviceToHost, b->s[0]));
                    CK(cudaStreamSynchronize(b->s[0]));
                    t[(size_t)k * reps + r] = mma_now_us() - t0;
                    if (d == 0 && r == reps - 1) {
                        /* the copy's bytes: gpu0's buffer back against the kind's */
                        char *back = (char *)malloc(n);
                        if (!back)
                            return 1;
                        CK(cudaMemcpy(back, b->dev, n, cudaMemcpyDeviceToHost));
                        if (memcmp(back, host[k], n))
                            t[(size_t)k * reps + r] = -1;
                        free(back);
                    }
                }
            double alloc50 = 0;
            for (int k = 0; k < NHK; k++) {
                if (!host[k])
                    continue;
                double *v = t + (size_t)k * reps;
                int bad = 0;
                for (int r = 0; r < reps; r++)
                    bad |= v[r] < 0;
                qsort(v, (size_t)reps, sizeof *v, mma_cmp_double);
                double p50 = v[reps / 2], p90 = v[reps * 9 / 10];
                if (k == HK_ALLOC)
                    alloc50 = p50;
                printf("%s,%zu,%s,%.1f,%.1f,%.1f,%.3f,%s\n", d ? "D2H" : "H2D", n, hk_name[k], p50, p90,
                       n / p50 / 1e3, alloc50 > 0 ? alloc50 / p50 : 0.0, bad ? "DIFFER" : d ? "-" : "ok");
            }
            fflush(stdout);
        }
    free(t);
    return 0;
}

/* ---- mix mode: a kernel and the copy engine on one peer's link at once ---- */

static void mix_row(box_t *b, int d, size_t n, double dshare, int npeer, int p1, double frac, int hop, int round,
                    int reps, const char *name)
{
    char tag[48];
    snprintf(tag, sizeof tag, "r%d frac %.2f%s", round, frac, hop ? "" : " nohop");
    row_tag = tag;
    mix_frac = frac;
    mix_hop = hop;
    measure(b, d, n, dshare, npeer, HOW_MIX, p1, reps, name);
}

static int mix_mode(box_t *b, int reps)
{
    for (int g = 0; g < b->ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaStreamCreateWithFlags(&b->s2[g], cudaStreamNonBlocking));
    }
    int np = b->ngpu - 1;
    printf("dir,what,bytes,round/frac,direct_share,blocks,p50_us,p90_us,GBps,bytes_ok\n");
    double fr[] = {0.1, 0.2, 0.3};
    for (int round = 0; round < 3; round++)
        for (int d = 0; d < 2; d++) {
            size_t n = (size_t)64 << 20;
            /* gpu1's link alone: its copy engine into its own memory (frac 1,
             * no hop), its kernel alone (frac 0), both at once */
            mix_row(b, d, n, 0, 1, 1, 1.0, 0, round, reps, "link1");
            mix_row(b, d, n, 0, 1, 1, 0.0, 0, round, reps, "link1");
            for (int i = 0; i < 3; i++)
                mix_row(b, d, n, 0, 1, 1, fr[i], 0, round, reps, "link1");
            for (int i = 0; i < 2; i++)
                mix_row(b, d, n, 0, 1, 1, fr[i], 1, round, reps, "link1");
            /* the whole box: a quarter direct, the rest over the peers */
            size_t sizes[] = {(size_t)64 << 20, (size_t)256 << 20};
            for (int j = 0; j < 2; j++) {
                n = sizes[j];
                row_tag = round == 0 ? "r0" : round == 1 ? "r1" : "r2";
                measure(b, d, n, 0, 0, HOW_CEIL, 0, reps, "ceil");
                mix_row(b, d, n, 0.25, np, 0, 0.0, 1, round, reps, "box");
                for (int i = 0; i < 3; i++)
                    mix_row(b, d, n, 0.25, np, 0, fr[i], 1, round, reps, "box");
                mix_row(b, d, n, 0.23, np, 0, 0.2, 1, round, reps, "box");
                row_tag = round == 0 ? "r0" : round == 1 ? "r1" : "r2";
                measure(b, d, n, 0, 0, HOW_CEIL, 0, reps, "ceil");
            }
        }
    return 0;
}

int main(int argc, char **argv)
{
    int reps = argc > 1 ? atoi(argv[1]) : 50;
    /* "short": 8, 64 and 256 MiB; native, ceil, kernels and copy engines */
    int brief = argc > 2 && strcmp(argv[2], "short") == 0;
    int hosts = argc > 2 && strcmp(argv[2], "hosts") == 0;
    int mix = argc > 2 && strcmp(argv[2], "mix") == 0;
    int cold = argc > 2 && strcmp(argv[2], "cold") == 0;
    long gap = 10000;
    if (cold && argc > 3) {
        char *end;
        gap = strtol(argv[3], &end, 10);
        if (*end || gap < 0 || gap > 1000000) {
            fprintf(stderr, "mma-kcopy: cold GAP_US %s: 0-1000000\n", argv[3]);
            return 2;
        }
    }
    if (reps < 4 || (argc > 2 && !brief && !hosts && !mix && !cold) || (argc > 3 && !cold)) {
        fprintf(stderr, "usage: mma-kcopy [REPS>=4] [short|hosts|mix|cold [GAP_US]]\n");
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
    if (!hosts && !cold)
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
    drv_dtod = (dtod_fn)drv("cuMemcpyDtoDAsync", 12000); /* NULL: split-drv is left out */
    struct cudaDeviceProp p;
    CK(cudaGetDeviceProperties(&p, 0));
    printf("# mma-kcopy on %d x %s, %d SMs, %d reps, %d threads a block\n", b.ngpu, p.name,
           p.multiProcessorCount, reps, MMAD_RELAY_THREADS);
    if (hosts)
        return hosts_mode(&b, reps);
    if (cold)
        return cold_mode(&b, reps, (unsigned)gap);
    if (mix)
        return mix_mode(&b, reps);
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
