#include "engine.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>

#include "log.h"
#include "mma.h"
#include "util.h"

typedef struct intake {
    int kind; /* 0 job, 1 connection closed */
    void *ptr;
    struct intake *next;
} intake_t;

struct mmad_engine {
    mmad_backend_t *be;
    mmad_sched_t sched;
    pthread_t thread;
    pthread_mutex_t lock;
    pthread_cond_t cond;
    intake_t *in_head, *in_tail;
    int kicked;
    /* mmad_engine_wake: an idle engine stays awake until then (mma_now_ns);
     * written by the socket thread alone, read while idle without the lock */
    _Atomic uint64_t awake_until;
    int stop;
    /* Shutdown (mmad_engine_drain), under lock: the socket thread asked for
     * a drain and waits on drained_cond for `drained`; no chunk is issued
     * after drain_until (mma_now_ns). */
    int draining, drained;
    uint64_t drain_until;
    pthread_cond_t drained_cond;
    int waiting_reached; /* jobs whose slot has not shown `reached` */
    int dropped;         /* jobs released at shutdown without `done` (engine thread) */
    void (*tail_hook)(void *arg, int tail); /* under lock */
    void *tail_arg;
    _Atomic int hooked;
    /* How long the engine polls without sleeping after it last made
     * progress (--engine-spin-us). A poll costs ~0.1 us with completion
     * flags (bench/results/2026-11-27-4xH200-callcost), so this is cheap; a
     * sleep costs a wake-up. */
    uint64_t spin_ns;
    uint64_t idle_spin_ns; /* --idle-spin-us: how long an idle engine stays awake */
    int spin_queued;       /* --engine-spin-queued */
    int tail_state;      /* what the hook was last told (engine thread) */
};

static void engine_wake(void *arg)
{
    mmad_engine_t *e = arg;
    pthread_mutex_lock(&e->lock);
    e->kicked = 1;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
}

static void push(mmad_engine_t *e, int kind, void *ptr)
{
    intake_t *it = malloc(sizeof *it);
    if (!it) {
        /* Out of memory in the hand-off: finish the job as failed rather
         * than lose it (the client's stream must never wait forever). */
        if (kind == 0)
            mmad_job_complete(ptr, MMA_ERR_NOMEM);
        else
            mmad_conn_unref(ptr);
        return;
    }
    it->kind = kind;
    it->ptr = ptr;
    it->next = NULL;
    pthread_mutex_lock(&e->lock);
    if (e->in_tail)
        e->in_tail->next = it;
    else
        e->in_head = it;
    e->in_tail = it;
    e->kicked = 1;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
}

void mmad_engine_submit(mmad_engine_t *e, mmad_job_t *job)
{
    push(e, 0, job);
}

void mmad_engine_wake(mmad_engine_t *e, uint64_t until_ns)
{
    /* at least the idle window, as work would give it */
    uint64_t idle = mma_now_ns() + e->idle_spin_ns;
    if (idle > until_ns)
        until_ns = idle;
    if (until_ns > atomic_load_explicit(&e->awake_until, memory_order_relaxed))
        atomic_store_explicit(&e->awake_until, until_ns, memory_order_relaxed);
    pthread_mutex_lock(&e->lock);
    e->kicked = 1;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
}

void mmad_engine_conn_closed(mmad_engine_t *e, mmad_conn_t *conn)
{
    push(e, 1, conn);
}

void mmad_engine_set_tail_hook(mmad_engine_t *e, void (*hook)(void *arg, int tail), void *arg)
{
    pthread_mutex_lock(&e->lock);
    e->tail_hook = hook;
    e->tail_arg = arg;
    atomic_store(&e->hooked, hook != NULL);
    pthread_mutex_unlock(&e->lock);
}

mmad_sched_t *mmad_engine_sched(mmad_engine_t *e)
{
    return &e->sched;
}

