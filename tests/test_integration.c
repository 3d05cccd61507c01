/* End to end: a private `mmad --sim` per test (fork+exec of the real
 * binary), driven through libmma, through raw protocol sockets and through
 * mmactl. The simulated box really copies bytes through its rate-limited
 * links and its device memory is shared with the client, so every copy is
 * checked byte for byte against a reference kept by the test, including the
 * bytes around the destination that must not change. Each test ends by
 * stopping the daemon with SIGTERM and requiring a clean exit (status 0; under
 * ASan that includes no leaks).
 *
 * Test cases (ctest runs each as integration.<case>):
 *   clients     several client processes copying at once (random sizes,
 *               offsets, directions, GPUs, scatter-gather, copies in flight)
 *   protocol    raw protocol: daemon-side validation, version handshake,
 *               unknown/garbage requests
 *   lifecycle   a client dying mid-copy, SIGTERM with copies in flight (the
 *               ready ones finish, the others keep `done` unwritten, the
 *               drain is bounded), a second daemon on a live socket, a
 *               stale socket file
 *   mmactl      status/paths/clients output, --json, errors
 *   faults      --sim-fail-via: relays that fail are set aside, bytes arrive
 *   api_errors  every libmma refusal a caller can run into
 *   yield       --sim-busy-gpus: relays over links busy with their own GPU's
 *               work step aside (state=yield) and come back when it stops;
 *               on an idle box they do not
 *   plan        planned splits: copies of 4 KiB..32 MiB, every byte checked;
 *               --trace writes one row per chunk that covers each copy */
#define _GNU_SOURCE
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "flagpage.h"
#include "harness.h"
#include "mma.h"
#include "socket_fd.h"
#include "trace_row.h"
#include "wire.h"

#define MIB (1u << 20)
#define NGPU 4

/* A fast box for tests that only need correctness, with small chunks so that
 * even modest copies are split across every path. */
static const char *const fast_box[] = {"--sim-scale=0.25", "--chunk-size=1M", "--min-chunk=64K", NULL};
/* The same for tests that check which paths are on: at that scale a small
 * machine's CPU, not the simulated links, sets the rates (README), so relays
 * would yield at random. */
static const char *const steady_box[] = {"--sim-scale=0.25", "--chunk-size=1M", "--min-chunk=64K", "--yield-frac=0",
                                         NULL};

/* ---- helpers ---- */

static char *mmactl(const mmad_proc_t *d, const char *cmd, int json, int *rc)
{
    const char *argv[] = {MMACTL_PATH, "--socket", d->sock, cmd, json ? "--json" : NULL, NULL};
    char *out = NULL, *err = NULL;
    *rc = tool_run(argv, &out, &err);
    if (*rc != 0)
        fprintf(stderr, "mmactl %s: exit %d: %s\n", cmd, *rc, err);
    free(err);
    return out;
}

/* The value of `key=` (or `key:`) on the first line starting with `line`. */
static int64_t field(const char *text, const char *line, const char *key)
{
    size_t ll = strlen(line);
    for (const char *p = text; p && *p;) {
        const char *eol = strchr(p, '\n');
        if (strncmp(p, line, ll) == 0) {
            const char *k = strstr(p, key);
            if (k && (!eol || k < eol))
                return strtoll(k + strlen(key), NULL, 10);
            return -1;
        }
        p = eol ? eol + 1 : NULL;
    }
    return -1;
}

/* `key:N` of `mmactl status`. */
static int64_t status_field(const char *text, const char *key)
{
    char k[64];
    snprintf(k, sizeof k, "%s:", key);
    return field(text, k, k);
}

/* The whole line starting with `prefix`, or "" (static buffer). */
static const char *line_of(const char *text, const char *prefix)
{
    static char buf[512];
    buf[0] = 0;
    size_t pl = strlen(prefix);
    for (const char *p = text; p && *p;) {
        const char *eol = strchr(p, '\n');
        size_t len = eol ? (size_t)(eol - p) : strlen(p);
        if (strncmp(p, prefix, pl) == 0) {
            snprintf(buf, sizeof buf, "%.*s", (int)len, p);
            break;
        }
        p = eol ? eol + 1 : NULL;
    }
    return buf;
}

/* A small JSON syntax checker: enough to catch an unescaped quote in a note
 * or a missing comma, which would break every consumer of --json. */
static const char *js_value(const char *p, int depth);
static const char *js_ws(const char *p)
{
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    return p;
}
static const char *js_string(const char *p)
{
    if (*p++ != '"')
        return NULL;
    for (; *p && *p != '"'; p++) {
        if ((unsigned char)*p < 0x20)
            return NULL;
        if (*p == '\\' && !*++p)
            return NULL;
    }
    return *p == '"' ? p + 1 : NULL;
}
static const char *js_number(const char *p)
{
    const char *s = p;
    if (*p == '-')
        p++;
    if (*p < '0' || *p > '9')
        return NULL;
    while (*p >= '0' && *p <= '9')
        p++;
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9')
            return NULL;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (*p < '0' || *p > '9')
            return NULL;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    return p > s ? p : NULL;
}
static const char *js_container(const char *p, int depth, char close, int object)
{
    p = js_ws(p + 1);
    if (*p == close)
        return p + 1;
    for (;;) {
        if (object) {
            if (!(p = js_string(js_ws(p))))
                return NULL;
            p = js_ws(p);
            if (*p++ != ':')
                return NULL;
        }
        if (!(p = js_value(p, depth + 1)))
            return NULL;
        p = js_ws(p);
        if (*p == close)
            return p + 1;
        if (*p++ != ',')
            return NULL;
    }
}
static const char *js_value(const char *p, int depth)
{
    if (depth > 32)
        return NULL;
    p = js_ws(p);
    switch (*p) {
    case '{': return js_container(p, depth, '}', 1);
    case '[': return js_container(p, depth, ']', 0);
    case '"': return js_string(p);
    case 't': return strncmp(p, "true", 4) ? NULL : p + 4;
    case 'f': return strncmp(p, "false", 5) ? NULL : p + 5;
    case 'n': return strncmp(p, "null", 4) ? NULL : p + 4;
    default: return js_number(p);
    }
}
static int json_valid(const char *text)
{
    const char *end = js_value(text, 0);
    return end && *js_ws(end) == 0;
}

static int count_substr(const char *hay, const char *needle)
{
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle))
        n++;
    return n;
}

/* First offset where a and b differ, or -1. */
static long first_diff(const uint8_t *a, const uint8_t *b, size_t n)
{
    if (memcmp(a, b, n) == 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i])
            return (long)i;
    return -1;
}

/* One verified copy through libmma on an established client. */
static void copy_verified(mma_client_t *c, void *dst, const void *src, size_t n, const mma_copy_opts_t *opts)
{
    mma_segment_t s = {dst, src, n};
    mma_copy_t t;
    int rc = mma_memcpy_sg_async(c, &s, 1, NULL, opts, &t);
    ck_assert_msg(rc == MMA_OK, "mma_memcpy_sg_async: %s", mma_status_name(rc));
    rc = mma_wait(c, t);
    ck_assert_msg(rc == MMA_OK, "mma_wait: %s", mma_status_name(rc));
    long d = first_diff(dst, src, n);
    ck_assert_msg(d < 0, "copied bytes differ at offset %ld of %zu", d, n);
}

/* Connect, copy `n` random bytes host -> gpu -> host, verify, disconnect. */
static void quick_roundtrip(const char *sock, int gpu, size_t n)
{
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(sock, &c), MMA_OK);
    uint8_t *h, *back, *d;
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&back), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, gpu, n, (void **)&d), MMA_OK);
    fill_random(h, n, n * 31 + (size_t)gpu);
    copy_verified(c, d, h, n, NULL);
    copy_verified(c, back, d, n, NULL);
    ck_assert_int_eq(mma_free(c, d), MMA_OK);
    ck_assert_int_eq(mma_free(c, back), MMA_OK);
    ck_assert_int_eq(mma_free(c, h), MMA_OK);
    mma_disconnect(c);
}

static void reap_child_ok(pid_t pid, const char *what)
{
    int st = 0;
    ck_assert_int_eq(waitpid(pid, &st, 0), pid);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "%s (pid %d) failed: %s %d", what, (int)pid,
                  WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
}

/* ======================================================================
 * a. several client processes at once
 * ==================================================================== */

#define NCLIENTS 4
#define ROUNDS 20
#define MAX_OPS 6
#define MAX_SEGS 200

/* Failures inside a forked client: say what and exit nonzero; the parent
 * asserts every client exited 0. */
#define CHILD_CHECK(cond, ...)                                   \
    do {                                                         \
        if (!(cond)) {                                           \
            fprintf(stderr, "client %d (seed %llu): ", idx,      \
                    (unsigned long long)seed);                   \
            fprintf(stderr, __VA_ARGS__);                        \
            fputc('\n', stderr);                                 \
            return 1;                                            \
        }                                                        \
    } while (0)
#define CHILD_OK(call)                                                              \
    do {                                                                            \
        int rc_ = (call);                                                           \
        CHILD_CHECK(rc_ == MMA_OK, "%s: %s", #call, mma_status_name(rc_));          \
    } while (0)

/* A length in [1, max], log-uniform so that 1-byte, odd, page-sized and
 * multi-MiB copies all come up; sometimes exactly max. */
static size_t rand_len(uint64_t *r, size_t max)
{
    if (rnd_next(r) % 8 == 0)
        return max;
    int bits = 0;
    while (bits < 63 && ((size_t)1 << (bits + 1)) <= max)
        bits++;
    size_t cap = (size_t)1 << (rnd_next(r) % (uint64_t)(bits + 1));
    size_t len = 1 + rnd_next(r) % cap;
    return len > max ? max : len;
}

static int client_worker(const char *sock, int idx, uint64_t seed, uint64_t *bytes_out)
{
    uint64_t r = seed;
    mma_client_t *c = NULL;
    CHILD_OK(mma_connect(sock, &c));
    mma_info_t info;
    CHILD_OK(mma_get_info(c, &info));
    CHILD_CHECK(info.simulated && info.gpu_count == NGPU && strcmp(info.backend, "sim") == 0,
                "unexpected box: %s, %d GPUs, simulated %d", info.backend, info.gpu_count, info.simulated);
    CHILD_CHECK(info.api_version == MMA_API_VERSION, "api %u", info.api_version);
    CHILD_CHECK(info.features & MMA_FEATURE_SCATTER_GATHER, "no scatter-gather feature");

    /* Odd sizes, so region ends are not page aligned: the daemon must
     * refuse nothing inside and the last byte of a region must be reachable. */
    const int gpu[2] = {idx % NGPU, (idx + 1) % NGPU};
    const size_t hsz = 6 * MIB + 4097, dsz[2] = {6 * MIB + 13, 6 * MIB + 4099};
    const size_t span = dsz[0]; /* the smallest of the three */
    uint8_t *h = NULL, *d[2] = {NULL, NULL};
    CHILD_OK(mma_host_alloc(c, hsz, (void **)&h));
    CHILD_OK(mma_device_alloc(c, gpu[0], dsz[0], (void **)&d[0]));
    CHILD_OK(mma_device_alloc(c, gpu[1], dsz[1], (void **)&d[1]));
    /* The reference: what every byte of every buffer must hold. */
    uint8_t *mh = malloc(hsz), *md[2] = {malloc(dsz[0]), malloc(dsz[1])};
    CHILD_CHECK(mh && md[0] && md[1], "out of memory");
    fill_random(h, hsz, seed + 1);
    fill_random(d[0], dsz[0], seed + 2);
    fill_random(d[1], dsz[1], seed + 3);
    memcpy(mh, h, hsz);
    memcpy(md[0], d[0], dsz[0]);
    memcpy(md[1], d[1], dsz[1]);

    mma_segment_t *segs = malloc(MAX_SEGS * sizeof *segs);
    uint64_t bytes = 0;
    for (int round = 0; round < ROUNDS; round++) {
        /* k copies in flight at once, each confined to its own slice of all
         * three buffers, so they never touch each other's bytes and the
         * reference can be updated at submit time. Round 0: one copy of the
         * whole span. */
        int k = round == 0 ? 1 : 1 + (int)(rnd_next(&r) % MAX_OPS);
        size_t slice = span / (size_t)k;
        mma_copy_t t[MAX_OPS];
        for (int i = 0; i < k; i++) {
            size_t a = (size_t)i * slice, b = i == k - 1 ? span : a + slice;
            int h2d = rnd_next(&r) & 1;
            int di = (int)(rnd_next(&r) & 1);
            int nseg = rnd_next(&r) % 3 == 0 ? 2 + (int)(rnd_next(&r) % (MAX_SEGS - 1)) : 1;
            if (round == 0)
                nseg = 1;
            if ((b - a) / (size_t)nseg < 1)
                nseg = 1;
            size_t sub = (b - a) / (size_t)nseg;
            uint64_t total = 0;
            for (int s = 0; s < nseg; s++) {
                size_t sa = a + (size_t)s * sub, sb = s == nseg - 1 ? b : sa + sub;
                size_t len = round == 0 ? sb - sa : rand_len(&r, sb - sa);
                size_t soff = sa + rnd_next(&r) % (sb - sa - len + 1);
                size_t doff = sa + rnd_next(&r) % (sb - sa - len + 1);
                if (h2d) {
                    segs[s] = (mma_segment_t){d[di] + doff, h + soff, len};
                    memcpy(md[di] + doff, mh + soff, len);
                } else {
                    segs[s] = (mma_segment_t){h + doff, d[di] + soff, len};
                    memcpy(mh + doff, md[di] + soff, len);
                }
                total += len;
            }
            mma_copy_opts_t opts = {0, 0};
            uint64_t o = rnd_next(&r);
            if (o & 1)
                opts.flags |= MMA_COPY_LATENCY;
            if (o & 2)
                opts.flags |= MMA_COPY_NO_BYPASS;
            opts.max_paths = (int)((o >> 8) % (NGPU + 1));
            int how = (int)(rnd_next(&r) % 4);
            if (nseg == 1 && how == 0) {
                CHILD_OK(mma_memcpy_async(c, segs[0].dst, segs[0].src, segs[0].len, NULL, &t[i]));
            } else if (nseg == 1 && how == 1) {
                CHILD_OK(mma_memcpy(c, segs[0].dst, segs[0].src, segs[0].len)); /* synchronous */
                t[i] = 0;
            } else {
                CHILD_OK(mma_memcpy_sg_async(c, segs, (size_t)nseg, NULL, how == 2 ? &opts : NULL, &t[i]));
            }
            bytes += total;
        }
        /* Wait newest first: completion is per copy, not in issue order. */
        for (int i = k - 1; i >= 0; i--) {
            if (t[i] == 0)
                continue; /* that one was synchronous */
            int rc = mma_wait(c, t[i]);
            CHILD_CHECK(rc == MMA_OK, "round %d copy %d: mma_wait: %s", round, i, mma_status_name(rc));
            CHILD_CHECK(mma_query(c, t[i]) == MMA_OK, "query after wait");
        }
        /* Every byte of every buffer: the copied ones and all the others. */
        long off;
        CHILD_CHECK((off = first_diff(h, mh, hsz)) < 0, "round %d: host buffer differs at %ld", round, off);
        CHILD_CHECK((off = first_diff(d[0], md[0], dsz[0])) < 0, "round %d: gpu%d buffer differs at %ld", round,
                    gpu[0], off);
        CHILD_CHECK((off = first_diff(d[1], md[1], dsz[1])) < 0, "round %d: gpu%d buffer differs at %ld", round,
                    gpu[1], off);
    }
    CHILD_OK(mma_free(c, d[1]));
    CHILD_OK(mma_free(c, d[0]));
    CHILD_OK(mma_free(c, h));
    CHILD_CHECK(mma_free(c, h) == MMA_ERR_NOT_REGISTERED, "double free accepted");
    mma_disconnect(c);
    free(segs);
    free(mh);
    free(md[0]);
    free(md[1]);
    *bytes_out = bytes;
    return 0;
}

START_TEST(concurrent_clients_random_copies)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    uint64_t seed = test_seed("concurrent_clients_random_copies");
    int p[2];
    ck_assert_int_eq(pipe(p), 0);
    pid_t kids[NCLIENTS];
    fflush(stdout);
    fflush(stderr);
    for (int i = 0; i < NCLIENTS; i++) {
        kids[i] = fork();
        ck_assert_int_ge(kids[i], 0);
        if (kids[i] == 0) {
            close(p[0]);
            uint64_t bytes = 0;
            int rc = client_worker(d.sock, i, seed + (uint64_t)i * 1000003, &bytes);
            if (rc == 0 && write(p[1], &bytes, sizeof bytes) != sizeof bytes)
                rc = 1;
            exit(rc); /* exit, not _exit: under ASan the client's leaks count */
        }
    }
    close(p[1]);
    for (int i = 0; i < NCLIENTS; i++)
        reap_child_ok(kids[i], "client process");
    uint64_t sum = 0, b;
    int reports = 0;
    while (read(p[0], &b, sizeof b) == sizeof b) {
        sum += b;
        reports++;
    }
    close(p[0]);
    ck_assert_int_eq(reports, NCLIENTS);
    /* The daemon's own totals agree with what the clients copied. */
    int rc;
    char *st = mmactl(&d, "status", 0, &rc);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(status_field(st, "bytes_done") == (int64_t)sum, "daemon says %" PRId64 ", clients %" PRIu64,
                  status_field(st, "bytes_done"), sum);
    free(st);
    mmad_stop_clean(&d);
}
END_TEST

