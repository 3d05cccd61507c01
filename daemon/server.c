#define _GNU_SOURCE
#include "server.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>
#ifdef MMA_HAVE_SYSTEMD
#include <systemd/sd-daemon.h>
#endif

#include "log.h"
#include "mma.h"
#include "request.h"
#include "util.h"
#include "wire.h"

#define MSGS_PER_WAKE 64 /* bounded work per wake-up, so one client can't starve the rest */

typedef struct srv_client {
    uv_poll_t poll;
    int fd;
    int hello_done;
    mmad_conn_t *conn;
    struct mmad_server *srv;
    struct srv_client *next;
} srv_client_t;

struct mmad_server {
    const mmad_config_t *cfg;
    mmad_backend_t *be;
    mmad_engine_t *engine;
    uv_loop_t loop;
    uv_poll_t listen_poll;
    uv_signal_t sigint, sigterm;
    int listen_fd;
    srv_client_t *clients;
    int nclients;
    uint32_t next_id;
    uint64_t start_ns;
    int stopping;
    uint8_t *rxbuf;
    uint64_t last_copy_ns; /* when the last copy request came (--loop-spin-us) */
    uint64_t wake_until_ns; /* a KICK keeps this thread polling until then (--wake-spin-us) */
    /* --tail-spin: the engine says when a copy is on its last chunks */
    uv_async_t kick;             /* wakes this thread for such a tail */
    _Atomic int tail;            /* a copy is on its last chunks */
    _Atomic uint64_t tail_off_ns; /* when the last such tail ended */
    _Atomic int polling;         /* this thread polls: no kick needed */
};

/* Polling through one tail stops after this long (many clients can keep
 * some copy's tail going all the time). */
#define TAIL_SPIN_MAX_NS 2000000ull

static void notify(const char *state)
{
#ifdef MMA_HAVE_SYSTEMD
    if (getenv("NOTIFY_SOCKET"))
        sd_notify(0, state);
#else
    (void)state;
#endif
}

static int send_resp(srv_client_t *cl, Mma__Response *resp)
{
    int rc = mma_wire_send(cl->fd, &resp->base, NULL, 0);
    if (rc != MMA_OK)
        MMA_DEBUG("client %u: reply not sent: %s", cl->conn->id, mma_strerror(rc));
    return rc;
}

/* A response to `req` (NULL: to an undecodable datagram) with `status`. */
static void resp_init(Mma__Response *resp, const Mma__Request *req, int status)
{
    mma__response__init(resp);
    resp->type = req ? req->type : MMA__REQ_TYPE__REQ_UNKNOWN;
    resp->has_id = req && req->has_id;
    resp->id = req ? req->id : 0;
    resp->status = status;
}

static void reply_error(srv_client_t *cl, const Mma__Request *req, int status, const char *msg)
{
    Mma__Response resp;
    resp_init(&resp, req, status);
    resp.error = (char *)msg;
    send_resp(cl, &resp);
}

static void on_client_closed(uv_handle_t *h)
{
    srv_client_t *cl = h->data;
    mmad_server_t *s = cl->srv;
    close(cl->fd);
    for (srv_client_t **p = &s->clients; *p; p = &(*p)->next)
        if (*p == cl) {
            *p = cl->next;
            break;
        }
    s->nclients--;
    mmad_conn_t *conn = cl->conn;
    atomic_store(&conn->closed, 1);
    /* Unregister now; regions a copy still uses stay mapped until it lands. */
    mmad_registry_clear(conn);
    MMA_INFO("client %u (pid %d) disconnected", conn->id, (int)conn->pid);
    mmad_engine_conn_closed(s->engine, conn); /* hands our reference over */
    free(cl);
}

static void client_close(srv_client_t *cl)
{
    if (uv_is_closing((uv_handle_t *)&cl->poll))
        return;
    uv_poll_stop(&cl->poll);
    uv_close((uv_handle_t *)&cl->poll, on_client_closed);
}

/* ---- handlers: one per request type ---- */

/* The bypass threshold on the wire: MMAD_BYPASS_ALL as UINT64_MAX, which
 * libmma reads as MMA_BYPASS_ALL. */
static uint64_t wire_bypass(int64_t b)
{
    return b == MMAD_BYPASS_ALL ? UINT64_MAX : (uint64_t)b;
}

