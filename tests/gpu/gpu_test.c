/* GPU test suite: mmad on real GPUs, through libmma, every byte verified.
 * Starts a private mmad (cuda backend) on a temporary socket. Where no CUDA
 * GPU is visible it prints why and exits 77, which ctest reports as skipped.
 * Random data; H2D and D2H; sizes 1 B .. 1 GiB with odd sizes and unaligned
 * offsets; every target GPU; scatter-gather; stream order (a kernel writes
 * the source before the copy, a kernel reads the destination after it);
 * several client processes at once; clients that go away mid-copy. */
#define _GNU_SOURCE
#include <check.h>
#include <cuda_runtime_api.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "flagpage.h"
#include "mma.h"
#include "../socket_fd.h"
#include "../trace_row.h"

int gt_fill(void *p, size_t n, uint32_t seed, cudaStream_t s);
int gt_sum(const void *p, size_t n, unsigned long long *out_dev, cudaStream_t s);
int gt_spin(long long cycles, cudaStream_t s);

static char sock_path[108];
static char mmad[4096];
static pid_t mmad_pid;
static int ngpu;

#define CU(call) ck_assert_msg((call) == cudaSuccess, "%s: %s", #call, cudaGetErrorString(cudaGetLastError()))
#define MM(call)                                                               \
    do {                                                                       \
        int r_ = (call);                                                       \
        ck_assert_msg(r_ == MMA_OK, "%s: %s", #call, mma_strerror(r_));        \
    } while (0)

static uint64_t rng_state = 88172645463325252ull;
static uint64_t rnd(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return rng_state;
}

static void fill_rand(uint8_t *p, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = rnd();
        memcpy(p + i, &v, 8);
    }
    for (; i < n; i++)
        p[i] = (uint8_t)rnd();
}

/* host -> gpu -> host for one (size, offsets), all through mmad. */
static void round_trip(mma_client_t *c, uint8_t *h, uint8_t *back, uint8_t *d, size_t n, size_t ho, size_t dofs)
{
    fill_rand(h + ho, n);
    memset(back, 0xEE, n + ho + 64);
    mma_segment_t up = {d + dofs, h + ho, n}, down = {back + ho, d + dofs, n};
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
    mma_copy_t t;
    MM(mma_memcpy_sg_async(c, &up, 1, NULL, &o, &t));
    MM(mma_wait(c, t));
    MM(mma_memcpy_sg_async(c, &down, 1, NULL, &o, &t));
    MM(mma_wait(c, t));
    ck_assert_msg(memcmp(h + ho, back + ho, n) == 0, "round trip of %zu bytes (host off %zu, dev off %zu) differs", n,
                  ho, dofs);
    for (size_t i = 0; i < ho; i++)
        ck_assert_msg(back[i] == 0xEE, "byte before the destination was written");
    for (size_t i = ho + n; i < ho + n + 64; i++)
        ck_assert_msg(back[i] == 0xEE, "byte after the destination was written");
}

static void expect_no_failed_path(const char *name);

START_TEST(sizes_offsets_every_gpu)
{
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    size_t cap = (64u << 20) + 8192;
    uint8_t *h, *back;
    MM(mma_host_alloc(c, cap, (void **)&h));
    MM(mma_host_alloc(c, cap, (void **)&back));
    size_t sizes[] = {1, 3, 4095, 4096, 65537, 1000003, (8u << 20) + 13, (64u << 20) - 7};
    for (int g = 0; g < ngpu; g++) {
        uint8_t *d;
        MM(mma_device_alloc(c, g, cap, (void **)&d));
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
            round_trip(c, h, back, d, sizes[i], rnd() % 4000, rnd() % 4000);
        MM(mma_free(c, d));
    }
    MM(mma_free(c, back));
    MM(mma_free(c, h));
    mma_disconnect(c);
    expect_no_failed_path("sizes_offsets_every_gpu");
}
END_TEST

START_TEST(one_gib)
{
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    size_t n = 1u << 30;
    uint8_t *h, *back, *d;
    MM(mma_host_alloc(c, n + 4096, (void **)&h));
    MM(mma_host_alloc(c, n + 4096, (void **)&back));
    int g = ngpu - 1;
    MM(mma_device_alloc(c, g, n + 4096, (void **)&d));
    round_trip(c, h, back, d, n, 0, 0);
    round_trip(c, h, back, d, n - 1, 1, 3);
    MM(mma_free(c, d));
    MM(mma_free(c, back));
    MM(mma_free(c, h));
    mma_disconnect(c);
    expect_no_failed_path("one_gib");
}
END_TEST

START_TEST(scatter_gather)
{
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    enum { NSEG = 512 };
    size_t block = 64 * 1024 + 16; /* KV-cache-like blocks, deliberately odd */
    size_t n = block * NSEG * 2;
    uint8_t *h, *back, *d;
    MM(mma_host_alloc(c, n, (void **)&h));
    MM(mma_host_alloc(c, n, (void **)&back));
    MM(mma_device_alloc(c, 0, n, (void **)&d));
    fill_rand(h, n);
    memset(back, 0, n);
    mma_segment_t up[NSEG], down[NSEG];
    for (int i = 0; i < NSEG; i++) {
        /* scattered: block i of the host goes to slot (NSEG-1-i)*2 on the GPU */
        size_t dslot = (size_t)(NSEG - 1 - i) * 2;
        up[i] = (mma_segment_t){d + dslot * block, h + (size_t)i * block, block};
        down[i] = (mma_segment_t){back + (size_t)i * block, d + dslot * block, block};
    }
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
    mma_copy_t t;
    MM(mma_memcpy_sg_async(c, up, NSEG, NULL, &o, &t));
    MM(mma_wait(c, t));
    MM(mma_memcpy_sg_async(c, down, NSEG, NULL, &o, &t));
    MM(mma_wait(c, t));
    ck_assert(memcmp(h, back, block * NSEG) == 0);
    MM(mma_free(c, d));
    MM(mma_free(c, back));
    MM(mma_free(c, h));
    mma_disconnect(c);
    expect_no_failed_path("scatter_gather");
}
END_TEST

/* A kernel writes the device source, then an mma D2H on the same stream must
 * see it; an mma H2D, then a kernel on the stream must read the new bytes. */
START_TEST(stream_order)
{
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    int g = ngpu > 1 ? 1 : 0;
    size_t n = 256u << 20;
    uint8_t *h, *back, *d, *d2;
    MM(mma_host_alloc(c, n, (void **)&h));
    MM(mma_host_alloc(c, n, (void **)&back));
    MM(mma_device_alloc(c, g, n, (void **)&d));
    MM(mma_device_alloc(c, g, n, (void **)&d2));
    CU(cudaSetDevice(g));
    cudaStream_t s;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    unsigned long long *sum_dev, sum;
    CU(cudaMalloc((void **)&sum_dev, sizeof *sum_dev));
    for (int round = 0; round < 3; round++) {
        /* before: a slow spin, then the kernel that writes the source */
        ck_assert_int_eq(gt_spin(20000000, s), 0);
        ck_assert_int_eq(gt_fill(d, n, 77u + (uint32_t)round, s), 0);
        memset(back, 0, n);
        MM(mma_memcpy_async(c, back, d, n, (mma_stream_t)s, NULL));
        CU(cudaStreamSynchronize(s));
        for (size_t i = 0; i < n; i += 4093)
            ck_assert_msg(back[i] == (uint8_t)((i * 2654435761u) ^ (77u + (uint32_t)round)),
                          "D2H after a kernel: byte %zu is stale", i);
        /* after: H2D of fresh bytes, then a kernel sums the destination */
        fill_rand(h, n);
        unsigned long long want = 0;
        for (size_t i = 0; i < n; i++)
            want += (unsigned long long)h[i] * (unsigned long long)((i % 251) + 1);
        CU(cudaMemsetAsync(sum_dev, 0, sizeof *sum_dev, s));
        ck_assert_int_eq(gt_spin(20000000, s), 0);
        MM(mma_memcpy_async(c, d2, h, n, (mma_stream_t)s, NULL));
        ck_assert_int_eq(gt_sum(d2, n, sum_dev, s), 0);
        CU(cudaMemcpyAsync(&sum, sum_dev, sizeof sum, cudaMemcpyDeviceToHost, s));
        CU(cudaStreamSynchronize(s));
        ck_assert_msg(sum == want, "kernel after H2D saw other bytes (sum %llu, want %llu)", sum, want);
    }
    CU(cudaFree(sum_dev));
    CU(cudaStreamDestroy(s));
    MM(mma_free(c, d2));
    MM(mma_free(c, d));
    MM(mma_free(c, back));
    MM(mma_free(c, h));
    mma_disconnect(c);
    expect_no_failed_path("stream_order");
}
END_TEST

