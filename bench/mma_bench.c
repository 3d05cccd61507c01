/* mma-bench: native cudaMemcpyAsync against mmad, in one run on one box.
 *
 *   mma-bench [--socket S] [--gpu T] [--dir h2d|d2h|both] [--min 4K] [--max 4G]
 *             [--paths-at 1G] [--lat-reps N] [--csv FILE] [--quick]
 *             [--sections ceiling,sizes,sporadic,paths,latency] [--warm-ms 3]
 *   mma-bench --scenarios [--socket S] [--secs 1.5] [--csv FILE]
 *
 * --scenarios runs the contention, fairness and priority scenarios (see
 * scenarios.c): worker processes are forked before anything touches CUDA.
 *
 * Sections: the box ceiling (every GPU copying into its own memory at once,
 * natively), then per size native vs mma (all paths) with the speedup, one
 * copy at a time and, from 1 MiB, QDEPTH copies in flight (queued, as weight
 * loading issues them), followed by the break-even size; then 1..N paths at
 * one size, then small-copy latency (p50/p99) native vs mma, and the daemon's
 * CPU use while it sustained the large copies. Every size's mma copies (single
 * and queued) are checked byte for byte, and the largest size on a round trip.
 * Needs real GPUs (a simulated mmad has no native side to compare with). */
#define _GNU_SOURCE
#include <cuda_runtime_api.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "ceiling.h"
#include "mma.h"
#include "util.h"
#define TOOL_NAME "mma-bench"
#include "tool_check.h"

static void human(size_t n, char *out, size_t len)
{
    if (n >= (1ull << 30))
        snprintf(out, len, "%zuG", n >> 30);
    else if (n >= (1u << 20))
        snprintf(out, len, "%zuM", n >> 20);
    else
        snprintf(out, len, "%zuK", n >> 10);
}

static double pct(double *v, int n, double p)
{
    qsort(v, (size_t)n, sizeof *v, mma_cmp_double);
    int i = (int)(p * (n - 1) + 0.5);
    return v[i];
}

/* Copies in flight in the queued columns (nat-q, mma-q). */
#define QDEPTH 4

typedef struct ctx {
    mma_client_t *c;
    int gpu, ngpu;
    cudaStream_t stream, stream2; /* stream2: the control's second native stream */
    char *host, *dev, *back;
    size_t cap;
    FILE *csv;
    const char *card;
    /* the box ceiling's buffers (ceil_open), kept for the local ceilings
     * beside each size's copies */
    bench_box_t box;
} ctx_t;

/* After a native phase of n-byte copies: mmad's link monitor (NVML, a
 * reading round every ~0.25 s on 4 GPUs) sees the bench's own native copies
 * as a neighbour loading the target's link and stops relays through it until
 * a reading shows the link quiet. Give it that reading before measuring mma,
 * as a neighbour that stopped would. Small copies never reach the limit. */
#define SETTLE_US 500000
static void after_native(size_t n)
{
    if (n >= (1u << 20))
        usleep(SETTLE_US);
}

int mma_bench_scenarios(const char *sock, double secs, FILE *csv);

/* 4K..256K and 64M..4G in steps of 4; 1M..64M in steps of 2, where native
 * and mma cross over. */
static size_t next_size(size_t n)
{
    return n >= (1u << 20) && n < (64u << 20) ? n * 2 : n * 4;
}

static int reps_for(size_t n)
{
    return n <= (1u << 20) ? 200 : n <= (64u << 20) ? 20 : n <= (1u << 30) ? 7 : 4;
}

/* Seconds of one copy. mode 0 native, 1 mma host-ordered through mmad, 2
 * mma on a stream, 3 mma as a user gets it (bypass allowed), 4 native on a
 * second stream (the control for 3, which below the bypass is a native copy
 * on libmma's own stream). */
static double one_copy(ctx_t *x, int dir, size_t n, int mode, int paths)
{
    void *dst = dir == 0 ? (void *)x->dev : (void *)x->back;
    const void *src = dir == 0 ? (const void *)x->host : (const void *)x->dev;
    double t0 = mma_now_s();
    if (mode == 0 || mode == 4) {
        cudaStream_t st = mode == 0 ? x->stream : x->stream2;
        CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, st));
        CK(cudaStreamSynchronize(st));
    } else {
        mma_segment_t s = {dst, src, n};
        mma_copy_opts_t o = {.flags = mode == 3 ? 0u : MMA_COPY_NO_BYPASS, .max_paths = paths};
        mma_copy_t tk;
        if (mode == 1 || mode == 3) {
            MK(mma_memcpy_sg_async(x->c, &s, 1, NULL, &o, &tk));
            MK(mma_wait(x->c, tk));
        } else {
            MK(mma_memcpy_sg_async(x->c, &s, 1, (mma_stream_t)x->stream, &o, &tk));
            CK(cudaStreamSynchronize(x->stream));
            MK(mma_query(x->c, tk));
        }
    }
    return mma_now_s() - t0;
}