static void handle_hello(srv_client_t *cl, const Mma__Request *req, int *fds, int nfds)
{
    mmad_server_t *s = cl->srv;
    const Mma__Hello *h = req->hello;
    char msg[160];
    if (!h) {
        reply_error(cl, req, MMA_ERR_PROTO, "HELLO without its body");
        return;
    }
    if (cl->hello_done) {
        reply_error(cl, req, MMA_ERR_PROTO, "HELLO sent twice");
        return;
    }
    if (h->api_version != MMA_API_VERSION) {
        snprintf(msg, sizeof msg, "client speaks API %u, this mmad speaks API %d", h->api_version,
                 MMA_API_VERSION);
        MMA_WARN("client %u (pid %d): %s", cl->conn->id, (int)cl->conn->pid, msg);
        reply_error(cl, req, MMA_ERR_VERSION, msg);
        return;
    }
    uint32_t slots = h->has_flag_slots ? h->flag_slots : 0;
    if (slots > MMA_FLAG_SLOTS_MAX || (slots > 0 && nfds != 1)) {
        reply_error(cl, req, MMA_ERR_INVAL, "flag page: need one memfd and at most 65536 slots");
        return;
    }
    /* The client's submission ring, after its slots: read where it has the
     * entries this mmad expects (a page laid out otherwise is not used). */
    int ring = slots > 0 && s->cfg->submit_ring && h->has_sq_entries && h->sq_entries == MMA_SQ_ENTRIES;
    if (slots > 0) {
        size_t len = (size_t)slots * sizeof(mma_flag_slot_t) + (ring ? sizeof(mma_sq_t) : 0);
        struct stat st;
        /* Sealed before sized (mmad_region_new_mapped says why). */
        if (!mmad_memfd_sealed(fds[0])) {
            MMA_WARN("client %u (pid %d): flag page refused: " MMAD_MEMFD_UNSEALED, cl->conn->id,
                     (int)cl->conn->pid);
            reply_error(cl, req, MMA_ERR_INVAL, "flag page: " MMAD_MEMFD_UNSEALED);
            return;
        }
        if (fstat(fds[0], &st) != 0 || (size_t)st.st_size < len) {
            reply_error(cl, req, MMA_ERR_INVAL, "flag page memfd is smaller than its slots");
            return;
        }
        void *map = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fds[0], 0);
        if (map == MAP_FAILED) {
            reply_error(cl, req, MMA_ERR_SYSTEM, "cannot map the flag page");
            return;
        }
        cl->conn->flags = map;
        cl->conn->flags_len = len;
        cl->conn->nslots = slots;
        if (ring) {
            cl->conn->sq = (mma_sq_t *)(void *)(cl->conn->flags + slots);
            atomic_store(&cl->conn->sq->polling, atomic_load(&s->polling));
        }
    }
    if (h->name)
        snprintf(cl->conn->name, sizeof cl->conn->name, "%s", h->name);
    cl->hello_done = 1;
    Mma__HelloReply hr = MMA__HELLO_REPLY__INIT;
    hr.daemon_version = MMA_VERSION_NUM;
    hr.api_version = MMA_API_VERSION;
    hr.has_features = 1;
    hr.features = MMA_FEATURE_SCATTER_GATHER | MMA_FEATURE_PRIORITY |
                  (s->be->simulated ? 0 : MMA_FEATURE_STREAM_ORDER);
    hr.backend = (char *)s->be->ops->name;
    hr.has_gpu_count = 1;
    hr.gpu_count = (uint32_t)s->be->gpu_count;
    hr.has_simulated = 1;
    hr.simulated = s->be->simulated;
    hr.has_bypass_threshold = 1;
    hr.bypass_threshold = wire_bypass(s->be->bypass_threshold);
    hr.has_sim_scale = 1;
    hr.sim_scale = s->be->simulated ? s->be->sim_scale : 1.0;
    hr.has_sq = 1;
    hr.sq = cl->conn->sq != NULL;
    hr.has_cold_bypass = 1;
    hr.cold_bypass = s->be->simulated ? 0 : s->cfg->cold_bypass;
    hr.has_cold_small = hr.has_relays_warm_us = 1;
    hr.cold_small = s->be->simulated ? 0 : s->cfg->cold_small;
    hr.relays_warm_us = s->be->relay_kernel_resident ? (uint32_t)s->cfg->relay_linger_us : 0;
    char *bus[MMAD_MAX_GPUS];
    if (!s->be->simulated) {
        for (int g = 0; g < s->be->gpu_count; g++)
            bus[g] = s->be->gpus[g].pci_bus_id;
        hr.n_gpu_pci_bus_id = (size_t)s->be->gpu_count;
        hr.gpu_pci_bus_id = bus;
    }
    Mma__Response resp;
    resp_init(&resp, req, MMA_OK);
    resp.hello = &hr;
    MMA_INFO("client %u: pid %d uid %u '%s', %u flag slots%s", cl->conn->id, (int)cl->conn->pid,
             (unsigned)cl->conn->uid, cl->conn->name, slots, cl->conn->sq ? ", submission ring" : "");
    send_resp(cl, &resp);
}

static void reply_region(srv_client_t *cl, const Mma__Request *req, mmad_region_t *r)
{
    mmad_registry_add(cl->conn, r);
    Mma__RegisterReply rr = MMA__REGISTER_REPLY__INIT;
    rr.region_id = r->id;
    Mma__Response resp;
    resp_init(&resp, req, MMA_OK);
    resp.register_ = &rr;
    send_resp(cl, &resp);
}

/* A region's memfd (host memory, or a simulated GPU's) must be sealed
 * against shrinking: refused here in words (mmad_region_new_mapped refuses
 * it again). 1 when refused; the fd is left to the caller. */
