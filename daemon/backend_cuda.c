/* The CUDA backend: chunk copies on the GPUs of this box.
 *
 * Paths. A direct chunk is one cudaMemcpyAsync between pinned host memory and
 * the target GPU, so it rides the target's own PCIe link. A relay chunk
 * through GPU v is two copies through one of v's staging buffers: host ->
 * staging over v's PCIe link, then staging -> target over NVLink (H2D); the
 * device -> host relay mirrors it (target -> staging over NVLink, then
 * staging -> host over v's PCIe link). A relay of a copy below
 * --relay-kernel goes in one hop instead where it can (kernel_dev): a copy
 * kernel on v (relay_kernel.cu) reads host memory over v's link and writes
 * the target's memory over NVLink, or the reverse, on v's PCIe stream; with
 * --relay-linger-us (default) the chunk goes instead as a descriptor to the
 * resident kernel that v runs for that direction on a stream of its own,
 * which writes the chunk's completion word itself (resident_post; the
 * protocol is in relay_kernel.h and relay_kernel.cu).
 *
 * Streams. Each GPU g owns six non-blocking streams, each used like one copy
 * engine queue that runs its copies in order:
 *   direct[H2D], direct[D2H]  chunks whose target is g, over g's link;
 *   pcie[H2D],   pcie[D2H]    the PCIe hop of relays staged on g;
 *   nvlink[H2D], nvlink[D2H]  the NVLink hop of relays staged on g.
 * The NVLink hop has one stream per direction so that a device -> host relay
 * is never queued behind a host -> device relay that still waits for its
 * PCIe hop (the two directions use different NVLink lanes anyway).
 * The scheduler bounds how many chunks wait on each stream (path_depth per
 * path, staging_slots relays per GPU), so queues stay short.
 *
 * Calls. Copies go through the runtime (cudaMemcpyAsync); event records,
 * stream waits, completion marks and context switches through the driver
 * API (cu* entry points fetched at run time), with the calling thread's
 * current context switched only when the GPU changes (use_dev). In mmad a
 * copy call costs ~5.2 us through the runtime and ~6.3 us through the
 * driver (--copy-api=driver), measured on 4x H200
 * (bench/results/2026-11-27-4xH200-copy-api).
 *
 * Completion. After a chunk's last copy the stream writes a sequence number
 * into the chunk's word of a host-mapped flag array (cuStreamWriteValue64);
 * the chunk is done when the word holds it. A chunk that stays unfinished
 * for long has its streams queried, so that a failed copy (which never
 * writes its mark) is reported as failed. Where a GPU cannot do stream
 * memory operations, the backend records an event from a pool after the
 * last copy instead and polls it with cudaEventQuery. A
 * relay's first hop records a second event that the second hop's stream
 * waits on; that event goes back to the pool at once, because
 * cudaStreamWaitEvent captures the event's state when it is called and later
 * records do not change what it waits for (CUDA runtime documentation of
 * cudaEventRecord). An event must be recorded on a stream of its own device,
 * so every GPU has its own pool, and a chunk's events always belong to the
 * GPU whose streams carry it, c->via (== c->target for a direct chunk).
 *
 * Staging slots. A relay takes a free slot of its via GPU at submit and gives
 * it back in poll, after the event of its second hop completed: only then has
 * the staging buffer been emptied.
 *
 * Threads. submit and poll run on the engine thread: the in-flight list,
 * the staging slots and the completion words are theirs and take no lock.
 * With --submit-threads=1 (off by default: measured no faster) each GPU
 * also has a lane thread that issues the relays staged on it: submit
 * reserves the chunk's slot and word and hands it over; the lane issues the
 * copies (its GPU's context current) and publishes the outcome in
 * c->stage, which poll reads before the flag. A GPU's event pool then
 * serves only its lane (relay hop events). region_open runs on the loop
 * thread, region_close on whichever thread drops a region's last reference:
 * the loop thread, or the engine thread where a job outlived its client's
 * registration (the client went away while its copies were queued or ran);
 * the one thing they keep is the cache of opened IPC mappings, under
 * ipc_lock. The CUDA runtime itself is thread-safe, but its current device
 * is per thread, so each thread sets the context it needs, and use_dev asks
 * the driver which one is current rather than trusting a cached index (a
 * region_close on the engine thread switches it behind the engine's back). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <limits.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cuda.h> /* driver API types only: its functions are fetched at run time */
#include <cuda_runtime_api.h>

#include "backend.h"
#include "log.h"
#include "mma.h"
#include "relay_kernel.h"
#include "topo.h"
#include "util.h"

/* The most events one poll() call queries. The scheduler keeps far fewer
 * chunks in flight (paths x depth), so every chunk is seen each pass; the cap
 * only bounds a pass if that ever changes. */
#define POLL_QUERY_CAP 256

/* Copies smaller than this go native (plain cudaMemcpyAsync in the client).
 * Measured with mma-bench on 4x H200 with planned splits (bench/results/
 * 2026-11-27-4xH200-submit-threads, run2, engine thread only): through mmad,
 * 4 MiB ran at 0.99-1.04x native H2D and 1.20-1.29x D2H, 8 MiB at 1.28-1.34x
 * and 1.63-1.70x. 6 MiB keeps 4 MiB native, where mmad gains nothing H2D,
 * and sends 8 MiB through mmad; --bypass-threshold overrides it. (Before
 * planned splits the crossover was ~8 MiB and this was 12 MiB.) */
#define DEFAULT_BYPASS_THRESHOLD (6ll << 20)
/* With one-hop relays (--relay-kernel) mmad gains from smaller copies:
 * bench/kcopy.cu on 4x H200 moved 2 MiB in 45 us H2D and 30 us D2H over
 * four paths, against 51 and 50 us native. */
#define KERNEL_BYPASS_THRESHOLD (2ll << 20)
/* A one-hop relay's fixed latency over a direct chunk: its kernel's launch
 * on another GPU, where a staged relay waits for a second copy. */
#define KERNEL_RELAY_OVERHEAD_US 5.0
/* The same for a resident kernel: it sees a posted chunk within about one
 * PCIe read of host memory. */
#define RESIDENT_RELAY_OVERHEAD_US 1.0
#define KERNEL_QUIET_NS 1000000000ull
/* A resident relay kernel's life: after it, the kernel ends at the first
 * chunk not yet posted (between copies) and the engine starts the next one
 * at once; fed without a pause it ends after MMAD_RELAY_HARD_LIFE of this
 * (3 ms) anyway. Calls that wait for the whole GPU (cudaFree,
 * cudaHostUnregister on the loop thread) wait no longer. */
#define RESIDENT_LIFE_NS 2000000ull
#define COMPUTE_LOOK_NS 250000000ull

/* cuMemGetAddressRange_v2, fetched from the driver at run time (the daemon
 * links the runtime only, so that it starts on machines without a driver).
 * The types are spelled out here: CUresult is an enum, CUdeviceptr an
 * unsigned 64-bit integer. */
typedef int (*addr_range_fn)(unsigned long long *base, size_t *size, unsigned long long ptr);

/* The driver calls of the data path. */
typedef struct drv {
    CUresult (*htod)(CUdeviceptr, const void *, size_t, CUstream);
    CUresult (*dtoh)(void *, CUdeviceptr, size_t, CUstream);
    CUresult (*dtod)(CUdeviceptr, CUdeviceptr, size_t, CUstream);
    CUresult (*ev_record)(CUevent, CUstream);
    CUresult (*wait_event)(CUstream, CUevent, unsigned int);
    CUresult (*write64)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
    CUresult (*ctx_set)(CUcontext);
    CUresult (*ctx_get)(CUcontext *);
    CUresult (*device_get)(CUdevice *, int);
    CUresult (*primary_retain)(CUcontext *, CUdevice);
    CUresult (*primary_release)(CUdevice);
    CUresult (*dev_attr)(int *, CUdevice_attribute, CUdevice);
    CUresult (*err_name)(CUresult, const char **);
    CUresult (*err_string)(CUresult, const char **);
} drv_t;

/* Completion words: enough for every chunk the scheduler can have in flight
 * (paths x depth is at most 16 x 16 x 2 x a small depth). A chunk that finds
 * none free fails its submit, which the scheduler handles like any other. */
#define FLAG_CAP 4096

/* A chunk in flight for longer than this has its streams queried for an
 * error each pass (a failed copy never writes its completion mark). */
#define STALE_NS (50ull * 1000 * 1000)

typedef struct ev_pool {
    cudaEvent_t *ev; /* free events: ev[0..n) */
    int n;
    int created;     /* every event of this GPU, free or in use */
    int cap;         /* room in ev[], always >= created */
    unsigned flags;  /* cudaEventCreateWithFlags' */
} ev_pool_t;

/* --relay-linger-us: the resident relay kernel of one via GPU and
 * direction (relay_kernel.h). The engine thread writes each one-hop relay
 * into the ring and starts a kernel where none runs; the kernel ends by
 * itself after the linger time without a chunk, and says at which sequence
 * number in *exit_word. A descriptor posted while it was ending is taken by
 * the next launch (resident_tend), since the ring keeps it. */
typedef struct resident {
    mmad_relay_desc_t *ring;        /* host-mapped, MMAD_RELAY_RING descriptors */
    unsigned long long *exit_word;  /* host-mapped: gen:seq where the last launch ended */
    mmad_relay_state_t *state;      /* in the via GPU's memory */
    cudaStream_t stream;
    uint64_t next_seq;              /* the next descriptor's sequence number (from 1) */
    uint64_t from;                  /* the first one no ended launch took */
    uint32_t gen;                   /* the last launch's generation (0: none yet) */
    int alive;                      /* launched, and its end not seen yet */
    cudaError_t err;                /* why the last launch failed (cudaSuccess: it did not) */
} resident_t;

typedef struct cuda_gpu {
    cudaStream_t direct[2];
    cudaStream_t pcie[2];
    cudaStream_t nvlink[2];
    cudaStream_t pull[MMAD_MAX_GPUS][2]; /* --hop-side=target: this GPU's NVLink hop of relays via each peer */
    void **staging;          /* staging_slots buffers of chunk_size bytes */
    cudaStream_t *slot_stream; /* --relay-per-slot: one stream per staging buffer */
    unsigned char *slot_used;
    ev_pool_t events;
    resident_t res[2];       /* per direction; ring NULL: no resident kernels */
    /* --trace-gpu: timing events around chunks' copies (gt_*), and the
     * anchor, such an event whose time on the host's clock is known */
    ev_pool_t tev;
    cudaEvent_t anchor;
    uint64_t anchor_ns;
} cuda_gpu_t;

/* One opened cudaIpc handle. The same client allocation may be registered
 * several times (several tensors of one allocation); it is opened once and
 * shared, because opening costs ~2 ms. */
typedef struct ipc_map {
    int gpu;
    unsigned char handle[sizeof(cudaIpcMemHandle_t)];
    char *ptr;               /* where the allocation starts in this process */
    /* The same allocation opened with GPU v current, for one-hop relays
     * through v: a kernel on v cannot reach the mapping opened on the owner
     * (bench/access.cu measured it), only one opened on v. NULL: none. */
    char *via_ptr[MMAD_MAX_GPUS];
    uint64_t size;           /* bytes mapped at ptr; 0 when the driver could not say */
    int refs;                /* regions using it */
    struct ipc_map *next;
} ipc_map_t;

struct cuda_be;

/* A submitter thread for one GPU's relays: the engine thread reserves a
 * chunk's staging slot and completion word, puts it here and goes on; the
 * lane issues its copies with its GPU's context current. Relays through
 * different GPUs are so issued at the same time rather than one after
 * another (a relay's calls cost ~12 us). Measured on 4x H200 the driver
 * serialized the lanes' calls (8.7 us per copy call instead of 5.7) and
 * only large H2D copies gained (bench/results/
 * 2026-11-27-4xH200-submit-threads), so lanes are off by default. The ring
 * holds at most staging_slots chunks: no more relays can be in flight on
 * one GPU. */
typedef struct lane {
    struct cuda_be *s;
    int gpu;
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    mmad_chunk_t **ring;
    int cap, head, count;
    int sleeping;
    int stop;
    _Atomic uint64_t awake_until; /* cuda_prepare: spin, do not sleep, until then */
} lane_t;

typedef struct cuda_be {
    mmad_backend_t base;
    cuda_gpu_t gpu[MMAD_MAX_GPUS];
    drv_t drv;
    CUcontext ctx[MMAD_MAX_GPUS]; /* primary contexts, retained */
    int use_flags;                /* completion by stream-written flags */
    volatile uint64_t *flags;     /* FLAG_CAP host-mapped completion words */
    uint64_t flag_want[FLAG_CAP]; /* what each word holds once its chunk is done */
    int flag_free[FLAG_CAP];      /* free word indexes: flag_free[0..flag_nfree) */
    int flag_nfree;
    uint64_t flag_seq;
    uint64_t stale_check_ns;      /* when the last check for failed copies ran */
    int copy_driver;              /* --copy-api=driver: cuMemcpy*Async, else cudaMemcpyAsync */
    /* engine time by kind of call, logged at exit (what a chunk costs) */
    _Atomic uint64_t t_copy_ns, n_copy, t_hop_ns, t_mark_ns, t_ctx_ns;
    _Atomic uint64_t own_bytes[MMAD_MAX_GPUS][2]; /* landed on each GPU's link, per direction */
    struct monitor *monitor;
    /* --submit-threads: relay chunks are issued by their via GPU's lane */
    struct lane *lanes[MMAD_MAX_GPUS];
    int use_lanes;
    mmad_chunk_t *inflight_head, *inflight_tail; /* oldest first, linked by ->next */
    pthread_mutex_t ipc_lock;
    ipc_map_t *ipc_maps;
    addr_range_fn addr_range;
    int relay_per_slot;
    /* --relay-kernel: relays of copies below kernel_below run as a copy
     * kernel on a via GPU where kernel_ok (it can use a registered host
     * pointer as is); kernel_off once host memory could not be mapped. */
    uint64_t kernel_below;
    int kernel_blocks;
    unsigned int kernel_busy_sm;  /* --relay-kernel-busy-sm */
    unsigned char kernel_ok[MMAD_MAX_GPUS];
    _Atomic int kernel_off;
    _Atomic uint64_t n_kernel;
    uint64_t linger_ns;           /* --relay-linger-us; 0: a launch per one-hop relay */
    int use_resident;             /* one-hop relays go to resident kernels */
    /* resident kernel launches by what the last kernel there ended for:
     * [0] none ran or it lingered out (a copy after a pause), [1] its life,
     * with chunks already waiting (their relay path paused mid-copy for
     * the launch), [2] its life, ahead of the next chunk */
    uint64_t res_launch_why[3];
    void *res_host;               /* every ring and exit word, host-mapped */
    unsigned long long *res_dummy; /* where a cancelled descriptor's kernel writes */
    int hop_target;          /* --hop-side=target: the NVLink hop runs on the target's stream */
    int gpu_times;           /* --trace-gpu, engine thread issuing: time chunks' copies on the GPUs */
} cuda_be_t;

