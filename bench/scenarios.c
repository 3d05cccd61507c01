/* mma-bench --scenarios: several processes on the box at once.
 *
 * Every worker is a forked process that sets itself up (CUDA, buffers),
 * says "ready", waits for "go", works for a fixed time and reports. The
 * parent never touches CUDA, so forking is safe. Scenarios:
 *   A  each GPU's own process loads its own memory natively, one GPU at a time
 *   B  the same, all GPUs at once (the native aggregate: the box ceiling)
 *   C0 B plus one more native process loading gpu0: C's baseline, the same
 *      load with the extra client copying natively
 *   C  B plus one multipath client loading gpu0 through mmad; each native is
 *      compared with its C0 figure (the target: >= 90%) and with B
 *   D  one multipath client per GPU, all at once (fair shares?)
 *   E  16 MiB latency-class copies into gpu0: alone, then while a bulk
 *      multipath client loads gpu0, then the same copies as bulk class
 * During C and D the parent samples `mmactl --json paths` every 100 ms, so
 * the per-path share over time can be plotted (CSV rows "share,...").
 * Every byte a worker copies is checked on its last copy. */
#define _GNU_SOURCE
#include <cuda_runtime_api.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "mma.h"
#include "util.h"

enum { W_NATIVE, W_MMA, W_LAT, W_LAT_BULK };

typedef struct result {
    double gbps;
    double p50_us, p99_us;
    int ok;
} result_t;

typedef struct worker {
    int kind, gpu;
    pid_t pid;
    int to_child, from_child;
    result_t res;
} worker_t;

static void fill(unsigned char *p, size_t n, unsigned seed)
{
    for (size_t i = 0; i < n; i += 4096)
        p[i] = (unsigned char)(i / 4096 * 131 + seed);
}

/* Runs in the child. Never returns. */
static void worker_main(int kind, int gpu, const char *sock, double secs, int rfd, int wfd)
{
    result_t r = {0};
    size_t n = kind == W_LAT || kind == W_LAT_BULK ? (16u << 20) : (256u << 20);
    unsigned char *h = NULL, *back = NULL, *d = NULL;
    mma_client_t *c = NULL;
    char go;
    if (kind == W_NATIVE) {
        if (cudaSetDevice(gpu) != cudaSuccess || cudaHostAlloc((void **)&h, n, cudaHostAllocPortable) != cudaSuccess ||
            cudaHostAlloc((void **)&back, n, cudaHostAllocPortable) != cudaSuccess ||
            cudaMalloc((void **)&d, n) != cudaSuccess)
            _exit(3);
    } else {
        if (mma_connect(sock, &c) != MMA_OK || mma_host_alloc(c, n, (void **)&h) != MMA_OK ||
            mma_host_alloc(c, n, (void **)&back) != MMA_OK || mma_device_alloc(c, gpu, n, (void **)&d) != MMA_OK)
            _exit(3);
    }
    fill(h, n, (unsigned)gpu + 1);
    if (write(wfd, "R", 1) != 1 || read(rfd, &go, 1) != 1)
        _exit(4);
    double *lat = malloc(sizeof(double) * 100000);
    int nl = 0;
    double t0 = mma_now_s(), bytes = 0;
    mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS | (kind == W_LAT ? MMA_COPY_LATENCY : 0u)};
    while (mma_now_s() - t0 < secs) {
        double t1 = mma_now_s();
        int rc;
        if (kind == W_NATIVE) {
            rc = cudaMemcpy(d, h, n, cudaMemcpyHostToDevice) == cudaSuccess ? MMA_OK : MMA_ERR_CUDA;
        } else {
            mma_segment_t s = {d, h, n};
            mma_copy_t t;
            rc = mma_memcpy_sg_async(c, &s, 1, NULL, &o, &t);
            if (rc == MMA_OK)
                rc = mma_wait(c, t);
        }
        if (rc != MMA_OK)
            _exit(5);
        bytes += (double)n;
        if (nl < 100000)
            lat[nl++] = mma_now_s() - t1;
        if (kind == W_LAT || kind == W_LAT_BULK)
            usleep(2000); /* a request now and then, like a KV fetch */
    }
    double el = mma_now_s() - t0;
    /* last copy: check it came through whole */
    if (kind == W_NATIVE)
        r.ok = cudaMemcpy(back, d, n, cudaMemcpyDeviceToHost) == cudaSuccess && memcmp(h, back, n) == 0;
    else
        r.ok = mma_memcpy(c, back, d, n) == MMA_OK && memcmp(h, back, n) == 0;
    r.gbps = bytes / el / 1e9;
    qsort(lat, (size_t)nl, sizeof *lat, mma_cmp_double);
    r.p50_us = nl ? lat[nl / 2] * 1e6 : 0;
    r.p99_us = nl ? lat[(int)((nl - 1) * 0.99)] * 1e6 : 0;
    if (write(wfd, &r, sizeof r) != (ssize_t)sizeof r)
        _exit(6);
    if (c)
        mma_disconnect(c);
    _exit(0);
}

