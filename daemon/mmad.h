/* mmad's internal types, shared by its subsystems:
 *   server.c  (socket, clients, request validation) -> engine.c (jobs)
 *   sched.c   (chunks, path queues)                 -> backend (copies)
 * Nothing here is visible to clients; proto/mma.proto is their contract. */
#ifndef MMAD_H
#define MMAD_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "flagpage.h"

#define MMAD_MAX_GPUS 16
#define MMAD_MAX_SEGMENTS 65536

enum { MMA_DIR_H2D = 0, MMA_DIR_D2H = 1 };

/* ---- configuration (config.c: one table of every option) ---- */
typedef struct mmad_config {
    char socket_path[108];
    char backend[16];       /* auto | cuda | sim */
    char sim_preset[32];    /* 4gpu | 8gpu-2socket */
    int sim_gpus;           /* 0: the preset's */
    double sim_scale;       /* simulated rates are multiplied by this */
    uint64_t chunk_size;    /* largest micro-transfer */
    uint64_t min_chunk;     /* smallest split of a large copy */
    int staging_slots;      /* staging buffers per GPU, each chunk_size */
    int path_depth;         /* chunks in flight per path */
    int chunk_rounds;       /* a large copy is cut so each path pulls this many times its depth */
    int tail_split;         /* chunks shrink with what is left of a copy (guided self-scheduling) */
    int relay_per_slot;     /* cuda: both hops of a relay on its staging slot's own stream */
    char completion[8];     /* cuda: how chunks signal the end: auto | flags | events */
    char copy_api[8];       /* cuda: runtime | driver */
    char hop_side[8];       /* cuda: via | target: whose stream runs a relay's NVLink hop */
    int submit_threads;     /* cuda: 1 issues relays from one thread per GPU */
    uint64_t relay_kernel;  /* cuda: copies below this relay through a copy kernel on the via GPU (0: never) */
    int relay_kernel_blocks; /* cuda: blocks per relay kernel */
    int relay_kernel_busy_sm; /* cuda: relays stage through a GPU where another process uses this % of SMs (0: never) */
    int relay_linger_us;     /* cuda: a resident relay kernel waits this long for the next chunk (0: a launch per chunk) */
    int fewest_chunks;      /* cut a copy into no more chunks per path than chunk_size requires */
    int64_t bypass_threshold; /* -1: measured/derived at start */
    int max_paths;          /* 0: all */
    int max_clients;
    double loop_spin_us;      /* the socket thread polls this long after a copy request */
    double engine_spin_us;    /* the engine polls this long after its last progress before it sleeps */
    int engine_spin_queued;   /* 1: ... even when every busy path has its next chunk queued */
    double idle_spin_us;      /* engine thread awake this long after its last work */
    double wake_spin_us;      /* after a KICK both threads stay awake this long */
    uint64_t cold_bypass;     /* cuda: copies below this go native while mmad sleeps (0: off) */
    uint64_t cold_small;      /* cuda: copies below this go native once the relay kernels have ended (0: off) */
    int tail_spin;            /* ... and through copies' last chunks */
    int submit_ring;          /* read clients' submission rings (flagpage.h) */
    int flag_slots_max;
    char log_level[16];
    int sim_fail_via;       /* fault injection: relays through this GPU fail (-1 none) */
    double sim_chunk_cost_us; /* engine time to issue one chunk on the real box (0: free) */
    double sim_relay_latency_us; /* extra fixed latency of a relay chunk on the real box (0: none) */
    char sim_busy_gpus[64];   /* comma list: these GPUs' links carry a simulated native load */
    double sim_busy_share;    /* the share of a busy link that mmad's chunks get */
    char sim_busy_file[108];  /* when set, the busy load is on only while this file exists */
    double yield_frac;        /* a relay below this x the reference rate yields (0: never) */
    int yield_to_direct;      /* relays stay off a GPU's link while mmad copies into / out of that GPU */
    double busy_gbps;         /* relays stop on a link carrying this much traffic not mmad's (0: never) */
    char trace_path[256];     /* chunk trace CSV written at exit (empty: none) */
    int trace_gpu;            /* with it, each chunk's copies timed on the GPUs too */
    double yield_probe_ms;    /* a yielding relay lets one chunk through this often */
    double link_gbps;         /* per-link rate assumed until one is measured; the reference's floor */
    int plan_split;           /* 1: copies of at most one chunk per path get a planned split; 2: up to path_depth; 3: also one-hop copies */
    int plan_learn;           /* planned splits learn each path's weight: 1 its rate, 2 a start and rate, 3 even ends */
    uint64_t relay_edge;      /* planned relays end (H2D) / start (D2H) with a piece this small; 0: off */
    double issue_cost_us;     /* engine time per chunk issued (<0: the backend's) */
    int relay_first;          /* posted one-hop relays are issued before the direct chunk */
    int edge_one_hop;         /* a staged copy's relay edges (first and last piece) go in one hop */
    double relay_overhead_us; /* extra latency of a relay chunk over a direct one (<0: the backend's) */
} mmad_config_t;