/* ---- error discipline ---- */

/* Turn a CUDA result into an mma status; a failure is logged once, naming
 * the function that detected it and the CUDA call (up to its '('). */
static int cuda_status(cudaError_t err, const char *call, const char *func, int level)
{
    if (err == cudaSuccess)
        return MMA_OK;
    int len = (int)strcspn(call, "(");
    mma_log(level, "cuda: %s: %.*s failed: %s (%s)", func, len, call, cudaGetErrorString(err),
            cudaGetErrorName(err));
    /* The runtime also keeps the error as the thread's "last error"; clear
     * it so that it cannot surface later in an unrelated check (the peer
     * access set-up reads it). Sticky errors stay, as they must. */
    (void)cudaGetLastError();
    return MMA_ERR_CUDA;
}

/* The same for a driver result. */
static int drv_status(const cuda_be_t *s, CUresult r, const char *call, const char *func)
{
    if (r == CUDA_SUCCESS)
        return MMA_OK;
    const char *name = "?", *str = "?";
    if (s->drv.err_name)
        (void)s->drv.err_name(r, &name);
    if (s->drv.err_string)
        (void)s->drv.err_string(r, &str);
    int len = (int)strcspn(call, "(");
    MMA_ERROR("cuda: %s: %.*s failed: %s (%s)", func, len, call, str ? str : "?", name ? name : "?");
    return MMA_ERR_CUDA;
}

#define DRV(call) drv_status(s, (call), #call, __func__)
#define DRV_CHECK(call)              \
    do {                             \
        int rc_ = DRV(call);         \
        if (rc_ != MMA_OK)           \
            return rc_;              \
    } while (0)

#define CU(call) cuda_status((call), #call, __func__, MMA_LOG_ERROR)
#define CU_WARN(call) cuda_status((call), #call, __func__, MMA_LOG_WARN)
#define CU_CHECK(call)               \
    do {                             \
        int rc_ = CU(call);          \
        if (rc_ != MMA_OK)           \
            return rc_;              \
    } while (0)

