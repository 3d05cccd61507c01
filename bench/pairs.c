/* mma-pairs: is the 16 KiB row of mma-bench's size table (auto/nat ~0.81x
 * H2D, where the latency table's 2000 copies give ~0.99x) libmma or the
 * way it is measured? A measuring tool for bench/results/, not the product.
 *
 * Small host-ordered H2D copies into one GPU, timed in pairs as mma-bench's
 * time_pair does (the two kinds in turns, which goes first alternating),
 * p50 of each kind and their ratio, for these pairs:
 *   A/A      a native copy on the bench's stream against the same (the
 *            control: anything but ~1.00x is the method's)
 *   A/B      against a native copy on a second stream of the bench's
 *   A/auto   against libmma's copy as a user gets it (native below the
 *            bypass, on libmma's own stream)
 * each fresh and again right after REPS copies through mmad (as the size
 * table has them just before its pairs), and then each kind alone (REPS
 * copies back to back). Every pair's last copies are checked.
 *   mma-pairs [--socket S] [--gpu 0] [--size 16K] [--reps 200]           */
#define _GNU_SOURCE /* SO_PEERCRED in bench_util.h */
#include <cuda_runtime_api.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bench_util.h"
#include "cuda_check.h"
#include "mma.h"
#include "util.h"
#define TOOL_NAME "mma-pairs"
#include "tool_check.h"

enum { K_NAT_A, K_NAT_B, K_AUTO, K_MMA };
static const char *kind_name[] = {"native A", "native B", "auto", "mma"};

static mma_client_t *cl;
static cudaStream_t st[2];
static char *host, *dev, *back;
static size_t n;

static double one(int k)
{
    double t0 = mma_now_s();
    if (k == K_NAT_A || k == K_NAT_B) {
        CK(cudaMemcpyAsync(dev, host, n, cudaMemcpyHostToDevice, st[k]));
        CK(cudaStreamSynchronize(st[k]));
    } else {
        mma_segment_t s = {dev, host, n};
        mma_copy_opts_t o = {.flags = k == K_MMA ? MMA_COPY_NO_BYPASS : 0u};
        mma_copy_t t;
        MK(mma_memcpy_sg_async(cl, &s, 1, NULL, &o, &t));
        MK(mma_wait(cl, t));
    }
    return mma_now_s() - t0;
}


static int checked(void)
{
    CK(cudaMemcpy(back, dev, n, cudaMemcpyDeviceToHost));
    return memcmp(back, host, n) == 0;
}

/* Kinds a and b in turns, reps pairs after one warm-up pair, as mma-bench. */
static int pair(int a, int b, int reps, const char *when)
{
    double *sa = malloc(sizeof(double) * (size_t)reps), *sb = malloc(sizeof(double) * (size_t)reps);
    if (!sa || !sb) {
        fprintf(stderr, "mma-pairs: out of memory\n");
        exit(1);
    }
    for (int r = -1; r < reps; r++) {
        double ta, tb;
        if (r & 1) {
            tb = one(b);
            ta = one(a);
        } else {
            ta = one(a);
            tb = one(b);
        }
        if (r >= 0)
            sa[r] = ta, sb[r] = tb;
    }
    double ma = bench_median(sa, reps) * 1e6, mb = bench_median(sb, reps) * 1e6;
    int ok = checked();
    printf("%-10s %-6s %-10s %9.2f %9.2f %7.2fx %6d  %s\n", kind_name[a], "vs", kind_name[b], ma, mb, ma / mb, reps,
           ok ? when : "MISMATCH");
    free(sa);
    free(sb);
    return ok;
}

static int alone(int k, int reps)
{
    double *s = malloc(sizeof(double) * (size_t)reps);
    if (!s) {
        fprintf(stderr, "mma-pairs: out of memory\n");
        exit(1);
    }
    one(k);
    for (int r = 0; r < reps; r++)
        s[r] = one(k);
    double m = bench_median(s, reps) * 1e6;
    int ok = checked();
    printf("%-10s alone %21.2f %17d  %s\n", kind_name[k], m, reps, ok ? "back to back" : "MISMATCH");
    free(s);
    return ok;
}


int main(int argc, char **argv)
{
    const char *sock = getenv("MMA_SOCKET") ? getenv("MMA_SOCKET") : "/run/mma/mmad.sock";
    int gpu = 0, reps = 200, o;
    n = 16 << 10;
    static const struct option lo[] = {{"socket", 1, 0, 's'}, {"gpu", 1, 0, 'g'}, {"size", 1, 0, 'n'},
                                       {"reps", 1, 0, 'r'},   {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    while ((o = getopt_long(argc, argv, "s:g:n:r:h", lo, NULL)) != -1) {
        switch (o) {
        case 's': sock = optarg; break;
        case 'g':
            if (bench_int_arg("mma-pairs", "--gpu", optarg, 0, 1023, &gpu))
                return 2;
            break;
        case 'n':
            if (bench_size_arg("mma-pairs", "--size", optarg, 16, (size_t)64 << 20, &n))
                return 2;
            break;
        case 'r':
            if (bench_int_arg("mma-pairs", "--reps", optarg, 10, 10000000, &reps))
                return 2;
            break;
        default:
            printf("usage: mma-pairs [--socket S] [--gpu 0] [--size 16K] [--reps 200]\n");
            return o == 'h' ? 0 : 2;
        }
    }
    int ngpu = 0;
    if (cudaGetDeviceCount(&ngpu) != cudaSuccess || ngpu == 0) {
        fprintf(stderr, "mma-pairs: no CUDA GPU visible\n");
        return 77;
    }
    MK(mma_connect(sock, &cl));
    mma_info_t info;
    MK(mma_get_info(cl, &info));
    if (info.simulated || gpu < 0 || gpu >= info.gpu_count) {
        fprintf(stderr, "mma-pairs: needs mmad on real GPUs and --gpu below %d\n", info.gpu_count);
        return 2;
    }
    CK(cudaSetDevice(gpu));
    for (int i = 0; i < 2; i++)
        CK(cudaStreamCreateWithFlags(&st[i], cudaStreamNonBlocking));
    MK(mma_host_alloc(cl, n, (void **)&host));
    MK(mma_host_alloc(cl, n, (void **)&back));
    MK(mma_device_alloc(cl, gpu, n, (void **)&dev));
    for (size_t i = 0; i < n; i++)
        host[i] = (char)(i * 7 + 3);
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, gpu));
    printf("mma-pairs | %s | H2D %zu B into gpu%d | bypass below %zu B | p50 us\n", prop.name, n, gpu,
           info.bypass_threshold);
    printf("%-10s %-6s %-10s %9s %9s %8s %6s\n", "a", "", "b", "a us", "b us", "a/b", "pairs");
    int ok = 1;
    static const int pairs[][2] = {{K_NAT_A, K_NAT_A}, {K_NAT_A, K_NAT_B}, {K_NAT_A, K_AUTO}};
    for (int after = 0; after < 2; after++)
        for (int i = 0; i < 3; i++) {
            if (after)
                for (int r = 0; r < reps; r++)
                    one(K_MMA);
            ok &= pair(pairs[i][0], pairs[i][1], reps, after ? "right after copies through mmad" : "fresh");
        }
    ok &= pair(K_NAT_A, K_AUTO, reps * 10, "ten times the pairs");
    for (int k = 0; k <= K_AUTO; k++)
        ok &= alone(k, reps);
    mma_free(cl, dev);
    mma_free(cl, back);
    mma_free(cl, host);
    mma_disconnect(cl);
    return ok ? 0 : 1;
}
