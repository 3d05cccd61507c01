/* The scheduler (daemon/sched.c) against a FAKE backend: submit() records
 * each chunk and keeps it "in flight" until the test completes it, so the
 * test decides when and in which order chunks land (or fail) and can check
 * routing, backpressure, fairness and the byte accounting exactly, with no
 * threads and no timing. The yielding tests add a fake clock: each path of
 * the fake box then runs its chunks in order at a rate the test sets, and
 * chunks land when that rate says (run_timed). */
#include <check.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "mma.h"
#include "mmad_sched.h"

#define NGPU 4
#define BUF (4u << 20)
#define MAXC 1024

static char hostbuf[BUF], devbuf[BUF];

typedef struct fake_be {
    mmad_backend_t base;
    mmad_chunk_t *inflight[MAXC]; /* submitted, not yet completed */
    int ninflight;
    mmad_chunk_t *done[MAXC];     /* completed, for poll() */
    int ndone;
    struct { /* every accepted submit, in order */
        mmad_job_t *job;
        int via;
        uint64_t len;
        int one_hop_edge;
    } log[8192];
    int nlog;
    int fail_submit_via; /* submit() refuses relays through this GPU */
    int fail_submit_direct; /* submit() refuses direct chunks */
    /* timed runs: bytes/ns of each path (0: untimed), when each path is free
     * again, and when each chunk in flight lands (in step with inflight[]) */
    double rate[NGPU][NGPU][2];
    uint64_t lat[NGPU][NGPU][2]; /* a chunk lands this long after its path moved it */
    uint64_t path_free[NGPU][NGPU][2];
    uint64_t fin[MAXC];
    uint64_t launch_ns[NGPU]; /* the next submit through this GPU takes this long first (a kernel launch) */
    int launched;             /* a launch_ns was spent */
} fake_be_t;

static fake_be_t fb;
static mmad_sched_t s;
static mmad_conn_t conn_x, conn_y;
static uint64_t fake_ns; /* the fake clock of timed runs */

static uint64_t fake_now(void)
{
    return fake_ns;
}

static int fake_submit(mmad_backend_t *be, mmad_chunk_t *c)
{
    fake_be_t *f = (fake_be_t *)be;
    if (c->via == f->fail_submit_via && c->via != c->target)
        return MMA_ERR_BACKEND;
    if (f->fail_submit_direct && c->via == c->target)
        return MMA_ERR_BACKEND;
    ck_assert_int_lt(f->ninflight, MAXC);
    ck_assert_int_lt(f->nlog, 8192);
    c->status = MMA_OK;
    if (f->launch_ns[c->via]) {
        fake_ns += f->launch_ns[c->via];
        f->launch_ns[c->via] = 0;
        f->launched = 1;
    }
    double rate = f->rate[c->target][c->via][c->dir];
    if (rate > 0) {
        uint64_t *free_at = &f->path_free[c->target][c->via][c->dir];
        uint64_t start = *free_at > fake_ns ? *free_at : fake_ns;
        *free_at = start + (uint64_t)((double)c->len / rate);
        f->fin[f->ninflight] = *free_at + f->lat[c->target][c->via][c->dir];
    }
    f->inflight[f->ninflight++] = c;
    f->log[f->nlog].job = c->job;
    f->log[f->nlog].via = c->via;
    f->log[f->nlog].len = c->len;
    f->log[f->nlog].one_hop_edge = c->one_hop_edge;
    f->nlog++;
    return MMA_OK;
}

static int fake_poll(mmad_backend_t *be, mmad_chunk_t **out, int max)
{
    fake_be_t *f = (fake_be_t *)be;
    int n = 0;
    while (n < max && f->ndone > 0) {
        out[n++] = f->done[0];
        memmove(f->done, f->done + 1, (size_t)--f->ndone * sizeof f->done[0]);
    }
    return n;
}

static const mmad_backend_ops_t fake_ops = {.name = "fake", .submit = fake_submit, .poll = fake_poll};

/* A scheduler over the fake 4-GPU box: every relay allowed. */
static void start(uint64_t chunk, uint64_t min_chunk, int depth, int staging, int max_paths)
{
    memset(&fb, 0, sizeof fb);
    fb.base.ops = &fake_ops;
    fb.base.gpu_count = NGPU;
    fb.fail_submit_via = -1;
    for (int t = 0; t < NGPU; t++)
        for (int v = 0; v < NGPU; v++)
            fb.base.relay_ok[t][v] = t != v;
    mmad_config_t cfg;
    mmad_config_defaults(&cfg);
    cfg.chunk_size = chunk;
    cfg.min_chunk = min_chunk;
    cfg.path_depth = depth;
    cfg.chunk_rounds = 1; /* these tests count chunks per path against depth */
    cfg.staging_slots = staging;
    cfg.max_paths = max_paths;
    /* These tests count chunks against equal splits and complete chunks in
     * no time: planned splits and yielding are off unless a test turns them
     * on. */
    cfg.plan_split = 0;
    cfg.plan_learn = 0;
    cfg.relay_edge = 0;
    cfg.yield_frac = 0;
    ck_assert_int_eq(mmad_sched_init(&s, &fb.base, &cfg), MMA_OK);
    atomic_init(&conn_x.refs, 1);
    atomic_init(&conn_y.refs, 1);
}

static void setup(void)
{
    start(64 << 10, 16 << 10, 2, 4, 0);
}

static void teardown(void)
{
    /* Every test drains what it started: nothing may be left in flight. */
    ck_assert_int_eq(fb.ninflight, 0);
    ck_assert_int_eq(s.chunks_inflight, 0);
    for (int v = 0; v < NGPU; v++)
        ck_assert_int_eq(s.staging_inflight[v], 0);
    mmad_sched_destroy(&s);
}

/* A job of segments laid out one after another (with small gaps) in the
 * fake host and device buffers, starting at the given offsets. */
static mmad_job_t *job_new(mmad_conn_t *conn, int target, int dir, int prio, const uint64_t *lens, size_t n,
                           uint64_t hoff, uint64_t doff)
{
    mmad_job_t *j = calloc(1, sizeof *j);
    ck_assert_ptr_nonnull(j);
    j->segs = calloc(n, sizeof *j->segs);
    j->nsegs = n;
    for (size_t i = 0; i < n; i++) {
        ck_assert_uint_le(hoff + lens[i], BUF);
        ck_assert_uint_le(doff + lens[i], BUF);
        j->segs[i].host = hostbuf + hoff;
        j->segs[i].dev = devbuf + doff;
        j->segs[i].len = lens[i];
        j->total += lens[i];
        hoff += lens[i] + 13;
        doff += lens[i] + 29;
    }
    j->conn = conn;
    j->target = target;
    j->dir = dir;
    j->priority = prio;
    j->status = MMA_OK;
    j->runnable = 1;
    return j;
}

static mmad_job_t *job_simple(mmad_conn_t *conn, int target, int prio, uint64_t total, uint64_t off)
{
    return job_new(conn, target, MMA_DIR_H2D, prio, &total, 1, off, off);
}

static void job_free(mmad_job_t *j)
{
    free(j->segs);
    free(j);
}

/* Complete in-flight chunk i with `status` and feed it back through the
 * backend's poll, as the engine does. Returns the job it finished, if any. */
static mmad_job_t *complete(int i, int status)
{
    ck_assert_int_lt(i, fb.ninflight);
    mmad_chunk_t *c = fb.inflight[i];
    c->status = status;
    fb.fin[i] = fb.fin[fb.ninflight - 1];
    fb.inflight[i] = fb.inflight[--fb.ninflight];
    fb.done[fb.ndone++] = c;
    mmad_chunk_t *got[4];
    ck_assert_int_eq(fb.base.ops->poll(&fb.base, got, 4), 1);
    return mmad_sched_chunk_done(&s, got[0]);
}

/* Complete the in-flight chunks oldest first, refilling as they land,
 * until none is left. Returns what the last completion returned: the job
 * its chunk finished, or NULL. */
static mmad_job_t *drain(void)
{
    mmad_job_t *f = NULL;
    while (fb.ninflight > 0) {
        f = complete(0, MMA_OK);
        mmad_sched_fill(&s);
    }
    return f;
}

/* Index of the in-flight chunk on (via) for `job`, or -1. */
static int find_inflight(const mmad_job_t *job, int via)
{
    for (int i = 0; i < fb.ninflight; i++)
        if ((!job || fb.inflight[i]->job == job) && (via < 0 || fb.inflight[i]->via == via))
            return i;
    return -1;
}

/* The invariants every fill must keep. */
static void check_limits(void)
{
    int per_path[NGPU][NGPU][2] = {{{0}}}, staging[NGPU] = {0};
    for (int i = 0; i < fb.ninflight; i++) {
        const mmad_chunk_t *c = fb.inflight[i];
        per_path[c->target][c->via][c->dir]++;
        if (c->via != c->target)
            staging[c->via]++;
        ck_assert_uint_le(c->len, c->job->chunk_len);
        ck_assert_uint_gt(c->len, 0);
    }
    for (int t = 0; t < NGPU; t++)
        for (int v = 0; v < NGPU; v++)
            for (int d = 0; d < 2; d++) {
                ck_assert_int_le(per_path[t][v][d], s.path_depth);
                ck_assert_int_eq(per_path[t][v][d], s.paths[t][v][d].inflight);
            }
    for (int v = 0; v < NGPU; v++) {
        ck_assert_int_le(staging[v], s.staging_slots);
        ck_assert_int_eq(staging[v], s.staging_inflight[v]);
    }
    ck_assert_int_eq(fb.ninflight, s.chunks_inflight);
}

/* ---- chunk length ---- */

START_TEST(chunk_len_rule)
{
    s.chunk_size = 8u << 20;
    s.min_chunk = 512u << 10;
    s.path_depth = 2;
    s.chunk_rounds = 1;
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 64u << 20, 4), 8u << 20);     /* 64M / (4*2) */
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 32u << 20, 4), 4u << 20);
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, (24u << 20) + 1, 4), (3u << 20) + 4096); /* rounded up to 4K */
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 1, 4), 512u << 10);           /* min_chunk */
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 1ull << 40, 4), 8u << 20);    /* chunk_size */
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 4u << 20, 1), 2u << 20);      /* one path: depth pieces */
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 6u << 20, 3), 1u << 20);
    /* Rounds: each path pulls depth x rounds chunks, so fast paths can take
     * more of the copy than slow ones. */
    s.chunk_rounds = 4;
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 64u << 20, 4), 2u << 20);     /* 64M / (4*2*4) */
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 1ull << 30, 4), 8u << 20);    /* capped */
    ck_assert_uint_eq(mmad_sched_chunk_len(&s, 8u << 20, 4), 512u << 10);    /* min_chunk */
    /* Property: within [min_chunk, chunk_size], a 4 KiB multiple, and large
     * enough that npaths*depth*rounds chunks cover the job unless capped. */
    uint64_t x = 88172645463325252ull;
    for (int i = 0; i < 20000; i++) {
        s.chunk_rounds = 1 + i % 5;
        uint64_t k = 2u * (uint64_t)s.chunk_rounds;
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        uint64_t total = 1 + x % (1ull << (x % 37));
        int np = 1 + (int)(x >> 40) % NGPU;
        uint64_t c = mmad_sched_chunk_len(&s, total, np);
        int ok = c >= s.min_chunk && c <= s.chunk_size && c % 4096 == 0 &&
                 /* covers the job in npaths*depth chunks unless capped ... */
                 (c == s.chunk_size || c * (uint64_t)np * k >= total) &&
                 /* ... and is not needlessly large: 4 KiB less would not */
                 (c == s.min_chunk || (c - 4096) * (uint64_t)np * k < total);
        if (!ok)
            ck_abort_msg("chunk_len(total %llu, %d paths) = %llu", (unsigned long long)total, np,
                         (unsigned long long)c);
    }
}
END_TEST

START_TEST(paths_for_order)
{
    int vias[MMAD_MAX_GPUS];
    ck_assert_int_eq(mmad_sched_paths_for(&s, 2, 0, vias), 4);
    ck_assert_int_eq(vias[0], 2); /* direct first, then the ring after the target */
    ck_assert_int_eq(vias[1], 3);
    ck_assert_int_eq(vias[2], 0);
    ck_assert_int_eq(vias[3], 1);
    ck_assert_int_eq(mmad_sched_paths_for(&s, 2, 2, vias), 2);
    ck_assert_int_eq(mmad_sched_paths_for(&s, 2, 1, vias), 1);
    ck_assert_int_eq(vias[0], 2);
    /* A relay set aside in both directions is not offered. */
    mmad_sched_disable_path(&s, 2, 3, MMA_DIR_H2D, "test");
    ck_assert_int_eq(mmad_sched_paths_for(&s, 2, 0, vias), 4);
    mmad_sched_disable_path(&s, 2, 3, MMA_DIR_D2H, "test");
    ck_assert_int_eq(mmad_sched_paths_for(&s, 2, 0, vias), 3);
    ck_assert_int_eq(vias[1], 0);
    /* The direct path is never set aside. */
    mmad_sched_disable_path(&s, 2, 2, MMA_DIR_H2D, "test");
    ck_assert_int_eq(s.paths[2][2][MMA_DIR_H2D].enabled, 1);
}
END_TEST