int mmad_cuda_device_count(void)
{
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        /* No driver (error 35 on CI machines) or no device: that only means
         * there is nothing for this backend to drive, so it is not an error. */
        MMA_DEBUG("cuda: cudaGetDeviceCount: %s (%s); no CUDA GPU", cudaGetErrorString(err),
                  cudaGetErrorName(err));
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

/* ---- event pools (the caller has set the pool's device) ---- */

/* Create `count` more events and keep them free. */
static int pool_grow(ev_pool_t *p, int count)
{
    if (p->created + count > p->cap) {
        int cap = p->cap ? p->cap : 16;
        while (cap < p->created + count)
            cap *= 2;
        cudaEvent_t *ev = realloc(p->ev, (size_t)cap * sizeof *ev);
        if (!ev)
            return MMA_ERR_NOMEM;
        p->ev = ev;
        p->cap = cap;
    }
    for (int i = 0; i < count; i++) {
        CU_CHECK(cudaEventCreateWithFlags(&p->ev[p->n], p->flags));
        p->n++;
        p->created++;
    }
    return MMA_OK;
}

static int event_get(ev_pool_t *p, cudaEvent_t *out)
{
    if (p->n == 0) {
        int rc = pool_grow(p, 1); /* sized at start, so this is rare */
        if (rc != MMA_OK)
            return rc;
    }
    *out = p->ev[--p->n];
    return MMA_OK;
}

/* Never fails: ev[] has room for every event ever created. */
static void event_put(ev_pool_t *p, cudaEvent_t ev)
{
    p->ev[p->n++] = ev;
}

/* ---- staging slots ---- */

static int slot_get(cuda_be_t *s, int gpu)
{
    for (int i = 0; i < s->base.staging_slots; i++)
        if (!s->gpu[gpu].slot_used[i]) {
            s->gpu[gpu].slot_used[i] = 1;
            return i;
        }
    return -1;
}

static void slot_put(cuda_be_t *s, int gpu, int slot)
{
    if (slot >= 0)
        s->gpu[gpu].slot_used[slot] = 0;
}

/* ---- copies ---- */

/* A copy was queued but the chunk fails: wait until the stream is idle so
 * that no copy outlives the chunk and writes into memory the scheduler may
 * already have released or handed to a retry. */
static void drain(cudaStream_t st)
{
    (void)CU(cudaStreamSynchronize(st));
}

/* Make GPU d's primary context current on the calling thread (a no-op
 * when it is). The current context belongs to the thread, and more than
 * use_dev switch it: region_close closes IPC mappings with each of their
 * GPUs current (cudaSetDevice), on the engine thread too, and the main
 * thread sets up with each GPU current in turn. An index cached per backend
 * went stale that way: use_dev then skipped the switch, and a relay kernel
 * launched on the via GPU's stream failed (invalid resource handle), which
 * set that relay path aside for the daemon's life. So the driver is asked
 * (cuCtxGetCurrent reads the thread's own context stack, no GPU work); where
 * even that fails, the switch itself reports the error. */
static int use_dev(cuda_be_t *s, int d)
{
    CUcontext cur = NULL;
    if (s->drv.ctx_get(&cur) == CUDA_SUCCESS && cur == s->ctx[d])
        return MMA_OK;
    uint64_t t0 = mma_now_ns();
    DRV_CHECK(s->drv.ctx_set(s->ctx[d]));
    s->t_ctx_ns += mma_now_ns() - t0;
    return MMA_OK;
}

static CUdeviceptr dptr(const void *p)
{
    return (CUdeviceptr)(uintptr_t)p;
}

/* One copy of a chunk on stream st. Host memory is pinned (registered at
 * region open, staging is device memory), so every copy is asynchronous;
 * device pointers are unified addresses, so a copy between two GPUs' memory
 * is a peer copy over NVLink. */
static int copy_on(cuda_be_t *s, void *dst, int dst_host, const void *src, int src_host, uint64_t len,
                   cudaStream_t st)
{
    uint64_t t0 = mma_now_ns();
    int rc;
    if (!s->copy_driver) {
        /* Between two GPUs: Default, so that unified addressing routes it
         * as a peer copy. */
        enum cudaMemcpyKind kind = src_host ? cudaMemcpyHostToDevice
                                   : dst_host ? cudaMemcpyDeviceToHost
                                              : cudaMemcpyDefault;
        rc = CU(cudaMemcpyAsync(dst, src, len, kind, st));
    } else {
        CUstream cs = (CUstream)st;
        if (src_host)
            rc = DRV(s->drv.htod(dptr(dst), src, len, cs));
        else if (dst_host)
            rc = DRV(s->drv.dtoh(dst, dptr(src), len, cs));
        else
            rc = DRV(s->drv.dtod(dptr(dst), dptr(src), len, cs));
    }
    s->t_copy_ns += mma_now_ns() - t0;
    s->n_copy++;
    return rc;
}

/* Queue the chunk's completion mark on st, its last stream: its flag word,
 * reserved at submit (flag_reserve), or, without stream memory operations,
 * an event of gpu g's pool (c->mark_gpu says which, for its return). The
 * mark is the only thing c->be_priv holds. */
static int mark_done_(cuda_be_t *s, mmad_chunk_t *c, int g, cudaStream_t st)
{
    if (s->use_flags) {
        int f = (int)(uintptr_t)c->be_priv - 1;
        return DRV(s->drv.write64((CUstream)st, dptr((const void *)&s->flags[f]), s->flag_want[f], 0));
    }
    cudaEvent_t done;
    int rc = event_get(&s->gpu[g].events, &done);
    if (rc != MMA_OK)
        return rc;
    rc = DRV(s->drv.ev_record((CUevent)done, (CUstream)st));
    if (rc != MMA_OK) {
        event_put(&s->gpu[g].events, done);
        return rc;
    }
    c->be_priv = done;
    c->mark_gpu = g; /* its pool: not always the via GPU's (a hop on the target's stream) */
    return MMA_OK;
}

static int mark_done(cuda_be_t *s, mmad_chunk_t *c, int g, cudaStream_t st)
{
    uint64_t t0 = mma_now_ns();
    int rc = mark_done_(s, c, g, st);
    s->t_mark_ns += mma_now_ns() - t0;
    return rc;
}

/* ---- --trace-gpu: when the GPUs ran each chunk's copies ----
 *
 * A timing event before and after each copy of a chunk (engine thread
 * only: lanes issue relays with no timing). When the chunk is done, each is
 * placed on the host's clock through the GPU's anchor, an earlier event
 * whose host time is known: the first one is recorded on an idle stream at
 * start; an event more than GT_REANCHOR_MS after the anchor becomes the
 * next one, so elapsed times stay short enough for cudaEventElapsedTime's
 * float to keep sub-microsecond steps, and few enough hand-overs add up no
 * rounding. The first anchor's host time is taken as the call that records
 * it returns, so GPUs' clocks agree to a few microseconds. */
#define GT_REANCHOR_MS 100.0f

static void gt_mark(cuda_be_t *s, mmad_chunk_t *c, int i, int g, cudaStream_t st)
{
    cudaEvent_t ev;
    if (!s->gpu_times || g < 0 || event_get(&s->gpu[g].tev, &ev) != MMA_OK)
        return;
    if (DRV(s->drv.ev_record((CUevent)ev, (CUstream)st)) != MMA_OK) {
        event_put(&s->gpu[g].tev, ev);
        return;
    }
    c->gt_ev[i] = ev;
    c->gt_gpu[i] = g;
}

/* The chunk is done: its events' host times into c->g_times. */
static void gt_resolve(cuda_be_t *s, mmad_chunk_t *c)
{
    for (int i = 0; i < 4; i++) {
        if (!c->gt_ev[i])
            continue;
        int g = c->gt_gpu[i];
        cuda_gpu_t *G = &s->gpu[g];
        float ms;
        if (!G->anchor || use_dev(s, g) != MMA_OK)
            continue;
        if (cudaEventElapsedTime(&ms, G->anchor, (cudaEvent_t)c->gt_ev[i]) != cudaSuccess) {
            (void)cudaGetLastError(); /* not timed; the copy itself is fine */
            continue;
        }
        c->g_times[i] = (uint64_t)((double)G->anchor_ns + (double)ms * 1e6);
        if (ms > GT_REANCHOR_MS) {
            event_put(&G->tev, G->anchor);
            G->anchor = c->gt_ev[i];
            G->anchor_ns = c->g_times[i];
            c->gt_ev[i] = NULL;
        }
    }
}

/* The chunk's timing events back to their pools (any that are not anchors
 * now). */
static void gt_release(cuda_be_t *s, mmad_chunk_t *c)
{
    for (int i = 0; i < 4; i++)
        if (c->gt_ev[i]) {
            event_put(&s->gpu[c->gt_gpu[i]].tev, (cudaEvent_t)c->gt_ev[i]);
            c->gt_ev[i] = NULL;
        }
}

/* Every GPU's timing pool and first anchor; on failure no chunk is timed. */
static int gt_setup(cuda_be_t *s)
{
    mmad_backend_t *be = &s->base;
    for (int g = 0; g < be->gpu_count; g++) {
        cuda_gpu_t *G = &s->gpu[g];
        G->tev.flags = cudaEventDefault;
        int rc = use_dev(s, g);
        if (rc == MMA_OK)
            rc = pool_grow(&G->tev, 4 * (be->path_depth + be->staging_slots) + 1);
        cudaEvent_t a = NULL;
        if (rc == MMA_OK)
            rc = event_get(&G->tev, &a);
        uint64_t t = mma_now_ns();
        if (rc == MMA_OK)
            rc = DRV(s->drv.ev_record((CUevent)a, (CUstream)G->direct[MMA_DIR_H2D]));
        if (rc == MMA_OK)
            t = mma_now_ns();
        if (rc == MMA_OK)
            rc = CU(cudaEventSynchronize(a));
        if (rc != MMA_OK)
            return rc;
        G->anchor = a;
        G->anchor_ns = t;
    }
    return MMA_OK;
}

/* Engine thread: give the chunk a completion word and the value that the
 * stream will write there. */
static int flag_reserve(cuda_be_t *s, mmad_chunk_t *c)
{
    if (s->flag_nfree == 0) {
        MMA_ERROR("cuda: all %d completion words are in use", FLAG_CAP);
        return MMA_ERR_BACKEND;
    }
    int f = s->flag_free[--s->flag_nfree];
    s->flag_want[f] = ++s->flag_seq;
    c->be_priv = (void *)(uintptr_t)(f + 1);
    return MMA_OK;
}

/* c->stage, when a lane issues the chunk: LANE_QUEUED until the lane has
 * issued it (then 2), LANE_FAILED when issuing failed (c->status says how). */
#define LANE_QUEUED 0
#define LANE_FAILED (-1)

static int chunk_finished(cuda_be_t *s, mmad_chunk_t *c, cudaError_t *err)
{
    *err = cudaSuccess;
    int stage = __atomic_load_n(&c->stage, __ATOMIC_ACQUIRE);
    if (stage == LANE_QUEUED)
        return 0;
    if (stage == LANE_FAILED) {
        *err = cudaErrorLaunchFailure; /* reported as a failed copy; the log has the cause */
        return 1;
    }
    if (s->use_flags) {
        int f = (int)(uintptr_t)c->be_priv - 1;
        return __atomic_load_n(&s->flags[f], __ATOMIC_ACQUIRE) == s->flag_want[f];
    }
    *err = cudaEventQuery((cudaEvent_t)c->be_priv);
    if (*err == cudaErrorNotReady) { /* still copying: not an error */
        (void)cudaGetLastError();
        *err = cudaSuccess;
        return 0;
    }
    return 1;
}

static int submit_direct(cuda_be_t *s, mmad_chunk_t *c)
{
    int t = c->target;
    cudaStream_t st = s->gpu[t].direct[c->dir];
    int h2d = c->dir == MMA_DIR_H2D;
    int rc = use_dev(s, t);
    if (rc == MMA_OK && s->use_flags)
        rc = flag_reserve(s, c);
    if (rc != MMA_OK)
        return rc;
    gt_mark(s, c, 0, t, st);
    rc = h2d ? copy_on(s, c->dev, 0, c->host, 1, c->len, st) : copy_on(s, c->host, 1, c->dev, 0, c->len, st);
    if (rc == MMA_OK)
        gt_mark(s, c, 1, t, st);
    if (rc == MMA_OK && (rc = mark_done(s, c, t, st)) != MMA_OK)
        drain(st); /* the copy runs: it must not outlive the failed chunk */
    if (rc != MMA_OK) {
        if (s->use_flags)
            s->flag_free[s->flag_nfree++] = (int)(uintptr_t)c->be_priv - 1;
        c->be_priv = NULL;
        return rc;
    }
    c->stage = 1;
    return MMA_OK;
}

/* Queue the relay's two hops: `first` (GPU d1's stream, d1 current now)
 * fills the staging buffer, `second` (GPU d2's) empties it once `hop`
 * (recorded after the first) is reached; second == first needs no event.
 * With `ctx` the engine thread makes each stream's GPU current before using
 * it (the hops are on two GPUs); without, the via GPU's context is current
 * throughout. Returns 1 in *queued once any copy was queued. */
static int queue_relay(cuda_be_t *s, mmad_chunk_t *c, char *stage, cudaEvent_t hop, cudaStream_t first, int d1,
                       cudaStream_t second, int d2, int ctx, int *queued)
{
    int h2d = c->dir == MMA_DIR_H2D;
    gt_mark(s, c, 0, d1, first);
    int rc = h2d ? copy_on(s, stage, 0, c->host, 1, c->len, first) : copy_on(s, stage, 0, c->dev, 0, c->len, first);
    if (rc != MMA_OK)
        return rc;
    *queued = 1;
    gt_mark(s, c, 1, d1, first);
    if (second != first) {
        uint64_t t0 = mma_now_ns();
        DRV_CHECK(s->drv.ev_record((CUevent)hop, (CUstream)first));
        if (ctx && (rc = use_dev(s, d2)) != MMA_OK)
            return rc;
        DRV_CHECK(s->drv.wait_event((CUstream)second, (CUevent)hop, 0));
        s->t_hop_ns += mma_now_ns() - t0;
    }
    gt_mark(s, c, 2, d2, second);
    rc = h2d ? copy_on(s, c->dev, 0, stage, 0, c->len, second) : copy_on(s, c->host, 1, stage, 0, c->len, second);
    if (rc != MMA_OK)
        return rc;
    gt_mark(s, c, 3, d2, second);
    return mark_done(s, c, d2, second);
}

/* Where a one-hop relay's kernel writes and reads: the target's memory as
 * the via GPU maps it, and the host bytes. */
static void kernel_ends(const mmad_chunk_t *c, void **dst, const void **src)
{
    int h2d = c->dir == MMA_DIR_H2D;
    *dst = h2d ? (void *)c->kernel_dev : (void *)c->host;
    *src = h2d ? (const void *)c->host : (const void *)c->kernel_dev;
}

/* ---- resident relay kernels ---- */

/* Start a resident kernel on r's stream that takes descriptors from
 * r->from on; the via GPU's context is current. */
static int resident_launch(cuda_be_t *s, resident_t *r)
{
    if (++r->gen >= 1u << 31) /* the exit word's top bit is MMAD_RELAY_EXIT_LIFE */
        r->gen = 1;
    r->err = mmad_relay_resident_launch(r->ring, r->exit_word, r->state, r->from, r->gen, s->linger_ns,
                                        RESIDENT_LIFE_NS, s->kernel_blocks, r->stream);
    if (r->err != cudaSuccess) {
        (void)cuda_status(r->err, "mmad_relay_resident_launch(", __func__, MMA_LOG_ERROR);
        return MMA_ERR_CUDA;
    }
    r->alive = 1;
    atomic_fetch_add_explicit(&s->base.relay_kernel_launches, 1, memory_order_relaxed);
    return MMA_OK;
}

/* Has r's kernel ended? Then r->from is where; and descriptors posted
 * since need a new launch (GPU v's context is made current for it), as
 * does a kernel that ended for its life: chunks are coming, and the next
 * copy's should find a kernel running, not wait for its launch. */
static int resident_tend(cuda_be_t *s, int v, resident_t *r)
{
    int life = 0;
    if (r->alive) {
        unsigned long long w = __atomic_load_n(r->exit_word, __ATOMIC_ACQUIRE);
        if ((uint32_t)((w & ~MMAD_RELAY_EXIT_LIFE) >> 32) != r->gen)
            return MMA_OK;
        r->alive = 0;
        life = (w & MMAD_RELAY_EXIT_LIFE) != 0;
        r->from = r->next_seq - (uint32_t)((uint32_t)r->next_seq - (uint32_t)w);
    }
    if (r->from == r->next_seq && !life)
        return MMA_OK;
    int rc = use_dev(s, v);
    if (rc == MMA_OK)
        rc = resident_launch(s, r);
    if (rc == MMA_OK)
        s->res_launch_why[life ? (r->from == r->next_seq ? 2 : 1) : 0]++;
    return rc;
}

/* Make a descriptor no kernel has taken copy nothing (it still has its
 * place in the sequence): its chunk failed and goes back to the scheduler. */
static void resident_cancel(cuda_be_t *s, resident_t *r, uint64_t seq)
{
    mmad_relay_desc_t *d = &r->ring[seq % MMAD_RELAY_RING];
    d->len = 0;
    d->flag = (uint64_t)(uintptr_t)s->res_dummy;
}

/* Hand a one-hop relay to its via GPU's resident kernel: its descriptor,
 * seq last, then a launch if no kernel runs. The kernel writes the chunk's
 * completion word itself. */
static int resident_post(cuda_be_t *s, mmad_chunk_t *c)
{
    resident_t *r = &s->gpu[c->via].res[c->dir];
    int f = (int)(uintptr_t)c->be_priv - 1;
    uint64_t seq = r->next_seq;
    mmad_relay_desc_t *d = &r->ring[seq % MMAD_RELAY_RING];
    uint64_t t0 = mma_now_ns();
    void *dst;
    const void *src;
    kernel_ends(c, &dst, &src);
    d->dst = (uint64_t)(uintptr_t)dst;
    d->src = (uint64_t)(uintptr_t)src;
    d->len = c->len;
    d->flag = (uint64_t)(uintptr_t)&s->flags[f];
    d->flag_value = s->flag_want[f];
    __atomic_store_n(&d->seq, seq, __ATOMIC_RELEASE);
    r->next_seq++;
    c->kernel_seq = seq;
    int rc = resident_tend(s, c->via, r);
    s->t_copy_ns += mma_now_ns() - t0;
    s->n_copy++;
    if (rc != MMA_OK) {
        resident_cancel(s, r, seq);
        c->kernel_seq = 0;
        return rc;
    }
    s->n_kernel++;
    return MMA_OK;
}

/* Engine thread, each poll: relaunch where a kernel ended with
 * descriptors left. After a failed launch the ring waits for the next post
 * to try again, and chunk_stream_error fails the chunks left waiting. */
static void resident_tend_all(cuda_be_t *s)
{
    for (int v = 0; v < s->base.gpu_count; v++)
        for (int d = 0; d < 2; d++) {
            resident_t *r = &s->gpu[v].res[d];
            if (r->ring && (r->alive || r->from != r->next_seq) && r->err == cudaSuccess)
                (void)resident_tend(s, v, r);
        }
}

/* A one-hop relay launched alone: the via GPU's copy kernel on its PCIe
 * stream of the direction, then the mark on the same stream. Host memory
 * is registered mapped and the target's memory is reachable by peer
 * access, so the kernel takes both pointers as they are. */
static int issue_kernel_relay(cuda_be_t *s, mmad_chunk_t *c)
{
    cudaStream_t st = s->gpu[c->via].pcie[c->dir];
    void *dst;
    const void *src;
    kernel_ends(c, &dst, &src);
    uint64_t t0 = mma_now_ns();
    int rc = CU(mmad_relay_kernel_launch(dst, src, c->len, s->kernel_blocks, st));
    s->t_copy_ns += mma_now_ns() - t0;
    s->n_copy++;
    if (rc != MMA_OK)
        return rc;
    s->n_kernel++;
    if ((rc = mark_done(s, c, c->via, st)) != MMA_OK)
        drain(st);
    return rc;
}

/* Queue a relay chunk's copies and mark; its staging slot (c->staging) and
 * completion word are reserved. Runs where the via GPU's context is
 * current: on its lane, or on the engine thread without lanes. On failure
 * nothing of it is left running. */
static int issue_relay(cuda_be_t *s, mmad_chunk_t *c)
{
    int v = c->via, t = c->target, slot = c->staging, h2d = c->dir == MMA_DIR_H2D;
    cuda_gpu_t *g = &s->gpu[v];
    if (c->kernel_dev)
        return s->use_resident ? resident_post(s, c) : issue_kernel_relay(s, c);
    /* H2D: host -> staging on the PCIe stream, then staging -> target on the
     * NVLink stream. D2H: target -> staging on the NVLink stream, then
     * staging -> host on the PCIe stream. The NVLink stream is the via
     * GPU's, or with --hop-side=target the target's for this via (H2D: the
     * target pulls from staging; D2H: it pushes into staging; engine thread
     * only, as it switches contexts). --relay-per-slot: both hops in order
     * on the slot's own stream (the slot is this chunk's alone until it
     * completes, so that stream is idle now). */
    int ctx = s->hop_target && !s->relay_per_slot;
    int nvdev = ctx ? t : v;
    cudaStream_t nvlink = ctx ? s->gpu[t].pull[v][c->dir] : g->nvlink[c->dir];
    cudaStream_t first, second;
    int d1, d2;
    if (s->relay_per_slot) {
        first = second = g->slot_stream[slot];
        d1 = d2 = v;
    } else {
        first = h2d ? g->pcie[MMA_DIR_H2D] : nvlink;
        second = h2d ? nvlink : g->pcie[MMA_DIR_D2H];
        d1 = h2d ? v : nvdev;
        d2 = h2d ? nvdev : v;
    }
    /* Only hops on two streams need an event between them; it comes from
     * the first stream's GPU, whose context must be current (the pool may
     * grow). */
    ev_pool_t *pool = &s->gpu[d1].events;
    cudaEvent_t hop = NULL;
    int rc = ctx ? use_dev(s, d1) : MMA_OK;
    if (rc == MMA_OK && second != first)
        rc = event_get(pool, &hop);
    if (rc != MMA_OK)
        return rc;
    int queued = 0;
    rc = queue_relay(s, c, g->staging[slot], hop, first, d1, second, d2, ctx, &queued);
    /* The second stream's wait has captured `hop`; it may be reused now. */
    if (hop)
        event_put(pool, hop);
    if (rc != MMA_OK && queued) {
        drain(first);
        drain(second);
    }
    return rc;
}

/* ---- lanes ---- */

static void lane_run(lane_t *L, mmad_chunk_t *c)
{
    int rc = issue_relay(L->s, c);
    c->status = rc;
    __atomic_store_n(&c->stage, rc == MMA_OK ? 2 : LANE_FAILED, __ATOMIC_RELEASE);
}

static mmad_chunk_t *lane_pop(lane_t *L)
{
    mmad_chunk_t *c = NULL;
    pthread_mutex_lock(&L->lock);
    if (L->count > 0) {
        c = L->ring[L->head];
        L->head = (L->head + 1) % L->cap;
        L->count--;
    }
    pthread_mutex_unlock(&L->lock);
    return c;
}

/* After a small chunk the lane keeps polling its ring this long before it
 * sleeps: small chunks come from latency-bound copies, where a thread
 * wake-up would be added to the copy's time. After a large one it sleeps
 * at once: the path has another chunk queued on the GPU meanwhile. */
#define LANE_SPIN_NS 30000ull
#define LANE_SPIN_BELOW (2u << 20)

/* Name the calling thread after its GPU ("mmad-lane2"), as the exit log
 * and top show it. */
static void name_gpu_thread(const char *prefix, int gpu)
{
    char name[16];
    snprintf(name, sizeof name, "%s%d", prefix, gpu);
    pthread_setname_np(pthread_self(), name);
}

static void *lane_main(void *arg)
{
    lane_t *L = arg;
    cuda_be_t *s = L->s;
    name_gpu_thread("mmad-lane", L->gpu);
    if (DRV(s->drv.ctx_set(s->ctx[L->gpu])) != MMA_OK)
        MMA_ERROR("cuda: lane for gpu%d cannot make its context current; its relays will fail", L->gpu);
    uint64_t spin_until = 0;
    for (;;) {
        mmad_chunk_t *c = lane_pop(L);
        if (c) {
            /* read before lane_run: once it publishes c->stage the engine
             * may complete the chunk and reuse it */
            uint64_t len = c->len;
            lane_run(L, c);
            spin_until = len < LANE_SPIN_BELOW ? mma_now_ns() + LANE_SPIN_NS : 0;
            continue;
        }
        uint64_t hint = atomic_load_explicit(&L->awake_until, memory_order_relaxed);
        if (hint > spin_until)
            spin_until = hint;
        if (spin_until && mma_now_ns() < spin_until) {
            __builtin_ia32_pause();
            continue;
        }
        pthread_mutex_lock(&L->lock);
        while (L->count == 0 && !L->stop &&
               atomic_load_explicit(&L->awake_until, memory_order_relaxed) <= mma_now_ns()) {
            L->sleeping = 1;
            pthread_cond_wait(&L->cond, &L->lock);
            L->sleeping = 0;
        }
        int stop = L->stop && L->count == 0;
        pthread_mutex_unlock(&L->lock);
        if (stop)
            break;
        spin_until = 0;
    }
    return NULL;
}

/* A copy arrived: relays will follow within microseconds. Lanes that
 * sleep wake now, so that their wake-up overlaps the engine's planning and
 * its direct chunk instead of delaying the relays. */
#define LANE_PREPARE_NS 50000ull

static void cuda_prepare(mmad_backend_t *be, int target)
{
    cuda_be_t *s = (cuda_be_t *)be;
    if (!s->use_lanes)
        return;
    uint64_t until = mma_now_ns() + LANE_PREPARE_NS;
    for (int g = 0; g < be->gpu_count; g++) {
        lane_t *L = s->lanes[g];
        if (g == target || !L || !be->relay_ok[target][g])
            continue;
        atomic_store_explicit(&L->awake_until, until, memory_order_relaxed);
        pthread_mutex_lock(&L->lock);
        if (L->sleeping)
            pthread_cond_signal(&L->cond);
        pthread_mutex_unlock(&L->lock);
    }
}

static int lane_push(lane_t *L, mmad_chunk_t *c)
{
    pthread_mutex_lock(&L->lock);
    if (L->count == L->cap) {
        pthread_mutex_unlock(&L->lock);
        MMA_ERROR("cuda: lane of gpu%d is full (scheduler over-committed)", L->gpu);
        return MMA_ERR_BACKEND;
    }
    L->ring[(L->head + L->count) % L->cap] = c;
    L->count++;
    if (L->sleeping)
        pthread_cond_signal(&L->cond);
    pthread_mutex_unlock(&L->lock);
    return MMA_OK;
}

static int lane_start(cuda_be_t *s, int gpu)
{
    lane_t *L = calloc(1, sizeof *L);
    if (!L)
        return MMA_ERR_NOMEM;
    L->s = s;
    L->gpu = gpu;
    L->cap = s->base.staging_slots;
    L->ring = calloc((size_t)L->cap, sizeof *L->ring);
    pthread_mutex_init(&L->lock, NULL);
    pthread_cond_init(&L->cond, NULL);
    s->lanes[gpu] = L;
    if (!L->ring)
        return MMA_ERR_NOMEM;
    int err = pthread_create(&L->thread, NULL, lane_main, L);
    if (err) {
        MMA_ERROR("cuda: cannot start the submit thread of gpu%d: %s", gpu, strerror(err));
        return MMA_ERR_SYSTEM;
    }
    L->started = 1;
    return MMA_OK;
}

/* Tell a worker thread (a lane, the link monitor) to stop, through the
 * flag its loop checks under `lock`, wake it, and wait for it to end. */
static void worker_stop(pthread_mutex_t *lock, pthread_cond_t *cond, int *stop, pthread_t thread)
{
    pthread_mutex_lock(lock);
    *stop = 1;
    pthread_cond_signal(cond);
    pthread_mutex_unlock(lock);
    pthread_join(thread, NULL);
}

/* Safe on a lane that never started. */
static void lane_stop(cuda_be_t *s, int gpu)
{
    lane_t *L = s->lanes[gpu];
    if (!L)
        return;
    if (L->started)
        worker_stop(&L->lock, &L->cond, &L->stop, L->thread);
    pthread_mutex_destroy(&L->lock);
    pthread_cond_destroy(&L->cond);
    free(L->ring);
    free(L);
    s->lanes[gpu] = NULL;
}

/* Where a one-hop relay kernel on the via GPU finds the chunk's device
 * bytes, or NULL where the relay must stage: the copy is not small enough
 * (and the chunk no --edge-one-hop edge of a staged one), the via GPU
 * cannot take host pointers as they are or another process keeps its SMs
 * busy (relay_kernel_now), it has no mapping of the allocation, or an end
 * is not 16-byte aligned. (The job holds its regions, so the mapping
 * outlives the chunk.) */
static char *kernel_dev(cuda_be_t *s, const mmad_chunk_t *c)
{
    if (!s->kernel_below || !c->job || (c->job->total >= s->kernel_below && !c->one_hop_edge) || !c->dev_region ||
        !atomic_load_explicit(&s->base.relay_kernel_now[c->via], memory_order_relaxed) ||
        atomic_load_explicit(&s->kernel_off, memory_order_relaxed))
        return NULL;
    const ipc_map_t *m = c->dev_region->be_priv;
    if (!m || !m->via_ptr[c->via])
        return NULL;
    char *d = m->via_ptr[c->via] + (c->dev - m->ptr);
    return ((uintptr_t)d | (uintptr_t)c->host) & 15 ? NULL : d;
}

static int submit_relay(cuda_be_t *s, mmad_chunk_t *c)
{
    int t = c->target, v = c->via;
    if (!s->base.relay_ok[t][v]) {
        MMA_ERROR("cuda: relay gpu%d -> gpu%d is not usable (%s)", v, t, s->base.relay_note[t][v]);
        return MMA_ERR_BACKEND;
    }
    if (c->len > s->base.chunk_size) {
        MMA_ERROR("cuda: relay chunk of %llu bytes exceeds the %llu-byte staging buffers",
                  (unsigned long long)c->len, (unsigned long long)s->base.chunk_size);
        return MMA_ERR_BACKEND;
    }
    int slot = slot_get(s, v);
    if (slot < 0) {
        MMA_ERROR("cuda: no free staging slot on gpu%d (scheduler over-committed)", v);
        return MMA_ERR_BACKEND;
    }
    c->staging = slot;
    c->kernel_dev = kernel_dev(s, c);
    int rc = s->use_flags ? flag_reserve(s, c) : MMA_OK;
    if (rc == MMA_OK && s->use_lanes) {
        c->stage = LANE_QUEUED;
        rc = lane_push(s->lanes[v], c);
    } else if (rc == MMA_OK) {
        rc = use_dev(s, v);
        if (rc == MMA_OK)
            rc = issue_relay(s, c);
        if (rc == MMA_OK)
            c->stage = 2;
    }
    if (rc != MMA_OK) {
        if (s->use_flags && c->be_priv)
            s->flag_free[s->flag_nfree++] = (int)(uintptr_t)c->be_priv - 1;
        c->be_priv = NULL;
        slot_put(s, v, slot);
        c->staging = -1;
    }
    return rc;
}

static void monitor_wake(struct monitor *m); /* the link monitor, below */

static int cuda_submit(mmad_backend_t *be, mmad_chunk_t *c)
{
    cuda_be_t *s = (cuda_be_t *)be;
    monitor_wake(s->monitor);
    c->status = MMA_OK;
    c->staging = -1;
    c->kernel_dev = NULL;
    c->kernel_seq = 0;
    c->stage = 0; /* copies queued: 1 for a direct chunk, 2 for a relay */
    c->be_priv = NULL;
    if (c->target < 0 || c->target >= be->gpu_count || c->via < 0 || c->via >= be->gpu_count ||
        (c->dir != MMA_DIR_H2D && c->dir != MMA_DIR_D2H)) {
        MMA_ERROR("cuda: chunk with no such path (target %d, via %d, dir %d)", c->target, c->via, c->dir);
        return MMA_ERR_INVAL;
    }
    int rc = c->via == c->target ? submit_direct(s, c) : submit_relay(s, c);
    if (rc != MMA_OK) {
        gt_release(s, c);
        return rc;
    }
    c->next = NULL;
    if (s->inflight_tail)
        s->inflight_tail->next = c;
    else
        s->inflight_head = c;
    s->inflight_tail = c;
    return MMA_OK;
}

/* Give a finished chunk's completion mark and staging slot back. */
static void chunk_release(cuda_be_t *s, mmad_chunk_t *c)
{
    if (c->be_priv) {
        if (s->use_flags)
            s->flag_free[s->flag_nfree++] = (int)(uintptr_t)c->be_priv - 1;
        else
            event_put(&s->gpu[c->mark_gpu].events, (cudaEvent_t)c->be_priv);
    }
    c->be_priv = NULL;
    slot_put(s, c->via, c->staging);
    c->staging = -1;
    gt_release(s, c);
}

/* A chunk whose mark has not come for long: did one of its copies fail?
 * (cudaStreamQuery returns the error of a failed copy on that stream.) The
 * streams are the ones its submit used: a one-hop relay launched alone runs
 * on the via GPU's PCIe stream (issue_kernel_relay), with --relay-per-slot
 * too, where its staging slot's stream stays idle. */
static cudaError_t chunk_stream_error(cuda_be_t *s, const mmad_chunk_t *c)
{
    cuda_gpu_t *g = &s->gpu[c->via];
    cudaStream_t st[2];
    int n = 0;
    if (c->kernel_seq) {
        resident_t *r = &g->res[c->dir];
        if (!r->alive && c->kernel_seq >= r->from && r->err != cudaSuccess) {
            /* no kernel will take it: the launch keeps failing */
            resident_cancel(s, r, c->kernel_seq);
            return r->err;
        }
        st[n++] = r->stream;
    } else if (c->via == c->target) {
        st[n++] = g->direct[c->dir];
    } else if (c->kernel_dev) {
        st[n++] = g->pcie[c->dir];
    } else if (s->relay_per_slot) {
        st[n++] = g->slot_stream[c->staging];
    } else {
        st[n++] = g->pcie[c->dir];
        st[n++] = s->hop_target ? s->gpu[c->target].pull[c->via][c->dir] : g->nvlink[c->dir];
    }
    for (int i = 0; i < n; i++) {
        cudaError_t err = cudaStreamQuery(st[i]);
        if (err != cudaSuccess && err != cudaErrorNotReady)
            return err;
        (void)cudaGetLastError();
    }
    return cudaSuccess;
}

static int cuda_poll(mmad_backend_t *be, mmad_chunk_t **out, int max)
{
    cuda_be_t *s = (cuda_be_t *)be;
    int n = 0, queried = 0;
    uint64_t now = 0;
    int stale_pass = 0;
    if (s->use_flags && s->inflight_head) {
        now = mma_now_ns();
        if (now - s->stale_check_ns > STALE_NS / 4) {
            stale_pass = 1;
            s->stale_check_ns = now;
        }
    }
    if (s->use_resident)
        resident_tend_all(s);
    mmad_chunk_t *prev = NULL, *c = s->inflight_head;
    /* Chunks on different streams finish out of order: look at all of them,
     * oldest first, and take out each one that is done. */
    while (c && n < max && queried < POLL_QUERY_CAP) {
        mmad_chunk_t *next = c->next;
        queried++;
        cudaError_t err;
        int finished = chunk_finished(s, c, &err);
        /* not while its lane has yet to issue it (the lane may be held in
         * the driver): a stream error would end the chunk and free its
         * slot, word and the chunk itself under the lane */
        if (!finished && stale_pass && now - c->t_issue > STALE_NS &&
            __atomic_load_n(&c->stage, __ATOMIC_ACQUIRE) != LANE_QUEUED) {
            err = chunk_stream_error(s, c);
            finished = err != cudaSuccess;
        }
        if (!finished) {
            prev = c;
            c = next;
            continue;
        }
        if (prev)
            prev->next = next;
        else
            s->inflight_head = next;
        if (s->inflight_tail == c)
            s->inflight_tail = prev;
        c->next = NULL;
        if (err != cudaSuccess) {
            if (c->via == c->target)
                MMA_ERROR("cuda: direct %s copy of %llu bytes on gpu%d failed: %s (%s)",
                          c->dir == MMA_DIR_H2D ? "H2D" : "D2H", (unsigned long long)c->len, c->target,
                          cudaGetErrorString(err), cudaGetErrorName(err));
            else
                MMA_ERROR("cuda: %s relay of %llu bytes via gpu%d for gpu%d failed: %s (%s)",
                          c->dir == MMA_DIR_H2D ? "H2D" : "D2H", (unsigned long long)c->len, c->via,
                          c->target, cudaGetErrorString(err), cudaGetErrorName(err));
            (void)cudaGetLastError();
            c->status = MMA_ERR_BACKEND;
        } else {
            c->status = MMA_OK;
            /* mmad's own bytes on the link they crossed (a relay's PCIe hop
             * is its via GPU's link), for the link monitor */
            atomic_fetch_add_explicit(&s->own_bytes[c->via][c->dir], c->len, memory_order_relaxed);
            if (s->gpu_times)
                gt_resolve(s, c);
        }
        chunk_release(s, c);
        out[n++] = c;
        c = next;
    }
    return n;
}

/* ---- regions ---- */

static int host_register(cuda_be_t *s, mmad_region_t *r)
{
    /* Portable: the pages are pinned for every GPU's context, since any GPU
     * may carry a chunk of this region (relays use the via GPU's streams),
     * so the current device does not matter here. Registering is slow (138
     * ms for 256 MiB in HARDWARE.md), which is why it happens once per
     * region, not per copy. */
    /* Mapped as well: one-hop relays' kernels read and write it. Where
     * mapping fails it is pinned alone and relays stage from then on. */
    uint64_t t0 = mma_now_ns();
    cudaError_t err = cudaErrorNotMapped;
    if (s->kernel_below && !atomic_load(&s->kernel_off)) {
        err = cudaHostRegister(r->base, (size_t)r->size, cudaHostRegisterPortable | cudaHostRegisterMapped);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            atomic_store(&s->kernel_off, 1);
            MMA_WARN("cuda: cannot map host memory for the GPUs (%s); relays stage from now on "
                     "(as --relay-kernel=0)", cudaGetErrorString(err));
        }
    }
    if (err != cudaSuccess)
        CU_CHECK(cudaHostRegister(r->base, (size_t)r->size, cudaHostRegisterPortable));
    MMA_DEBUG("cuda: pinned %llu bytes of host memory in %.1f ms", (unsigned long long)r->size,
              (double)(mma_now_ns() - t0) / 1e6);
    return MMA_OK;
}

