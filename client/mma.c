/* libmma: connect, register, copy. One socket to mmad (SOCK_SEQPACKET),
 * synchronous request/response for setup calls, fire-and-forget COPY
 * requests whose completion arrives through the shared flag page. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cuda_glue.h"
#include "flagpage.h"
#include "log.h"
#include "mma.h"
#include "util.h"
#include "wire.h"

#define SEQ_BITS 48
/* mma_wait spins from this long before a copy's expected end ... */
#define SPIN_BEFORE_NS 150000ull
/* ... to this long after it, then sleeps. */
#define SPIN_AFTER_NS 2000000ull
/* The expected end first assumes this rate (bytes per ns = GB/s), then
 * what this client's copies showed (mma_expect_update); a slower copy costs
 * at most SPIN_AFTER_NS of spinning. */
#define EXPECTED_GBPS 120.0
/* mma_disconnect waits this long at most for stream-ordered copies that
 * still use the flag page. */
#define DISCONNECT_WAIT_NS 5000000000ull
/* Copies from this size on teach the expected rate. */
#define EXPECT_LEARN_MIN (8u << 20)
#define SUBMIT_SHARED (1ull << 63)
#define SEQ_MASK ((1ull << SEQ_BITS) - 1)
/* Bytes kept below the kernel's bound on one datagram (socket_max_msg). */
#define MSG_MARGIN 256

/* Device numbers libmma handles (this process's, and mmad's). */
#define MMA_CLIENT_MAX_GPUS 64

typedef struct region {
    uintptr_t base;
    size_t size;
    uint32_t id;
    int device; /* 0 host, 1 device */
    int gpu;
    int owned;   /* mma allocated it: free it in mma_free */
    int mapped;  /* a memfd mapping (host, or simulated device) */
    int pinned;  /* cudaHostRegister'ed here */
} region_t;

struct mma_client {
    pthread_mutex_t lock;
    int fd;
    int dead;
    size_t max_msg; /* the largest message this socket carries (socket_max_msg) */
    uint64_t next_id;
    mma_info_t info;
    mma_flag_slot_t *flags;
    uint32_t nslots;
    size_t flags_len; /* the mapping: the slots, then the submission ring */
    int flags_pinned;
    mma_sq_t *sq;     /* the submission ring, where mmad reads it (NULL: every copy is a message) */
    uint64_t sq_tail; /* entries posted to it (under lock) */
    uint64_t sq_kicks; /* KICKs sent */
    _Atomic uint64_t last_mmad_ns; /* a copy through mmad was sent or seen done (--cold-small) */
    uint64_t cold_small_ns;        /* a copy ran natively for --cold-small (lock) */
    uint64_t *slot_seq; /* last seq issued on each slot */
    uint64_t *slot_due; /* when each slot's copy should be done (ns, monotonic) */
    uint64_t *slot_start; /* when it was submitted */
    uint64_t *slot_bytes; /* its bytes */
    unsigned char *slot_dir;
    double expect[2][MMA_EXPECT_CLASSES]; /* mma_wait's expected rate per direction and size class,
                                           * bytes/ns, 0 until learned (under lock) */
    uint64_t submits;     /* copies sent to mmad */
    uint64_t *slot_submit; /* which of them each slot's is; SUBMIT_SHARED: it began with another pending */
    uint32_t last_slot;   /* the copy sent last: its slot and seq */
    uint64_t last_seq;
    uint64_t seq;
    uint32_t cursor;
    region_t *regions;
    size_t nregions, cap;
    int cuda; /* the daemon runs real GPUs and CUDA works here */
    /* This process's CUDA device number -> mmad's (-1: mmad does not serve
     * it). The API speaks the caller's numbers, which CUDA_VISIBLE_DEVICES
     * may reorder or thin out; mmad's come from its own view of the box. */
    int to_mmad[MMA_CLIENT_MAX_GPUS];
    mma_stream_t native_stream[MMA_CLIENT_MAX_GPUS]; /* host-ordered native copies, per GPU */
    /* The watchdog (real GPUs): what each copy in flight was, so that if mmad
     * goes away libmma can finish it natively and no stream waits forever. */
    struct pending {
        mma_segment_t *segs;
        size_t n;
        int gpu;
        int stream; /* stream-ordered: a stream writes `reached` and waits on `done` */
    } *pending;
    pthread_t watchdog;
    pthread_cond_t wd_cond;
    int watchdog_started;
    int closing;
};

/* ---- request/response ---- */

/* Send req (with fds) and wait for the response with the same id. Error
 * responses to earlier fire-and-forget COPYs are logged and skipped. */
static int rpc(mma_client_t *c, Mma__Request *req, const int *fds, int nfds, Mma__Response **out)
{
    if (c->dead)
        return MMA_ERR_DISCONNECTED;
    req->has_id = 1;
    req->id = ++c->next_id;
    int rc = mma_wire_send(c->fd, &req->base, fds, nfds);
    if (rc != MMA_OK) {
        if (rc == MMA_ERR_DISCONNECTED)
            c->dead = 1;
        return rc;
    }
    uint8_t *buf = malloc(MMA_WIRE_MAX_MSG);
    if (!buf)
        return MMA_ERR_NOMEM;
    for (;;) {
        size_t len;
        int rfds[MMA_WIRE_MAX_FDS], rn = 0;
        rc = mma_wire_recv(c->fd, buf, MMA_WIRE_MAX_MSG, &len, rfds, &rn);
        for (int i = 0; i < rn; i++)
            close(rfds[i]);
        if (rc != MMA_OK) {
            if (rc == MMA_ERR_DISCONNECTED)
                c->dead = 1;
            break;
        }
        Mma__Response *resp = mma__response__unpack(NULL, len, buf);
        if (!resp) {
            rc = MMA_ERR_PROTO;
            break;
        }
        if (resp->has_id && resp->id == req->id) {
            *out = resp;
            rc = MMA_OK;
            break;
        }
        if (resp->status != MMA_OK)
            MMA_WARN("mmad: %s", resp->error ? resp->error : mma_strerror(resp->status));
        mma__response__free_unpacked(resp, NULL);
    }
    free(buf);
    return rc;
}

/* rpc + the response's own status; logs the daemon's sentence on failure. */
static int rpc_status(mma_client_t *c, Mma__Request *req, const int *fds, int nfds, Mma__Response **out)
{
    Mma__Response *resp = NULL;
    int rc = rpc(c, req, fds, nfds, &resp);
    if (rc != MMA_OK)
        return rc;
    rc = resp->status;
    if (rc != MMA_OK) {
        MMA_WARN("mmad refused: %s", resp->error ? resp->error : mma_strerror(rc));
        mma__response__free_unpacked(resp, NULL);
        return rc;
    }
    if (out)
        *out = resp;
    else
        mma__response__free_unpacked(resp, NULL);
    return MMA_OK;
}

/* The largest message the socket carries. A Unix datagram socket refuses
 * one larger than its send buffer less 32 bytes (EMSGSIZE), and the default
 * buffer (net.core.wmem_default, ~208 KiB) holds a Copy of only ~13,000
 * segments; so ask for room for MMA_WIRE_MAX_MSG, which the kernel caps at
 * net.core.wmem_max (then doubles), and go by what it granted. Best effort:
 * whatever the buffer ends up as, the copies checked against it are never
 * refused by sendmsg for their size. */