/* ---- filling paths ---- */

START_TEST(fill_respects_depth_and_staging)
{
    /* Jobs to several GPUs share staging buffers here only if relays go
     * through links that carry a copy of their own (relays_yield_to_direct
     * tests the rule that keeps them off those). */
    s.yield_to_direct = 0;
    /* One big job to GPU 0: depth 2 on each of its 4 paths. */
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 1u << 20, 0);
    mmad_sched_add(&s, a);
    ck_assert_uint_eq(a->chunk_len, 64u << 10);
    ck_assert_int_eq(mmad_sched_fill(&s), 8);
    check_limits();
    for (int v = 0; v < NGPU; v++)
        ck_assert_int_eq(s.paths[0][v][MMA_DIR_H2D].inflight, 2);
    ck_assert_int_eq(mmad_sched_fill(&s), 0); /* backpressure: no room left */
    /* A job to GPU 1 shares the staging buffers of GPUs 2 and 3 (2 of 4
     * used) and GPU 0's (unused). */
    mmad_job_t *b = job_simple(&conn_x, 1, 0, 1u << 20, 1u << 20);
    mmad_sched_add(&s, b);
    ck_assert_int_eq(mmad_sched_fill(&s), 8);
    check_limits();
    ck_assert_int_eq(s.staging_inflight[2], 4);
    ck_assert_int_eq(s.staging_inflight[3], 4);
    /* A job to GPU 2: its direct link, and relays through 0 and 1, whose
     * staging has room; GPU 3's staging is full. */
    mmad_job_t *c = job_simple(&conn_x, 2, 0, 1u << 20, 2u << 20);
    mmad_sched_add(&s, c);
    ck_assert_int_eq(mmad_sched_fill(&s), 6);
    check_limits();
    ck_assert_int_eq(s.paths[2][3][MMA_DIR_H2D].inflight, 0);
    ck_assert_int_eq(s.staging_inflight[0], 4);
    ck_assert_int_eq(s.staging_inflight[1], 4);
    /* Drain everything, refilling as chunks land. */
    mmad_job_t *jobs[3] = {a, b, c};
    int finished = 0;
    while (fb.ninflight > 0) {
        mmad_job_t *j = complete(fb.ninflight - 1, MMA_OK);
        mmad_sched_fill(&s);
        check_limits();
        for (int k = 0; k < 3; k++)
            if (j && j == jobs[k]) {
                ck_assert_uint_eq(j->landed, j->total);
                job_free(j);
                jobs[k] = NULL;
                finished++;
            }
    }
    ck_assert_int_eq(finished, 3);
    ck_assert_ptr_null(s.jobs);
    ck_assert_uint_eq(s.jobs_done, 3);
    ck_assert_uint_eq(s.bytes_done, 3u << 20);
}
END_TEST

START_TEST(paths_queued_while_every_busy_path_has_a_next_chunk)
{
    ck_assert_int_eq(mmad_sched_paths_queued(&s), 0); /* nothing in flight */
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 1u << 20, 0);
    mmad_sched_add(&s, a);
    ck_assert_int_eq(mmad_sched_fill(&s), 8); /* depth 2 on each of 4 paths */
    ck_assert_int_eq(mmad_sched_paths_queued(&s), 1);
    /* a relay's first chunk ends: that path runs its last one, a refill is due */
    int i = find_inflight(a, 2);
    ck_assert_int_ge(i, 0);
    ck_assert_ptr_null(complete(i, MMA_OK));
    ck_assert_int_eq(s.paths[0][2][MMA_DIR_H2D].inflight, 1);
    ck_assert_int_eq(mmad_sched_paths_queued(&s), 0);
    ck_assert_int_eq(mmad_sched_fill(&s), 1);
    ck_assert_int_eq(mmad_sched_paths_queued(&s), 1);
    /* drain: once the last chunks run, some path has one left */
    int seen_single = 0;
    mmad_job_t *j = NULL;
    while (fb.ninflight > 0) {
        j = complete(fb.ninflight - 1, MMA_OK);
        mmad_sched_fill(&s);
        check_limits();
        int single = 0;
        for (int v = 0; v < NGPU; v++)
            single |= s.paths[0][v][MMA_DIR_H2D].inflight == 1;
        ck_assert_int_eq(mmad_sched_paths_queued(&s), fb.ninflight > 0 && !single);
        seen_single |= single;
    }
    ck_assert(seen_single);
    ck_assert_ptr_eq(j, a);
    ck_assert_int_eq(mmad_sched_paths_queued(&s), 0);
    job_free(a);
}
END_TEST

START_TEST(one_staging_slot)
{
    mmad_sched_destroy(&s);
    start(64 << 10, 16 << 10, 2, 1, 0);
    mmad_job_t *a = job_simple(&conn_x, 3, 0, 1u << 20, 0);
    mmad_sched_add(&s, a);
    ck_assert_int_eq(mmad_sched_fill(&s), 5); /* direct 2 + one per relay */
    check_limits();
    ck_assert_int_eq(s.paths[3][3][MMA_DIR_H2D].inflight, 2);
    for (int v = 0; v < 3; v++)
        ck_assert_int_eq(s.paths[3][v][MMA_DIR_H2D].inflight, 1);
    mmad_job_t *j = NULL;
    while (fb.ninflight > 0) {
        j = complete(0, MMA_OK);
        mmad_sched_fill(&s);
        check_limits();
    }
    ck_assert_ptr_eq(j, a);
    job_free(a);
}
END_TEST

START_TEST(direct_path_first)
{
    /* One chunk's worth: it goes over the target's own link. */
    mmad_job_t *a = job_simple(&conn_x, 1, 0, 16u << 10, 0);
    mmad_sched_add(&s, a);
    ck_assert_int_eq(mmad_sched_fill(&s), 1);
    ck_assert_int_eq(fb.log[0].via, 1);
    ck_assert_ptr_eq(complete(0, MMA_OK), a);
    job_free(a);
    /* Three chunks go breadth first: the direct path, then the relays in
     * ring order (target + 1), one chunk each before any path gets a
     * second. */
    mmad_job_t *b = job_simple(&conn_x, 3, 0, 48u << 10, 0);
    mmad_sched_add(&s, b);
    ck_assert_uint_eq(b->chunk_len, 16u << 10);
    ck_assert_int_eq(mmad_sched_fill(&s), 3);
    ck_assert_int_eq(fb.log[1].via, 3);
    ck_assert_int_eq(fb.log[2].via, 0);
    ck_assert_int_eq(fb.log[3].via, 1);
    /* The next copy first takes the idle relay, then the second slots,
     * the direct path first among them. */
    mmad_job_t *c = job_simple(&conn_x, 3, 0, 160u << 10, 1u << 20); /* 8 chunks of 20K */
    mmad_sched_add(&s, c);
    ck_assert_int_eq(mmad_sched_fill(&s), 5);
    ck_assert_int_eq(fb.log[4].via, 2);
    ck_assert_int_eq(fb.log[5].via, 3);
    ck_assert_int_eq(fb.log[6].via, 0);
    ck_assert_int_eq(s.paths[3][3][MMA_DIR_H2D].inflight, 2);
    int d = find_inflight(b, 3);
    ck_assert_int_ge(d, 0);
    complete(d, MMA_OK);
    int before = fb.nlog;
    ck_assert_int_eq(mmad_sched_fill(&s), 1);
    ck_assert_int_eq(fb.log[before].via, 3);
    while (fb.ninflight > 0) {
        mmad_job_t *j = complete(0, MMA_OK);
        if (j)
            job_free(j);
        mmad_sched_fill(&s);
    }
}
END_TEST

/* Drive one or more jobs to completion, completing chunks in a scrambled
 * order, and check that the chunks that landed cover every byte of every
 * segment exactly once, host and device side in step. */
static unsigned char cover[BUF];

static void run_and_check_coverage(mmad_job_t **jobs, int njobs, uint64_t seed, int fail_via)
{
    memset(cover, 0, sizeof cover);
    int left = njobs;
    uint64_t x = seed;
    size_t orig_nsegs[8];
    ck_assert_int_le(njobs, 8);
    for (int k = 0; k < njobs; k++) {
        orig_nsegs[k] = jobs[k]->nsegs; /* a failed relay appends retry segments */
        mmad_sched_add(&s, jobs[k]);
    }
    mmad_sched_fill(&s);
    while (left > 0) {
        check_limits();
        ck_assert_int_gt(fb.ninflight, 0); /* a job not done has something in flight */
        x ^= x << 13, x ^= x >> 7, x ^= x << 17;
        int i = (int)(x % (uint64_t)fb.ninflight);
        mmad_chunk_t *c = fb.inflight[i];
        int st = c->via == fail_via && c->via != c->target ? MMA_ERR_BACKEND : MMA_OK;
        if (st == MMA_OK) {
            /* The chunk lies inside one segment, host and device offsets in step. */
            const mmad_job_t *j = c->job;
            int seg = -1;
            for (size_t k = 0; k < j->nsegs; k++)
                if (c->host >= j->segs[k].host && c->host + c->len <= j->segs[k].host + j->segs[k].len &&
                    c->dev - j->segs[k].dev == c->host - j->segs[k].host)
                    seg = (int)k;
            ck_assert_msg(seg >= 0, "chunk %p+%llu is not inside one segment", (void *)c->host,
                          (unsigned long long)c->len);
            for (uint64_t b = 0; b < c->len; b++)
                cover[c->host - hostbuf + (ptrdiff_t)b]++;
        }
        mmad_job_t *done = complete(i, st);
        if (done) {
            ck_assert_int_eq(done->status, MMA_OK);
            ck_assert_uint_eq(done->landed, done->total);
            ck_assert_uint_eq(done->issued, done->total);
            ck_assert_int_eq(done->inflight, 0);
            left--;
        }
        mmad_sched_fill(&s);
    }
    ck_assert_int_eq(fb.ninflight, 0);
    ck_assert_ptr_null(s.jobs);
    for (int k = 0; k < njobs; k++) {
        mmad_job_t *j = jobs[k];
        for (size_t g = 0; g < orig_nsegs[k]; g++) {
            uint64_t base = (uint64_t)(j->segs[g].host - hostbuf);
            for (uint64_t b = 0; b < j->segs[g].len; b++)
                if (cover[base + b] != 1) /* (a plain test: Check's asserts are slow in loops) */
                    ck_abort_msg("job %d seg %zu byte %llu landed %d times", k, g, (unsigned long long)b,
                                 cover[base + b]);
        }
    }
    /* And no byte outside the segments was touched. */
    size_t total_cover = 0;
    for (size_t b = 0; b < BUF; b++)
        total_cover += cover[b];
    uint64_t want = 0;
    for (int k = 0; k < njobs; k++)
        want += jobs[k]->total;
    ck_assert_uint_eq(total_cover, want);
}

START_TEST(chunks_cover_every_byte_once)
{
    const uint64_t lens[] = {1, 4095, 70001, 12345, 3 * 65536 + 7, 4096, 65536, 65535, 2};
    mmad_job_t *h2d = job_new(&conn_x, 2, MMA_DIR_H2D, 0, lens, sizeof lens / sizeof lens[0], 5, 0);
    const uint64_t lens2[] = {999999, 1, 123457};
    mmad_job_t *d2h = job_new(&conn_y, 2, MMA_DIR_D2H, 0, lens2, 3, 2u << 20, 1u << 20);
    mmad_job_t *jobs[2] = {h2d, d2h};
    run_and_check_coverage(jobs, 2, 12345, -1);
    ck_assert_uint_eq(s.jobs_done, 2);
    ck_assert_uint_eq(s.bytes_done, h2d->total + d2h->total);
    /* Path statistics add up to the bytes moved, by direction. */
    uint64_t by_dir[2] = {0, 0}, chunks = 0;
    for (int v = 0; v < NGPU; v++)
        for (int d = 0; d < 2; d++) {
            by_dir[d] += s.paths[2][v][d].bytes;
            chunks += s.paths[2][v][d].chunks;
        }
    ck_assert_uint_eq(by_dir[MMA_DIR_H2D], h2d->total);
    ck_assert_uint_eq(by_dir[MMA_DIR_D2H], d2h->total);
    ck_assert_uint_eq(chunks, (uint64_t)fb.nlog);
    job_free(h2d);
    job_free(d2h);
}
END_TEST

/* ---- fairness and priority ---- */

START_TEST(round_robin_between_bulk_jobs)
{
    /* One chunk in flight at a time (one path, depth 1): the order chunks
     * are issued in is exactly the order jobs take their turns. */
    mmad_sched_destroy(&s);
    start(16 << 10, 16 << 10, 1, 4, 1);
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 4 * (16u << 10), 0);
    mmad_job_t *b = job_simple(&conn_y, 0, 0, 4 * (16u << 10), 1u << 20);
    mmad_sched_add(&s, a);
    mmad_sched_add(&s, b);
    mmad_sched_fill(&s);
    int finished = 0;
    while (finished < 2) {
        ck_assert_int_eq(fb.ninflight, 1);
        if (complete(0, MMA_OK))
            finished++;
        mmad_sched_fill(&s);
    }
    ck_assert_int_eq(fb.nlog, 8);
    for (int i = 0; i < 8; i++)
        ck_assert_msg(fb.log[i].job == (i % 2 ? b : a), "chunk %d went to job %s; expected strict alternation", i,
                      fb.log[i].job == a ? "a" : "b");
    job_free(a);
    job_free(b);
}
END_TEST