/* Warm-up before timed copies: at least one copy, and copies for at least
 * this long. mma's copies follow a pause (after_native) and the box is
 * slower for a while after one (4x H200: 8-10% for the first millisecond of
 * copies, in mmad as well as around it,
 * bench/results/2026-11-27-4xH200-kcopy-vs-mmad/), while native's follow
 * other copies; so every mode warms up alike. What a copy after a pause
 * costs is the sporadic section's. */
#define WARM_S 0.003
static double warm_s = WARM_S; /* --warm-ms */

/* Median seconds of one copy (modes as one_copy), after the warm-up. */
static double time_copy(ctx_t *x, int dir, size_t n, int mode, int paths, double *samples, int reps)
{
    double w0 = mma_now_s();
    do
        (void)one_copy(x, dir, n, mode, paths);
    while (mma_now_s() - w0 < warm_s);
    for (int r = 0; r < reps; r++)
        samples[r] = one_copy(x, dir, n, mode, paths);
    return pct(samples, reps, 0.5);
}

/* Copies of modes[0..nm) (as one_copy) taken in turns, copy by copy, so
 * drift on the box (other threads, clocks) falls on all alike; which goes
 * first rotates, so that none is always the copy that follows another's.
 * Mode i's samples in s[i]; with warm, one turn first that is not kept; each
 * copy after a pause of gap_us. */
static void time_in_turns(ctx_t *x, int dir, size_t n, const int *modes, int nm, double **s, int reps, int warm,
                          unsigned gap_us)
{
    for (int r = warm ? -1 : 0; r < reps; r++)
        for (int k = 0; k < nm; k++) {
            int i = (k + r + nm) % nm;
            if (gap_us)
                usleep(gap_us);
            double t = one_copy(x, dir, n, modes[i], 0);
            if (r >= 0)
                s[i][r] = t;
        }
}

/* Native (mode 0), native on a second stream (4) and mma as a user gets it
 * (3) in turns (time_in_turns), after one warm-up turn. Their samples in
 * s[0], s[1], s[2]. The second stream is the control: below the bypass,
 * mma's copy is a native copy on libmma's own stream, and two streams taken
 * in turns differ by themselves (16 KiB H2D on H200: 0.81x, the second
 * stream's copies slower, over the first few hundred turns, then ~0.97x;
 * bench/results/2026-11-27-1xH200-pairs/). */
static void time_turns(ctx_t *x, int dir, size_t n, double *s[3], int reps)
{
    static const int modes[3] = {0, 4, 3};
    time_in_turns(x, dir, n, modes, 3, s, reps, 1, 0);
}

/* GB/s with QDEPTH copies in flight: copy k goes to [k*n, (k+1)*n) of the
 * destination (and comes from the same range of the source), then all QDEPTH
 * are waited for; `rounds` times after one warm-up round; total bytes / total
 * time. mode 0: native, QDEPTH cudaMemcpyAsync on one stream, one sync per
 * round; 1: mma through mmad (no bypass, host-ordered), mma_wait on each. */
static double time_queued(ctx_t *x, int dir, size_t n, int mode, int rounds)
{
    char *dst = dir == 0 ? x->dev : x->back;
    const char *src = dir == 0 ? x->host : x->dev;
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS};
    double t0 = mma_now_s();
    for (int r = -1; r < rounds; r++) { /* r = -1: warm-up */
        if (r == 0)
            t0 = mma_now_s();
        if (mode == 0) {
            for (int k = 0; k < QDEPTH; k++)
                CK(cudaMemcpyAsync(dst + (size_t)k * n, src + (size_t)k * n, n, cudaMemcpyDefault, x->stream));
            CK(cudaStreamSynchronize(x->stream));
        } else {
            mma_copy_t tk[QDEPTH];
            for (int k = 0; k < QDEPTH; k++) {
                mma_segment_t s = {dst + (size_t)k * n, src + (size_t)k * n, n};
                MK(mma_memcpy_sg_async(x->c, &s, 1, NULL, &o, &tk[k]));
            }
            for (int k = 0; k < QDEPTH; k++)
                MK(mma_wait(x->c, tk[k]));
        }
    }
    return (double)n * QDEPTH * rounds / (mma_now_s() - t0) / 1e9;
}

/* Before copies in direction `dir` into [off, off+len) that check() is to
 * verify: H2D clears the device range; D2H gives the device range the host's
 * bytes (natively) and clears the host range the copies land in. */
static void prepare(ctx_t *x, int dir, size_t off, size_t len)
{
    if (dir == 0) {
        CK(cudaMemsetAsync(x->dev + off, 0, len, x->stream));
    } else {
        CK(cudaMemcpyAsync(x->dev + off, x->host + off, len, cudaMemcpyHostToDevice, x->stream));
        memset(x->back + off, 0, len);
    }
    CK(cudaStreamSynchronize(x->stream));
}

/* 1 when the destination's [off, off+len) holds the host buffer's bytes
 * (H2D: read back natively). */
static int check(ctx_t *x, int dir, size_t off, size_t len)
{
    if (dir == 0) {
        CK(cudaMemcpyAsync(x->back + off, x->dev + off, len, cudaMemcpyDeviceToHost, x->stream));
        CK(cudaStreamSynchronize(x->stream));
    }
    return memcmp(x->back + off, x->host + off, len) == 0;
}