static int refuse_unsealed(srv_client_t *cl, const Mma__Request *req, int fd)
{
    if (mmad_memfd_sealed(fd))
        return 0;
    MMA_WARN("client %u (pid %d): registration refused: " MMAD_MEMFD_UNSEALED, cl->conn->id, (int)cl->conn->pid);
    reply_error(cl, req, MMA_ERR_INVAL, MMAD_MEMFD_UNSEALED);
    return 1;
}

static void handle_register(srv_client_t *cl, const Mma__Request *req, int *fds, int *nfds)
{
    mmad_server_t *s = cl->srv;
    mmad_region_t *r = NULL;
    int rc;
    char msg[160];
    if (req->type == MMA__REQ_TYPE__REGISTER_HOST) {
        if (!req->register_host || *nfds != 1) {
            reply_error(cl, req, MMA_ERR_INVAL, "REGISTER_HOST needs its size and one memfd");
            return;
        }
        if (refuse_unsealed(cl, req, fds[0]))
            return;
        rc = mmad_region_new_mapped(s->be, MMAD_REGION_HOST, -1, fds[0], req->register_host->size, &r);
        *nfds = 0; /* consumed */
    } else {
        const Mma__RegisterDevice *d = req->register_device;
        if (!d) {
            reply_error(cl, req, MMA_ERR_INVAL, "REGISTER_DEVICE without its body");
            return;
        }
        if (d->gpu >= (uint32_t)s->be->gpu_count) {
            snprintf(msg, sizeof msg, "gpu %u does not exist (this box has %d)", d->gpu, s->be->gpu_count);
            reply_error(cl, req, MMA_ERR_NO_GPU, msg);
            return;
        }
        if (*nfds == 1) {
            if (!s->be->simulated) {
                reply_error(cl, req, MMA_ERR_UNSUPPORTED, "device memory as a memfd is for the simulated box");
                return;
            }
            if (refuse_unsealed(cl, req, fds[0]))
                return;
            rc = mmad_region_new_mapped(s->be, MMAD_REGION_DEVICE, (int)d->gpu, fds[0], d->size, &r);
            *nfds = 0;
        } else if (d->has_ipc_handle) {
            rc = mmad_region_new_ipc(s->be, (int)d->gpu, d->ipc_handle.data, d->ipc_handle.len,
                                     d->has_ipc_offset ? d->ipc_offset : 0, d->size, &r);
        } else {
            reply_error(cl, req, MMA_ERR_INVAL, "REGISTER_DEVICE needs a cudaIpc handle (or a memfd when simulated)");
            return;
        }
    }
    if (rc != MMA_OK) {
        snprintf(msg, sizeof msg, "registration failed: %s", mma_strerror(rc));
        reply_error(cl, req, rc, msg);
        return;
    }
    reply_region(cl, req, r);
}

static void handle_unregister(srv_client_t *cl, const Mma__Request *req)
{
    int rc = req->unregister ? mmad_registry_remove(cl->conn, req->unregister->region_id) : MMA_ERR_INVAL;
    reply_error(cl, req, rc, rc == MMA_OK ? NULL : mma_strerror(rc));
}

/* Queue one copy, from a COPY message (req) or the submission ring (req
 * NULL: a refusal goes out as a response without an id, which libmma logs). */
static void copy_in(srv_client_t *cl, const Mma__Copy *cp, const Mma__Request *req)
{
    mmad_server_t *s = cl->srv;
    char msg[256];
    mmad_job_t *job;
    int rc = mmad_request_build_job(cl->conn, cp, s->be->gpu_count, &job, msg, sizeof msg);
    if (rc != MMA_OK) {
        MMA_WARN("client %u (pid %d): copy refused: %s", cl->conn->id, (int)cl->conn->pid, msg);
        if (cp->slot < cl->conn->nslots) {
            /* The client's stream may already wait on this slot: complete it
             * with the error so nothing waits forever. */
            mma_flag_complete(&cl->conn->flags[cp->slot], cp->seq, rc);
        }
        reply_error(cl, req, rc, msg);
        return;
    }
    atomic_fetch_add_explicit(&cl->conn->inflight, 1, memory_order_relaxed);
    mmad_engine_submit(s->engine, job);
    s->last_copy_ns = mma_now_ns();
}

static void handle_copy(srv_client_t *cl, const Mma__Request *req)
{
    if (!req->copy) {
        reply_error(cl, req, MMA_ERR_INVAL, "COPY without its body");
        return;
    }
    copy_in(cl, req->copy, req);
}

/* Entries one client's ring yields per turn, so that clients take turns;
 * the rings are read until all are empty, since a client that saw this
 * thread polling sent no KICK for what it posted. */
#define SQ_PER_TURN 64
/* Turns a ring is read in at most (sq_drain, sq_take_all): a client has at
 * most its flag slots' worth of copies in flight, so only one that breaks
 * the protocol keeps a ring full. */
#define SQ_MAX_TURNS 64

/* Take the copies cl posted to its submission ring (flagpage.h) and queue
 * them in order. A ring that breaks the protocol (an entry posted past the
 * ring's room, or not written when its tail says so) closes the client:
 * returns -1 then. */