/* --yield-to-direct: while mmad copies into gpu1 itself, a copy into gpu0
 * relays through every link but gpu1's (and gpu1's copy not through
 * gpu0's); once gpu1's copy has landed, gpu1's link takes relays again.
 * Another direction's copy does not hold a link. */
START_TEST(relays_yield_to_direct)
{
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 48 * (64u << 10), 0);
    mmad_job_t *b = job_simple(&conn_y, 1, 0, 8 * (64u << 10), 3u << 20);
    mmad_sched_add(&s, a);
    mmad_sched_add(&s, b);
    mmad_sched_fill(&s);
    int seen[2][NGPU] = {{0}};
    int a_via1_after_b = 0, a_done = 0, b_done = 0;
    for (int steps = 0; fb.ninflight > 0; steps++) {
        ck_assert_int_lt(steps, 1000);
        for (int i = 0; i < fb.ninflight; i++) {
            const mmad_chunk_t *c = fb.inflight[i];
            int k = c->job == a ? 0 : 1;
            seen[k][c->via] = 1;
            if (c->job == a && c->via == 1) {
                ck_assert_msg(b_done, "a relayed through gpu1 before b had landed");
                a_via1_after_b = 1;
            }
            ck_assert_msg(!(c->job == b && c->via == 0 && !a_done), "b relayed through gpu0 before a had landed");
        }
        /* b's chunks land first, so that a still has bytes once b is done */
        int bi = find_inflight(b_done ? NULL : b, -1);
        mmad_job_t *fin = complete(bi >= 0 ? bi : 0, MMA_OK);
        a_done |= fin == a;
        b_done |= fin == b;
        mmad_sched_fill(&s);
    }
    ck_assert(a_done && b_done);
    ck_assert_uint_eq(a->issued, a->total);
    ck_assert_uint_eq(b->issued, b->total);
    /* both used the two links nobody else copied over */
    ck_assert(seen[0][0] && seen[0][2] && seen[0][3]);
    ck_assert(seen[1][1] && seen[1][2] && seen[1][3]);
    ck_assert_msg(a_via1_after_b, "gpu1's link never took a's relays after b was done with it");
    job_free(a);
    job_free(b);

    /* A D2H copy out of gpu1 leaves gpu1's H2D side to relays. */
    a = job_simple(&conn_x, 0, 0, 16 * (64u << 10), 0);
    b = job_new(&conn_y, 1, MMA_DIR_D2H, 0, (uint64_t[]){8 * (64u << 10)}, 1, 2u << 20, 2u << 20);
    mmad_sched_add(&s, a);
    mmad_sched_add(&s, b);
    mmad_sched_fill(&s);
    ck_assert_int_ge(find_inflight(a, 1), 0);
    drain();
    job_free(a);
    job_free(b);

    /* --yield-to-direct=0: every link relays for everyone. */
    s.yield_to_direct = 0;
    a = job_simple(&conn_x, 0, 0, 16 * (64u << 10), 0);
    b = job_simple(&conn_y, 1, 0, 8 * (64u << 10), 2u << 20);
    mmad_sched_add(&s, a);
    mmad_sched_add(&s, b);
    mmad_sched_fill(&s);
    ck_assert_int_ge(find_inflight(a, 1), 0);
    ck_assert_int_ge(find_inflight(b, 0), 0);
    drain();
    job_free(a);
    job_free(b);
}
END_TEST

START_TEST(round_robin_three_jobs_many_paths)
{
    /* With room for several chunks per fill, each job gets one chunk per
     * turn: three equal jobs to one GPU end up with equal shares of every
     * window of 3 consecutive issues. */
    mmad_job_t *j[3];
    for (int k = 0; k < 3; k++) {
        j[k] = job_simple(k == 1 ? &conn_y : &conn_x, 0, 0, 12 * (64u << 10), (uint64_t)k << 20);
        mmad_sched_add(&s, j[k]);
    }
    mmad_sched_fill(&s);
    int finished = 0;
    while (finished < 3) {
        mmad_job_t *f = complete(0, MMA_OK);
        if (f)
            finished++;
        mmad_sched_fill(&s);
    }
    ck_assert_int_eq(fb.nlog, 36);
    for (int w = 0; w + 3 <= 36; w += 3) {
        int seen[3] = {0, 0, 0};
        for (int i = w; i < w + 3; i++)
            for (int k = 0; k < 3; k++)
                seen[k] += fb.log[i].job == j[k];
        ck_assert_msg(seen[0] == 1 && seen[1] == 1 && seen[2] == 1, "issues %d..%d: %d/%d/%d", w, w + 2, seen[0],
                      seen[1], seen[2]);
    }
    for (int k = 0; k < 3; k++)
        job_free(j[k]);
}
END_TEST

START_TEST(latency_job_overtakes_bulk)
{
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 1u << 20, 0);
    mmad_job_t *b = job_simple(&conn_y, 0, 0, 1u << 20, 1u << 20);
    mmad_sched_add(&s, a);
    mmad_sched_add(&s, b);
    ck_assert_int_eq(mmad_sched_fill(&s), 8); /* every path of GPU 0 full */
    mmad_job_t *l = job_simple(&conn_x, 0, 1, 3 * (16u << 10), 2u << 20);
    mmad_sched_add(&s, l);
    ck_assert_ptr_eq(s.jobs, l); /* queued ahead of the bulk jobs */
    ck_assert_int_eq(mmad_sched_fill(&s), 0);
    /* As paths free up, the latency job takes them until it has no bytes
     * left, whichever path it is. */
    /* Breadth first, taking turns: a has the direct path and relay 2, b
     * relays 1 and 3, each two chunks deep. */
    int via_freed[3] = {1, 0, 2};
    for (int k = 0; k < 3; k++) {
        int i = find_inflight(k == 0 ? b : a, via_freed[k]);
        ck_assert_int_ge(i, 0);
        complete(i, MMA_OK);
        int before = fb.nlog;
        ck_assert_int_eq(mmad_sched_fill(&s), 1);
        ck_assert_ptr_eq(fb.log[before].job, l);
        ck_assert_int_eq(fb.log[before].via, via_freed[k]);
    }
    /* Then bulk resumes. */
    complete(find_inflight(a, -1), MMA_OK);
    int before = fb.nlog;
    ck_assert_int_eq(mmad_sched_fill(&s), 1);
    ck_assert_ptr_ne(fb.log[before].job, l);
    /* A second latency job queues after the first one, before bulk. */
    mmad_job_t *l2 = job_simple(&conn_y, 0, 1, 16u << 10, 3u << 20);
    mmad_sched_add(&s, l2);
    ck_assert_ptr_eq(s.jobs, l);
    ck_assert_ptr_eq(s.jobs->next, l2);
    ck_assert_int_eq(s.jobs->next->next->priority, 0);
    int finished = 0;
    while (fb.ninflight > 0) {
        mmad_job_t *f = complete(0, MMA_OK);
        if (f) {
            finished++;
            job_free(f);
        }
        mmad_sched_fill(&s);
    }
    ck_assert_int_eq(finished, 4);
}
END_TEST

/* ---- path limits ---- */

START_TEST(max_paths_one_uses_direct_only)
{
    mmad_job_t *a = job_simple(&conn_x, 2, 0, 1u << 20, 0);
    a->max_paths = 1;
    mmad_sched_add(&s, a);
    /* One path: its chunks are the job over depth pieces, capped. */
    ck_assert_uint_eq(a->chunk_len, 64u << 10);
    mmad_job_t *f = NULL;
    mmad_sched_fill(&s);
    while (!f) {
        check_limits();
        ck_assert_int_le(fb.ninflight, 2);
        f = complete(0, MMA_OK);
        mmad_sched_fill(&s);
    }
    for (int i = 0; i < fb.nlog; i++)
        ck_assert_int_eq(fb.log[i].via, 2);
    job_free(a);
    /* max_paths 2: the direct path and the first relay, nothing else. */
    int n0 = fb.nlog;
    mmad_job_t *b = job_simple(&conn_x, 2, 0, 1u << 20, 0);
    b->max_paths = 2;
    mmad_sched_add(&s, b);
    ck_assert_int_eq(mmad_sched_fill(&s), 4);
    for (int i = n0; i < fb.nlog; i++)
        ck_assert(fb.log[i].via == 2 || fb.log[i].via == 3);
    f = drain();
    ck_assert_ptr_eq(f, b);
    job_free(b);
}
END_TEST

START_TEST(daemon_max_paths_one)
{
    mmad_sched_destroy(&s);
    start(64 << 10, 16 << 10, 2, 4, 1); /* mmad --max-paths=1 */
    mmad_job_t *a = job_simple(&conn_x, 1, 0, 1u << 20, 0);
    mmad_sched_add(&s, a);
    ck_assert_int_eq(mmad_sched_fill(&s), 2);
    mmad_job_t *f = NULL;
    while (!f) {
        f = complete(0, MMA_OK);
        mmad_sched_fill(&s);
    }
    for (int i = 0; i < fb.nlog; i++)
        ck_assert_int_eq(fb.log[i].via, 1);
    ck_assert_uint_eq(s.paths[1][1][MMA_DIR_H2D].bytes, 1u << 20);
    job_free(a);
}
END_TEST

/* ---- failures ---- */

START_TEST(failed_relay_is_set_aside_and_retried)
{
    const uint64_t lens[] = {1000003, 77777};
    mmad_job_t *a = job_new(&conn_x, 0, MMA_DIR_H2D, 0, lens, 2, 100, 200);
    mmad_job_t *jobs[1] = {a};
    /* Every chunk through GPU 2 fails; the others land. */
    run_and_check_coverage(jobs, 1, 777, 2);
    const mmad_path_stat_t *p = &s.paths[0][2][MMA_DIR_H2D];
    ck_assert_int_eq(p->enabled, 0);
    ck_assert_str_eq(p->note, "copy failed");
    ck_assert_uint_eq(p->bytes, 0);
    /* Only the first wave went there: after the failure nothing more. */
    int via2 = 0;
    for (int i = 0; i < fb.nlog; i++)
        if (fb.log[i].via == 2)
            via2++;
    ck_assert_int_ge(via2, 1);
    ck_assert_int_le(via2, s.path_depth);
    /* The other direction and the other relays are untouched. */
    ck_assert_int_eq(s.paths[0][2][MMA_DIR_D2H].enabled, 1);
    ck_assert_int_eq(s.paths[0][1][MMA_DIR_H2D].enabled, 1);
    ck_assert_int_eq(s.paths[0][3][MMA_DIR_H2D].enabled, 1);
    ck_assert_uint_eq(s.bytes_done, a->total);
    job_free(a);
}
END_TEST

START_TEST(submit_refused_on_relay)
{
    fb.fail_submit_via = 1;
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 1u << 20, 0);
    mmad_sched_add(&s, a);
    /* The refused submit ends that fill pass; the engine fills again at
     * once (it made progress), and the job spreads over the paths left. */
    int n = mmad_sched_fill(&s);
    n += mmad_sched_fill(&s);
    ck_assert_int_eq(n, 6); /* direct 2, via 2 and 3 */
    ck_assert_int_eq(s.paths[0][1][MMA_DIR_H2D].enabled, 0);
    ck_assert_str_eq(s.paths[0][1][MMA_DIR_H2D].note, "submit failed");
    mmad_job_t *f = NULL;
    while (fb.ninflight > 0) {
        f = complete(0, MMA_OK);
        mmad_sched_fill(&s);
        check_limits();
    }
    ck_assert_ptr_eq(f, a);
    ck_assert_uint_eq(a->landed, a->total);
    for (int i = 0; i < fb.nlog; i++)
        ck_assert_int_ne(fb.log[i].via, 1);
    job_free(a);
}
END_TEST

START_TEST(failed_direct_chunk_fails_the_job)
{
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 1u << 20, 0);
    mmad_sched_add(&s, a);
    ck_assert_int_eq(mmad_sched_fill(&s), 8);
    ck_assert_ptr_null(complete(find_inflight(a, 0), MMA_ERR_BACKEND));
    ck_assert_int_eq(a->status, MMA_ERR_BACKEND);
    ck_assert_int_eq(s.paths[0][0][MMA_DIR_H2D].enabled, 1);
    /* Nothing more is carved from a failed job; it finishes when its last
     * chunk in flight comes back. */
    ck_assert_int_eq(mmad_sched_fill(&s), 0);
    mmad_job_t *f = NULL;
    while (fb.ninflight > 0) {
        ck_assert_ptr_null(f);
        f = complete(0, MMA_OK);
        ck_assert_int_eq(mmad_sched_fill(&s), 0);
    }
    ck_assert_ptr_eq(f, a);
    ck_assert_int_eq(a->status, MMA_ERR_BACKEND);
    ck_assert_uint_eq(s.bytes_done, 0);
    ck_assert_uint_eq(s.jobs_done, 1);
    job_free(a);
}
END_TEST