/* Drop one use of an IPC mapping; the last one closes it. ipc_lock held. */
static void ipc_release_locked(cuda_be_t *s, ipc_map_t *m)
{
    if (--m->refs > 0)
        return;
    for (ipc_map_t **p = &s->ipc_maps; *p; p = &(*p)->next)
        if (*p == m) {
            *p = m->next;
            break;
        }
    if (CU(cudaSetDevice(m->gpu)) == MMA_OK)
        (void)CU(cudaIpcCloseMemHandle(m->ptr));
    for (int v = 0; v < MMAD_MAX_GPUS; v++)
        if (m->via_ptr[v] && CU(cudaSetDevice(v)) == MMA_OK)
            (void)CU(cudaIpcCloseMemHandle(m->via_ptr[v]));
    free(m);
}

/* One-hop relays through v write and read the allocation through a
 * mapping opened with v current (~2 ms each, once per allocation). Where
 * one cannot be opened, relays through v stage for it. */
static void ipc_open_vias(cuda_be_t *s, ipc_map_t *m, const cudaIpcMemHandle_t *h)
{
    for (int v = 0; s->kernel_below && v < s->base.gpu_count; v++) {
        if (v == m->gpu || !s->base.relay_ok[m->gpu][v] || !s->kernel_ok[v])
            continue;
        void *p = NULL;
        cudaError_t err = cudaSetDevice(v);
        if (err == cudaSuccess)
            err = cudaIpcOpenMemHandle(&p, *h, cudaIpcMemLazyEnablePeerAccess);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            MMA_WARN("cuda: cannot map gpu%d's allocation on gpu%d (%s); its relays through gpu%d stage", m->gpu, v,
                     cudaGetErrorString(err), v);
            continue;
        }
        m->via_ptr[v] = p;
    }
}

