/* The simulated box: GPUs whose memory is shared host memory, joined by
 * rate-limited links, so routing, backpressure and contention behave as on a
 * real box (scaled down in speed) while every byte is really copied and can
 * be verified.
 *
 * Model. Each hop moves data in quanta; a quantum reserves time on every
 * resource its route crosses (the GPU's PCIe link per direction, its socket's
 * host ceiling per direction, the cross-socket link when the GPU sits on the
 * far socket, NVLink transmit/receive) and completes when the slowest of them
 * has room. One worker thread per copy engine (PCIe H2D, PCIe D2H, NVLink,
 * for each GPU) processes its queue in order, like a CUDA stream. A relay
 * chunk passes through two engines with a staging buffer between them.
 *
 * Contention. --sim-busy-gpus names GPUs whose own process loads their link
 * natively: on those links mmad's quanta get only --sim-busy-share of the
 * rate (the native load itself is not simulated, only what it leaves), so the
 * scheduler's yielding can be seen and tested without GPUs. --sim-busy-file
 * switches that load on and off while mmad runs. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "log.h"
#include "mma.h"
#include "util.h"

#define QUANTUM (128u * 1024u)
/* A resource may start a quantum up to this long in the past: a thread that
 * overslept catches up instead of losing the time (a token bucket with a
 * 1 ms burst), so the simulated rates hold despite timer slack. A resource
 * idle for longer than that starts at the present: idle time is not saved up,
 * or a copy that finds the box idle would run faster than its links. */
#define SLACK_NS 1000000ull
#define MAX_SOCKETS 2

typedef struct sim_res {
    double bytes_per_ns;
    uint64_t next_ns;
    double busy_share; /* 0: no native load here; else mmad's share while the load is on */
} sim_res_t;

typedef struct sim_queue {
    mmad_chunk_t *head, *tail;
    pthread_cond_t cond;
    pthread_t thread;
    int started;
    int gpu;
    int kind; /* 0 PCIe H2D, 1 PCIe D2H, 2 NVLink */
    struct sim_be *be;
} sim_queue_t;

typedef struct sim_be {
    mmad_backend_t base;
    pthread_mutex_t lock;
    int stop;
    int fail_via;
    uint64_t chunk_cost_ns; /* the engine is busy this long per chunk it issues */
    uint64_t relay_latency_ns; /* a relay's NVLink hop starts this much later */
    char busy_file[108];    /* the native loads are on while this exists ("": always) */
    int busy_on;            /* its state when last looked at */
    uint64_t busy_checked;
    uint64_t foreign_at;    /* when foreign_mbps was last published */
    double native_gbps[MMAD_MAX_GPUS][2]; /* a busy link's native load, real-box GB/s */
    int socket_of[MMAD_MAX_GPUS];
    sim_res_t pcie[MMAD_MAX_GPUS][2];
    sim_res_t host[MAX_SOCKETS][2];
    sim_res_t xlink[2];
    sim_res_t nv_tx[MMAD_MAX_GPUS], nv_rx[MMAD_MAX_GPUS];
    sim_queue_t q[MMAD_MAX_GPUS][3];
    char **staging[MMAD_MAX_GPUS];
    unsigned char *staging_used[MMAD_MAX_GPUS];
    mmad_chunk_t *done_head, *done_tail;
    int waking;             /* workers inside base.wake() now */
    pthread_cond_t woke;    /* signalled when waking drops to 0 (sim_wake_off) */
} sim_be_t;

typedef struct preset {
    const char *name;
    int gpus;
    int sockets;
    double pcie_gbps[2], host_gbps[2], xlink_gbps, nvlink_gbps;
} preset_t;

/* Rates from ../shared/HARDWARE.md (4-GPU box). The two-socket preset adds
 * a cross-socket link; its rate is an assumption to check on a real box. */
static const preset_t presets[] = {
    {"4gpu", 4, 1, {55.5, 55.3}, {180.0, 153.0}, 0.0, 396.0},
    {"8gpu-2socket", 8, 2, {55.5, 55.3}, {180.0, 153.0}, 120.0, 396.0},
};

/* Whether the simulated native loads are on; with --sim-busy-file, looked
 * up at most once a millisecond. Under s->lock. */
static int busy_now(sim_be_t *s, uint64_t now)
{
    if (!s->busy_file[0])
        return 1;
    if (now - s->busy_checked >= 1000000ull || !s->busy_checked) {
        s->busy_on = access(s->busy_file, F_OK) == 0;
        s->busy_checked = now;
    }
    return s->busy_on;
}