/* Several client processes at once, each to its own GPU, random copies. */
START_TEST(many_clients)
{
    int nproc = ngpu < 4 ? ngpu : 4;
    pid_t kids[8];
    for (int k = 0; k < nproc; k++) {
        kids[k] = fork();
        if (kids[k] == 0) {
            rng_state ^= (uint64_t)(k + 1) * 0x9E3779B97F4A7C15ull;
            mma_client_t *c;
            if (mma_connect(sock_path, &c) != MMA_OK)
                _exit(10);
            size_t cap = 48u << 20;
            uint8_t *h, *back, *d;
            if (mma_host_alloc(c, cap, (void **)&h) || mma_host_alloc(c, cap, (void **)&back) ||
                mma_device_alloc(c, k % ngpu, cap, (void **)&d))
                _exit(11);
            for (int i = 0; i < 12; i++) {
                size_t n = 1 + rnd() % (cap - 8192), ho = rnd() % 4096, dof = rnd() % 4096;
                fill_rand(h + ho, n);
                mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
                mma_segment_t up = {d + dof, h + ho, n}, down = {back + ho, d + dof, n};
                mma_copy_t t;
                if (mma_memcpy_sg_async(c, &up, 1, NULL, &o, &t) || mma_wait(c, t))
                    _exit(12);
                if (mma_memcpy_sg_async(c, &down, 1, NULL, &o, &t) || mma_wait(c, t))
                    _exit(13);
                if (memcmp(h + ho, back + ho, n) != 0)
                    _exit(14);
            }
            mma_disconnect(c);
            _exit(0);
        }
    }
    for (int k = 0; k < nproc; k++) {
        int st;
        ck_assert(waitpid(kids[k], &st, 0) == kids[k]);
        ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "client %d failed with %d", k,
                      WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    }
    expect_no_failed_path("many_clients");
}
END_TEST

/* A process that sees the GPUs through CUDA_VISIBLE_DEVICES (reordered, or
 * a subset) names them by its own numbers: libmma maps them to mmad's by
 * PCI bus id. In a child, gpu 0 is mmad's last GPU alone and gpu 1 does not
 * exist for it; here, every GPU in reverse order. Each device buffer must
 * sit on the device the caller named, and round trips (with relays) land. */
static void visible_round_trips(mma_client_t *c, int nvis)
{
    size_t cap = (16u << 20) + 8192;
    uint8_t *h, *back;
    MM(mma_host_alloc(c, cap, (void **)&h));
    MM(mma_host_alloc(c, cap, (void **)&back));
    for (int l = 0; l < nvis; l++) {
        uint8_t *d;
        MM(mma_device_alloc(c, l, cap, (void **)&d));
        struct cudaPointerAttributes a;
        CU(cudaPointerGetAttributes(&a, d));
        ck_assert_msg(a.device == l, "mma_device_alloc(gpu %d) gave memory on device %d", l, a.device);
        round_trip(c, h, back, d, 16u << 20, 0, 0);
        round_trip(c, h, back, d, 1000001, 64, 4096);
        MM(mma_free(c, d));
    }
    MM(mma_free(c, back));
    MM(mma_free(c, h));
}

START_TEST(visible_devices)
{
    char vis[128] = "";
    snprintf(vis, sizeof vis, "%d", ngpu - 1);
    pid_t kid = fork();
    if (kid == 0) {
        setenv("CUDA_VISIBLE_DEVICES", vis, 1);
        mma_client_t *c;
        MM(mma_connect(sock_path, &c));
        visible_round_trips(c, 1);
        void *d = NULL;
        ck_assert_int_eq(mma_device_alloc(c, 1, 4096, &d), MMA_ERR_NO_GPU);
        mma_disconnect(c);
        _exit(0);
    }
    int st;
    ck_assert(waitpid(kid, &st, 0) == kid);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the child that sees gpu %s alone failed (status %d)", vis, st);
    vis[0] = 0;
    for (int g = ngpu - 1; g >= 0; g--)
        snprintf(vis + strlen(vis), sizeof vis - strlen(vis), "%s%d", g == ngpu - 1 ? "" : ",", g);
    setenv("CUDA_VISIBLE_DEVICES", vis, 1);
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    visible_round_trips(c, ngpu);
    mma_disconnect(c);
    expect_no_failed_path("visible_devices");
}
END_TEST

/* Below the bypass threshold libmma copies natively on the stream. */
/* The lines of `mmactl <what>` (mmactl next to mmad) about the private
 * mmad that contain `key`, concatenated into out. */
static void mmactl_grep(const char *what, const char *key, char *out, size_t cap)
{
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "%.4000s", mmad);
    char *slash = strrchr(cmd, '/');
    ck_assert(slash);
    snprintf(slash + 1, sizeof cmd - (size_t)(slash + 1 - cmd), "mmactl --socket %s %s", sock_path, what);
    FILE *f = popen(cmd, "r");
    ck_assert_msg(f, "cannot run %s", cmd);
    char line[512];
    size_t len = 0;
    out[0] = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, key) && len + strlen(line) < cap) {
            strcpy(out + len, line);
            len += strlen(line);
        }
    ck_assert_msg(pclose(f) == 0, "%s failed", cmd);
}

/* No path of the private mmad set aside because a copy or a submit failed
 * (mmad then sends the bytes again elsewhere, so the bytes alone would not
 * tell): the paths' notes (mmactl paths). */
static void expect_no_failed_path(const char *name)
{
    char buf[16384];
    mmactl_grep("paths", "failed", buf, sizeof buf);
    ck_assert_msg(buf[0] == 0, "%s: mmad set paths aside:\n%s", name, buf);
}

/* Whether a line of `mmactl paths` is a path mmad had at start: on, yielding,
 * or set aside since because a copy or a submit on it failed ("failed" in
 * its note), not one it ruled out at start (no peer access, a shared
 * uplink). */
static int path_line_usable(const char *line)
{
    const char *end = strchr(line, '\n');
    size_t len = end ? (size_t)(end - line) : strlen(line);
    const char *off = strstr(line, "state=off"), *failed = strstr(line, "failed");
    return !(off && off < line + len) || (failed && failed < line + len);
}

/* Whether the private mmad has a relay path (mmactl paths, either
 * direction) for gpu t through gpu v, or, with t < 0, any relay path. */
static int relay_path(int t, int v)
{
    static char buf[65536];
    char key[48] = ".via_gpu";
    if (t >= 0)
        snprintf(key, sizeof key, ".via_gpu%d:", v);
    mmactl_grep("paths", key, buf, sizeof buf);
    for (const char *line = buf; *line;) {
        char want[24];
        snprintf(want, sizeof want, "gpu%d.", t);
        if ((t < 0 || strncmp(line, want, strlen(want)) == 0) && path_line_usable(line))
            return 1;
        const char *nl = strchr(line, '\n');
        if (!nl)
            break;
        line = nl + 1;
    }
    return 0;
}

/* The value MMAD_EXTRA gives option `opt` ("--max-paths", as --opt=V or
 * --opt V; the last one, as mmad takes it), or NULL. */
static const char *extra_opt(const char *opt)
{
    const char *extra = getenv("MMAD_EXTRA"), *val = NULL;
    size_t n = strlen(opt);
    for (const char *p = extra; p && (p = strstr(p, opt)) != NULL; p += n)
        if ((p == extra || p[-1] == ' ') && (p[n] == '=' || p[n] == ' '))
            val = p + n + 1;
    return val;
}