/* One client, several threads: the handle is documented thread-safe. */
typedef struct {
    mma_client_t *c;
    int gpu;
    int ok;
} thr_arg_t;

static void *thread_copies(void *arg)
{
    thr_arg_t *a = arg;
    size_t n = 1 * MIB + 333;
    uint8_t *h, *back, *d;
    if (mma_host_alloc(a->c, n, (void **)&h) || mma_host_alloc(a->c, n, (void **)&back) ||
        mma_device_alloc(a->c, a->gpu, n, (void **)&d))
        return NULL;
    fill_random(h, n, (uint64_t)a->gpu + 99);
    a->ok = 1;
    for (int i = 0; i < 8 && a->ok; i++) {
        size_t off = (size_t)i * 4099, len = n - off;
        memset(back, 0, n);
        a->ok = mma_memcpy(a->c, d + off, h + off, len) == MMA_OK && mma_memcpy(a->c, back, d, n) == MMA_OK &&
                memcmp(back + off, h + off, len) == 0;
    }
    a->ok = a->ok && mma_free(a->c, d) == MMA_OK && mma_free(a->c, back) == MMA_OK && mma_free(a->c, h) == MMA_OK;
    return NULL;
}

START_TEST(one_client_many_threads)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    pthread_t th[4];
    thr_arg_t args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thr_arg_t){c, i, 0};
        ck_assert_int_eq(pthread_create(&th[i], NULL, thread_copies, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        ck_assert_msg(args[i].ok, "thread %d failed", i);
    }
    mma_disconnect(c);
    mmad_stop_clean(&d);
}
END_TEST

/* ======================================================================
 * b-d. raw protocol
 * ==================================================================== */

static uint32_t raw_register(int fd, int device, int gpu, uint64_t size, int memfd, int want_status,
                             const char *want_text)
{
    Mma__RegisterHost rh = MMA__REGISTER_HOST__INIT;
    Mma__RegisterDevice rd = MMA__REGISTER_DEVICE__INIT;
    Mma__Request req = MMA__REQUEST__INIT;
    if (device) {
        req.type = MMA__REQ_TYPE__REGISTER_DEVICE;
        rd.gpu = (uint32_t)gpu;
        rd.size = size;
        req.register_device = &rd;
    } else {
        req.type = MMA__REQ_TYPE__REGISTER_HOST;
        rh.size = size;
        req.register_host = &rh;
    }
    Mma__Response *r = raw_call(fd, &req, &memfd, memfd >= 0 ? 1 : 0, NULL);
    ck_assert_ptr_nonnull(r);
    ck_assert_uint_eq(r->id, req.id);
    ck_assert_msg(r->status == want_status, "register: got %s (%s), wanted %s", mma_status_name(r->status),
                  r->error ? r->error : "", mma_status_name(want_status));
    if (want_text)
        ck_assert_msg(r->error && strstr(r->error, want_text), "error '%s' lacks '%s'", r->error ? r->error : "",
                      want_text);
    uint32_t id = r->register_ ? r->register_->region_id : 0;
    if (want_status == MMA_OK)
        ck_assert_uint_gt(id, 0);
    mma__response__free_unpacked(r, NULL);
    return id;
}

static void raw_send_copy(int fd, uint32_t slot, uint64_t seq, uint32_t dst, uint64_t doff, uint32_t src,
                          uint64_t soff, uint64_t len)
{
    Mma__Segment sg = MMA__SEGMENT__INIT, *sp = &sg;
    sg.dst_region = dst;
    sg.dst_offset = doff;
    sg.src_region = src;
    sg.src_offset = soff;
    sg.length = len;
    Mma__Copy cp = MMA__COPY__INIT;
    cp.slot = slot;
    cp.seq = seq;
    cp.n_segments = 1;
    cp.segments = &sp;
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__COPY;
    req.has_id = 1;
    req.id = seq + 500000;
    req.copy = &cp;
    ck_assert_int_eq(mma_wire_send(fd, &req.base, NULL, 0), MMA_OK);
}

/* UNREGISTER region id: the response's status (fails the test without one). */
static int raw_unregister(int fd, uint32_t id)
{
    Mma__Unregister u = MMA__UNREGISTER__INIT;
    u.region_id = id;
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__UNREGISTER;
    req.unregister = &u;
    Mma__Response *r = raw_call(fd, &req, NULL, 0, NULL);
    ck_assert_ptr_nonnull(r);
    int st = r->status;
    mma__response__free_unpacked(r, NULL);
    return st;
}

/* The error response to a refused COPY. */
static void expect_copy_error(int fd, uint64_t seq, int want, const char *want_text)
{
    int eof = 0;
    Mma__Response *r = raw_recv(fd, 10.0, &eof);
    ck_assert_msg(r, "no response to a bad COPY (eof %d)", eof);
    ck_assert_int_eq(r->type, MMA__REQ_TYPE__COPY);
    ck_assert(r->has_id && r->id == seq + 500000);
    ck_assert_msg(r->status == want, "got %s (%s), wanted %s", mma_status_name(r->status), r->error ? r->error : "",
                  mma_status_name(want));
    ck_assert_msg(r->error && strstr(r->error, want_text), "error '%s' lacks '%s'", r->error ? r->error : "(none)",
                  want_text);
    mma__response__free_unpacked(r, NULL);
}

typedef struct {
    mma_flag_slot_t *slot;
    uint64_t seq;
} flag_wait_t;

static int flag_done(void *arg)
{
    flag_wait_t *w = arg;
    return mma_flag_read(&w->slot->done) >= w->seq;
}

/* Nothing more is waiting on the socket (a successful COPY gets no reply). */
static void expect_silence(int fd)
{
    Mma__Response *r = raw_recv(fd, 0.05, NULL);
    ck_assert_msg(!r, "unexpected response: %s %s", r ? mma_status_name(r->status) : "", r && r->error ? r->error : "");
}

START_TEST(daemon_side_validation)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    int fd = raw_connect(d.sock);
    ck_assert_int_ge(fd, 0);
    enum { NSLOTS = 8, SZ = 65536 };
    void *fv = NULL;
    Mma__Response *r = raw_hello(fd, MMA_API_VERSION, NSLOTS, &fv);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->status, MMA_OK);
    ck_assert_ptr_nonnull(r->hello);
    ck_assert_str_eq(r->hello->backend, "sim");
    ck_assert(r->hello->simulated && r->hello->gpu_count == NGPU);
    ck_assert_uint_eq(r->hello->api_version, MMA_API_VERSION);
    mma__response__free_unpacked(r, NULL);
    mma_flag_slot_t *fl = fv;

    int hfd, dfd, dfd2;
    uint8_t *hm = memfd_map(SZ, &hfd), *dm = memfd_map(SZ, &dfd);
    fill_random(hm, SZ, 4242);
    memset(dm, 0xab, SZ);
    uint32_t hid = raw_register(fd, 0, -1, SZ, hfd, MMA_OK, NULL);
    uint32_t did = raw_register(fd, 1, 1, SZ, dfd, MMA_OK, NULL);
    ck_assert_uint_ne(hid, did);

    /* dst_offset + length past the device region: refused, the flag slot
     * says so (a CUDA stream waiting on it would move on), and the reply
     * names the offset. */
    raw_send_copy(fd, 3, 7, did, SZ - 100, hid, 0, 200);
    expect_copy_error(fd, 7, MMA_ERR_RANGE, "65436");
    ck_assert_uint_eq(mma_flag_read(&fl[3].done), 7);
    ck_assert_int_eq(atomic_load(&fl[3].status), MMA_ERR_RANGE);
    /* source offset that wraps around 2^64 */
    raw_send_copy(fd, 2, 8, did, 0, hid, UINT64_MAX - 5, 100);
    expect_copy_error(fd, 8, MMA_ERR_RANGE, "18446744073709551610");
    ck_assert_uint_eq(mma_flag_read(&fl[2].done), 8);
    ck_assert_int_eq(atomic_load(&fl[2].status), MMA_ERR_RANGE);
    /* region ids the client never registered */
    raw_send_copy(fd, 1, 9, 4242, 0, hid, 0, 1);
    expect_copy_error(fd, 9, MMA_ERR_NOT_REGISTERED, "4242");
    ck_assert_int_eq(atomic_load(&fl[1].status), MMA_ERR_NOT_REGISTERED);
    /* host -> host */
    raw_send_copy(fd, 1, 10, hid, 0, hid, 100, 1);
    expect_copy_error(fd, 10, MMA_ERR_DIRECTION, "host");
    /* a slot outside the flag page: refused, nothing written anywhere */
    raw_send_copy(fd, NSLOTS, 11, did, 0, hid, 0, 1);
    expect_copy_error(fd, 11, MMA_ERR_INVAL, "slot 8");
    /* zero length */
    raw_send_copy(fd, 0, 12, did, 0, hid, 0, 0);
    expect_copy_error(fd, 12, MMA_ERR_INVAL, "length is 0");
    /* The device region is untouched by all of that. */
    for (size_t i = 0; i < SZ; i++)
        ck_assert_msg(dm[i] == 0xab, "device byte %zu changed by a refused copy", i);

    /* A good copy: it waits for `reached`, then lands, then `done`. */
    raw_send_copy(fd, 4, 20, did, 1000, hid, 3, 5000);
    expect_silence(fd); /* also gives the engine time it must not use: */
    ck_assert_uint_eq(mma_flag_read(&fl[4].done), 0);
    ck_assert_int_eq(dm[1000], 0xab);
    atomic_store(&fl[4].reached, 20);
    flag_wait_t w = {&fl[4], 20};
    ck_assert_msg(wait_until(flag_done, &w, 10.0), "copy never completed");
    ck_assert_int_eq(atomic_load(&fl[4].status), MMA_OK);
    ck_assert_mem_eq(dm + 1000, hm + 3, 5000);
    for (size_t i = 0; i < SZ; i++)
        if (i < 1000 || i >= 6000)
            ck_assert_msg(dm[i] == 0xab, "byte %zu outside the copy changed", i);
    /* ... and a copy ending on the region's last byte is fine. */
    atomic_store(&fl[5].reached, 21);
    raw_send_copy(fd, 5, 21, hid, 0, did, SZ - 4096, 4096);
    w = (flag_wait_t){&fl[5], 21};
    ck_assert(wait_until(flag_done, &w, 10.0));
    ck_assert_int_eq(atomic_load(&fl[5].status), MMA_OK);
    ck_assert_mem_eq(hm, dm + SZ - 4096, 4096);
    expect_silence(fd);

    /* Registration refusals. */
    uint8_t *dm2 = memfd_map(4096, &dfd2);
    (void)dm2;
    raw_register(fd, 1, 9, 4096, dfd2, MMA_ERR_NO_GPU, "gpu 9");
    raw_register(fd, 0, -1, 8192, dfd2, MMA_ERR_INVAL, NULL); /* memfd smaller than the size */
    raw_register(fd, 0, -1, 4096, -1, MMA_ERR_INVAL, "memfd");  /* no fd */
    raw_register(fd, 1, 0, 4096, -1, MMA_ERR_INVAL, NULL);
    /* Unregister: once OK, then unknown; copies to it are refused after. */
    ck_assert_int_eq(raw_unregister(fd, did), MMA_OK);
    ck_assert_int_eq(raw_unregister(fd, did), MMA_ERR_NOT_REGISTERED);
    raw_send_copy(fd, 6, 30, did, 0, hid, 0, 1);
    expect_copy_error(fd, 30, MMA_ERR_NOT_REGISTERED, "not registered");

    /* The daemon still serves everyone: this connection and a new client. */
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__STATUS;
    r = raw_call(fd, &req, NULL, 0, NULL);
    ck_assert(r && r->status == MMA_OK && r->status_reply);
    ck_assert_uint_eq(r->status_reply->jobs_done, 2);
    mma__response__free_unpacked(r, NULL);
    quick_roundtrip(d.sock, 1, 3 * MIB + 1);

    munmap(hm, SZ);
    munmap(dm, SZ);
    munmap(dm2, 4096);
    munmap(fv, NSLOTS * sizeof(mma_flag_slot_t));
    close(hfd);
    close(dfd);
    close(dfd2);
    close(fd);
    mmad_stop_clean(&d);
}
END_TEST

/* mmad maps each client's flag page and region memfds. A memfd that is not
 * sealed against shrinking could be cut short later under that mapping, and
 * mmad's next touch of the lost pages (completing a slot, reading the ring,
 * a chunk's copy) would kill it with SIGBUS; the socket is open to every
 * local user. So every such memfd must carry F_SEAL_SHRINK: one without it
 * is refused in words, nothing of it is mapped, and mmad goes on serving
 * this client and others. */
START_TEST(unsealed_memfds_refused)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    int fd = raw_connect(d.sock);
    ck_assert_int_ge(fd, 0);
    enum { NSLOTS = 8, SZ = 65536 };

    /* HELLO with an unsealed flag page. */
    int pfd;
    void *page = memfd_map_unsealed(NSLOTS * sizeof(mma_flag_slot_t), &pfd);
    Mma__Hello h = MMA__HELLO__INIT;
    h.api_version = MMA_API_VERSION;
    h.has_flag_slots = 1;
    h.flag_slots = NSLOTS;
    h.name = "unsealed";
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__HELLO;
    req.hello = &h;
    Mma__Response *r = raw_call(fd, &req, &pfd, 1, NULL);
    ck_assert_ptr_nonnull(r);
    ck_assert_msg(r->status == MMA_ERR_INVAL, "an unsealed flag page got %s", mma_status_name(r->status));
    ck_assert_ptr_null(r->hello);
    ck_assert_msg(r->error && strstr(r->error, "memfd must be sealed against shrinking (F_SEAL_SHRINK)"),
                  "error '%s' does not say why", r->error ? r->error : "");
    mma__response__free_unpacked(r, NULL);
    munmap(page, NSLOTS * sizeof(mma_flag_slot_t));
    close(pfd);

    /* The same connection shakes hands with a sealed page. */
    void *fv = NULL;
    r = raw_hello(fd, MMA_API_VERSION, NSLOTS, &fv);
    ck_assert(r && r->status == MMA_OK && r->hello);
    mma__response__free_unpacked(r, NULL);
    mma_flag_slot_t *fl = fv;

    /* Regions: host, and a simulated GPU's, unsealed; and one made without
     * MFD_ALLOW_SEALING (sealed against more seals, not against shrinking). */
    int ufd, ufd2;
    void *um = memfd_map_unsealed(SZ, &ufd), *um2 = memfd_map_unsealed(SZ, &ufd2);
    raw_register(fd, 0, -1, SZ, ufd, MMA_ERR_INVAL, "memfd must be sealed against shrinking (F_SEAL_SHRINK)");
    raw_register(fd, 1, 2, SZ, ufd2, MMA_ERR_INVAL, "F_SEAL_SHRINK");
    int nfd = memfd_create("mma-test", MFD_CLOEXEC);
    ck_assert_int_ge(nfd, 0);
    ck_assert_int_eq(ftruncate(nfd, SZ), 0);
    raw_register(fd, 0, -1, SZ, nfd, MMA_ERR_INVAL, "F_SEAL_SHRINK");
    /* A hugetlb memfd, sealed: a hole punched in it later (the seal allows
     * that) with no free huge page to fill it would be SIGBUS in mmad. */
    int hgfd = memfd_create("mma-test", MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_HUGETLB);
    if (hgfd >= 0 && ftruncate(hgfd, 2 << 20) == 0 && fcntl(hgfd, F_ADD_SEALS, F_SEAL_SHRINK) == 0)
        raw_register(fd, 0, -1, SZ, hgfd, MMA_ERR_INVAL, "not hugetlb");
    else
        printf("unsealed_memfds_refused: no sealed hugetlb memfd on this kernel (%s); that case not tried\n",
               strerror(errno));
    if (hgfd >= 0)
        close(hgfd);
    /* Nothing of them is mapped in mmad: only the sealed flag page. */
    ck_assert_int_eq(count_maps(d.pid, "/memfd:mma-test"), 1);
    /* What mmad guards against: an unsealed memfd shrinks at will. */
    ck_assert_int_eq(ftruncate(ufd, 0), 0);
    munmap(um, SZ);
    munmap(um2, SZ);
    close(ufd);
    close(ufd2);
    close(nfd);

    /* Sealed regions are taken, and a copy through them lands. */
    int hfd, dfd;
    uint8_t *hm = memfd_map(SZ, &hfd), *dm = memfd_map(SZ, &dfd);
    ck_assert_int_ne(ftruncate(hfd, 0), 0); /* sealed: it cannot shrink */
    fill_random(hm, SZ, 99);
    memset(dm, 0, SZ);
    uint32_t hid = raw_register(fd, 0, -1, SZ, hfd, MMA_OK, NULL);
    uint32_t did = raw_register(fd, 1, 2, SZ, dfd, MMA_OK, NULL);
    ck_assert_int_eq(count_maps(d.pid, "/memfd:mma-test"), 3);
    atomic_store(&fl[0].reached, 1);
    raw_send_copy(fd, 0, 1, did, 0, hid, 0, SZ);
    flag_wait_t w = {&fl[0], 1};
    ck_assert_msg(wait_until(flag_done, &w, 10.0), "copy never completed");
    ck_assert_int_eq(atomic_load(&fl[0].status), MMA_OK);
    ck_assert_mem_eq(dm, hm, SZ);

    /* Other clients are served (libmma seals its memfds). */
    quick_roundtrip(d.sock, 1, MIB + 3);
    munmap(hm, SZ);
    munmap(dm, SZ);
    munmap(fv, NSLOTS * sizeof(mma_flag_slot_t));
    close(hfd);
    close(dfd);
    close(fd);
    mmad_stop_clean(&d);
}
END_TEST