void mmad_job_complete(mmad_job_t *job, int status)
{
    mmad_conn_t *c = job->conn;
    mma_flag_complete(&c->flags[job->slot], job->seq, status);
    atomic_fetch_add_explicit(&c->copies, 1, memory_order_relaxed);
    if (status == MMA_OK)
        atomic_fetch_add_explicit(&c->bytes, job->total, memory_order_relaxed);
    atomic_fetch_sub_explicit(&c->inflight, 1, memory_order_relaxed);
    if (status != MMA_OK && status != MMA_ERR_CANCELLED)
        MMA_WARN("client %u copy (slot %u seq %llu) failed: %s", c->id, job->slot,
                 (unsigned long long)job->seq, mma_strerror(status));
    mmad_job_free(job);
}

void mmad_job_free(mmad_job_t *job)
{
    for (size_t i = 0; i < job->nrefs; i++)
        mmad_region_unref(job->refs[i]);
    free(job->refs);
    free(job->segs);
    if (job->conn)
        mmad_conn_unref(job->conn);
    free(job);
}

/* Release a job at shutdown without writing its flag slot: its copy did
 * not run, or not wholly. `done` unwritten, a stream waiting on it keeps
 * waiting, and libmma's watchdog, seeing mmad gone, finishes the copy
 * natively once its stream has reached it (a copy run only in part is run
 * again whole: the same bytes). Writing done with an error instead would
 * let the stream go on with data never copied. */
static void job_drop(mmad_job_t *j)
{
    atomic_fetch_sub_explicit(&j->conn->inflight, 1, memory_order_relaxed);
    mmad_job_free(j);
}

/* Finish each job of a list (linked by ->next) with its own status; at
 * shutdown (stopping) one cancelled is dropped instead (job_drop): its
 * client is gone or mmad is going, and any other status is the copy's own
 * end. Returns how many were dropped. */
static int finish_list(mmad_job_t *j, int stopping)
{
    int dropped = 0;
    while (j) {
        mmad_job_t *next = j->next;
        if (stopping && j->status == MMA_ERR_CANCELLED) {
            job_drop(j);
            dropped++;
        } else {
            mmad_job_complete(j, j->status);
        }
        j = next;
    }
    return dropped;
}

static int slot_reached(const mmad_job_t *j)
{
    return mma_flag_read(&j->conn->flags[j->slot].reached) >= j->seq;
}

/* Take the intake list and act on it. Returns how many items. */
static int take_intake(mmad_engine_t *e)
{
    pthread_mutex_lock(&e->lock);
    intake_t *it = e->in_head;
    e->in_head = e->in_tail = NULL;
    /* Shutting down: a job is dropped, not completed, once the drain is
     * over (or there is none); one taken while it lasts still runs if its
     * slot shows `reached`. */
    int stopping = e->stop || e->draining;
    int late = e->stop || e->drained;
    pthread_mutex_unlock(&e->lock);
    int n = 0;
    while (it) {
        intake_t *next = it->next;
        if (it->kind == 0) {
            mmad_job_t *j = it->ptr;
            if (late) {
                job_drop(j);
                e->dropped++;
            } else if (atomic_load(&j->conn->closed)) {
                mmad_job_complete(j, MMA_ERR_CANCELLED);
            } else {
                if (e->be->ops->prepare)
                    e->be->ops->prepare(e->be, j->target);
                j->runnable = slot_reached(j);
                if (j->runnable)
                    j->t_runnable = mma_now_ns();
                else
                    e->waiting_reached++;
                mmad_sched_add(&e->sched, j);
            }
        } else {
            mmad_conn_t *c = it->ptr;
            for (mmad_job_t *j = e->sched.jobs; j; j = j->next)
                if (j->conn == c && !j->runnable) {
                    j->runnable = 1; /* nothing more will be carved from it */
                    e->waiting_reached--;
                }
            e->dropped += finish_list(mmad_sched_cancel_conn(&e->sched, c), stopping);
            mmad_conn_unref(c);
        }
        free(it);
        it = next;
        n++;
    }
    return n;
}