/* Whether MMAD_EXTRA has mmad relay no copy (--max-paths=1). */
static int extra_one_path(void)
{
    const char *mp = extra_opt("--max-paths");
    return mp && atoi(mp) == 1;
}

/* Whether MMAD_EXTRA turned the private mmad's relay kernels off. */
static int relay_kernels_off(void)
{
    const char *extra = getenv("MMAD_EXTRA");
    return extra && strstr(extra, "--relay-kernel=0") != NULL;
}

/* Whether MMAD_EXTRA turned the private mmad's resident relay kernels off
 * (a launch per one-hop relay, or no one-hop relays; resident kernels mark
 * their chunks' ends in completion words, so --completion=events too). */
static int resident_kernels_off(void)
{
    const char *extra = getenv("MMAD_EXTRA");
    return relay_kernels_off() ||
           (extra && (strstr(extra, "--relay-linger-us=0") || strstr(extra, "--completion=events")));
}

/* Resident relay kernels the private mmad has started (mmactl status). */
static long long relay_kernel_launches(void)
{
    char buf[512];
    mmactl_grep("status", "relay_kernel_launches:", buf, sizeof buf);
    const char *p = strstr(buf, "relay_kernel_launches:");
    ck_assert_msg(p, "mmactl status shows no relay_kernel_launches");
    return atoll(p + strlen("relay_kernel_launches:"));
}

/* Relay chunks the private mmad's copy kernels moved in one hop, summed
 * over its paths. */
static long long one_hop_chunks(void)
{
    char buf[16384];
    mmactl_grep("paths", "one_hop=", buf, sizeof buf);
    long long sum = 0;
    for (const char *p = buf; (p = strstr(p, "one_hop=")) != NULL; p += 8)
        sum += atoll(p + 8);
    return sum;
}

/* The one-hop chunks since `before`, printed for test `name`: some, or
 * none where MMAD_EXTRA turned relay kernels off (--relay-kernel=0). */
static void expect_one_hop_since(const char *name, long long before)
{
    long long hops = one_hop_chunks() - before;
    printf("%s: %lld relay chunks in one hop\n", name, hops);
    if (relay_kernels_off())
        ck_assert_msg(hops == 0, "%s: %lld one-hop chunks with --relay-kernel=0", name, hops);
    else
        ck_assert_msg(hops > 0, "%s: no relay chunk went in one hop", name);
}

/* Whether mmactl status shows one-hop relays through gpu g allowed now. */
static int one_hop_allowed(int g)
{
    char key[32], buf[512];
    snprintf(key, sizeof key, "gpu%d:name=", g);
    mmactl_grep("status", key, buf, sizeof buf);
    ck_assert_msg(strstr(buf, "one_hop="), "mmactl status shows no one_hop for gpu%d: %s", g, buf);
    return strstr(buf, "one_hop=yes") != NULL;
}

/* Poll one_hop_allowed(g) until it equals want, up to secs seconds. */
static int one_hop_becomes(int g, int want, double secs)
{
    for (int i = 0; i < (int)(secs * 20); i++) {
        if (one_hop_allowed(g) == want)
            return 1;
        usleep(50000);
    }
    return 0;
}

/* Another process's kernel on gpu1: mmad's one-hop relays keep off it
 * (contexts of different processes take turns on a GPU) while it runs,
 * and come back within a few seconds after (NVML's per-process samples,
 * then one second quiet). Skipped where mmad runs no relay kernels. */
START_TEST(one_hop_keeps_off_busy_gpu)
{
    if (ngpu < 2 || relay_kernels_off()) {
        printf("one_hop_keeps_off_busy_gpu: no relay kernels here\n");
        return;
    }
    ck_assert_msg(one_hop_becomes(1, 1, 3.0), "gpu1 does not take one-hop relays while idle");
    pid_t hog = fork();
    if (hog == 0) {
        /* ~4 s of kernels filling 1 GiB over and over on every SM */
        void *buf = NULL;
        if (cudaSetDevice(1) != cudaSuccess || cudaMalloc(&buf, 1u << 30) != cudaSuccess)
            _exit(1);
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        do {
            if (gt_fill(buf, 1u << 30, 7, 0) != 0 || cudaDeviceSynchronize() != cudaSuccess)
                _exit(1);
            clock_gettime(CLOCK_MONOTONIC, &t1);
        } while ((double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9 < 4.0);
        _exit(0);
    }
    ck_assert_int_gt(hog, 0);
    int kept_off = one_hop_becomes(1, 0, 3.0);
    int st = 0;
    waitpid(hog, &st, 0);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the kernel on gpu1 failed");
    ck_assert_msg(kept_off, "mmad kept one-hop relays on gpu1 while another process's kernel ran there");
    ck_assert_msg(one_hop_becomes(1, 1, 5.0), "one-hop relays through gpu1 did not come back");
}
END_TEST

/* Relays of copies below --relay-kernel whose ends are 16-byte aligned go
 * in one hop (a copy kernel on the via GPU); odd sizes leave a tail for
 * the kernel's last thread. Every byte lands, and mmactl counts one-hop
 * chunks, unless MMAD_EXTRA turned them off (--relay-kernel=0). */
START_TEST(one_hop_relays)
{
    if (ngpu < 2) {
        printf("one_hop_relays: one GPU, no relays to test\n");
        return;
    }
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    size_t cap = (48u << 20) + 8192;
    uint8_t *h, *back;
    MM(mma_host_alloc(c, cap, (void **)&h));
    MM(mma_host_alloc(c, cap, (void **)&back));
    size_t sizes[] = {16, 1000000, (2u << 20) + 16, 8u << 20, (8u << 20) + 5, 48u << 20};
    size_t offs[][2] = {{0, 0}, {64, 4096}, {4096, 48}};
    long long before = one_hop_chunks();
    for (int g = 0; g < ngpu; g++) {
        uint8_t *d;
        MM(mma_device_alloc(c, g, cap, (void **)&d));
        for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++)
            for (size_t k = 0; k < sizeof offs / sizeof offs[0]; k++)
                round_trip(c, h, back, d, sizes[i], offs[k][0], offs[k][1]);
        MM(mma_free(c, d));
    }
    expect_one_hop_since("one_hop_relays", before);
    MM(mma_free(c, back));
    MM(mma_free(c, h));
    mma_disconnect(c);
}
END_TEST

/* Resident relay kernels (--relay-linger-us): copies after a pause longer
 * than the linger time find the kernel gone and start another; copies in
 * flight at once queue several descriptors in one ring; a stream of copies
 * longer than a kernel's life (2 ms) goes on across its relaunches. Every
 * byte is checked. With resident kernels off (MMAD_EXTRA) the same copies
 * go through launches per chunk or staging, and must land all the same. */