/* ---- the submission ring (flagpage.h) ---- */

static void raw_kick(int fd)
{
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__KICK;
    ck_assert_int_eq(mma_wire_send(fd, &req.base, NULL, 0), MMA_OK);
}

/* Post one copy as libmma does; with kick, send a KICK where mmad does not
 * poll the ring. */
static void ring_post(int fd, mma_sq_t *q, int kick, uint32_t slot, uint64_t seq, uint32_t dst, uint64_t doff,
                      uint32_t src, uint64_t soff, uint64_t len)
{
    uint64_t t = atomic_load(&q->tail);
    mma_sq_entry_t *e = &q->e[t % MMA_SQ_ENTRIES];
    e->seq = seq;
    e->slot = slot;
    e->dst_region = dst;
    e->dst_offset = doff;
    e->src_region = src;
    e->src_offset = soff;
    e->length = len;
    e->flags = 0;
    e->max_paths = 0;
    e->sent_ns = 0;
    atomic_store_explicit(&e->pos, t + 1, memory_order_release);
    atomic_store(&q->tail, t + 1);
    if (kick && !atomic_load(&q->polling))
        raw_kick(fd);
}

START_TEST(submission_ring)
{
    /* No polling (--loop-spin-us=0): mmad reads the ring when a message
     * wakes it, which makes the ordering below deterministic. */
    static const char *const box[] = {"--sim-scale=0.25", "--chunk-size=1M", "--loop-spin-us=0", NULL};
    mmad_proc_t d;
    mmad_start(&d, box);
    int fd = raw_connect(d.sock);
    ck_assert_int_ge(fd, 0);
    enum { NSLOTS = 8, SZ = 65536 };
    void *fv = NULL;
    Mma__Response *r = raw_hello_ring(fd, NSLOTS, MMA_SQ_ENTRIES, &fv);
    ck_assert(r && r->status == MMA_OK && r->hello);
    ck_assert_msg(r->hello->has_sq && r->hello->sq, "mmad did not take the ring");
    mma__response__free_unpacked(r, NULL);
    mma_flag_slot_t *fl = fv;
    mma_sq_t *q = (mma_sq_t *)(void *)(fl + NSLOTS);

    int hfd, dfd;
    uint8_t *hm = memfd_map(SZ, &hfd), *dm = memfd_map(SZ, &dfd);
    fill_random(hm, SZ, 777);
    memset(dm, 0xcd, SZ);
    uint32_t hid = raw_register(fd, 0, -1, SZ, hfd, MMA_OK, NULL);
    uint32_t did = raw_register(fd, 1, 2, SZ, dfd, MMA_OK, NULL);

    /* A copy through the ring lands, its slot says OK, and no message
     * comes back. */
    atomic_store(&fl[0].reached, 1);
    ring_post(fd, q, 1, 0, 1, did, 100, hid, 7, 5000);
    flag_wait_t w = {&fl[0], 1};
    ck_assert_msg(wait_until(flag_done, &w, 10.0), "ring copy never completed");
    ck_assert_int_eq(atomic_load(&fl[0].status), MMA_OK);
    ck_assert_mem_eq(dm + 100, hm + 7, 5000);
    ck_assert_int_eq(dm[99], 0xcd);
    ck_assert_int_eq(dm[5100], 0xcd);
    ck_assert_uint_eq(atomic_load(&q->head), 1);
    expect_silence(fd);

    /* A refused one: the slot carries the status, and a response without
     * an id names the cause. */
    atomic_store(&fl[1].reached, 2);
    ring_post(fd, q, 1, 1, 2, 4242, 0, hid, 0, 1);
    w = (flag_wait_t){&fl[1], 2};
    ck_assert(wait_until(flag_done, &w, 10.0));
    ck_assert_int_eq(atomic_load(&fl[1].status), MMA_ERR_NOT_REGISTERED);
    int eof = 0;
    r = raw_recv(fd, 10.0, &eof);
    ck_assert_msg(r, "no response to a refused ring copy");
    ck_assert_int_eq(r->status, MMA_ERR_NOT_REGISTERED);
    ck_assert(!r->has_id);
    ck_assert_msg(r->error && strstr(r->error, "4242"), "error '%s'", r->error ? r->error : "");
    mma__response__free_unpacked(r, NULL);

    /* Order: a copy posted with no KICK, then UNREGISTER of its source as a
     * message. mmad reads the ring before the message, so the copy comes
     * first and lands (its job holds the region); the other way round it
     * would be refused as not registered. */
    fill_random(hm, SZ, 778);
    atomic_store(&fl[2].reached, 3);
    ring_post(fd, q, 0, 2, 3, did, 0, hid, 0, SZ);
    ck_assert_int_eq(raw_unregister(fd, hid), MMA_OK);
    w = (flag_wait_t){&fl[2], 3};
    ck_assert(wait_until(flag_done, &w, 10.0));
    ck_assert_msg(atomic_load(&fl[2].status) == MMA_OK, "copy posted before UNREGISTER: %s",
                  mma_status_name((int)atomic_load(&fl[2].status)));
    ck_assert_mem_eq(dm, hm, SZ);
    ck_assert_uint_eq(atomic_load(&q->head), 3);

    /* A hello offering a ring of another size gets none. */
    int fd2 = raw_connect(d.sock);
    void *fv2 = NULL;
    r = raw_hello_ring(fd2, NSLOTS, MMA_SQ_ENTRIES / 2, &fv2);
    ck_assert(r && r->status == MMA_OK && r->hello);
    ck_assert(r->hello->has_sq && !r->hello->sq);
    mma__response__free_unpacked(r, NULL);
    close(fd2);
    munmap(fv2, raw_ring_page_len(NSLOTS));

    /* A ring whose tail runs past its room closes that client only. */
    atomic_store(&q->tail, atomic_load(&q->head) + MMA_SQ_ENTRIES + 5);
    raw_kick(fd);
    r = raw_recv(fd, 10.0, &eof);
    ck_assert_msg(!r && eof, "a broken ring did not close the client");
    quick_roundtrip(d.sock, 3, 2 * MIB + 3);

    munmap(hm, SZ);
    munmap(dm, SZ);
    munmap(fv, raw_ring_page_len(NSLOTS));
    close(hfd);
    close(dfd);
    close(fd);
    mmad_stop_clean(&d);
}
END_TEST

typedef struct {
    const mmad_proc_t *d;
    char want[96];
    char *out;
} clients_line_t;

/* `mmactl clients` has this process's line with w->want in it. */
static int clients_line(void *arg)
{
    clients_line_t *w = arg;
    int rc;
    free(w->out);
    w->out = mmactl(w->d, "clients", 0, &rc);
    char needle[32];
    snprintf(needle, sizeof needle, "pid=%d,", (int)getpid());
    const char *mine = rc == 0 && w->out ? strstr(w->out, needle) : NULL;
    const char *eol = mine ? strchr(mine, '\n') : NULL;
    const char *hit = mine ? strstr(mine, w->want) : NULL;
    return hit && (!eol || hit < eol);
}

/* n copies of `each` bytes in flight at once through libmma, then waited
 * for and checked; `want` is what `mmactl clients` must then show. */
static void ring_burst(const mmad_proc_t *d, int n, size_t each, int stop, const char *want)
{
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d->sock, &c), MMA_OK);
    uint8_t *h, *dv, *back;
    size_t total = (size_t)n * each;
    ck_assert_int_eq(mma_host_alloc(c, total, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_host_alloc(c, total, (void **)&back), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 1, total, (void **)&dv), MMA_OK);
    fill_random(h, total, (uint64_t)n * 7 + each);
    mma_copy_t *t = calloc((size_t)n, sizeof *t);
    ck_assert_ptr_nonnull(t);
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
    if (stop) {
        /* mmad frozen: nothing leaves the ring, which fills. */
        ck_assert_int_eq(kill(d->pid, SIGSTOP), 0);
        int st;
        ck_assert_int_eq(waitpid(d->pid, &st, WUNTRACED), d->pid);
        ck_assert(WIFSTOPPED(st));
    }
    for (int i = 0; i < n; i++) {
        mma_segment_t sg = {dv + (size_t)i * each, h + (size_t)i * each, each};
        ck_assert_int_eq(mma_memcpy_sg_async(c, &sg, 1, NULL, &o, &t[i]), MMA_OK);
    }
    if (stop)
        ck_assert_int_eq(kill(d->pid, SIGCONT), 0);
    for (int i = 0; i < n; i++)
        ck_assert_int_eq(mma_wait(c, t[i]), MMA_OK);
    copy_verified(c, back, dv, total, NULL); /* by message or ring, one copy back */
    ck_assert_mem_eq(back, h, total);
    clients_line_t cw = {.d = d};
    snprintf(cw.want, sizeof cw.want, "%s", want);
    ck_assert_msg(wait_until(clients_line, &cw, 10.0), "clients lacks '%s':\n%s", want, cw.out ? cw.out : "");
    free(cw.out);
    free(t);
    ck_assert_int_eq(mma_free(c, dv), MMA_OK);
    ck_assert_int_eq(mma_free(c, back), MMA_OK);
    ck_assert_int_eq(mma_free(c, h), MMA_OK);
    mma_disconnect(c);
}

static int ring_polling(void *arg)
{
    return atomic_load((_Atomic uint32_t *)arg) != 0;
}

START_TEST(kick_wakes_mmad)
{
    /* A KICK with nothing in the ring (mma_prewarm, or a copy that went
     * native while mmad slept) makes mmad's socket thread poll the ring for
     * --wake-spin-us, even where it polls after no copy request
     * (--loop-spin-us=0). HELLO alone does not. */
    static const char *const box[] = {"--sim-scale=0.25", "--loop-spin-us=0", "--wake-spin-us=500000", NULL};
    mmad_proc_t d;
    mmad_start(&d, box);
    int fd = raw_connect(d.sock);
    ck_assert_int_ge(fd, 0);
    void *fv = NULL;
    Mma__Response *r = raw_hello_ring(fd, 4, MMA_SQ_ENTRIES, &fv);
    ck_assert(r && r->status == MMA_OK && r->hello && r->hello->sq);
    ck_assert_msg(r->hello->has_cold_bypass && r->hello->cold_bypass == 0,
                  "the simulated box has no native copies to fall back on");
    mma__response__free_unpacked(r, NULL);
    mma_sq_t *q = (mma_sq_t *)(void *)((mma_flag_slot_t *)fv + 4);
    usleep(200000);
    ck_assert_uint_eq(atomic_load(&q->polling), 0);
    raw_kick(fd);
    ck_assert_msg(wait_until(ring_polling, &q->polling, 5.0), "a KICK did not make mmad poll");
    ck_assert_uint_eq(atomic_load(&q->kicks_read), 1);
    close(fd);

    /* mma_prewarm: fine while mmad runs, refused once it is gone. */
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_prewarm(NULL), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    mma_info_t info;
    ck_assert_int_eq(mma_get_info(c, &info), MMA_OK);
    ck_assert_uint_eq(info.cold_bypass, 0); /* the simulated box: nothing to run natively */
    ck_assert_uint_eq(info.cold_small, 0);
    ck_assert_uint_eq(info.relays_warm_us, 0);
    ck_assert_int_eq(mma_prewarm(c), MMA_OK);
    ck_assert_int_eq(mma_prewarm(c), MMA_OK); /* mmad polls now: no message */
    ck_assert_int_eq(mmad_stop(&d), 0);
    int rc = MMA_OK;
    for (int i = 0; i < 100 && rc == MMA_OK; i++) {
        rc = mma_prewarm(c);
        usleep(10000);
    }
    ck_assert_int_eq(rc, MMA_ERR_DISCONNECTED);
    mma_disconnect(c);
}
END_TEST

START_TEST(submission_ring_full_and_off)
{
    /* Beyond the ring, 5 messages: a stopped mmad's socket queues only ~10
     * (net.unix.max_dgram_qlen) before a sender blocks; so would a KICK per
     * post, which is why a client sends none while one is unread. */
    enum { N = MMA_SQ_ENTRIES + 5, EACH = 4096 };
    char want[96];
    /* A full ring: the first MMA_SQ_ENTRIES copies wait in it while mmad is
     * stopped, the rest go as messages; all land. Then the copy back (one
     * more through the ring). */
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    snprintf(want, sizeof want, "copies=%d,bytes=%d,ring_copies=%u\n", N + 1, 2 * N * EACH, MMA_SQ_ENTRIES + 1);
    ring_burst(&d, N, EACH, 1, want);
    /* MMA_NO_RING=1: this client offers none; every copy is a message. */
    setenv("MMA_NO_RING", "1", 1);
    snprintf(want, sizeof want, "copies=%d,bytes=%d,ring_copies=0\n", 41, 2 * 40 * EACH);
    ring_burst(&d, 40, EACH, 0, want);
    unsetenv("MMA_NO_RING");
    mmad_stop_clean(&d);
    /* --submit-ring=0: mmad takes no ring; copies go as messages. */
    static const char *const off[] = {"--sim-scale=0.25", "--chunk-size=1M", "--submit-ring=0", NULL};
    mmad_start(&d, off);
    ring_burst(&d, 40, EACH, 0, want);
    mmad_stop_clean(&d);
}
END_TEST

/* ---- a fake mmad: one connection served by a thread, to see what libmma
 * sends and how it takes answers mmad would not give ---- */

typedef struct fake_mmad {
    char sock[108];
    int lfd;
    pthread_t thread;
    int omit_region_id; /* answer REGISTER_* with MMA_OK but no RegisterReply */
    int stall;          /* while set (__atomic), read nothing: the client's socket fills */
    int refuse_unregister; /* answer the next UNREGISTER with this status (__atomic; 0: accept it) */
    /* what it saw (read once the thread has ended) */
    int flags_seals, host_seals, dev_seals; /* F_GET_SEALS of the flag page and the last host and device
                                             * memfds (-1: none came) */
    int registers, unregisters;
} fake_mmad_t;

static void *fake_mmad_main(void *arg)
{
    fake_mmad_t *f = arg;
    int fd = accept(f->lfd, NULL, NULL);
    uint8_t *buf = malloc(MMA_WIRE_MAX_MSG);
    for (;;) {
        size_t len;
        int fds[MMA_WIRE_MAX_FDS], nfds = 0;
        while (__atomic_load_n(&f->stall, __ATOMIC_ACQUIRE))
            usleep(1000);
        if (fd < 0 || !buf || mma_wire_recv(fd, buf, MMA_WIRE_MAX_MSG, &len, fds, &nfds) != MMA_OK)
            break;
        int seals = nfds == 1 ? fcntl(fds[0], F_GET_SEALS) : -1;
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
        Mma__Request *req = mma__request__unpack(NULL, len, buf);
        if (!req)
            break;
        Mma__Response resp = MMA__RESPONSE__INIT;
        resp.type = req->type;
        resp.has_id = req->has_id;
        resp.id = req->id;
        resp.status = MMA_OK;
        Mma__HelloReply hr = MMA__HELLO_REPLY__INIT;
        Mma__RegisterReply rr = MMA__REGISTER_REPLY__INIT;
        int answer = 1;
        switch (req->type) {
        case MMA__REQ_TYPE__HELLO: /* a simulated box of one GPU, no ring */
            f->flags_seals = seals;
            hr.daemon_version = 1;
            hr.api_version = MMA_API_VERSION;
            hr.backend = "fake";
            hr.has_gpu_count = hr.has_simulated = 1;
            hr.gpu_count = 1;
            hr.simulated = 1;
            resp.hello = &hr;
            break;
        case MMA__REQ_TYPE__REGISTER_HOST:
        case MMA__REQ_TYPE__REGISTER_DEVICE:
            *(req->type == MMA__REQ_TYPE__REGISTER_HOST ? &f->host_seals : &f->dev_seals) = seals;
            rr.region_id = (uint32_t)++f->registers;
            resp.register_ = f->omit_region_id ? NULL : &rr;
            break;
        case MMA__REQ_TYPE__UNREGISTER:
            f->unregisters++;
            resp.status = __atomic_exchange_n(&f->refuse_unregister, 0, __ATOMIC_ACQ_REL);
            resp.error = resp.status != MMA_OK ? "the fake mmad refuses" : NULL;
            break;
        default:
            answer = req->type != MMA__REQ_TYPE__COPY && req->type != MMA__REQ_TYPE__KICK;
            break;
        }
        mma__request__free_unpacked(req, NULL);
        if (answer && mma_wire_send(fd, &resp.base, NULL, 0) != MMA_OK)
            break;
    }
    free(buf);
    if (fd >= 0)
        close(fd);
    return NULL;
}