/* Reserve one quantum on `n` resources; returns when it may be over. */
/* Publish the native loads as the traffic that is not mmad's, the way the
 * cuda backend publishes what the driver's PCIe counters show beyond mmad's
 * own bytes: a measurement every millisecond while copies run. Under
 * s->lock. */
static void foreign_publish(sim_be_t *s, uint64_t now)
{
    if (now - s->foreign_at < 1000000ull)
        return;
    s->foreign_at = now;
    int on = busy_now(s, now);
    for (int g = 0; g < s->base.gpu_count; g++)
        for (int d = 0; d < 2; d++)
            atomic_store_explicit(&s->base.foreign_mbps[g][d], on ? (uint32_t)(s->native_gbps[g][d] * 1000.0) : 0,
                                  memory_order_relaxed);
    atomic_fetch_add_explicit(&s->base.foreign_seq, 1, memory_order_release);
}

static uint64_t reserve(sim_be_t *s, sim_res_t **res, int n, uint64_t bytes)
{
    uint64_t now = mma_now_ns();
    uint64_t floor = now > SLACK_NS ? now - SLACK_NS : 0;
    uint64_t finish = now;
    pthread_mutex_lock(&s->lock);
    foreign_publish(s, now);
    for (int i = 0; i < n; i++) {
        uint64_t start = res[i]->next_ns > floor ? res[i]->next_ns : now;
        double rate = res[i]->bytes_per_ns;
        if (res[i]->busy_share > 0 && busy_now(s, now))
            rate *= res[i]->busy_share; /* the native load takes the rest */
        res[i]->next_ns = start + (uint64_t)((double)bytes / rate);
        if (res[i]->next_ns > finish)
            finish = res[i]->next_ns;
    }
    pthread_mutex_unlock(&s->lock);
    return finish;
}