/* The backend refuses a job's first chunk, on the direct path: the job
 * fails, and with no chunk in flight no chunk's end would ever finish it
 * (its client waited forever, and the engine polled for it). It comes back
 * from mmad_sched_take_failed, unlinked, with the backend's error; other
 * jobs go on. */
START_TEST(submit_refused_on_direct_with_nothing_in_flight)
{
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 1u << 20, 0);
    a->max_paths = 1; /* the direct path only: its first chunk is refused */
    ck_assert_ptr_null(mmad_sched_take_failed(&s)); /* nothing failed yet */
    fb.fail_submit_direct = 1;
    mmad_sched_add(&s, a);
    ck_assert_int_eq(mmad_sched_fill(&s), 0);
    ck_assert_int_eq(a->status, MMA_ERR_BACKEND);
    ck_assert_int_eq(a->inflight, 0);
    mmad_job_t *got = mmad_sched_take_failed(&s);
    ck_assert_ptr_eq(got, a);
    ck_assert_ptr_null(got->next);
    ck_assert_ptr_null(s.jobs);
    ck_assert_uint_eq(s.jobs_done, 1);
    ck_assert_uint_eq(s.bytes_done, 0);
    ck_assert_ptr_null(mmad_sched_take_failed(&s)); /* handed over once */
    job_free(a);

    /* A refusal while the job has chunks in flight leaves it to them: the
     * last one to land finishes it, as a failed chunk would. */
    fb.fail_submit_direct = 0;
    mmad_job_t *b = job_simple(&conn_x, 0, 0, 1u << 20, 0);
    b->max_paths = 1;
    mmad_job_t *c = job_simple(&conn_y, 1, 0, 256u << 10, 2u << 20);
    mmad_sched_add(&s, b);
    mmad_sched_add(&s, c);
    ck_assert_int_gt(mmad_sched_fill(&s), 0);
    ck_assert_int_eq(b->inflight, 2);
    fb.fail_submit_direct = 1;
    ck_assert_ptr_null(complete(find_inflight(b, 0), MMA_OK));
    mmad_sched_fill(&s); /* b's next chunk is refused */
    ck_assert_int_eq(b->status, MMA_ERR_BACKEND);
    ck_assert_ptr_null(mmad_sched_take_failed(&s)); /* b still has a chunk in flight */
    fb.fail_submit_direct = 0;
    mmad_job_t *f = NULL;
    int finished_b = 0, finished_c = 0;
    while (fb.ninflight > 0) {
        f = complete(0, MMA_OK);
        finished_b += f == b;
        finished_c += f == c;
        mmad_sched_fill(&s);
        ck_assert_ptr_null(mmad_sched_take_failed(&s));
    }
    ck_assert_int_eq(finished_b, 1);
    ck_assert_int_eq(finished_c, 1);
    ck_assert_int_eq(b->status, MMA_ERR_BACKEND);
    ck_assert_int_eq(c->status, MMA_OK);
    ck_assert_uint_eq(c->landed, c->total);
    job_free(b);
    job_free(c);
}
END_TEST

START_TEST(cancel_conn)
{
    mmad_job_t *x1 = job_simple(&conn_x, 0, 0, 1u << 20, 0);
    mmad_job_t *y1 = job_simple(&conn_y, 0, 0, 1u << 20, 1u << 20);
    mmad_job_t *x2 = job_simple(&conn_x, 1, 0, 64u << 10, 2u << 20);
    x2->runnable = 0; /* its slot has not shown `reached` yet */
    mmad_sched_add(&s, x1);
    mmad_sched_add(&s, y1);
    mmad_sched_add(&s, x2);
    ck_assert_int_eq(mmad_sched_fill(&s), 8);
    ck_assert_int_gt(x1->inflight, 0);
    ck_assert_int_eq(x2->inflight, 0);
    /* Client x goes away: x2 (nothing in flight) comes back at once; x1
     * waits for its chunks. */
    mmad_job_t *got = mmad_sched_cancel_conn(&s, &conn_x);
    ck_assert_ptr_eq(got, x2);
    ck_assert_ptr_null(got->next);
    ck_assert_int_eq(x2->status, MMA_ERR_CANCELLED);
    ck_assert_int_eq(x1->status, MMA_ERR_CANCELLED);
    ck_assert_int_eq(y1->status, MMA_OK);
    job_free(x2);
    /* x1 gets no more chunks; y1 takes the room it leaves. */
    int x1_flight = x1->inflight;
    mmad_job_t *f = NULL;
    int finished_x1 = 0, finished_y1 = 0;
    while (fb.ninflight > 0) {
        f = complete(0, MMA_OK);
        if (f == x1) {
            finished_x1++;
            ck_assert_int_eq(x1->status, MMA_ERR_CANCELLED);
        } else if (f == y1) {
            finished_y1++;
            ck_assert_int_eq(y1->status, MMA_OK);
            ck_assert_uint_eq(y1->landed, y1->total);
        }
        mmad_sched_fill(&s);
        ck_assert_int_le(x1->inflight, x1_flight);
        x1_flight = x1->inflight;
    }
    ck_assert_int_eq(finished_x1, 1);
    ck_assert_int_eq(finished_y1, 1);
    ck_assert_uint_lt(x1->landed, x1->total);
    ck_assert_uint_eq(s.bytes_done, y1->total);
    ck_assert_ptr_null(mmad_sched_cancel_conn(&s, &conn_x)); /* nothing left */
    job_free(x1);
    job_free(y1);
}
END_TEST

START_TEST(not_runnable_waits)
{
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 64u << 10, 0);
    a->runnable = 0;
    mmad_sched_add(&s, a);
    ck_assert_int_eq(mmad_sched_fill(&s), 0);
    a->runnable = 1;
    ck_assert_int_eq(mmad_sched_fill(&s), 4); /* 64K over 8 pieces -> 16K chunks */
    mmad_job_t *f = NULL;
    while (fb.ninflight > 0)
        f = complete(0, MMA_OK);
    ck_assert_ptr_eq(f, a);
    job_free(a);
}
END_TEST

/* ---- planned splits ---- */

/* The defaults: 5 us to issue a chunk, 15 us more for a relay, 45 GB/s. */
#define PLAN_DEFAULTS 5000.0, 15000.0, 45.0, 512u << 10, 8u << 20

START_TEST(foreign_traffic_from_counter)
{
    /* 4x H200: mmad alone filling gpu0's link (55.3 GB/s of payload) read
     * 59.6 GB/s on NVML's counter: that is no other traffic, and must stay
     * under half of --busy-gbps (5 GB/s), or relays stopped by a neighbour
     * would never resume while mmad runs. */
    ck_assert_double_lt(mmad_foreign_mbps(59600, 55300), 1000);
    ck_assert_double_lt(mmad_foreign_mbps(60000, 55300), 1000);
    /* A neighbour's 15 GB/s next to mmad's 40 is seen. */
    ck_assert_double_gt(mmad_foreign_mbps((15000 + 40000) * 1.08, 40000), 10000);
    /* A neighbour alone is all other traffic; never below 0. */
    ck_assert_double_eq_tol(mmad_foreign_mbps(59600, 0), 59600, 1e-9);
    ck_assert_double_eq_tol(mmad_foreign_mbps(1000, 5000), 0, 1e-9);
}
END_TEST

/* Where no GPU may relay for another (one GPU; no peer access; every pair
 * sharing one uplink) mmad can add only its own hops, so libmma is told to
 * run every copy natively, unless --bypass-threshold says otherwise. One
 * pair that may relay, in either direction, keeps the measured default. */
START_TEST(bypass_all_without_relays)
{
    static mmad_backend_t be; /* large: not on the stack */
    memset(&be, 0, sizeof be);
    be.gpu_count = 1;
    ck_assert_int_eq(mmad_bypass_for(&be, -1, 2 << 20, 0), MMAD_BYPASS_ALL);
    ck_assert_int_eq(mmad_bypass_for(&be, 0, 2 << 20, 0), 0);
    ck_assert_int_eq(mmad_bypass_for(&be, 4096, 2 << 20, 0), 4096);
    be.gpu_count = 4;
    ck_assert_int_eq(mmad_bypass_for(&be, -1, 2 << 20, 0), MMAD_BYPASS_ALL);
    be.relay_ok[3][2] = 1;
    ck_assert_int_eq(mmad_bypass_for(&be, -1, 2 << 20, 0), 2 << 20);
    ck_assert_int_eq(mmad_bypass_for(&be, 1 << 20, 2 << 20, 0), 1 << 20);
    be.relay_ok[3][2] = 0;
    be.relay_ok[1][1] = 1; /* a GPU is no relay for itself */
    ck_assert_int_eq(mmad_bypass_for(&be, -1, 6 << 20, 0), MMAD_BYPASS_ALL);
    /* --max-paths=1: no copy relays, though GPUs could */
    be.relay_ok[3][2] = 1;
    ck_assert_int_eq(mmad_bypass_for(&be, -1, 2 << 20, 1), MMAD_BYPASS_ALL);
    ck_assert_int_eq(mmad_bypass_for(&be, 4096, 2 << 20, 1), 4096);
    ck_assert_int_eq(mmad_bypass_for(&be, 0, 2 << 20, 1), 0);
    ck_assert_int_eq(mmad_bypass_for(&be, -1, 2 << 20, 2), 2 << 20);
    ck_assert_int_eq(mmad_bypass_for(&be, -1, 2 << 20, 0), 2 << 20);
}
END_TEST

START_TEST(plan_split_function)
{
    /* Every size from 4 KiB to 32 MiB (and odd ones), 1 to 4 paths: the
     * lens sum to the total exactly, the direct path has the most, relays
     * are whole pages of at least min_chunk, later relays get no more than
     * earlier ones, and no share needs a second chunk while one per path
     * can carry the copy. */
    for (uint64_t total = 4096; total <= (32u << 20); total = total * 3 / 2 + 4093) {
        for (int np = 1; np <= 4; np++) {
            uint64_t lens[MMAD_MAX_GPUS];
            int n = mmad_sched_plan_split(total, np, PLAN_DEFAULTS, lens);
            ck_assert_int_ge(n, 1);
            ck_assert_int_le(n, np);
            uint64_t sum = 0;
            for (int p = 0; p < MMAD_MAX_GPUS; p++) {
                sum += lens[p];
                if (p >= n) {
                    ck_assert_uint_eq(lens[p], 0);
                    continue;
                }
                ck_assert_uint_ge(lens[0], lens[p]);
                if (p > 0) {
                    ck_assert_uint_ge(lens[p], 512u << 10);
                    ck_assert_uint_le(lens[p], 8u << 20);
                    ck_assert_uint_le(lens[p], lens[p - 1]);
                    if (lens[0] < (8u << 20))
                        ck_assert_uint_eq(lens[p] % 4096, 0);
                }
            }
            ck_assert_msg(sum == total, "total %llu over %d paths: lens sum to %llu", (unsigned long long)total, np,
                          (unsigned long long)sum);
            if (total <= (uint64_t)np * (8u << 20))
                ck_assert_uint_le(lens[0], 8u << 20);
        }
    }
}
END_TEST

START_TEST(plan_split_small_copies_go_direct)
{
    uint64_t lens[MMAD_MAX_GPUS];
    /* A relay starts 20 us after the direct path (issue + relay latency):
     * ~900 KB at 45 GB/s. Below ~2 MiB no relay could finish sooner. */
    ck_assert_int_eq(mmad_sched_plan_split(64u << 10, 4, PLAN_DEFAULTS, lens), 1);
    ck_assert_uint_eq(lens[0], 64u << 10);
    ck_assert_uint_eq(lens[1], 0);
    ck_assert_int_eq(mmad_sched_plan_split(1u << 20, 4, PLAN_DEFAULTS, lens), 1);
    ck_assert_uint_eq(lens[0], 1u << 20);
    ck_assert_int_eq(mmad_sched_plan_split(4096, 4, PLAN_DEFAULTS, lens), 1);
    ck_assert_int_eq(mmad_sched_plan_split(1, 4, PLAN_DEFAULTS, lens), 1);
    ck_assert_uint_eq(lens[0], 1);
    /* Each relay joins once its share reaches min_chunk: 2 MiB two paths,
     * 3 MiB three, 4 MiB all four. */
    ck_assert_int_eq(mmad_sched_plan_split(2u << 20, 4, PLAN_DEFAULTS, lens), 2);
    ck_assert_int_eq(mmad_sched_plan_split(3u << 20, 4, PLAN_DEFAULTS, lens), 3);
    ck_assert_int_eq(mmad_sched_plan_split(4u << 20, 4, PLAN_DEFAULTS, lens), 4);
    /* Without costs every path gets a quarter (to the page). */
    ck_assert_int_eq(mmad_sched_plan_split(8u << 20, 4, 0, 0, 45.0, 512u << 10, 8u << 20, lens), 4);
    for (int p = 0; p < 4; p++)
        ck_assert_uint_eq(lens[p], 2u << 20);
    /* A rate of 0 (nothing known, no floor) also means no costs. */
    ck_assert_int_eq(mmad_sched_plan_split(8u << 20, 4, 5000, 15000, 0, 512u << 10, 8u << 20, lens), 4);
}
END_TEST