/* Open a handle not in the cache yet. ipc_lock held, so the same handle is
 * never opened twice at once. */
static int ipc_open_new(cuda_be_t *s, int gpu, const uint8_t *handle, ipc_map_t **out)
{
    ipc_map_t *m = calloc(1, sizeof *m);
    if (!m)
        return MMA_ERR_NOMEM;
    cudaIpcMemHandle_t h;
    memcpy(&h, handle, sizeof h);
    void *p = NULL;
    uint64_t t0 = mma_now_ns();
    int rc = CU(cudaSetDevice(gpu));
    if (rc == MMA_OK)
        rc = CU(cudaIpcOpenMemHandle(&p, h, cudaIpcMemLazyEnablePeerAccess));
    if (rc != MMA_OK) {
        free(m);
        return rc;
    }
    /* The allocation must live on the GPU the client named: that GPU's
     * links are the ones the scheduler will route its chunks over. */
    struct cudaPointerAttributes attr;
    rc = CU(cudaPointerGetAttributes(&attr, p));
    if (rc == MMA_OK && (attr.type != cudaMemoryTypeDevice || attr.device != gpu)) {
        MMA_WARN("cuda: IPC handle for gpu%d names memory on gpu%d (type %d); refused", gpu, attr.device,
                 (int)attr.type);
        rc = MMA_ERR_INVAL;
    }
    if (rc != MMA_OK) {
        (void)CU(cudaIpcCloseMemHandle(p));
        free(m);
        return rc;
    }
    /* How much memory the mapping covers, so that a region can be checked
     * against it: a client could otherwise claim a larger size and have the
     * daemon copy past its allocation into whatever is mapped next. */
    if (s->addr_range) {
        unsigned long long base = 0;
        size_t size = 0;
        int drv = s->addr_range(&base, &size, (unsigned long long)(uintptr_t)p);
        if (drv == 0 && base <= (uintptr_t)p && (uintptr_t)p - base < size)
            m->size = size - ((uintptr_t)p - base);
        else
            MMA_WARN("cuda: cannot query the size of an IPC mapping on gpu%d (CUresult %d); its regions "
                     "are not bounds-checked",
                     gpu, drv);
    }
    m->gpu = gpu;
    memcpy(m->handle, handle, sizeof m->handle);
    m->ptr = p;
    ipc_open_vias(s, m, &h);
    m->refs = 1;
    m->next = s->ipc_maps;
    s->ipc_maps = m;
    MMA_DEBUG("cuda: opened an IPC handle on gpu%d (%llu bytes) in %.2f ms", gpu, (unsigned long long)m->size,
              (double)(mma_now_ns() - t0) / 1e6);
    *out = m;
    return MMA_OK;
}

static int ipc_open(cuda_be_t *s, mmad_region_t *r, const uint8_t *handle, uint64_t offset)
{
    int rc = MMA_OK;
    ipc_map_t *m;
    pthread_mutex_lock(&s->ipc_lock);
    for (m = s->ipc_maps; m; m = m->next)
        if (m->gpu == r->gpu && memcmp(m->handle, handle, sizeof m->handle) == 0)
            break;
    if (m)
        m->refs++;
    else
        rc = ipc_open_new(s, r->gpu, handle, &m);
    if (rc == MMA_OK && m->size && (offset > m->size || r->size > m->size - offset)) {
        MMA_WARN("cuda: device region [%llu, +%llu) lies outside its %llu-byte allocation on gpu%d",
                 (unsigned long long)offset, (unsigned long long)r->size, (unsigned long long)m->size, r->gpu);
        ipc_release_locked(s, m);
        rc = MMA_ERR_RANGE;
    }
    pthread_mutex_unlock(&s->ipc_lock);
    if (rc != MMA_OK)
        return rc;
    r->base = m->ptr + offset;
    r->be_priv = m;
    return MMA_OK;
}

static int cuda_region_open(mmad_backend_t *be, mmad_region_t *r, const uint8_t *ipc, size_t ipc_len,
                            uint64_t ipc_offset)
{
    cuda_be_t *s = (cuda_be_t *)be;
    if (r->kind == MMAD_REGION_HOST)
        return host_register(s, r);
    if (r->gpu < 0 || r->gpu >= be->gpu_count)
        return MMA_ERR_NO_GPU;
    if (!ipc) {
        /* Device memory as a memfd exists only on the simulated box. */
        MMA_WARN("cuda: a device region needs a cudaIpc handle; a memfd is not GPU memory here");
        return MMA_ERR_UNSUPPORTED;
    }
    if (ipc_len != sizeof(cudaIpcMemHandle_t)) {
        MMA_WARN("cuda: IPC handle of %zu bytes (expected %zu)", ipc_len, sizeof(cudaIpcMemHandle_t));
        return MMA_ERR_INVAL;
    }
    return ipc_open(s, r, ipc, ipc_offset);
}

static void cuda_region_close(mmad_backend_t *be, mmad_region_t *r)
{
    cuda_be_t *s = (cuda_be_t *)be;
    if (r->kind == MMAD_REGION_HOST) {
        (void)CU(cudaHostUnregister(r->base));
        return;
    }
    ipc_map_t *m = r->be_priv;
    if (!m)
        return;
    pthread_mutex_lock(&s->ipc_lock);
    ipc_release_locked(s, m);
    pthread_mutex_unlock(&s->ipc_lock);
    r->be_priv = NULL;
    r->base = NULL;
}

/* ---- life cycle ---- */

/* Apply `fn` (cudaStreamSynchronize or cudaStreamDestroy) to every stream
 * of one GPU that was created; the caller has set that GPU current. */
static void streams_apply(mmad_backend_t *be, cuda_gpu_t *g, cudaError_t (*fn)(cudaStream_t), const char *name)
{
    cudaStream_t all[] = {g->direct[0], g->direct[1], g->pcie[0],      g->pcie[1],
                          g->nvlink[0], g->nvlink[1], g->res[0].stream, g->res[1].stream};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        if (all[k])
            (void)cuda_status(fn(all[k]), name, __func__, MMA_LOG_ERROR);
    for (int i = 0; g->slot_stream && i < be->staging_slots; i++)
        if (g->slot_stream[i])
            (void)cuda_status(fn(g->slot_stream[i]), name, __func__, MMA_LOG_ERROR);
    for (int p = 0; p < MMAD_MAX_GPUS; p++)
        for (int d = 0; d < 2; d++)
            if (g->pull[p][d])
                (void)cuda_status(fn(g->pull[p][d]), name, __func__, MMA_LOG_ERROR);
}

/* Safe on a half-built backend: every resource is checked before release. */
/* ---- the links' other traffic ----
 *
 * A relay through GPU v moves its bytes over v's PCIe link. When v's own
 * process loads v at the same time, the relay's bytes come out of that
 * process's share (the host side is shared too), so the scheduler stops
 * relays through a link that carries traffic that is not mmad's
 * (--busy-gbps). The monitor thread reads each link's traffic from NVML
 * (nvmlDeviceGetPcieThroughput: bytes over a 20 ms window, per direction),
 * takes off mmad's own bytes over the same span, and publishes the rest in
 * be->foreign_mbps. libnvidia-ml comes with the driver and is opened at run
 * time; where it or its counters are missing, nothing is judged. */

typedef int (*nvml_void_fn)(void);
typedef int (*nvml_by_bus_fn)(const char *bus_id, void **device);
typedef int (*nvml_pcie_fn)(void *device, int counter, unsigned int *kbps);
/* nvmlProcessUtilizationSample_t */
typedef struct nvml_proc_sample {
    unsigned int pid;
    unsigned long long ts_us;
    unsigned int sm, mem, enc, dec;
} nvml_proc_sample_t;
typedef int (*nvml_proc_util_fn)(void *device, nvml_proc_sample_t *samples, unsigned int *count,
                                 unsigned long long since_us);
/* nvmlProcessInfo_t, as nvmlDeviceGetComputeRunningProcesses_v3 fills it */
typedef struct nvml_proc_info {
    unsigned int pid;
    unsigned long long used_memory;
    unsigned int gpu_instance, compute_instance;
} nvml_proc_info_t;
typedef int (*nvml_procs_fn)(void *device, unsigned int *count, nvml_proc_info_t *infos);
/* The most compute processes of one GPU monitor_own_pid looks through. */
#define OWN_PID_CAP 256
enum { NVML_OK = 0, NVML_INSUFFICIENT_SIZE = 7, NVML_PCIE_TX = 0, NVML_PCIE_RX = 1 };

/* One GPU's part of a round: its link's counter in both directions, less
 * mmad's own bytes over the same span. */
typedef struct monitor_read {
    struct monitor *m;
    int g;
    uint64_t ta;          /* when the round began */
    uint64_t own0[2];     /* mmad's bytes on this link then */
} monitor_read_t;

typedef struct monitor {
    cuda_be_t *s;
    void *lib;
    nvml_void_fn shutdown;
    nvml_pcie_fn pcie;
    nvml_proc_util_fn proc_util;           /* NULL: NVML cannot say; relay kernels run regardless */
    nvml_procs_fn procs;                   /* NULL: NVML cannot list compute processes */
    /* mmad's own pid as NVML names processes (monitor_own_pid); 0 while
     * not known, when getpid() stands in */
    _Atomic unsigned int own_pid;
    uint64_t own_look_ns;                  /* monitor_own_pid's last look */
    uint64_t own_look_every;               /* and how long until its next: grows while it cannot tell */
    int own_logged;
    unsigned long long proc_since[MMAD_MAX_GPUS]; /* newest sample seen per GPU */
    nvml_proc_sample_t *proc_buf[MMAD_MAX_GPUS];   /* per GPU: each is read by a thread of its own */
    unsigned int proc_cap[MMAD_MAX_GPUS];
    /* When NVML last showed another process's kernels on each GPU (0:
     * never). A one-hop relay kernel there would share the GPU with them
     * (contexts of different processes take turns), so relays through it
     * stage until it has been quiet for KERNEL_QUIET_NS. */
    uint64_t compute_seen_ns[MMAD_MAX_GPUS];
    uint64_t compute_read_ns[MMAD_MAX_GPUS]; /* the last look */
    int compute_busy[MMAD_MAX_GPUS];       /* last verdict */
    void *dev[MMAD_MAX_GPUS];
    pthread_t thread;
    int started;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int stop;
    /* Each GPU's link is read by a thread of its own that lives as long as
     * the monitor ("mmad-link<g>"): the round thread posts round numbers
     * (go), each reader reads once per round and counts itself done (fin).
     * Threads made anew each round (~80 a second on 4 GPUs) hid their CPU
     * time from per-thread counts once they had ended. */
    pthread_cond_t go, fin;
    /* 1 while the rounds come MONITOR_IDLE_GAP_NS apart (mmad has moved no
     * bytes for MONITOR_IDLE_AFTER_NS): the engine's next chunk clears it
     * and wakes the monitor (monitor_wake), so a copy finds fresh readings
     * at once. A reading costs ~1 ms of CPU per GPU and direction in NVML:
     * at the busy cadence 4 readers took 13% of a core with or without
     * copies (4x H200). */
    _Atomic int idle;
    uint64_t round;
    int done;
    pthread_t reader[MMAD_MAX_GPUS];
    int reader_on[MMAD_MAX_GPUS];
    monitor_read_t rd[MMAD_MAX_GPUS];
} monitor_t;

#define MONITOR_GAP_NS 20000000ull
#define MONITOR_IDLE_GAP_NS 500000000ull
#define MONITOR_IDLE_AFTER_NS 1000000000ull

/* Wait up to ns, or, when wakeable (m->idle set before), until
 * monitor_wake (maybe already) cleared m->idle; 1 when told to stop. */
static int monitor_sleep(monitor_t *m, uint64_t ns, int wakeable)
{
    struct timespec ts = mma_deadline_ns(ns);
    pthread_mutex_lock(&m->lock);
    while (!m->stop && !(wakeable && !atomic_load_explicit(&m->idle, memory_order_relaxed)) &&
           pthread_cond_timedwait(&m->cond, &m->lock, &ts) == 0)
        ;
    int stop = m->stop;
    pthread_mutex_unlock(&m->lock);
    return stop;
}