static size_t socket_max_msg(int fd)
{
    int want = (int)MMA_WIRE_MAX_MSG, got = 0;
    socklen_t gl = sizeof got;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &gl) == 0 &&
        (size_t)got < MMA_WIRE_MAX_MSG + 32 + MSG_MARGIN)
        (void)setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &want, sizeof want);
    gl = sizeof got;
    if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &gl) != 0 || got <= 32 + MSG_MARGIN)
        return MMA_WIRE_MAX_MSG; /* cannot tell: mma_wire_send reports a refusal as MMA_ERR_LIMIT */
    size_t room = (size_t)got - 32 - MSG_MARGIN;
    return room < MMA_WIRE_MAX_MSG ? room : MMA_WIRE_MAX_MSG;
}

/* A memfd of len bytes that cannot shrink: mmad maps it, and pages cut off
 * under a mapping kill whoever touches them with SIGBUS, so mmad refuses a
 * memfd that could be shrunk (F_SEAL_SHRINK missing). Growing stays
 * allowed, and so does writing. Returns the fd, or -1 with *err set:
 * MMA_ERR_NOMEM where the memory is not there, else MMA_ERR_SYSTEM. */
static int sealed_memfd(const char *name, size_t len, int *err)
{
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) {
        *err = MMA_ERR_SYSTEM;
        return -1;
    }
    if (ftruncate(fd, (off_t)len) != 0) {
        *err = errno == ENOSPC || errno == ENOMEM ? MMA_ERR_NOMEM : MMA_ERR_SYSTEM;
        close(fd);
        return -1;
    }
    if (fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK) != 0) {
        MMA_ERROR("memfd %s: cannot seal it against shrinking: %s", name, strerror(errno));
        *err = MMA_ERR_SYSTEM;
        close(fd);
        return -1;
    }
    return fd;
}

static int connect_socket(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path)
        return -1;
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Map this process's CUDA device numbers to mmad's by PCI bus id (mmad
 * names its GPUs' ids in the HELLO reply). Without ids (the simulated box,
 * or an mmad that does not send them) the numbers are taken as the same.
 * A device whose id CUDA cannot tell stays unmapped (MMA_ERR_NO_GPU when
 * used); the others still work. */
static void map_devices(mma_client_t *c, const Mma__HelloReply *hr)
{
    for (int l = 0; l < MMA_CLIENT_MAX_GPUS; l++)
        c->to_mmad[l] = l < c->info.gpu_count ? l : -1;
    if (!c->cuda || hr->n_gpu_pci_bus_id == 0)
        return;
    int n = mma_cuda_device_count();
    for (int l = 0; l < MMA_CLIENT_MAX_GPUS; l++)
        c->to_mmad[l] = -1;
    for (int l = 0; l < n && l < MMA_CLIENT_MAX_GPUS; l++) {
        char bus[32];
        int rc = mma_cuda_pci_bus_id(l, bus, (int)sizeof bus);
        if (rc != MMA_OK) {
            MMA_WARN("this process's gpu %d: no PCI bus id (%s), so it cannot be matched to mmad's GPUs: "
                     "left out (MMA_ERR_NO_GPU)",
                     l, mma_strerror(rc));
            continue;
        }
        for (size_t g = 0; g < hr->n_gpu_pci_bus_id && g < MMA_CLIENT_MAX_GPUS; g++)
            if (hr->gpu_pci_bus_id[g] && strcasecmp(bus, hr->gpu_pci_bus_id[g]) == 0)
                c->to_mmad[l] = (int)g;
        if (c->to_mmad[l] < 0)
            MMA_INFO("this process's gpu %d (%s) is not one mmad serves", l, bus);
        else if (c->to_mmad[l] != l)
            MMA_INFO("this process's gpu %d (%s) is mmad's gpu %d", l, bus, c->to_mmad[l]);
    }
}

/* mmad's number for the caller's device gpu; -1 when mmad does not serve it. */
static int mmad_gpu(const mma_client_t *c, int gpu)
{
    return gpu >= 0 && gpu < MMA_CLIENT_MAX_GPUS ? c->to_mmad[gpu] : -1;
}

int mma_connect(const char *socket_path, mma_client_t **out)
{
    if (!out)
        return MMA_ERR_INVAL;
    mma_log_init("libmma", MMA_LOG_WARN);
    const char *path = socket_path ? socket_path : mma_default_socket();
    mma_client_t *c = calloc(1, sizeof *c);
    if (!c)
        return MMA_ERR_NOMEM;
    pthread_mutex_init(&c->lock, NULL);
    pthread_cond_init(&c->wd_cond, NULL);
    c->fd = -1;
    int rc = MMA_OK;
    int memfd = -1;
    c->fd = connect_socket(path);
    if (c->fd < 0) {
        MMA_DEBUG("connect %s: %s", path, strerror(errno));
        rc = MMA_ERR_CONNECT;
        goto fail;
    }
    c->max_msg = socket_max_msg(c->fd);
    c->nslots = MMA_FLAG_SLOTS_DEFAULT;
    /* The slots, then a submission ring that mmad may read (flagpage.h);
     * MMA_NO_RING=1 sends every copy as a message. */
    size_t flen = (size_t)c->nslots * sizeof(mma_flag_slot_t);
    const char *no_ring = getenv("MMA_NO_RING");
    int offer_ring = !(no_ring && *no_ring && strcmp(no_ring, "0") != 0);
    c->flags_len = flen + (offer_ring ? sizeof(mma_sq_t) : 0);
    memfd = sealed_memfd("mma-flags", c->flags_len, &rc);
    if (memfd < 0)
        goto fail;
    c->flags = mmap(NULL, c->flags_len, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (c->flags == MAP_FAILED) {
        c->flags = NULL;
        rc = MMA_ERR_SYSTEM;
        goto fail;
    }
    c->slot_seq = calloc(c->nslots, sizeof *c->slot_seq);
    c->slot_due = calloc(c->nslots, sizeof *c->slot_due);
    c->slot_start = calloc(c->nslots, sizeof *c->slot_start);
    c->slot_bytes = calloc(c->nslots, sizeof *c->slot_bytes);
    c->slot_dir = calloc(c->nslots, 1);
    c->slot_submit = calloc(c->nslots, sizeof *c->slot_submit);
    if (!c->slot_seq || !c->slot_due || !c->slot_start || !c->slot_bytes || !c->slot_dir || !c->slot_submit) {
        rc = MMA_ERR_NOMEM;
        goto fail;
    }
    Mma__Hello h = MMA__HELLO__INIT;
    h.api_version = MMA_API_VERSION;
    h.has_flag_slots = 1;
    h.flag_slots = c->nslots;
    h.has_sq_entries = offer_ring;
    h.sq_entries = offer_ring ? MMA_SQ_ENTRIES : 0;
    char name[64];
    snprintf(name, sizeof name, "pid %d", (int)getpid());
    h.name = name;
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__HELLO;
    req.hello = &h;
    Mma__Response *resp = NULL;
    rc = rpc_status(c, &req, &memfd, 1, &resp);
    close(memfd);
    memfd = -1;
    if (rc != MMA_OK)
        goto fail;
    if (!resp->hello) {
        mma__response__free_unpacked(resp, NULL);
        rc = MMA_ERR_PROTO;
        goto fail;
    }
    Mma__HelloReply *hr = resp->hello;
    c->info.daemon_version = hr->daemon_version;
    c->info.api_version = hr->api_version;
    c->info.features = hr->features;
    snprintf(c->info.backend, sizeof c->info.backend, "%s", hr->backend ? hr->backend : "?");
    c->info.gpu_count = hr->gpu_count <= MMA_CLIENT_MAX_GPUS ? (int)hr->gpu_count : MMA_CLIENT_MAX_GPUS; /* mmad serves at most 16 */
    c->info.simulated = hr->simulated;
    c->info.bypass_threshold = hr->bypass_threshold >= SIZE_MAX ? MMA_BYPASS_ALL : (size_t)hr->bypass_threshold;
    c->info.cold_bypass = hr->has_cold_bypass ? (size_t)hr->cold_bypass : 0;
    c->info.cold_small = hr->has_cold_small ? (size_t)hr->cold_small : 0;
    c->info.relays_warm_us = hr->has_relays_warm_us ? hr->relays_warm_us : 0;
    c->info.sim_scale = hr->has_sim_scale ? hr->sim_scale : 1.0;
    if (offer_ring && hr->has_sq && hr->sq)
        c->sq = (mma_sq_t *)(void *)(c->flags + c->nslots);
    if (!c->info.simulated) {
        if (mma_cuda_init() != MMA_OK) {
            MMA_ERROR("mmad runs real GPUs but CUDA is not usable in this process");
            mma__response__free_unpacked(resp, NULL);
            rc = MMA_ERR_CUDA;
            goto fail;
        }
        c->cuda = 1;
    }
    map_devices(c, hr);
    mma__response__free_unpacked(resp, NULL);
    if (c->cuda) {
        c->pending = calloc(c->nslots, sizeof *c->pending);
        if (!c->pending) {
            rc = MMA_ERR_NOMEM;
            goto fail;
        }
        rc = mma_cuda_host_register(c->flags, flen, 1);
        if (rc != MMA_OK)
            goto fail;
        c->flags_pinned = 1;
    }
    *out = c;
    return MMA_OK;
fail:
    if (memfd >= 0)
        close(memfd);
    if (c->fd >= 0)
        close(c->fd);
    if (c->flags)
        munmap(c->flags, c->flags_len);
    free(c->slot_seq);
    free(c->slot_due);
    free(c->slot_start);
    free(c->slot_bytes);
    free(c->slot_dir);
    free(c->slot_submit);
    free(c->pending);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->wd_cond);
    free(c);
    return rc;
}