static int sq_take(srv_client_t *cl)
{
    mmad_conn_t *conn = cl->conn;
    mma_sq_t *q = conn->sq;
    if (!q || !cl->hello_done || cl->srv->stopping || uv_is_closing((uv_handle_t *)&cl->poll))
        return 0; /* shutting down: what is posted now is libmma's to finish */
    uint64_t head = atomic_load_explicit(&q->head, memory_order_relaxed); /* only this thread writes it */
    int n = 0;
    for (; n < SQ_PER_TURN; n++) {
        uint64_t tail = atomic_load_explicit(&q->tail, memory_order_seq_cst);
        if (tail == head)
            break;
        const mma_sq_entry_t *e = &q->e[head % MMA_SQ_ENTRIES];
        if (tail - head > MMA_SQ_ENTRIES || atomic_load_explicit(&e->pos, memory_order_acquire) != head + 1) {
            MMA_WARN("client %u (pid %d): submission ring out of order (head %llu, tail %llu): closing it",
                     conn->id, (int)conn->pid, (unsigned long long)head, (unsigned long long)tail);
            client_close(cl);
            return -1;
        }
        /* Copied out before head moves on: the client may reuse the entry then. */
        Mma__Segment sg = MMA__SEGMENT__INIT;
        sg.dst_region = e->dst_region;
        sg.dst_offset = e->dst_offset;
        sg.src_region = e->src_region;
        sg.src_offset = e->src_offset;
        sg.length = e->length;
        Mma__Segment *sgp = &sg;
        Mma__Copy cp = MMA__COPY__INIT;
        cp.slot = e->slot;
        cp.seq = e->seq;
        cp.n_segments = 1;
        cp.segments = &sgp;
        cp.has_priority = 1;
        cp.priority = (e->flags & MMA_SQ_LATENCY) ? 1 : 0;
        cp.has_max_paths = e->max_paths > 0;
        cp.max_paths = e->max_paths;
        cp.has_sent_ns = 1;
        cp.sent_ns = e->sent_ns;
        atomic_store_explicit(&q->head, ++head, memory_order_release);
        conn->ring_copies++;
        copy_in(cl, &cp, NULL);
    }
    return n;
}

/* All of cl's ring, SQ_PER_TURN entries a turn (at most SQ_MAX_TURNS): how
 * many copies it held, or -1 where it broke the protocol (the client is
 * closing). */
static int sq_drain(srv_client_t *cl)
{
    int total = 0;
    for (int turn = 0; turn < SQ_MAX_TURNS; turn++) {
        int took = sq_take(cl);
        if (took < 0)
            return -1;
        total += took;
        if (took < SQ_PER_TURN)
            break;
    }
    return total;
}

/* Every client's ring until all are empty, SQ_PER_TURN entries a turn
 * (at most SQ_MAX_TURNS), the clients taken in turns. */
static void sq_take_all(mmad_server_t *s)
{
    for (int more = 1, turns = 0; more && turns < SQ_MAX_TURNS; turns++) {
        more = 0;
        for (srv_client_t *cl = s->clients; cl; cl = cl->next)
            if (sq_take(cl) == SQ_PER_TURN)
                more = 1;
    }
}

/* Tell every client with a ring whether this thread now reads it unasked
 * (seq_cst: pairs with the client's tail store and polling load). */
static void sq_polling(mmad_server_t *s, int on)
{
    atomic_store(&s->polling, on);
    for (srv_client_t *cl = s->clients; cl; cl = cl->next)
        if (cl->conn->sq)
            atomic_store_explicit(&cl->conn->sq->polling, (uint32_t)on, memory_order_seq_cst);
}

static uint64_t uptime_ms(mmad_server_t *s)
{
    return (mma_now_ns() - s->start_ns) / 1000000ull;
}