#define RES_N 8
#define RES_SZ (4u << 20)
START_TEST(one_hop_resident_kernels)
{
    if (ngpu < 2) {
        printf("one_hop_resident_kernels: one GPU, no relays to test\n");
        return;
    }
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    size_t cap = (size_t)RES_N * RES_SZ;
    uint8_t *h, *back, *d;
    MM(mma_host_alloc(c, cap, (void **)&h));
    MM(mma_host_alloc(c, cap, (void **)&back));
    MM(mma_device_alloc(c, ngpu - 1, cap, (void **)&d));
    long long before = one_hop_chunks();
    /* pauses of 2 ms, ten times the default linger */
    for (int i = 0; i < 10; i++) {
        round_trip(c, h, back, d, RES_SZ + 16u * (unsigned)i, 0, 0);
        usleep(2000);
    }
    /* RES_N copies in flight each way, forty times */
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
    mma_copy_t t[RES_N];
    for (int round = 0; round < 40; round++) {
        fill_rand(h, cap);
        memset(back, 0xEE, cap);
        for (int dir = 0; dir < 2; dir++) {
            for (int i = 0; i < RES_N; i++) {
                size_t at = (size_t)i * RES_SZ;
                mma_segment_t sg = dir == 0 ? (mma_segment_t){d + at, h + at, RES_SZ}
                                            : (mma_segment_t){back + at, d + at, RES_SZ};
                MM(mma_memcpy_sg_async(c, &sg, 1, NULL, &o, &t[i]));
            }
            for (int i = 0; i < RES_N; i++)
                MM(mma_wait(c, t[i]));
        }
        ck_assert_msg(memcmp(h, back, cap) == 0, "round %d: %d copies of %u bytes in flight came back different",
                      round, RES_N, RES_SZ);
    }
    /* A stream with no pause: 512 H2D copies (2 GiB, ~15 ms at ~150 GB/s)
     * with RES_N in flight, longer than a kernel's 2 ms life, so kernels
     * end and are relaunched with descriptors waiting (at least one every
     * 4 ms: a kernel that is always fed must still end at its hard life
     * bound, 3 ms, even though the next chunk is always posted);
     * then the device bytes come back and are checked. */
    fill_rand(h, cap);
    memset(back, 0xEE, cap);
    long long launches = relay_kernel_launches();
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < 512; i++) {
        size_t at = (size_t)(i % RES_N) * RES_SZ;
        if (i >= RES_N)
            MM(mma_wait(c, t[i % RES_N]));
        mma_segment_t sg = {d + at, h + at, RES_SZ};
        MM(mma_memcpy_sg_async(c, &sg, 1, NULL, &o, &t[i % RES_N]));
    }
    for (int i = 0; i < RES_N; i++)
        MM(mma_wait(c, t[i]));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double ms = (double)(t1.tv_sec - t0.tv_sec) * 1e3 + (double)(t1.tv_nsec - t0.tv_nsec) / 1e6;
    launches = relay_kernel_launches() - launches;
    printf("one_hop_resident_kernels: a stream of 512 copies in %.1f ms, %lld resident kernel launches\n", ms,
           launches);
    if (!resident_kernels_off())
        ck_assert_msg(launches >= (long long)(ms / 4.0),
                      "a %.1f ms stream saw %lld resident kernel launches: kernels outlive their 3 ms hard life", ms,
                      launches);
    MM(mma_memcpy(c, back, d, cap));
    ck_assert_msg(memcmp(h, back, cap) == 0, "a stream of 512 copies left different bytes");
    expect_one_hop_since("one_hop_resident_kernels", before);
    MM(mma_free(c, d));
    MM(mma_free(c, back));
    MM(mma_free(c, h));
    mma_disconnect(c);
}
END_TEST

/* This process's one connection to the private mmad. */
static int mmad_socket_fd(void)
{
    return client_socket_fd(sock_path);
}

#define DROP_ROUNDS 16
#define DROP_COPIES 6
#define DROP_PENDING 3 /* of which stream-ordered behind a spin: still pending at the shutdown */
#define DROP_SPIN 400000000LL /* ~0.2 s of gt_spin ahead of them */
#define DROP_SZ (16u << 20) /* one hop (below --relay-kernel) */
#define DROP_TRAFFIC 3

/* One round of a client that goes away mid-copy: DROP_COPIES one-hop H2D
 * copies, each into an allocation of its own on gpu0, and its socket shut
 * under libmma (as if the client had died, but with its memory still
 * there) once the first host-ordered one has landed. The first
 * DROP_PENDING are stream-ordered behind ~0.2 s of gt_spin on a gpu1
 * stream (not gpu0's: NVML would count the spin as another process keeping
 * gpu0 busy, and relays through gpu0 would stage), posted before the
 * host-ordered ones, so mmad has them (it reads a client's copies in order)
 * but cannot start them before the shutdown. mmad unregisters the client's
 * regions at once and only then hands the connection to the engine thread
 * (server.c), so the copies' jobs hold the last references of their
 * allocations' regions: the engine thread closes those regions, IPC
 * mappings on every via GPU included, when it cancels the jobs. Only the
 * engine thread reports a copy MMA_ERR_CANCELLED, so each pending copy must
 * come back so; the host-ordered ones after the first may land or be
 * cancelled. Each copy that reports MMA_OK has every byte checked. The
 * memory goes only after mmad had time to drop its mappings. Returns 0 or
 * what failed. */
static int drop_mid_copy(void)
{
    mma_client_t *c;
    if (mma_connect(sock_path, &c) != MMA_OK)
        return 20;
    int fd = mmad_socket_fd();
    if (fd < 0)
        return 21;
    size_t n = DROP_SZ;
    uint8_t *h, *d[DROP_COPIES];
    if (mma_host_alloc(c, n * DROP_COPIES, (void **)&h) != MMA_OK)
        return 22;
    for (int i = 0; i < DROP_COPIES; i++)
        if (mma_device_alloc(c, 0, n, (void **)&d[i]) != MMA_OK)
            return 22;
    fill_rand(h, n * DROP_COPIES);
    cudaStream_t s;
    if (cudaSetDevice(1) != cudaSuccess || cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess ||
        gt_spin(DROP_SPIN, s) != 0)
        return 30;
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
    mma_copy_t t[DROP_COPIES];
    for (int i = 0; i < DROP_COPIES; i++) {
        mma_segment_t sg = {d[i], h + (size_t)i * n, n};
        if (mma_memcpy_sg_async(c, &sg, 1, i < DROP_PENDING ? (mma_stream_t)s : NULL, &o, &t[i]) != MMA_OK)
            return 23;
    }
    int landed[DROP_COPIES];
    if (mma_wait(c, t[DROP_PENDING]) != MMA_OK)
        return 24;
    landed[DROP_PENDING] = 1;
    if (shutdown(fd, SHUT_RDWR) != 0)
        return 25;
    for (int i = 0; i < DROP_COPIES; i++) {
        if (i == DROP_PENDING)
            continue;
        int st = mma_wait(c, t[i]);
        if (i < DROP_PENDING && st != MMA_ERR_CANCELLED)
            return 31; /* not pending in mmad at the shutdown, or not cancelled by its engine thread */
        if (st != MMA_OK && st != MMA_ERR_CANCELLED)
            return 26;
        landed[i] = st == MMA_OK;
    }
    if (cudaStreamSynchronize(s) != cudaSuccess || cudaStreamDestroy(s) != cudaSuccess)
        return 32;
    usleep(300000); /* mmad's last chunks land in ~1 ms, then it closes the mappings */
    uint8_t *back = malloc(n);
    if (!back)
        return 27;
    for (int i = 0; i < DROP_COPIES; i++) {
        if (!landed[i])
            continue;
        memset(back, 0xEE, n);
        if (cudaMemcpy(back, d[i], n, cudaMemcpyDeviceToHost) != cudaSuccess) {
            free(back);
            return 28;
        }
        if (memcmp(back, h + (size_t)i * n, n) != 0) {
            free(back);
            return 29;
        }
    }
    free(back);
    mma_disconnect(c);
    return 0;
}

/* Copies to gpu1 round trip until *stop, alternating two random patterns
 * (so a copy that did not happen shows), every byte checked: one-hop relays
 * through gpu0 while drop_mid_copy's regions on gpu0 close. Returns 0 or
 * what failed. */
static int traffic_to_gpu1(const volatile int *stop)
{
    mma_client_t *c;
    if (mma_connect(sock_path, &c) != MMA_OK)
        return 40;
    size_t n = DROP_SZ;
    uint8_t *h[2], *back, *d;
    if (mma_host_alloc(c, n, (void **)&h[0]) != MMA_OK || mma_host_alloc(c, n, (void **)&h[1]) != MMA_OK ||
        mma_host_alloc(c, n, (void **)&back) != MMA_OK || mma_device_alloc(c, 1, n, (void **)&d) != MMA_OK)
        return 41;
    fill_rand(h[0], n);
    fill_rand(h[1], n);
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
    for (int i = 0; !__atomic_load_n(stop, __ATOMIC_ACQUIRE); i++) {
        mma_segment_t up = {d, h[i % 2], n}, down = {back, d, n};
        mma_copy_t t;
        if (mma_memcpy_sg_async(c, &up, 1, NULL, &o, &t) != MMA_OK || mma_wait(c, t) != MMA_OK)
            return 42;
        if (mma_memcpy_sg_async(c, &down, 1, NULL, &o, &t) != MMA_OK || mma_wait(c, t) != MMA_OK)
            return 43;
        if (memcmp(back, h[i % 2], n) != 0)
            return 44;
    }
    mma_disconnect(c);
    return 0;
}