static void fake_mmad_start(fake_mmad_t *f)
{
    f->flags_seals = f->host_seals = f->dev_seals = -1;
    snprintf(f->sock, sizeof f->sock, "%s/fake.sock", scratch_mkdtemp("fake"));
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", f->sock);
    f->lfd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(f->lfd, 0);
    ck_assert_int_eq(bind(f->lfd, (struct sockaddr *)&a, sizeof a), 0);
    ck_assert_int_eq(listen(f->lfd, 1), 0);
    ck_assert_int_eq(pthread_create(&f->thread, NULL, fake_mmad_main, f), 0);
}

/* After the client disconnected: the thread sees EOF and ends. */
static void fake_mmad_join(fake_mmad_t *f)
{
    ck_assert_int_eq(pthread_join(f->thread, NULL), 0);
    close(f->lfd);
    unlink(f->sock);
}

/* Make the client's socket non-blocking while the fake mmad reads nothing,
 * and send KICKs (mma_prewarm: the fake offers no ring, so each call sends
 * one) until the socket is full: a send that fails without the connection
 * being lost. Returns the descriptor's flags, to restore with unstall(). */
static int stall_until_full(fake_mmad_t *f, mma_client_t *c, int fd)
{
    int fl = fcntl(fd, F_GETFL);
    ck_assert_int_ge(fl, 0);
    __atomic_store_n(&f->stall, 1, __ATOMIC_RELEASE);
    ck_assert_int_eq(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
    int rc = MMA_OK, n = 0;
    while (rc == MMA_OK && n < 1000000) {
        rc = mma_prewarm(c);
        n++;
    }
    ck_assert_msg(rc == MMA_ERR_IO, "mma_prewarm on a full socket: %s after %d calls (want MMA_ERR_IO)",
                  mma_status_name(rc), n);
    ck_assert_int_gt(n, 1);
    return fl;
}

static void unstall(fake_mmad_t *f, int fd, int fl)
{
    ck_assert_int_eq(fcntl(fd, F_SETFL, fl), 0);
    __atomic_store_n(&f->stall, 0, __ATOMIC_RELEASE);
}

START_TEST(prewarm_send_error)
{
    /* A KICK whose send fails without the connection being lost (a full
     * non-blocking socket: EAGAIN) is mma_prewarm's MMA_ERR_IO, not
     * MMA_ERR_DISCONNECTED, and the client stays up: once mmad reads
     * again, the same client prewarms and registers. */
    fake_mmad_t f = {0};
    fake_mmad_start(&f);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(f.sock, &c), MMA_OK);
    int fd = client_socket_fd(f.sock);
    ck_assert_int_ge(fd, 0);
    int fl = stall_until_full(&f, c, fd);
    ck_assert_int_eq(mma_prewarm(c), MMA_ERR_IO);
    unstall(&f, fd, fl);
    ck_assert_int_eq(mma_prewarm(c), MMA_OK);
    void *h;
    ck_assert_int_eq(mma_host_alloc(c, 4096, &h), MMA_OK); /* a request and its answer */
    ck_assert_int_eq(mma_free(c, h), MMA_OK);
    mma_disconnect(c);
    fake_mmad_join(&f);
    ck_assert_int_eq(f.registers, 1);
    ck_assert_int_eq(f.unregisters, 1);
}
END_TEST

START_TEST(free_not_unregistered)
{
    /* mma_free frees nothing that mmad did not let go: where its UNREGISTER
     * fails (mmad refuses it, or the request cannot be sent and the
     * connection is still up) the memory stays mapped and registered, and
     * mma_free again frees it. An mmad that says it never had the region
     * holds nothing: that memory is freed. */
    fake_mmad_t f = {0};
    fake_mmad_start(&f);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(f.sock, &c), MMA_OK);
    uint8_t *h, *dv, *h2;
    ck_assert_int_eq(mma_host_alloc(c, 8192, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 0, 8192, (void **)&dv), MMA_OK);
    ck_assert_int_eq(mma_host_alloc(c, 4096, (void **)&h2), MMA_OK);
    memset(h, 0x5A, 8192);
    memset(dv, 0xA5, 8192);

    __atomic_store_n(&f.refuse_unregister, MMA_ERR_BACKEND, __ATOMIC_RELEASE);
    ck_assert_int_eq(mma_free(c, h), MMA_ERR_BACKEND);
    for (size_t i = 0; i < 8192; i += 512)
        ck_assert_uint_eq(h[i], 0x5A); /* still mapped */
    ck_assert_int_eq(mma_free(c, h), MMA_OK);

    int fd = client_socket_fd(f.sock);
    ck_assert_int_ge(fd, 0);
    int fl = stall_until_full(&f, c, fd);
    ck_assert_int_eq(mma_free(c, dv), MMA_ERR_IO);
    unstall(&f, fd, fl);
    for (size_t i = 0; i < 8192; i += 512)
        ck_assert_uint_eq(dv[i], 0xA5);
    ck_assert_int_eq(mma_free(c, dv), MMA_OK);

    __atomic_store_n(&f.refuse_unregister, MMA_ERR_NOT_REGISTERED, __ATOMIC_RELEASE);
    ck_assert_int_eq(mma_free(c, h2), MMA_OK);
    ck_assert_int_eq(mma_free(c, h2), MMA_ERR_NOT_REGISTERED); /* libmma's own answer: gone here too */
    mma_disconnect(c);
    fake_mmad_join(&f);
    ck_assert_int_eq(f.registers, 3);
    ck_assert_int_eq(f.unregisters, 4); /* h twice, dv once it could be sent, h2 once */
}
END_TEST

START_TEST(register_reply_without_region)
{
    /* mmad says yes but names no region: that is a protocol error, not
     * region 0 (which names nothing mmad knows: every copy would fail). */
    fake_mmad_t f = {.omit_region_id = 1};
    fake_mmad_start(&f);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(f.sock, &c), MMA_OK);
    void *p = (void *)0x1;
    ck_assert_int_eq(mma_host_alloc(c, 4096, &p), MMA_ERR_PROTO);
    ck_assert_int_eq(mma_device_alloc(c, 0, 4096, &p), MMA_ERR_PROTO);
    ck_assert_ptr_eq(p, (void *)0x1);
    mma_disconnect(c);
    fake_mmad_join(&f);
    ck_assert_int_eq(f.registers, 2);
    ck_assert_int_eq(f.unregisters, 0); /* nothing named, nothing to give back */
}
END_TEST

START_TEST(memfds_sealed)
{
    /* Every memfd libmma hands mmad is sealed against shrinking: mmad maps
     * them, and a memfd cut short under a mapping would kill it (SIGBUS). */
    fake_mmad_t f = {0};
    fake_mmad_start(&f);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(f.sock, &c), MMA_OK);
    void *h, *dv;
    ck_assert_int_eq(mma_host_alloc(c, 5000, &h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 0, 5000, &dv), MMA_OK);
    ck_assert_int_eq(mma_free(c, h), MMA_OK);
    ck_assert_int_eq(mma_free(c, dv), MMA_OK);
    mma_disconnect(c);
    fake_mmad_join(&f);
    ck_assert_msg(f.flags_seals >= 0 && (f.flags_seals & F_SEAL_SHRINK), "flag page seals %d", f.flags_seals);
    ck_assert_msg(f.host_seals >= 0 && (f.host_seals & F_SEAL_SHRINK), "host memfd seals %d", f.host_seals);
    ck_assert_msg(f.dev_seals >= 0 && (f.dev_seals & F_SEAL_SHRINK), "device memfd seals %d", f.dev_seals);
    ck_assert_int_eq(f.registers, 2);
    ck_assert_int_eq(f.unregisters, 2);
}
END_TEST

START_TEST(client_side_range_check)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    uint8_t *h, *dv;
    ck_assert_int_eq(mma_host_alloc(c, 8192, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 2, 10000, (void **)&dv), MMA_OK);
    mma_copy_t t = 12345;
    /* Starts inside the region, runs past its (unaligned) end. */
    ck_assert_int_eq(mma_memcpy_async(c, dv + 9990, h, 11, NULL, &t), MMA_ERR_RANGE);
    ck_assert_int_eq(mma_memcpy_async(c, h, dv + 9990, 11, NULL, &t), MMA_ERR_RANGE);
    ck_assert_int_eq(mma_memcpy_async(c, dv, h + 8000, 193, NULL, &t), MMA_ERR_RANGE);
    ck_assert_uint_eq(t, 12345); /* outputs only on success */
    /* Exactly to the end is fine. */
    fill_random(h, 8192, 5);
    copy_verified(c, dv + 9990, h, 10, NULL);
    mma_disconnect(c);
    quick_roundtrip(d.sock, 0, 100000);
    mmad_stop_clean(&d);
}
END_TEST

START_TEST(version_handshake)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    int fd = raw_connect(d.sock);
    void *fv = NULL;
    Mma__Response *r = raw_hello(fd, 999, 4, &fv);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->status, MMA_ERR_VERSION);
    ck_assert_ptr_null(r->hello);
    ck_assert_msg(r->error && strstr(r->error, "999"), "error '%s' does not name the version", r->error);
    mma__response__free_unpacked(r, NULL);
    munmap(fv, 4 * sizeof(mma_flag_slot_t));
    /* Nothing but HELLO is served before a successful handshake ... */
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__STATUS;
    r = raw_call(fd, &req, NULL, 0, NULL);
    ck_assert(r && r->status == MMA_ERR_PROTO);
    ck_assert_ptr_null(r->status_reply);
    mma__response__free_unpacked(r, NULL);
    /* ... and the connection can still shake hands properly. */
    r = raw_hello(fd, MMA_API_VERSION, 4, &fv);
    ck_assert(r && r->status == MMA_OK && r->hello);
    mma__response__free_unpacked(r, NULL);
    munmap(fv, 4 * sizeof(mma_flag_slot_t));
    /* A flag page announced but not sent, or too many slots. */
    int fd2 = raw_connect(d.sock);
    Mma__Hello h = MMA__HELLO__INIT;
    h.api_version = MMA_API_VERSION;
    h.has_flag_slots = 1;
    h.flag_slots = 16;
    req = (Mma__Request)MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__HELLO;
    req.hello = &h;
    r = raw_call(fd2, &req, NULL, 0, NULL);
    ck_assert(r && r->status == MMA_ERR_INVAL);
    mma__response__free_unpacked(r, NULL);
    int mfd;
    void *small = memfd_map(4096, &mfd); /* 64 slots' worth */
    h.flag_slots = 65;
    req.has_id = 0;
    r = raw_call(fd2, &req, &mfd, 1, NULL);
    ck_assert(r && r->status == MMA_ERR_INVAL);
    mma__response__free_unpacked(r, NULL);
    h.flag_slots = MMA_FLAG_SLOTS_MAX + 1;
    req.has_id = 0;
    r = raw_call(fd2, &req, &mfd, 1, NULL);
    ck_assert(r && r->status == MMA_ERR_INVAL);
    mma__response__free_unpacked(r, NULL);
    munmap(small, 4096);
    close(mfd);
    close(fd2);
    close(fd);
    quick_roundtrip(d.sock, 3, 777777);
    mmad_stop_clean(&d);
}
END_TEST

START_TEST(unknown_and_garbage_requests)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    int fd = raw_connect(d.sock);
    Mma__Response *r = raw_hello(fd, MMA_API_VERSION, 0, NULL); /* admin: no flag page */
    ck_assert(r && r->status == MMA_OK);
    mma__response__free_unpacked(r, NULL);

    /* HELLO twice */
    r = raw_hello(fd, MMA_API_VERSION, 0, NULL);
    ck_assert(r && r->status == MMA_ERR_PROTO);
    mma__response__free_unpacked(r, NULL);
    /* bytes that are no protobuf */
    static const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    ck_assert_int_eq(raw_send_bytes(fd, junk, sizeof junk), 0);
    r = raw_recv(fd, 10.0, NULL);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->status, MMA_ERR_PROTO);
    ck_assert_int_eq(r->type, MMA__REQ_TYPE__REQ_UNKNOWN);
    ck_assert_ptr_nonnull(r->error);
    mma__response__free_unpacked(r, NULL);
    /* valid protobuf, unknown request types */
    const int types[] = {42, MMA__REQ_TYPE__REQ_UNKNOWN, 1000000};
    for (size_t i = 0; i < 3; i++) {
        Mma__Request req = MMA__REQUEST__INIT;
        req.type = (Mma__ReqType)types[i];
        r = raw_call(fd, &req, NULL, 0, NULL);
        ck_assert_msg(r, "no reply to request type %d", types[i]);
        ck_assert_int_eq(r->status, MMA_ERR_UNSUPPORTED);
        ck_assert_uint_eq(r->id, req.id);
        ck_assert_msg(r->error && strstr(r->error, "unknown request type"), "error: %s", r->error);
        mma__response__free_unpacked(r, NULL);
    }
    /* known types without their body; a COPY from a client with no flag page */
    const Mma__ReqType bodyless[] = {MMA__REQ_TYPE__COPY, MMA__REQ_TYPE__REGISTER_HOST,
                                     MMA__REQ_TYPE__REGISTER_DEVICE, MMA__REQ_TYPE__UNREGISTER};
    for (size_t i = 0; i < 4; i++) {
        Mma__Request req = MMA__REQUEST__INIT;
        req.type = bodyless[i];
        r = raw_call(fd, &req, NULL, 0, NULL);
        ck_assert(r && r->status == MMA_ERR_INVAL);
        mma__response__free_unpacked(r, NULL);
    }
    raw_send_copy(fd, 0, 1, 1, 0, 2, 0, 16);
    expect_copy_error(fd, 1, MMA_ERR_INVAL, "slot 0");
    /* After all that, the same connection still gets answers. */
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__PATHS;
    r = raw_call(fd, &req, NULL, 0, NULL);
    ck_assert(r && r->status == MMA_OK && r->paths);
    ck_assert_uint_eq(r->paths->n_paths, NGPU * NGPU * 2);
    mma__response__free_unpacked(r, NULL);

    /* A datagram larger than the daemon's receive buffer (1 MiB) is
     * refused with an answer, not a crash or a hang. Needs a send buffer
     * above the default, which only privileged users may force. */
    int big = 3 * (int)MIB;
    if (setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big) == 0) {
        size_t n = MMA_WIRE_MAX_MSG + 4096;
        uint8_t *huge = calloc(1, n);
        ck_assert_int_eq(raw_send_bytes(fd, huge, n), 0);
        free(huge);
        r = raw_recv(fd, 10.0, NULL);
        ck_assert(r && r->status == MMA_ERR_PROTO);
        ck_assert_msg(r->error && strstr(r->error, "too large"), "error: %s", r->error);
        mma__response__free_unpacked(r, NULL);
        req.has_id = 0;
        r = raw_call(fd, &req, NULL, 0, NULL);
        ck_assert(r && r->status == MMA_OK);
        mma__response__free_unpacked(r, NULL);
    } else {
        fprintf(stderr, "oversized datagram: skipped (SO_SNDBUFFORCE: %s)\n", strerror(errno));
    }

    /* An empty datagram reads as end-of-stream on SOCK_SEQPACKET: the daemon
     * may close the connection, but cleanly (an error reply or EOF). */
    ck_assert_int_eq(raw_send_bytes(fd, "", 0), 0);
    int eof = 0;
    r = raw_recv(fd, 10.0, &eof);
    ck_assert_msg(eof || (r && r->status != MMA_OK), "empty datagram: neither EOF nor an error reply");
    if (r)
        mma__response__free_unpacked(r, NULL);
    close(fd);

    /* A peer that closes without a word, and one that never says HELLO. */
    int fd3 = raw_connect(d.sock);
    int fd4 = raw_connect(d.sock);
    ck_assert_int_ge(fd3, 0);
    close(fd3);
    req = (Mma__Request)MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__CLIENTS;
    r = raw_call(fd4, &req, NULL, 0, NULL);
    ck_assert(r && r->status == MMA_ERR_PROTO && !r->clients);
    mma__response__free_unpacked(r, NULL);

    /* Everybody else is still served. */
    quick_roundtrip(d.sock, 2, 2 * MIB + 7);
    close(fd4);
    mmad_stop_clean(&d);
}
END_TEST

/* ======================================================================
 * e. lifecycle
 * ==================================================================== */

