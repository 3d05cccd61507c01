/* The CUDA backend: chunk copies on the GPUs of this box.
 *
 * Paths. A direct chunk is one cudaMemcpyAsync between pinned host memory and
 * the target GPU, so it rides the target's own PCIe link. A relay chunk
 * through GPU v is two copies through one of v's staging buffers: host ->
 * staging over v's PCIe link, then staging -> target over NVLink (H2D); the
 * device -> host relay mirrors it (target -> staging over NVLink, then
 * staging -> host over v's PCIe link).
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
 * Completion. After a chunk's last copy the backend records an event from a
 * pool; the chunk is done when cudaEventQuery says the event completed. A
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
 * Threads. submit and poll run on the engine thread only: the in-flight list,
 * the event pools and the staging slots are theirs and take no lock.
 * region_open and region_close run on the loop thread; the one thing they
 * keep is the cache of opened IPC mappings, under ipc_lock. The CUDA runtime
 * itself is thread-safe, but its current device is per thread, so every
 * function sets the device it needs before its calls. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <cuda_runtime_api.h>

#include "backend.h"
#include "log.h"
#include "mma.h"
#include "topo.h"
#include "util.h"

/* The most events one poll() call queries. The scheduler keeps far fewer
 * chunks in flight (paths x depth), so every chunk is seen each pass; the cap
 * only bounds a pass if that ever changes. */
#define POLL_QUERY_CAP 256

/* Copies smaller than this go native (plain cudaMemcpyAsync in the client).
 * Measured with mma-bench on 4x H200 (bench/results/2026-11-27-4xH200-*):
 * through mmad, 4 MiB ran at 0.67-0.84x native, 8 MiB at 1.03-1.13x and
 * 16 MiB at 1.22-1.49x, in both directions. 12 MiB keeps every size at or
 * above native; --bypass-threshold overrides it. */
#define DEFAULT_BYPASS_THRESHOLD (12ll << 20)

/* cuMemGetAddressRange_v2, fetched from the driver at run time (the daemon
 * links the runtime only, so that it starts on machines without a driver).
 * The types are spelled out here: CUresult is an enum, CUdeviceptr an
 * unsigned 64-bit integer. */
typedef int (*addr_range_fn)(unsigned long long *base, size_t *size, unsigned long long ptr);

typedef struct ev_pool {
    cudaEvent_t *ev; /* free events: ev[0..n) */
    int n;
    int created;     /* every event of this GPU, free or in use */
    int cap;         /* room in ev[], always >= created */
} ev_pool_t;

typedef struct cuda_gpu {
    cudaStream_t direct[2];
    cudaStream_t pcie[2];
    cudaStream_t nvlink[2];
    void **staging;          /* staging_slots buffers of chunk_size bytes */
    cudaStream_t *slot_stream; /* --relay-per-slot: one stream per staging buffer */
    unsigned char *slot_used;
    ev_pool_t events;
} cuda_gpu_t;

/* One opened cudaIpc handle. The same client allocation may be registered
 * several times (several tensors of one allocation); it is opened once and
 * shared, because opening costs ~2 ms. */
typedef struct ipc_map {
    int gpu;
    unsigned char handle[sizeof(cudaIpcMemHandle_t)];
    char *ptr;               /* where the allocation starts in this process */
    uint64_t size;           /* bytes mapped at ptr; 0 when the driver could not say */
    int refs;                /* regions using it */
    struct ipc_map *next;
} ipc_map_t;