START_TEST(plan_split_finishes_together)
{
    /* 6..27 MiB over 4 paths (no share at the 8 MiB cap): each path's end
     * (start + latency + len / rate) is the same to within a few pages' time
     * at 45 GB/s (the relays are rounded down to pages). */
    uint64_t lens[MMAD_MAX_GPUS];
    const double issue = 5000, relay = 15000, rate = 45.0;
    for (uint64_t total = 6u << 20; total <= (27u << 20); total += 3u << 20) {
        int n = mmad_sched_plan_split(total, 4, issue, relay, rate, 512u << 10, 8u << 20, lens);
        ck_assert_int_eq(n, 4);
        double end0 = (double)lens[0] / rate;
        for (int p = 1; p < n; p++) {
            double end = p * issue + relay + (double)lens[p] / rate;
            ck_assert_msg(end - end0 < 4096 / rate + 1 && end0 - end < 4 * 4096 / rate + 1,
                          "total %llu: path %d ends at %.0f ns, the direct one at %.0f", (unsigned long long)total,
                          p, end, end0);
        }
        ck_assert_uint_gt(lens[0], lens[1]);
        ck_assert_uint_gt(lens[1], lens[2]);
        ck_assert_uint_gt(lens[2], lens[3]);
    }
}
END_TEST

START_TEST(plan_split_caps_at_chunk_size)
{
    /* 4 x 1 MiB over 4 paths of 1 MiB chunks, with large lags: all at cap. */
    uint64_t lens[MMAD_MAX_GPUS];
    ck_assert_int_eq(mmad_sched_plan_split(4u << 20, 4, 5000, 15000, 45.0, 64u << 10, 1u << 20, lens), 4);
    for (int p = 0; p < 4; p++)
        ck_assert_uint_eq(lens[p], 1u << 20);
    /* 2 MiB: the direct share is held at cap and the relays split the rest
     * (what rounding the relays left goes to them, not to a second direct
     * chunk). */
    ck_assert_int_eq(mmad_sched_plan_split(2u << 20, 4, 5000, 15000, 45.0, 64u << 10, 1u << 20, lens), 4);
    ck_assert_uint_eq(lens[0], 1u << 20);
    ck_assert_uint_eq(lens[1] + lens[2] + lens[3], 1u << 20);
    ck_assert_uint_gt(lens[1], lens[2]);
    ck_assert_uint_gt(lens[2], lens[3]);
    /* More than one chunk per path can carry: the direct path takes the
     * rest (several chunks). */
    ck_assert_int_eq(mmad_sched_plan_split(5u << 20, 4, 5000, 15000, 45.0, 64u << 10, 1u << 20, lens), 4);
    ck_assert_uint_eq(lens[0], 2u << 20);
    for (int p = 1; p < 4; p++)
        ck_assert_uint_eq(lens[p], 1u << 20);
    /* The direct path's own cap: 64 MiB over 4 paths of at most 2 x 8 MiB,
     * relays starting later (4x H200 figures). Capped alike, every path
     * takes 16 MiB and the direct one ends first; with the direct path
     * uncapped it takes more, the relays less, and all end together. */
    const uint64_t total = 64u << 20, cap = 16u << 20;
    double t[4], r[4];
    for (int p = 0; p < 4; p++) {
        t[p] = p * 5000.0 + (p ? 15000.0 : 0);
        r[p] = 41.0;
    }
    ck_assert_int_eq(mmad_sched_plan_split_tr(total, 4, t, r, 512u << 10, cap, cap, lens), 4);
    for (int p = 0; p < 4; p++)
        ck_assert_uint_eq(lens[p], cap);
    ck_assert_int_eq(mmad_sched_plan_split_tr(total, 4, t, r, 512u << 10, cap, total, lens), 4);
    ck_assert_uint_gt(lens[0], cap);
    uint64_t sum = lens[0];
    for (int p = 1; p < 4; p++) {
        ck_assert_uint_lt(lens[p], cap);
        ck_assert_uint_eq(lens[p] % 4096, 0);
        sum += lens[p];
        double end0 = t[0] + (double)lens[0] / r[0], end = t[p] + (double)lens[p] / r[p];
        ck_assert(fabs(end - end0) < 4096 * 4 / r[p]);
    }
    ck_assert_uint_eq(sum, total);
}
END_TEST

START_TEST(planned_job_one_chunk_per_path)
{
    mmad_sched_destroy(&s);
    start(8u << 20, 512u << 10, 2, 4, 0);
    s.plan_split = 1;
    /* The fake box is not simulated: the CUDA costs and --link-gbps. */
    ck_assert_double_eq_tol(s.issue_cost_ns, 5000, 1e-9);
    ck_assert_double_eq_tol(s.relay_overhead_ns, 15000, 1e-9);
    ck_assert_double_eq_tol(mmad_sched_ref_rate(&s, MMA_DIR_H2D, 1), 45.0, 1e-9);
    uint64_t want[MMAD_MAX_GPUS];
    ck_assert_int_eq(mmad_sched_plan_split(4u << 20, 4, 5000, 15000, 45.0, 512u << 10, 8u << 20, want), 4);
    mmad_job_t *a = job_simple(&conn_x, 1, 0, 4u << 20, 0);
    mmad_sched_add(&s, a);
    ck_assert_uint_eq(a->chunk_len, want[0]);
    /* One chunk per path, in issue order: direct, then the ring. */
    ck_assert_int_eq(mmad_sched_fill(&s), 4);
    const int order[4] = {1, 2, 3, 0};
    for (int p = 0; p < 4; p++) {
        ck_assert_int_eq(fb.log[p].via, order[p]);
        ck_assert_uint_eq(fb.log[p].len, want[p]);
    }
    check_limits();
    ck_assert_int_eq(mmad_sched_fill(&s), 0);
    mmad_job_t *f = NULL;
    while (fb.ninflight > 0)
        f = complete(0, MMA_OK);
    ck_assert_ptr_eq(f, a);
    ck_assert_uint_eq(a->landed, a->total);
    ck_assert_ptr_null(s.plans); /* the plan went with the job */
    job_free(a);
    /* 64 KiB: the direct path only, one chunk. */
    mmad_job_t *b = job_simple(&conn_x, 1, 0, 64u << 10, 0);
    mmad_sched_add(&s, b);
    ck_assert_int_eq(mmad_sched_fill(&s), 1);
    ck_assert_int_eq(fb.log[4].via, 1);
    ck_assert_uint_eq(fb.log[4].len, 64u << 10);
    ck_assert_ptr_eq(complete(0, MMA_OK), b);
    job_free(b);
    /* Larger than one chunk per path: equal chunks, as without a plan. */
    mmad_job_t *c = job_simple(&conn_x, 1, 0, 4u << 20, 0);
    mmad_sched_destroy(&s);
    start(512u << 10, 64u << 10, 2, 4, 0);
    s.plan_split = 1;
    mmad_sched_add(&s, c);
    ck_assert_ptr_null(s.plans);
    ck_assert_uint_eq(c->chunk_len, 512u << 10);
    ck_assert_int_eq(mmad_sched_fill(&s), 8);
    f = drain();
    ck_assert_ptr_eq(f, c);
    job_free(c);
}
END_TEST

START_TEST(plan_split_weighted_paths_finish_together)
{
    /* Paths at 1, 0.8, 0.6 and 0.5 of the rate: each one's end (start +
     * latency + len / its rate) is the same to within a few pages' time,
     * and slower paths get less. */
    uint64_t lens[MMAD_MAX_GPUS];
    const double w[4] = {1.0, 0.8, 0.6, 0.5}, issue = 5000, relay = 15000, rate = 45.0;
    for (uint64_t total = 8u << 20; total <= (20u << 20); total += 4u << 20) {
        int n = mmad_sched_plan_split_w(total, 4, issue, relay, rate, w, 512u << 10, 8u << 20, lens);
        ck_assert_int_eq(n, 4);
        ck_assert_uint_eq(lens[0] + lens[1] + lens[2] + lens[3], total);
        double end0 = (double)lens[0] / rate;
        for (int p = 1; p < n; p++) {
            double end = p * issue + relay + (double)lens[p] / (rate * w[p]);
            ck_assert_msg(fabs(end - end0) < 4 * 4096 / (rate * w[p]) + 1, "total %llu: path %d ends at %.0f ns, the direct one at %.0f",
                          (unsigned long long)total, p, end, end0);
            ck_assert_uint_lt(lens[p], lens[p - 1]);
        }
    }
    /* A middle relay too slow for min_chunk is left out, not the last. */
    const double w2[4] = {1.0, 1.0, 0.02, 1.0};
    int n = mmad_sched_plan_split_w(4u << 20, 4, 0, 0, 45.0, w2, 512u << 10, 8u << 20, lens);
    ck_assert_int_eq(n, 4);
    ck_assert_uint_eq(lens[2], 0);
    ck_assert_uint_eq(lens[0] + lens[1] + lens[3], 4u << 20);
    ck_assert_uint_gt(lens[3], 512u << 10);
}
END_TEST

START_TEST(plan_split_mid_size_equal_pieces)
{
    /* --plan-split=2: a copy of up to path_depth chunks per path is planned
     * too; each path's share is cut into equal pieces of at most a chunk. */
    mmad_sched_destroy(&s);
    start(512u << 10, 64u << 10, 2, 4, 0);
    s.plan_split = 2;
    uint64_t want[MMAD_MAX_GPUS];
    const uint64_t total = 3u << 20; /* 4 paths x 2 x 512K = 4M >= 3M > 2M */
    /* The model: relays start later; relays' shares are at most 2 chunks,
     * the direct path's is not capped. */
    double t[4], r[4], rate = mmad_sched_ref_rate(&s, MMA_DIR_H2D, s.now());
    for (int p = 0; p < 4; p++) {
        t[p] = p * s.issue_cost_ns + (p ? s.relay_overhead_ns : 0);
        r[p] = rate;
    }
    ck_assert_int_eq(mmad_sched_plan_split_tr(total, 4, t, r, 64u << 10, 1u << 20, total, want), 4);
    /* Here the direct path takes more than 2 chunks' worth. */
    ck_assert_uint_gt(want[0], 1u << 20);
    for (int p = 1; p < 4; p++)
        ck_assert_uint_le(want[p], 1u << 20);
    mmad_job_t *a = job_simple(&conn_x, 1, 0, total, 0);
    mmad_sched_add(&s, a);
    ck_assert_ptr_nonnull(s.plans);
    mmad_sched_fill(&s);
    drain();
    ck_assert_uint_eq(a->landed, total);
    const int order[4] = {1, 2, 3, 0};
    for (int p = 0; p < 4; p++) {
        uint64_t sum = 0, first = 0;
        int pieces = 0;
        for (int i = 0; i < fb.nlog; i++)
            if (fb.log[i].via == order[p]) {
                if (!pieces)
                    first = fb.log[i].len;
                sum += fb.log[i].len;
                pieces++;
                ck_assert_uint_le(fb.log[i].len, 512u << 10);
                /* equal pieces: the last may be short by its rounding */
                ck_assert_uint_le(fb.log[i].len, first);
                ck_assert_uint_ge(fb.log[i].len + 4096 * (uint64_t)pieces, first);
            }
        ck_assert_uint_eq(sum, want[p]);
        ck_assert_int_eq(pieces, (int)((want[p] + (512u << 10) - 1) / (512u << 10)));
        ck_assert_uint_le(sum, p ? 1u << 20 : total);
    }
    ck_assert_uint_gt(want[0], want[3]);
    job_free(a);
}
END_TEST

/* A fresh scheduler over the fake box that plans copies of up to two 1 MiB
 * chunks per path and gives relays a 128 KiB edge piece. */
static void start_planned(void)
{
    mmad_sched_destroy(&s);
    start(1u << 20, 64u << 10, 2, 4, 0);
    s.plan_split = 2;
    s.relay_edge = 128u << 10;
}

/* One 4 MiB copy into GPU 1 in direction dir, run until it has landed
 * (chunks complete oldest first); fb.log holds its chunks. */
static mmad_job_t *run_planned_copy(int dir)
{
    const uint64_t total = 4u << 20;
    mmad_job_t *a = job_new(&conn_x, 1, dir, 0, &total, 1, 0, 0);
    mmad_sched_add(&s, a);
    mmad_sched_fill(&s);
    drain();
    ck_assert_uint_eq(a->landed, total);
    return a;
}

START_TEST(relay_edge_piece_last_h2d_first_d2h)
{
    /* --relay-edge: a planned relay share of at least 3 edges is cut into
     * equal pieces plus one edge, issued last for H2D (its hop ends the copy)
     * and first for D2H (its hop starts it); the direct path has none. */
    for (int dir = 0; dir < 2; dir++) {
        start_planned();
        mmad_job_t *a = run_planned_copy(dir);
        for (int v = 0; v < NGPU; v++) {
            uint64_t lens[8];
            int k = 0;
            for (int i = 0; i < fb.nlog; i++)
                if (fb.log[i].via == v && k < 8)
                    lens[k++] = fb.log[i].len;
            if (v != 1)
                ck_assert_msg(k >= 2, "dir %d via %d: %d chunks, first %llu", dir, v, k, (unsigned long long)(k ? lens[0] : 0));
            uint64_t edge = dir == MMA_DIR_H2D ? lens[k - 1] : lens[0];
            if (v == 1)
                ck_assert_uint_ne(edge, 128u << 10);
            else
                ck_assert_msg(edge == 128u << 10, "dir %d via %d: edge piece %llu", dir, v, (unsigned long long)edge);
        }
        job_free(a);
    }
}
END_TEST