/* Regions closed on mmad's engine thread (their client went away while
 * its copies were queued or in flight) switch that thread's current GPU as
 * they close their IPC mappings. Relays must go on regardless: an engine
 * that believed a stale current GPU launched relay kernels on a via GPU's
 * stream with another GPU current, the launch failed, and that relay path
 * was set aside for the daemon's life. So: DROP_ROUNDS clients that go away
 * mid-copy (drop_mid_copy, regions on gpu0) while DROP_TRAFFIC clients keep
 * one-hop copies to gpu1 going through gpu0; every byte checked, no path
 * set aside, and afterwards copies to gpu0 and to gpu1 still relay in one
 * hop.
 * What it shows: every round, the engine thread cancelled copies that were
 * pending when their client went (they come back MMA_ERR_CANCELLED, which
 * only that thread reports), and so dropped the last references of their
 * regions (mmad unregisters a client's regions before the engine learns of
 * the close), while relays through gpu0 went on. What it does not: mmad
 * counts no region closes, so that the closes ran on the engine thread
 * rests on that order in server.c, not on a count; nor does it show that a
 * relay kernel was launched right after a close (the timing decides). */
START_TEST(relays_after_engine_closes_regions)
{
    if (ngpu < 2) {
        printf("relays_after_engine_closes_regions: one GPU, no relays to test\n");
        return;
    }
    if (!relay_path(1, 0) || extra_one_path()) {
        printf("relays_after_engine_closes_regions: mmad has no relay path for gpu1 through gpu0 (%s); "
               "nothing to test\n",
               extra_one_path() ? "--max-paths=1" : "mmactl paths");
        return;
    }
    long long before = one_hop_chunks();
    volatile int *stop = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    ck_assert(stop != MAP_FAILED);
    *stop = 0;
    /* children first: this process touches CUDA only once they are forked */
    pid_t traffic[DROP_TRAFFIC];
    for (int k = 0; k < DROP_TRAFFIC; k++) {
        traffic[k] = fork();
        if (traffic[k] == 0) {
            rng_state ^= (uint64_t)(k + 1) * 0x9E3779B97F4A7C15ull;
            _exit(traffic_to_gpu1(stop));
        }
        ck_assert_int_gt(traffic[k], 0);
    }
    pid_t dropper = fork();
    if (dropper == 0) {
        for (int r = 0; r < DROP_ROUNDS; r++) {
            int rc = drop_mid_copy();
            if (rc)
                _exit(rc);
        }
        _exit(0);
    }
    ck_assert_int_gt(dropper, 0);
    int st = 0;
    ck_assert(waitpid(dropper, &st, 0) == dropper);
    __atomic_store_n(stop, 1, __ATOMIC_RELEASE);
    for (int k = 0; k < DROP_TRAFFIC; k++) {
        int ts = 0;
        ck_assert(waitpid(traffic[k], &ts, 0) == traffic[k]);
        ck_assert_msg(WIFEXITED(ts) && WEXITSTATUS(ts) == 0, "traffic client %d failed with %d", k,
                      WIFEXITED(ts) ? WEXITSTATUS(ts) : -1);
    }
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the client going away mid-copy failed with %d",
                  WIFEXITED(st) ? WEXITSTATUS(st) : -1);
    munmap((void *)stop, 4096);
    expect_one_hop_since("relays_after_engine_closes_regions", before);
    expect_no_failed_path("relays_after_engine_closes_regions");
    /* later copies, each way of the pair, still relay in one hop (once NVML
     * no longer shows the dropper's spins keeping gpu1 busy) */
    if (!relay_kernels_off())
        ck_assert_msg(one_hop_becomes(0, 1, 5.0) && one_hop_becomes(1, 1, 5.0),
                      "one-hop relays through gpu0 and gpu1 are not allowed again after the clients went");
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    size_t cap = DROP_SZ + 8192;
    uint8_t *h, *back;
    MM(mma_host_alloc(c, cap, (void **)&h));
    MM(mma_host_alloc(c, cap, (void **)&back));
    for (int g = 0; g < 2; g++) {
        uint8_t *d;
        MM(mma_device_alloc(c, g, cap, (void **)&d));
        long long hops = one_hop_chunks();
        round_trip(c, h, back, d, DROP_SZ, 0, 0);
        expect_one_hop_since(g ? "relays_after_engine_closes_regions, then gpu1"
                               : "relays_after_engine_closes_regions, then gpu0",
                             hops);
        MM(mma_free(c, d));
    }
    MM(mma_free(c, back));
    MM(mma_free(c, h));
    mma_disconnect(c);
    expect_no_failed_path("relays_after_engine_closes_regions");
}
END_TEST

START_TEST(bypass_small)
{
    mma_client_t *c;
    MM(mma_connect(sock_path, &c));
    mma_info_t info;
    MM(mma_get_info(c, &info));
    /* Where no copy can relay (no relay path: one GPU, no peer access,
     * every pair behind one uplink; or --max-paths=1) mmad tells libmma to
     * run every copy natively; where one can, it takes the large ones. A
     * --bypass-threshold in MMAD_EXTRA (from 0) stands instead of either. */
    const char *given = extra_opt("--bypass-threshold");
    int relays = relay_path(-1, -1) && !extra_one_path();
    if (given && given[0] != '-') {
        printf("bypass_small: --bypass-threshold=%.*s from MMAD_EXTRA: bypass below %zu B\n",
               (int)strcspn(given, " "), given, info.bypass_threshold);
        ck_assert_msg(info.bypass_threshold != MMA_BYPASS_ALL, "--bypass-threshold given, yet mmad says bypass all");
        if (info.bypass_threshold == 0) {
            printf("bypass_small: nothing goes native at --bypass-threshold=0; nothing to test\n");
            mma_disconnect(c);
            return;
        }
    } else if (relays) {
        ck_assert_msg(info.bypass_threshold > 0 && info.bypass_threshold < ((size_t)64 << 20),
                      "mmad has relay paths, and bypass below %zu B", info.bypass_threshold);
    } else {
        printf("bypass_small: %s: mmad should have libmma run every copy natively\n",
               ngpu == 1 ? "one GPU" : extra_one_path() ? "--max-paths=1" : "no relay path");
        ck_assert_msg(info.bypass_threshold == MMA_BYPASS_ALL, "no copy can relay, and bypass below %zu B",
                      info.bypass_threshold);
    }
    size_t n = info.bypass_threshold == MMA_BYPASS_ALL ? (size_t)64 << 20 : info.bypass_threshold / 2 + 1;
    uint8_t *h, *back, *d;
    MM(mma_host_alloc(c, n, (void **)&h));
    MM(mma_host_alloc(c, n, (void **)&back));
    MM(mma_device_alloc(c, 0, n, (void **)&d));
    fill_rand(h, n);
    mma_copy_t t = 1;
    MM(mma_memcpy_async(c, d, h, n, NULL, &t));
    ck_assert_msg(t == 0, "a small copy should go native");
    MM(mma_memcpy(c, back, d, n));
    ck_assert(memcmp(h, back, n) == 0);
    MM(mma_free(c, d));
    MM(mma_free(c, back));
    MM(mma_free(c, h));
    mma_disconnect(c);
}
END_TEST

static int wait_socket_at(const char *path)
{
    for (int i = 0; i < 600; i++) { /* mmad allocates staging buffers first */
        struct sockaddr_un a = {.sun_family = AF_UNIX};
        strcpy(a.sun_path, path);
        int fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
            close(fd);
            return 0;
        }
        close(fd);
        usleep(50000);
    }
    return -1;
}

static int wait_socket(void)
{
    return wait_socket_at(sock_path);
}

/* A second mmad of the test's own (cuda, errors logged only) on sock with
 * up to two more options (opt2 only after opt1), serving once this
 * returns. */
static pid_t another_mmad(const char *sock, const char *opt1, const char *opt2)
{
    char arg[160];
    snprintf(arg, sizeof arg, "--socket=%s", sock);
    pid_t pid = fork();
    if (pid == 0) {
        const char *argv_m[] = {"mmad", "--backend=cuda", arg, "--log=error", opt1, opt1 ? opt2 : NULL, NULL};
        execv(mmad, (char *const *)argv_m);
        _exit(127);
    }
    ck_assert_int_eq(wait_socket_at(sock), 0);
    return pid;
}