void mmad_config_defaults(mmad_config_t *cfg);
/* Parse argv; returns 0, 1 when --help/--version printed, or <0 on error
 * (the message already printed). */
int mmad_config_parse(mmad_config_t *cfg, int argc, char **argv);
void mmad_config_usage(FILE *out);

/* ---- regions (regions.c) ---- */
typedef enum { MMAD_REGION_HOST = 0, MMAD_REGION_DEVICE = 1 } mmad_region_kind_t;

struct mmad_backend;

typedef struct mmad_region {
    _Atomic int refs;
    uint32_t id;
    mmad_region_kind_t kind;
    int gpu;             /* device regions */
    uint64_t size;
    char *base;          /* daemon-visible address of byte 0 (host or device) */
    void *map;           /* memfd mapping, when there is one */
    size_t map_len;
    void *be_priv;       /* the backend's handle (IPC mapping, registration) */
    struct mmad_backend *be;
    struct mmad_region *next; /* in its client's registry */
} mmad_region_t;

/* A client connection as the engine sees it; server.c keeps the socket side. */
typedef struct mmad_conn {
    _Atomic int refs;
    uint32_t id;
    pid_t pid;
    uid_t uid;
    char name[64];
    mma_flag_slot_t *flags;
    uint32_t nslots;
    size_t flags_len;       /* the whole mapping: the slots, and the ring where there is one */
    mma_sq_t *sq;           /* the submission ring in the flag page; NULL: none (loop thread) */
    mmad_region_t *regions; /* registry; loop thread only */
    uint32_t next_region_id;
    _Atomic int closed;
    _Atomic int inflight;   /* jobs not yet completed */
    _Atomic uint64_t copies;
    _Atomic uint64_t bytes;
    uint64_t ring_copies;   /* copies taken from the submission ring (loop thread) */
} mmad_conn_t;

void mmad_region_ref(mmad_region_t *r);
void mmad_region_unref(mmad_region_t *r);
void mmad_conn_ref(mmad_conn_t *c);
void mmad_conn_unref(mmad_conn_t *c);

/* Every memfd mmad maps must be sealed against shrinking: a client that cut
 * one short under mmad's mapping would have mmad die of SIGBUS at its next
 * touch of the lost pages (the socket is open to every local user). */
#define MMAD_MEMFD_UNSEALED "memfd must be sealed against shrinking (F_SEAL_SHRINK), and not hugetlb"
/* 1 when fd carries F_SEAL_SHRINK (fcntl F_GET_SEALS) and is shmem (tmpfs).
 * A hugetlb memfd is refused however sealed: the seal does not stop a hole
 * punched in it (fallocate), and with no free huge page left to fill the
 * hole mmad's next touch of it dies of SIGBUS; a hole in a shmem memfd just
 * reads as zeros again. */
int mmad_memfd_sealed(int fd);
/* Map a memfd of at least `size` bytes, sealed against shrinking
 * (MMA_ERR_INVAL otherwise); the fd is consumed (closed). */