/* The engine has a chunk to issue: an idle monitor goes back to its busy
 * cadence at once (a relaxed load on every chunk, the lock only then). */
static void monitor_wake(struct monitor *m)
{
    if (!m || !atomic_load_explicit(&m->idle, memory_order_relaxed))
        return;
    pthread_mutex_lock(&m->lock);
    atomic_store_explicit(&m->idle, 0, memory_order_relaxed);
    pthread_cond_signal(&m->cond);
    pthread_mutex_unlock(&m->lock);
}

/* mmad's own pid as NVML names processes, so that monitor_compute leaves
 * mmad's own resident kernels out (they keep their blocks busy while they
 * linger). NVML names processes by their pid in the host's PID namespace:
 * in a container getpid() is another number, mmad's own kernels read as
 * another process's, and relays through each GPU staged, came back after
 * KERNEL_QUIET_NS, staged again. /proc cannot tell (NSpid starts at the
 * namespace of the /proc mounted, a container's own). But mmad holds a
 * context on every GPU it drives from start to exit, so NVML lists its pid
 * among every GPU's compute processes: getpid() where listed on every GPU
 * (on some alone it is another process's host pid that happens to equal
 * mmad's in its namespace); else, once one pid alone is listed on every
 * GPU, that one. While another process also holds a context on every GPU
 * the two cannot be told apart and getpid() stands in (README,
 * --relay-kernel-busy-sm). The round thread, every COMPUTE_LOOK_NS until
 * known, the wait doubling (up to OWN_LOOK_MAX_NS) after each look that
 * could not tell. */
#define OWN_LOOK_MAX_NS 16000000000ull
static void monitor_own_pid(monitor_t *m)
{
    cuda_be_t *s = m->s;
    uint64_t t = mma_now_ns();
    if (!m->procs || !m->proc_util || !s->kernel_below || !s->kernel_busy_sm ||
        atomic_load_explicit(&m->own_pid, memory_order_relaxed) ||
        t - m->own_look_ns < m->own_look_every)
        return;
    m->own_look_ns = t;
    unsigned int me = (unsigned int)getpid();
    nvml_proc_info_t info[OWN_PID_CAP];
    unsigned int every[OWN_PID_CAP]; /* pids listed on every GPU so far */
    int nevery = -1, me_every = 1;
    for (int g = 0; g < s->base.gpu_count; g++) {
        unsigned int n = OWN_PID_CAP;
        if (m->procs(m->dev[g], &n, info) != NVML_OK || n > OWN_PID_CAP)
            return; /* NVML cannot say now (or too many): the next look */
        int me_here = 0;
        for (unsigned int i = 0; i < n; i++)
            me_here |= info[i].pid == me;
        me_every &= me_here;
        int kept = 0;
        for (int k = 0; nevery >= 0 && k < nevery; k++)
            for (unsigned int i = 0; i < n; i++)
                if (info[i].pid == every[k]) {
                    every[kept++] = every[k];
                    break;
                }
        for (unsigned int i = 0; nevery < 0 && i < n; i++) {
            int dup = 0;
            for (int k = 0; k < kept; k++)
                dup |= every[k] == info[i].pid;
            if (!dup && info[i].pid)
                every[kept++] = info[i].pid;
        }
        nevery = kept;
    }
    if (me_every) {
        atomic_store_explicit(&m->own_pid, me, memory_order_relaxed);
    } else if (nevery == 1) {
        atomic_store_explicit(&m->own_pid, every[0], memory_order_relaxed);
        MMA_INFO("cuda: NVML names this process pid %u (pid %u in its own PID namespace): its own relay kernels are "
                 "told from other processes' by that",
                 every[0], me);
    } else if (!m->own_logged) {
        m->own_logged = 1;
        MMA_WARN("cuda: NVML does not list pid %u (this process in its PID namespace) on every GPU, and lists %d "
                 "processes with contexts on every GPU, so it cannot tell which one is mmad: mmad's own relay kernels "
                 "may read as another process's (--relay-kernel-busy-sm) until that changes (it looks again at growing "
                 "intervals, at most 16 s apart)",
                 me, nevery < 0 ? 0 : nevery);
    }
    if (!atomic_load_explicit(&m->own_pid, memory_order_relaxed))
        m->own_look_every = 2 * m->own_look_every < OWN_LOOK_MAX_NS ? 2 * m->own_look_every : OWN_LOOK_MAX_NS;
}

/* Did another process run kernels on GPU g since the last look (NVML's
 * per-process SM samples)? Then one-hop relays through g stage for a
 * while; the log says when that starts and ends. */
static void monitor_compute(monitor_t *m, int g)
{
    cuda_be_t *s = m->s;
    if (!m->proc_util || !s->kernel_below || !s->kernel_busy_sm)
        return;
    /* Every COMPUTE_LOOK_NS, not every round: with a look every round
     * (~50 ms) mmad used 10-13 points more of a core at 1 GiB on 4x H200
     * than with relay kernels off (bench/results/
     * 2026-11-27-4xH200-session5-onehop/tune). */
    uint64_t t = mma_now_ns();
    if (t - m->compute_read_ns[g] < COMPUTE_LOOK_NS)
        return;
    m->compute_read_ns[g] = t;
    unsigned int other = 0, sm = 0;
    unsigned int own = atomic_load_explicit(&m->own_pid, memory_order_relaxed);
    if (!own)
        own = (unsigned int)getpid();
    /* Samples newer than proc_since only (NVML stamps them in wall-clock
     * microseconds). NVML wants room for every sample it keeps, whatever
     * the time given (4x H200: 72), and says how many with
     * INSUFFICIENT_SIZE: the buffer grows to that once. */
    unsigned int n = m->proc_cap[g];
    int rc = m->proc_util(m->dev[g], m->proc_buf[g], &n, m->proc_since[g]);
    if (rc == NVML_INSUFFICIENT_SIZE && n > m->proc_cap[g] && n < 65536) {
        nvml_proc_sample_t *grown = realloc(m->proc_buf[g], n * sizeof *grown);
        if (grown) {
            m->proc_buf[g] = grown;
            m->proc_cap[g] = n;
            rc = m->proc_util(m->dev[g], m->proc_buf[g], &n, m->proc_since[g]);
        }
    }
    unsigned long long since = m->proc_since[g];
    for (unsigned int i = 0; rc == NVML_OK && i < n && i < m->proc_cap[g]; i++) {
        const nvml_proc_sample_t *p = &m->proc_buf[g][i];
        if (p->ts_us <= since) /* seen last time (should NVML not filter) */
            continue;
        if (p->ts_us > m->proc_since[g])
            m->proc_since[g] = p->ts_us;
        /* At least --relay-kernel-busy-sm: on 2x H200 a client process that
         * only copies through mmad showed 1-8% (once 45%), a kernel
         * filling gpu1's memory on every SM far more. */
        if (p->pid != own && p->sm >= s->kernel_busy_sm) {
            other = p->pid;
            sm = p->sm;
        }
    }
    uint64_t now = mma_now_ns();
    if (other)
        m->compute_seen_ns[g] = now;
    int busy = m->compute_seen_ns[g] && now - m->compute_seen_ns[g] < KERNEL_QUIET_NS;
    if (busy != m->compute_busy[g]) {
        atomic_store_explicit(&s->base.relay_kernel_now[g], !busy && s->kernel_ok[g], memory_order_relaxed);
        if (busy)
            MMA_INFO("cuda: gpu%d runs another process's kernels (pid %u, %u%% SM): relays through it stage", g,
                     other, sm);
        else
            MMA_INFO("cuda: gpu%d has been free of other processes' kernels for %.1f s: relays through it go in one hop again",
                     g, KERNEL_QUIET_NS / 1e9);
        m->compute_busy[g] = busy;
    }
}

static void *monitor_read_gpu(void *arg)
{
    monitor_read_t *r = arg;
    monitor_t *m = r->m;
    cuda_be_t *s = m->s;
    mmad_backend_t *be = &s->base;
    int g = r->g;
    for (int d = 0; d < 2; d++) {
        unsigned int kbps = 0;
        uint64_t before = atomic_load_explicit(&s->own_bytes[g][d], memory_order_relaxed);
        uint64_t t0 = mma_now_ns();
        int rc = m->pcie(m->dev[g], d == MMA_DIR_H2D ? NVML_PCIE_RX : NVML_PCIE_TX, &kbps);
        uint64_t t1 = mma_now_ns();
        uint64_t after = atomic_load_explicit(&s->own_bytes[g][d], memory_order_relaxed);
        if (rc != NVML_OK)
            continue;
        /* A call that took the counter's 20 ms window itself is compared
         * with mmad's bytes during the call; one that came back at once (a
         * window that had just passed) with mmad's bytes since the round
         * began. */
        double own_mbps = t1 - t0 >= MONITOR_GAP_NS * 3 / 4
                              ? (double)(after - before) / (double)(t1 - t0) * 1000.0
                              : (double)(after - r->own0[d]) / (double)(t1 - r->ta) * 1000.0;
        double foreign = mmad_foreign_mbps((double)kbps / 1000.0, own_mbps);
        atomic_store_explicit(&be->foreign_mbps[g][d], (uint32_t)foreign, memory_order_relaxed);
    }
    monitor_compute(m, g);
    return NULL;
}

/* A GPU's reader: one reading per round posted, until the monitor stops. */
static void *monitor_reader(void *arg)
{
    monitor_read_t *r = arg;
    monitor_t *m = r->m;
    name_gpu_thread("mmad-link", r->g);
    uint64_t seen = 0;
    pthread_mutex_lock(&m->lock);
    for (;;) {
        while (!m->stop && m->round == seen)
            pthread_cond_wait(&m->go, &m->lock);
        if (m->stop)
            break;
        seen = m->round;
        pthread_mutex_unlock(&m->lock);
        monitor_read_gpu(r);
        pthread_mutex_lock(&m->lock);
        m->done++;
        pthread_cond_signal(&m->fin);
    }
    pthread_mutex_unlock(&m->lock);
    return NULL;
}

/* Rounds of readings, every GPU's link read at the same time by its reader
 * thread (one reading waits ~27 ms for the counter's window: one after
 * another, 4 GPUs took ~0.24 s a round, and relays stopped ~0.5 s after a
 * neighbour began loading its GPU). A GPU whose reader could not start is
 * read here, in line. */
static void *monitor_main(void *arg)
{
    monitor_t *m = arg;
    cuda_be_t *s = m->s;
    mmad_backend_t *be = &s->base;
    pthread_setname_np(pthread_self(), "mmad-links");
    monitor_read_t *rd = m->rd;
    int logged = 0, readers = 0;
    for (int g = 0; g < be->gpu_count; g++)
        readers += m->reader_on[g];
    uint64_t moved = 0, active = mma_now_ns(); /* mmad's bytes so far; when they last grew */
    for (;;) {
        uint64_t ta = mma_now_ns(), all = 0;
        for (int g = 0; g < be->gpu_count; g++) {
            rd[g].ta = ta;
            for (int d = 0; d < 2; d++) {
                rd[g].own0[d] = atomic_load_explicit(&s->own_bytes[g][d], memory_order_relaxed);
                all += rd[g].own0[d];
            }
        }
        if (all != moved) {
            moved = all;
            active = ta;
        }
        int idle = ta - active >= MONITOR_IDLE_AFTER_NS;
        atomic_store_explicit(&m->idle, idle, memory_order_relaxed);
        if (monitor_sleep(m, idle ? MONITOR_IDLE_GAP_NS : MONITOR_GAP_NS, idle))
            break;
        if (idle && !atomic_load_explicit(&m->idle, memory_order_relaxed))
            active = mma_now_ns(); /* woken by a chunk: busy cadence from here */
        monitor_own_pid(m);
        uint64_t tr = mma_now_ns();
        pthread_mutex_lock(&m->lock);
        m->round++;
        m->done = 0;
        pthread_cond_broadcast(&m->go);
        pthread_mutex_unlock(&m->lock);
        for (int g = 0; g < be->gpu_count; g++)
            if (!m->reader_on[g])
                monitor_read_gpu(&rd[g]);
        pthread_mutex_lock(&m->lock);
        while (!m->stop && m->done < readers)
            pthread_cond_wait(&m->fin, &m->lock);
        int stop = m->stop;
        pthread_mutex_unlock(&m->lock);
        if (stop)
            break;
        atomic_fetch_add_explicit(&be->foreign_seq, 1, memory_order_release);
        if (!logged) {
            MMA_INFO("cuda: one round of link readings (%d GPUs, both directions, %d reader threads) took %.1f ms",
                     be->gpu_count, readers, (double)(mma_now_ns() - tr) / 1e6);
            logged = 1;
        }
    }
    return NULL;
}

static void monitor_stop(cuda_be_t *s)
{
    monitor_t *m = s->monitor;
    if (!m)
        return;
    pthread_mutex_lock(&m->lock);
    m->stop = 1;
    pthread_cond_broadcast(&m->cond);
    pthread_cond_broadcast(&m->go);
    pthread_cond_broadcast(&m->fin);
    pthread_mutex_unlock(&m->lock);
    if (m->started)
        pthread_join(m->thread, NULL);
    for (int g = 0; g < MMAD_MAX_GPUS; g++)
        if (m->reader_on[g])
            pthread_join(m->reader[g], NULL);
    if (m->shutdown)
        (void)m->shutdown();
    if (m->lib)
        dlclose(m->lib);
    for (int g = 0; g < MMAD_MAX_GPUS; g++)
        free(m->proc_buf[g]);
    pthread_mutex_destroy(&m->lock);
    pthread_cond_destroy(&m->cond);
    pthread_cond_destroy(&m->go);
    pthread_cond_destroy(&m->fin);
    free(m);
    s->monitor = NULL;
    s->base.foreign_known = 0;
}