static int spawn(worker_t *w, const char *sock, double secs)
{
    int down[2], up[2];
    if (pipe(down) || pipe(up))
        return -1;
    w->pid = fork();
    if (w->pid == 0) {
        close(down[1]);
        close(up[0]);
        worker_main(w->kind, w->gpu, sock, secs, down[0], up[1]);
    }
    close(down[0]);
    close(up[1]);
    w->to_child = down[1];
    w->from_child = up[0];
    return w->pid > 0 ? 0 : -1;
}

static char mmactl_path[4096];

/* One sample of every path's byte counter, as CSV rows. */
static void sample_paths(FILE *csv, const char *scen, double t, const char *sock)
{
    char cmd[4300];
    snprintf(cmd, sizeof cmd, "%s --socket %s --json paths", mmactl_path, sock);
    FILE *p = popen(cmd, "r");
    if (!p)
        return;
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, p);
    buf[n] = 0;
    pclose(p);
    for (char *q = strstr(buf, "{\"target\""); q; q = strstr(q + 1, "{\"target\"")) {
        unsigned tg, via;
        char dir[8];
        unsigned long long bytes;
        if (sscanf(q, "{\"target\":%u,\"via\":%u,\"kind\":\"%*[a-z]\",\"dir\":\"%3[a-z0-9]\",\"bytes\":%llu", &tg,
                   &via, dir, &bytes) == 4 &&
            csv)
            fprintf(csv, "share,%s,%.3f,%u,%u,%s,%llu\n", scen, t, tg, via, dir, bytes);
    }
}

/* Start every worker, let them run `secs`, collect. 0 when all went well. */
static int run(const char *name, worker_t *w, int nw, const char *sock, double secs, FILE *csv, int sample)
{
    for (int i = 0; i < nw; i++)
        if (spawn(&w[i], sock, secs) != 0)
            return -1;
    char b;
    for (int i = 0; i < nw; i++)
        if (read(w[i].from_child, &b, 1) != 1) {
            fprintf(stderr, "scenario %s: worker %d failed to set up\n", name, i);
            return -1;
        }
    for (int i = 0; i < nw; i++)
        if (write(w[i].to_child, "G", 1) != 1)
            return -1;
    double t0 = mma_now_s();
    if (sample)
        while (mma_now_s() - t0 < secs + 0.2) {
            sample_paths(csv, name, mma_now_s() - t0, sock);
            usleep(100000);
        }
    int bad = 0;
    for (int i = 0; i < nw; i++) {
        if (read(w[i].from_child, &w[i].res, sizeof w[i].res) != (ssize_t)sizeof w[i].res)
            bad = 1;
        int st;
        waitpid(w[i].pid, &st, 0);
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0 || !w[i].res.ok)
            bad = 1;
        close(w[i].to_child);
        close(w[i].from_child);
    }
    if (bad)
        fprintf(stderr, "scenario %s: a worker failed or its data did not match\n", name);
    return bad;
}