typedef struct {
    const mmad_proc_t *d;
    pid_t pid;
} gone_t;

static int client_gone(void *arg)
{
    gone_t *g = arg;
    int rc;
    char *out = mmactl(g->d, "clients", 0, &rc);
    char needle[32];
    snprintf(needle, sizeof needle, "pid=%d,", (int)g->pid);
    int gone = rc == 0 && out && !strstr(out, needle);
    free(out);
    return gone;
}

typedef struct {
    pid_t daemon;
    int want;
} maps_t;

/* Every memfd the daemon maps for clients is named by libmma "mma-host",
 * "mma-simdev" or "mma-flags"; /proc/<mmad>/maps lists them. */
static int daemon_memfd_maps(pid_t daemon)
{
    return count_maps(daemon, "/memfd:mma-host") + count_maps(daemon, "/memfd:mma-simdev") +
           count_maps(daemon, "/memfd:mma-flags");
}

static int maps_back_to(void *arg)
{
    maps_t *m = arg;
    return daemon_memfd_maps(m->daemon) == m->want;
}

/* `mmactl status` counts the survivor and mmactl itself, nobody else. */
static int two_clients(void *arg)
{
    int rc;
    char *st = mmactl(arg, "status", 0, &rc);
    int ok = rc == 0 && status_field(st, "clients") == 2;
    free(st);
    return ok;
}

START_TEST(client_dies_mid_copy)
{
    /* A very slow box (1/500 of real speed): the 96 MiB the client leaves in
     * flight take ~0.3 s, so it surely dies while they move, even on a
     * loaded machine. */
    mmad_proc_t d;
    const char *slow[] = {"--sim-scale=0.002", NULL};
    mmad_start(&d, slow);
    mma_client_t *surv = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &surv), MMA_OK);
    uint8_t *sh, *sd;
    ck_assert_int_eq(mma_host_alloc(surv, MIB, (void **)&sh), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(surv, 1, MIB, (void **)&sd), MMA_OK);
    int base_maps = daemon_memfd_maps(d.pid);
    ck_assert_int_eq(base_maps, 3); /* the survivor's flag page and regions */

    int p[2];
    ck_assert_int_eq(pipe(p), 0);
    fflush(stdout);
    fflush(stderr);
    pid_t kid = fork();
    ck_assert_int_ge(kid, 0);
    if (kid == 0) {
        close(p[0]);
        int pending = -1;
        mma_client_t *c = NULL;
        uint8_t *h, *dv;
        size_t n = 48 * MIB, piece = 4 * MIB;
        if (mma_connect(d.sock, &c) == MMA_OK && mma_host_alloc(c, n, (void **)&h) == MMA_OK &&
            mma_device_alloc(c, 0, n, (void **)&dv) == MMA_OK) {
            memset(h, 1, n);
            mma_copy_t t[24];
            int k = 0, ok = 1;
            for (size_t off = 0; off < n && ok; off += piece, k++)
                ok = (k % 2 ? mma_memcpy_async(c, h + off, dv + off, piece, NULL, &t[k])
                            : mma_memcpy_async(c, dv + off, h + off, piece, NULL, &t[k])) == MMA_OK;
            pending = 0;
            for (int i = 0; ok && i < k; i++)
                pending += mma_query(c, t[i]) == MMA_PENDING;
        }
        if (write(p[1], &pending, sizeof pending) != sizeof pending)
            _exit(3);
        _exit(0); /* dies with its copies in flight and without a goodbye */
    }
    close(p[1]);
    int pending = -2;
    ck_assert_int_eq(read(p[0], &pending, sizeof pending), (ssize_t)sizeof pending);
    close(p[0]);
    reap_child_ok(kid, "dying client");
    ck_assert_msg(pending > 0, "the client's copies were not in flight when it died (%d)", pending);

    /* The daemon notices, lists it no more ... */
    gone_t g = {&d, kid};
    ck_assert_msg(wait_until(client_gone, &g, 20.0), "mmactl clients still lists pid %d", (int)kid);
    /* ... and unmaps its regions and flag page once the chunks in flight
     * have landed (they reference them until then). */
    maps_t m = {d.pid, base_maps};
    ck_assert_msg(wait_until(maps_back_to, &m, 20.0), "mmad still maps %d client memfds (want %d)",
                  daemon_memfd_maps(d.pid), base_maps);

    /* The survivor and newcomers are served. */
    fill_random(sh, MIB, 77);
    copy_verified(surv, sd, sh, MIB, NULL);
    quick_roundtrip(d.sock, 0, MIB + 5);
    /* The newcomer's goodbye is processed asynchronously: await it. */
    ck_assert_msg(wait_until(two_clients, &d, 20.0), "mmactl status does not count 2 clients");
    mma_disconnect(surv);
    m.want = 0;
    ck_assert_msg(wait_until(maps_back_to, &m, 20.0), "mmad still maps client memfds after all left");
    mmad_stop_clean(&d);
}
END_TEST

START_TEST(sigterm_with_copies_in_flight)
{
    mmad_proc_t d;
    mmad_start(&d, NULL); /* slow box */
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    size_t n = 32 * MIB, piece = 4 * MIB;
    uint8_t *h, *dv;
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 3, n, (void **)&dv), MMA_OK);
    fill_random(h, n, 99);
    memset(dv, 0, n);
    mma_copy_t t[8];
    for (int i = 0; i < 8; i++)
        ck_assert_int_eq(mma_memcpy_async(c, dv + (size_t)i * piece, h + (size_t)i * piece, piece, NULL, &t[i]),
                         MMA_OK);
    /* The daemon must stop promptly and cleanly with work in flight ... */
    mmad_stop_clean(&d);
    /* ... and it finished every copy first: host-ordered copies are reached
     * at submit, and the 32 MiB take well under the drain's 2 s. */
    for (int i = 0; i < 8; i++) {
        int rc = mma_wait(c, t[i]);
        ck_assert_msg(rc == MMA_OK, "copy %d: %s", i, mma_status_name(rc));
        ck_assert_mem_eq(dv + (size_t)i * piece, h + (size_t)i * piece, piece);
    }
    /* The client notices the daemon is gone and tidies up without it. */
    ck_assert_int_eq(mma_free(c, dv), MMA_OK);
    mma_copy_t t2;
    int rc = mma_memcpy_async(c, h + 1, h, 1, NULL, &t2);
    ck_assert_int_eq(rc, MMA_ERR_DIRECTION); /* local checks still apply */
    mma_disconnect(c);
}
END_TEST

/* Whether a region's bytes have begun to change from zero (sampled a page
 * apart). */
static int some_landed(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i += 4096)
        if (p[i])
            return 1;
    return 0;
}

/* Wait, polling every 0.2 ms, until some bytes of p[0..n) land. */
static void wait_landing(const uint8_t *p, size_t n, const char *what)
{
    double until = now_s() + 10.0;
    while (!some_landed(p, n)) {
        ck_assert_msg(now_s() < until, "%s never began", what);
        struct timespec ts = {0, 200000};
        nanosleep(&ts, NULL);
    }
}

/* SIGTERM with a copy on its way, one sent after it that its client has
 * reached (as host-ordered copies are at submit), and one whose stream
 * has not reached it (a stream-ordered copy). A stream waits only
 * for done >= seq, so mmad must not write `done` for a copy it did not
 * run: it did (with MMA_ERR_CANCELLED), and the stream went on with data
 * never copied, while libmma's watchdog, which finishes natively what mmad
 * left, skips slots marked done. Now mmad finishes the first two, leaves
 * the third's slot untouched, and closes the client's socket only after:
 * at the EOF both are done, byte for byte. */
START_TEST(sigterm_finishes_ready_copies_leaves_the_rest)
{
    /* 36 MB/s through the host side: 12 MiB take ~0.35 s */
    const char *slow[] = {"--sim-scale=0.0002", "--chunk-size=1M", "--min-chunk=64K", "--log=info", NULL};
    const char *log = scratch_mkdtemp("sigterm-log");
    char logpath[128];
    snprintf(logpath, sizeof logpath, "%s/mmad.log", log);
    mmad_proc_t d;
    mmad_start_log(&d, slow, logpath);
    int fd = raw_connect(d.sock);
    ck_assert_int_ge(fd, 0);
    enum { NSLOTS = 8 };
    const size_t SZ = 16 * MIB, Q = 4 * MIB;
    void *fv = NULL;
    Mma__Response *r = raw_hello(fd, MMA_API_VERSION, NSLOTS, &fv);
    ck_assert(r && r->status == MMA_OK);
    mma__response__free_unpacked(r, NULL);
    mma_flag_slot_t *fl = fv;
    int hfd, dfd;
    uint8_t *hm = memfd_map(SZ, &hfd), *dm = memfd_map(SZ, &dfd);
    fill_random(hm, SZ, 2024);
    for (size_t i = 0; i < SZ; i += 4096)
        hm[i] |= 1; /* no sampled byte is zero: some_landed sees every page */
    memset(dm, 0, SZ);
    uint32_t hid = raw_register(fd, 0, -1, SZ, hfd, MMA_OK, NULL);
    uint32_t did = raw_register(fd, 1, 1, SZ, dfd, MMA_OK, NULL);

    /* slot 0: stream-ordered, never reached */
    raw_send_copy(fd, 0, 1, did, 0, hid, 0, Q);
    /* slot 1: reached, 8 MiB, under way at the signal */
    atomic_store(&fl[1].reached, 1);
    raw_send_copy(fd, 1, 1, did, Q, hid, Q, 2 * Q);
    /* slot 2: reached, sent after it */
    atomic_store(&fl[2].reached, 1);
    raw_send_copy(fd, 2, 1, did, 3 * Q, hid, 3 * Q, Q);
    wait_landing(dm + Q, 2 * Q, "the copy in slot 1");
    kill(d.pid, SIGTERM);

    /* mmad closes the socket once the drain is over, and not before. */
    int eof = 0;
    r = raw_recv(fd, 15.0, &eof);
    ck_assert_msg(!r && eof, "no EOF from mmad after SIGTERM (a response: %d)", r != NULL);
    for (int k = 1; k <= 2; k++) {
        ck_assert_msg(mma_flag_read(&fl[k].done) == 1, "slot %d not done when mmad closed its socket", k);
        ck_assert_int_eq(atomic_load(&fl[k].status), MMA_OK);
    }
    ck_assert_mem_eq(dm + Q, hm + Q, 3 * Q);
    /* The copy never reached: not run, and its slot as the client left it. */
    ck_assert_uint_eq(mma_flag_read(&fl[0].done), 0);
    ck_assert_int_eq(atomic_load(&fl[0].status), 0);
    ck_assert(!some_landed(dm, Q));
    mmad_exit_clean(&d);
    char *text = NULL;
    size_t len = 0;
    FILE *f = fopen(logpath, "r");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_gt(getdelim(&text, &len, 0, f), 0);
    fclose(f);
    ck_assert_msg(strstr(text, "shutdown: 1 copies not run"), "mmad's log does not say so:\n%s", text);
    free(text);
    munmap(hm, SZ);
    munmap(dm, SZ);
    munmap(fv, NSLOTS * sizeof(mma_flag_slot_t));
    close(hfd);
    close(dfd);
    close(fd);
}
END_TEST

/* The drain at SIGTERM is bounded: a copy that would take ~4 s more is cut
 * off after ~2 s of issuing (its chunks in flight land first), its slot
 * left without `done` for the client to finish, and mmad exits cleanly. */
START_TEST(sigterm_drain_is_bounded)
{
    /* 18 MB/s through the host side: 64 MiB take ~3.7 s */
    const char *slowest[] = {"--sim-scale=0.0001", "--chunk-size=1M", "--min-chunk=64K", NULL};
    mmad_proc_t d;
    mmad_start(&d, slowest);
    int fd = raw_connect(d.sock);
    ck_assert_int_ge(fd, 0);
    void *fv = NULL;
    Mma__Response *r = raw_hello(fd, MMA_API_VERSION, 4, &fv);
    ck_assert(r && r->status == MMA_OK);
    mma__response__free_unpacked(r, NULL);
    mma_flag_slot_t *fl = fv;
    const size_t SZ = 64 * MIB;
    int hfd, dfd;
    uint8_t *hm = memfd_map(SZ, &hfd), *dm = memfd_map(SZ, &dfd);
    memset(hm, 0x5a, SZ);
    memset(dm, 0, SZ);
    uint32_t hid = raw_register(fd, 0, -1, SZ, hfd, MMA_OK, NULL);
    uint32_t did = raw_register(fd, 1, 2, SZ, dfd, MMA_OK, NULL);
    atomic_store(&fl[0].reached, 1);
    raw_send_copy(fd, 0, 1, did, 0, hid, 0, SZ);
    wait_landing(dm, SZ, "the copy");
    double t0 = now_s();
    kill(d.pid, SIGTERM);
    int eof = 0;
    r = raw_recv(fd, 15.0, &eof);
    ck_assert_msg(!r && eof, "no EOF from mmad after SIGTERM");
    double took = now_s() - t0;
    mmad_exit_clean(&d);
    ck_assert_msg(took > 1.5 && took < 5.0, "the drain took %.2f s (about 2 s of issuing, then the chunks in flight)",
                  took);
    ck_assert_uint_eq(mma_flag_read(&fl[0].done), 0); /* cut off: left to the client */
    ck_assert(some_landed(dm, SZ));
    munmap(hm, SZ);
    munmap(dm, SZ);
    munmap(fv, 4 * sizeof(mma_flag_slot_t));
    close(hfd);
    close(dfd);
    close(fd);
}
END_TEST

/* mmad is gone and the client has not noticed yet: the send fails. On the
 * simulated box nothing can run a copy natively (on GPUs libmma would, at
 * the right point of its stream: gpu_test daemon_gone_at_send), so the
 * copy reports the loss, with no handle, and so does every copy after it;
 * freeing and disconnecting still work. */
START_TEST(copy_after_daemon_gone)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    uint8_t *h, *dv;
    ck_assert_int_eq(mma_host_alloc(c, 65536, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 1, 65536, (void **)&dv), MMA_OK);
    fill_random(h, 65536, 5);
    copy_verified(c, dv, h, 4096, NULL);
    mmad_stop_clean(&d);
    mma_segment_t segs[2] = {{dv, h, 100}, {dv + 200, h + 100, 100}};
    mma_copy_t t = 777;
    ck_assert_int_eq(mma_memcpy_sg_async(c, segs, 2, NULL, NULL, &t), MMA_ERR_DISCONNECTED);
    ck_assert_int_eq(mma_memcpy_async(c, dv, h, 100, NULL, &t), MMA_ERR_DISCONNECTED);
    ck_assert_uint_eq(t, 777);
    ck_assert_int_eq(mma_prewarm(c), MMA_ERR_DISCONNECTED);
    ck_assert_int_eq(mma_free(c, dv), MMA_OK);
    ck_assert_int_eq(mma_free(c, h), MMA_OK);
    mma_disconnect(c);
}
END_TEST

/* At exit mmad logs each thread's CPU time: the engine thread by its name. */
START_TEST(cpu_by_thread_at_exit)
{
    char log[160];
    snprintf(log, sizeof log, "%s/mmad.log", scratch_mkdtemp("cpulog"));
    static const char *const info[] = {"--sim-scale=0.25", "--log=info", NULL};
    mmad_proc_t d;
    mmad_start_log(&d, info, log);
    quick_roundtrip(d.sock, 2, 3 * MIB);
    mmad_stop_clean(&d);
    FILE *f = fopen(log, "r");
    ck_assert_ptr_nonnull(f);
    char line[1024];
    int found = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, "cpu by thread (user+sys): ")) {
            found = 1;
            ck_assert_msg(strstr(line, "; all threads "), "no total: %s", line);
            /* the socket thread served the copies; the engine ran them */
            ck_assert_msg(strstr(line, "mmad ") || strstr(line, "mmad-engine ") || strstr(line, "none over 5 ms"),
                          "no thread named: %s", line);
        }
    fclose(f);
    ck_assert_msg(found, "mmad logged no CPU line at exit");
}
END_TEST

START_TEST(one_daemon_per_socket)
{
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    /* A second daemon on a live socket refuses to start ... */
    char sockarg[160];
    snprintf(sockarg, sizeof sockarg, "--socket=%s", d.sock);
    const char *argv[] = {MMAD_PATH, "--sim", sockarg, NULL};
    char *out = NULL, *err = NULL;
    int rc = tool_run(argv, &out, &err);
    ck_assert_int_ne(rc, 0);
    ck_assert_msg(strstr(err, "another mmad"), "stderr: %s", err);
    free(out);
    free(err);
    /* ... and leaves the first one alone. */
    quick_roundtrip(d.sock, 1, 65536);
    mmad_stop_clean(&d);
}
END_TEST