static int check_reached(mmad_engine_t *e)
{
    int n = 0;
    for (mmad_job_t *j = e->sched.jobs; j && e->waiting_reached > 0; j = j->next)
        if (!j->runnable && slot_reached(j)) {
            j->runnable = 1;
            j->t_runnable = mma_now_ns();
            e->waiting_reached--;
            n++;
        }
    return n;
}

static int reap(mmad_engine_t *e, int stopping)
{
    mmad_chunk_t *done[64];
    int total = 0, n;
    for (;;) {
        uint64_t t0 = mma_now_ns();
        n = e->be->ops->poll(e->be, done, 64);
        uint64_t t1 = mma_now_ns();
        pthread_mutex_lock(&e->sched.stats_lock);
        e->sched.poll_calls++;
        e->sched.poll_ns += t1 - t0;
        pthread_mutex_unlock(&e->sched.stats_lock);
        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            mmad_job_t *j = mmad_sched_chunk_done(&e->sched, done[i]);
            if (j) {
                j->next = NULL;
                e->dropped += finish_list(j, stopping);
            }
        }
        total += n;
    }
    return total;
}

/* How many jobs that may run at shutdown have bytes left to issue: they
 * showed `reached` and have not failed. */
static int runnable_left(const mmad_engine_t *e)
{
    int n = 0;
    for (const mmad_job_t *j = e->sched.jobs; j; j = j->next)
        n += j->runnable && j->status == MMA_OK && j->issued < j->total;
    return n;
}

/* Shutdown, with no chunk in flight: every job left (not reached, or cut
 * off by the drain's deadline) is dropped without its flag slot written. */
static void drop_all(mmad_engine_t *e)
{
    mmad_job_t *j = mmad_sched_take_idle(&e->sched);
    while (j) {
        mmad_job_t *next = j->next;
        if (!j->runnable)
            e->waiting_reached--;
        job_drop(j);
        e->dropped++;
        j = next;
    }
}

static void wait_for_work(mmad_engine_t *e, uint64_t timeout_ns)
{
    pthread_mutex_lock(&e->lock);
    if (!e->kicked && !e->in_head) {
        if (timeout_ns == 0) {
            pthread_cond_wait(&e->cond, &e->lock);
        } else {
            struct timespec ts = mma_deadline_ns(timeout_ns);
            pthread_cond_timedwait(&e->cond, &e->lock, &ts);
        }
    }
    e->kicked = 0;
    pthread_mutex_unlock(&e->lock);
}

/* Where the copies' tails stand, in one pass over the jobs:
 * TAIL_PENDING when a copy has all its chunks on paths and waits only for
 * them to land (its completion is due any moment, and late noticing is pure
 * added latency); TAIL_NEAR_END when a copy is, moreover, on its last
 * chunks: no more in flight than it has paths (each path on its last one). */
enum { TAIL_NONE, TAIL_PENDING, TAIL_NEAR_END };
static int tail_scan(const mmad_engine_t *e)
{
    int tail = TAIL_NONE, vias[MMAD_MAX_GPUS];
    for (const mmad_job_t *j = e->sched.jobs; j; j = j->next) {
        if (j->inflight == 0 || j->issued < j->total)
            continue;
        if (j->inflight <= mmad_sched_paths_for(&e->sched, j->target, j->max_paths, vias))
            return TAIL_NEAR_END;
        tail = TAIL_PENDING;
    }
    return tail;
}

/* Tell the tail hook when "a copy is near its end" changes. */
static void tail_update(mmad_engine_t *e, int tail)
{
    if (!atomic_load_explicit(&e->hooked, memory_order_relaxed))
        return;
    int t = tail == TAIL_NEAR_END;
    if (t == e->tail_state)
        return;
    e->tail_state = t;
    pthread_mutex_lock(&e->lock);
    if (e->tail_hook)
        e->tail_hook(e->tail_arg, t);
    pthread_mutex_unlock(&e->lock);
}