/* Start watching the links when NVML can; a warning, not an error, when not. */
static void monitor_start(cuda_be_t *s, double busy_gbps)
{
    mmad_backend_t *be = &s->base;
    if (busy_gbps <= 0)
        return;
    monitor_t *m = calloc(1, sizeof *m);
    if (!m)
        return;
    m->s = s;
    m->own_look_every = COMPUTE_LOOK_NS; /* monitor_own_pid: doubled after each look that cannot tell */
    pthread_mutex_init(&m->lock, NULL);
    mma_cond_init_monotonic(&m->cond); /* monitor_sleep's deadlines are CLOCK_MONOTONIC */
    pthread_cond_init(&m->go, NULL);
    pthread_cond_init(&m->fin, NULL);
    s->monitor = m;
    const char *why = NULL;
    nvml_void_fn init = NULL;
    nvml_by_bus_fn by_bus = NULL;
    m->lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!m->lib)
        why = "libnvidia-ml.so.1 cannot be opened";
    if (!why) {
        init = (nvml_void_fn)dlsym(m->lib, "nvmlInit_v2");
        by_bus = (nvml_by_bus_fn)dlsym(m->lib, "nvmlDeviceGetHandleByPciBusId_v2");
        m->pcie = (nvml_pcie_fn)dlsym(m->lib, "nvmlDeviceGetPcieThroughput");
        m->proc_util = (nvml_proc_util_fn)dlsym(m->lib, "nvmlDeviceGetProcessUtilization");
        m->procs = (nvml_procs_fn)dlsym(m->lib, "nvmlDeviceGetComputeRunningProcesses_v3");
        if (!init || !by_bus || !m->pcie)
            why = "libnvidia-ml lacks a function it needs";
        else if (init() != NVML_OK)
            why = "nvmlInit failed";
        else
            m->shutdown = (nvml_void_fn)dlsym(m->lib, "nvmlShutdown");
    }
    unsigned int kbps = 0;
    uint64_t t0 = mma_now_ns();
    for (int g = 0; !why && g < be->gpu_count; g++) {
        if (by_bus(be->gpus[g].pci_bus_id, &m->dev[g]) != NVML_OK)
            why = "NVML does not know a GPU's PCI bus id";
        else if (m->pcie(m->dev[g], NVML_PCIE_RX, &kbps) != NVML_OK)
            why = "NVML has no PCIe throughput counters here";
    }
    for (int g = 0; !why && g < be->gpu_count; g++) {
        m->rd[g].m = m;
        m->rd[g].g = g;
        m->reader_on[g] = pthread_create(&m->reader[g], NULL, monitor_reader, &m->rd[g]) == 0;
    }
    if (!why && pthread_create(&m->thread, NULL, monitor_main, m) != 0)
        why = "the monitor thread cannot start";
    if (why) {
        MMA_WARN("cuda: %s; relays will not see other traffic on the links (--busy-gbps)", why);
        monitor_stop(s);
        return;
    }
    m->started = 1;
    be->foreign_known = 1;
    MMA_INFO("cuda: watching the GPUs' PCIe links through NVML (%.1f ms per reading): relays stop on a link "
             "carrying over %.1f GB/s that is not mmad's",
             (double)(mma_now_ns() - t0) / 1e6 / be->gpu_count, busy_gbps);
    if (s->kernel_below && s->kernel_busy_sm)
        MMA_INFO("cuda: %s %u%%", m->proc_util ? "one-hop relays stage through a GPU where NVML shows another process "
                                                 "keeping its SMs busy, at least"
                                               : "NVML has no per-process SM samples; one-hop relays run whatever "
                                                 "else runs on their GPUs, ignoring --relay-kernel-busy-sm=",
                 s->kernel_busy_sm);
}

static void cuda_destroy(mmad_backend_t *be)
{
    cuda_be_t *s = (cuda_be_t *)be;
    monitor_stop(s);
    /* Lanes first: nothing may issue copies while the streams drain. */
    for (int gi = 0; gi < be->gpu_count; gi++)
        lane_stop(s, gi);
    if (s->n_copy)
        MMA_INFO("cuda: engine time in %llu copy calls: %.2f us each; per copy call also %.2f us of "
                 "hop event record+wait, %.2f us of completion marks, %.2f us of context switches (%s copies)",
                 (unsigned long long)s->n_copy, s->t_copy_ns / 1e3 / (double)s->n_copy,
                 s->t_hop_ns / 1e3 / (double)s->n_copy, s->t_mark_ns / 1e3 / (double)s->n_copy,
                 s->t_ctx_ns / 1e3 / (double)s->n_copy, s->copy_driver ? "driver" : "runtime");
    if (s->n_kernel)
        MMA_INFO("cuda: %llu of those were one-hop relays (%llu resident kernel launches: %llu after a pause, "
                 "%llu at a kernel's life with chunks waiting, %llu at its life ahead of the next chunk)",
                 (unsigned long long)s->n_kernel,
                 (unsigned long long)atomic_load_explicit(&s->base.relay_kernel_launches, memory_order_relaxed),
                 (unsigned long long)s->res_launch_why[0], (unsigned long long)s->res_launch_why[1],
                 (unsigned long long)s->res_launch_why[2]);
    for (int gi = 0; gi < be->gpu_count; gi++) {
        cuda_gpu_t *g = &s->gpu[gi];
        if (CU(cudaSetDevice(gi)) != MMA_OK)
            continue;
        /* Let every queued copy finish before its buffers and events go. */
        streams_apply(be, g, cudaStreamSynchronize, "cudaStreamSynchronize");
    }
    /* Chunks nobody polled hold events; return them so that all are freed. */
    while (s->inflight_head) {
        mmad_chunk_t *c = s->inflight_head;
        s->inflight_head = c->next;
        chunk_release(s, c);
    }
    s->inflight_tail = NULL;
    for (int gi = 0; gi < be->gpu_count; gi++) {
        cuda_gpu_t *g = &s->gpu[gi];
        if (CU(cudaSetDevice(gi)) != MMA_OK)
            continue;
        streams_apply(be, g, cudaStreamDestroy, "cudaStreamDestroy");
        if (g->staging)
            for (int i = 0; i < be->staging_slots; i++)
                if (g->staging[i])
                    (void)CU(cudaFree(g->staging[i]));
        free(g->slot_stream);
        for (int d = 0; d < 2; d++)
            if (g->res[d].state)
                (void)CU(cudaFree(g->res[d].state));
        for (int i = 0; i < g->events.n; i++)
            (void)CU(cudaEventDestroy(g->events.ev[i]));
        free(g->events.ev);
        for (int i = 0; i < g->tev.n; i++)
            (void)CU(cudaEventDestroy(g->tev.ev[i]));
        free(g->tev.ev);
        if (g->anchor)
            (void)CU(cudaEventDestroy(g->anchor));
        free(g->staging);
        free(g->slot_used);
    }
    /* Regions close before the backend goes; a mapping left here means a
     * region was leaked, but it is closed all the same. */
    while (s->ipc_maps) {
        ipc_map_t *m = s->ipc_maps;
        MMA_WARN("cuda: an IPC mapping on gpu%d still had %d user(s) at shutdown", m->gpu, m->refs);
        m->refs = 1;
        ipc_release_locked(s, m);
    }
    if (s->flags)
        (void)CU(cudaFreeHost((void *)s->flags));
    if (s->res_host)
        (void)CU(cudaFreeHost(s->res_host));
    for (int gi = 0; gi < be->gpu_count; gi++) {
        CUdevice dev;
        if (s->ctx[gi] && s->drv.device_get(&dev, gi) == CUDA_SUCCESS)
            (void)DRV(s->drv.primary_release(dev));
    }
    pthread_mutex_destroy(&s->ipc_lock);
    free(s);
}

/* A driver function by name, or NULL. */
static void *drv_entry(const char *sym)
{
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (CU_WARN(cudaGetDriverEntryPointByVersion(sym, &fn, 12000, cudaEnableDefault, &found)) != MMA_OK ||
        found != cudaDriverEntryPointSuccess)
        return NULL;
    return fn;
}

/* Fetch the driver calls of the data path; all are required. */
static int drv_load(cuda_be_t *s)
{
    drv_t *d = &s->drv;
    struct {
        void **fn;
        const char *sym;
    } want[] = {
        {(void **)&d->htod, "cuMemcpyHtoDAsync"},
        {(void **)&d->dtoh, "cuMemcpyDtoHAsync"},
        {(void **)&d->dtod, "cuMemcpyDtoDAsync"},
        {(void **)&d->ev_record, "cuEventRecord"},
        {(void **)&d->wait_event, "cuStreamWaitEvent"},
        {(void **)&d->write64, "cuStreamWriteValue64"},
        {(void **)&d->ctx_set, "cuCtxSetCurrent"},
        {(void **)&d->ctx_get, "cuCtxGetCurrent"},
        {(void **)&d->device_get, "cuDeviceGet"},
        {(void **)&d->primary_retain, "cuDevicePrimaryCtxRetain"},
        {(void **)&d->primary_release, "cuDevicePrimaryCtxRelease"},
        {(void **)&d->dev_attr, "cuDeviceGetAttribute"},
        {(void **)&d->err_name, "cuGetErrorName"},
        {(void **)&d->err_string, "cuGetErrorString"},
    };
    for (size_t i = 0; i < sizeof want / sizeof want[0]; i++) {
        *want[i].fn = drv_entry(want[i].sym);
        if (!*want[i].fn) {
            MMA_ERROR("cuda: the driver has no %s", want[i].sym);
            return MMA_ERR_CUDA;
        }
    }
    return MMA_OK;
}

static int gpu_setup(cuda_be_t *s, int gi)
{
    mmad_backend_t *be = &s->base;
    cuda_gpu_t *g = &s->gpu[gi];
    mmad_gpu_t *info = &be->gpus[gi];
    struct cudaDeviceProp prop;
    CU_CHECK(cudaGetDeviceProperties(&prop, gi));
    info->index = gi;
    snprintf(info->name, sizeof info->name, "%.*s", (int)sizeof info->name - 1, prop.name);
    CU_CHECK(cudaDeviceGetPCIBusId(info->pci_bus_id, (int)sizeof info->pci_bus_id, gi));
    info->memory = prop.totalGlobalMem;
    info->numa_node = -1; /* topo.c fills these in where hwloc knows */
    info->socket = 0;

    CU_CHECK(cudaSetDevice(gi));
    /* The runtime made gi's primary context current; the engine thread
     * switches between these with cuCtxSetCurrent. */
    CUdevice dev;
    DRV_CHECK(s->drv.device_get(&dev, gi));
    DRV_CHECK(s->drv.primary_retain(&s->ctx[gi], dev));
    int memops = 0;
    if (DRV(s->drv.dev_attr(&memops, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, dev)) != MMA_OK || !memops)
        s->use_flags = 0;
    /* One-hop relay kernels on gi take registered host pointers as they are. */
    int host_ptr = 0;
    if (s->kernel_below &&
        CU_WARN(cudaDeviceGetAttribute(&host_ptr, cudaDevAttrCanUseHostPointerForRegisteredMem, gi)) == MMA_OK)
        s->kernel_ok[gi] = host_ptr != 0;
    if (s->kernel_below && !s->kernel_ok[gi])
        MMA_WARN("cuda: gpu%d cannot use registered host pointers; relays through it stage", gi);
    /* nor where the build has no code for gi (it is built for sm_90, whose
     * PTX serves newer GPUs, unless CMAKE_CUDA_ARCHITECTURES says
     * otherwise) */
    cudaError_t kerr = s->kernel_ok[gi] ? mmad_relay_kernel_loadable() : cudaSuccess;
    if (kerr != cudaSuccess) {
        (void)cudaGetLastError();
        MMA_WARN("cuda: gpu%d (%s, compute capability %d.%d) cannot run mmad's relay kernels: %s (%s); relays "
                 "through it stage",
                 gi, prop.name, prop.major, prop.minor, cudaGetErrorString(kerr), cudaGetErrorName(kerr));
        s->kernel_ok[gi] = 0;
    }
    atomic_store(&be->relay_kernel_now[gi], s->kernel_ok[gi]);
    /* Non-blocking: the copies must not synchronize with the legacy default
     * stream, which nothing here uses but a library in the process might. */
    for (int d = 0; d < 2; d++) {
        CU_CHECK(cudaStreamCreateWithFlags(&g->direct[d], cudaStreamNonBlocking));
        CU_CHECK(cudaStreamCreateWithFlags(&g->pcie[d], cudaStreamNonBlocking));
        CU_CHECK(cudaStreamCreateWithFlags(&g->nvlink[d], cudaStreamNonBlocking));
        for (int p = 0; s->hop_target && p < be->gpu_count; p++)
            if (p != gi)
                CU_CHECK(cudaStreamCreateWithFlags(&g->pull[p][d], cudaStreamNonBlocking));
    }
    g->staging = calloc((size_t)be->staging_slots, sizeof *g->staging);
    g->slot_used = calloc((size_t)be->staging_slots, 1);
    g->slot_stream = calloc((size_t)be->staging_slots, sizeof *g->slot_stream);
    if (!g->staging || !g->slot_used || !g->slot_stream)
        return MMA_ERR_NOMEM;
    for (int i = 0; i < be->staging_slots; i++) {
        CU_CHECK(cudaMalloc(&g->staging[i], be->chunk_size));
        CU_CHECK(cudaStreamCreateWithFlags(&g->slot_stream[i], cudaStreamNonBlocking));
    }
    /* Enough events for everything the scheduler can put on this GPU at
     * once: path_depth direct chunks per direction, one per staging slot,
     * and one more for a relay's first hop while it is being queued. */
    g->events.flags = cudaEventDisableTiming; /* cheaper to record and to query */
    return pool_grow(&g->events, 2 * be->path_depth + be->staging_slots + 1);
}

/* Rings, exit words, streams and kernel state for the resident relay
 * kernels of every GPU that can run one-hop relays. */