START_TEST(stale_socket_file_replaced)
{
    /* A socket file left by a daemon that crashed: bound, nobody listening. */
    char path[108];
    snprintf(path, sizeof path, "%s/s.sock", scratch_mkdtemp("stale"));
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strcpy(a.sun_path, path);
    int s = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    ck_assert_int_eq(bind(s, (struct sockaddr *)&a, sizeof a), 0);
    close(s);
    ck_assert_int_eq(access(path, F_OK), 0);
    mmad_proc_t d;
    mmad_start_at(&d, path, fast_box);
    quick_roundtrip(path, 0, 4097);
    mmad_stop_clean(&d); /* also removes the directory */
}
END_TEST

START_TEST(command_line)
{
    const char *help[] = {MMAD_PATH, "--help", NULL};
    char *out = NULL, *err = NULL;
    ck_assert_int_eq(tool_run(help, &out, &err), 0);
    ck_assert_ptr_nonnull(strstr(out, "usage: mmad"));
    free(out);
    free(err);
    const char *bad[] = {MMAD_PATH, "--sim", "--chunk-size=lots", NULL};
    ck_assert_int_eq(tool_run(bad, &out, &err), 2);
    ck_assert_ptr_nonnull(strstr(err, "chunk-size"));
    free(out);
    free(err);
    const char *unknown[] = {MMAD_PATH, "--frobnicate", NULL};
    ck_assert_int_eq(tool_run(unknown, &out, &err), 2);
    ck_assert_ptr_nonnull(strstr(err, "frobnicate"));
    free(out);
    free(err);
    const char *preset[] = {MMAD_PATH, "--sim", "--sim-preset=16gpu", "--socket=/tmp/mma-never.sock", NULL};
    ck_assert_int_eq(tool_run(preset, &out, &err), 1);
    ck_assert_ptr_nonnull(strstr(err, "16gpu"));
    free(out);
    free(err);
    const char *busy[] = {MMAD_PATH, "--sim", "--sim-busy-gpus=1,4", "--socket=/tmp/mma-never.sock", NULL};
    ck_assert_int_eq(tool_run(busy, &out, &err), 1);
    ck_assert_msg(strstr(err, "--sim-busy-gpus") && strstr(err, "1,4"), "stderr: %s", err);
    free(out);
    free(err);
}
END_TEST

/* ======================================================================
 * f. mmactl
 * ==================================================================== */

/* mmad logs at its --log level whatever $MMA_LOG says ($MMA_LOG is
 * libmma's and the tools'), and a $MMA_LOG that is no level is said so
 * rather than ignored (by libmma in mma-demo, at connect). */
START_TEST(log_levels)
{
    const char *dir = scratch_mkdtemp("log-levels");
    char logpath[160];
    snprintf(logpath, sizeof logpath, "%s/mmad.log", dir);
    setenv("MMA_LOG", "debug", 1);
    const char *quiet[] = {"--log=warn", NULL};
    mmad_proc_t d;
    mmad_start_log(&d, quiet, logpath);
    unsetenv("MMA_LOG");
    setenv("MMA_LOG", "warning", 1); /* no such level: "warn" */
    const char *argv[] = {MMA_DEMO_PATH, "--socket", d.sock, "--mib", "1", "--reps", "1", NULL};
    char *out = NULL, *err = NULL;
    int rc = tool_run(argv, &out, &err);
    unsetenv("MMA_LOG");
    ck_assert_msg(rc == 0, "exit %d, stderr: %s", rc, err);
    ck_assert_msg(strstr(err, "libmma: MMA_LOG=warning is not a level (error, warn, info, debug)"), "stderr: %s", err);
    ck_assert_ptr_nonnull(strstr(out, "every byte matches"));
    free(out);
    free(err);
    mmad_stop_clean(&d);
    char *text = NULL;
    size_t len = 0;
    FILE *f = fopen(logpath, "r");
    ck_assert_ptr_nonnull(f);
    ssize_t got = getdelim(&text, &len, 0, f);
    fclose(f);
    ck_assert_msg(got <= 0 || (!strstr(text, " info: ") && !strstr(text, " debug: ")),
                  "mmad --log=warn with MMA_LOG=debug logged:\n%s", text);
    free(text);
}
END_TEST

START_TEST(mmactl_reports)
{
    mmad_proc_t d;
    mmad_start(&d, steady_box);
    int rc;
    char *out = mmactl(&d, "status", 0, &rc);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(strstr(out, "backend:sim\n"), "status: %s", out);
    ck_assert_ptr_nonnull(strstr(out, "simulated:yes\n"));
    ck_assert_ptr_nonnull(strstr(out, "version:0.2.0\n"));
    ck_assert_ptr_nonnull(strstr(out, "gpus:4\n"));
    ck_assert_ptr_nonnull(strstr(out, "sim_scale:0.25\n"));
    ck_assert_ptr_nonnull(strstr(out, "chunk_size:1048576\n"));
    ck_assert_int_eq(status_field(out, "pid"), d.pid);
    ck_assert_int_eq(status_field(out, "copies_done"), 0);
    ck_assert_int_eq(status_field(out, "relay_kernel_launches"), 0); /* the simulated box has none */
    free(out);

    /* One multipath copy into GPU 0 each way. */
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    size_t n = 8 * MIB;
    uint8_t *h, *back, *dv;
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&back), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 0, n, (void **)&dv), MMA_OK);
    fill_random(h, n, 8);
    mma_copy_opts_t all = {.flags = MMA_COPY_NO_BYPASS, .max_paths = 0};
    copy_verified(c, dv, h, n, &all);
    copy_verified(c, back, dv, n, &all);

    out = mmactl(&d, "paths", 0, &rc);
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(count_substr(out, "\n") - 1, NGPU * NGPU * 2); /* "# Paths" + one line per path */
    const char *dirs[2] = {"h2d", "d2h"};
    for (int di = 0; di < 2; di++) {
        char key[64];
        snprintf(key, sizeof key, "gpu0.%s.direct:", dirs[di]);
        int64_t direct = field(out, key, "bytes=");
        ck_assert_msg(direct > 0, "%s bytes=%" PRId64 "\n%s", key, direct, out);
        int relays = 0;
        int64_t sum = direct;
        for (int v = 1; v < NGPU; v++) {
            snprintf(key, sizeof key, "gpu0.%s.via_gpu%d:", dirs[di], v);
            int64_t b = field(out, key, "bytes=");
            ck_assert_int_ge(b, 0);
            relays += b > 0;
            sum += b;
            ck_assert_ptr_nonnull(strstr(line_of(out, key), "state=on"));
        }
        ck_assert_msg(relays >= 2, "%s: only %d relays carried bytes\n%s", dirs[di], relays, out);
        /* Each path's smoothed rate is shown; at 8 MiB it has been measured. */
        snprintf(key, sizeof key, "gpu0.%s.direct:", dirs[di]);
        const char *rate = strstr(line_of(out, key), ",rate=");
        ck_assert_msg(rate && strtod(rate + 6, NULL) > 0, "%s\n%s", key, out);
        ck_assert_int_eq(sum, (int64_t)n); /* every byte over exactly one path */
    }
    /* Nothing went to the other GPUs. */
    for (int t = 1; t < NGPU; t++) {
        char key[32];
        snprintf(key, sizeof key, "gpu%d.h2d.direct:", t);
        ck_assert_int_eq(field(out, key, "bytes="), 0);
    }
    free(out);

    /* --json: valid JSON, one object per path. */
    out = mmactl(&d, "paths", 1, &rc);
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(out[0], '{');
    ck_assert_ptr_nonnull(strstr(out, "\"paths\""));
    ck_assert_msg(json_valid(out), "invalid JSON: %s", out);
    ck_assert_int_eq(count_substr(out, "\"target\":"), NGPU * NGPU * 2);
    ck_assert_int_eq(count_substr(out, "\"yielding\":false"), NGPU * NGPU * 2); /* --yield-frac=0 */
    ck_assert_int_eq(count_substr(out, "\"rate_gbps\":"), NGPU * NGPU * 2);
    free(out);
    out = mmactl(&d, "status", 1, &rc);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(json_valid(out), "invalid JSON: %s", out);
    ck_assert_ptr_nonnull(strstr(out, "\"backend\":\"sim\""));
    ck_assert_ptr_nonnull(strstr(out, "\"copies_done\":2"));
    free(out);

    /* clients: this process, with its three regions and (once the engine
     * has counted them: it does so just after flagging completion) its two
     * copies. */
    /* Both are one-segment copies: both went by the submission ring. */
    clients_line_t cw = {.d = &d};
    snprintf(cw.want, sizeof cw.want, "copies=2,bytes=%zu,ring_copies=2\n", 2 * n);
    int counted = wait_until(clients_line, &cw, 10.0);
    ck_assert_msg(cw.out, "mmactl clients failed");
    char needle[64];
    snprintf(needle, sizeof needle, "pid=%d,", (int)getpid());
    const char *mine = strstr(cw.out, needle);
    ck_assert_msg(mine, "clients lacks %s:\n%s", needle, cw.out);
    ck_assert_ptr_nonnull(strstr(mine, "regions=3,"));
    ck_assert_msg(counted, "copies not counted:\n%s", cw.out);
    free(cw.out);
    out = mmactl(&d, "clients", 1, &rc);
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(json_valid(out), "invalid JSON: %s", out);
    snprintf(needle, sizeof needle, "\"pid\":%d,", (int)getpid());
    ck_assert_ptr_nonnull(strstr(out, needle));
    free(out);
    mma_disconnect(c);

    /* Errors: no daemon there, unknown command, no command. */
    char *err = NULL;
    const char *nosock[] = {MMACTL_PATH, "--socket", "/nonexistent/mmad.sock", "status", NULL};
    rc = tool_run(nosock, &out, &err);
    ck_assert_int_eq(rc, 1);
    ck_assert_msg(strstr(err, "cannot connect") && strstr(err, "/nonexistent/mmad.sock"), "stderr: %s", err);
    ck_assert_str_eq(out, "");
    free(out);
    free(err);
    const char *unknown[] = {MMACTL_PATH, "--socket", d.sock, "frobnicate", NULL};
    ck_assert_int_eq(tool_run(unknown, &out, &err), 2);
    ck_assert_ptr_nonnull(strstr(err, "unknown command"));
    free(out);
    free(err);
    const char *none[] = {MMACTL_PATH, "--socket", d.sock, NULL};
    ck_assert_int_eq(tool_run(none, &out, &err), 2);
    ck_assert_ptr_nonnull(strstr(err, "usage"));
    free(out);
    free(err);
    const char *badopt[] = {MMACTL_PATH, "--frob", "status", NULL};
    ck_assert_int_eq(tool_run(badopt, &out, &err), 2);
    free(out);
    free(err);
    mmad_stop_clean(&d);
}
END_TEST

/* A tool's bad arguments: each case (up to 4 arguments after the tool's
 * path and `pre`, a NULL-ended list) must exit 2 with `says` in its output,
 * before it does anything else. */
typedef struct {
    const char *args[5];
    const char *says;
} bad_args_t;

static void refuses(const char *tool, const char *const *pre, const bad_args_t *bad, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const char *argv[10] = {tool};
        int a = 1;
        for (int k = 0; pre && pre[k]; k++)
            argv[a++] = pre[k];
        for (int k = 0; bad[i].args[k] && k < 4; k++)
            argv[a++] = bad[i].args[k];
        char *out = NULL, *err = NULL;
        int rc = tool_run(argv, &out, &err);
        ck_assert_msg(rc == 2, "%s case %zu: exit %d, stderr: %s", tool, i, rc, err);
        ck_assert_msg(strstr(err, bad[i].says) || strstr(out, bad[i].says), "%s case %zu: wanted '%s' in: %s%s",
                      tool, i, bad[i].says, out, err);
        free(out);
        free(err);
    }
}

static const char *const no_mmad[] = {"--socket", "/nonexistent/mmad.sock", NULL};

/* mma-ab (bench/ab.c): bad arguments are refused with exit 2 and a line
 * that says what is wrong, before anything else; good ones on a machine
 * without a GPU exit 77 and say so (it compares mmads on real GPUs only). */
START_TEST(mma_ab_arguments)
{
    static const bad_args_t bad[] = {
        {{"--rounds", "1", NULL}, "sockets"},
        {{"--rounds", "0", "/tmp/x.sock", NULL}, "--rounds 0: a whole number from 1 to 1000"},
        {{"--burst", "1", "/tmp/x.sock", NULL}, "--burst 1: a whole number from 2 to 100"},
        {{"--gpu", "x", "/tmp/x.sock", NULL}, "--gpu x"},
        {{"--gap-us", "-5", "/tmp/x.sock", NULL}, "--gap-us -5"},
        {{"--dir", "sideways", "/tmp/x.sock", NULL}, "h2d or d2h"},
        {{"--sizes", "1K", "/tmp/x.sock", NULL}, "--sizes 1K: a size from 4096"},
        {{"--sizes", "8M,64Q", "/tmp/x.sock", NULL}, "--sizes 64Q"},
        {{"--sizes", "4100", "/tmp/x.sock", NULL}, "a multiple of 16"},
        {{"--sizes", ",", "/tmp/x.sock", NULL}, "names no size"},
        {{"--per-gpu", "0", "/tmp/x.sock", NULL}, "--per-gpu 0"},
        {{"--frob", "/tmp/x.sock", NULL}, "usage"},
    };
    refuses(MMA_AB_PATH, NULL, bad, sizeof bad / sizeof bad[0]);
    /* Good arguments: here (CI, no GPU) exit 77 with the reason; on a GPU
     * box there is no mmad on this socket, so it fails to connect (1). */
    const char *good[] = {MMA_AB_PATH, "--sizes", "8M", "--rounds", "1", "/nonexistent/mmad.sock", NULL};
    char *out = NULL, *err = NULL;
    int rc = tool_run(good, &out, &err);
    if (rc == 77)
        ck_assert_msg(strstr(err, "no CUDA GPU visible"), "stderr: %s", err);
    else
        ck_assert_msg(rc == 1 && strstr(err, "mma_connect"), "exit %d, stderr: %s", rc, err);
    free(out);
    free(err);
}
END_TEST

/* mma-bench and mma-pairs: a bad option value or an unknown option is
 * refused with exit 2 and a line that says why, before either connects. */
START_TEST(mma_bench_arguments)
{
    static const bad_args_t bench[] = {
        {{"--warm-ms", "x", NULL}, "--warm-ms x: 0-10000"},
        {{"--warm-ms", "20000", NULL}, "--warm-ms 20000"},
        {{"--warm-ms", "-1", NULL}, "--warm-ms -1"},
        {{"--gpu", "x", NULL}, "--gpu x: a whole number"},
        {{"--dir", "up", NULL}, "--dir up: h2d, d2h or both"},
        {{"--min", "1K", NULL}, "--min 1K: a size from 4096"},
        {{"--max", "3Q", NULL}, "--max 3Q"},
        {{"--paths-at", "0", NULL}, "--paths-at 0"},
        {{"--lat-reps", "3", NULL}, "--lat-reps 3: a whole number from 16"},
        {{"--secs", "-1", NULL}, "--secs -1"},
        {{"--min", "1G", "--max", "64M", NULL}, "is above --max"},
        {{"--frob", NULL}, "usage"},
    };
    refuses(MMA_BENCH_PATH, no_mmad, bench, sizeof bench / sizeof bench[0]);
    static const bad_args_t pairs[] = {
        {{"--size", "8", NULL}, "--size 8: a size from 16"},
        {{"--size", "1T", NULL}, "--size 1T"},
        {{"--reps", "5", NULL}, "--reps 5: a whole number from 10"},
        {{"--gpu", "-1", NULL}, "--gpu -1"},
        {{"--frob", NULL}, "usage"},
    };
    refuses(MMA_PAIRS_PATH, no_mmad, pairs, sizeof pairs / sizeof pairs[0]);
}
END_TEST

/* mma-demo (bench/demo.c): bad arguments are refused with exit 2 and a
 * line that names the option, before it connects; --reps at its top runs
 * against the simulated box and checks every byte. */
START_TEST(mma_demo_arguments)
{
    static const bad_args_t bad[] = {
        {{"--reps", "16", NULL}, "--reps 16: a whole number from 1 to 15"},
        {{"--reps", "0", NULL}, "--reps 0"},
        {{"--reps", "3x", NULL}, "--reps 3x"},
        {{"--mib", "-1", NULL}, "--mib -1"},
        {{"--gpu", "one", NULL}, "--gpu one"},
        {{"--frob", NULL}, "usage"},
    };
    refuses(MMA_DEMO_PATH, no_mmad, bad, sizeof bad / sizeof bad[0]);
    mmad_proc_t d;
    mmad_start(&d, NULL);
    const char *good[] = {MMA_DEMO_PATH, "--socket", d.sock, "--mib", "2", "--reps", "15", NULL};
    char *out = NULL, *err = NULL;
    int rc = tool_run(good, &out, &err);
    ck_assert_msg(rc == 0, "exit %d, stderr: %s", rc, err);
    ck_assert_msg(strstr(out, "SIMULATED") && strstr(out, "every byte matches"), "stdout: %s", out);
    free(out);
    free(err);
    mmad_stop_clean(&d);
}
END_TEST