int mmad_region_new_mapped(struct mmad_backend *be, mmad_region_kind_t kind, int gpu, int fd,
                           uint64_t size, mmad_region_t **out);
/* A device region opened by the backend from a cudaIpc handle. */
int mmad_region_new_ipc(struct mmad_backend *be, int gpu, const uint8_t *handle, size_t handle_len,
                        uint64_t offset, uint64_t size, mmad_region_t **out);
/* Registry of one client: add (takes the creator's reference), find, remove. */
void mmad_registry_add(mmad_conn_t *c, mmad_region_t *r);
mmad_region_t *mmad_registry_find(mmad_conn_t *c, uint32_t id);
int mmad_registry_remove(mmad_conn_t *c, uint32_t id);
void mmad_registry_clear(mmad_conn_t *c);

/* ---- jobs and chunks (sched.c) ---- */
typedef struct mmad_seg {
    char *host;
    char *dev;
    const struct mmad_region *dev_region; /* the device region dev lies in */
    uint64_t len;
} mmad_seg_t;

typedef struct mmad_job {
    mmad_conn_t *conn;       /* holds a reference */
    uint32_t slot;
    uint64_t seq;
    int dir;
    int target;
    int priority;            /* 0 bulk, 1 latency */
    int max_paths;
    mmad_seg_t *segs;
    size_t nsegs;
    mmad_region_t **refs;    /* regions the job keeps alive */
    size_t nrefs;
    /* carving cursor */
    size_t cur_seg;
    uint64_t cur_off;
    uint64_t total;
    uint64_t issued;
    uint64_t landed;
    uint64_t chunk_len;      /* this job's micro-transfer size */
    int inflight;            /* chunks on a path now */
    int status;
    int runnable;            /* its slot showed `reached` */
    uint64_t t_queued;
    uint64_t t_sent;         /* the client's send time (0: not given) */
    uint64_t t_runnable;     /* when its slot showed `reached` (chunk trace) */
    uint64_t trace_id;       /* the scheduler's count of jobs added (chunk trace) */
    struct mmad_job *next;
} mmad_job_t;

typedef struct mmad_chunk {
    mmad_job_t *job;
    int target, via, dir;
    char *host;
    char *dev;
    const struct mmad_region *dev_region; /* its segment's */
    uint64_t len;
    int status;
    uint64_t t_issue;
    uint64_t t_submitted;    /* submit() returned (chunk trace) */
    /* backend's own bookkeeping */
    int stage;
    int staging;
    char *kernel_dev;        /* cuda: a one-hop relay (a copy kernel on the via GPU): dev as that GPU maps it */
    uint64_t kernel_seq;     /* cuda: its descriptor in the via GPU's resident kernel ring (0: none) */
    int one_hop_edge;        /* sched (--edge-one-hop): a staged copy's relay edge, to go in one hop
                              * where the backend can, whatever the copy's size */
    void *be_priv;
    int mark_gpu;            /* cuda, completion by events: the GPU whose pool be_priv's event is from */
    /* cuda with --trace-gpu: when the GPU ran the chunk's copies, ns on the
     * host's clock: [0..1] its first copy (a relay's PCIe leg H2D, its
     * NVLink hop D2H; a direct chunk's only copy), [2..3] a relay's second;
     * 0 where not timed. gt_ev/gt_gpu: the timing events behind them. */
    uint64_t g_times[4];
    void *gt_ev[4];
    int gt_gpu[4];
    struct mmad_chunk *next;
} mmad_chunk_t;

/* Release a job: its region and connection references, its segments.
 * (Jobs are built by mmad_request_build_job in request.c.) */
void mmad_job_free(mmad_job_t *job);

/* ---- backend (backend.h) and topology ---- */
typedef struct mmad_gpu {
    int index;
    char name[64];
    char pci_bus_id[32];
    int numa_node;
    int socket;
    uint64_t memory;
} mmad_gpu_t;

#endif
