/* The one seam between the scheduler and hardware. Two implementations:
 * backend_cuda.c (real GPUs) and backend_sim.c (the simulated box). The
 * engine thread calls submit/poll; region_open/close may come from the loop
 * thread, so backends make those safe against a concurrent submit. */
#ifndef MMAD_BACKEND_H
#define MMAD_BACKEND_H

#include <stdatomic.h>
#include <stdio.h>

#include "mmad.h"

typedef struct mmad_backend mmad_backend_t;

typedef struct mmad_backend_ops {
    const char *name;
    /* Make a region usable for copies: pin a host mapping, open an IPC
     * handle. For host and simulated device regions r->base is already set. */
    int (*region_open)(mmad_backend_t *be, mmad_region_t *r, const uint8_t *ipc, size_t ipc_len,
                       uint64_t ipc_offset);
    void (*region_close)(mmad_backend_t *be, mmad_region_t *r);
    /* Optional: a copy to `target` arrived and its chunks come next; a
     * backend may get ready (wake the threads that will issue them). */
    void (*prepare)(mmad_backend_t *be, int target);
    /* Start one chunk on its path (c->target, c->via, c->dir). The scheduler
     * never has more chunks in flight than the path's depth allows. */
    int (*submit)(mmad_backend_t *be, mmad_chunk_t *c);
    /* Up to max finished chunks; c->status says how each went. */
    int (*poll)(mmad_backend_t *be, mmad_chunk_t **out, int max);
    void (*destroy)(mmad_backend_t *be);
    /* Optional, for a backend that calls wake() from threads of its own:
     * set wake to NULL such that once this returns none of them is inside
     * the old wake() or will call it (the engine frees its argument next).
     * Without it the engine just clears wake. */
    void (*wake_off)(mmad_backend_t *be);
} mmad_backend_ops_t;

struct mmad_backend {
    const mmad_backend_ops_t *ops;
    int gpu_count;
    int simulated;
    int event_driven;        /* 1: calls wake() when a chunk finishes; 0: poll */
    double sim_scale;        /* 1.0 on real GPUs */
    mmad_gpu_t gpus[MMAD_MAX_GPUS];
    /* relay[target][via]: 1 when via may stage for target; else why not */
    unsigned char relay_ok[MMAD_MAX_GPUS][MMAD_MAX_GPUS];
    char relay_note[MMAD_MAX_GPUS][MMAD_MAX_GPUS][48];
    char topology[160];
    uint64_t chunk_size;
    int staging_slots;
    int path_depth;
    int64_t bypass_threshold; /* the effective one: --bypass-threshold, else the backend's */
    /* Relays of copies smaller than this take one hop (a copy kernel on the
     * via GPU; cuda only, 0: none), with this fixed latency over a direct
     * chunk instead of the staged relay's. */
    uint64_t relay_kernel_below;
    double relay_kernel_overhead_us;
    /* 1: one-hop relays are posted to kernels that stay on the via GPUs
     * (--relay-linger-us): they cost the engine no issue time of their own */
    int relay_kernel_resident;
    /* 1: one-hop relays through this GPU may run now (it can take them, and
     * no other process kept --relay-kernel-busy-sm of its SMs busy within
     * the last second) */
    _Atomic int relay_kernel_now[MMAD_MAX_GPUS];
    /* Resident relay kernels started so far (cuda; 0 without them) */
    _Atomic uint64_t relay_kernel_launches;
    /* Traffic on each GPU's own PCIe link that is not mmad's, per direction,
     * in MB/s of the real box, as the backend last measured it (cuda: the
     * driver's PCIe byte counters less mmad's own bytes; sim: its simulated
     * native loads). foreign_seq grows with every new measurement; with
     * foreign_known 0 the backend cannot see it and nothing is judged. */
    int foreign_known;
    _Atomic uint32_t foreign_mbps[MMAD_MAX_GPUS][2];
    _Atomic uint64_t foreign_seq;
    /* A chunk finished (event_driven backends); set by the engine, cleared
     * through ops->wake_off where there is one */
    void (*wake)(void *arg);
    void *wake_arg;
};

/* A PCIe throughput counter (NVML's) counts the link's packets, headers
 * included: on 4x H200 a native 55.3 GB/s copy read 59.6 GB/s H2D and 60.0
 * D2H, ~8-9% over its payload. mmad knows its own payload bytes, so its
 * share of the counter is those times this; what is left is other traffic.
 * (Without it, mmad's own copies over a full link read as ~5 GB/s of
 * "other traffic", and relays stopped by a neighbour stayed stopped while
 * mmad alone filled the link.) */
#define MMAD_PCIE_COUNTER_OVERHEAD 1.10

/* Other traffic on a link, MB/s: the counter less mmad's own payload scaled
 * by the counter's overhead, never below 0. */
static inline double mmad_foreign_mbps(double counter_mbps, double own_payload_mbps)
{
    double f = counter_mbps - own_payload_mbps * MMAD_PCIE_COUNTER_OVERHEAD;
    return f > 0 ? f : 0;
}

/* bypass_threshold where no copy can gain from mmad: libmma runs every copy
 * natively (server.c sends it as UINT64_MAX, mma.h's MMA_BYPASS_ALL). */
#define MMAD_BYPASS_ALL INT64_MAX

/* Whether any GPU may relay for another (relay_ok after peer access and
 * topology). Without one every copy has only its GPU's own link: mmad adds
 * its hops and gains nothing. */
static inline int mmad_backend_any_relay(const mmad_backend_t *be)
{
    for (int t = 0; t < be->gpu_count; t++)
        for (int v = 0; v < be->gpu_count; v++)
            if (v != t && be->relay_ok[t][v])
                return 1;
    return 0;
}

/* The bypass threshold a backend with a native path serves: --bypass-threshold
 * when given (>= 0), else MMAD_BYPASS_ALL where no copy can relay (no GPU
 * can relay for another, or --max-paths=1), else the backend's measured
 * default. Relays set aside later, at run time, do not change it. */
static inline int64_t mmad_bypass_for(const mmad_backend_t *be, int64_t configured, int64_t measured, int max_paths)
{
    if (configured >= 0)
        return configured;
    return max_paths != 1 && mmad_backend_any_relay(be) ? measured : MMAD_BYPASS_ALL;
}

/* Constructors. Each logs its own failure and returns an mma status. */
int mmad_backend_sim_create(const mmad_config_t *cfg, mmad_backend_t **out);
int mmad_backend_cuda_create(const mmad_config_t *cfg, mmad_backend_t **out);
/* How many CUDA devices there are (0 where there is no driver). */
int mmad_cuda_device_count(void);

#endif