/* ======================================================================
 * g. fault injection
 * ==================================================================== */

START_TEST(failing_relay_is_set_aside)
{
    mmad_proc_t d;
    const char *extra[] = {"--sim-scale=0.25", "--chunk-size=1M", "--min-chunk=64K", "--sim-fail-via=2",
                           "--yield-frac=0", NULL}; /* as steady_box */
    mmad_start(&d, extra);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    size_t n = 8 * MIB + 12345;
    uint8_t *h, *back, *dv[NGPU];
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&back), MMA_OK);
    for (int g = 0; g < NGPU; g++)
        ck_assert_int_eq(mma_device_alloc(c, g, n, (void **)&dv[g]), MMA_OK);
    /* Several rounds into GPU 0 both ways, then the other GPUs: every copy
     * completes with the right bytes although GPU 2 fails every relay. */
    for (int round = 0; round < 3; round++) {
        fill_random(h, n, (uint64_t)round + 1);
        copy_verified(c, dv[0], h, n, NULL);
        memset(back, 0, n);
        copy_verified(c, back, dv[0], n, NULL);
    }
    for (int g = 1; g < NGPU; g++) {
        copy_verified(c, dv[g], h, n, NULL);
        copy_verified(c, back, dv[g], n, NULL);
    }
    int rc;
    char *out = mmactl(&d, "paths", 0, &rc);
    ck_assert_int_eq(rc, 0);
    const char *off[] = {"gpu0.h2d.via_gpu2:", "gpu0.d2h.via_gpu2:", "gpu1.h2d.via_gpu2:", "gpu3.d2h.via_gpu2:"};
    for (size_t i = 0; i < 4; i++) {
        const char *l = line_of(out, off[i]);
        ck_assert_msg(strstr(l, "state=off") && strstr(l, "note=copy failed"), "%s\n%s", off[i], out);
        ck_assert_msg(strstr(l, "bytes=0,"), "a failing relay carried bytes: %s", l);
    }
    /* The healthy paths stay on and carry the load; GPU 2's own link too. */
    const char *on[] = {"gpu0.h2d.direct:", "gpu0.h2d.via_gpu1:", "gpu0.h2d.via_gpu3:", "gpu2.h2d.direct:",
                        "gpu2.d2h.via_gpu3:"};
    for (size_t i = 0; i < 5; i++) {
        const char *l = line_of(out, on[i]);
        ck_assert_msg(strstr(l, "state=on") && !strstr(l, "note="), "%s\n%s", on[i], out);
        ck_assert_int_gt(field(out, on[i], "bytes="), 0);
    }
    free(out);
    /* The daemon counted every copy as done. */
    out = mmactl(&d, "status", 0, &rc);
    ck_assert_int_eq(status_field(out, "copies_done"), 6 + 6);
    ck_assert_int_eq(status_field(out, "bytes_done"), (int64_t)(12 * n));
    free(out);
    mma_disconnect(c);
    mmad_stop_clean(&d);
}
END_TEST

/* ======================================================================
 * h. libmma refusals
 * ==================================================================== */

START_TEST(api_errors)
{
    mma_client_t *c = (mma_client_t *)0x1;
    /* No daemon there. */
    ck_assert_int_eq(mma_connect("/nonexistent/dir/mmad.sock", &c), MMA_ERR_CONNECT);
    ck_assert_ptr_eq(c, (mma_client_t *)0x1);
    ck_assert_int_eq(mma_connect(NULL, NULL), MMA_ERR_INVAL);
    char longpath[200];
    memset(longpath, 'x', sizeof longpath - 1);
    longpath[sizeof longpath - 1] = 0;
    ck_assert_int_eq(mma_connect(longpath, &c), MMA_ERR_CONNECT);

    mmad_proc_t d;
    mmad_start(&d, fast_box);
    /* $MMA_SOCKET is the default. */
    setenv("MMA_SOCKET", d.sock, 1);
    ck_assert_int_eq(mma_connect(NULL, &c), MMA_OK);
    unsetenv("MMA_SOCKET");
    mma_info_t info;
    ck_assert_int_eq(mma_get_info(c, &info), MMA_OK);
    ck_assert_int_eq(info.gpu_count, NGPU);
    ck_assert_int_eq(mma_get_info(c, NULL), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_get_info(NULL, &info), MMA_ERR_INVAL);

    uint8_t *h1, *h2, *d0, *d1;
    ck_assert_int_eq(mma_host_alloc(c, 65536, (void **)&h1), MMA_OK);
    ck_assert_int_eq(mma_host_alloc(c, 65536, (void **)&h2), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 0, 65536, (void **)&d0), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 1, 65536, (void **)&d1), MMA_OK);
    void *p = (void *)0x1;
    ck_assert_int_eq(mma_host_alloc(c, 0, &p), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_device_alloc(c, 99, 4096, &p), MMA_ERR_NO_GPU);
    ck_assert_int_eq(mma_device_alloc(c, -1, 4096, &p), MMA_ERR_NO_GPU);
    ck_assert_int_eq(mma_device_alloc(c, NGPU, 4096, &p), MMA_ERR_NO_GPU);
    ck_assert_ptr_eq(p, (void *)0x1);
    /* The simulated box has no CUDA: caller-allocated device memory and
     * stream-ordered copies are not available. */
    ck_assert_int_eq(mma_device_register(c, 0, d0, 4096), MMA_ERR_UNSUPPORTED);
    mma_copy_t t = 777;
    ck_assert_int_eq(mma_memcpy_async(c, d0, h1, 100, MMA_STREAM_LEGACY, &t), MMA_ERR_UNSUPPORTED);
    ck_assert_int_eq(mma_memcpy_async(c, d0, h1, 100, (mma_stream_t)0x1234, &t), MMA_ERR_UNSUPPORTED);

    /* Direction, length, registration, range. */
    ck_assert_int_eq(mma_memcpy_async(c, h2, h1, 100, NULL, &t), MMA_ERR_DIRECTION);
    ck_assert_int_eq(mma_memcpy_async(c, d1, d0, 100, NULL, &t), MMA_ERR_DIRECTION);
    ck_assert_int_eq(mma_memcpy_async(c, d0, h1, 0, NULL, &t), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_memcpy(c, d0, h1, 0), MMA_ERR_INVAL);
    char stackbuf[64];
    ck_assert_int_eq(mma_memcpy_async(c, d0, stackbuf, 64, NULL, &t), MMA_ERR_NOT_REGISTERED);
    ck_assert_int_eq(mma_memcpy_async(c, stackbuf, d0, 64, NULL, &t), MMA_ERR_NOT_REGISTERED);
    ck_assert_int_eq(mma_memcpy_async(c, d0, NULL, 64, NULL, &t), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_memcpy_async(c, d0 + 65000, h1, 537, NULL, &t), MMA_ERR_RANGE);
    ck_assert_uint_eq(t, 777);
    /* Scatter-gather: one direction, one GPU. */
    mma_segment_t mixed_dir[2] = {{d0, h1, 10}, {h2, d0 + 100, 10}};
    ck_assert_int_eq(mma_memcpy_sg_async(c, mixed_dir, 2, NULL, NULL, &t), MMA_ERR_INVAL);
    mma_segment_t mixed_gpu[2] = {{d0, h1, 10}, {d1, h1 + 100, 10}};
    ck_assert_int_eq(mma_memcpy_sg_async(c, mixed_gpu, 2, NULL, NULL, &t), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_memcpy_sg_async(c, mixed_gpu, 0, NULL, NULL, &t), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_memcpy_sg_async(c, NULL, 1, NULL, NULL, &t), MMA_ERR_INVAL);
    /* Copy handles that were never issued. */
    ck_assert_int_eq(mma_query(c, ((mma_copy_t)5000 << 48) | 1), MMA_ERR_INVAL); /* slot 5000 */
    ck_assert_int_eq(mma_query(c, (mma_copy_t)3 << 48), MMA_ERR_INVAL);           /* seq 0 */
    ck_assert_int_eq(mma_wait(c, (mma_copy_t)3 << 48), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_query(NULL, 1), MMA_ERR_INVAL);
    /* Freeing: unknown pointers, interior pointers, twice. */
    ck_assert_int_eq(mma_free(c, stackbuf), MMA_ERR_NOT_REGISTERED);
    ck_assert_int_eq(mma_free(c, (void *)0x1234), MMA_ERR_NOT_REGISTERED);
    ck_assert_int_eq(mma_free(c, h1 + 1), MMA_ERR_NOT_REGISTERED);
    ck_assert_int_eq(mma_free(c, NULL), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_free(c, h2), MMA_OK);
    ck_assert_int_eq(mma_free(c, h2), MMA_ERR_NOT_REGISTERED);
    ck_assert_int_eq(mma_memcpy_async(c, d0, h2, 16, NULL, &t), MMA_ERR_NOT_REGISTERED);

    /* None of that disturbed the connection. */
    fill_random(h1, 65536, 3);
    copy_verified(c, d0, h1, 65536, NULL);
    copy_verified(c, d1 + 1, h1 + 3, 65533, NULL);
    mma_disconnect(c);
    mma_disconnect(NULL);
    mmad_stop_clean(&d);
}
END_TEST

/* Segment i of a copy of many small pieces: 16 bytes at i * SEG_STRIDE (plus
 * a little, so the pieces start unaligned). Offsets past 2 MiB take 4
 * bytes in the message, so a copy of MMA_MAX_SEGMENTS of them needs more
 * than 1 MiB, more than any client socket carries. */
#define SEG_STRIDE 512
#define SEG_REGION ((size_t)(MMA_MAX_SEGMENTS + 2) * SEG_STRIDE)
static void many_segments(mma_segment_t *segs, size_t n, uint8_t *dst, const uint8_t *src)
{
    for (size_t i = 0; i < n; i++)
        segs[i] = (mma_segment_t){dst + i * SEG_STRIDE + i % 7, src + i * SEG_STRIDE + i % 5, 16};
}

/* The first n segments of segs as one copy into dv (from h): MMA_ERR_LIMIT
 * as libmma refuses it, else the copy, waited for, and every byte of dv
 * checked against ref (its copy, with the segments applied). */
static int sg_copy_checked(mma_client_t *c, const mma_segment_t *segs, size_t n, uint8_t *dv, uint8_t *h,
                           uint8_t *ref, uint64_t seed)
{
    fill_random(h, SEG_REGION, seed);
    memcpy(ref, dv, SEG_REGION);
    for (size_t i = 0; i < n; i++)
        memcpy(ref + ((uint8_t *)segs[i].dst - dv), segs[i].src, segs[i].len);
    mma_copy_t t = 777;
    int rc = mma_memcpy_sg_async(c, segs, n, NULL, NULL, &t);
    if (rc != MMA_OK) {
        ck_assert_msg(rc == MMA_ERR_LIMIT, "%zu segments: %s", n, mma_status_name(rc));
        ck_assert_uint_eq(t, 777);
        return rc;
    }
    ck_assert_int_eq(mma_wait(c, t), MMA_OK);
    long off = first_diff(dv, ref, SEG_REGION);
    ck_assert_msg(off < 0, "%zu segments: device bytes differ at %ld", n, off);
    return MMA_OK;
}

START_TEST(segment_limit)
{
    /* Every refusal logs a warning; a hundred of them say nothing here. */
    setenv("MMA_LOG", "error", 1);
    mmad_proc_t d;
    mmad_start(&d, fast_box);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    uint8_t *h, *dv, *ref = malloc(SEG_REGION);
    mma_segment_t *segs = malloc((MMA_MAX_SEGMENTS + 1) * sizeof *segs);
    ck_assert(ref && segs);
    ck_assert_int_eq(mma_host_alloc(c, SEG_REGION, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 2, SEG_REGION, (void **)&dv), MMA_OK);
    fill_random(dv, SEG_REGION, 40);
    many_segments(segs, MMA_MAX_SEGMENTS + 1, dv, h);
    /* More segments than mmad takes, and a message larger than the socket
     * carries: refused before anything is queued ... */
    ck_assert_int_eq(sg_copy_checked(c, segs, MMA_MAX_SEGMENTS + 1, dv, h, ref, 41), MMA_ERR_LIMIT);
    ck_assert_int_eq(sg_copy_checked(c, segs, MMA_MAX_SEGMENTS, dv, h, ref, 42), MMA_ERR_LIMIT);
    /* ... and the client goes on working. */
    copy_verified(c, dv, h, 3 * MIB + 7, NULL);
    /* The largest copy this connection takes arrives byte for byte, and one
     * segment more is refused. A refusal costs nothing, while a copy that
     * fits is real and takes the simulated box ~1.5 s at ~58,000 segments:
     * so come down from above in steps of 2048, then 64, then 1, each step
     * to the first count that fits. */
    size_t n = MMA_MAX_SEGMENTS;
    uint64_t seed = 50;
    for (size_t step = 2048;; step = step == 2048 ? 64 : 1) {
        while (sg_copy_checked(c, segs, n, dv, h, ref, seed++) == MMA_ERR_LIMIT) {
            ck_assert_uint_gt(n, 10000); /* a stock kernel's socket holds ~23,000 of these */
            n -= step;
        }
        if (step == 1)
            break;
        n += step - 1; /* the largest count not tried yet */
    }
    fprintf(stderr, "segment_limit: this connection takes copies of up to %zu such segments\n", n);
    ck_assert_int_eq(sg_copy_checked(c, segs, n + 1, dv, h, ref, seed++), MMA_ERR_LIMIT);
    copy_verified(c, h, dv, SEG_REGION, NULL);
    ck_assert_int_eq(mma_free(c, dv), MMA_OK);
    ck_assert_int_eq(mma_free(c, h), MMA_OK);
    mma_disconnect(c);
    free(segs);
    free(ref);
    mmad_stop_clean(&d);
}
END_TEST

/* ======================================================================
 * i. yielding: relays over busy links step aside
 * ==================================================================== */

/* Bytes each path into `gpu` in `dir` ("h2d", "d2h") has carried, by via
 * GPU (bytes[gpu]: the direct path), and how many of its relays are in
 * `state`. The mmactl output goes to *text (caller frees) when asked. */
static int gpu_paths(const mmad_proc_t *d, int gpu, const char *dir, int64_t bytes[NGPU], const char *state,
                     char **text)
{
    int rc, n = 0;
    char *out = mmactl(d, "paths", 0, &rc);
    ck_assert_int_eq(rc, 0);
    char want[32];
    snprintf(want, sizeof want, "state=%s,", state);
    for (int v = 0; v < NGPU; v++) {
        char key[64];
        if (v == gpu)
            snprintf(key, sizeof key, "gpu%d.%s.direct:", gpu, dir);
        else
            snprintf(key, sizeof key, "gpu%d.%s.via_gpu%d:", gpu, dir, v);
        bytes[v] = field(out, key, "bytes=");
        ck_assert_msg(bytes[v] >= 0, "no %s in\n%s", key, out);
        if (v != gpu && strstr(line_of(out, key), want))
            n++;
    }
    if (text)
        *text = out;
    else
        free(out);
    return n;
}

/* The simulated native loads stop (their file goes): copy n bytes H2D into
 * gpu0, every byte checked, until all three relays are on again (30 s at
 * most), then once more. b0/b1: each path's bytes before and after that
 * last copy; returns its mmactl output (caller frees). */
/* The simulated native loads run while a file exists: create it in a
 * scratch folder named after `tag` and write mmad's option for it. */
static void busy_file(char busy[200], char opt[240], const char *tag)
{
    snprintf(busy, 200, "%s/busy", scratch_mkdtemp(tag));
    FILE *f = fopen(busy, "w");
    ck_assert_ptr_nonnull(f);
    fclose(f);
    snprintf(opt, 240, "--sim-busy-file=%s", busy);
}

static char *relays_come_back(const mmad_proc_t *d, mma_client_t *c, const char *busy, uint8_t *dv, uint8_t *h,
                              size_t n, int64_t b0[NGPU], int64_t b1[NGPU])
{
    mma_copy_opts_t routed = {.flags = MMA_COPY_NO_BYPASS};
    ck_assert_int_eq(unlink(busy), 0);
    double t0 = now_s();
    int on = 0;
    for (uint64_t round = 3; on < 3 && now_s() - t0 < 30; round++) {
        fill_random(h, n, round);
        copy_verified(c, dv, h, n, &routed);
        on = gpu_paths(d, 0, "h2d", b0, "on", NULL);
    }
    ck_assert_msg(on == 3, "only %d relays back after %.1f s", on, now_s() - t0);
    fill_random(h, n, 99);
    copy_verified(c, dv, h, n, &routed);
    char *out;
    gpu_paths(d, 0, "h2d", b1, "on", &out);
    return out;
}

/* The simulated native loads: GPUs 1-3 busy while a file exists. At scale
 * 0.01 the simulated links, not the CPU, set the rates (README). */