static void handle_status(srv_client_t *cl, const Mma__Request *req)
{
    mmad_server_t *s = cl->srv;
    mmad_sched_t *sc = mmad_engine_sched(s->engine);
    Mma__StatusReply st = MMA__STATUS_REPLY__INIT;
    Mma__GpuInfo gi[MMAD_MAX_GPUS], *gp[MMAD_MAX_GPUS];
    st.daemon_version = MMA_VERSION_NUM;
    st.backend = (char *)s->be->ops->name;
    st.has_simulated = 1;
    st.simulated = s->be->simulated;
    st.topology = s->be->topology;
    for (int g = 0; g < s->be->gpu_count; g++) {
        mma__gpu_info__init(&gi[g]);
        gi[g].index = (uint32_t)g;
        gi[g].name = s->be->gpus[g].name;
        gi[g].pci_bus_id = s->be->gpus[g].pci_bus_id;
        gi[g].has_numa_node = 1;
        gi[g].numa_node = s->be->gpus[g].numa_node;
        gi[g].has_memory = 1;
        gi[g].memory = s->be->gpus[g].memory;
        gi[g].has_one_hop = 1;
        gi[g].one_hop = atomic_load_explicit(&s->be->relay_kernel_now[g], memory_order_relaxed) != 0;
        gp[g] = &gi[g];
    }
    st.n_gpus = (size_t)s->be->gpu_count;
    st.gpus = gp;
    st.has_uptime_ms = 1;
    st.uptime_ms = uptime_ms(s);
    st.has_clients = 1;
    st.clients = (uint32_t)s->nclients;
    pthread_mutex_lock(&sc->stats_lock);
    st.has_jobs_done = st.has_bytes_done = 1;
    st.jobs_done = sc->jobs_done;
    st.bytes_done = sc->bytes_done;
    st.has_submit_calls = st.has_submit_ns = st.has_poll_calls = st.has_poll_ns = 1;
    st.submit_calls = sc->submit_calls;
    st.submit_ns = sc->submit_ns;
    st.poll_calls = sc->poll_calls;
    st.poll_ns = sc->poll_ns;
    pthread_mutex_unlock(&sc->stats_lock);
    st.has_relay_kernel_launches = 1;
    st.relay_kernel_launches = atomic_load_explicit(&s->be->relay_kernel_launches, memory_order_relaxed);
    st.has_chunk_size = st.has_staging_slots = st.has_bypass_threshold = 1;
    st.chunk_size = sc->chunk_size;
    st.staging_slots = (uint32_t)sc->staging_slots;
    st.bypass_threshold = wire_bypass(s->be->bypass_threshold);
    st.has_sim_scale = s->be->simulated;
    st.sim_scale = s->be->sim_scale;
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    st.has_cpu_user_us = st.has_cpu_sys_us = st.has_pid = 1;
    st.cpu_user_us = (uint64_t)ru.ru_utime.tv_sec * 1000000u + (uint64_t)ru.ru_utime.tv_usec;
    st.cpu_sys_us = (uint64_t)ru.ru_stime.tv_sec * 1000000u + (uint64_t)ru.ru_stime.tv_usec;
    st.pid = (uint32_t)getpid();
    Mma__Response resp;
    resp_init(&resp, req, MMA_OK);
    resp.status_reply = &st;
    send_resp(cl, &resp);
}

static void handle_paths(srv_client_t *cl, const Mma__Request *req)
{
    mmad_server_t *s = cl->srv;
    mmad_sched_t *sc = mmad_engine_sched(s->engine);
    int n = s->be->gpu_count;
    size_t cap = (size_t)n * (size_t)n * 2;
    Mma__PathStat *ps = calloc(cap, sizeof *ps);
    Mma__PathStat **pp = calloc(cap, sizeof *pp);
    char(*notes)[48] = calloc(cap, 48);
    if (!ps || !pp || !notes) {
        reply_error(cl, req, MMA_ERR_NOMEM, "out of memory");
        goto out;
    }
    size_t k = 0;
    uint64_t now = mma_now_ns();
    pthread_mutex_lock(&sc->stats_lock);
    for (int t = 0; t < n; t++)
        for (int v = 0; v < n; v++)
            for (int d = 0; d < 2; d++) {
                const mmad_path_stat_t *p = &sc->paths[t][v][d];
                Mma__PathStat *o = &ps[k];
                mma__path_stat__init(o);
                o->target = (uint32_t)t;
                o->via = (uint32_t)v;
                o->dir = (uint32_t)d;
                o->has_bytes = o->has_chunks = o->has_active_ns = o->has_inflight = 1;
                o->has_depth = o->has_enabled = 1;
                o->bytes = p->bytes;
                o->chunks = p->chunks;
                o->has_one_hop_chunks = 1;
                o->one_hop_chunks = p->one_hop_chunks;
                o->active_ns = p->active_ns + (p->inflight ? now - p->active_since : 0);
                o->inflight = (uint32_t)p->inflight;
                o->depth = (uint32_t)sc->path_depth;
                o->enabled = p->enabled;
                o->has_yielding = o->has_rate_gbps = 1;
                o->yielding = p->yielding || p->busy;
                o->rate_gbps = p->rate;
                if (p->note[0]) {
                    memcpy(notes[k], p->note, 48);
                    o->note = notes[k];
                }
                pp[k] = o;
                k++;
            }
    pthread_mutex_unlock(&sc->stats_lock);
    Mma__PathsReply pr = MMA__PATHS_REPLY__INIT;
    pr.n_paths = k;
    pr.paths = pp;
    Mma__Response resp;
    resp_init(&resp, req, MMA_OK);
    resp.paths = &pr;
    send_resp(cl, &resp);
out:
    free(ps);
    free(pp);
    free(notes);
}

static void handle_clients(srv_client_t *cl, const Mma__Request *req)
{
    mmad_server_t *s = cl->srv;
    size_t cap = (size_t)s->nclients;
    Mma__ClientInfo *ci = calloc(cap ? cap : 1, sizeof *ci);
    Mma__ClientInfo **cp = calloc(cap ? cap : 1, sizeof *cp);
    if (!ci || !cp) {
        reply_error(cl, req, MMA_ERR_NOMEM, "out of memory");
        goto out;
    }
    size_t k = 0;
    for (srv_client_t *c = s->clients; c && k < cap; c = c->next) {
        mmad_conn_t *cn = c->conn;
        Mma__ClientInfo *o = &ci[k];
        mma__client_info__init(o);
        o->id = cn->id;
        o->has_pid = o->has_uid = o->has_regions = o->has_region_bytes = 1;
        o->has_inflight = o->has_copies = o->has_bytes = 1;
        o->pid = cn->pid;
        o->uid = cn->uid;
        o->name = cn->name;
        for (mmad_region_t *r = cn->regions; r; r = r->next) {
            o->regions++;
            o->region_bytes += r->size;
        }
        o->inflight = (uint32_t)atomic_load(&cn->inflight);
        o->copies = atomic_load(&cn->copies);
        o->bytes = atomic_load(&cn->bytes);
        o->has_ring_copies = 1;
        o->ring_copies = cn->ring_copies;
        cp[k++] = o;
    }
    Mma__ClientsReply cr = MMA__CLIENTS_REPLY__INIT;
    cr.n_clients = k;
    cr.clients = cp;
    Mma__Response resp;
    resp_init(&resp, req, MMA_OK);
    resp.clients = &cr;
    send_resp(cl, &resp);
out:
    free(ci);
    free(cp);
}