/* A client of a second mmad of the test's own on /tmp/mma-gpu-test-PID-TAG.sock
 * (sock2, 108 bytes), for a test that kills it (*pid). Copies from 4 MiB go
 * to it even on one GPU, where mmad would have libmma run every copy. */
static mma_client_t *client_of_own_mmad(const char *tag, char *sock2, pid_t *pid)
{
    snprintf(sock2, 108, "/tmp/mma-gpu-test-%d-%s.sock", (int)getpid(), tag);
    *pid = another_mmad(sock2, "--bypass-threshold=4M", NULL);
    mma_client_t *c;
    MM(mma_connect(sock2, &c));
    return c;
}

/* mmad is killed while a stream waits on two stream-ordered copies that it
 * has not started (the stream is still busy before them): libmma must
 * finish them natively once the stream reaches them, so the stream moves on
 * with the right data, and later copies go native. */
START_TEST(daemon_dies)
{
    char sock2[108];
    pid_t d2;
    mma_client_t *c = client_of_own_mmad("dies", sock2, &d2);
    int g = ngpu > 1 ? 1 : 0;
    size_t n = 256u << 20;
    uint8_t *h, *back, *d;
    MM(mma_host_alloc(c, n, (void **)&h));
    MM(mma_host_alloc(c, n, (void **)&back));
    MM(mma_device_alloc(c, g, n, (void **)&d));
    fill_rand(h, n);
    memset(back, 0, n);
    CU(cudaSetDevice(g));
    cudaStream_t s;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    ck_assert_int_eq(gt_spin(400000000LL, s), 0); /* ~0.2 s of work ahead of the copies */
    MM(mma_memcpy_async(c, d, h, n, (mma_stream_t)s, NULL));
    MM(mma_memcpy_async(c, back, d, n, (mma_stream_t)s, NULL));
    kill(d2, SIGKILL);
    waitpid(d2, NULL, 0);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    CU(cudaStreamSynchronize(s));
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double waited = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    ck_assert_msg(waited < 5.0, "the stream waited %.1f s after mmad died", waited);
    ck_assert_msg(memcmp(h, back, n) == 0, "copies finished after mmad died carry the wrong bytes");
    /* and a new copy still works, natively */
    fill_rand(h, 4096);
    MM(mma_memcpy(c, d, h, n));
    memset(back, 0, n);
    MM(mma_memcpy(c, back, d, n));
    ck_assert(memcmp(h, back, n) == 0);
    CU(cudaStreamDestroy(s));
    mma_disconnect(c);
    unlink(sock2);
}
END_TEST

/* mmad is gone before a stream-ordered copy is sent, and libmma has not
 * noticed yet: the send fails. The copy must still come after the work
 * queued ahead of it on the stream (here the native copy that writes its
 * source): libmma finishes it natively once the stream gets there, not at
 * once on a stream of its own. Two segments, so that it goes as a message
 * (not the submission ring) and the send itself fails. Until the stream
 * gets there mma_free refuses (MMA_ERR_BUSY) the copy's memory and any
 * memory libmma allocated, whose cudaFree or cudaHostUnregister would wait
 * for that stream while it waits for libmma; the caller's own memory,
 * only registered, it lets go at once. */
START_TEST(daemon_gone_at_send)
{
    char sock2[108];
    pid_t d2;
    mma_client_t *c = client_of_own_mmad("gone", sock2, &d2);
    int g = ngpu > 1 ? 1 : 0;
    size_t n = 64u << 20; /* above --cold-bypass and the bypass threshold: a copy for mmad */
    uint8_t *h, *back, *d, *other, *spare, *mine;
    MM(mma_host_alloc(c, n, (void **)&h));
    MM(mma_host_alloc(c, n, (void **)&back));
    MM(mma_device_alloc(c, g, n, (void **)&d));
    MM(mma_device_alloc(c, g, 4096, (void **)&other));
    MM(mma_host_alloc(c, 4096, (void **)&spare));
    fill_rand(h, n);
    memset(back, 0, n);
    CU(cudaSetDevice(g));
    CU(cudaMalloc((void **)&mine, 4096));
    MM(mma_device_register(c, g, mine, 4096));
    cudaStream_t s;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    CU(cudaMemsetAsync(d, 0, n, s)); /* on s: ordered before the copy that writes d */
    kill(d2, SIGKILL);
    waitpid(d2, NULL, 0);
    ck_assert_int_eq(gt_spin(400000000LL, s), 0); /* ~0.2 s of work ahead of the copies */
    CU(cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice, s));
    mma_segment_t segs[2] = {{back, d, n / 2}, {back + n / 2, d + n / 2, n / 2}};
    mma_copy_t t = 1;
    MM(mma_memcpy_sg_async(c, segs, 2, (mma_stream_t)s, NULL, &t));
    ck_assert_msg(t != 0, "the copy ran natively at once, before the work ahead of it");
    /* Its memory must not be freed while the copy waits for its stream
     * (h is the native copy's, the caller's business). */
    ck_assert_int_eq(mma_free(c, back), MMA_ERR_BUSY);
    ck_assert_int_eq(mma_free(c, d), MMA_ERR_BUSY);
    ck_assert_int_eq(mma_free(c, other), MMA_ERR_BUSY);
    ck_assert_int_eq(mma_free(c, spare), MMA_ERR_BUSY);
    MM(mma_free(c, mine));
    CU(cudaStreamSynchronize(s));
    ck_assert_msg(memcmp(h, back, n) == 0, "the copy ran before the work queued ahead of it on its stream");
    MM(mma_wait(c, t));
    MM(mma_free(c, back));
    MM(mma_free(c, d));
    MM(mma_free(c, other));
    MM(mma_free(c, spare));
    CU(cudaFree(mine));
    CU(cudaStreamDestroy(s));
    mma_disconnect(c);
    unlink(sock2);
}
END_TEST

/* mma_disconnect while mmad is gone and a stream has not yet reached a
 * stream-ordered copy (~1 s of work ahead of it): it waits for the stream
 * to get there and finishes the copy natively, rather than unmapping the
 * flag page the stream is about to write and wait on. */