static void sleep_until(uint64_t t_ns)
{
    struct timespec ts = {.tv_sec = (time_t)(t_ns / 1000000000ull), .tv_nsec = (long)(t_ns % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
        ;
}

/* The resources a PCIe hop of GPU g in direction d crosses. */
static int pcie_route(sim_be_t *s, int g, int d, sim_res_t **res)
{
    int n = 0;
    res[n++] = &s->pcie[g][d];
    res[n++] = &s->host[s->socket_of[g]][d];
    if (s->socket_of[g] != 0) /* host buffers live on socket 0 */
        res[n++] = &s->xlink[d];
    return n;
}

static void move(sim_be_t *s, sim_res_t **res, int n, char *dst, const char *src, uint64_t len)
{
    for (uint64_t off = 0; off < len;) {
        uint64_t q = len - off < QUANTUM ? len - off : QUANTUM;
        uint64_t finish = reserve(s, res, n, q);
        memcpy(dst + off, src + off, q);
        sleep_until(finish);
        off += q;
    }
}

static void enqueue_locked(sim_queue_t *q, mmad_chunk_t *c)
{
    c->next = NULL;
    if (q->tail)
        q->tail->next = c;
    else
        q->head = c;
    q->tail = c;
    pthread_cond_signal(&q->cond);
}

static void finish_locked(sim_be_t *s, mmad_chunk_t *c)
{
    if (c->staging >= 0)
        s->staging_used[c->via][c->staging] = 0;
    c->next = NULL;
    if (s->done_tail)
        s->done_tail->next = c;
    else
        s->done_head = c;
    s->done_tail = c;
}

/* Run one hop of chunk c on engine q; returns the next engine or NULL. */
static sim_queue_t *run_hop(sim_be_t *s, sim_queue_t *q, mmad_chunk_t *c)
{
    sim_res_t *res[4];
    int g = q->gpu;
    if (c->via == c->target) { /* direct: one PCIe hop */
        int n = pcie_route(s, g, c->dir, res);
        if (c->dir == MMA_DIR_H2D)
            move(s, res, n, c->dev, c->host, c->len);
        else
            move(s, res, n, c->host, c->dev, c->len);
        return NULL;
    }
    char *stage = s->staging[c->via][c->staging];
    if (q->kind == 2) { /* NVLink hop between via and target */
        /* On GPUs a relay costs a second copy launch and an event between
         * its hops (~15 us); its NVLink hop is short, so the delay lands
         * there without slowing a stream of relay chunks. */
        if (s->relay_latency_ns)
            sleep_until(mma_now_ns() + s->relay_latency_ns);
        if (c->dir == MMA_DIR_H2D) {
            res[0] = &s->nv_tx[c->via];
            res[1] = &s->nv_rx[c->target];
            move(s, res, 2, c->dev, stage, c->len);
            return NULL;
        }
        res[0] = &s->nv_tx[c->target];
        res[1] = &s->nv_rx[c->via];
        move(s, res, 2, stage, c->dev, c->len);
        return &s->q[c->via][MMA_DIR_D2H];
    }
    int n = pcie_route(s, g, c->dir, res);
    if (c->dir == MMA_DIR_H2D) {
        move(s, res, n, stage, c->host, c->len);
        return &s->q[c->via][2];
    }
    move(s, res, n, c->host, stage, c->len);
    return NULL;
}

static void *worker(void *arg)
{
    sim_queue_t *q = arg;
    sim_be_t *s = q->be;
    pthread_mutex_lock(&s->lock);
    for (;;) {
        while (!q->head && !s->stop)
            pthread_cond_wait(&q->cond, &s->lock);
        if (!q->head)
            break;
        mmad_chunk_t *c = q->head;
        q->head = c->next;
        if (!q->head)
            q->tail = NULL;
        pthread_mutex_unlock(&s->lock);
        sim_queue_t *next = NULL;
        if (c->via == s->fail_via && c->via != c->target)
            c->status = MMA_ERR_BACKEND; /* fault injection: this relay fails */
        else
            next = run_hop(s, q, c);
        pthread_mutex_lock(&s->lock);
        if (next) {
            enqueue_locked(next, c);
        } else {
            finish_locked(s, c);
            /* Called outside the lock (it takes the engine's), with what
             * the lock showed: the engine clears wake through sim_wake_off,
             * which waits for calls in progress, then frees wake_arg. */
            void (*wake)(void *) = s->base.wake;
            void *wake_arg = s->base.wake_arg;
            if (wake) {
                s->waking++;
                pthread_mutex_unlock(&s->lock);
                wake(wake_arg);
                pthread_mutex_lock(&s->lock);
                if (--s->waking == 0)
                    pthread_cond_broadcast(&s->woke);
            }
        }
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

static void sim_wake_off(mmad_backend_t *be)
{
    sim_be_t *s = (sim_be_t *)be;
    pthread_mutex_lock(&s->lock);
    s->base.wake = NULL;
    s->base.wake_arg = NULL;
    while (s->waking > 0)
        pthread_cond_wait(&s->woke, &s->lock);
    pthread_mutex_unlock(&s->lock);
}

static int sim_region_open(mmad_backend_t *be, mmad_region_t *r, const uint8_t *ipc, size_t ipc_len,
                           uint64_t off)
{
    (void)ipc;
    (void)ipc_len;
    (void)off;
    if (r->kind == MMAD_REGION_DEVICE && (r->gpu < 0 || r->gpu >= be->gpu_count))
        return MMA_ERR_NO_GPU;
    /* The memfd mapping is all the simulated box needs. Its pages are made
     * present and writable in mmad now, as pinning host memory or allocating
     * GPU memory does: otherwise the first copies into a fresh region run at
     * the speed of page faults (10-16 us a page on small VMs, a tenth of the
     * simulated links) and the paths that happen to touch it first look slow
     * to the scheduler. It costs the same time once, here. Only a write does
     * it on such VMs (not a read, nor MADV_POPULATE_WRITE); each page's
     * first byte is written with itself. libmma hands the region to its
     * caller only once it is registered, so nothing writes it meanwhile. */
    if (r->map) {
        volatile char *b = r->map;
        for (size_t off = 0; off < r->map_len; off += 4096)
            b[off] = b[off];
    }
    return MMA_OK;
}

static int sim_submit(mmad_backend_t *be, mmad_chunk_t *c)
{
    sim_be_t *s = (sim_be_t *)be;
    c->status = MMA_OK;
    c->staging = -1;
    /* On a real box issuing a chunk costs the engine thread several CUDA
     * calls; model it by keeping the engine (our caller) busy that long. */
    if (s->chunk_cost_ns)
        sleep_until(mma_now_ns() + s->chunk_cost_ns);
    pthread_mutex_lock(&s->lock);
    sim_queue_t *first;
    if (c->via == c->target) {
        first = &s->q[c->target][c->dir];
    } else {
        for (int i = 0; i < be->staging_slots; i++)
            if (!s->staging_used[c->via][i]) {
                s->staging_used[c->via][i] = 1;
                c->staging = i;
                break;
            }
        if (c->staging < 0) {
            pthread_mutex_unlock(&s->lock);
            MMA_ERROR("sim: no free staging slot on gpu%d (scheduler over-committed)", c->via);
            return MMA_ERR_BACKEND;
        }
        first = c->dir == MMA_DIR_H2D ? &s->q[c->via][MMA_DIR_H2D] : &s->q[c->via][2];
    }
    enqueue_locked(first, c);
    pthread_mutex_unlock(&s->lock);
    return MMA_OK;
}

static int sim_poll(mmad_backend_t *be, mmad_chunk_t **out, int max)
{
    sim_be_t *s = (sim_be_t *)be;
    int n = 0;
    pthread_mutex_lock(&s->lock);
    while (n < max && s->done_head) {
        mmad_chunk_t *c = s->done_head;
        s->done_head = c->next;
        if (!s->done_head)
            s->done_tail = NULL;
        out[n++] = c;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

static void sim_destroy(mmad_backend_t *be)
{
    sim_be_t *s = (sim_be_t *)be;
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    for (int g = 0; g < be->gpu_count; g++)
        for (int k = 0; k < 3; k++)
            pthread_cond_signal(&s->q[g][k].cond);
    pthread_mutex_unlock(&s->lock);
    for (int g = 0; g < be->gpu_count; g++) {
        for (int k = 0; k < 3; k++) {
            if (s->q[g][k].started)
                pthread_join(s->q[g][k].thread, NULL);
            pthread_cond_destroy(&s->q[g][k].cond);
        }
        if (s->staging[g])
            for (int i = 0; i < be->staging_slots; i++)
                free(s->staging[g][i]);
        free(s->staging[g]);
        free(s->staging_used[g]);
    }
    pthread_cond_destroy(&s->woke);
    pthread_mutex_destroy(&s->lock);
    free(s);
}

/* "1,2,3" -> bits 1..3 of *mask; "" -> 0. -1 on anything else. */
static int parse_gpu_list(const char *list, int ngpu, unsigned *mask)
{
    *mask = 0;
    const char *p = list;
    while (*p) {
        char *end;
        errno = 0;
        long g = strtol(p, &end, 10);
        if (end == p || errno || g < 0 || g >= ngpu || (*end && *end != ','))
            return -1;
        *mask |= 1u << g;
        p = *end ? end + 1 : end;
        if (*end && !*p)
            return -1; /* a trailing comma */
    }
    return 0;
}

static const mmad_backend_ops_t sim_ops = {
    .name = "sim",
    .region_open = sim_region_open,
    .region_close = NULL,
    .submit = sim_submit,
    .poll = sim_poll,
    .destroy = sim_destroy,
    .wake_off = sim_wake_off,
};

int mmad_backend_sim_create(const mmad_config_t *cfg, mmad_backend_t **out)
{
    const preset_t *p = NULL;
    for (size_t i = 0; i < sizeof presets / sizeof presets[0]; i++)
        if (strcmp(presets[i].name, cfg->sim_preset) == 0)
            p = &presets[i];
    if (!p) {
        MMA_ERROR("unknown simulated box '%s' (presets: 4gpu, 8gpu-2socket)", cfg->sim_preset);
        return MMA_ERR_INVAL;
    }
    sim_be_t *s = calloc(1, sizeof *s);
    if (!s)
        return MMA_ERR_NOMEM;
    mmad_backend_t *be = &s->base;
    be->ops = &sim_ops;
    be->simulated = 1;
    be->event_driven = 1;
    be->sim_scale = cfg->sim_scale;
    be->foreign_known = 1; /* the simulated native loads are all there is */
    be->gpu_count = cfg->sim_gpus > 0 ? cfg->sim_gpus : p->gpus;
    be->chunk_size = cfg->chunk_size;
    be->staging_slots = cfg->staging_slots;
    be->path_depth = cfg->path_depth;
    /* No native path on the simulated box: libmma has nothing to bypass to. */
    be->bypass_threshold = cfg->bypass_threshold >= 0 ? cfg->bypass_threshold : 0;
    s->fail_via = cfg->sim_fail_via;
    s->chunk_cost_ns = (uint64_t)(cfg->sim_chunk_cost_us * 1000.0 / cfg->sim_scale);
    s->relay_latency_ns = (uint64_t)(cfg->sim_relay_latency_us * 1000.0 / cfg->sim_scale);
    snprintf(s->busy_file, sizeof s->busy_file, "%s", cfg->sim_busy_file);
    unsigned busy = 0;
    if (parse_gpu_list(cfg->sim_busy_gpus, be->gpu_count, &busy) != 0) {
        MMA_ERROR("--sim-busy-gpus: '%s' is not a comma list of simulated GPUs (0..%d)", cfg->sim_busy_gpus,
                  be->gpu_count - 1);
        free(s);
        return MMA_ERR_INVAL;
    }
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->woke, NULL);
    double scale = cfg->sim_scale; /* GB/s * scale = bytes per ns */
    int per_socket = (be->gpu_count + p->sockets - 1) / p->sockets;
    for (int d = 0; d < 2; d++) {
        for (int k = 0; k < MAX_SOCKETS; k++)
            s->host[k][d].bytes_per_ns = p->host_gbps[d] * scale;
        s->xlink[d].bytes_per_ns = (p->xlink_gbps > 0 ? p->xlink_gbps : 1e6) * scale;
    }
    snprintf(be->topology, sizeof be->topology,
             "simulated %s: %d GPUs, PCIe %.1f/%.1f GB/s, host %.0f/%.0f GB/s per socket%s, NVLink %.0f GB/s, "
             "rates x%g",
             p->name, be->gpu_count, p->pcie_gbps[0], p->pcie_gbps[1], p->host_gbps[0], p->host_gbps[1],
             p->sockets > 1 ? ", cross-socket 120 GB/s" : "", p->nvlink_gbps, scale);
    if (busy)
        MMA_INFO("sim: the links of gpus %s carry native loads (mmad gets %.0f%% of them)%s%s", cfg->sim_busy_gpus,
                 cfg->sim_busy_share * 100.0, s->busy_file[0] ? " while this exists: " : "", s->busy_file);
    for (int g = 0; g < be->gpu_count; g++) {
        mmad_gpu_t *gi = &be->gpus[g];
        gi->index = g;
        snprintf(gi->name, sizeof gi->name, "Simulated GPU");
        snprintf(gi->pci_bus_id, sizeof gi->pci_bus_id, "sim:%02x:00.0", g + 1);
        s->socket_of[g] = g / per_socket;
        gi->socket = s->socket_of[g];
        gi->numa_node = s->socket_of[g];
        gi->memory = 0;
        for (int d = 0; d < 2; d++) {
            s->pcie[g][d].bytes_per_ns = p->pcie_gbps[d] * scale;
            if (busy & (1u << g)) {
                s->pcie[g][d].busy_share = cfg->sim_busy_share;
                s->native_gbps[g][d] = p->pcie_gbps[d] * (1.0 - cfg->sim_busy_share);
            }
        }
        s->nv_tx[g].bytes_per_ns = p->nvlink_gbps * scale;
        s->nv_rx[g].bytes_per_ns = p->nvlink_gbps * scale;
        for (int t = 0; t < be->gpu_count; t++)
            be->relay_ok[t][g] = t != g;
        s->staging[g] = calloc((size_t)be->staging_slots, sizeof(char *));
        s->staging_used[g] = calloc((size_t)be->staging_slots, 1);
        if (!s->staging[g] || !s->staging_used[g])
            goto nomem;
        for (int i = 0; i < be->staging_slots; i++) {
            if (!(s->staging[g][i] = malloc(be->chunk_size)))
                goto nomem;
            /* Present now, as GPU memory is: a relay's first chunks must
             * not pay page faults that a direct chunk does not. (Not with
             * zeros: the compiler would make malloc + memset a calloc,
             * which touches nothing.) */
            memset(s->staging[g][i], 0xa5, be->chunk_size);
        }
    }
    for (int g = 0; g < be->gpu_count; g++)
        for (int k = 0; k < 3; k++) {
            sim_queue_t *q = &s->q[g][k];
            q->be = s;
            q->gpu = g;
            q->kind = k;
            pthread_cond_init(&q->cond, NULL);
            if (pthread_create(&q->thread, NULL, worker, q) != 0) {
                MMA_ERROR("sim: cannot start a copy-engine thread");
                sim_destroy(be);
                return MMA_ERR_SYSTEM;
            }
            q->started = 1;
        }
    *out = be;
    return MMA_OK;
nomem:
    MMA_ERROR("sim: out of memory for staging buffers");
    for (int g = 0; g < be->gpu_count; g++)
        for (int k = 0; k < 3; k++)
            pthread_cond_init(&s->q[g][k].cond, NULL);
    sim_destroy(be);
    return MMA_ERR_NOMEM;
}