/* ring_copies: the copies read from cl's ring just before req. */
static void dispatch(srv_client_t *cl, const Mma__Request *req, int *fds, int *nfds, int ring_copies)
{
    if (!cl->hello_done && req->type != MMA__REQ_TYPE__HELLO) {
        reply_error(cl, req, MMA_ERR_PROTO, "the first message must be HELLO");
        return;
    }
    switch (req->type) {
    case MMA__REQ_TYPE__HELLO:
        handle_hello(cl, req, fds, *nfds);
        break;
    case MMA__REQ_TYPE__REGISTER_HOST:
    case MMA__REQ_TYPE__REGISTER_DEVICE:
        handle_register(cl, req, fds, nfds);
        break;
    case MMA__REQ_TYPE__UNREGISTER:
        handle_unregister(cl, req);
        break;
    case MMA__REQ_TYPE__COPY:
        handle_copy(cl, req);
        break;
    case MMA__REQ_TYPE__STATUS:
        handle_status(cl, req);
        break;
    case MMA__REQ_TYPE__PATHS:
        handle_paths(cl, req);
        break;
    case MMA__REQ_TYPE__CLIENTS:
        handle_clients(cl, req);
        break;
    case MMA__REQ_TYPE__KICK:
        /* on_client_io read the ring before this message. A KICK that
         * brought no copy says that copies are coming (one libmma ran
         * natively while this thread slept, --cold-bypass, or
         * mma_prewarm): poll, and keep the engine awake, for
         * --wake-spin-us, so that the next ones find both awake (a copy
         * libmma ran natively takes up to ~0.6 ms, 32 MiB, and the next one
         * comes after it). A KICK with copies is served like any copy
         * request (--loop-spin-us), so back-to-back copies cost no more. */
        if (!ring_copies) {
            cl->srv->last_copy_ns = mma_now_ns();
            cl->srv->wake_until_ns = cl->srv->last_copy_ns + (uint64_t)(cl->srv->cfg->wake_spin_us * 1000.0);
            mmad_engine_wake(cl->srv->engine, cl->srv->wake_until_ns);
        }
        break;
    default:
        reply_error(cl, req, MMA_ERR_UNSUPPORTED, "unknown request type");
        break;
    }
}

static void on_client_io(uv_poll_t *h, int status, int events)
{
    srv_client_t *cl = h->data;
    mmad_server_t *s = cl->srv;
    if (status < 0) {
        client_close(cl);
        return;
    }
    for (int i = 0; i < MSGS_PER_WAKE; i++) {
        size_t len = 0;
        int fds[MMA_WIRE_MAX_FDS], nfds = 0;
        int rc = mma_wire_recv(cl->fd, s->rxbuf, MMA_WIRE_MAX_MSG, &len, fds, &nfds);
        if (rc == MMA_PENDING)
            break;
        if (rc == MMA_ERR_PROTO) {
            reply_error(cl, NULL, MMA_ERR_PROTO, "datagram too large");
            continue;
        }
        if (rc != MMA_OK) {
            client_close(cl);
            return;
        }
        Mma__Request *req = mma__request__unpack(NULL, len, s->rxbuf);
        /* A KICK is counted as read before the ring is (flagpage.h), and
         * copies the client posted before sending any message come first. */
        if (req && req->type == MMA__REQ_TYPE__KICK && cl->conn->sq)
            atomic_fetch_add_explicit(&cl->conn->sq->kicks_read, 1, memory_order_seq_cst);
        int took = sq_drain(cl);
        if (took < 0) { /* the ring broke the protocol: the client is closing */
            if (req)
                mma__request__free_unpacked(req, NULL);
            for (int k = 0; k < nfds; k++)
                close(fds[k]);
            return;
        }
        if (!req) {
            MMA_WARN("client %u: undecodable request (%zu bytes)", cl->conn->id, len);
            reply_error(cl, NULL, MMA_ERR_PROTO, "undecodable request");
        } else {
            dispatch(cl, req, fds, &nfds, took);
            mma__request__free_unpacked(req, NULL);
        }
        for (int k = 0; k < nfds; k++)
            close(fds[k]); /* fds a handler did not take */
    }
    if (events & UV_DISCONNECT)
        client_close(cl);
}