static void *engine_main(void *arg)
{
    mmad_engine_t *e = arg;
    uint64_t backoff = 0, last_progress = 0;
    int spins = 0;
    /* Poll sleeps here are a few microseconds; the default 50 us timer slack
     * would stretch every one of them (and every copy's completion). */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    prctl(PR_SET_NAME, "mmad-engine", 0, 0, 0); /* top -H, and mmad's CPU line at exit */
    for (;;) {
        /* The shutdown state first, the intake after it: every job pushed
         * before a drain or stop began is then taken in this pass, so the
         * pass cannot declare the drain over with one still in the intake
         * (it did: a copy sent just before SIGTERM was neither run nor
         * dropped). */
        pthread_mutex_lock(&e->lock);
        int stop = e->stop, shutdown = e->stop || e->draining, draining = e->draining && !e->drained;
        uint64_t until = e->drain_until;
        pthread_mutex_unlock(&e->lock);
        int progress = take_intake(e);
        /* Shutting down (a drain, or a stop without one): no job becomes
         * runnable any more, and chunks go out only while a drain lasts. */
        int closing = stop || draining;
        int issuing = !closing || (!stop && mma_now_ns() < until);
        if (!closing)
            progress += check_reached(e);
        if (issuing)
            progress += mmad_sched_fill(&e->sched);
        mmad_job_t *failed = mmad_sched_take_failed(&e->sched);
        if (failed) {
            finish_list(failed, shutdown);
            progress++;
        }
        progress += reap(e, shutdown);
        int tail = tail_scan(e);
        tail_update(e, tail);
        if (closing && e->sched.chunks_inflight == 0 && (!issuing || !runnable_left(e))) {
            /* Nothing on the GPUs, and nothing more will go: what is left
             * was not reached, or the drain's time ran out. */
            int cut = issuing ? 0 : runnable_left(e);
            drop_all(e);
            if (draining) {
                if (e->dropped > 0)
                    MMA_INFO("shutdown: %d copies not run (or not wholly: %d cut off by the drain's time) are left "
                             "to their clients, whose libmma finishes them natively once their stream reaches them",
                             e->dropped, cut);
                pthread_mutex_lock(&e->lock);
                e->drained = 1;
                pthread_cond_broadcast(&e->drained_cond);
                pthread_mutex_unlock(&e->lock);
            }
            if (stop)
                break;
        }
        if (progress) {
            backoff = 0;
            spins = 0;
            last_progress = mma_now_ns();
            continue;
        }
        if (!e->sched.jobs && e->sched.chunks_inflight == 0) {
            /* Idle. Copies often come back to back (a client waits for one,
             * then sends the next): stay awake for --idle-spin-us after the
             * last progress, so the next one skips a thread wake-up; then
             * sleep until a job or a stop. */
            uint64_t now = mma_now_ns();
            if (now - last_progress < e->idle_spin_ns ||
                now < atomic_load_explicit(&e->awake_until, memory_order_relaxed)) {
                __builtin_ia32_pause();
                continue;
            }
            wait_for_work(e, 0);
            backoff = 0;
        } else if (e->be->event_driven && e->waiting_reached == 0) {
            wait_for_work(e, 50 * 1000000ull); /* the backend wakes us */
        } else {
            /* Every busy path has its next chunk queued behind the one
             * running, no copy is in its tail and no `reached` flag is
             * awaited: a chunk's end seen a sleep late then leaves no link
             * idle (--engine-spin-queued=0). */
            int queued = !e->spin_queued && tail == TAIL_NONE && e->waiting_reached == 0 &&
                         mmad_sched_paths_queued(&e->sched);
            if (tail != TAIL_NONE || (!queued && (spins < 16 || mma_now_ns() - last_progress < e->spin_ns))) {
                /* Polling the GPU or a `reached` flag: spin for a while
                 * after the last progress, since completions often come
                 * within microseconds, and all the while a copy waits only
                 * for its last chunks (a sleep there would be added to the
                 * copy's time: up to the backoff cap, 40 us for 8 MiB
                 * chunks)... */
                spins++;
                __builtin_ia32_pause();
                continue;
            }
            /* ...then back off from 2 us up to a quarter of the time an
             * average chunk in flight takes on one link (at ~50 GB/s), at
             * most 100 us: with two chunks queued per path a link never
             * idles for that, and a long copy costs a fraction of a core.
             * While only a `reached` flag is awaited, stay at 2-8 us. Where
             * `queued`, sleep at once and from a quarter of the cap (with
             * it spinning there, mmad used 94-101% of a core over 1 GiB
             * copies on 4x H100). */
            uint64_t cap = 8000;
            if (e->sched.chunks_inflight > 0) {
                cap = e->sched.bytes_inflight / (uint64_t)e->sched.chunks_inflight / 50 / 4;
                cap = cap < 2000 ? 2000 : cap > 100000 ? 100000 : cap;
            }
            uint64_t first = queued && cap / 4 > 2000 ? cap / 4 : 2000;
            backoff = backoff ? backoff * 2 : first;
            if (backoff > cap)
                backoff = cap;
            wait_for_work(e, backoff);
        }
    }
    return NULL;
}