static int resident_setup(cuda_be_t *s)
{
    mmad_backend_t *be = &s->base;
    size_t ring_bytes = MMAD_RELAY_RING * sizeof(mmad_relay_desc_t), per = ring_bytes + 64;
    size_t total = (size_t)be->gpu_count * 2 * per + 64;
    CU_CHECK(cudaHostAlloc(&s->res_host, total, cudaHostAllocPortable | cudaHostAllocMapped));
    memset(s->res_host, 0, total);
    char *p = s->res_host;
    s->res_dummy = (unsigned long long *)(p + total - 64);
    for (int gi = 0; gi < be->gpu_count; gi++) {
        if (!s->kernel_ok[gi])
            continue;
        CU_CHECK(cudaSetDevice(gi));
        for (int d = 0; d < 2; d++) {
            resident_t *r = &s->gpu[gi].res[d];
            r->ring = (mmad_relay_desc_t *)(p + (size_t)(gi * 2 + d) * per);
            r->exit_word = (unsigned long long *)((char *)r->ring + ring_bytes);
            r->next_seq = r->from = 1;
            CU_CHECK(cudaStreamCreateWithFlags(&r->stream, cudaStreamNonBlocking));
            CU_CHECK(cudaMalloc((void **)&r->state, sizeof *r->state));
            CU_CHECK(cudaMemset(r->state, 0, sizeof *r->state));
        }
        /* the kernels' streams do not wait for the legacy stream's memset */
        CU_CHECK(cudaDeviceSynchronize());
    }
    return MMA_OK;
}

/* Every block of a resident kernel must be resident at once (blocks wait
 * for block 0's hand-over and count each chunk done together:
 * relay_kernel.h), and a via GPU runs one for each direction at the same
 * time. --relay-kernel-blocks (up to 1024 of 512 threads; an H200 holds
 * 4 x 132) is cut to half what the occupancy calculator says the smallest
 * of those GPUs holds, with a warning. Where not even one block each fits,
 * one-hop relays launch a kernel per chunk instead (as
 * --relay-linger-us=0). The main thread, before resident_setup. */
static int resident_blocks(cuda_be_t *s)
{
    int fit = INT_MAX;
    for (int gi = 0; gi < s->base.gpu_count; gi++) {
        if (!s->kernel_ok[gi])
            continue;
        int blocks = 0;
        int rc = use_dev(s, gi);
        if (rc != MMA_OK)
            return rc;
        /* gpu_setup found code for gi's relay kernels, so this should not
         * fail; should it, one-hop relays stage rather than mmad not start
         * (kernel_ok stays: the link monitor's thread reads it) */
        cudaError_t err = mmad_relay_resident_fit(&blocks);
        if (err != cudaSuccess) {
            (void)cudaGetLastError();
            MMA_WARN("cuda: gpu%d: cannot tell how many relay kernel blocks it holds: %s (%s); relays stage "
                     "(as --relay-kernel=0)",
                     gi, cudaGetErrorString(err), cudaGetErrorName(err));
            atomic_store(&s->kernel_off, 1);
            s->use_resident = 0;
            return MMA_OK;
        }
        if (blocks / 2 < fit)
            fit = blocks / 2;
    }
    if (fit == INT_MAX || s->kernel_blocks <= fit)
        return MMA_OK;
    if (fit < 1) {
        MMA_WARN("cuda: a GPU here cannot hold two resident relay kernels at once; one-hop relays launch a "
                 "kernel per chunk (as --relay-linger-us=0)");
        s->use_resident = 0;
        return MMA_OK;
    }
    MMA_WARN("cuda: --relay-kernel-blocks=%d: a resident relay kernel needs all its blocks resident at once, "
             "beside the other direction's; using %d",
             s->kernel_blocks, fit);
    s->kernel_blocks = fit;
    return MMA_OK;
}

/* Turn on peer access between every pair that supports it and decide which
 * relays may run: a relay through v for target t copies between v's and t's
 * memory in both directions' chunks, so it needs access both ways. */
static void peer_setup(cuda_be_t *s)
{
    mmad_backend_t *be = &s->base;
    int n = be->gpu_count;
    unsigned char peer[MMAD_MAX_GPUS][MMAD_MAX_GPUS] = {{0}}; /* peer[a][b]: a reaches b's memory */
    for (int a = 0; a < n; a++) {
        if (CU_WARN(cudaSetDevice(a)) != MMA_OK)
            continue;
        for (int b = 0; b < n; b++) {
            int can = 0;
            if (a == b || CU_WARN(cudaDeviceCanAccessPeer(&can, a, b)) != MMA_OK || !can)
                continue;
            cudaError_t err = cudaDeviceEnablePeerAccess(b, 0);
            if (err == cudaErrorPeerAccessAlreadyEnabled) {
                (void)cudaGetLastError(); /* someone in this process did it first: fine */
                err = cudaSuccess;
            }
            if (err != cudaSuccess) {
                MMA_WARN("cuda: peer_setup: cudaDeviceEnablePeerAccess (gpu%d -> gpu%d) failed: %s (%s)", a, b,
                         cudaGetErrorString(err), cudaGetErrorName(err));
                (void)cudaGetLastError();
                continue;
            }
            peer[a][b] = 1;
        }
    }
    for (int t = 0; t < n; t++)
        for (int v = 0; v < n; v++) {
            be->relay_ok[t][v] = v != t && peer[t][v] && peer[v][t];
            if (v != t && !be->relay_ok[t][v])
                snprintf(be->relay_note[t][v], sizeof be->relay_note[t][v], "no peer access");
        }
}

static void describe(mmad_backend_t *be)
{
    int n = be->gpu_count, pairs = 0, peered = 0, same = 1;
    for (int t = 0; t < n; t++) {
        if (strcmp(be->gpus[t].name, be->gpus[0].name) != 0)
            same = 0;
        for (int v = 0; v < n; v++)
            if (v != t) {
                pairs++;
                peered += be->relay_ok[t][v];
            }
    }
    char peers[48];
    if (pairs == 0)
        snprintf(peers, sizeof peers, "no peers");
    else if (peered == pairs)
        snprintf(peers, sizeof peers, "peer access all pairs");
    else
        snprintf(peers, sizeof peers, "peer access %d of %d pairs", peered, pairs);
    if (same)
        snprintf(be->topology, sizeof be->topology, "%d x %s, %s", n, be->gpus[0].name, peers);
    else
        snprintf(be->topology, sizeof be->topology, "%d GPUs (%s, ...), %s", n, be->gpus[0].name, peers);
}

static const mmad_backend_ops_t cuda_ops = {
    .name = "cuda",
    .region_open = cuda_region_open,
    .region_close = cuda_region_close,
    .prepare = cuda_prepare,
    .submit = cuda_submit,
    .poll = cuda_poll,
    .destroy = cuda_destroy,
};

int mmad_backend_cuda_create(const mmad_config_t *cfg, mmad_backend_t **out)
{
    if (cfg->chunk_size == 0 || cfg->staging_slots < 1 || cfg->path_depth < 1) {
        MMA_ERROR("cuda: chunk size, staging slots and path depth must be positive");
        return MMA_ERR_INVAL;
    }
    if (strcmp(cfg->hop_side, "via") != 0 && strcmp(cfg->hop_side, "target") != 0) {
        MMA_ERROR("cuda: --hop-side=%s: expected via or target", cfg->hop_side);
        return MMA_ERR_INVAL;
    }
    if (strcmp(cfg->copy_api, "driver") != 0 && strcmp(cfg->copy_api, "runtime") != 0) {
        MMA_ERROR("cuda: --copy-api=%s: expected runtime or driver", cfg->copy_api);
        return MMA_ERR_INVAL;
    }
    int want_flags = strcmp(cfg->completion, "flags") == 0;
    if (!want_flags && strcmp(cfg->completion, "events") != 0 && strcmp(cfg->completion, "auto") != 0) {
        MMA_ERROR("cuda: --completion=%s: expected auto, flags or events", cfg->completion);
        return MMA_ERR_INVAL;
    }
    int n = mmad_cuda_device_count();
    if (n <= 0) {
        MMA_ERROR("cuda: no CUDA GPU is visible");
        return MMA_ERR_NO_GPU;
    }
    if (n > MMAD_MAX_GPUS) {
        MMA_WARN("cuda: %d GPUs visible; using the first %d", n, MMAD_MAX_GPUS);
        n = MMAD_MAX_GPUS;
    }
    cuda_be_t *s = calloc(1, sizeof *s);
    if (!s)
        return MMA_ERR_NOMEM;
    pthread_mutex_init(&s->ipc_lock, NULL);
    mmad_backend_t *be = &s->base;
    be->ops = &cuda_ops;
    be->simulated = 0;
    be->event_driven = 0; /* nothing tells the engine a copy ended: it polls */
    be->sim_scale = 1.0;
    be->gpu_count = n;
    be->chunk_size = cfg->chunk_size;
    s->relay_per_slot = cfg->relay_per_slot;
    /* The target-side hop switches contexts on the engine thread; relays
     * issued by lanes (--submit-threads=1) keep the via GPU's. */
    s->hop_target = strcmp(cfg->hop_side, "target") == 0 && !cfg->submit_threads;
    if (cfg->submit_threads && strcmp(cfg->hop_side, "target") == 0)
        MMA_INFO("cuda: --submit-threads=1: relays' NVLink hops run on the via GPU (as --hop-side=via)");
    s->copy_driver = strcmp(cfg->copy_api, "driver") == 0;
    be->staging_slots = cfg->staging_slots;
    be->path_depth = cfg->path_depth;
    s->kernel_below = cfg->relay_kernel;
    s->kernel_blocks = cfg->relay_kernel_blocks > 0 ? cfg->relay_kernel_blocks : 16;
    s->kernel_busy_sm = cfg->relay_kernel_busy_sm > 0 ? (unsigned int)cfg->relay_kernel_busy_sm : 0;
    s->linger_ns = cfg->relay_linger_us > 0 ? (uint64_t)cfg->relay_linger_us * 1000 : 0;
    be->relay_kernel_below = s->kernel_below;
    be->relay_kernel_overhead_us = KERNEL_RELAY_OVERHEAD_US;

    s->use_flags = strcmp(cfg->completion, "events") != 0; /* gpu_setup clears it where unsupported */
    int rc = drv_load(s);
    for (int g = 0; g < n && rc == MMA_OK; g++)
        rc = gpu_setup(s, g);
    if (rc == MMA_OK && s->use_flags) {
        void *p = NULL;
        rc = CU(cudaHostAlloc(&p, FLAG_CAP * sizeof(uint64_t), cudaHostAllocPortable | cudaHostAllocMapped));
        if (rc == MMA_OK) {
            memset(p, 0, FLAG_CAP * sizeof(uint64_t));
            s->flags = p;
            for (int i = FLAG_CAP - 1; i >= 0; i--)
                s->flag_free[s->flag_nfree++] = i;
        }
    }
    if (rc == MMA_OK && want_flags && !s->use_flags) {
        MMA_ERROR("cuda: --completion=flags, but a GPU here cannot do 64-bit stream memory operations");
        rc = MMA_ERR_INVAL;
    }
    if (rc == MMA_OK)
        monitor_start(s, cfg->busy_gbps);
    s->use_lanes = s->use_flags && cfg->submit_threads;
    for (int g = 0; rc == MMA_OK && s->use_lanes && g < n; g++)
        rc = lane_start(s, g);
    /* Resident kernels write completion words themselves and are fed by the
     * engine thread alone. */
    s->use_resident = s->kernel_below && s->linger_ns && s->use_flags && !s->use_lanes;
    if (rc == MMA_OK && s->use_resident)
        rc = resident_blocks(s);
    if (rc == MMA_OK && s->use_resident)
        rc = resident_setup(s);
    be->relay_kernel_resident = s->use_resident;
    /* --trace-gpu: chunks' copies timed on the GPUs too (lanes would share
     * the timing pools with the engine thread: not then) */
    if (rc == MMA_OK && cfg->trace_path[0] && cfg->trace_gpu && !s->use_lanes) {
        s->gpu_times = gt_setup(s) == MMA_OK;
        if (!s->gpu_times)
            MMA_WARN("cuda: --trace-gpu: cannot time chunks on the GPUs; the trace has host times only");
    } else if (rc == MMA_OK && cfg->trace_path[0] && cfg->trace_gpu) {
        MMA_WARN("cuda: --trace-gpu does not time chunks that --submit-threads=1 issues; the trace has host times only");
    }
    if (s->use_resident)
        be->relay_kernel_overhead_us = RESIDENT_RELAY_OVERHEAD_US;
    if (rc == MMA_OK)
        MMA_INFO("cuda: chunks complete by %s; relays issued by %s; %s", s->use_flags ? "stream-written flags" : "events",
                 s->use_lanes ? "one thread per GPU" : "the engine thread",
                 !s->kernel_below  ? "relays stage"
                 : s->use_resident ? "copies below --relay-kernel relay in one hop (resident copy kernels on the "
                                     "via GPUs, --relay-linger-us)"
                                   : "copies below --relay-kernel relay in one hop (a copy kernel on the via GPU)");
    if (rc != MMA_OK) {
        MMA_ERROR("cuda: cannot set up the GPUs: %s", rc == MMA_ERR_NOMEM ? "out of memory" : "CUDA error");
        cuda_destroy(be);
        return rc;
    }
    peer_setup(s);
    /* The description first: topo.c appends to it, and may set aside relays
     * that peer access alone would allow. */
    describe(be);
    mmad_topo_fill(be);
    be->bypass_threshold = mmad_bypass_for(be, cfg->bypass_threshold,
                                           s->kernel_below ? KERNEL_BYPASS_THRESHOLD : DEFAULT_BYPASS_THRESHOLD,
                                           cfg->max_paths);
    if (be->bypass_threshold == MMAD_BYPASS_ALL)
        MMA_INFO("cuda: %s, so every copy has only its own GPU's link: libmma runs every copy natively "
                 "(--bypass-threshold sends copies through mmad anyway)",
                 n == 1 ? "one GPU" : cfg->max_paths == 1 ? "--max-paths=1" : "no GPU can relay for another");

    /* Used only to bounds-check IPC regions; without it they go unchecked. */
    void *fn = drv_entry("cuMemGetAddressRange");
    if (fn)
        s->addr_range = (addr_range_fn)fn;
    else
        MMA_WARN("cuda: cuMemGetAddressRange is not available; device regions will not be bounds-checked");
    *out = be;
    return MMA_OK;
}