static void on_accept(uv_poll_t *h, int status, int events)
{
    (void)events;
    mmad_server_t *s = h->data;
    if (status < 0)
        return;
    for (;;) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
                MMA_WARN("accept: %s", strerror(errno));
            return;
        }
        if (s->nclients >= s->cfg->max_clients || s->stopping) {
            MMA_WARN("refusing a connection: %d clients already (--max-clients)", s->nclients);
            close(fd);
            continue;
        }
        srv_client_t *cl = calloc(1, sizeof *cl);
        mmad_conn_t *conn = calloc(1, sizeof *conn);
        if (!cl || !conn) {
            free(cl);
            free(conn);
            close(fd);
            continue;
        }
        atomic_init(&conn->refs, 1);
        conn->id = ++s->next_id;
        struct ucred cred;
        socklen_t clen = sizeof cred;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &clen) == 0) {
            conn->pid = cred.pid;
            conn->uid = cred.uid;
        }
        cl->fd = fd;
        cl->conn = conn;
        cl->srv = s;
        cl->poll.data = cl;
        if (uv_poll_init(&s->loop, &cl->poll, fd) != 0) {
            close(fd);
            free(conn);
            free(cl);
            continue;
        }
        cl->next = s->clients;
        s->clients = cl;
        s->nclients++;
        uv_poll_start(&cl->poll, UV_READABLE | UV_DISCONNECT, on_client_io);
    }
}

/* Engine thread, under the engine's lock. */
static void engine_tail(void *arg, int tail)
{
    mmad_server_t *s = arg;
    if (!tail)
        atomic_store(&s->tail_off_ns, mma_now_ns());
    atomic_store(&s->tail, tail);
    if (tail && !atomic_load(&s->polling))
        uv_async_send(&s->kick);
}

static void on_kick(uv_async_t *h)
{
    (void)h; /* waking this thread was the point */
}

/* Shutdown (SIGTERM, SIGINT): no new connections, requests or ring
 * entries; the engine finishes the copies under way and the queued ones
 * that are ready (mmad_engine_drain: at most DRAIN_ISSUE_NS of issuing),
 * and leaves the rest with `done` unwritten; only then are the clients'
 * sockets closed. A client's libmma sees mmad gone at that close and
 * finishes natively each copy still pending once its stream reaches it,
 * so nothing mmad still writes can land after a native copy of the same
 * bytes, and no stream goes on past a copy that never ran. This thread
 * waits for the drain (it serves nothing meanwhile), at most
 * DRAIN_WAIT_NS: past that, chunks on a GPU that never end. */
#define DRAIN_ISSUE_NS 2000000000ull
#define DRAIN_WAIT_NS 10000000000ull

static void stop_serving(mmad_server_t *s)
{
    if (s->stopping)
        return;
    s->stopping = 1; /* sq_take reads no ring from here on */
    /* No more kicks: once this returns the engine no longer calls
     * engine_tail, so the handle can close. */
    mmad_engine_set_tail_hook(s->engine, NULL, NULL);
    uv_close((uv_handle_t *)&s->kick, NULL);
    notify("STOPPING=1");
    uv_close((uv_handle_t *)&s->listen_poll, NULL);
    uv_close((uv_handle_t *)&s->sigint, NULL);
    uv_close((uv_handle_t *)&s->sigterm, NULL);
    /* Read nothing more from the clients, but keep their sockets open: a
     * closed one would have libmma copy natively what mmad still moves. */
    for (srv_client_t *c = s->clients; c; c = c->next)
        if (!uv_is_closing((uv_handle_t *)&c->poll))
            uv_poll_stop(&c->poll);
    MMA_INFO("shutting down: finishing the copies under way and those ready to run (%d clients)", s->nclients);
    uint64_t t0 = mma_now_ns();
    /* The clients' sockets stay open until no chunk is on the GPUs: a
     * client that saw its socket close would finish natively copies whose
     * chunks mmad still lands, and a late chunk could overwrite what came
     * after. mmad could not exit before they end anyway. */
    while (!mmad_engine_drain(s->engine, DRAIN_ISSUE_NS, DRAIN_WAIT_NS))
        MMA_WARN("shutting down: chunks still on the GPUs after %.0f s; waiting for them (a second signal ends mmad "
                 "at once)",
                 (double)(mma_now_ns() - t0) / 1e9);
    MMA_INFO("shutting down: copies drained in %.1f ms; closing %d clients", (double)(mma_now_ns() - t0) / 1e6,
             s->nclients);
    for (srv_client_t *c = s->clients; c; c = c->next)
        client_close(c);
}

static void on_signal(uv_signal_t *h, int signum)
{
    MMA_INFO("signal %d", signum);
    stop_serving(h->data);
}

