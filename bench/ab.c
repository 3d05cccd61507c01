/* mma-ab: mmad configurations against each other, copy by copy.
 *
 * The GPU boxes drift: the native ceiling moved 161-180 GB/s within minutes
 * on one machine (bench/results/2026-11-27-4xH200-ceiling-drift/), more than
 * most settings change. Running one configuration after another compares
 * the machine's moods as much as the settings. This connects to several
 * mmads at once (each started with its own options and socket, all on the
 * same GPUs) and takes, in every round, a burst of copies through each in
 * turn (order rotated each round), a burst of native copies and one box
 * ceiling (every GPU copying PER_GPU bytes into its own memory at once, as
 * mma-bench's), so that drift falls on all alike. The first copy of every
 * burst is a warm-up and not counted (an mmad's relay kernels may have
 * ended while the others ran).
 *
 * Per size and configuration it prints the median copy time, GB/s, against
 * native, % of the ceiling (the median of each round's copy against that
 * round's ceiling), % of the same-bytes ceiling (likewise, against every GPU
 * copying size/ngpu at once in that round), against the first configuration
 * (the median of the rounds' ratios), the time spent in the call that
 * submits a copy and the CPU its mmad used while its bursts ran (all
 * threads, in % of one core). Row
 * "1 spin" is the first configuration again, each copy waited for by calling
 * mma_query until it is done instead of mma_wait (which sleeps until shortly
 * before a copy's expected end): what waiting costs. With --as-used, row
 * "nat c1" is a bare cudaMemcpyAsync on config 1's buffers and a stream of
 * its own: what config 1's copies would take natively, so that "1" against
 * it is what going through libmma (and, for a copy libmma runs natively, its
 * KICK that wakes mmad) costs, apart from which buffers and stream a copy
 * uses. The bytes of each configuration's last copy of every size are
 * checked.
 *
 * Start the mmads with --busy-gbps=0 --relay-kernel-busy-sm=0, or each takes
 * the others' copies for a neighbour's traffic and keeps off those links.
 *
 * With --gap-us every copy (native too) follows a pause: sporadic copies,
 * which find each mmad's threads asleep and its relay kernels ended. With
 * --as-used the copies go as a user's would (without MMA_COPY_NO_BYPASS).
 *
 *   mma-ab [--dir h2d|d2h] [--gpu 0] [--sizes 8M,64M,256M] [--rounds 15]
 *          [--burst 4] [--per-gpu 256M] [--gap-us 0] [--as-used] SOCKET1 ... */
#define _GNU_SOURCE /* SO_PEERCRED in bench_util.h */
#include <cuda_runtime_api.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_util.h"
#include "ceiling.h"
#include "cuda_check.h"
#include "mma.h"
#include "util.h"
#define TOOL_NAME "mma-ab"
#include "tool_check.h"

#define MAXC 6
#define MAXS 16
#define MAXG BENCH_MAXG

typedef struct {
    const char *sock;
    pid_t pid; /* its mmad, for the CPU it uses while its copies run */
    mma_client_t *c;
    char *host, *dev; /* registered with this mmad */
} conf_t;

static int dir, gpu, burst = 4, rounds = 15, ngpu;
static unsigned gap_us; /* --gap-us: a pause before every copy (sporadic copies) */
static int as_used;     /* --as-used: copies as a user gets them (libmma may run them natively) */
static size_t cap, per_gpu = (size_t)256 << 20;
static cudaStream_t stream, stream2;
static char *nat_host, *nat_dev;
static bench_box_t box; /* the box ceiling's buffers (cudaHostAlloc memory) */


/* Microseconds of one copy of n bytes: through c's mmad (host-ordered, no
 * bypass, as mma-bench's "mma" column), waited for with mma_wait or, with
 * spin, by calling mma_query until it is done; or natively when c is NULL.
 * *call: the microseconds spent in the call that submits it. */