typedef struct cuda_be {
    mmad_backend_t base;
    cuda_gpu_t gpu[MMAD_MAX_GPUS];
    mmad_chunk_t *inflight_head, *inflight_tail; /* oldest first, linked by ->next */
    pthread_mutex_t ipc_lock;
    ipc_map_t *ipc_maps;
    addr_range_fn addr_range;
    int relay_per_slot;
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
        /* Timing off: such events are cheaper to record and to query. */
        CU_CHECK(cudaEventCreateWithFlags(&p->ev[p->n], cudaEventDisableTiming));
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

static int submit_direct(cuda_be_t *s, mmad_chunk_t *c)
{
    int t = c->target;
    cuda_gpu_t *g = &s->gpu[t];
    cudaStream_t st = g->direct[c->dir];
    void *dst = c->dir == MMA_DIR_H2D ? (void *)c->dev : (void *)c->host;
    const void *src = c->dir == MMA_DIR_H2D ? (const void *)c->host : (const void *)c->dev;
    cudaEvent_t done;
    CU_CHECK(cudaSetDevice(t));
    /* The event is taken before the copy is queued, so that recording it is
     * the only step that can fail with a copy already running. */
    int rc = event_get(&g->events, &done);
    if (rc != MMA_OK)
        return rc;
    rc = CU(cudaMemcpyAsync(dst, src, c->len, cudaMemcpyDefault, st));
    if (rc == MMA_OK) {
        rc = CU(cudaEventRecord(done, st));
        if (rc != MMA_OK)
            drain(st);
    }
    if (rc != MMA_OK) {
        event_put(&g->events, done);
        return rc;
    }
    c->be_priv = done;
    c->stage = 1;
    return MMA_OK;
}

/* Queue the relay's two hops on via's streams; `first` fills the staging
 * buffer, `second` empties it once `hop` (recorded after the first) is
 * reached. Returns 1 in *queued once any copy was queued. */
static int queue_relay(mmad_chunk_t *c, char *stage, cudaEvent_t hop, cudaEvent_t done, cudaStream_t first,
                       cudaStream_t second, int *queued)
{
    int t = c->target, v = c->via;
    int rc;
    if (c->dir == MMA_DIR_H2D)
        rc = CU(cudaMemcpyAsync(stage, c->host, c->len, cudaMemcpyDefault, first));
    else
        rc = CU(cudaMemcpyPeerAsync(stage, v, c->dev, t, c->len, first));
    if (rc != MMA_OK)
        return rc;
    *queued = 1;
    CU_CHECK(cudaEventRecord(hop, first));
    CU_CHECK(cudaStreamWaitEvent(second, hop, 0));
    if (c->dir == MMA_DIR_H2D)
        CU_CHECK(cudaMemcpyPeerAsync(c->dev, t, stage, v, c->len, second));
    else
        CU_CHECK(cudaMemcpyAsync(c->host, stage, c->len, cudaMemcpyDefault, second));
    CU_CHECK(cudaEventRecord(done, second));
    return MMA_OK;
}

static int submit_relay(cuda_be_t *s, mmad_chunk_t *c)
{
    int t = c->target, v = c->via;
    cuda_gpu_t *g = &s->gpu[v];
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
    cudaEvent_t hop = NULL, done = NULL;
    int rc = CU(cudaSetDevice(v));
    if (rc == MMA_OK)
        rc = event_get(&g->events, &hop);
    if (rc == MMA_OK && (rc = event_get(&g->events, &done)) != MMA_OK)
        event_put(&g->events, hop);
    if (rc != MMA_OK) {
        slot_put(s, v, slot);
        return rc;
    }
    if (s->relay_per_slot) {
        /* Both hops in order on the slot's own stream: no event between
         * streams. The slot is this chunk's alone until it completes, so its
         * stream is idle now; chunks on other slots overlap with it. */
        cudaStream_t st = g->slot_stream[slot];
        char *stage = g->staging[slot];
        if (c->dir == MMA_DIR_H2D) {
            rc = CU(cudaMemcpyAsync(stage, c->host, c->len, cudaMemcpyDefault, st));
            if (rc == MMA_OK)
                rc = CU(cudaMemcpyPeerAsync(c->dev, t, stage, v, c->len, st));
        } else {
            rc = CU(cudaMemcpyPeerAsync(stage, v, c->dev, t, c->len, st));
            if (rc == MMA_OK)
                rc = CU(cudaMemcpyAsync(c->host, stage, c->len, cudaMemcpyDefault, st));
        }
        if (rc == MMA_OK)
            rc = CU(cudaEventRecord(done, st));
        event_put(&g->events, hop);
        if (rc != MMA_OK) {
            drain(st);
            event_put(&g->events, done);
            slot_put(s, v, slot);
            return rc;
        }
        c->be_priv = done;
        c->staging = slot;
        c->stage = 2;
        return MMA_OK;
    }
    /* H2D: host -> staging on the PCIe stream, then staging -> target on the
     * NVLink stream. D2H: target -> staging on the NVLink stream, then
     * staging -> host on the PCIe stream. */
    cudaStream_t first = c->dir == MMA_DIR_H2D ? g->pcie[MMA_DIR_H2D] : g->nvlink[MMA_DIR_D2H];
    cudaStream_t second = c->dir == MMA_DIR_H2D ? g->nvlink[MMA_DIR_H2D] : g->pcie[MMA_DIR_D2H];
    int queued = 0;
    rc = queue_relay(c, g->staging[slot], hop, done, first, second, &queued);
    if (rc != MMA_OK) {
        if (queued) {
            drain(first);
            drain(second);
        }
        event_put(&g->events, hop);
        event_put(&g->events, done);
        slot_put(s, v, slot);
        return rc;
    }
    /* The second stream's wait has captured `hop`; it may be reused now. */
    event_put(&g->events, hop);
    c->be_priv = done;
    c->staging = slot;
    c->stage = 2;
    return MMA_OK;
}

static int cuda_submit(mmad_backend_t *be, mmad_chunk_t *c)
{
    cuda_be_t *s = (cuda_be_t *)be;
    c->status = MMA_OK;
    c->staging = -1;
    c->stage = 0; /* copies queued: 1 for a direct chunk, 2 for a relay */
    c->be_priv = NULL;
    if (c->target < 0 || c->target >= be->gpu_count || c->via < 0 || c->via >= be->gpu_count ||
        (c->dir != MMA_DIR_H2D && c->dir != MMA_DIR_D2H)) {
        MMA_ERROR("cuda: chunk with no such path (target %d, via %d, dir %d)", c->target, c->via, c->dir);
        return MMA_ERR_INVAL;
    }
    int rc = c->via == c->target ? submit_direct(s, c) : submit_relay(s, c);
    if (rc != MMA_OK)
        return rc;
    c->next = NULL;
    if (s->inflight_tail)
        s->inflight_tail->next = c;
    else
        s->inflight_head = c;
    s->inflight_tail = c;
    return MMA_OK;
}

/* Give a finished chunk's event and staging slot back. */
static void chunk_release(cuda_be_t *s, mmad_chunk_t *c)
{
    if (c->be_priv)
        event_put(&s->gpu[c->via].events, (cudaEvent_t)c->be_priv);
    c->be_priv = NULL;
    slot_put(s, c->via, c->staging);
    c->staging = -1;
}

static int cuda_poll(mmad_backend_t *be, mmad_chunk_t **out, int max)
{
    cuda_be_t *s = (cuda_be_t *)be;
    int n = 0, queried = 0, dev = -1;
    mmad_chunk_t *prev = NULL, *c = s->inflight_head;
    /* Chunks on different streams finish out of order: look at all of them,
     * oldest first, and take out each one that is done. */
    while (c && n < max && queried < POLL_QUERY_CAP) {
        mmad_chunk_t *next = c->next;
        queried++;
        cudaError_t err = cudaSuccess;
        /* A device that cannot even be made current is lost; its chunks
         * are reported failed like any other broken copy. */
        if (c->via != dev) {
            err = cudaSetDevice(c->via);
            dev = err == cudaSuccess ? c->via : -1;
        }
        if (err == cudaSuccess)
            err = cudaEventQuery((cudaEvent_t)c->be_priv);
        if (err == cudaErrorNotReady) { /* still copying: not an error */
            (void)cudaGetLastError();
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
        }
        chunk_release(s, c);
        out[n++] = c;
        c = next;
    }
    return n;
}

/* ---- regions ---- */

static int host_register(mmad_region_t *r)
{
    /* Portable: the pages are pinned for every GPU's context, since any GPU
     * may carry a chunk of this region (relays use the via GPU's streams),
     * so the current device does not matter here. Registering is slow (138
     * ms for 256 MiB in HARDWARE.md), which is why it happens once per
     * region, not per copy. */
    uint64_t t0 = mma_now_ns();
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
    free(m);
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
        return host_register(r);
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
    cudaStream_t all[] = {g->direct[0], g->direct[1], g->pcie[0], g->pcie[1], g->nvlink[0], g->nvlink[1]};
    for (size_t k = 0; k < sizeof all / sizeof all[0]; k++)
        if (all[k])
            (void)cuda_status(fn(all[k]), name, __func__, MMA_LOG_ERROR);
    for (int i = 0; g->slot_stream && i < be->staging_slots; i++)
        if (g->slot_stream[i])
            (void)cuda_status(fn(g->slot_stream[i]), name, __func__, MMA_LOG_ERROR);
}

/* Safe on a half-built backend: every resource is checked before release. */
static void cuda_destroy(mmad_backend_t *be)
{
    cuda_be_t *s = (cuda_be_t *)be;
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
        for (int i = 0; i < g->events.n; i++)
            (void)CU(cudaEventDestroy(g->events.ev[i]));
        free(g->events.ev);
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
    pthread_mutex_destroy(&s->ipc_lock);
    free(s);
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
    /* Non-blocking: the copies must not synchronize with the legacy default
     * stream, which nothing here uses but a library in the process might. */
    for (int d = 0; d < 2; d++) {
        CU_CHECK(cudaStreamCreateWithFlags(&g->direct[d], cudaStreamNonBlocking));
        CU_CHECK(cudaStreamCreateWithFlags(&g->pcie[d], cudaStreamNonBlocking));
        CU_CHECK(cudaStreamCreateWithFlags(&g->nvlink[d], cudaStreamNonBlocking));
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
    return pool_grow(&g->events, 2 * be->path_depth + be->staging_slots + 1);
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
    be->staging_slots = cfg->staging_slots;
    be->path_depth = cfg->path_depth;
    be->bypass_threshold = cfg->bypass_threshold >= 0 ? cfg->bypass_threshold : DEFAULT_BYPASS_THRESHOLD;

    int rc = MMA_OK;
    for (int g = 0; g < n && rc == MMA_OK; g++)
        rc = gpu_setup(s, g);
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

    /* Used only to bounds-check IPC regions; without it they go unchecked. */
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (CU_WARN(cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault,
                                                 &found)) == MMA_OK &&
        found == cudaDriverEntryPointSuccess && fn)
        s->addr_range = (addr_range_fn)fn;
    else
        MMA_WARN("cuda: cuMemGetAddressRange is not available; device regions will not be bounds-checked");
    *out = be;
    return MMA_OK;
}
