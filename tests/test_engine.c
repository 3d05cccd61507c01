/* The engine thread over the simulated box: a copy handed to it lands byte
 * for byte and completes its flag slot, and the tail hook (--tail-spin)
 * hears when the copy reaches its last chunks and when no copy is there. */
#define _GNU_SOURCE
#include <check.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include "backend.h"
#include "engine.h"
#include "mma.h"
#include "util.h"

typedef struct {
    pthread_mutex_t lock;
    int calls[2]; /* hook(.., 0) and hook(.., 1) */
    int last;
    int order_ok; /* every call changed the state */
} hook_log_t;

static void hook(void *arg, int tail)
{
    hook_log_t *h = arg;
    pthread_mutex_lock(&h->lock);
    if (tail == h->last)
        h->order_ok = 0;
    h->calls[tail ? 1 : 0]++;
    h->last = tail;
    pthread_mutex_unlock(&h->lock);
}

static mmad_conn_t *conn_new(void)
{
    mmad_conn_t *c = calloc(1, sizeof *c);
    ck_assert_ptr_nonnull(c);
    atomic_init(&c->refs, 1);
    c->nslots = 1;
    c->flags_len = 4096;
    c->flags = mmap(NULL, c->flags_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    ck_assert_ptr_ne(c->flags, MAP_FAILED);
    return c;
}

/* One H2D copy of n bytes into gpu 0, seq `seq` on slot 0, runnable now. */
static mmad_job_t *job_new(mmad_conn_t *c, uint8_t *host, uint8_t *dev, uint64_t n, uint64_t seq)
{
    mmad_job_t *j = calloc(1, sizeof *j);
    ck_assert_ptr_nonnull(j);
    j->segs = calloc(1, sizeof *j->segs);
    ck_assert_ptr_nonnull(j->segs);
    j->segs[0].host = (char *)host;
    j->segs[0].dev = (char *)dev;
    j->segs[0].len = n;
    j->nsegs = 1;
    j->total = n;
    j->dir = MMA_DIR_H2D;
    j->target = 0;
    j->slot = 0;
    j->seq = seq;
    j->status = MMA_OK;
    mmad_conn_ref(c);
    j->conn = c;
    atomic_store(&c->flags[0].reached, seq);
    atomic_fetch_add(&c->inflight, 1);
    return j;
}

static void wait_done(mmad_conn_t *c, uint64_t seq)
{
    uint64_t until = mma_now_ns() + 10000000000ull;
    while (mma_flag_read(&c->flags[0].done) < seq) {
        ck_assert_msg(mma_now_ns() < until, "copy %llu did not complete", (unsigned long long)seq);
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
}

START_TEST(tail_hook_hears_each_copys_end)
{
    mmad_config_t cfg;
    mmad_config_defaults(&cfg);
    cfg.sim_scale = 0.05; /* 8 MiB in a few ms */
    mmad_backend_t *be = NULL;
    ck_assert_int_eq(mmad_backend_sim_create(&cfg, &be), MMA_OK);
    mmad_engine_t *e = NULL;
    ck_assert_int_eq(mmad_engine_start(be, &cfg, &e), MMA_OK);
    hook_log_t h = {.lock = PTHREAD_MUTEX_INITIALIZER, .last = 0, .order_ok = 1};
    mmad_engine_set_tail_hook(e, hook, &h);

    const uint64_t n = 8u << 20;
    uint8_t *host = malloc(n), *dev = calloc(1, n);
    ck_assert_ptr_nonnull(host);
    ck_assert_ptr_nonnull(dev);
    for (uint64_t i = 0; i < n; i++)
        host[i] = (uint8_t)(i * 131 + 7);
    mmad_conn_t *c = conn_new();
    for (uint64_t seq = 1; seq <= 3; seq++) {
        mmad_engine_submit(e, job_new(c, host, dev, n, seq));
        wait_done(c, seq);
        ck_assert_int_eq((int)atomic_load(&c->flags[0].status), MMA_OK);
        ck_assert_int_eq(memcmp(host, dev, n), 0);
        memset(dev, 0, n);
        /* The engine tells the hook "no tail" once the copy is done; give
         * it a moment to get there. */
        uint64_t until = mma_now_ns() + 2000000000ull;
        for (;;) {
            pthread_mutex_lock(&h.lock);
            int ended = h.calls[0] == (int)seq;
            pthread_mutex_unlock(&h.lock);
            if (ended || mma_now_ns() > until)
                break;
            struct timespec ts = {0, 100000};
            nanosleep(&ts, NULL);
        }
    }
    pthread_mutex_lock(&h.lock);
    /* Each copy: one "tail" when its last chunks were in flight, one "no
     * tail" after; never the same twice in a row. */
    ck_assert_int_eq(h.calls[1], 3);
    ck_assert_int_eq(h.calls[0], 3);
    ck_assert_int_eq(h.order_ok, 1);
    pthread_mutex_unlock(&h.lock);

    /* Unhooked: no more calls. */
    mmad_engine_set_tail_hook(e, NULL, NULL);
    mmad_engine_submit(e, job_new(c, host, dev, n, 4));
    wait_done(c, 4);
    ck_assert_int_eq(memcmp(host, dev, n), 0);
    pthread_mutex_lock(&h.lock);
    ck_assert_int_eq(h.calls[0] + h.calls[1], 6);
    pthread_mutex_unlock(&h.lock);

    mmad_engine_stop(e);
    be->ops->destroy(be);
    mmad_conn_unref(c);
    free(host);
    free(dev);
}
END_TEST

/* Shutdown: a copy whose stream has not reached it is dropped with its
 * `done` unwritten (a stream waiting on done >= seq must not go on with
 * data never copied; libmma finishes it natively once mmad is gone), while
 * a reached one finishes first (mmad_engine_drain), and so does anything
 * mmad_engine_stop finds with no drain before it. */
START_TEST(shutdown_leaves_unreached_copies_undone)
{
    mmad_config_t cfg;
    mmad_config_defaults(&cfg);
    cfg.sim_scale = 0.05;
    mmad_backend_t *be = NULL;
    ck_assert_int_eq(mmad_backend_sim_create(&cfg, &be), MMA_OK);
    mmad_engine_t *e = NULL;
    ck_assert_int_eq(mmad_engine_start(be, &cfg, &e), MMA_OK);
    const uint64_t n = 4u << 20;
    uint8_t *host = malloc(n), *dev = calloc(1, 2 * n);
    ck_assert_ptr_nonnull(host);
    ck_assert_ptr_nonnull(dev);
    for (uint64_t i = 0; i < n; i++)
        host[i] = (uint8_t)(i * 77 + 1);
    mmad_conn_t *c = conn_new(), *c2 = conn_new();
    mmad_job_t *waiting = job_new(c, host, dev, n, 5);
    atomic_store(&c->flags[0].reached, 4); /* its stream is not there yet */
    mmad_engine_submit(e, waiting);
    mmad_engine_submit(e, job_new(c2, host, dev + n, n, 1)); /* reached */
    ck_assert_int_eq(mmad_engine_drain(e, 2000000000ull, 10000000000ull), 1);
    ck_assert_uint_eq(mma_flag_read(&c2->flags[0].done), 1);
    ck_assert_int_eq((int)atomic_load(&c2->flags[0].status), MMA_OK);
    ck_assert_int_eq(memcmp(dev + n, host, n), 0);
    ck_assert_uint_eq(mma_flag_read(&c->flags[0].done), 0);
    ck_assert_int_eq((int)atomic_load(&c->flags[0].status), 0);
    ck_assert_int_eq(atomic_load(&c->inflight), 0);
    ck_assert_int_eq(atomic_load(&c->refs), 1); /* the dropped job let go of it */
    /* After the drain a late job is dropped too, never run. */
    mmad_engine_submit(e, job_new(c, host, dev, n, 6));
    mmad_engine_stop(e);
    ck_assert_uint_eq(mma_flag_read(&c->flags[0].done), 0);
    ck_assert_int_eq(atomic_load(&c->inflight), 0);
    for (uint64_t i = 0; i < n; i++)
        ck_assert_msg(dev[i] == 0, "byte %llu of a dropped copy landed", (unsigned long long)i);

    /* A stop with no drain before it drops the unreached the same way. */
    ck_assert_int_eq(mmad_engine_start(be, &cfg, &e), MMA_OK);
    waiting = job_new(c, host, dev, n, 7);
    atomic_store(&c->flags[0].reached, 6);
    mmad_engine_submit(e, waiting);
    mmad_engine_stop(e);
    ck_assert_uint_eq(mma_flag_read(&c->flags[0].done), 0);
    ck_assert_int_eq(atomic_load(&c->inflight), 0);
    ck_assert_int_eq(atomic_load(&c->refs), 1);

    be->ops->destroy(be);
    mmad_conn_unref(c);
    mmad_conn_unref(c2);
    free(host);
    free(dev);
}
END_TEST

/* A wake() that takes its time, noting when it is inside. */
typedef struct {
    pthread_mutex_t lock;
    int inside, calls, returned;
} slow_wake_t;

static void slow_wake(void *arg)
{
    slow_wake_t *w = arg;
    pthread_mutex_lock(&w->lock);
    w->inside = 1;
    w->calls++;
    pthread_mutex_unlock(&w->lock);
    struct timespec ts = {0, 200000000};
    nanosleep(&ts, NULL);
    pthread_mutex_lock(&w->lock);
    w->inside = 0;
    w->returned++;
    pthread_mutex_unlock(&w->lock);
}

static int slow_wake_inside(slow_wake_t *w)
{
    pthread_mutex_lock(&w->lock);
    int in = w->inside;
    pthread_mutex_unlock(&w->lock);
    return in;
}

/* The engine stops once every chunk has been reaped, but the simulated
 * box's worker calls wake() after it queued the chunk as done, so it could
 * still be on its way into wake(engine) while mmad_engine_stop freed the
 * engine (it re-read wake after dropping its lock, too). wake_off returns
 * only when no worker is inside wake(), and none calls it after. */
START_TEST(sim_wake_off_waits_for_a_wake_in_progress)
{
    mmad_config_t cfg;
    mmad_config_defaults(&cfg);
    cfg.sim_scale = 0.05;
    mmad_backend_t *be = NULL;
    ck_assert_int_eq(mmad_backend_sim_create(&cfg, &be), MMA_OK);
    ck_assert_ptr_nonnull(be->ops->wake_off);
    slow_wake_t w = {.lock = PTHREAD_MUTEX_INITIALIZER};
    be->wake = slow_wake;
    be->wake_arg = &w;
    static char host[4096], dev[4096];
    memset(host, 7, sizeof host);
    mmad_chunk_t c = {.target = 0, .via = 0, .dir = MMA_DIR_H2D, .host = host, .dev = dev, .len = sizeof host};
    ck_assert_int_eq(be->ops->submit(be, &c), MMA_OK);
    uint64_t until = mma_now_ns() + 5000000000ull;
    while (!slow_wake_inside(&w)) {
        ck_assert_msg(mma_now_ns() < until, "the worker never called wake");
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    be->ops->wake_off(be);
    pthread_mutex_lock(&w.lock);
    ck_assert_int_eq(w.inside, 0);
    ck_assert_int_eq(w.returned, 1);
    pthread_mutex_unlock(&w.lock);
    ck_assert_ptr_null(be->wake);
    mmad_chunk_t *out[4];
    ck_assert_int_eq(be->ops->poll(be, out, 4), 1);
    ck_assert_ptr_eq(out[0], &c);
    ck_assert_mem_eq(dev, host, sizeof host);
    /* Off: the next chunk lands without a call. */
    ck_assert_int_eq(be->ops->submit(be, &c), MMA_OK);
    until = mma_now_ns() + 5000000000ull;
    while (be->ops->poll(be, out, 4) == 0) {
        ck_assert_msg(mma_now_ns() < until, "the second chunk never landed");
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    pthread_mutex_lock(&w.lock);
    ck_assert_int_eq(w.calls, 1);
    pthread_mutex_unlock(&w.lock);
    be->ops->destroy(be);
}
END_TEST

/* A backend that refuses every chunk: the simulated box with its submit
 * replaced. */
static int refuse_submit(mmad_backend_t *be, mmad_chunk_t *c)
{
    (void)be;
    (void)c;
    return MMA_ERR_BACKEND;
}

/* A copy whose first chunk the backend refuses has nothing in flight to
 * finish it: the engine still completes it, with the backend's error, so
 * that its client's wait ends (it hung, and the engine polled for it). */
START_TEST(refused_first_chunk_completes_the_copy)
{
    mmad_config_t cfg;
    mmad_config_defaults(&cfg);
    cfg.sim_scale = 0.05;
    mmad_backend_t *be = NULL;
    ck_assert_int_eq(mmad_backend_sim_create(&cfg, &be), MMA_OK);
    const mmad_backend_ops_t *sim_ops = be->ops;
    static mmad_backend_ops_t refusing;
    refusing = *sim_ops;
    refusing.submit = refuse_submit;
    be->ops = &refusing;
    mmad_engine_t *e = NULL;
    ck_assert_int_eq(mmad_engine_start(be, &cfg, &e), MMA_OK);

    const uint64_t n = 1u << 20;
    uint8_t *host = malloc(n), *dev = calloc(1, n);
    ck_assert_ptr_nonnull(host);
    ck_assert_ptr_nonnull(dev);
    memset(host, 0x5a, n);
    mmad_conn_t *c = conn_new();
    for (uint64_t seq = 1; seq <= 2; seq++) {
        mmad_job_t *j = job_new(c, host, dev, n, seq);
        j->max_paths = seq == 1 ? 1 : 0; /* the direct path alone, then every path */
        mmad_engine_submit(e, j);
        wait_done(c, seq);
        ck_assert_int_eq((int)atomic_load(&c->flags[0].status), MMA_ERR_BACKEND);
    }
    ck_assert_int_eq(atomic_load(&c->inflight), 0);
    ck_assert_uint_eq(mmad_engine_sched(e)->jobs_done, 2);

    mmad_engine_stop(e);
    be->ops = sim_ops;
    be->ops->destroy(be);
    mmad_conn_unref(c);
    free(host);
    free(dev);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("engine");
    TCase *tc = tcase_create("tail");
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, tail_hook_hears_each_copys_end);
    suite_add_tcase(s, tc);
    TCase *fail = tcase_create("failures_and_stop");
    tcase_set_timeout(fail, 30);
    tcase_add_test(fail, refused_first_chunk_completes_the_copy);
    tcase_add_test(fail, sim_wake_off_waits_for_a_wake_in_progress);
    tcase_add_test(fail, shutdown_leaves_unreached_copies_undone);
    suite_add_tcase(s, fail);
    SRunner *r = srunner_create(s);
    srunner_run_all(r, CK_NORMAL);
    int failed = srunner_ntests_failed(r);
    srunner_free(r);
    return failed ? 1 : 0;
}