/* Sporadic copies: native (mode 0) and auto (3) in turns (time_in_turns),
 * each after a pause of gap_us; their samples in sn, sa. Then one more auto
 * copy into a cleared destination, checked: 1 when its bytes match. */
static int time_sporadic(ctx_t *x, int dir, size_t n, unsigned gap_us, double *sn, double *sa, int reps)
{
    static const int modes[2] = {0, 3};
    double *s[2] = {sn, sa};
    time_in_turns(x, dir, n, modes, 2, s, reps, 0, gap_us);
    prepare(x, dir, 0, n);
    usleep(gap_us);
    (void)one_copy(x, dir, n, 3, 0);
    return check(x, dir, 0, n);
}

/* The smallest measured size from which `a` >= `b` at it and every larger
 * measured size (sizes ascending; a[i] < 0 means not measured, skipped);
 * 0 when there is none. */
static size_t break_even(const size_t *sz, const double *a, const double *b, int n)
{
    size_t at = 0;
    for (int i = n - 1; i >= 0; i--) {
        if (a[i] < 0 || b[i] < 0)
            continue;
        if (a[i] < b[i])
            break;
        at = sz[i];
    }
    return at;
}

/* The box ceiling's buffers: per_gpu bytes of pinned host memory (as the
 * client's) and of device memory for every GPU, with a stream each. */
static void ceil_open(ctx_t *x, size_t per_gpu)
{
    bench_box_t *b = &x->box;
    if (b->cap)
        return;
    b->ngpu = x->ngpu;
    b->home = x->gpu;
    for (int g = 0; g < x->ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaMalloc((void **)&b->dev[g], per_gpu));
        CK(cudaStreamCreateWithFlags(&b->st[g], cudaStreamNonBlocking));
        MK(mma_host_alloc(x->c, per_gpu, (void **)&b->host[g]));
        memset(b->host[g], g + 1, per_gpu);
    }
    CK(cudaSetDevice(x->gpu));
    b->cap = per_gpu;
}

static void ceil_close(ctx_t *x)
{
    bench_box_t *b = &x->box;
    if (!b->cap)
        return;
    for (int g = 0; g < x->ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaFree(b->dev[g]));
        CK(cudaStreamDestroy(b->st[g]));
        MK(mma_free(x->c, b->host[g]));
    }
    CK(cudaSetDevice(x->gpu));
    b->cap = 0;
}

/* The box ceiling at the start: the best of four rounds after a warm-up. */
static double ceiling(ctx_t *x, int dir, size_t per_gpu)
{
    ceil_open(x, per_gpu);
    double best = 0, best_end[BENCH_MAXG] = {0}, end[BENCH_MAXG];
    for (int r = 0; r < 5; r++) {
        double gbps = bench_ceil_round(&x->box, dir, per_gpu, end);
        if (r > 0 && gbps > best) { /* r = 0 warms up */
            best = gbps;
            memcpy(best_end, end, sizeof end);
        }
    }
    printf("%s per GPU, ending at:", dir == 0 ? "H2D" : "D2H");
    for (int g = 0; g < x->ngpu; g++)
        printf(" gpu%d %.1f GB/s (%.2f ms)", g, (double)per_gpu / best_end[g] / 1e9, best_end[g] * 1e3);
    printf("\n");
    return best;
}

/* Rounds of the local ceiling beside each size's copies. */
#define LOCAL_CEIL_ROUNDS 4

/* The box ceiling beside one size's copies: the median of
 * LOCAL_CEIL_ROUNDS rounds (the box's host side drifts by several percent
 * within minutes, and mma's figure beside it is a median too); 0 without
 * the ceiling section. */
static double local_ceiling(ctx_t *x, int dir)
{
    if (!x->box.cap)
        return 0;
    double r[LOCAL_CEIL_ROUNDS];
    for (int i = 0; i < LOCAL_CEIL_ROUNDS; i++)
        r[i] = bench_ceil_round(&x->box, dir, x->box.cap, NULL);
    return bench_median(r, LOCAL_CEIL_ROUNDS);
}

/* Rounds of the same-bytes ceiling (each is short: a copy's bytes spread
 * over all GPUs), after one that warms up. */
#define SAME_CEIL_ROUNDS 9

/* The same-bytes ceiling beside one size's copies (bench_same_ceiling):
 * 0 without the ceiling section. */
static double same_ceiling(ctx_t *x, int dir, size_t n)
{
    return x->box.cap ? bench_same_ceiling(&x->box, dir, n, SAME_CEIL_ROUNDS) : 0;
}

static void fill(char *p, size_t n, uint64_t seed)
{
    uint64_t *q = (uint64_t *)p, x = seed | 1;
    for (size_t i = 0; i < n / 8; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        q[i] = x;
    }
}