static double one(conf_t *c, size_t n, int spin, double *call)
{
    double t0 = mma_now_us();
    if (!c || spin == 2) {
        /* native: on the bench's own buffers, or (spin 2, the "nat c1"
         * row) bare on c's buffers and a stream of its own */
        char *dst = !c ? (dir == 0 ? nat_dev : nat_host) : dir == 0 ? c->dev : c->host;
        const char *src = !c ? (dir == 0 ? nat_host : nat_dev) : dir == 0 ? c->host : c->dev;
        cudaStream_t st = c ? stream2 : stream;
        CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, st));
        *call = mma_now_us() - t0;
        CK(cudaStreamSynchronize(st));
    } else {
        mma_segment_t s = {dir == 0 ? c->dev : c->host, dir == 0 ? c->host : c->dev, n};
        mma_copy_opts_t o = {.flags = as_used ? 0u : MMA_COPY_NO_BYPASS};
        mma_copy_t t;
        MK(mma_memcpy_sg_async(c->c, &s, 1, NULL, &o, &t));
        *call = mma_now_us() - t0;
        if (spin) {
            int rc;
            while ((rc = mma_query(c->c, t)) == MMA_PENDING)
                ;
            MK(rc);
        } else {
            MK(mma_wait(c->c, t));
        }
    }
    return mma_now_us() - t0;
}

/* The box ceiling once: every GPU copies per_gpu bytes at once. */
static double ceiling(void)
{
    return bench_ceil_round(&box, dir, per_gpu, NULL);
}

/* The same-bytes ceiling of an n-byte copy: the median of three rounds. */
static double same_ceiling(size_t n)
{
    return bench_same_ceiling(&box, dir, n, 3);
}

static void fill(char *p, size_t n, uint64_t seed)
{
    uint64_t *w = (uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++) {
        seed = seed * 6364136223846793005ull + 1442695040888963407ull;
        w[i] = seed;
    }
}

/* Before a size's rounds: the destination's bytes cleared (D2H: the device
 * source filled from the host pattern). After: the last copy's bytes. */
static void prepare(conf_t *c, size_t n)
{
    if (dir == 0) {
        CK(cudaMemset(c->dev, 0, n));
    } else {
        CK(cudaMemcpy(c->dev, c->host + cap, n, cudaMemcpyHostToDevice));
        memset(c->host, 0, n);
    }
    CK(cudaDeviceSynchronize());
}

static int check(conf_t *c, size_t n)
{
    if (dir == 0) {
        char *back = malloc(n);
        if (!back)
            exit(1);
        CK(cudaMemcpy(back, c->dev, n, cudaMemcpyDeviceToHost));
        int ok = memcmp(back, c->host, n) == 0;
        free(back);
        return ok;
    }
    return memcmp(c->host, c->host + cap, n) == 0;
}


