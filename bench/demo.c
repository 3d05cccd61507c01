/* mma-demo: one host<->GPU copy, first over the target GPU's own link only,
 * then over every path mmad has; every byte checked. On real GPUs the
 * baseline is a plain cudaMemcpy; on the simulated box (no GPU here) it is
 * mmad with one path, and the figures are the box's scaled-down rates.
 *   mma-demo [--socket PATH] [--gpu N] [--mib N] [--reps N] [--sweep]
 * --mib: the copy's size (default 64 simulated, 1024 on GPUs); --reps 1-15:
 * copies timed per figure (their median; default 3). --sweep adds the same
 * copy over 1..N paths; on the simulated box it also prints what the
 * simulated rates mean at the real box's scale. */
#define _GNU_SOURCE /* SO_PEERCRED in bench_util.h */
#include <cuda_runtime_api.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench_util.h"
#include "mma.h"
#include "util.h"
#define TOOL_NAME "mma-demo"
#include "tool_check.h"

static void fill(uint8_t *p, size_t n, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (uint8_t)x;
    }
}

#define MAX_REPS 15

/* One timed copy (median of reps). paths 0 = all; native = plain CUDA. */
static double timed(mma_client_t *c, void *dst, const void *src, size_t n, int paths, int native, int reps)
{
    double best[MAX_REPS];
    for (int r = 0; r < reps; r++) {
        double t0 = mma_now_s();
        if (native) {
            if (cudaMemcpy(dst, src, n, cudaMemcpyDefault) != cudaSuccess) {
                fprintf(stderr, "mma-demo: cudaMemcpy failed\n");
                exit(1);
            }
        } else {
            mma_segment_t s = {dst, src, n};
            mma_copy_opts_t o = {.flags = MMA_COPY_NO_BYPASS, .max_paths = paths};
            mma_copy_t t;
            MK(mma_memcpy_sg_async(c, &s, 1, NULL, &o, &t));
            MK(mma_wait(c, t));
        }
        best[r] = mma_now_s() - t0;
    }
    for (int i = 0; i < reps; i++) /* median */
        for (int j = i + 1; j < reps; j++)
            if (best[j] < best[i]) {
                double x = best[i];
                best[i] = best[j];
                best[j] = x;
            }
    return (double)n / best[reps / 2] / 1e9;
}

int main(int argc, char **argv)
{
    const char *sock = NULL;
    int gpu = 0, reps = 3, sweep = 0, mib = 0;
    static const struct option lo[] = {{"socket", required_argument, 0, 's'}, {"gpu", required_argument, 0, 'g'},
                                       {"mib", required_argument, 0, 'm'},    {"reps", required_argument, 0, 'r'},
                                       {"help", no_argument, 0, 'h'},         {"sweep", no_argument, 0, 'w'},
                                       {0}};
    int o;
    while ((o = getopt_long(argc, argv, "s:g:m:r:hw", lo, NULL)) != -1) {
        switch (o) {
        case 's': sock = optarg; break;
        case 'g':
            if (bench_int_arg("mma-demo", "--gpu", optarg, 0, 1023, &gpu))
                return 2;
            break;
        case 'm':
            if (bench_int_arg("mma-demo", "--mib", optarg, 1, 1L << 20, &mib))
                return 2;
            break;
        case 'r':
            if (bench_int_arg("mma-demo", "--reps", optarg, 1, MAX_REPS, &reps))
                return 2;
            break;
        case 'w': sweep = 1; break;
        default:
            printf("usage: mma-demo [--socket PATH] [--gpu N] [--mib N] [--reps N] [--sweep]\n");
            return o == 'h' ? 0 : 2;
        }
    }
    mma_client_t *c;
    int rc = mma_connect(sock, &c);
    if (rc != MMA_OK) {
        fprintf(stderr, "mma-demo: %s\n", mma_strerror(rc));
        return 1;
    }
    mma_info_t info;
    MK(mma_get_info(c, &info));
    if (gpu < 0 || gpu >= info.gpu_count) {
        fprintf(stderr, "mma-demo: --gpu %d: the box has %d GPUs\n", gpu, info.gpu_count);
        return 2;
    }
    if (mib <= 0)
        mib = info.simulated ? 64 : 1024;
    size_t n = (size_t)mib << 20;
    printf("mmad %u.%u.%u, backend %s, %d GPUs%s\n", info.daemon_version / 10000, info.daemon_version / 100 % 100,
           info.daemon_version % 100, info.backend, info.gpu_count,
           info.simulated ? " -- SIMULATED box (no GPU here): rates are the real box's, scaled down" : "");
    uint8_t *host, *back, *dev;
    MK(mma_host_alloc(c, n, (void **)&host));
    MK(mma_host_alloc(c, n, (void **)&back));
    MK(mma_device_alloc(c, gpu, n, (void **)&dev));
    fill(host, n, 42);

    const char *base = info.simulated ? "one path (own link)" : "native cudaMemcpy";
    int native = !info.simulated;
    double h_nat = timed(c, dev, host, n, 1, native, reps);
    double h_mma = timed(c, dev, host, n, 0, 0, reps);
    memset(back, 0, n);
    double d_nat = timed(c, back, dev, n, 1, native, reps);
    memset(back, 0, n);
    double d_mma = timed(c, back, dev, n, 0, 0, reps);
    int ok = memcmp(host, back, n) == 0;

    printf("\n%-5s %8s  %-22s %10s  %10s  %7s\n", "dir", "size", "baseline", "base GB/s", "mma GB/s", "speedup");
    printf("%-5s %6dMiB  %-22s %10.3f  %10.3f  %6.2fx\n", "H2D", mib, base, h_nat, h_mma, h_mma / h_nat);
    printf("%-5s %6dMiB  %-22s %10.3f  %10.3f  %6.2fx\n", "D2H", mib, base, d_nat, d_mma, d_mma / d_nat);
    printf("\nround trip host -> gpu%d -> host: %s (%zu bytes compared)\n", gpu, ok ? "every byte matches" : "MISMATCH",
           n);
    printf("per-path traffic: mmactl paths%s\n", sock ? " --socket ..." : "");
    if (sweep) {
        double k = info.simulated ? 1.0 / info.sim_scale : 1.0;
        printf("\n%d-GPU box, %d MiB into gpu%d over 1..%d paths%s\n", info.gpu_count, mib, gpu, info.gpu_count,
               info.simulated ? " (GB/s at the real box's scale = simulated x 1/sim_scale)" : "");
        printf("%6s %12s %12s\n", "paths", "H2D GB/s", "D2H GB/s");
        for (int p = 1; p <= info.gpu_count; p++) {
            double h = timed(c, dev, host, n, p, 0, reps);
            double d = timed(c, back, dev, n, p, 0, reps);
            printf("%6d %12.1f %12.1f\n", p, h * k, d * k);
        }
        ok = ok && memcmp(host, back, n) == 0;
    }
    mma_free(c, dev);
    mma_free(c, back);
    mma_free(c, host);
    mma_disconnect(c);
    return ok ? 0 : 1;
}