int mma_get_info(mma_client_t *c, mma_info_t *out)
{
    if (!c || !out)
        return MMA_ERR_INVAL;
    *out = c->info;
    return MMA_OK;
}

/* ---- regions ---- */

static int add_region(mma_client_t *c, const region_t *r)
{
    if (c->nregions == c->cap) {
        size_t cap = c->cap ? c->cap * 2 : 16;
        region_t *nr = realloc(c->regions, cap * sizeof *nr);
        if (!nr)
            return MMA_ERR_NOMEM;
        c->regions = nr;
        c->cap = cap;
    }
    c->regions[c->nregions++] = *r;
    return MMA_OK;
}

/* The region holding [p, p+n): MMA_OK, MMA_ERR_RANGE when it starts inside
 * one but runs past its end, else MMA_ERR_NOT_REGISTERED. */
static int find_region(mma_client_t *c, const void *p, size_t n, region_t **out)
{
    uintptr_t a = (uintptr_t)p;
    for (size_t i = 0; i < c->nregions; i++) {
        region_t *r = &c->regions[i];
        if (a >= r->base && a - r->base < r->size) {
            if (n > r->size - (a - r->base))
                return MMA_ERR_RANGE;
            *out = r;
            return MMA_OK;
        }
    }
    return MMA_ERR_NOT_REGISTERED;
}

/* UNREGISTER region `id` with mmad. Lock held. */
static int unregister_id(mma_client_t *c, uint32_t id)
{
    Mma__Unregister u = MMA__UNREGISTER__INIT;
    u.region_id = id;
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__UNREGISTER;
    req.unregister = &u;
    return rpc_status(c, &req, NULL, 0, NULL);
}

/* mmad took region `id`, but a later step here failed, so the caller gets
 * an error and no region: give it back, or mmad would keep it (a memfd
 * mapping, an opened cudaIpc handle) until this client disconnects. Lock
 * held. */
static void take_back(mma_client_t *c, uint32_t id)
{
    int rc = unregister_id(c, id);
    if (rc != MMA_OK && rc != MMA_ERR_DISCONNECTED)
        MMA_WARN("region %u: registration undone here, but mmad keeps it until disconnect: %s", id,
                 mma_strerror(rc));
}

/* The region id of a registration mmad accepted: MMA_ERR_PROTO where its
 * answer names none (id 0 would stand for nothing mmad knows). Frees resp. */
static int region_id(Mma__Response *resp, uint32_t *id)
{
    int rc = resp->register_ ? MMA_OK : MMA_ERR_PROTO;
    if (rc == MMA_OK)
        *id = resp->register_->region_id;
    else
        MMA_ERROR("mmad accepted a registration without naming the region");
    mma__response__free_unpacked(resp, NULL);
    return rc;
}

static int register_memfd(mma_client_t *c, int device, int gpu, size_t size, void **out)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t len = (size + (size_t)page - 1) & ~((size_t)page - 1);
    int rc = MMA_OK;
    int fd = sealed_memfd(device ? "mma-simdev" : "mma-host", len, &rc);
    if (fd < 0)
        return rc;
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        rc = MMA_ERR_NOMEM;
        goto out;
    }
    Mma__Request req = MMA__REQUEST__INIT;
    Mma__RegisterHost rh = MMA__REGISTER_HOST__INIT;
    Mma__RegisterDevice rd = MMA__REGISTER_DEVICE__INIT;
    if (device) {
        req.type = MMA__REQ_TYPE__REGISTER_DEVICE;
        rd.gpu = (uint32_t)mmad_gpu(c, gpu);
        rd.size = size;
        req.register_device = &rd;
    } else {
        req.type = MMA__REQ_TYPE__REGISTER_HOST;
        rh.size = size;
        req.register_host = &rh;
    }
    Mma__Response *resp = NULL;
    rc = rpc_status(c, &req, &fd, 1, &resp);
    if (rc != MMA_OK)
        goto out;
    region_t r = {.base = (uintptr_t)p, .size = size, .device = device, .gpu = gpu, .owned = 1, .mapped = 1};
    if ((rc = region_id(resp, &r.id)) != MMA_OK)
        goto out;
    if (!device && c->cuda) {
        /* Pinned here too, so this process's own native copies (the bypass)
         * run at full speed. */
        rc = mma_cuda_host_register(p, len, 0);
        if (rc != MMA_OK) {
            take_back(c, r.id);
            goto out;
        }
        r.pinned = 1;
    }
    rc = add_region(c, &r);
    if (rc == MMA_OK) {
        *out = p;
        p = MAP_FAILED;
    } else {
        if (r.pinned)
            mma_cuda_host_unregister(p);
        take_back(c, r.id);
    }
out:
    if (p != MAP_FAILED)
        munmap(p, len);
    close(fd);
    return rc;
}