START_TEST(disconnect_waits_for_stream)
{
    char sock2[108];
    pid_t d2;
    mma_client_t *c = client_of_own_mmad("disc", sock2, &d2);
    int g = ngpu > 1 ? 1 : 0;
    size_t n = 64u << 20;
    uint8_t *h, *mine, *ref = malloc(n), *back = malloc(n);
    ck_assert(ref && back);
    MM(mma_host_alloc(c, n, (void **)&h));
    fill_rand(h, n);
    memcpy(ref, h, n);
    CU(cudaSetDevice(g));
    CU(cudaMalloc((void **)&mine, n)); /* the caller's: it outlives the client */
    CU(cudaMemset(mine, 0, n));
    MM(mma_device_register(c, g, mine, n));
    cudaStream_t s;
    CU(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    kill(d2, SIGKILL);
    waitpid(d2, NULL, 0);
    ck_assert_int_eq(gt_spin(2000000000LL, s), 0); /* ~1 s of work ahead of the copy */
    mma_segment_t segs[2] = {{mine, h, n / 2}, {mine + n / 2, h + n / 2, n / 2}};
    MM(mma_memcpy_sg_async(c, segs, 2, (mma_stream_t)s, NULL, NULL));
    mma_disconnect(c);
    CU(cudaStreamSynchronize(s));
    CU(cudaMemcpy(back, mine, n, cudaMemcpyDeviceToHost));
    ck_assert_msg(memcmp(ref, back, n) == 0, "the copy pending at disconnect did not land");
    CU(cudaStreamDestroy(s));
    CU(cudaFree(mine));
    free(ref);
    free(back);
    unlink(sock2);
}
END_TEST

/* A stream gate: a host function that holds its stream until *arg is set. */
static void CUDART_CB gate_wait(void *arg)
{
    while (!__atomic_load_n((const int *)arg, __ATOMIC_ACQUIRE))
        usleep(1000);
}

/* Whether something accepts connections on the Unix socket at path. */
static int socket_answers(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    int ok = fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0;
    if (fd >= 0)
        close(fd);
    return ok;
}

/* disconnect_leaves_memory's client (a process of its own: its stream
 * stays stuck, and the process ends with it): mmad d2 is killed, a
 * stream-ordered copy waits behind a gate that never opens, and
 * mma_disconnect must come back after its 5 s wait with the memory the
 * client allocated still allocated and registered. Returns 0 or what
 * failed. */
static int disconnect_with_stuck_stream(const char *sock2, pid_t d2, int g)
{
    static int gate; /* never opened */
    mma_client_t *c;
    if (mma_connect(sock2, &c) != MMA_OK)
        return 50;
    size_t n = 64u << 20;
    uint8_t *h, *d;
    if (mma_host_alloc(c, n, (void **)&h) != MMA_OK || mma_device_alloc(c, g, n, (void **)&d) != MMA_OK)
        return 51;
    cudaStream_t s;
    if (cudaSetDevice(g) != cudaSuccess || cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) != cudaSuccess ||
        cudaLaunchHostFunc(s, gate_wait, &gate) != cudaSuccess)
        return 52;
    kill(d2, SIGKILL);
    for (int i = 0; i < 500 && socket_answers(sock2); i++)
        usleep(10000);
    mma_segment_t segs[2] = {{d, h, n / 2}, {d + n / 2, h + n / 2, n / 2}};
    if (mma_memcpy_sg_async(c, segs, 2, (mma_stream_t)s, NULL, NULL) != MMA_OK)
        return 53;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    mma_disconnect(c);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double waited = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("disconnect_leaves_memory: mma_disconnect came back after %.1f s\n", waited);
    fflush(stdout); /* the process ends in _exit */
    if (waited > 10.0)
        return 54;
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, d) != cudaSuccess || a.type != cudaMemoryTypeDevice)
        return 55; /* freed under the stream */
    if (cudaPointerGetAttributes(&a, h) != cudaSuccess || a.type != cudaMemoryTypeHost)
        return 56; /* unregistered under the stream */
    return 0;
}

/* mma_disconnect with mmad gone and a stream that does not reach its
 * stream-ordered copy within the 5 s it waits: nothing will finish that
 * copy now, and cudaFree or cudaHostUnregister would wait for the stream
 * for ever, so libmma leaves the client's memory allocated (and the flag
 * page mapped) instead of hanging. */
START_TEST(disconnect_leaves_memory)
{
    char sock2[108];
    snprintf(sock2, sizeof sock2, "/tmp/mma-gpu-test-%d-stuck.sock", (int)getpid());
    pid_t d2 = another_mmad(sock2, "--bypass-threshold=4M", NULL);
    pid_t kid = fork();
    if (kid == 0)
        _exit(disconnect_with_stuck_stream(sock2, d2, ngpu > 1 ? 1 : 0));
    ck_assert_int_gt(kid, 0);
    int st = 0, done = 0;
    for (int i = 0; i < 600 && !done; i++) {
        done = waitpid(kid, &st, WNOHANG) == kid;
        if (!done)
            usleep(100000);
    }
    if (!done) {
        kill(kid, SIGKILL);
        waitpid(kid, &st, 0);
    }
    kill(d2, SIGKILL);
    waitpid(d2, NULL, 0);
    unlink(sock2);
    ck_assert_msg(done, "mma_disconnect hung (60 s) with mmad gone and a stream stuck before its copy");
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the client with a stuck stream failed with %d",
                  WIFEXITED(st) ? WEXITSTATUS(st) : -1);
}
END_TEST

/* A stream-ordered copy A whose send fails while the connection stays up
 * (MMA_ERR_IO: mmad stopped, its socket full and made non-blocking) has its
 * slot completed with the error at once, but its stream, held behind a
 * gate, has still to write the slot's `reached`. libmma must not give that
 * slot to a new copy before the stream has: the late write would set
 * `reached` back under the new copy, and mmad would never run it. So: A
 * fails; host-ordered copies through mmad take every other slot once
 * round, so that the next copy B would get A's slot; mmad is stopped while
 * B's stream writes B's `reached`, A's gate opens and A's stream writes
 * its own; mmad goes on, and B must complete, its bytes landed. */
START_TEST(failed_stream_copy_keeps_its_slot)
{
    char sock2[108];
    pid_t d2;
    setenv("MMA_NO_RING", "1", 1); /* every copy and every mma_prewarm a message */
    mma_client_t *c = client_of_own_mmad("slot", sock2, &d2);
    unsetenv("MMA_NO_RING");
    int g = ngpu > 1 ? 1 : 0;
    size_t n = 4u << 20; /* at the bypass threshold: a copy for mmad */
    uint8_t *h, *d, *back = malloc(n);
    ck_assert(back);
    MM(mma_host_alloc(c, n, (void **)&h));
    MM(mma_device_alloc(c, g, n, (void **)&d));
    fill_rand(h, n);
    CU(cudaSetDevice(g));
    CU(cudaMemset(d, 0, n));
    CU(cudaDeviceSynchronize()); /* zeroed before mmad writes d */
    cudaStream_t sa, sb;
    CU(cudaStreamCreateWithFlags(&sa, cudaStreamNonBlocking));
    CU(cudaStreamCreateWithFlags(&sb, cudaStreamNonBlocking));
    static int gate;
    CU(cudaLaunchHostFunc(sa, gate_wait, &gate));
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};

    /* A: its send fails on a full socket */
    int fd = client_socket_fd(sock2);
    ck_assert_int_ge(fd, 0);
    int fl = fcntl(fd, F_GETFL);
    ck_assert_int_ge(fl, 0);
    kill(d2, SIGSTOP);
    ck_assert_int_eq(fcntl(fd, F_SETFL, fl | O_NONBLOCK), 0);
    int rc = MMA_OK;
    for (int i = 0; i < 1000000 && rc == MMA_OK; i++)
        rc = mma_prewarm(c);
    ck_assert_msg(rc == MMA_ERR_IO, "mma_prewarm on a full socket: %s", mma_status_name(rc));
    mma_segment_t sg = {d, h, n};
    ck_assert_int_eq(mma_memcpy_sg_async(c, &sg, 1, (mma_stream_t)sa, &o, NULL), MMA_ERR_IO);
    ck_assert_int_eq(fcntl(fd, F_SETFL, fl), 0);
    kill(d2, SIGCONT);

    /* every other slot once round: the cursor is back at A's */
    mma_segment_t small = {d, h, 4096};
    for (unsigned i = 0; i < MMA_FLAG_SLOTS_DEFAULT - 1; i++) {
        mma_copy_t t;
        MM(mma_memcpy_sg_async(c, &small, 1, NULL, &o, &t));
        MM(mma_wait(c, t));
    }

    /* B while mmad is stopped; then A's stream writes its `reached` */
    kill(d2, SIGSTOP);
    mma_copy_t tb;
    MM(mma_memcpy_sg_async(c, &sg, 1, (mma_stream_t)sb, &o, &tb));
    usleep(200000); /* B's stream, idle, writes B's `reached` */
    __atomic_store_n(&gate, 1, __ATOMIC_RELEASE);
    CU(cudaStreamSynchronize(sa));
    kill(d2, SIGCONT);
    int ok = 0;
    for (int i = 0; i < 1000 && !ok; i++) {
        ok = cudaStreamQuery(sb) == cudaSuccess;
        if (!ok)
            usleep(10000);
    }
    if (!ok)
        kill(d2, SIGKILL);
    ck_assert_msg(ok, "copy B never ran: the failed copy's stream set `reached` back under it (same slot)");
    MM(mma_wait(c, tb));
    CU(cudaMemcpy(back, d, n, cudaMemcpyDeviceToHost));
    ck_assert_msg(memcmp(back, h, n) == 0, "copy B's bytes did not land");
    CU(cudaStreamDestroy(sa));
    CU(cudaStreamDestroy(sb));
    MM(mma_free(c, d));
    MM(mma_free(c, h));
    mma_disconnect(c);
    free(back);
    kill(d2, SIGKILL);
    waitpid(d2, NULL, 0);
    unlink(sock2);
}
END_TEST