START_TEST(busy_relays_yield)
{
    char busy[200], opt[240];
    busy_file(busy, opt, "busy");
    /* Probes every 1 ms of the real box: 100 ms here. */
    const char *extra[] = {"--sim-scale=0.01", "--chunk-size=1M",   "--min-chunk=256K", "--sim-busy-gpus=1,2,3",
                           opt,                "--yield-probe-ms=1", "--yield-frac=0.6", "--busy-gbps=0", NULL};
    mmad_proc_t d;
    mmad_start(&d, extra);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    const size_t n = 32 * MIB, half = 16 * MIB;
    uint8_t *h, *back, *dv;
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&back), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 0, n, (void **)&dv), MMA_OK);
    mma_copy_opts_t routed = {.flags = MMA_COPY_NO_BYPASS};

    /* 1. The relays' chunks run at 40% of their links: once each has been
     *    judged over its first few chunks (4 counted) it yields, each way.
     *    The direct path does not. */
    int64_t b0[NGPU], b1[NGPU];
    char *out;
    int yield_h2d = 0, yield_d2h = 0;
    for (uint64_t round = 1; round <= 8 && (yield_h2d < 3 || yield_d2h < 3); round++) {
        fill_random(h, half, round);
        copy_verified(c, dv, h, half, &routed);
        memset(back, 0, half);
        copy_verified(c, back, dv, half, &routed);
        yield_h2d = gpu_paths(&d, 0, "h2d", b0, "yield", NULL);
        yield_d2h = gpu_paths(&d, 0, "d2h", b0, "yield", NULL);
    }
    const char *dirs[2] = {"h2d", "d2h"};
    for (int di = 0; di < 2; di++) {
        int yielding = gpu_paths(&d, 0, dirs[di], b0, "yield", &out);
        ck_assert_msg(yielding == 3, "%s: %d relays yield\n%s", dirs[di], yielding, out);
        char key[32];
        snprintf(key, sizeof key, "gpu0.%s.direct:", dirs[di]);
        ck_assert_ptr_nonnull(strstr(line_of(out, key), "state=on,"));
        for (int v = 1; v < NGPU; v++) /* the first few chunks: 5 to 8 of 1 MiB, a few more on a busy machine */
            ck_assert_msg(b0[v] <= (int64_t)(12 * MIB), "%s via gpu%d carried %" PRId64 " before yielding\n%s",
                          dirs[di], v, b0[v], out);
        free(out);
    }
    gpu_paths(&d, 0, "h2d", b0, "yield", NULL);

    /* 2. While they yield a copy goes (nearly) all over the direct path: a
     *    relay gets a probe every 100 ms, and the copy takes ~60 ms. */
    fill_random(h, n, 2);
    copy_verified(c, dv, h, n, &routed);
    int yielding = gpu_paths(&d, 0, "h2d", b1, "yield", &out);
    int64_t relays = 0;
    for (int v = 1; v < NGPU; v++)
        relays += b1[v] - b0[v];
    ck_assert_int_eq(relays + b1[0] - b0[0], (int64_t)n);
    ck_assert_msg(relays <= (int64_t)(6 * MIB), "relays carried %" PRId64 " of %zu bytes while yielding\n%s", relays,
                  n, out);
    ck_assert_msg(yielding == 3, "h2d: %d relays yield\n%s", yielding, out);
    free(out);

    /* 3. The native loads stop: a probe finds its link fast again and the
     *    relay takes its share once more. */
    out = relays_come_back(&d, c, busy, dv, h, n, b0, b1);
    relays = 0;
    for (int v = 1; v < NGPU; v++) {
        ck_assert_msg(b1[v] > b0[v], "via gpu%d carried nothing once back\n%s", v, out);
        relays += b1[v] - b0[v];
    }
    ck_assert_msg(relays >= (int64_t)(n / 4), "relays carried %" PRId64 " of %zu bytes once back\n%s", relays, n,
                  out);
    free(out);
    mma_disconnect(c);
    mmad_stop_clean(&d);
}
END_TEST

/* The links' own traffic, as the backend sees it (--busy-gbps; on GPUs
 * NVML's PCIe counters less mmad's bytes, here the simulated native loads):
 * relays through a busy link stop at once, with no rate to judge, and come
 * back when the load goes. Yielding by rate is off (the default). */
START_TEST(busy_links_stop_relays)
{
    char busy[200], opt[240];
    busy_file(busy, opt, "links");
    const char *extra[] = {"--sim-scale=0.01", "--chunk-size=1M", "--min-chunk=256K", "--sim-busy-gpus=1,2,3", opt, NULL};
    mmad_proc_t d;
    mmad_start(&d, extra);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    const size_t n = 32 * MIB;
    uint8_t *h, *dv;
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 0, n, (void **)&dv), MMA_OK);
    mma_copy_opts_t routed = {.flags = MMA_COPY_NO_BYPASS};
    int64_t b0[NGPU], b1[NGPU];
    char *out;

    /* 1. The first copy tells mmad about the loads (two readings, 1 ms of
     *    the simulation apart); the second goes over the direct path. */
    fill_random(h, n, 1);
    copy_verified(c, dv, h, n, &routed);
    gpu_paths(&d, 0, "h2d", b0, "yield", NULL);
    fill_random(h, n, 2);
    copy_verified(c, dv, h, n, &routed);
    int stopped = gpu_paths(&d, 0, "h2d", b1, "yield", &out);
    ck_assert_msg(stopped == 3, "%d relays stopped\n%s", stopped, out);
    ck_assert_int_eq(b1[0] - b0[0], (int64_t)n);
    free(out);

    /* 2. The loads stop: the next reading frees the links. */
    out = relays_come_back(&d, c, busy, dv, h, n, b0, b1);
    for (int v = 1; v < NGPU; v++)
        ck_assert_msg(b1[v] - b0[v] >= (int64_t)(n / 8), "via gpu%d carried %" PRId64 " once free\n%s", v,
                      b1[v] - b0[v], out);
    free(out);
    mma_disconnect(c);
    mmad_stop_clean(&d);
}
END_TEST

/* The contrast: on an idle box every link shares the host side (~45 of 55
 * GB/s H2D, ~38 D2H, as on 4x H200) and no relay yields: each carries about
 * its quarter. (Were they to yield, they would stop after ~5 chunks.) At
 * scale 0.005 the simulation needs half the CPU of 0.01: its rates stay the
 * model's on a small machine that is busy with other work too. */
START_TEST(idle_box_relays_do_not_yield)
{
    const char *extra[] = {"--sim-scale=0.005", "--chunk-size=1M", "--min-chunk=256K", "--yield-probe-ms=0.5",
                           "--yield-frac=0.6", NULL};
    mmad_proc_t d;
    mmad_start(&d, extra);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    const size_t n = 32 * MIB;
    uint8_t *h, *back, *dv;
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&back), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 0, n, (void **)&dv), MMA_OK);
    mma_copy_opts_t routed = {.flags = MMA_COPY_NO_BYPASS};
    const char *dirs[2] = {"h2d", "d2h"};
    int rounds = 0, on[2] = {0, 0};
    /* Three rounds; a few more only while a relay shows state=yield: the
     * D2H relays run at 0.69 of a lone link against a limit of 0.6, and a
     * stall of a small machine can push one under for a moment. Its next
     * probe (100 ms here) brings it back. */
    while (rounds < 3 || ((on[0] < 3 || on[1] < 3) && rounds < 7)) {
        fill_random(h, n, (uint64_t)rounds + 10);
        copy_verified(c, dv, h, n, &routed);
        memset(back, 0, n);
        copy_verified(c, back, dv, n, &routed);
        rounds++;
        int64_t b[NGPU];
        for (int di = 0; di < 2; di++)
            on[di] = gpu_paths(&d, 0, dirs[di], b, "on", NULL);
    }
    for (int di = 0; di < 2; di++) {
        int64_t b[NGPU];
        char *out;
        on[di] = gpu_paths(&d, 0, dirs[di], b, "on", &out);
        ck_assert_msg(on[di] == 3, "%s: %d relays on\n%s", dirs[di], on[di], out);
        for (int v = 1; v < NGPU; v++)
            ck_assert_msg(b[v] >= (int64_t)((size_t)rounds * n / 8), "%s via gpu%d carried %" PRId64 " of %zu\n%s",
                          dirs[di], v, b[v], (size_t)rounds * n, out);
        free(out);
    }
    mma_disconnect(c);
    mmad_stop_clean(&d);
}
END_TEST

/* ======================================================================
 * j. planned splits
 * ==================================================================== */

START_TEST(planned_copies_every_size)
{
    /* The engine costs of the real box (5 us a chunk, 15 us more a relay):
     * plans put less on the relays, and nothing below ~2 MiB. */
    const char *extra[] = {"--sim-scale=0.01", "--sim-chunk-cost-us=5", "--sim-relay-latency-us=15", NULL};
    mmad_proc_t d;
    mmad_start(&d, extra);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    const int gpu = 1;
    const size_t n = 32 * MIB + 8192;
    uint8_t *h, *dv;
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, gpu, n, (void **)&dv), MMA_OK);
    /* The reference of both buffers: copied bytes and untouched ones. */
    uint8_t *mh = malloc(n), *md = malloc(n);
    ck_assert(mh && md);
    fill_random(h, n, 5);
    fill_random(dv, n, 6);
    memcpy(mh, h, n);
    memcpy(md, dv, n);
    uint64_t r = 77;
    int sizes = 0;
    for (size_t base = 4096; base <= 32 * MIB; base *= 2) {
        for (int odd = 0; odd < 2; odd++) {
            size_t len = odd ? base - 4096 + 1 + rnd_next(&r) % 4096 : base;
            size_t hoff = rnd_next(&r) % (n - len + 1), doff = rnd_next(&r) % (n - len + 1);
            int64_t b0[NGPU], b1[NGPU];
            gpu_paths(&d, gpu, "h2d", b0, "on", NULL);
            fill_random(h + hoff, len, r);
            memcpy(mh + hoff, h + hoff, len);
            mma_segment_t seg = {dv + doff, h + hoff, len};
            mma_copy_t t;
            ck_assert_int_eq(mma_memcpy_sg_async(c, &seg, 1, NULL, NULL, &t), MMA_OK);
            ck_assert_int_eq(mma_wait(c, t), MMA_OK);
            memcpy(md + doff, mh + hoff, len);
            long off;
            ck_assert_msg((off = first_diff(dv, md, n)) < 0, "H2D %zu: gpu buffer differs at %ld", len, off);
            char *out;
            gpu_paths(&d, gpu, "h2d", b1, "on", &out);
            int64_t direct = b1[gpu] - b0[gpu], sum = direct;
            for (int v = 0; v < NGPU; v++)
                if (v != gpu) {
                    int64_t relay = b1[v] - b0[v];
                    sum += relay;
                    if (len == 64 * 1024) /* a relay could not finish sooner */
                        ck_assert_msg(relay == 0, "64 KiB: via gpu%d carried %" PRId64 "\n%s", v, relay, out);
                    if (len == 8 * MIB) /* every path, the direct one most */
                        ck_assert_msg(relay > 0 && relay < direct, "8 MiB: via gpu%d %" PRId64 ", direct %" PRId64
                                      "\n%s", v, relay, direct, out);
                }
            ck_assert_int_eq(sum, (int64_t)len);
            free(out);
            /* And back, to another place. */
            hoff = rnd_next(&r) % (n - len + 1);
            doff = rnd_next(&r) % (n - len + 1);
            seg = (mma_segment_t){h + hoff, dv + doff, len};
            ck_assert_int_eq(mma_memcpy_sg_async(c, &seg, 1, NULL, NULL, &t), MMA_OK);
            ck_assert_int_eq(mma_wait(c, t), MMA_OK);
            memcpy(mh + hoff, md + doff, len);
            ck_assert_msg((off = first_diff(h, mh, n)) < 0, "D2H %zu: host buffer differs at %ld", len, off);
            sizes++;
        }
    }
    ck_assert_int_eq(sizes, 28);
    free(mh);
    free(md);
    mma_disconnect(c);
    mmad_stop_clean(&d);
}
END_TEST

/* mmad --trace: one CSV row per chunk, written when mmad stops. */
START_TEST(trace_rows_per_chunk)
{
    char path[160];
    snprintf(path, sizeof path, "%s/trace.csv", scratch_mkdtemp("trace"));
    char opt[200];
    snprintf(opt, sizeof opt, "--trace=%s", path);
    const char *extra[] = {"--sim-scale=0.25", "--chunk-size=1M", "--min-chunk=64K", opt, NULL};
    mmad_proc_t d;
    mmad_start(&d, extra);
    mma_client_t *c = NULL;
    ck_assert_int_eq(mma_connect(d.sock, &c), MMA_OK);
    const size_t sizes[] = {64 * 1024, 3 * MIB + 4096, 8 * MIB};
    const size_t n = 8 * MIB;
    uint8_t *h, *dv;
    ck_assert_int_eq(mma_host_alloc(c, n, (void **)&h), MMA_OK);
    ck_assert_int_eq(mma_device_alloc(c, 2, n, (void **)&dv), MMA_OK);
    fill_random(h, n, 9);
    for (int k = 0; k < 3; k++) {
        mma_segment_t seg = {dv, h, sizes[k]};
        mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
        mma_copy_t t;
        ck_assert_int_eq(mma_memcpy_sg_async(c, &seg, 1, NULL, &o, &t), MMA_OK);
        ck_assert_int_eq(mma_wait(c, t), MMA_OK);
        ck_assert_int_eq(memcmp(dv, h, sizes[k]), 0);
    }
    mma_disconnect(c);
    mmad_stop_clean(&d);
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "no trace at %s", path);
    char line[512];
    ck_assert_ptr_nonnull(fgets(line, sizeof line, f));
    ck_assert_str_eq(line, TRACE_HEADER);
    uint64_t bytes[4] = {0}, total[4] = {0};
    int rows = 0;
    while (fgets(line, sizeof line, f)) {
        trace_row_t r;
        ck_assert_msg(trace_row_parse(line, &r), "not a trace row: %s", line);
        /* GPU times are the cuda backend's; the simulated box leaves them 0 */
        ck_assert_msg(r.g[0] == 0 && r.g[1] == 0 && r.g[2] == 0 && r.g[3] == 0, "GPU times on the simulated box: %s",
                      line);
        ck_assert_uint_ge(r.job, 1);
        ck_assert_uint_le(r.job, 3);
        ck_assert_str_eq(r.dir, "h2d");
        ck_assert_int_eq(r.target, 2);
        ck_assert_int_eq(r.status, 0);
        ck_assert_msg(r.t_queued <= r.t_runnable && r.t_runnable <= r.t_issue && r.t_issue <= r.t_submitted &&
                          r.t_submitted <= r.t_done,
                      "times out of order: %s", line);
        /* libmma stamps its send time: before mmad queued the copy, and
         * not long before (one datagram on an idle box). */
        ck_assert_msg(r.t_sent > 0 && r.t_sent <= r.t_queued && r.t_queued - r.t_sent < 1000000000ull,
                      "t_sent off: %s", line);
        bytes[r.job] += r.len;
        total[r.job] = r.job_bytes;
        rows++;
    }
    fclose(f);
    for (int k = 1; k <= 3; k++) {
        ck_assert_uint_eq(total[k], sizes[k - 1]);
        ck_assert_uint_eq(bytes[k], sizes[k - 1]); /* the chunks cover each copy */
    }
    ck_assert_int_gt(rows, 3); /* the larger copies went over several paths */
}
END_TEST

int main(void)
{
    Suite *s = suite_create("integration");
    struct {
        const char *name;
        int timeout;
        const TTest *tests[12]; /* NULL after the last */
    } cases[] = {
        {"clients", 90, {concurrent_clients_random_copies, one_client_many_threads}},
        {"protocol", 60, {daemon_side_validation, client_side_range_check, version_handshake,
                          unknown_and_garbage_requests, submission_ring, submission_ring_full_and_off,
                          kick_wakes_mmad, unsealed_memfds_refused, register_reply_without_region,
                          memfds_sealed}},
        {"lifecycle", 60, {client_dies_mid_copy, sigterm_with_copies_in_flight,
                           sigterm_finishes_ready_copies_leaves_the_rest, sigterm_drain_is_bounded,
                           one_daemon_per_socket, stale_socket_file_replaced, command_line, cpu_by_thread_at_exit,
                           copy_after_daemon_gone}},
        {"mmactl", 60, {mmactl_reports, mma_ab_arguments, mma_demo_arguments, mma_bench_arguments, log_levels}},
        {"faults", 60, {failing_relay_is_set_aside}},
        {"api_errors", 60, {api_errors, segment_limit, prewarm_send_error, free_not_unregistered}},
        {"yield", 120, {busy_relays_yield, idle_box_relays_do_not_yield, busy_links_stop_relays}},
        {"plan", 90, {planned_copies_every_size, trace_rows_per_chunk}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        TCase *tc = tcase_create(cases[i].name);
        tcase_set_timeout(tc, cases[i].timeout);
        for (int k = 0; cases[i].tests[k]; k++)
            tcase_add_test(tc, cases[i].tests[k]);
        suite_add_tcase(s, tc);
    }
    scratch_init();
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    scratch_cleanup();
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