int main(int argc, char **argv)
{
    const char *sizes_arg = "8M,32M,64M,256M";
    static const struct option lo[] = {{"dir", 1, 0, 'd'},    {"gpu", 1, 0, 'g'},     {"sizes", 1, 0, 'z'},
                                       {"rounds", 1, 0, 'r'}, {"burst", 1, 0, 'b'},   {"per-gpu", 1, 0, 'p'},
                                       {"gap-us", 1, 0, 'G'}, {"as-used", 0, 0, 'U'}, {"help", 0, 0, 'h'},
                                       {0}};
    int o;
    while ((o = getopt_long(argc, argv, "d:g:z:r:b:p:G:Uh", lo, NULL)) != -1) {
        switch (o) {
        case 'd':
            if (strcmp(optarg, "h2d") && strcmp(optarg, "d2h")) {
                fprintf(stderr, "mma-ab: --dir %s: h2d or d2h\n", optarg);
                return 2;
            }
            dir = strcmp(optarg, "d2h") == 0;
            break;
        case 'g':
            if (bench_int_arg("mma-ab", "--gpu", optarg, 0, 1023, &gpu))
                return 2;
            break;
        case 'z': sizes_arg = optarg; break;
        case 'r':
            if (bench_int_arg("mma-ab", "--rounds", optarg, 1, 1000, &rounds))
                return 2;
            break;
        case 'b':
            if (bench_int_arg("mma-ab", "--burst", optarg, 2, 100, &burst))
                return 2;
            break;
        case 'p':
            if (bench_size_arg("mma-ab", "--per-gpu", optarg, 4096, (size_t)1 << 40, &per_gpu))
                return 2;
            break;
        case 'U': as_used = 1; break;
        case 'G': {
            int g;
            if (bench_int_arg("mma-ab", "--gap-us", optarg, 0, 1000000, &g))
                return 2;
            gap_us = (unsigned)g;
            break;
        }
        default:
            printf("usage: mma-ab [--dir h2d|d2h] [--gpu 0] [--sizes 8M,32M,64M,256M] [--rounds 15] [--burst 4]\n"
                   "              [--per-gpu 256M] [--gap-us 0] [--as-used] SOCKET1 SOCKET2 ...\n"
                   "Each SOCKET is an mmad of its own on the same GPUs (start them with --busy-gbps=0\n"
                   "--relay-kernel-busy-sm=0); copies through each are taken in turns, round by round,\n"
                   "with native copies and the box ceiling in every round. --gap-us: a pause before\n"
                   "every copy, native or not (sporadic copies, which find mmad idle). --as-used: copies as a\n"
                   "user gets them (below the bypass threshold, or --cold-bypass while mmad sleeps, native).\n");
            return o == 'h' ? 0 : 2;
        }
    }
    int nc = argc - optind;
    if (nc < 1 || nc > MAXC) {
        fprintf(stderr, "mma-ab: 1-%d sockets (see --help)\n", MAXC);
        return 2;
    }
    if (per_gpu % 16) {
        fprintf(stderr, "mma-ab: --per-gpu: a multiple of 16 bytes\n");
        return 2;
    }
    size_t sizes[MAXS];
    int ns = 0;
    cap = 0;
    for (char *s = strtok(strdup(sizes_arg), ","); s && ns < MAXS; s = strtok(NULL, ",")) {
        if (bench_size_arg("mma-ab", "--sizes", s, 4096, (size_t)1 << 40, &sizes[ns]))
            return 2;
        if (sizes[ns] % 16) {
            fprintf(stderr, "mma-ab: --sizes %s: a multiple of 16 bytes\n", s);
            return 2;
        }
        if (sizes[ns] > cap)
            cap = sizes[ns];
        ns++;
    }
    if (ns == 0) {
        fprintf(stderr, "mma-ab: --sizes names no size\n");
        return 2;
    }
    if (cudaGetDeviceCount(&ngpu) != cudaSuccess || ngpu < 1) {
        fprintf(stderr, "mma-ab: no CUDA GPU visible: it compares mmads on real GPUs\n");
        return 77;
    }
    if (gpu < 0 || gpu >= ngpu) {
        fprintf(stderr, "mma-ab: --gpu %d: %d GPUs\n", gpu, ngpu);
        return 2;
    }
    if (ngpu > MAXG)
        ngpu = MAXG;
    conf_t c[MAXC];
    for (int i = 0; i < nc; i++) {
        c[i].sock = argv[optind + i];
        MK(mma_connect(c[i].sock, &c[i].c));
        c[i].pid = bench_daemon_pid(c[i].sock);
        mma_info_t info;
        MK(mma_get_info(c[i].c, &info));
        if (info.simulated) {
            fprintf(stderr, "mma-ab: %s runs the simulated box: there is no native side to compare with\n", c[i].sock);
            return 2;
        }
        /* host: [0, cap) the copies' side, [cap, 2 cap) the pattern */
        MK(mma_host_alloc(c[i].c, 2 * cap, (void **)&c[i].host));
        MK(mma_device_alloc(c[i].c, gpu, cap, (void **)&c[i].dev));
        fill(c[i].host, cap, 7 + (uint64_t)i);
        memcpy(c[i].host + cap, c[i].host, cap);
    }
    CK(cudaSetDevice(gpu));
    CK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CK(cudaStreamCreateWithFlags(&stream2, cudaStreamNonBlocking));
    CK(cudaHostAlloc((void **)&nat_host, cap, cudaHostAllocPortable));
    CK(cudaMalloc((void **)&nat_dev, cap));
    box.ngpu = ngpu;
    box.home = gpu;
    box.cap = per_gpu;
    for (int g = 0; g < ngpu; g++) {
        CK(cudaSetDevice(g));
        CK(cudaStreamCreateWithFlags(&box.st[g], cudaStreamNonBlocking));
        CK(cudaMalloc((void **)&box.dev[g], per_gpu));
        CK(cudaHostAlloc((void **)&box.host[g], per_gpu, cudaHostAllocPortable));
        memset(box.host[g], 0x5a, per_gpu);
    }
    CK(cudaSetDevice(gpu));
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, gpu));
    time_t now = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M UTC", gmtime(&now));
    printf("mma-ab %s | %d x %s | %s into gpu%d | %d rounds, bursts of %d (first not counted), ceiling of %zu MiB a "
           "GPU every round\n",
           date, ngpu, prop.name, dir ? "D2H" : "H2D", gpu, rounds, burst, per_gpu >> 20);
    if (gap_us)
        printf("every copy after a pause of %u us\n", gap_us);
    if (as_used)
        printf("copies as a user gets them (libmma may run them natively)\n");
    for (int i = 0; i < nc; i++)
        printf("config %d: %s\n", i + 1, c[i].sock);
    printf("row '1 spin': config 1's copies waited for by calling mma_query until done, not mma_wait;\n"
           "call us: median time in the call that submits a copy (mma_memcpy_sg_async / cudaMemcpyAsync)\n");
    printf("%%same: against each round's same-bytes ceiling (every GPU copies size/%d into its own memory at once,\n"
           "the median of 3 after a warm-up; it pays a copy's start and end as one copy of the size does)\n",
           ngpu);
    if (as_used)
        printf("row 'nat c1': bare cudaMemcpyAsync on config 1's buffers, on a stream of its own\n");
    printf("cpu: the config's mmad (all threads, /proc/PID/task/*/schedstat) over its bursts' wall time\n");
    printf("%6s %-8s %9s %9s %8s %8s %8s %8s %8s %6s %6s\n", "size", "config", "p50 us", "GB/s", "vs nat", "%ceil",
           "%same", "vs 1", "call us", "cpu", "bytes");

    int bad = 0;
    int per = rounds * (burst - 1);
    /* rows: configs 0..nc-1, config 0 spinning (nc), native (nc + 1),
     * with --as-used native on config 0's buffers (nc + 2) */
    int ne = nc + 2 + as_used;
    double *t = calloc((size_t)ne * per, sizeof(double));
    double *tc = calloc((size_t)ne * per, sizeof(double)); /* call times */
    double *rt = calloc((size_t)ne * rounds, sizeof(double)); /* per round median */
    double *ce = calloc((size_t)rounds, sizeof(double));
    double *cs = calloc((size_t)rounds, sizeof(double)); /* same-bytes ceilings */
    /* per row: its mmad's CPU and the wall time of its bursts (ns) */
    double *cpu = calloc((size_t)ne, sizeof(double)), *wall = calloc((size_t)ne, sizeof(double));
    double *tmp = calloc((size_t)per + rounds, sizeof(double));
    if (!t || !tc || !rt || !ce || !cs || !tmp || !cpu || !wall)
        return 1;
    for (int si = 0; si < ns; si++) {
        size_t n = sizes[si];
        for (int i = 0; i < nc; i++)
            prepare(&c[i], n);
        for (int i = 0; i < ne; i++)
            cpu[i] = wall[i] = 0;
        for (int r = 0; r < rounds; r++) {
            ce[r] = ceiling();
            cs[r] = same_ceiling(n);
            for (int k = 0; k < ne; k++) {
                int i = (k + r) % ne;
                double b[100], call;
                conf_t *cf = i < nc ? &c[i] : i == nc ? &c[0] : NULL;
                conf_t *cc = i == nc + 2 ? &c[0] : cf; /* nat c1: config 1's buffers, no mmad */
                double c0 = cf ? bench_cpu_ns(cf->pid) : -1, w0 = mma_now_us();
                for (int q = 0; q < burst; q++) {
                    if (gap_us)
                        usleep(gap_us); /* --gap-us: every copy after a pause */
                    b[q] = one(cc, n, i == nc ? 1 : i == nc + 2 ? 2 : 0, &call);
                    if (q)
                        tc[(size_t)i * per + (size_t)r * (burst - 1) + q - 1] = call;
                }
                double c1 = cf ? bench_cpu_ns(cf->pid) : -1;
                if (c0 >= 0 && c1 >= 0 && cpu[i] >= 0) {
                    cpu[i] += c1 - c0;
                    wall[i] += (mma_now_us() - w0) * 1e3;
                } else {
                    cpu[i] = -1; /* not readable: not shown */
                }
                for (int q = 1; q < burst; q++)
                    t[(size_t)i * per + (size_t)r * (burst - 1) + q - 1] = b[q];
                rt[(size_t)i * rounds + r] = bench_median(b + 1, burst - 1);
            }
        }
        memcpy(tmp, t + (size_t)(nc + 1) * per, sizeof(double) * per);
        double nat = bench_median(tmp, per);
        for (int i = 0; i < ne; i++) {
            memcpy(tmp, t + (size_t)i * per, sizeof(double) * per);
            double p50 = bench_median(tmp, per);
            memcpy(tmp, tc + (size_t)i * per, sizeof(double) * per);
            double call = bench_median(tmp, per);
            for (int r = 0; r < rounds; r++)
                tmp[r] = n / rt[(size_t)i * rounds + r] / 1e3 / ce[r] * 100;
            double pc = bench_median(tmp, rounds);
            double ps = 0;
            if (cs[0] > 0) {
                for (int r = 0; r < rounds; r++)
                    tmp[r] = n / rt[(size_t)i * rounds + r] / 1e3 / cs[r] * 100;
                ps = bench_median(tmp, rounds);
            }
            char pss[16] = "-";
            if (ps > 0)
                snprintf(pss, sizeof pss, "%.1f%%", ps);
            for (int r = 0; r < rounds; r++)
                tmp[r] = rt[(size_t)0 * rounds + r] / rt[(size_t)i * rounds + r];
            double v1 = bench_median(tmp, rounds);
            char name[16] = "native";
            if (i < nc)
                snprintf(name, sizeof name, "%d", i + 1);
            else if (i == nc)
                snprintf(name, sizeof name, "1 spin");
            else if (i == nc + 2)
                snprintf(name, sizeof name, "nat c1");
            const char *ok = "-";
            if (i == nc || i == nc + 2)
                ok = "as 1"; /* the same buffers as config 1's: checked there */
            if (i < nc) {
                int good = check(&c[i], n);
                bad += !good;
                ok = good ? "ok" : "DIFFER";
            }
            char nv[16], v1s[16] = "-", cpus[16] = "-";
            if (i <= nc && cpu[i] >= 0 && wall[i] > 0)
                snprintf(cpus, sizeof cpus, "%.0f%%", 100.0 * cpu[i] / wall[i]);
            snprintf(nv, sizeof nv, "%.2fx", nat / p50);
            if (i != nc + 1)
                snprintf(v1s, sizeof v1s, "%.3fx", v1);
            char sz[32];
            snprintf(sz, sizeof sz, "%zuM", n >> 20);
            if (n < (1u << 20))
                snprintf(sz, sizeof sz, "%zuK", n >> 10);
            printf("%6s %-8s %9.1f %9.2f %8s %7.1f%% %8s %8s %8.1f %6s %6s\n", i == 0 ? sz : "", name, p50,
                   n / p50 / 1e3, i != nc + 1 ? nv : "1.00x", pc, pss, v1s, call, cpus, ok);
        }
        for (int r = 0; r < rounds; r++)
            tmp[r] = ce[r];
        double lo = ce[0], hi = ce[0];
        for (int r = 1; r < rounds; r++) {
            lo = ce[r] < lo ? ce[r] : lo;
            hi = ce[r] > hi ? ce[r] : hi;
        }
        printf("%6s ceiling %9s %9.1f (median of rounds; %.1f-%.1f)\n", "", "", bench_median(tmp, rounds), lo, hi);
        if (cs[0] > 0) {
            for (int r = 0; r < rounds; r++)
                tmp[r] = cs[r];
            lo = hi = cs[0];
            for (int r = 1; r < rounds; r++) {
                lo = cs[r] < lo ? cs[r] : lo;
                hi = cs[r] > hi ? cs[r] : hi;
            }
            printf("%6s same %12s %9.1f (median of rounds; %.1f-%.1f)\n", "", "", bench_median(tmp, rounds), lo, hi);
        }
        fflush(stdout);
    }
    printf("bytes: %s\n", bad ? "SOME DIFFER" : "every configuration's last copy of every size matches");
    for (int i = 0; i < nc; i++)
        mma_disconnect(c[i].c);
    return bad ? 1 : 0;
}