/* --relay-edge is rounded up to whole pages, which must not take it past
 * a chunk (a staging buffer): with --chunk-size=6000 (refused by the option
 * parser now, but not by the scheduler's own arithmetic) and
 * --relay-edge=5000 the edge became 8192 and a 160000-byte H2D copy wrote
 * an 8 KiB piece into a 6000-byte staging buffer (ASan, backend_sim.c).
 * With a page-multiple chunk an edge below it rounds to at most a chunk. */
START_TEST(relay_edge_never_exceeds_a_chunk)
{
    const struct {
        uint64_t chunk, edge, want;
    } cases[] = {{6000, 5000, 0}, {8192, 5000, 8192}, {12288, 5000, 8192}, {8192, 8192, 0}, {6000, 4096, 4096}};
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        for (int dir = 0; dir < 2; dir++) {
            mmad_sched_destroy(&s);
            start(cases[k].chunk, 4096, 8, 8, 0);
            mmad_sched_destroy(&s);
            mmad_config_t cfg;
            mmad_config_defaults(&cfg);
            cfg.chunk_size = cases[k].chunk;
            cfg.min_chunk = 4096;
            cfg.path_depth = 8;
            cfg.staging_slots = 8;
            cfg.relay_edge = cases[k].edge;
            cfg.yield_frac = 0;
            /* as the simulated box plans by default: no issue cost or relay
             * latency, so every path gets a share */
            cfg.issue_cost_us = 0;
            cfg.relay_overhead_us = 0;
            ck_assert_int_eq(mmad_sched_init(&s, &fb.base, &cfg), MMA_OK);
            ck_assert_msg(s.relay_edge == cases[k].want, "chunk %llu edge %llu: relay_edge %llu",
                          (unsigned long long)cases[k].chunk, (unsigned long long)cases[k].edge,
                          (unsigned long long)s.relay_edge);
            const uint64_t total = 160000;
            mmad_job_t *a = job_new(&conn_x, 0, dir, 0, &total, 1, 0, 0);
            mmad_sched_add(&s, a);
            mmad_sched_fill(&s);
            drain();
            ck_assert_uint_eq(a->landed, total);
            for (int i = 0; i < fb.nlog; i++)
                ck_assert_msg(fb.log[i].len <= cases[k].chunk, "chunk %llu edge %llu dir %d: a %llu-byte piece via %d",
                              (unsigned long long)cases[k].chunk, (unsigned long long)cases[k].edge, dir,
                              (unsigned long long)fb.log[i].len, fb.log[i].via);
            job_free(a);
        }
    }
}
END_TEST

START_TEST(edge_one_hop_first_and_last_pieces)
{
    /* --edge-one-hop: a staged copy's relays (the copy is not below the
     * backend's one-hop size) start and end with an edge piece flagged for
     * one hop, both ways; their middle pieces and the direct path's are not
     * flagged. Off, or where the backend has no one-hop relays, nothing is
     * flagged and H2D keeps its one (last) edge. */
    for (int mode = 0; mode < 3; mode++)
        for (int dir = 0; dir < 2; dir++) {
            start_planned();
            s.be->relay_kernel_below = mode == 2 ? 0 : 1u << 20; /* the 4 MiB copy stages */
            s.be->relay_kernel_resident = 1;
            s.edge_one_hop = mode >= 1;
            mmad_job_t *a = run_planned_copy(dir);
            for (int v = 0; v < NGPU; v++) {
                int idx[64], k = 0;
                for (int i = 0; i < fb.nlog; i++)
                    if (fb.log[i].via == v && k < 64)
                        idx[k++] = i;
                ck_assert_int_ge(k, 1);
                for (int q = 0; q < k; q++) {
                    int edge_wanted = mode == 1 && v != a->target && (q == 0 || q == k - 1);
                    ck_assert_msg(fb.log[idx[q]].one_hop_edge == edge_wanted,
                                  "mode %d dir %d via %d piece %d of %d (%llu bytes): flagged %d", mode, dir, v, q,
                                  k, (unsigned long long)fb.log[idx[q]].len, fb.log[idx[q]].one_hop_edge);
                    if (edge_wanted)
                        ck_assert_uint_eq(fb.log[idx[q]].len, 128u << 10);
                }
                if (mode == 1 && v != a->target)
                    ck_assert_msg(k >= 3, "mode 1 dir %d via %d: %d pieces", dir, v, k);
                if (mode != 1 && v != a->target && dir == MMA_DIR_H2D)
                    ck_assert_uint_eq(fb.log[idx[k - 1]].len, 128u << 10);
            }
            job_free(a);
        }
}
END_TEST

START_TEST(one_hop_relays_plan_no_edge_and_more_share)
{
    /* Relays of a copy below the backend's one-hop size are one kernel:
     * they get no edge piece (no NVLink hop to shorten), and with their
     * shorter fixed latency the plan gives them more than staged relays. */
    uint64_t relay_bytes[2] = {0, 0};
    for (int one_hop = 0; one_hop < 2; one_hop++) {
        start_planned(); /* start() clears the fake backend's one-hop fields */
        s.be->relay_kernel_below = one_hop ? 8u << 20 : 0;
        s.be->relay_kernel_overhead_us = 1.0;
        s.relay_overhead_ns = 200e3; /* staged: 200 us, so the two plans differ */
        s.issue_cost_ns = 0;
        mmad_job_t *a = run_planned_copy(MMA_DIR_H2D);
        for (int i = 0; i < fb.nlog; i++) {
            if (fb.log[i].via == a->target)
                continue;
            relay_bytes[one_hop] += fb.log[i].len;
            if (one_hop)
                ck_assert_msg(fb.log[i].len != 128u << 10, "one-hop relay via %d got an edge piece", fb.log[i].via);
        }
        job_free(a);
    }
    ck_assert_msg(relay_bytes[1] > relay_bytes[0], "one-hop relays carried %llu bytes, staged %llu",
                  (unsigned long long)relay_bytes[1], (unsigned long long)relay_bytes[0]);
}
END_TEST

START_TEST(plan_split_3_plans_one_hop_copies_of_many_chunks)
{
    /* A 4 MiB copy in 256 KiB chunks is 4 chunks a path, more than
     * path_depth (2): --plan-split=2 leaves it equal chunks, which share it
     * alike whatever the paths' learned weights. With 3, a copy whose
     * relays go in one hop (below the backend's one-hop size) is planned:
     * a path that ran slower in earlier copies of its size (weight 0.5)
     * gets less. A copy that stages keeps equal chunks (mode 2), unless
     * --plan-split=4 plans every copy (mode 3), staged relays' shares
     * taking their staging buffers in turn. */
    const uint64_t total = 4u << 20;
    for (int mode = 0; mode < 4; mode++) {
        mmad_sched_destroy(&s);
        start(256u << 10, 16u << 10, 2, 4, 0);
        s.plan_split = mode == 0 ? 2 : mode == 3 ? 4 : 3;
        s.plan_learn = 3;
        s.be->relay_kernel_below = mode >= 2 ? 0 : 8u << 20;
        s.be->relay_kernel_overhead_us = 1.0;
        s.issue_cost_ns = 0;
        int k = mmad_plan_class(total);
        s.plan_e[1][3][MMA_DIR_H2D][k] = 0.5;
        mmad_job_t *a = job_new(&conn_x, 1, MMA_DIR_H2D, 0, &total, 1, 0, 0);
        mmad_sched_add(&s, a);
        mmad_sched_fill(&s);
        drain();
        ck_assert_uint_eq(a->landed, total);
        uint64_t per[NGPU] = {0};
        for (int i = 0; i < fb.nlog; i++)
            per[fb.log[i].via] += fb.log[i].len;
        if (mode == 1 || mode == 3)
            ck_assert_msg(per[3] < per[2] * 3 / 4, "mode %d: via 3 (weight 0.5) carried %llu, via 2 %llu", mode,
                          (unsigned long long)per[3], (unsigned long long)per[2]);
        else
            ck_assert_msg(per[3] == per[2], "mode %d: equal chunks, yet via 3 carried %llu and via 2 %llu", mode,
                          (unsigned long long)per[3], (unsigned long long)per[2]);
        job_free(a);
    }
}
END_TEST

START_TEST(relay_overhead_option_covers_one_hop)
{
    /* --relay-overhead-us left at -1: one-hop plans use the backend's
     * latency; given, they use it too, so a large one leaves one-hop relays
     * less of the copy. */
    ck_assert(s.one_hop_overhead_ns < 0);
    mmad_config_t cfg;
    mmad_config_defaults(&cfg);
    cfg.relay_overhead_us = 7;
    mmad_sched_t t;
    ck_assert_int_eq(mmad_sched_init(&t, &fb.base, &cfg), MMA_OK);
    ck_assert_double_eq_tol(t.one_hop_overhead_ns, 7000, 1e-9);
    mmad_sched_destroy(&t);
    uint64_t relay_bytes[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        start_planned();
        s.be->relay_kernel_below = 8u << 20;
        s.be->relay_kernel_overhead_us = 1.0;
        s.one_hop_overhead_ns = k ? 200e3 : -1.0;
        s.issue_cost_ns = 0;
        mmad_job_t *a = run_planned_copy(MMA_DIR_H2D);
        for (int i = 0; i < fb.nlog; i++)
            if (fb.log[i].via != a->target)
                relay_bytes[k] += fb.log[i].len;
        job_free(a);
    }
    ck_assert_msg(relay_bytes[1] < relay_bytes[0], "one-hop relays carried %llu with a 200 us overhead, %llu without",
                  (unsigned long long)relay_bytes[1], (unsigned long long)relay_bytes[0]);
}
END_TEST

START_TEST(resident_relays_go_first_and_start_together)
{
    /* Case 0: one-hop relays launched per chunk: the direct chunk first,
     * and each later relay planned to start an issue cost later, so it
     * carries less. Cases 1 and 2: relays posted to resident kernels cost
     * no issue time, so they are planned to start together and carry
     * alike; with --relay-first (2) they are issued before the direct
     * chunk, which is then planned to start an issue cost later: it
     * carries less than a relay, and less than when it goes first (1),
     * where it carries more than a relay. */
    uint64_t direct[3];
    for (int k = 0; k < 3; k++) {
        start_planned();
        s.be->relay_kernel_below = 8u << 20;
        s.be->relay_kernel_overhead_us = 1.0;
        s.be->relay_kernel_resident = k > 0;
        s.relay_first = k != 1;
        s.issue_cost_ns = 20e3;
        mmad_job_t *a = run_planned_copy(MMA_DIR_H2D);
        uint64_t per[NGPU] = {0};
        for (int i = 0; i < fb.nlog; i++)
            per[fb.log[i].via] += fb.log[i].len;
        int first_relay = (a->target + 1) % NGPU, last_relay = (a->target + NGPU - 1) % NGPU;
        direct[k] = per[a->target];
        if (k > 0)
            ck_assert_msg(k == 2 ? per[a->target] < per[first_relay] : per[a->target] > per[first_relay],
                          "case %d: the direct chunk carried %llu, a relay %llu", k,
                          (unsigned long long)per[a->target], (unsigned long long)per[first_relay]);
        if (k == 2)
            ck_assert_msg(fb.log[0].via != a->target, "--relay-first: the direct chunk went first");
        else
            ck_assert_int_eq(fb.log[0].via, a->target);
        if (k > 0)
            ck_assert_msg(per[first_relay] == per[last_relay], "case %d: relays carried %llu and %llu", k,
                          (unsigned long long)per[first_relay], (unsigned long long)per[last_relay]);
        else
            ck_assert_msg(per[first_relay] > per[last_relay], "launched: relays carried %llu and %llu",
                          (unsigned long long)per[first_relay], (unsigned long long)per[last_relay]);
        job_free(a);
    }
    ck_assert_msg(direct[2] < direct[1], "the direct chunk carried %llu going last, %llu going first",
                  (unsigned long long)direct[2], (unsigned long long)direct[1]);
}
END_TEST

/* One H2D copy of `total` into GPU 0 on the timed fake box: the chunk that
 * lands first is always the next completed, the scheduler's limits hold
 * throughout, and a yielding path never has more than one chunk in flight
 * (its probe). Returns the copy's time. */