int main(int argc, char **argv)
{
    const char *sock = NULL, *csvpath = NULL, *dirs = "both";
    size_t minsz = 4096, maxsz = 4ull << 30, paths_at = 1ull << 30;
    int lat_reps = 2000, gpu = 0, quick = 0, scenarios = 0;
    double secs = 1.5;
    const char *sections = "ceiling,sizes,sporadic,paths,latency";
    static const struct option lo[] = {{"socket", 1, 0, 's'}, {"gpu", 1, 0, 'g'},      {"dir", 1, 0, 'd'},
                                       {"min", 1, 0, 'a'},    {"max", 1, 0, 'b'},      {"paths-at", 1, 0, 'p'},
                                       {"csv", 1, 0, 'c'},    {"lat-reps", 1, 0, 'l'}, {"quick", 0, 0, 'q'},
                                       {"help", 0, 0, 'h'},   {"sections", 1, 0, 'S'}, {"scenarios", 0, 0, 'X'},
                                       {"secs", 1, 0, 'T'},   {"warm-ms", 1, 0, 'W'},  {0}};
    int o;
    while ((o = getopt_long(argc, argv, "s:g:d:a:b:p:c:l:qh", lo, NULL)) != -1) {
        switch (o) {
        case 's': sock = optarg; break;
        case 'g':
            if (bench_int_arg("mma-bench", "--gpu", optarg, 0, 1023, &gpu))
                return 2;
            break;
        case 'd':
            if (strcmp(optarg, "h2d") && strcmp(optarg, "d2h") && strcmp(optarg, "both")) {
                fprintf(stderr, "mma-bench: --dir %s: h2d, d2h or both\n", optarg);
                return 2;
            }
            dirs = optarg;
            break;
        case 'a':
            if (bench_size_arg("mma-bench", "--min", optarg, 4096, (size_t)1 << 40, &minsz))
                return 2;
            break;
        case 'b':
            if (bench_size_arg("mma-bench", "--max", optarg, 4096, (size_t)1 << 40, &maxsz))
                return 2;
            break;
        case 'p':
            if (bench_size_arg("mma-bench", "--paths-at", optarg, 4096, (size_t)1 << 40, &paths_at))
                return 2;
            break;
        case 'c': csvpath = optarg; break;
        case 'l':
            /* --quick takes a quarter: at least 4 copies a figure */
            if (bench_int_arg("mma-bench", "--lat-reps", optarg, 16, 1000000, &lat_reps))
                return 2;
            break;
        case 'q': quick = 1; break;
        case 'S': sections = optarg; break;
        case 'X': scenarios = 1; break;
        case 'T':
            if (bench_double_arg("mma-bench", "--secs", optarg, 0.1, 3600, &secs))
                return 2;
            break;
        case 'W':
            if (bench_double_arg("mma-bench", "--warm-ms", optarg, 0, 10000, &warm_s))
                return 2;
            warm_s /= 1e3;
            break;
        default:
            printf("usage: mma-bench [--socket S] [--gpu T] [--dir h2d|d2h|both] [--min 4K] [--max 4G] "
                   "[--paths-at 1G] [--lat-reps N] [--csv FILE] [--quick] [--sections LIST] [--warm-ms 3]\n"
                   "       mma-bench --scenarios [--socket S] [--secs 1.5] [--csv FILE]\n"
                   "Needs real GPUs: a simulated mmad has no native side to compare with.\n"
                   "--sections (default ceiling,sizes,sporadic,paths,latency):\n"
                   "  ceiling  all GPUs copy into their own memory at once, natively\n"
                   "  sizes    per size, native vs mma: one copy at a time (native, mma = through mmad\n"
                   "           without bypass, auto = as a user gets it, mma-stream), and from 1 MiB up\n"
                   "           to --max/%d, %d copies in flight into distinct ranges (nat-q, mma-q,\n"
                   "           %%ceil-q = mma-q / the local ceiling); from 1 MiB the ceiling is taken\n"
                   "           again beside each size's copies (ceil GB/s, median of 4 rounds): %%ceiling\n"
                   "           holds mma against it, %%start against the ceiling section's best;\n"
                   "           then the break-even size\n"
                   "           (mma >= native there and at every larger size) and mma/native at 8 MiB;\n"
                   "           every size's mma copies are checked byte for byte\n"
                   "  sporadic 2, 8, 16 and 64 MiB copies each after a pause of 1 or 10 ms, native and auto in\n"
                   "           turns (what a copy costs that finds mmad idle)\n"
                   "  paths    1..N paths at --paths-at\n"
                   "  latency  p50/p99 of small copies (4K-4M, up to --max), native vs mma\n"
                   "--warm-ms: copies before every timed series, at least one (default 3)\n"
                   "--scenarios: A each GPU's own native process, one at a time; B all at once;\n"
                   "  C0 B plus one more native process loading gpu0 (C's baseline); C B plus one\n"
                   "  multipath client loading gpu0 (natives vs C0, target >= 90%%, and vs B);\n"
                   "  D one multipath client per GPU; E latency class under a bulk load\n",
                   QDEPTH, QDEPTH);
            return o == 'h' ? 0 : 2;
        }
    }
    if (minsz > maxsz) {
        fprintf(stderr, "mma-bench: --min %zu is above --max %zu\n", minsz, maxsz);
        return 2;
    }
    if (!sock)
        sock = getenv("MMA_SOCKET") ? getenv("MMA_SOCKET") : "/run/mma/mmad.sock";
    if (scenarios) {
        FILE *csv = csvpath ? fopen(csvpath, "w") : NULL;
        int rc = mma_bench_scenarios(sock, secs, csv);
        if (csv)
            fclose(csv);
        return rc;
    }
    int sec_ceiling = strstr(sections, "ceiling") != NULL, sec_sizes = strstr(sections, "sizes") != NULL;
    int sec_paths = strstr(sections, "paths") != NULL, sec_lat = strstr(sections, "latency") != NULL;
    int sec_spor = strstr(sections, "sporadic") != NULL;
    ctx_t x = {.gpu = gpu};
    MK(mma_connect(sock, &x.c));
    mma_info_t info;
    MK(mma_get_info(x.c, &info));
    if (info.simulated) {
        fprintf(stderr, "mma-bench: mmad runs the simulated box; there is no native side to compare with.\n"
                        "Use mma-demo there, or run mma-bench on a GPU machine.\n");
        return 2;
    }
    x.ngpu = info.gpu_count;
    if (gpu < 0 || gpu >= x.ngpu) {
        fprintf(stderr, "mma-bench: --gpu %d: %d GPUs\n", gpu, x.ngpu);
        return 2;
    }
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, gpu));
    x.card = prop.name;
    CK(cudaSetDevice(gpu));
    CK(cudaStreamCreateWithFlags(&x.stream, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&x.stream2, cudaStreamNonBlocking));
    x.cap = maxsz;
    MK(mma_host_alloc(x.c, maxsz, (void **)&x.host));
    MK(mma_host_alloc(x.c, maxsz, (void **)&x.back));
    MK(mma_device_alloc(x.c, gpu, maxsz, (void **)&x.dev));
    fill(x.host, maxsz, 12345);
    if (csvpath) {
        x.csv = fopen(csvpath, "w");
        if (!x.csv) {
            perror(csvpath);
            return 1;
        }
        fprintf(x.csv, "card,section,dir,size,paths,native_gbps,mma_gbps,speedup,extra,natq_gbps,mmaq_gbps,"
                       "ceilq_pct,local_ceil_gbps,same_ceil_gbps\n");
    }
    time_t now = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    char bypass[64];
    if (info.bypass_threshold == MMA_BYPASS_ALL)
        snprintf(bypass, sizeof bypass, "every copy bypasses (no relay paths)");
    else
        snprintf(bypass, sizeof bypass, "bypass below %zu B", info.bypass_threshold);
    printf("mma-bench %s | %d x %s | target gpu%d | mmad %s, %s\n", date, x.ngpu, x.card, gpu, info.backend, bypass);
    pid_t dpid = bench_daemon_pid(sock);

    int do_dir[2] = {strcmp(dirs, "d2h") != 0, strcmp(dirs, "h2d") != 0};
    static const char *dn[2] = {"H2D", "D2H"};
    double ceil_gbps[2] = {0, 0};
    size_t per_gpu = quick ? (256u << 20) : (1u << 30);
    if (sec_ceiling)
        printf("\n## Box ceiling: all %d GPUs copy %zu MiB into their own memory at once (native)\n", x.ngpu,
               per_gpu >> 20);
    for (int d = 0; d < 2; d++)
        if (do_dir[d] && sec_ceiling) {
            ceil_gbps[d] = ceiling(&x, d, per_gpu);
            printf("%s ceiling: %.1f GB/s\n", dn[d], ceil_gbps[d]);
            if (x.csv)
                fprintf(x.csv, "%s,ceiling,%s,%zu,%d,,%.3f,,,,,\n", x.card, dn[d], per_gpu, x.ngpu, ceil_gbps[d]);
        }

    int verified = 1; /* every size's mma copies matched */
    double *samples = malloc(sizeof(double) * (size_t)(lat_reps > 200 ? lat_reps : 200));
    double *samples2 = malloc(sizeof(double) * (size_t)(lat_reps > 200 ? lat_reps : 200));
    double *samples3 = malloc(sizeof(double) * (size_t)(lat_reps > 200 ? lat_reps : 200));
    double *turns[3] = {samples, samples3, samples2}; /* native, native on stream2, auto */
    if (!samples || !samples2 || !samples3) {
        fprintf(stderr, "mma-bench: out of memory\n");
        return 1;
    }
    for (int d = 0; d < 2; d++) {
        if (!do_dir[d])
            continue;
        if (sec_sizes) {
        printf("\n## %s into gpu%d: native cudaMemcpyAsync vs mma, median of reps\n"
               "## mma = through mmad on every path; auto = what a user gets (native below the bypass threshold;\n"
               "## there auto/nat is against native copies taken in turns with auto's, copy by copy, and nat/nat2\n"
               "## against native copies on a second stream in the same turns: the control, since auto's copies\n"
               "## go on libmma's own stream and two streams taken in turns differ by themselves)\n"
               "## from 1 MiB, mma waits 0.5 s after native, so mmad's link monitor does not take the bench's own native copies for a neighbour's\n"
               "## nat-q, mma-q = %d copies in flight into distinct ranges, then wait for all, repeated: total bytes /"
               " total time (from 1 MiB; mma-q without bypass)\n"
               "## ceil GB/s = the %s box ceiling again beside each size's copies from 1 MiB (median of %d rounds,"
               " taken after its native copies);\n"
               "## %%ceiling, %%ceil-q = mma, mma-q against it (below 1 MiB against the start's); %%start = mma against"
               " the start's best-of-4 ceiling\n"
               "## same GB/s = the same-bytes ceiling: every GPU copies size/%d into its own memory at once (median of %d"
               " rounds; it pays a copy's start and end as mma's copy does); %%same = mma against it\n",
               dn[d], gpu, QDEPTH, dn[d], LOCAL_CEIL_ROUNDS, x.ngpu, SAME_CEIL_ROUNDS);
        printf("%8s %11s %10s %10s %10s %8s %8s %8s %9s %9s %9s %9s %7s %10s %10s %8s\n", "size", "native GB/s",
               "mma GB/s", "auto GB/s", "mma-stream", "mma/nat", "auto/nat", "nat/nat2", "ceil GB/s", "%ceiling", "%start",
               "same GB/s", "%same", "nat-q GB/s", "mma-q GB/s", "%ceil-q");
        size_t szs[64];
        double gns[64], gms[64], gnqs[64], gmqs[64];
        int nsz = 0;
        for (size_t n = minsz; n <= maxsz && nsz < 64; n = next_size(n)) {
            int reps = quick ? (reps_for(n) + 1) / 2 : reps_for(n);
            double tn = time_copy(&x, d, n, 0, 0, samples, reps);
            /* From 1 MiB, where the ceiling matters, it is taken again here
             * (native, so before the settling wait): mma's copies below are
             * held against this and against the one from the start. */
            double lc = n >= (1u << 20) ? local_ceiling(&x, d) : 0;
            double sc = n >= (1u << 20) ? same_ceiling(&x, d, n) : 0;
            after_native(n);
            prepare(&x, d, 0, n);
            double tm = time_copy(&x, d, n, 1, 0, samples, reps);
            int ok_n = check(&x, d, 0, n);
            /* Below the bypass, auto is libmma's own native copy: timed in
             * turns with a bare one (and the control, a bare one on a second
             * stream), so auto/nat compares the two at the same moment. */
            double ta, tn_auto = tn;
            char ctl[16] = "-";
            if (n < info.bypass_threshold) {
                time_turns(&x, d, n, turns, reps);
                tn_auto = pct(samples, reps, 0.5);
                ta = pct(samples2, reps, 0.5);
                snprintf(ctl, sizeof ctl, "%.2fx", tn_auto / pct(samples3, reps, 0.5));
            } else {
                ta = time_copy(&x, d, n, 3, 0, samples, reps);
            }
            double ts = time_copy(&x, d, n, 2, 0, samples, reps);
            double gn = (double)n / tn / 1e9, gm = (double)n / tm / 1e9, gs = (double)n / ts / 1e9;
            double ga = (double)n / ta / 1e9, auto_nat = tn_auto / ta;
            /* queued: QDEPTH ranges of n must fit the buffers */
            double gnq = -1, gmq = -1;
            if (n >= (1u << 20) && n <= x.cap / QDEPTH) {
                gnq = time_queued(&x, d, n, 0, reps);
                after_native(n);
                prepare(&x, d, 0, n * QDEPTH);
                gmq = time_queued(&x, d, n, 1, reps);
                ok_n &= check(&x, d, 0, n * QDEPTH);
            }
            verified &= ok_n;
            szs[nsz] = n, gns[nsz] = gn, gms[nsz] = gm, gnqs[nsz] = gnq, gmqs[nsz] = gmq, nsz++;
            char hs[16], q[48] = "", qcsv[48] = ",,";
            human(n, hs, sizeof hs);
            /* the local ceiling where there is one, else the start's */
            double cl = lc > 0 ? lc : ceil_gbps[d];
            if (gmq >= 0) {
                char pq[16] = "-";
                if (cl > 0)
                    snprintf(pq, sizeof pq, "%.1f%%", 100.0 * gmq / cl);
                snprintf(q, sizeof q, " %10.2f %10.2f %8s", gnq, gmq, pq);
                snprintf(qcsv, sizeof qcsv, "%.3f,%.3f,", gnq, gmq);
                if (cl > 0)
                    snprintf(qcsv + strlen(qcsv), sizeof qcsv - strlen(qcsv), "%.1f", 100.0 * gmq / cl);
            } else {
                snprintf(q, sizeof q, " %10s %10s %8s", "-", "-", "-");
            }
            char pc[16] = "-", ps[16] = "-", lcs[16] = "-"; /* no ceiling section: no share of it */
            char scs[16] = "-", psc[16] = "-";
            if (sc > 0) {
                snprintf(scs, sizeof scs, "%.1f", sc);
                snprintf(psc, sizeof psc, "%.1f%%", 100.0 * gm / sc);
            }
            if (cl > 0)
                snprintf(pc, sizeof pc, "%.1f%%", 100.0 * gm / cl);
            if (ceil_gbps[d] > 0)
                snprintf(ps, sizeof ps, "%.1f%%", 100.0 * gm / ceil_gbps[d]);
            if (lc > 0)
                snprintf(lcs, sizeof lcs, "%.1f", lc);
            printf("%8s %11.2f %10.2f %10.2f %10.2f %7.2fx %7.2fx %8s %9s %9s %9s %9s %7s%s%s\n", hs, gn, gm, ga, gs,
                   gm / gn, auto_nat, ctl, lcs, pc, ps, scs, psc, q, ok_n ? "" : "  MISMATCH");
            if (x.csv)
                fprintf(x.csv, "%s,size,%s,%zu,0,%.3f,%.3f,%.3f,stream %.3f auto %.3f ctl %s%s,%s,%.3f,%.3f\n", x.card,
                        dn[d], n, gn, gm, gm / gn, gs, ga, ctl, ok_n ? "" : " MISMATCH", qcsv, lc, sc);
            if (n > maxsz / 2)
                break;
        }
        char be[16] = "none", beq[16] = "none";
        size_t at = break_even(szs, gms, gns, nsz), atq = break_even(szs, gmqs, gnqs, nsz);
        if (at)
            human(at, be, sizeof be);
        if (atq)
            human(atq, beq, sizeof beq);
        int any_q = 0;
        for (int i = 0; i < nsz; i++)
            any_q |= gmqs[i] >= 0;
        if (!any_q)
            snprintf(beq, sizeof beq, "not measured");
        printf("break-even (mma without bypass >= native at this size and every larger one): %s\n", be);
        int i8 = -1;
        for (int i = 0; i < nsz; i++)
            if (szs[i] == (8u << 20))
                i8 = i;
        if (i8 >= 0)
            printf("at 8 MiB: mma/native = %.2fx\n", gms[i8] / gns[i8]);
        else
            printf("at 8 MiB: mma/native = not measured (not among the sizes)\n");
        printf("queued break-even (mma-q >= nat-q at this size and every larger one measured): %s\n", beq);
        /* The daemon's CPU while it sustains large copies back to back. */
        size_t big = maxsz >= (1u << 30) ? (1u << 30) : maxsz;
        double cpu0 = bench_cpu_user_sys_s(dpid), ns0 = bench_cpu_ns(dpid), t0 = mma_now_s();
        int nb = 0;
        while (mma_now_s() - t0 < 2.0 || nb < 3) {
            time_copy(&x, d, big, 1, 0, samples, 1);
            nb += 2;
        }
        double wall = mma_now_s() - t0, cpu1 = bench_cpu_user_sys_s(dpid), ns1 = bench_cpu_ns(dpid);
        char bs[16];
        human(big, bs, sizeof bs);
        if (dpid > 0 && cpu0 >= 0)
            printf("mmad CPU while sustaining %s %s copies for %.1f s: %.0f%% of one core (user+sys, /proc/PID/stat; "
                   "run time in schedstat: %.0f%%)\n",
                   dn[d], bs, wall, 100.0 * (cpu1 - cpu0) / wall,
                   ns0 >= 0 && ns1 >= 0 ? (ns1 - ns0) / 1e9 / wall * 100.0 : -1.0);
        if (x.csv)
            fprintf(x.csv, "%s,cpu,%s,%zu,0,,,,%.1f,,,\n", x.card, dn[d], big, 100.0 * (cpu1 - cpu0) / wall);
        }
        if (sec_spor) {
            int r = quick ? 8 : 16;
            printf("\n## %s sporadic copies: each after a pause, native and auto in turns, %d each (us)\n"
                   "## a copy after a pause finds mmad's threads asleep and its relay kernels ended, and the box\n"
                   "## itself slower for a while; auto/nat = native p50 / auto p50 (below 1.00x auto is slower)\n",
                   dn[d], r);
            printf("%8s %8s %10s %10s %10s %10s %9s %6s\n", "size", "pause", "nat p50", "nat p90", "auto p50",
                   "auto p90", "auto/nat", "bytes");
            size_t spor_sizes[] = {2u << 20, 8u << 20, 16u << 20, 64u << 20};
            unsigned gaps[] = {1000, 10000};
            for (size_t i = 0; i < sizeof spor_sizes / sizeof spor_sizes[0]; i++) {
                size_t s = spor_sizes[i];
                if (s > maxsz || s > x.cap)
                    continue;
                for (size_t g = 0; g < sizeof gaps / sizeof gaps[0]; g++) {
                    int ok_s = time_sporadic(&x, d, s, gaps[g], samples, samples2, r);
                    verified &= ok_s;
                    double n50 = pct(samples, r, 0.5) * 1e6, n90 = pct(samples, r, 0.9) * 1e6;
                    double a50 = pct(samples2, r, 0.5) * 1e6, a90 = pct(samples2, r, 0.9) * 1e6;
                    char hs[16];
                    human(s, hs, sizeof hs);
                    printf("%8s %6ums %10.1f %10.1f %10.1f %10.1f %8.2fx %6s\n", hs, gaps[g] / 1000, n50, n90, a50,
                           a90, n50 / a50, ok_s ? "ok" : "BAD");
                    if (x.csv)
                        fprintf(x.csv, "%s,sporadic,%s,%zu,%u,%.2f,%.2f,%.3f,p90 %.2f/%.2f,,,\n", x.card, dn[d], s,
                                gaps[g], n50, a50, n50 / a50, n90, a90);
                }
            }
        }
        if (!sec_paths && !sec_lat)
            continue;

        size_t n = paths_at <= maxsz ? paths_at : maxsz;
        if (sec_paths) {
        printf("\n## %s %zu MiB into gpu%d over 1..%d paths\n%6s %12s %8s\n", dn[d], n >> 20, gpu, x.ngpu, "paths",
               "mma GB/s", "speedup");
        double tn = time_copy(&x, d, n, 0, 0, samples, 5);
        for (int p = 1; p <= x.ngpu; p++) {
            double tm = time_copy(&x, d, n, 1, p, samples, 5);
            printf("%6d %12.2f %7.2fx\n", p, (double)n / tm / 1e9, tn / tm);
            if (x.csv)
                fprintf(x.csv, "%s,paths,%s,%zu,%d,%.3f,%.3f,%.3f,,,,\n", x.card, dn[d], n, p, (double)n / tn / 1e9,
                        (double)n / tm / 1e9, tn / tm);
        }
        }
        if (!sec_lat)
            continue;

        printf("\n## %s latency, %d copies each (us): native vs mma through mmad (no bypass)\n"
               "## auto = mma as a user gets it (native below the bypass), taken in turns with native, copy by copy;\n"
               "## auto/nat = native p50 / auto p50, as in the tables above (below 1.00x auto is slower);\n"
               "## nat/nat2 = native p50 / native p50 on a second stream in the same turns (the control)\n",
               dn[d], lat_reps);
        printf("%8s %10s %10s %10s %10s %10s %10s %10s\n", "size", "nat p50", "nat p99", "mma p50", "mma p99",
               "auto p50", "auto/nat", "nat/nat2");
        size_t lat_sizes[] = {4096, 16384, 65536, 1u << 20, 4u << 20};
        for (size_t i = 0; i < sizeof lat_sizes / sizeof lat_sizes[0] && lat_sizes[i] <= x.cap; i++) {
            size_t s = lat_sizes[i];
            int r = quick ? lat_reps / 4 : lat_reps;
            time_turns(&x, d, s, turns, r);
            double n50 = pct(samples, r, 0.5) * 1e6, n99 = pct(samples, r, 0.99) * 1e6;
            double a50 = pct(samples2, r, 0.5) * 1e6, c50 = pct(samples3, r, 0.5) * 1e6;
            after_native(s);
            time_copy(&x, d, s, 1, 0, samples, r);
            double m50 = pct(samples, r, 0.5) * 1e6, m99 = pct(samples, r, 0.99) * 1e6;
            char hs[16];
            human(s, hs, sizeof hs);
            printf("%8s %10.1f %10.1f %10.1f %10.1f %10.1f %9.2fx %9.2fx\n", hs, n50, n99, m50, m99, a50, n50 / a50,
                   n50 / c50);
            if (x.csv)
                fprintf(x.csv, "%s,latency,%s,%zu,0,%.2f,%.2f,,p99 %.2f/%.2f auto %.2f,,,\n", x.card, dn[d], s, n50, m50,
                        n99, m99, a50);
        }
    }

    /* Round trip of the largest size through mmad, every byte compared. */
    mma_copy_opts_t all = {.flags = MMA_COPY_NO_BYPASS};
    mma_segment_t up = {x.dev, x.host, maxsz}, down = {x.back, x.dev, maxsz};
    mma_copy_t t;
    memset(x.back, 0, maxsz);
    MK(mma_memcpy_sg_async(x.c, &up, 1, NULL, &all, &t));
    MK(mma_wait(x.c, t));
    MK(mma_memcpy_sg_async(x.c, &down, 1, NULL, &all, &t));
    MK(mma_wait(x.c, t));
    int ok = memcmp(x.host, x.back, maxsz) == 0;
    if (!verified)
        printf("\nsome sizes' copies did NOT match (MISMATCH rows above)\n");
    char ms[16];
    human(maxsz, ms, sizeof ms);
    printf("\nround trip of %s host -> gpu%d -> host through mmad: %s\n", ms, gpu, ok ? "every byte matches" : "MISMATCH");
    if (x.csv)
        fclose(x.csv);
    free(samples);
    free(samples2);
    free(samples3);
    ceil_close(&x);
    mma_free(x.c, x.dev);
    mma_free(x.c, x.back);
    mma_free(x.c, x.host);
    mma_disconnect(x.c);
    return ok && verified ? 0 : 1;
}