/* mmad --trace --trace-gpu=1: every chunk's copies also timed on the GPU
 * (g_first_*, and a staged relay's hop in g_second_*), on the host's clock:
 * inside the chunk's issue..done window (give or take the GPUs' clock
 * alignment), the hop after the leg. One-hop relays (kernels) are not
 * timed. */
START_TEST(trace_gpu_times)
{
    char sock2[108], targ[200], tpath[120];
    snprintf(sock2, sizeof sock2, "/tmp/mma-gpu-test-%d-trace.sock", (int)getpid());
    snprintf(tpath, sizeof tpath, "/tmp/mma-gpu-test-%d-trace.csv", (int)getpid());
    snprintf(targ, sizeof targ, "--trace=%s", tpath);
    pid_t d2 = another_mmad(sock2, targ, "--trace-gpu=1");
    mma_client_t *c;
    MM(mma_connect(sock2, &c));
    size_t n = 256u << 20;
    uint8_t *h, *back, *d;
    MM(mma_host_alloc(c, n, (void **)&h));
    MM(mma_host_alloc(c, n, (void **)&back));
    MM(mma_device_alloc(c, 0, n, (void **)&d));
    fill_rand(h, n);
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
    size_t sizes[] = {n, 16u << 20};
    for (int k = 0; k < 2; k++) {
        mma_segment_t up = {d, h, sizes[k]}, down = {back, d, sizes[k]};
        mma_copy_t t;
        memset(back, 0, sizes[k]);
        MM(mma_memcpy_sg_async(c, &up, 1, NULL, &o, &t));
        MM(mma_wait(c, t));
        MM(mma_memcpy_sg_async(c, &down, 1, NULL, &o, &t));
        MM(mma_wait(c, t));
        ck_assert_msg(memcmp(h, back, sizes[k]) == 0, "round trip of %zu bytes differs", sizes[k]);
    }
    mma_disconnect(c);
    kill(d2, SIGTERM);
    int st;
    waitpid(d2, &st, 0);
    ck_assert_msg(WIFEXITED(st) && WEXITSTATUS(st) == 0, "mmad --trace did not exit cleanly (%d)", st);
    FILE *f = fopen(tpath, "r");
    ck_assert_msg(f != NULL, "no trace at %s", tpath);
    char line[512];
    ck_assert_ptr_nonnull(fgets(line, sizeof line, f));
    ck_assert_str_eq(line, TRACE_HEADER);
    const unsigned long long slack = 100000; /* ns: the GPUs' clocks against the host's */
    int direct = 0, staged = 0;
    while (fgets(line, sizeof line, f)) {
        trace_row_t r;
        ck_assert_msg(trace_row_parse(line, &r), "not a trace row: %s", line);
        ck_assert_int_eq(r.status, 0);
        const unsigned long long *g = r.g;
        if (!g[0]) {
            /* only a one-hop relay (a kernel, of the 16 MiB copies) goes untimed */
            ck_assert_msg(r.via != r.target && r.job_bytes < (128u << 20), "chunk not timed: %s", line);
            continue;
        }
        ck_assert_msg(g[0] + slack >= r.t_issue && g[0] <= g[1], "first copy's times off: %s", line);
        unsigned long long last = r.via == r.target ? g[1] : g[3];
        ck_assert_msg(last <= r.t_done + slack, "chunk ran past its done time: %s", line);
        if (r.via == r.target) {
            ck_assert_msg(g[2] == 0 && g[3] == 0, "a direct chunk has one copy: %s", line);
            direct++;
        } else {
            ck_assert_msg(g[2] && g[2] <= g[3] && g[2] + slack >= g[1], "hop not after its leg: %s", line);
            staged++;
        }
    }
    fclose(f);
    unlink(tpath);
    ck_assert_int_gt(direct, 0);
    if (ngpu > 1)
        ck_assert_int_gt(staged, 0); /* 256 MiB copies stage their relays */
}
END_TEST

int main(void)
{
    setenv("NCCL_NVLS_ENABLE", "0", 1);
    /* Count GPUs in a child, so this process forks its clients before
     * touching CUDA itself. */
    int pfd[2];
    if (pipe(pfd) != 0)
        return 1;
    pid_t p = fork();
    if (p == 0) {
        int n = 0;
        cudaError_t e = cudaGetDeviceCount(&n);
        if (e != cudaSuccess)
            n = -(int)e;
        ssize_t w = write(pfd[1], &n, sizeof n);
        (void)w;
        _exit(0);
    }
    int n = 0;
    ssize_t r = read(pfd[0], &n, sizeof n);
    waitpid(p, NULL, 0);
    if (r != sizeof n || n <= 0) {
        printf("SKIPPED: no CUDA GPU visible here (cudaGetDeviceCount: %s); the gpu tests need real GPUs\n",
               n < 0 ? cudaGetErrorString((cudaError_t)-n) : "0 devices");
        return 77;
    }
    ngpu = n;
    snprintf(sock_path, sizeof sock_path, "/tmp/mma-gpu-test-%d.sock", (int)getpid());
    /* mmad sits two folders up from this binary (build/tests/gpu/), wherever
     * the build folder was carried to; $MMAD_PATH overrides. */
    const char *env = getenv("MMAD_PATH");
    if (env) {
        snprintf(mmad, sizeof mmad, "%s", env);
    } else {
        ssize_t l = readlink("/proc/self/exe", mmad, sizeof mmad - 16);
        if (l <= 0)
            return 1;
        mmad[l] = 0;
        char *slash = strrchr(mmad, '/');
        strcpy(slash, "/../../mmad");
    }
    char arg[160];
    snprintf(arg, sizeof arg, "--socket=%s", sock_path);
    /* $MMAD_EXTRA: more options for the private mmad (to test a setting),
     * separated by spaces */
    char extra[512], *argv_m[16] = {"mmad", "--backend=cuda", arg, "--log=warn"};
    int argc_m = 4;
    snprintf(extra, sizeof extra, "%s", getenv("MMAD_EXTRA") ? getenv("MMAD_EXTRA") : "");
    for (char *save = NULL, *tok = strtok_r(extra, " ", &save); tok && argc_m < 15; tok = strtok_r(NULL, " ", &save))
        argv_m[argc_m++] = tok;
    argv_m[argc_m] = NULL;
    mmad_pid = fork();
    if (mmad_pid == 0) {
        execv(mmad, argv_m);
        _exit(127);
    }
    if (wait_socket() != 0) {
        fprintf(stderr, "mmad did not come up on %s\n", sock_path);
        kill(mmad_pid, SIGKILL);
        return 1;
    }
    printf("gpu tests: %d GPUs, private mmad pid %d on %s\n", ngpu, (int)mmad_pid, sock_path);
    Suite *s = suite_create("gpu");
    TCase *tc = tcase_create("gpu");
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, sizes_offsets_every_gpu);
    tcase_add_test(tc, scatter_gather);
    tcase_add_test(tc, stream_order);
    tcase_add_test(tc, one_gib);
    tcase_add_test(tc, many_clients);
    tcase_add_test(tc, visible_devices);
    tcase_add_test(tc, bypass_small);
    tcase_add_test(tc, one_hop_relays);
    tcase_add_test(tc, one_hop_resident_kernels);
    tcase_add_test(tc, relays_after_engine_closes_regions);
    tcase_add_test(tc, one_hop_keeps_off_busy_gpu);
    tcase_add_test(tc, daemon_dies);
    tcase_add_test(tc, daemon_gone_at_send);
    tcase_add_test(tc, disconnect_waits_for_stream);
    tcase_add_test(tc, disconnect_leaves_memory);
    tcase_add_test(tc, failed_stream_copy_keeps_its_slot);
    tcase_add_test(tc, trace_gpu_times);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    kill(mmad_pid, SIGTERM);
    int st;
    waitpid(mmad_pid, &st, 0);
    if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
        printf("mmad did not exit cleanly (status %d)\n", st);
        failed++;
    }
    return failed ? 1 : 0;
}