static uint64_t run_timed_copy(uint64_t total)
{
    uint64_t t0 = fake_ns;
    mmad_job_t *a = job_simple(&conn_x, 0, 0, total, 0);
    mmad_sched_add(&s, a);
    mmad_sched_fill(&s);
    mmad_job_t *f = NULL;
    while (fb.ninflight > 0) {
        int first = 0;
        for (int i = 1; i < fb.ninflight; i++)
            if (fb.fin[i] < fb.fin[first])
                first = i;
        /* (a submit with launch_ns moves the clock past chunks in flight) */
        if (!fb.launched)
            ck_assert_uint_ge(fb.fin[first], fake_ns);
        if (fb.fin[first] > fake_ns)
            fake_ns = fb.fin[first];
        f = complete(first, MMA_OK);
        mmad_sched_fill(&s);
        check_limits();
        for (int v = 0; v < NGPU; v++)
            if (s.paths[0][v][MMA_DIR_H2D].yielding)
                ck_assert_int_le(s.paths[0][v][MMA_DIR_H2D].inflight, 1);
    }
    ck_assert_ptr_eq(f, a);
    ck_assert_uint_eq(a->landed, total);
    job_free(a);
    return fake_ns - t0;
}

START_TEST(plan_fit_line)
{
    /* Copies of 1, 2 and 4 MiB that each end 300 us + bytes / 0.5 after
     * they start: the fit finds that line, whatever the model said. */
    mmad_path_fit_t f = {0};
    for (int k = 0; k < 30; k++) {
        double x = (double)(1u << 20) * (double)(1 << (k % 3));
        mmad_path_fit_add(&f, x, 300000.0 + x / 0.5);
    }
    double t, r;
    mmad_path_fit_get(&f, 0, 1.0, &t, &r);
    ck_assert_double_eq_tol(r, 0.5, 0.05);
    ck_assert_double_eq_tol(t, 300000.0, 30000.0);
    /* Nothing learned: the model. */
    mmad_path_fit_t z = {0};
    mmad_path_fit_get(&z, 15000.0, 45.0, &t, &r);
    ck_assert_double_eq_tol(r, 45.0, 1e-6);
    ck_assert_double_eq_tol(t, 15000.0, 1e-3);
    /* One size only: the start moves to fit it, the rate stays near the
     * model's. */
    mmad_path_fit_t o = {0};
    for (int k = 0; k < 30; k++)
        mmad_path_fit_add(&o, 4u << 20, 40000.0 + (double)(4u << 20) / 45.0);
    mmad_path_fit_get(&o, 15000.0, 45.0, &t, &r);
    ck_assert_double_eq_tol(r, 45.0, 5.0);
    ck_assert_double_eq_tol(t + (double)(4u << 20) / r, 40000.0 + (double)(4u << 20) / 45.0, 3000.0);
}
END_TEST

/* A fresh box of 1 MiB chunks on the fake clock, for plans that learn
 * (--plan-learn=learn, from shares of learn_min): no issue or relay costs
 * in the model, a reference rate of 1 byte/ns. */
static void start_learning(int learn, uint64_t learn_min)
{
    mmad_sched_destroy(&s);
    start(1u << 20, 64u << 10, 2, 4, 0);
    s.now = fake_now;
    fake_ns = 1000;
    s.plan_split = 2;
    s.plan_learn = learn;
    s.plan_learn_min = learn_min;
    s.issue_cost_ns = 0;
    s.relay_overhead_ns = 0;
    s.ref_floor = 1.0;
}

START_TEST(plan_fit_learns_a_late_relay)
{
    /* Relay 3 moves bytes as fast as the others but its chunks land 0.6 ms
     * late (the others' 0), a latency, not a rate. Copies of 2 and 4 MiB in
     * turn. Rate weights (--plan-learn=1) read the latency as a slow rate,
     * which is wrong for one of the two sizes; the fit (2) learns both and
     * its copies end sooner, and so do weights per size class (3), each
     * moved until its class's paths end together. */
    uint64_t spent[4] = {0, 0, 0, 0};
    static const int order[4] = {0, 1, 3, 2}; /* the fit's state is read below */
    for (int o = 0; o < 4; o++) {
        int learn = order[o];
        start_learning(learn, 128u << 10);
        for (int v = 0; v < NGPU; v++) {
            fb.rate[0][v][MMA_DIR_H2D] = 1.0;
            fb.lat[0][v][MMA_DIR_H2D] = v == 3 ? 600000 : 0;
        }
        for (int k = 0; k < 40; k++) {
            uint64_t took = run_timed_copy(k % 2 ? 4u << 20 : 2u << 20);
            if (k >= 20)
                spent[learn] += took;
        }
    }
    ck_assert_msg(spent[2] < spent[0] * 9 / 10, "fit %llu ns, model %llu", (unsigned long long)spent[2],
                  (unsigned long long)spent[0]);
    ck_assert_msg(spent[2] <= spent[1], "fit %llu ns, rate weights %llu", (unsigned long long)spent[2],
                  (unsigned long long)spent[1]);
    ck_assert_msg(spent[3] < spent[0] * 9 / 10 && spent[3] <= spent[1], "even ends %llu ns, model %llu, rate %llu",
                  (unsigned long long)spent[3], (unsigned long long)spent[0], (unsigned long long)spent[1]);
    double t, r;
    mmad_path_fit_get(&s.plan_fit[0][3][MMA_DIR_H2D], 0, 1.0, &t, &r);
    ck_assert_double_eq_tol(t, 600000.0, 120000.0);
    ck_assert_double_eq_tol(r, 1.0, 0.2);
}
END_TEST

START_TEST(plan_fit_learns_from_small_shares)
{
    /* Rate weights learn only from shares of 2 MiB and more (below that the
     * fixed latencies drown the rate); the fit learns those latencies, so
     * shares from 256 KiB teach it. */
    for (int learn = 1; learn <= 2; learn++) {
        mmad_sched_t t;
        mmad_config_t cfg;
        mmad_config_defaults(&cfg);
        cfg.plan_learn = learn;
        ck_assert_int_eq(mmad_sched_init(&t, &fb.base, &cfg), MMA_OK);
        ck_assert_uint_eq(t.plan_learn_min, learn == 2 ? 256u << 10 : 2u << 20);
        mmad_sched_destroy(&t);
    }
}
END_TEST

START_TEST(plan_even_recovers_after_a_slow_spell)
{
    /* 4 MiB copies over four equal paths, but the direct path runs at half
     * speed for the first three. Rate weights (1) learn only from shares of
     * at least a minimum (here 1 MiB, as 2 MiB is for 8 MiB copies on
     * GPUs): the direct path's weight falls, its share drops below the
     * minimum and stays there once it is fast again, so the copies stay
     * uneven. Weights per class that even out the ends (3) recover, to
     * within 3% of an even split's time. */
    uint64_t last[4] = {0, 0, 0, 0};
    const uint64_t total = 4u << 20;
    for (int learn = 1; learn <= 3; learn += 2) {
        start_learning(learn, 1u << 20);
        for (int k = 0; k < 30; k++) {
            for (int v = 0; v < NGPU; v++)
                fb.rate[0][v][MMA_DIR_H2D] = v == 0 && k < 3 ? 0.5 : 1.0;
            last[learn] = run_timed_copy(total);
        }
    }
    double even = (double)total / NGPU;
    ck_assert_msg((double)last[3] < even * 1.03, "even ends: %llu ns a copy, an even split %.0f",
                  (unsigned long long)last[3], even);
    ck_assert_msg(last[3] < last[1], "even ends %llu ns, rate weights %llu", (unsigned long long)last[3],
                  (unsigned long long)last[1]);
}
END_TEST

START_TEST(plan_even_skips_a_late_start)
{
    /* Weights that have settled do not move for a copy in which a relay's
     * submit took 2 ms (a kernel launched after a pause): the relay ends
     * late for that, not for its rate. A copy without it teaches again. */
    start_learning(3, 0);
    for (int v = 0; v < NGPU; v++)
        fb.rate[0][v][MMA_DIR_H2D] = 1.0;
    for (int k = 0; k < 10; k++)
        (void)run_timed_copy(4u << 20);
    int k4 = mmad_plan_class(4u << 20);
    double w[NGPU];
    for (int v = 0; v < NGPU; v++)
        w[v] = s.plan_e[0][v][MMA_DIR_H2D][k4];
    fb.launch_ns[2] = 2000000;
    uint64_t late = run_timed_copy(4u << 20);
    ck_assert_uint_gt(late, 2000000);
    for (int v = 0; v < NGPU; v++)
        ck_assert_double_eq_tol(s.plan_e[0][v][MMA_DIR_H2D][k4], w[v], 1e-12);
    fb.rate[0][2][MMA_DIR_H2D] = 0.5;
    (void)run_timed_copy(4u << 20);
    ck_assert_double_lt(s.plan_e[0][2][MMA_DIR_H2D][k4], w[2]);
    /* other size classes kept theirs */
    ck_assert_double_eq_tol(s.plan_e[0][2][MMA_DIR_H2D][mmad_plan_class(16u << 20)], 1.0, 1e-12);
    ck_assert_int_eq(mmad_plan_class(1u << 20), 0);
    ck_assert_int_eq(mmad_plan_class(3u << 20), 1);
    ck_assert_int_eq(mmad_plan_class(8u << 20), 3);
    ck_assert_int_eq(mmad_plan_class((uint64_t)1 << 40), MMAD_PLAN_CLASSES - 1);
}
END_TEST

START_TEST(plan_learn_gives_slow_path_less)
{
    /* Relay 3 runs at half the others' rate. Equal shares wait for it; with
     * --plan-learn its weight falls toward 0.5 and the copies get faster,
     * toward total / (3.5 x rate). Without learning nothing changes. */
    for (int learn = 0; learn <= 1; learn++) {
        start_learning(learn, 256u << 10);
        for (int v = 0; v < NGPU; v++)
            fb.rate[0][v][MMA_DIR_H2D] = v == 3 ? 0.5 : 1.0;
        const uint64_t total = 4u << 20;
        uint64_t first = run_timed_copy(total), last = first;
        for (int k = 0; k < 12; k++)
            last = run_timed_copy(total);
        if (!learn) {
            ck_assert_uint_eq(last, first);
            ck_assert_double_eq_tol(s.plan_w[0][3][MMA_DIR_H2D], 1.0, 1e-12);
            continue;
        }
        ck_assert_msg(last < first * 3 / 4, "learning: %llu ns per copy, first %llu", (unsigned long long)last,
                      (unsigned long long)first);
        ck_assert_double_le(last, (double)total / 3.5 * 1.1);
        ck_assert_double_eq_tol(s.plan_w[0][3][MMA_DIR_H2D], 0.5, 0.1);
        for (int v = 0; v < 3; v++)
            ck_assert_double_eq_tol(s.plan_w[0][v][MMA_DIR_H2D], 1.0, 0.15);
    }
}
END_TEST

START_TEST(planned_job_skips_yielding_relay)
{
    mmad_sched_destroy(&s);
    start(8u << 20, 512u << 10, 2, 4, 0);
    s.plan_split = 1;
    s.paths[1][3][MMA_DIR_H2D].yielding = 1; /* its probe is due: probe_at 0 */
    uint64_t want[MMAD_MAX_GPUS];
    ck_assert_int_eq(mmad_sched_plan_split(4u << 20, 3, 5000, 15000, 45.0, 512u << 10, 8u << 20, want), 3);
    mmad_job_t *a = job_simple(&conn_x, 1, 0, 4u << 20, 0);
    mmad_sched_add(&s, a);
    ck_assert_int_eq(mmad_sched_fill(&s), 3);
    const int order[3] = {1, 2, 0};
    for (int p = 0; p < 3; p++) {
        ck_assert_int_eq(fb.log[p].via, order[p]);
        ck_assert_uint_eq(fb.log[p].len, want[p]);
    }
    while (fb.ninflight > 0)
        complete(0, MMA_OK);
    ck_assert_uint_eq(a->landed, a->total);
    ck_assert_uint_eq(s.paths[1][3][MMA_DIR_H2D].bytes, 0);
    job_free(a);
}
END_TEST

START_TEST(planned_chunks_cover_every_byte_once)
{
    /* Small chunks and small costs, so plans spread over every path; odd
     * segments, random completion order, then a relay that fails: its share
     * goes again over the direct path. */
    for (int fail = -1; fail <= 2; fail += 3) {
        mmad_sched_destroy(&s);
        start(64 << 10, 16 << 10, 2, 4, 0);
        s.plan_split = 1;
        s.issue_cost_ns = 100;
        s.relay_overhead_ns = 200;
        const uint64_t lens[] = {1, 4095, 70001, 12345, 65536 + 7, 4096, 2};
        mmad_job_t *h2d = job_new(&conn_x, 2, MMA_DIR_H2D, 0, lens, sizeof lens / sizeof lens[0], 5, 0);
        const uint64_t lens2[] = {199999};
        mmad_job_t *d2h = job_new(&conn_y, 2, MMA_DIR_D2H, 0, lens2, 1, 2u << 20, 1u << 20);
        mmad_job_t *jobs[2] = {h2d, d2h};
        run_and_check_coverage(jobs, 2, 4242 + (uint64_t)fail, fail);
        int relays = 0;
        for (int i = 0; i < fb.nlog; i++)
            relays += fb.log[i].via != 2;
        ck_assert_int_ge(relays, 3);
        ck_assert_ptr_null(s.plans);
        job_free(h2d);
        job_free(d2h);
    }
}
END_TEST

/* ---- yielding ---- */