int mma_host_alloc(mma_client_t *c, size_t size, void **out)
{
    if (!c || !out || size == 0)
        return MMA_ERR_INVAL;
    pthread_mutex_lock(&c->lock);
    int rc = register_memfd(c, 0, -1, size, out);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

static int register_device_locked(mma_client_t *c, int gpu, void *ptr, size_t size, int owned)
{
    uint8_t handle[64];
    uint64_t off;
    int rc = mma_cuda_ipc_handle(gpu, ptr, handle, &off);
    if (rc != MMA_OK)
        return rc;
    Mma__RegisterDevice rd = MMA__REGISTER_DEVICE__INIT;
    rd.gpu = (uint32_t)mmad_gpu(c, gpu);
    rd.size = size;
    rd.has_ipc_handle = 1;
    rd.ipc_handle.data = handle;
    rd.ipc_handle.len = sizeof handle;
    rd.has_ipc_offset = 1;
    rd.ipc_offset = off;
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__REGISTER_DEVICE;
    req.register_device = &rd;
    Mma__Response *resp = NULL;
    rc = rpc_status(c, &req, NULL, 0, &resp);
    if (rc != MMA_OK)
        return rc;
    region_t r = {.base = (uintptr_t)ptr, .size = size, .device = 1, .gpu = gpu, .owned = owned};
    if ((rc = region_id(resp, &r.id)) != MMA_OK)
        return rc;
    if ((rc = add_region(c, &r)) != MMA_OK)
        take_back(c, r.id); /* before mma_device_alloc frees the memory mmad has opened */
    return rc;
}

/* The caller named a device mmad does not serve. */
static int no_gpu(const mma_client_t *c, int gpu)
{
    if (c->cuda && gpu >= 0)
        MMA_WARN("gpu %d (this process's CUDA numbering) is not one of mmad's %d GPUs", gpu, c->info.gpu_count);
    return MMA_ERR_NO_GPU;
}

int mma_device_alloc(mma_client_t *c, int gpu, size_t size, void **out)
{
    if (!c || !out || size == 0)
        return MMA_ERR_INVAL;
    if (mmad_gpu(c, gpu) < 0)
        return no_gpu(c, gpu);
    pthread_mutex_lock(&c->lock);
    int rc;
    if (c->info.simulated) {
        rc = register_memfd(c, 1, gpu, size, out);
    } else {
        void *p = NULL;
        rc = mma_cuda_malloc(gpu, size, &p);
        if (rc == MMA_OK) {
            rc = register_device_locked(c, gpu, p, size, 1);
            if (rc == MMA_OK)
                *out = p;
            else
                mma_cuda_free(gpu, p);
        }
    }
    pthread_mutex_unlock(&c->lock);
    return rc;
}

int mma_device_register(mma_client_t *c, int gpu, void *ptr, size_t size)
{
    if (!c || !ptr || size == 0)
        return MMA_ERR_INVAL;
    if (c->info.simulated)
        return MMA_ERR_UNSUPPORTED; /* simulated device memory comes from mma_device_alloc */
    if (mmad_gpu(c, gpu) < 0)
        return no_gpu(c, gpu);
    pthread_mutex_lock(&c->lock);
    int rc = register_device_locked(c, gpu, ptr, size, 0);
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* ---- completion slots ---- */

static int slot_busy(mma_client_t *c, uint32_t i)
{
    return c->slot_seq[i] && mma_flag_read(&c->flags[i].done) < c->slot_seq[i];
}

/* Whether slot i may carry a new copy: its last copy is done and, if that
 * was stream-ordered, its stream has written `reached` too. A stream-ordered
 * copy completed before its stream got there (its send failed, or mmad
 * refused it) still has that write queued: run after a newer copy took the
 * slot, it would set `reached` back to the old seq, and mmad would never
 * find the newer copy runnable. */
static int slot_free(mma_client_t *c, uint32_t i)
{
    if (slot_busy(c, i))
        return 0;
    return !(c->pending && c->pending[i].stream && mma_flag_read(&c->flags[i].reached) < c->slot_seq[i]);
}

static int take_slot(mma_client_t *c, uint32_t *slot)
{
    for (uint32_t k = 0; k < c->nslots; k++) {
        uint32_t i = (c->cursor + k) % c->nslots;
        if (slot_free(c, i)) {
            c->cursor = (i + 1) % c->nslots;
            *slot = i;
            return MMA_OK;
        }
    }
    return MMA_ERR_BUSY;
}

static int daemon_alive(mma_client_t *c)
{
    if (c->dead)
        return 0;
    struct pollfd p = {.fd = c->fd, .events = POLLIN};
    if (poll(&p, 1, 0) > 0 && (p.revents & (POLLHUP | POLLERR))) {
        c->dead = 1;
        return 0;
    }
    return 1;
}

static int copy_native(mma_client_t *c, const mma_segment_t *segs, size_t nsegs, int gpu, mma_stream_t stream);
static int wake_mmad(mma_client_t *c);

/* mmad is gone: finish natively every copy whose stream has reached it (a
 * host-ordered copy has reached it at submit), then write `done`, so the
 * stream moves on with the right data. A copy whose stream has not got there
 * yet is left for the next pass: copying earlier could read bytes the work
 * before it has not written. Lock held. Returns how many are left. */
static int rescue(mma_client_t *c)
{
    int left = 0;
    for (uint32_t i = 0; c->pending && i < c->nslots; i++) {
        struct pending *p = &c->pending[i];
        uint64_t seq = c->slot_seq[i];
        if (!p->segs || mma_flag_read(&c->flags[i].done) >= seq)
            continue;
        if (mma_flag_read(&c->flags[i].reached) < seq) {
            left++;
            continue;
        }
        int rc = copy_native(c, p->segs, p->n, p->gpu, NULL);
        MMA_WARN("mmad is gone: finished copy (slot %u) natively: %s", i, mma_strerror(rc));
        mma_flag_complete(&c->flags[i], seq, rc);
    }
    return left;
}

static void *watchdog_main(void *arg)
{
    mma_client_t *c = arg;
    pthread_mutex_lock(&c->lock);
    while (!c->closing) {
        if (!daemon_alive(c))
            rescue(c);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 20000000; /* every 20 ms: a cheap poll() on the socket */
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        pthread_cond_timedwait(&c->wd_cond, &c->lock, &ts);
    }
    pthread_mutex_unlock(&c->lock);
    return NULL;
}

/* Remember what a copy was, for rescue(). Lock held. */
static void remember(mma_client_t *c, uint32_t slot, const mma_segment_t *segs, size_t n, int gpu, int stream)
{
    struct pending *p = &c->pending[slot];
    free(p->segs);
    p->segs = malloc(n * sizeof *segs);
    p->n = n;
    p->gpu = gpu;
    p->stream = stream;
    if (p->segs)
        memcpy(p->segs, segs, n * sizeof *segs);
    else
        MMA_WARN("out of memory: copy in slot %u cannot be finished natively if mmad goes away", slot);
    if (!c->watchdog_started && pthread_create(&c->watchdog, NULL, watchdog_main, c) == 0)
        c->watchdog_started = 1;
}

int mma_query(mma_client_t *c, mma_copy_t t)
{
    if (!c)
        return MMA_ERR_INVAL;
    if (t == 0)
        return MMA_OK; /* went native: already complete */
    uint32_t slot = (uint32_t)(t >> SEQ_BITS);
    uint64_t seq = t & SEQ_MASK;
    if (slot >= c->nslots || seq == 0)
        return MMA_ERR_INVAL;
    if (mma_flag_read(&c->flags[slot].done) >= seq)
        return (int)atomic_load_explicit(&c->flags[slot].status, memory_order_relaxed);
    return MMA_PENDING;
}

/* A copy waited for in mma_wait ended; phase 0: seen before the spin began,
 * 1: while spinning, 2: after. Its slot may be taken again by now (another
 * thread's copy): then the time is not this copy's and nothing is learned.
 * Nor is it from a copy that shared mmad with others of this client (one
 * of 4 in flight takes ~4 times as long as alone): it began while the copy
 * sent before it was pending, or another was sent before it ended. */
static void learn_rate(mma_client_t *c, uint32_t slot, uint64_t seq, int phase)
{
    uint64_t now = mma_now_ns();
    pthread_mutex_lock(&c->lock);
    uint64_t bytes = c->slot_bytes[slot];
    if (c->slot_seq[slot] == seq && bytes >= EXPECT_LEARN_MIN && now > c->slot_start[slot] &&
        c->slot_submit[slot] == c->submits) {
        double *r = c->expect[c->slot_dir[slot]];
        int k = mma_expect_class(bytes);
        r[k] = mma_expect_update(mma_expect_pick(r, k, EXPECTED_GBPS), bytes, now - c->slot_start[slot], phase);
    }
    pthread_mutex_unlock(&c->lock);
}

static int wait_copy(mma_client_t *c, mma_copy_t t)
{
    int st = mma_query(c, t);
    if (st != MMA_PENDING)
        return st;
    uint32_t slot = (uint32_t)(t >> SEQ_BITS);
    uint64_t seq = t & SEQ_MASK;
    /* Waking a sleeping thread can take a few hundred microseconds on a
     * virtual machine, so: sleep on the slot's futex (mmad wakes us the
     * moment it writes `done`) until shortly before the copy should be done,
     * then spin for the rest, up to 2 ms past that; a copy running late
     * (contention) is then waited for asleep again. Short copies only spin. */
    uint64_t due = c->slot_due[slot];
    while (due) {
        uint64_t now = mma_now_ns();
        int phase;
        if (due > now + SPIN_BEFORE_NS) {
            phase = 0;
            mma_flag_sleep(&c->flags[slot], seq, due - now - SPIN_BEFORE_NS);
        } else if (now < due + SPIN_AFTER_NS) {
            phase = 1;
            mma_cpu_relax();
        } else {
            break;
        }
        if ((st = mma_query(c, t)) != MMA_PENDING) {
            learn_rate(c, slot, seq, phase);
            return st;
        }
    }
    for (;;) {
        if (mma_flag_sleep(&c->flags[slot], seq, 50000000ull)) {
            if (due)
                learn_rate(c, slot, seq, 2);
            return mma_query(c, t);
        }
        /* 50 ms without news: is mmad still there? If not, finish what can
         * be finished natively (real GPUs); on the simulated box nothing can. */
        pthread_mutex_lock(&c->lock);
        int alive = daemon_alive(c);
        if (!alive)
            rescue(c);
        else if (c->sq && atomic_load_explicit(&c->sq->head, memory_order_acquire) != c->sq_tail)
            (void)wake_mmad(c); /* copies wait in the ring (a KICK failed): make mmad read it */
        pthread_mutex_unlock(&c->lock);
        if (!alive && !c->cuda && mma_query(c, t) == MMA_PENDING)
            return MMA_ERR_DISCONNECTED;
    }
}

int mma_wait(mma_client_t *c, mma_copy_t t)
{
    int st = wait_copy(c, t);
    /* a copy through mmad seen done: its relay kernels linger from about now (--cold-small) */
    if (c && t && st != MMA_ERR_INVAL)
        atomic_store_explicit(&c->last_mmad_ns, mma_now_ns(), memory_order_relaxed);
    return st;
}

/* ---- copies ---- */

/* Check every segment against this client's regions: both ends registered,
 * inside their region, one host and one device, all one direction and one
 * GPU. Sets *dir (0 H2D, 1 D2H), *gpu and *total. */
static int resolve(mma_client_t *c, const mma_segment_t *segs, size_t nsegs, int *dir, int *gpu, uint64_t *total)
{
    *dir = -1;
    *gpu = -1;
    *total = 0;
    for (size_t i = 0; i < nsegs; i++) {
        region_t *d, *s;
        int rc;
        if (!segs[i].dst || !segs[i].src || segs[i].len == 0)
            return MMA_ERR_INVAL;
        if ((rc = find_region(c, segs[i].dst, segs[i].len, &d)) != MMA_OK ||
            (rc = find_region(c, segs[i].src, segs[i].len, &s)) != MMA_OK)
            return rc;
        if (d->device == s->device)
            return MMA_ERR_DIRECTION;
        int sd = d->device ? 0 : 1;
        int sg = d->device ? d->gpu : s->gpu;
        if (*dir >= 0 && (sd != *dir || sg != *gpu))
            return MMA_ERR_INVAL;
        *dir = sd;
        *gpu = sg;
        *total += segs[i].len;
    }
    return MMA_OK;
}

/* The stream a native copy goes on: the caller's, or, host-ordered, this
 * client's own non-blocking stream for that GPU (made on first use). Lock
 * held. */
static int native_stream(mma_client_t *c, int gpu, mma_stream_t *stream)
{
    if (*stream)
        return MMA_OK;
    int rc = MMA_OK;
    if (!c->native_stream[gpu] && (rc = mma_cuda_stream_create(gpu, &c->native_stream[gpu])) != MMA_OK)
        return rc;
    *stream = c->native_stream[gpu];
    return MMA_OK;
}

/* The native copy on that stream, waited for when host-ordered. Needs no
 * lock. */
static int native_run(const mma_segment_t *segs, size_t nsegs, mma_stream_t stream, int host_ordered)
{
    int rc = MMA_OK;
    for (size_t i = 0; i < nsegs && rc == MMA_OK; i++)
        rc = mma_cuda_memcpy(segs[i].dst, segs[i].src, segs[i].len, stream);
    if (rc == MMA_OK && host_ordered)
        rc = mma_cuda_stream_sync(stream);
    return rc;
}

/* The native copy, lock held all along (rescue and a failed send). */
static int copy_native(mma_client_t *c, const mma_segment_t *segs, size_t nsegs, int gpu, mma_stream_t stream)
{
    mma_stream_t st = stream;
    int rc = native_stream(c, gpu, &st);
    return rc == MMA_OK ? native_run(segs, nsegs, st, !stream) : rc;
}

/* Whether mmad's socket thread sleeps (it reads no ring unasked), lock
 * held; without a ring nothing says, and it counts as awake. */
static int mmad_asleep(const mma_client_t *c)
{
    return c->sq && !atomic_load_explicit(&c->sq->polling, memory_order_seq_cst);
}

/* Wake mmad (a KICK, which makes it poll and wakes its engine), lock held:
 * with a ring only where it sleeps and has read our earlier KICKs. A KICK
 * counts once sent: one that failed never reaches mmad, and counting it
 * would make every later post wait for it to be read, i.e. send none. */
static int wake_mmad(mma_client_t *c)
{
    if (c->sq && (!mmad_asleep(c) ||
                  atomic_load_explicit(&c->sq->kicks_read, memory_order_seq_cst) != c->sq_kicks))
        return MMA_OK;
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__KICK;
    int rc = mma_wire_send(c->fd, &req.base, NULL, 0);
    if (rc == MMA_OK && c->sq)
        c->sq_kicks++;
    else if (rc == MMA_ERR_DISCONNECTED)
        c->dead = 1;
    return rc;
}

/* Post a one-segment copy to the submission ring (flagpage.h), under the
 * client's lock. Returns 1 once posted (with a KICK sent where mmad was not
 * polling and had read every earlier one), 0 where it cannot go there (no ring, or no room: send it as a
 * message), or MMA_ERR_DISCONNECTED: posted, but mmad is gone. A KICK that
 * failed otherwise leaves the copy posted, to be read at mmad's next poll
 * (any later message, or the KICK wait_copy sends for a copy that sits in
 * the ring). */
static int sq_post(mma_client_t *c, const Mma__Segment *sg, uint32_t slot, uint64_t seq, int latency,
                   uint32_t max_paths)
{
    mma_sq_t *q = c->sq;
    uint64_t t = c->sq_tail;
    if (!q || max_paths > UINT16_MAX ||
        t - atomic_load_explicit(&q->head, memory_order_acquire) >= MMA_SQ_ENTRIES)
        return 0;
    mma_sq_entry_t *e = &q->e[t % MMA_SQ_ENTRIES];
    e->seq = seq;
    e->dst_offset = sg->dst_offset;
    e->src_offset = sg->src_offset;
    e->length = sg->length;
    e->slot = slot;
    e->dst_region = sg->dst_region;
    e->src_region = sg->src_region;
    e->flags = latency ? MMA_SQ_LATENCY : 0;
    e->max_paths = (uint16_t)max_paths;
    e->sent_ns = mma_now_ns();
    atomic_store_explicit(&e->pos, t + 1, memory_order_release);
    c->sq_tail = t + 1;
    atomic_store_explicit(&q->tail, t + 1, memory_order_seq_cst);
    int rc = wake_mmad(c); /* no KICK where mmad reads the ring unasked or has one of ours to read */
    if (rc == MMA_ERR_DISCONNECTED)
        return rc;
    if (rc != MMA_OK)
        MMA_WARN("KICK: %s; the copy waits in the ring for mmad's next poll", mma_strerror(rc));
    return 1;
}

/* Whether a small copy goes native because mmad's resident relay kernels
 * have ended (--cold-small): this client sent no copy through mmad, and saw
 * none done, for relays_warm_us, and the last copy it ran natively for this
 * reason was longer ago than that. A copy that comes sooner after one is
 * the second of a burst: it goes through mmad and relaunches the kernels
 * for the rest. Another client's copies may have kept them going; then a
 * small copy goes native that need not have. Lock held. */
static int kernels_ended(mma_client_t *c)
{
    uint64_t now = mma_now_ns(), warm = (uint64_t)c->info.relays_warm_us * 1000;
    uint64_t last = atomic_load_explicit(&c->last_mmad_ns, memory_order_relaxed);
    if (!warm || now - last <= warm || now - c->cold_small_ns <= warm)
        return 0;
    c->cold_small_ns = now;
    return 1;
}

/* Without a ring libmma cannot see whether mmad sleeps, so every call
 * sends a KICK: skipping it would make this a no-op there, while the KICK
 * does wake mmad's threads for --wake-spin-us (mma.h says so). A KICK that
 * fails otherwise than on a lost connection (MMA_ERR_IO) leaves the
 * client up: that error, not DISCONNECTED. */
int mma_prewarm(mma_client_t *c)
{
    if (!c)
        return MMA_ERR_INVAL;
    pthread_mutex_lock(&c->lock);
    /* one poll(2): a user who prewarms should learn that mmad is gone */
    int rc = daemon_alive(c) ? wake_mmad(c) : MMA_ERR_DISCONNECTED;
    pthread_mutex_unlock(&c->lock);
    return rc;
}

/* The COPY request for these segments. */
static void copy_request(Mma__Request *req, Mma__Copy *cp, Mma__Segment **pp, size_t nsegs, uint32_t slot,
                         uint64_t seq, unsigned flags, uint32_t max_paths)
{
    mma__copy__init(cp);
    cp->slot = slot;
    cp->seq = seq;
    cp->n_segments = nsegs;
    cp->segments = pp;
    cp->has_priority = 1;
    cp->priority = (flags & MMA_COPY_LATENCY) ? 1 : 0;
    cp->has_max_paths = max_paths > 0;
    cp->max_paths = max_paths;
    cp->has_sent_ns = 1;
    mma__request__init(req);
    req->type = MMA__REQ_TYPE__COPY;
    req->copy = cp;
    req->has_id = 1;
}

/* Whether a copy of these segments fits in one message of this socket
 * (c->max_msg): its request packed with the largest slot, seq, id and send
 * time it could carry, so the one sent is never larger. Checked before a
 * slot is taken or the caller's stream waits on one: a copy that cannot be
 * sent is refused whole, and the connection stays up. One segment always
 * fits (under 100 bytes), so the ring's copies pay nothing for this. */
static int copy_fits(const mma_client_t *c, Mma__Segment **pp, size_t nsegs, unsigned flags, uint32_t max_paths)
{
    if (nsegs > MMA_MAX_SEGMENTS) {
        MMA_WARN("a copy of %zu segments: mmad takes at most %u per copy", nsegs, (unsigned)MMA_MAX_SEGMENTS);
        return MMA_ERR_LIMIT;
    }
    if (nsegs == 1)
        return MMA_OK;
    Mma__Request req;
    Mma__Copy cp;
    copy_request(&req, &cp, pp, nsegs, UINT32_MAX, SEQ_MASK, flags | MMA_COPY_LATENCY,
                 max_paths ? max_paths : UINT32_MAX);
    req.id = UINT64_MAX;
    cp.sent_ns = UINT64_MAX;
    size_t len = mma__request__get_packed_size(&req);
    if (len <= c->max_msg)
        return MMA_OK;
    MMA_WARN("a copy of %zu segments needs a %zu-byte message; this connection carries at most %zu "
             "(its socket's send buffer, see net.core.wmem_max): split it",
             nsegs, len, c->max_msg);
    return MMA_ERR_LIMIT;
}

int mma_memcpy_sg_async(mma_client_t *c, const mma_segment_t *segs, size_t nsegs, mma_stream_t stream,
                        const mma_copy_opts_t *opts, mma_copy_t *out)
{
    if (!c || !segs || nsegs == 0)
        return MMA_ERR_INVAL;
    if (stream && !c->cuda)
        return MMA_ERR_UNSUPPORTED; /* the simulated box has no CUDA streams */
    unsigned flags = opts ? opts->flags : 0;
    Mma__Segment *ps = NULL;
    Mma__Segment **pp = NULL;
    int dir, gpu;
    uint64_t total;
    pthread_mutex_lock(&c->lock);
    int rc = resolve(c, segs, nsegs, &dir, &gpu, &total);
    if (rc != MMA_OK)
        goto out;
    int bypass = c->cuda && !(flags & MMA_COPY_NO_BYPASS);
    int native = total < c->info.bypass_threshold || c->dead;
    int asleep = 0, cold = 0;
    if (bypass && !native) {
        asleep = mmad_asleep(c);
        cold = (total < c->info.cold_bypass && asleep) || (total < c->info.cold_small && kernels_ended(c));
    }
    if (bypass && (native || cold)) {
        /* Native: below the threshold mmad cannot beat one link, and with
         * mmad gone this is how copies still complete. Decided before any
         * allocation, so a small copy costs what cudaMemcpyAsync costs; and
         * run without the lock, so that the client's other threads do not
         * wait for this one's copy. A copy that would find mmad asleep
         * (--cold-bypass) or its relay kernels ended (--cold-small) goes
         * native too; where mmad sleeps, the copy's KICK wakes it for the
         * next ones once the copy is queued, so that the system call and
         * the wake-up overlap the copy (a failed KICK is the next request's
         * to report). */
        mma_stream_t st = stream;
        rc = native_stream(c, gpu, &st);
        pthread_mutex_unlock(&c->lock);
        if (rc == MMA_OK)
            rc = native_run(segs, nsegs, st, !stream && !cold);
        if (cold && asleep) {
            pthread_mutex_lock(&c->lock);
            (void)wake_mmad(c);
            pthread_mutex_unlock(&c->lock);
        }
        if (cold && rc == MMA_OK && !stream)
            rc = mma_cuda_stream_sync(st);
        if (rc == MMA_OK && out)
            *out = 0;
        return rc;
    }
    ps = calloc(nsegs, sizeof *ps);
    pp = calloc(nsegs, sizeof *pp);
    if (!ps || !pp) {
        rc = MMA_ERR_NOMEM;
        goto out;
    }
    for (size_t i = 0; i < nsegs; i++) {
        region_t *d = NULL, *s = NULL;
        if (find_region(c, segs[i].dst, segs[i].len, &d) != MMA_OK ||
            find_region(c, segs[i].src, segs[i].len, &s) != MMA_OK) {
            rc = MMA_ERR_NOT_REGISTERED; /* resolve() vouched for both: cannot happen */
            goto out;
        }
        mma__segment__init(&ps[i]);
        ps[i].dst_region = d->id;
        ps[i].dst_offset = (uintptr_t)segs[i].dst - d->base;
        ps[i].src_region = s->id;
        ps[i].src_offset = (uintptr_t)segs[i].src - s->base;
        ps[i].length = segs[i].len;
        pp[i] = &ps[i];
    }
    uint32_t max_paths = opts && opts->max_paths > 0 ? (uint32_t)opts->max_paths : 0;
    if ((rc = copy_fits(c, pp, nsegs, flags, max_paths)) != MMA_OK)
        goto out;
    if (c->dead) {
        rc = MMA_ERR_DISCONNECTED;
        goto out;
    }
    uint32_t slot;
    if ((rc = take_slot(c, &slot)) != MMA_OK)
        goto out;
    /* Did the copy sent before this one still run? (mma_wait learns only
     * from copies that had mmad to themselves.) */
    int shared = c->submits && slot_busy(c, c->last_slot) && c->slot_seq[c->last_slot] == c->last_seq;
    uint64_t seq = ++c->seq & SEQ_MASK;
    mma_flag_slot_t *fl = &c->flags[slot];
    if (stream) {
        rc = mma_cuda_stream_mark(stream, gpu, (uint64_t *)&fl->reached, (uint64_t *)&fl->done, seq);
        if (rc != MMA_OK)
            goto out;
    } else {
        atomic_store_explicit(&fl->reached, seq, memory_order_release);
    }
    c->slot_seq[slot] = seq;
    /* On the simulated box a waiter just sleeps: microseconds do not matter
     * there, and spinning would take a core from the simulation. */
    uint64_t start = mma_now_ns();
    c->slot_start[slot] = start;
    atomic_store_explicit(&c->last_mmad_ns, start, memory_order_relaxed);
    c->slot_bytes[slot] = total;
    c->slot_dir[slot] = (unsigned char)dir;
    c->slot_due[slot] = c->info.simulated
                            ? 0
                            : mma_expect_due(start, total,
                                             mma_expect_pick(c->expect[dir], mma_expect_class(total), EXPECTED_GBPS));
    c->slot_submit[slot] = ++c->submits | (shared ? SUBMIT_SHARED : 0);
    c->last_slot = slot;
    c->last_seq = seq;
    if (c->cuda)
        remember(c, slot, segs, nsegs, gpu, stream != NULL);
    rc = nsegs == 1 ? sq_post(c, &ps[0], slot, seq, (flags & MMA_COPY_LATENCY) != 0, max_paths) : 0;
    if (rc == 1) {
        rc = MMA_OK;
    } else if (rc == 0) {
        Mma__Request req;
        Mma__Copy cp;
        copy_request(&req, &cp, pp, nsegs, slot, seq, flags, max_paths);
        req.id = ++c->next_id;
        cp.sent_ns = mma_now_ns();
        rc = mma_wire_send(c->fd, &req.base, NULL, 0);
    }
    if (rc != MMA_OK) {
        /* Only a lost connection ends the client: any other refusal (a
         * message too large, a transient socket error) is this copy's. */
        if (rc == MMA_ERR_DISCONNECTED)
            c->dead = 1;
        if (stream && rc == MMA_ERR_DISCONNECTED && c->pending[slot].segs && c->watchdog_started) {
            /* mmad is gone, and the caller's stream already waits on this
             * slot, behind work that may write the copy's source or read
             * its destination: copying now could overtake that work. So it
             * is a copy in flight when mmad died: the watchdog's rescue()
             * (remember() above) runs it natively once the stream has
             * reached it, and writes `done`. */
            if (out)
                *out = ((mma_copy_t)slot << SEQ_BITS) | seq;
            rc = MMA_OK;
            goto out;
        }
        if (c->cuda && !stream) {
            /* Host-ordered: it could start at submit, so natively now is
             * the right time; as with any copy once mmad is gone. */
            int nrc = copy_native(c, segs, nsegs, gpu, NULL);
            mma_flag_complete(fl, seq, nrc);
            rc = nrc;
            if (rc == MMA_OK && out)
                *out = 0;
            goto out;
        }
        /* Nothing will run this copy: complete its slot with the failure,
         * so that a stream that waits on it moves on, and report it (the
         * copy did not happen). On the simulated box (no CUDA: every copy
         * host-ordered, none can run natively) this is every failure. */
        mma_flag_complete(fl, seq, rc);
        goto out;
    }
    if (out)
        *out = ((mma_copy_t)slot << SEQ_BITS) | seq;
out:
    pthread_mutex_unlock(&c->lock);
    free(ps);
    free(pp);
    return rc;
}

int mma_memcpy_async(mma_client_t *c, void *dst, const void *src, size_t n, mma_stream_t stream, mma_copy_t *out)
{
    mma_segment_t s = {.dst = dst, .src = src, .len = n};
    return mma_memcpy_sg_async(c, &s, 1, stream, NULL, out);
}

int mma_memcpy(mma_client_t *c, void *dst, const void *src, size_t n)
{
    mma_copy_t t;
    int rc = mma_memcpy_async(c, dst, src, n, NULL, &t);
    return rc == MMA_OK ? mma_wait(c, t) : rc;
}

/* Wait (bounded) for every copy this client has in flight. */
static void drain(mma_client_t *c)
{
    uint64_t deadline = mma_now_ns() + 10ull * 1000000000ull;
    for (uint32_t i = 0; i < c->nslots; i++)
        while (slot_busy(c, i) && daemon_alive(c) && mma_now_ns() < deadline)
            mma_sleep_ns(20000);
}

/* Whether a copy not done yet (rescue() leaves those whose stream has not
 * reached them) reads or writes region r. Lock held. */
static int pending_uses(mma_client_t *c, const region_t *r)
{
    for (uint32_t i = 0; c->pending && i < c->nslots; i++) {
        const struct pending *p = &c->pending[i];
        if (!p->segs || !slot_busy(c, i))
            continue;
        for (size_t k = 0; k < p->n; k++) {
            uintptr_t d = (uintptr_t)p->segs[k].dst, s = (uintptr_t)p->segs[k].src, n = p->segs[k].len;
            if ((d < r->base + r->size && r->base < d + n) || (s < r->base + r->size && r->base < s + n))
                return 1;
        }
    }
    return 0;
}

/* Stream-ordered copies not done yet: their streams still write `reached`
 * into the flag page and wait there for `done`. Lock held. */
static int stream_copies_pending(mma_client_t *c)
{
    int n = 0;
    for (uint32_t i = 0; c->pending && i < c->nslots; i++)
        n += c->pending[i].stream && slot_busy(c, i);
    return n;
}

/* Whether r is device memory libmma allocated with cudaMalloc (released
 * with cudaFree); simulated device memory is a mapping. */
static int cuda_allocated(const region_t *r)
{
    return !r->mapped && r->owned && r->device;
}

/* Whether releasing r calls cudaHostUnregister or cudaFree. */
static int release_calls_cuda(const region_t *r)
{
    return r->pinned || cuda_allocated(r);
}

static void release_region(mma_client_t *c, region_t *r)
{
    long page = sysconf(_SC_PAGESIZE);
    size_t len = (r->size + (size_t)page - 1) & ~((size_t)page - 1);
    if (r->pinned)
        mma_cuda_host_unregister((void *)r->base);
    if (r->mapped)
        munmap((void *)r->base, len);
    else if (cuda_allocated(r))
        mma_cuda_free(r->gpu, (void *)r->base);
    (void)c;
}

int mma_free(mma_client_t *c, void *ptr)
{
    if (!c || !ptr)
        return MMA_ERR_INVAL;
    pthread_mutex_lock(&c->lock);
    size_t i;
    for (i = 0; i < c->nregions; i++)
        if (c->regions[i].base == (uintptr_t)ptr)
            break;
    if (i == c->nregions) {
        pthread_mutex_unlock(&c->lock);
        return MMA_ERR_NOT_REGISTERED;
    }
    drain(c);
    /* mmad lets the memory go first: where it does not (it refuses, or the
     * request cannot be sent), it may still copy into or out of it, so
     * nothing is freed and the region stays, to be freed again. mmad gone
     * has released it; one that answers NOT_REGISTERED holds nothing. */
    if (daemon_alive(c)) {
        int rc = unregister_id(c, c->regions[i].id);
        if (rc != MMA_OK && rc != MMA_ERR_DISCONNECTED && rc != MMA_ERR_NOT_REGISTERED) {
            pthread_mutex_unlock(&c->lock);
            MMA_WARN("mma_free(%p): mmad did not unregister it: %s; nothing freed", ptr, mma_strerror(rc));
            return rc;
        }
    }
    /* With mmad gone drain() waits for nothing: finish what can be finished
     * now. A stream-ordered copy its stream has not reached yet runs later
     * (natively, the watchdog's rescue()), into or out of its memory, which
     * must not be freed under it. Nor may memory whose release calls CUDA
     * be freed while any such copy waits: cudaFree and cudaHostUnregister
     * wait for every stream on the device, that copy's too, which waits in
     * cuStreamWaitValue64 for the `done` only rescue() will write. */
    if (c->dead) {
        rescue(c);
        int uses = pending_uses(c, &c->regions[i]);
        int left = stream_copies_pending(c);
        if (uses || (left && release_calls_cuda(&c->regions[i]))) {
            pthread_mutex_unlock(&c->lock);
            MMA_WARN("mma_free(%p): mmad is gone and %d stream-ordered copies that their streams have not reached "
                     "yet are pending (%s); synchronize those streams first, then free again",
                     ptr, left,
                     uses ? "one of them reads or writes this memory"
                          : "releasing this memory would wait for those streams, which wait for libmma");
            return MMA_ERR_BUSY;
        }
    }
    /* Released without the lock: a release that waits for a stream (mmad
     * alive, or gone after the check) must leave the watchdog free to write
     * the `done` that stream may wait for. */
    region_t r = c->regions[i];
    c->regions[i] = c->regions[--c->nregions];
    pthread_mutex_unlock(&c->lock);
    release_region(c, &r);
    return MMA_OK;
}

void mma_disconnect(mma_client_t *c)
{
    if (!c)
        return;
    pthread_mutex_lock(&c->lock);
    c->closing = 1;
    pthread_cond_signal(&c->wd_cond);
    pthread_mutex_unlock(&c->lock);
    if (c->watchdog_started)
        pthread_join(c->watchdog, NULL);
    pthread_mutex_lock(&c->lock);
    drain(c);
    /* A stream-ordered copy not done yet has its stream still write the
     * flag page and wait on it, through the page's CUDA registration:
     * unregistering and unmapping the page under it would fault the stream.
     * Wait for such copies a while; with mmad gone, finish each natively
     * once its stream gets there (rescue()). Those left past that keep the
     * page: a little memory, rather than a stream that writes into memory
     * that is gone. With mmad gone too, nothing will write their `done`
     * now (the watchdog has ended), so their streams wait for ever, and
     * cudaFree and cudaHostUnregister, which wait for every stream on the
     * device, would never return: this client's memory is left allocated,
     * registered and mapped as well. */
    uint64_t deadline = mma_now_ns() + DISCONNECT_WAIT_NS;
    int left;
    for (;;) {
        if (!daemon_alive(c))
            rescue(c);
        left = stream_copies_pending(c);
        if (!left || mma_now_ns() >= deadline)
            break;
        mma_sleep_ns(1000000);
    }
    int leak = left && c->dead;
    if (left)
        MMA_WARN("mma_disconnect: %d stream-ordered copies not done after %llu s: leaving the flag page their "
                 "streams use mapped%s",
                 left, DISCONNECT_WAIT_NS / 1000000000ull,
                 leak ? ", and this client's memory allocated (mmad is gone and their streams have not reached "
                        "them: nothing will finish them now, and releasing memory would wait for those streams)"
                      : "");
    close(c->fd);
    for (size_t i = 0; i < c->nregions && !leak; i++)
        release_region(c, &c->regions[i]);
    free(c->regions);
    for (int g = 0; g < MMA_CLIENT_MAX_GPUS; g++)
        if (c->native_stream[g])
            mma_cuda_stream_destroy(c->native_stream[g]);
    if (!left) {
        if (c->flags_pinned)
            mma_cuda_host_unregister(c->flags);
        munmap(c->flags, c->flags_len);
    }
    free(c->slot_seq);
    free(c->slot_due);
    free(c->slot_start);
    free(c->slot_bytes);
    free(c->slot_dir);
    free(c->slot_submit);
    for (uint32_t i = 0; c->pending && i < c->nslots; i++)
        free(c->pending[i].segs);
    free(c->pending);
    pthread_mutex_unlock(&c->lock);
    pthread_mutex_destroy(&c->lock);
    pthread_cond_destroy(&c->wd_cond);
    free(c);
}