static int bind_socket(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        MMA_ERROR("socket path too long: %s", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    /* Make the parent directory (e.g. /run/mma) if it is missing. */
    char dir[sizeof addr.sun_path];
    strcpy(dir, path);
    char *slash = strrchr(dir, '/');
    if (slash && slash != dir) {
        *slash = 0;
        mkdir(dir, 0755);
    }
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        MMA_ERROR("socket: %s", strerror(errno));
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        if (errno != EADDRINUSE) {
            MMA_ERROR("bind %s: %s", path, strerror(errno));
            close(fd);
            return -1;
        }
        /* Someone's socket file: a live daemon, or a stale file? */
        int probe = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
        int live = probe >= 0 && connect(probe, (struct sockaddr *)&addr, sizeof addr) == 0;
        if (probe >= 0)
            close(probe);
        if (live) {
            MMA_ERROR("another mmad is serving %s", path);
            close(fd);
            return -1;
        }
        unlink(path);
        if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
            MMA_ERROR("bind %s: %s", path, strerror(errno));
            close(fd);
            return -1;
        }
    }
    chmod(path, 0666);
    if (listen(fd, 128) != 0) {
        MMA_ERROR("listen %s: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

int mmad_server_create(const mmad_config_t *cfg, mmad_backend_t *be, mmad_engine_t *engine, mmad_server_t **out)
{
    mmad_server_t *s = calloc(1, sizeof *s);
    if (!s)
        return MMA_ERR_NOMEM;
    s->cfg = cfg;
    s->be = be;
    s->engine = engine;
    s->start_ns = mma_now_ns();
    s->rxbuf = malloc(MMA_WIRE_MAX_MSG);
    if (!s->rxbuf) {
        free(s);
        return MMA_ERR_NOMEM;
    }
    s->listen_fd = bind_socket(cfg->socket_path);
    if (s->listen_fd < 0) {
        free(s->rxbuf);
        free(s);
        return MMA_ERR_SYSTEM;
    }
    uv_loop_init(&s->loop);
    uv_poll_init(&s->loop, &s->listen_poll, s->listen_fd);
    s->listen_poll.data = s;
    uv_poll_start(&s->listen_poll, UV_READABLE, on_accept);
    uv_signal_init(&s->loop, &s->sigint);
    uv_signal_init(&s->loop, &s->sigterm);
    s->sigint.data = s->sigterm.data = s;
    uv_signal_start(&s->sigint, on_signal, SIGINT);
    uv_signal_start(&s->sigterm, on_signal, SIGTERM);
    uv_async_init(&s->loop, &s->kick, on_kick);
    if (cfg->loop_spin_us > 0 && cfg->tail_spin)
        mmad_engine_set_tail_hook(engine, engine_tail, s);
    *out = s;
    return MMA_OK;
}

/* Whether the socket thread keeps polling (--loop-spin-us, --tail-spin,
 * --wake-spin-us): until a KICK's wake window ends; within spin_ns of a copy
 * request; through a copy's tail, for at most TAIL_SPIN_MAX_NS since it
 * began polling; and spin_ns after the tail. */
static int keep_polling(mmad_server_t *s, uint64_t spin_ns, uint64_t since)
{
    if (s->stopping)
        return 0;
    uint64_t now = mma_now_ns();
    if (now < s->wake_until_ns)
        return 1;
    if (!spin_ns)
        return 0;
    if (now - s->last_copy_ns < spin_ns)
        return 1;
    if (!s->cfg->tail_spin)
        return 0;
    if (atomic_load(&s->tail))
        return now - since < TAIL_SPIN_MAX_NS;
    return now - atomic_load(&s->tail_off_ns) < spin_ns;
}

int mmad_server_run(mmad_server_t *s)
{
    char st[256];
    snprintf(st, sizeof st, "READY=1\nSTATUS=serving %s on %s (%d GPUs%s)", s->cfg->socket_path,
             s->be->ops->name, s->be->gpu_count, s->be->simulated ? ", simulated" : "");
    notify(st);
    MMA_INFO("serving %s", s->cfg->socket_path);
    /* Copies often come back to back (a client waits for one, then sends
     * the next). With --loop-spin-us this thread polls its sockets for that
     * long after a copy request instead of sleeping in epoll, so the next
     * request does not pay a thread wake-up. */
    uint64_t spin_ns = (uint64_t)(s->cfg->loop_spin_us * 1000.0);
    while (uv_run(&s->loop, UV_RUN_ONCE)) {
        uint64_t since = mma_now_ns();
        for (;;) {
            sq_polling(s, 1);
            while (keep_polling(s, spin_ns, since)) {
                sq_take_all(s);
                if (!uv_run(&s->loop, UV_RUN_NOWAIT)) {
                    sq_polling(s, 0);
                    return MMA_OK;
                }
            }
            sq_polling(s, 0);
            /* A copy posted, or a tail begun, as this thread stopped polling
             * sent no kick: look once more before sleeping. */
            sq_take_all(s);
            if (!keep_polling(s, spin_ns, since))
                break;
        }
    }
    return MMA_OK;
}

void mmad_server_destroy(mmad_server_t *s)
{
    if (!s)
        return;
    if (!s->stopping) {
        stop_serving(s);
        uv_run(&s->loop, UV_RUN_DEFAULT);
    }
    int rc = uv_loop_close(&s->loop);
    if (rc != 0)
        MMA_WARN("libuv loop did not close cleanly: %s", uv_strerror(rc));
    close(s->listen_fd);
    unlink(s->cfg->socket_path);
    free(s->rxbuf);
    free(s);
}