/* A scheduler with yielding on over the timed fake box: chunks of 256 KiB
 * (all of which count toward rates), probes every 20 ms, reference floor
 * (--link-gbps) 0.9 bytes/ns; every path at 1 byte/ns unless a test says
 * otherwise. A 4 MiB copy takes ~1.4 ms. */
static void start_timed(void)
{
    mmad_sched_destroy(&s);
    start(256u << 10, 64u << 10, 2, 4, 0);
    s.now = fake_now;
    fake_ns = 1000;
    s.yield_frac = 0.6;
    s.yield_probe_ns = 20000000;
    s.ref_floor = 0.9;
    s.relay_overhead_ns = 0;
    for (int t = 0; t < NGPU; t++)
        for (int v = 0; v < NGPU; v++)
            for (int d = 0; d < 2; d++)
                fb.rate[t][v][d] = 1.0;
}

/* run_timed_copy of 4 MiB; returns the chunks each path got. */
static void run_timed(int chunks[NGPU])
{
    int n0 = fb.nlog;
    run_timed_copy(4u << 20);
    for (int v = 0; v < NGPU; v++)
        chunks[v] = 0;
    for (int i = n0; i < fb.nlog; i++)
        chunks[fb.log[i].via]++;
}

START_TEST(slow_relay_yields_and_probes)
{
    start_timed();
    fb.rate[0][1][MMA_DIR_H2D] = 0.3; /* GPU 1's link is busy with its own work */
    fb.rate[0][2][MMA_DIR_H2D] = 0.9;
    int ch[NGPU], via1 = 0;
    const mmad_path_stat_t *p1 = &s.paths[0][1][MMA_DIR_H2D];
    /* It is judged once it has RATE_MIN_SAMPLES (4) chunks: a copy or two. */
    for (int k = 0; k < 3 && !p1->yielding; k++) {
        run_timed(ch);
        via1 += ch[1];
    }
    ck_assert_msg(p1->yielding, "via 1 at %.3f bytes/ns does not yield (reference %.3f)", p1->rate,
                  mmad_sched_ref_rate(&s, MMA_DIR_H2D, fake_ns));
    ck_assert_double_eq_tol(p1->rate, 0.3, 0.01);
    ck_assert_int_le(via1, 4 + s.path_depth); /* the chunks that judged it, and no more */
    for (int v = 0; v < NGPU; v++)
        if (v != 1)
            ck_assert_int_eq(s.paths[0][v][MMA_DIR_H2D].yielding, 0);
    /* The next copy (~1.4 ms) comes before the probe is due: nothing on 1. */
    run_timed(ch);
    ck_assert_int_eq(ch[1], 0);
    ck_assert_int_gt(ch[0], 0);
    ck_assert_int_gt(ch[2], 0);
    ck_assert_int_gt(ch[3], 0);
    /* 25 ms later the probe is due: exactly one chunk, still slow. */
    fake_ns += 25000000;
    run_timed(ch);
    ck_assert_int_eq(ch[1], 1);
    ck_assert_int_eq(p1->yielding, 1);
    /* Another 25 ms, and GPU 1's link is free again: the probe runs fast,
     * the relay resumes and takes its share of the same copy. */
    fake_ns += 25000000;
    fb.rate[0][1][MMA_DIR_H2D] = 1.0;
    run_timed(ch);
    ck_assert_int_eq(p1->yielding, 0);
    ck_assert_int_ge(ch[1], 3);
    run_timed(ch);
    ck_assert_int_eq(p1->yielding, 0);
    ck_assert_int_ge(ch[1], 4);
}
END_TEST

START_TEST(shared_host_side_does_not_yield)
{
    /* An uncontended multipath copy on 4x H200: every link ~45 GB/s H2D and
     * ~38 D2H while one link alone did 55 (0.82 and 0.69 of it). */
    start_timed();
    for (int v = 1; v < NGPU; v++)
        fb.rate[0][v][MMA_DIR_H2D] = 0.69;
    int ch[NGPU];
    for (int k = 0; k < 4; k++) {
        run_timed(ch);
        for (int v = 0; v < NGPU; v++) {
            ck_assert_int_eq(s.paths[0][v][MMA_DIR_H2D].yielding, 0);
            ck_assert_int_ge(ch[v], 3);
        }
    }
}
END_TEST

/* Path via of GPU 0 runs at `rate`: over three timed copies it keeps
 * taking chunks and never yields, and its rate estimate is kept. */
static void slow_path_never_yields(int via, double rate)
{
    fb.rate[0][via][MMA_DIR_H2D] = rate;
    int ch[NGPU];
    for (int k = 0; k < 3; k++) {
        run_timed(ch);
        ck_assert_int_eq(s.paths[0][via][MMA_DIR_H2D].yielding, 0);
        ck_assert_int_ge(ch[via], 1);
    }
    ck_assert_double_eq_tol(s.paths[0][via][MMA_DIR_H2D].rate, rate, 0.01);
}

START_TEST(direct_path_never_yields)
{
    start_timed();
    slow_path_never_yields(0, 0.1);
}
END_TEST

START_TEST(yield_frac_zero_never_yields)
{
    /* A slow relay with yielding off (the estimate is kept all the same). */
    start_timed();
    s.yield_frac = 0;
    slow_path_never_yields(1, 0.2);
}
END_TEST

START_TEST(small_chunks_do_not_count)
{
    /* Chunks under rate_min_len are mostly latency: a slow relay seen only
     * through them is not judged. */
    start_timed();
    s.rate_min_len = 512u << 10;
    fb.rate[0][1][MMA_DIR_H2D] = 0.2;
    int ch[NGPU];
    run_timed(ch);
    ck_assert_int_eq(s.paths[0][1][MMA_DIR_H2D].samples, 0);
    ck_assert_int_eq(s.paths[0][1][MMA_DIR_H2D].yielding, 0);
    ck_assert_double_eq_tol(s.paths[0][1][MMA_DIR_H2D].rate, 0, 1e-12);
}
END_TEST

START_TEST(reference_decays_to_floor)
{
    start_timed();
    s.ref_half_life_ns = 10e9;
    s.ref_floor = 0.5;
    fb.rate[0][0][MMA_DIR_H2D] = 0.8; /* the best path */
    for (int v = 1; v < NGPU; v++)
        fb.rate[0][v][MMA_DIR_H2D] = 0.7;
    int ch[NGPU];
    run_timed(ch);
    /* A rate sets the reference once measured over 8 chunks. */
    ck_assert_double_eq_tol(mmad_sched_ref_rate(&s, MMA_DIR_H2D, fake_ns), 0.5, 1e-12);
    run_timed(ch);
    run_timed(ch);
    double r0 = mmad_sched_ref_rate(&s, MMA_DIR_H2D, fake_ns);
    ck_assert_double_eq_tol(r0, 0.8, 0.01);
    ck_assert_double_eq_tol(mmad_sched_ref_rate(&s, MMA_DIR_D2H, fake_ns), 0.5, 1e-12); /* nothing seen */
    fake_ns += 5000000000ull;
    ck_assert_double_eq_tol(mmad_sched_ref_rate(&s, MMA_DIR_H2D, fake_ns), r0 / 1.41421356, 0.01);
    fake_ns += 60000000000ull;
    ck_assert_double_eq_tol(mmad_sched_ref_rate(&s, MMA_DIR_H2D, fake_ns), 0.5, 1e-12);
}
END_TEST

START_TEST(one_stall_does_not_yield)
{
    /* A relay on a 0.7 link (not slow) whose third chunk stalls for 20
     * chunk-times, the machine busy elsewhere: it is judged at its fourth
     * and the stall counts as a little below the limit, no more. A relay
     * whose chunks are all slow still yields (slow_relay_yields_and_probes). */
    start_timed();
    for (int v = 1; v < NGPU; v++)
        fb.rate[0][v][MMA_DIR_H2D] = 0.7;
    int ch[NGPU];
    mmad_job_t *a = job_simple(&conn_x, 0, 0, 4u << 20, 0);
    mmad_sched_add(&s, a);
    mmad_sched_fill(&s);
    int via1_done = 0;
    mmad_job_t *f = NULL;
    while (fb.ninflight > 0) {
        int first = 0;
        for (int i = 1; i < fb.ninflight; i++)
            if (fb.fin[i] < fb.fin[first])
                first = i;
        fake_ns = fb.fin[first];
        if (fb.inflight[first]->via == 1 && ++via1_done == 3) {
            /* This one lands 20 chunk-times late; the ones behind it too. */
            uint64_t late = 20 * (uint64_t)((256u << 10) / 0.7);
            for (int i = 0; i < fb.ninflight; i++)
                if (fb.inflight[i]->via == 1)
                    fb.fin[i] += late;
            fb.path_free[0][1][MMA_DIR_H2D] += late;
            continue;
        }
        f = complete(first, MMA_OK);
        mmad_sched_fill(&s);
    }
    ck_assert_ptr_eq(f, a);
    job_free(a);
    run_timed(ch);
    ck_assert_int_ge(s.paths[0][1][MMA_DIR_H2D].samples, 4);
    ck_assert_int_eq(s.paths[0][1][MMA_DIR_H2D].yielding, 0);
    ck_assert_int_ge(ch[1], 3);
    /* It shows: the displayed rate is the raw one. */
    ck_assert_double_lt(s.paths[0][1][MMA_DIR_H2D].rate, 0.5);
}
END_TEST

int main(void)
{
    Suite *su = suite_create("sched");
    TCase *tc = tcase_create("sched");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 20);
    tcase_add_test(tc, chunk_len_rule);
    tcase_add_test(tc, bypass_all_without_relays);
    tcase_add_test(tc, paths_for_order);
    tcase_add_test(tc, fill_respects_depth_and_staging);
    tcase_add_test(tc, paths_queued_while_every_busy_path_has_a_next_chunk);
    tcase_add_test(tc, one_staging_slot);
    tcase_add_test(tc, direct_path_first);
    tcase_add_test(tc, chunks_cover_every_byte_once);
    tcase_add_test(tc, round_robin_between_bulk_jobs);
    tcase_add_test(tc, round_robin_three_jobs_many_paths);
    tcase_add_test(tc, latency_job_overtakes_bulk);
    tcase_add_test(tc, max_paths_one_uses_direct_only);
    tcase_add_test(tc, daemon_max_paths_one);
    tcase_add_test(tc, failed_relay_is_set_aside_and_retried);
    tcase_add_test(tc, submit_refused_on_relay);
    tcase_add_test(tc, failed_direct_chunk_fails_the_job);
    tcase_add_test(tc, submit_refused_on_direct_with_nothing_in_flight);
    tcase_add_test(tc, cancel_conn);
    tcase_add_test(tc, not_runnable_waits);
    suite_add_tcase(su, tc);
    TCase *plan = tcase_create("plan");
    tcase_add_checked_fixture(plan, setup, teardown);
    tcase_set_timeout(plan, 20);
    tcase_add_test(plan, plan_split_function);
    tcase_add_test(plan, plan_fit_learns_from_small_shares);
    tcase_add_test(plan, plan_split_small_copies_go_direct);
    tcase_add_test(plan, plan_split_finishes_together);
    tcase_add_test(plan, plan_split_caps_at_chunk_size);
    tcase_add_test(plan, planned_job_one_chunk_per_path);
    tcase_add_test(plan, planned_job_skips_yielding_relay);
    tcase_add_test(plan, plan_split_weighted_paths_finish_together);
    tcase_add_test(plan, plan_split_mid_size_equal_pieces);
    tcase_add_test(plan, plan_learn_gives_slow_path_less);
    tcase_add_test(plan, plan_even_recovers_after_a_slow_spell);
    tcase_add_test(plan, plan_even_skips_a_late_start);
    tcase_add_test(plan, relay_edge_piece_last_h2d_first_d2h);
    tcase_add_test(plan, relay_edge_never_exceeds_a_chunk);
    tcase_add_test(plan, one_hop_relays_plan_no_edge_and_more_share);
    tcase_add_test(plan, plan_split_3_plans_one_hop_copies_of_many_chunks);
    tcase_add_test(plan, edge_one_hop_first_and_last_pieces);
    tcase_add_test(plan, resident_relays_go_first_and_start_together);
    tcase_add_test(plan, relay_overhead_option_covers_one_hop);
    tcase_add_test(plan, plan_fit_line);
    tcase_add_test(plan, plan_fit_learns_a_late_relay);
    tcase_add_test(plan, foreign_traffic_from_counter);
    tcase_add_test(plan, planned_chunks_cover_every_byte_once);
    suite_add_tcase(su, plan);
    TCase *yield = tcase_create("yield");
    tcase_add_checked_fixture(yield, setup, teardown);
    tcase_set_timeout(yield, 20);
    tcase_add_test(yield, slow_relay_yields_and_probes);
    tcase_add_test(yield, shared_host_side_does_not_yield);
    tcase_add_test(yield, direct_path_never_yields);
    tcase_add_test(yield, yield_frac_zero_never_yields);
    tcase_add_test(yield, small_chunks_do_not_count);
    tcase_add_test(yield, reference_decays_to_floor);
    tcase_add_test(yield, one_stall_does_not_yield);
    tcase_add_test(yield, relays_yield_to_direct);
    suite_add_tcase(su, yield);
    SRunner *sr = srunner_create(su);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