int mmad_engine_start(mmad_backend_t *be, const mmad_config_t *cfg, mmad_engine_t **out)
{
    mmad_engine_t *e = calloc(1, sizeof *e);
    if (!e)
        return MMA_ERR_NOMEM;
    e->be = be;
    e->spin_ns = (uint64_t)(cfg->engine_spin_us * 1000.0);
    e->idle_spin_ns = (uint64_t)(cfg->idle_spin_us * 1000.0);
    e->spin_queued = cfg->engine_spin_queued;
    int rc = mmad_sched_init(&e->sched, be, cfg);
    if (rc != MMA_OK) {
        free(e);
        return rc;
    }
    pthread_mutex_init(&e->lock, NULL);
    mma_cond_init_monotonic(&e->cond);
    mma_cond_init_monotonic(&e->drained_cond);
    be->wake = engine_wake;
    be->wake_arg = e;
    int err = pthread_create(&e->thread, NULL, engine_main, e);
    if (err) {
        MMA_ERROR("cannot start the engine thread: %s", strerror(err));
        mmad_sched_destroy(&e->sched);
        free(e);
        return MMA_ERR_SYSTEM;
    }
    *out = e;
    return MMA_OK;
}

void mmad_engine_stop(mmad_engine_t *e)
{
    if (!e)
        return;
    pthread_mutex_lock(&e->lock);
    e->stop = 1;
    e->kicked = 1;
    pthread_cond_signal(&e->cond);
    pthread_mutex_unlock(&e->lock);
    pthread_join(e->thread, NULL);
    take_intake(e); /* anything handed over after the thread left */
    /* A backend thread may still be inside wake(e) for a chunk the engine
     * has already reaped: wait it out before e goes. */
    if (e->be->ops->wake_off)
        e->be->ops->wake_off(e->be);
    else
        e->be->wake = NULL;
    mmad_sched_destroy(&e->sched);
    pthread_mutex_destroy(&e->lock);
    pthread_cond_destroy(&e->cond);
    pthread_cond_destroy(&e->drained_cond);
    if (e->dropped > 0)
        MMA_DEBUG("shutdown: %d copies left to their clients in all", e->dropped);
    free(e);
}

int mmad_engine_drain(mmad_engine_t *e, uint64_t issue_ns, uint64_t wait_ns)
{
    uint64_t now = mma_now_ns();
    pthread_mutex_lock(&e->lock);
    if (!e->draining) /* a second call waits on, with the first's issuing time */
        e->drain_until = now + issue_ns;
    e->draining = 1;
    e->kicked = 1;
    pthread_cond_signal(&e->cond);
    struct timespec ts = mma_deadline_ns(wait_ns);
    while (!e->drained)
        if (pthread_cond_timedwait(&e->drained_cond, &e->lock, &ts) == ETIMEDOUT)
            break;
    int drained = e->drained;
    pthread_mutex_unlock(&e->lock);
    return drained;
}