static int gpu_count_child(void)
{
    int fd[2], n = 0;
    if (pipe(fd))
        return 0;
    pid_t p = fork();
    if (p == 0) {
        int k = 0;
        if (cudaGetDeviceCount(&k) != cudaSuccess)
            k = 0;
        ssize_t w = write(fd[1], &k, sizeof k);
        _exit(w == sizeof k ? 0 : 1);
    }
    if (read(fd[0], &n, sizeof n) != sizeof n)
        n = 0;
    waitpid(p, NULL, 0);
    close(fd[0]);
    close(fd[1]);
    return n;
}

int mma_bench_scenarios(const char *sock, double secs, FILE *csv)
{
    ssize_t l = readlink("/proc/self/exe", mmactl_path, sizeof mmactl_path - 8);
    if (l <= 0)
        return 1;
    mmactl_path[l] = 0;
    strcpy(strrchr(mmactl_path, '/') + 1, "mmactl");
    int ng = gpu_count_child();
    if (ng < 2) {
        fprintf(stderr, "mma-bench --scenarios needs 2 or more GPUs (found %d)\n", ng);
        return 2;
    }
    if (ng > 8)
        ng = 8;
    int fails = 0;
    worker_t w[16];
    double alone[8], together[8], agg_native = 0;
    if (csv)
        fprintf(csv, "section,scenario,worker,kind,gpu,gbps,p50_us,p99_us\n");
    printf("\n## Scenarios: %d GPUs, %.1f s each, 256 MiB H2D copies back to back\n", ng, secs);

    printf("\nA. each GPU's own process, natively, one GPU at a time\n%6s %10s\n", "gpu", "GB/s");
    for (int g = 0; g < ng; g++) {
        w[0] = (worker_t){.kind = W_NATIVE, .gpu = g};
        fails += run("A", w, 1, sock, secs, csv, 0);
        alone[g] = w[0].res.gbps;
        printf("%6d %10.1f\n", g, alone[g]);
        if (csv)
            fprintf(csv, "scen,A,%d,native,%d,%.3f,,\n", g, g, alone[g]);
    }

    printf("\nB. every GPU's own process, natively, all at once\n%6s %10s\n", "gpu", "GB/s");
    for (int g = 0; g < ng; g++)
        w[g] = (worker_t){.kind = W_NATIVE, .gpu = g};
    fails += run("B", w, ng, sock, secs, csv, 0);
    for (int g = 0; g < ng; g++) {
        together[g] = w[g].res.gbps;
        agg_native += together[g];
        printf("%6d %10.1f\n", g, together[g]);
        if (csv)
            fprintf(csv, "scen,B,%d,native,%d,%.3f,,\n", g, g, together[g]);
    }
    printf("%6s %10.1f  (native aggregate)\n", "all", agg_native);

    printf("\nC0. B plus one more native process loading gpu0 (C's baseline)\n%-12s %10s\n", "worker", "GB/s");
    for (int g = 0; g < ng; g++)
        w[g] = (worker_t){.kind = W_NATIVE, .gpu = g};
    w[ng] = (worker_t){.kind = W_NATIVE, .gpu = 0};
    fails += run("C0", w, ng + 1, sock, secs, csv, 0);
    double base[9], agg_c0 = 0;
    for (int i = 0; i <= ng; i++) {
        base[i] = w[i].res.gbps;
        agg_c0 += base[i];
        if (i < ng)
            printf("native%-6d %10.1f\n", i, base[i]);
        if (csv)
            fprintf(csv, "scen,C0,%d,native,%d,%.3f,,\n", i, w[i].gpu, base[i]);
    }
    printf("%-12s %10.1f\n%-12s %10.1f  (%.0f%% of B's aggregate)\n", "native->gpu0", base[ng], "aggregate", agg_c0,
           100 * agg_c0 / agg_native);

    printf("\nC. B plus one multipath client loading gpu0 through mmad\n"
           "   vs C0: the same worker in C0, where this client copied natively (target: each native >= 90%%)\n"
           "%-12s %10s %8s %8s\n",
           "worker", "GB/s", "vs C0", "vs B");
    for (int g = 0; g < ng; g++)
        w[g] = (worker_t){.kind = W_NATIVE, .gpu = g};
    w[ng] = (worker_t){.kind = W_MMA, .gpu = 0};
    fails += run("C", w, ng + 1, sock, secs, csv, 1);
    double agg_c = 0, worst = 1e9, worst_b = 1e9;
    int worst_g = 0;
    for (int g = 0; g < ng; g++) {
        double f0 = w[g].res.gbps / base[g], f = w[g].res.gbps / together[g];
        if (f0 < worst)
            worst = f0, worst_g = g;
        worst_b = f < worst_b ? f : worst_b;
        agg_c += w[g].res.gbps;
        printf("native%-6d %10.1f %7.0f%% %7.0f%%\n", g, w[g].res.gbps, 100 * f0, 100 * f);
        if (csv)
            fprintf(csv, "scen,C,%d,native,%d,%.3f,,\n", g, g, w[g].res.gbps);
    }
    agg_c += w[ng].res.gbps;
    printf("%-12s %10.1f %7.0f%% %8s\n", "mma->gpu0", w[ng].res.gbps, 100 * w[ng].res.gbps / base[ng], "-");
    printf("%-12s %10.1f %7.0f%% %7.0f%%\n", "aggregate", agg_c, 100 * agg_c / agg_c0, 100 * agg_c / agg_native);
    printf("worst native: gpu%d at %.0f%% of C0 (target >= 90%%: %s); worst vs B %.0f%%\n", worst_g, 100 * worst,
           worst >= 0.9 ? "met" : "NOT met", 100 * worst_b);
    if (csv)
        fprintf(csv, "scen,C,%d,mma,0,%.3f,,\n", ng, w[ng].res.gbps);

    printf("\nD. one multipath client per GPU, all at once\n%10s %10s %14s\n", "client", "GB/s", "share");
    for (int g = 0; g < ng; g++)
        w[g] = (worker_t){.kind = W_MMA, .gpu = g};
    fails += run("D", w, ng, sock, secs, csv, 1);
    double agg_d = 0, lo = 1e9, hi = 0;
    for (int g = 0; g < ng; g++) {
        agg_d += w[g].res.gbps;
        lo = w[g].res.gbps < lo ? w[g].res.gbps : lo;
        hi = w[g].res.gbps > hi ? w[g].res.gbps : hi;
    }
    for (int g = 0; g < ng; g++) {
        printf("mma->gpu%-2d %10.1f %13.0f%%\n", g, w[g].res.gbps, 100 * w[g].res.gbps / agg_d);
        if (csv)
            fprintf(csv, "scen,D,%d,mma,%d,%.3f,,\n", g, g, w[g].res.gbps);
    }
    printf("%-10s %10.1f  (%.0f%% of the native aggregate; slowest/fastest client %.2f)\n", "aggregate", agg_d,
           100 * agg_d / agg_native, lo / hi);

    printf("\nE. 16 MiB copies into gpu0, one every 2 ms: completion time (us)\n%-44s %8s %8s\n", "case", "p50",
           "p99");
    const char *names[3] = {"latency class, alone", "latency class, bulk client loading gpu0",
                            "bulk class, bulk client loading gpu0"};
    for (int k = 0; k < 3; k++) {
        w[0] = (worker_t){.kind = k == 2 ? W_LAT_BULK : W_LAT, .gpu = 0};
        int nw = 1;
        if (k > 0)
            w[nw++] = (worker_t){.kind = W_MMA, .gpu = 0};
        fails += run("E", w, nw, sock, secs, csv, 0);
        printf("%-44s %8.0f %8.0f\n", names[k], w[0].res.p50_us, w[0].res.p99_us);
        if (csv)
            fprintf(csv, "scen,E%d,0,%s,0,,%.1f,%.1f\n", k, k == 2 ? "bulk" : "latency", w[0].res.p50_us,
                    w[0].res.p99_us);
    }
    printf("\nscenarios: %s\n", fails ? "SOME WORKERS FAILED" : "all workers finished, data verified");
    return fails ? 1 : 0;
}
