/* The scheduler: jobs become micro-transfers (chunks) routed over paths.
 * A path is (target GPU, via GPU, direction); via == target is the direct
 * path over the target's own link, any other via is a relay through that
 * GPU's staging buffers. Each path has a bounded depth: a path with room
 * pulls the next chunk (backpressure), the direct path first, and jobs take
 * turns chunk by chunk so several clients share the box fairly. Latency-class
 * jobs are served before bulk ones. Engine thread only, except the stats,
 * which mmactl reads under stats_lock.
 *
 * Yielding. Every path's achieved rate is estimated from its chunks'
 * completions. A relay borrows its via GPU's link: when that link is loaded
 * by the via GPU's own traffic, the relay runs well below the best rate seen
 * in its direction (the reference), and every byte it moves comes out of that
 * traffic's share. Such a relay yields: it gets no chunks except one probe
 * every yield_probe_ns, and resumes when a probe runs fast again. The direct
 * path never yields.
 *
 * Planned splits. A copy small enough for one chunk per path (plan_split 1),
 * or for path_depth chunks per path (plan_split 2), or any whose relays go
 * in one hop (plan_split 3: they take no staging buffer), gets a share per path
 * whose lengths make the paths finish together, allowing for the engine
 * issuing chunks one after another (direct first) and the extra latency of a
 * relay: later and slower-starting paths get less, and below ~2 MiB (4x H200
 * figures) the direct path gets everything. Each share is cut into equal
 * pieces; a relay's may end (H2D) or start (D2H) with a short edge piece,
 * whose NVLink hop is the one no PCIe transfer hides. With plan_learn, each
 * path's rate is weighted by what it showed in earlier planned copies.
 *
 * Issue order: breadth first, the path with the fewest chunks in flight,
 * the direct one first among equals. */
#ifndef MMAD_SCHED_H
#define MMAD_SCHED_H

#include <pthread.h>

#include "backend.h"
#include "mmad.h"

typedef struct mmad_path_stat {
    uint64_t bytes;
    uint64_t chunks;
    uint64_t one_hop_chunks;  /* of those, relays moved by a copy kernel on the via GPU */
    uint64_t active_ns;
    uint64_t active_since;
    int inflight;
    int enabled;
    char note[48];
    int yielding;            /* a relay running slow: only probes go (mmactl state=yield) */
    int busy;                /* its via GPU's link carries other traffic: no chunks (mmactl state=yield) */
    double rate;             /* smoothed achieved rate, bytes/ns = GB/s (0: not measured) */
    /* the estimate's state; engine thread only */
    uint64_t last_done;      /* previous completion here: a path runs its chunks in order */
    double ew_bytes, ew_ns;  /* byte-weighted moving sums; rate = ew_bytes / ew_ns */
    double ew_judged_ns;     /* ew_ns with slow outliers capped, for yielding */
    int samples;             /* chunks in the estimate since it (re)started */
    uint64_t probe_at;       /* a yielding relay's next probe is due */
    int probing;             /* that probe is in flight */
} mmad_path_stat_t;

typedef struct mmad_plan mmad_plan_t;

/* --plan-learn=3 keeps a weight per size class of copies: class k holds
 * copies of [2^k, 2^(k+1)) MiB, the first of less than 2 MiB, the last of
 * 2^(MMAD_PLAN_CLASSES-1) MiB and more. */
#define MMAD_PLAN_CLASSES 12
int mmad_plan_class(uint64_t total);

/* --plan-learn=2: a path's finish time, learned as start + bytes / rate
 * from its planned copies (decaying least squares around the plan's own
 * model, which counts as one copy at 1 MiB and one at 16 MiB). */
typedef struct mmad_path_fit {
    double s1, sx, sy, sxx, sxy;
} mmad_path_fit_t;

/* One finished chunk, for --trace (times in ns, CLOCK_MONOTONIC). */
typedef struct mmad_trace_rec {
    uint64_t job, job_bytes;
    uint64_t t_queued, t_runnable, t_issue, t_submitted, t_done;
    uint64_t t_sent; /* the client's send time, 0 when not known */
    uint64_t g_times[4]; /* the chunk's copies on the GPU (mmad_chunk_t.g_times) */
    uint64_t len;
    uint8_t target, via, dir, priority;
    int32_t status;
} mmad_trace_rec_t;

typedef struct mmad_sched {
    mmad_backend_t *be;
    int ngpu;
    uint64_t chunk_size;
    uint64_t min_chunk;
    int staging_slots;
    int path_depth;          /* chunks in flight per path */
    int chunk_rounds;
    int tail_split;
    int fewest_chunks;
    int max_paths;
    /* yielding; times are this box's (the simulated box's are scaled) */
    double yield_frac;           /* 0: off */
    uint64_t yield_probe_ns;
    uint64_t rate_min_len;       /* shorter chunks are all latency: they do not count */
    double rate_window;          /* bytes a rate estimate remembers */
    double ref[2];               /* best smoothed rate per direction, decaying, bytes/ns */
    uint64_t ref_at[2];
    double ref_floor;            /* --link-gbps: the reference never falls below it */
    double ref_half_life_ns;
    /* links busy with traffic that is not mmad's (backend foreign_mbps) */
    double busy_mbps;            /* --busy-gbps x 1000; 0: off */
    uint64_t foreign_seen;       /* the backend's foreign_seq last looked at */
    int link_busy[MMAD_MAX_GPUS][2];
    int link_over[MMAD_MAX_GPUS][2]; /* measurements in a row above the limit */
    /* --yield-to-direct: runnable jobs not done yet per target GPU and
     * direction (own_update); a relay through such a GPU takes no new work */
    int yield_to_direct;
    int own_jobs[MMAD_MAX_GPUS][2];
    /* planned splits */
    int plan_split;              /* 1: copies of <= 1 chunk per path; 2: <= path_depth chunks; 3: also one-hop copies */
    int plan_learn;              /* 1: learn plan_w (rate weights); 2: plan_fit (start + rate); 3: plan_e */
    uint64_t plan_learn_min;     /* only shares of at least this teach plan_w */
    uint64_t relay_edge;         /* a planned relay's small last (H2D) / first (D2H) piece; 0: none */
    double plan_w[MMAD_MAX_GPUS][MMAD_MAX_GPUS][2]; /* [target][via][dir]: a path's rate over the plan's */
    mmad_path_fit_t plan_fit[MMAD_MAX_GPUS][MMAD_MAX_GPUS][2]; /* --plan-learn=2 */
    /* --plan-learn=3: [target][via][dir][size class]: a path's weight, moved
     * after each copy of the class so that its paths end together */
    double plan_e[MMAD_MAX_GPUS][MMAD_MAX_GPUS][2][MMAD_PLAN_CLASSES];
    double issue_cost_ns;        /* engine time per chunk issued */
    double relay_overhead_ns;    /* a relay chunk's extra fixed latency */
    double one_hop_overhead_ns;  /* --relay-overhead-us given: one-hop relays' too (<0: the backend's) */
    int relay_first;             /* --relay-first: posted one-hop relays go before the direct chunk */
    int edge_one_hop;            /* --edge-one-hop: a staged copy's relay edges go in one hop */
    mmad_plan_t *plans;          /* of the planned jobs queued or running */
    uint64_t (*now)(void);       /* mma_now_ns; the unit tests drive their own clock */
    mmad_job_t *jobs;        /* queued and running, latency class first */
    mmad_job_t *rr;          /* whose turn it is among bulk jobs */
    int staging_inflight[MMAD_MAX_GPUS];
    int chunks_inflight;
    uint64_t bytes_inflight;
    mmad_chunk_t *free_chunks;
    int failed_pending;      /* a job failed with no chunk in flight (mmad_sched_take_failed) */
    pthread_mutex_t stats_lock;
    mmad_path_stat_t paths[MMAD_MAX_GPUS][MMAD_MAX_GPUS][2];
    uint64_t jobs_done;
    uint64_t bytes_done;
    /* engine time in the backend, for mmactl status (the cost of a chunk) */
    uint64_t submit_calls, submit_ns;
    uint64_t poll_calls, poll_ns;
    /* --trace: finished chunks, written as CSV by mmad_sched_destroy */
    uint64_t jobs_added;
    mmad_trace_rec_t *trace;
    size_t trace_n, trace_cap;
    char trace_path[256];
} mmad_sched_t;

int mmad_sched_init(mmad_sched_t *s, mmad_backend_t *be, const mmad_config_t *cfg);
void mmad_sched_destroy(mmad_sched_t *s);

/* Queue a job (the scheduler owns it from here). */
void mmad_sched_add(mmad_sched_t *s, mmad_job_t *job);

/* Issue chunks while paths have room. Returns how many were issued. */
int mmad_sched_fill(mmad_sched_t *s);

/* Account a finished chunk. Returns the job when this was its last chunk
 * (the job is unlinked; the caller completes and frees it), else NULL. */
mmad_job_t *mmad_sched_chunk_done(mmad_sched_t *s, mmad_chunk_t *c);

/* Jobs that failed with no chunk in flight (the backend refused their
 * direct chunk, e.g. their first): no chunk's end will finish them, so they
 * are unlinked and returned as a list (linked by ->next) for the caller to
 * finish with their status. The engine calls it after every fill. */
mmad_job_t *mmad_sched_take_failed(mmad_sched_t *s);

/* Shutdown: every job with nothing in flight, unlinked, as a list (linked
 * by ->next), their statuses untouched. */
mmad_job_t *mmad_sched_take_idle(mmad_sched_t *s);

/* A client went away: its jobs stop being carved; the ones with nothing in
 * flight are returned as a list (linked by ->next) for the caller to finish. */
mmad_job_t *mmad_sched_cancel_conn(mmad_sched_t *s, mmad_conn_t *conn);

/* 1 when chunks are in flight and every path with a chunk in flight has
 * another queued behind it: an end noticed late then leaves no link idle
 * (the engine sleeps instead of spinning). */
int mmad_sched_paths_queued(const mmad_sched_t *s);

/* The paths a job to `target` in `dir` may use, direct first. */
int mmad_sched_paths_for(const mmad_sched_t *s, int target, int max_paths, int *vias);

/* Set a relay path aside (e.g. after a copy failed on it). */
void mmad_sched_disable_path(mmad_sched_t *s, int target, int via, int dir, const char *why);

/* How many bytes a job's chunks will be: its total spread evenly over its
 * paths, depth x rounds chunks each, kept between min_chunk and chunk_size.
 * More than `depth` chunks per path lets fast paths pull more of the copy
 * than slow ones, so the copy does not wait for its slowest path. */
uint64_t mmad_sched_chunk_len(const mmad_sched_t *s, uint64_t total, int npaths);

/* The planned split of `total` bytes over `npaths` paths in issue order
 * (0 the direct path, then relays): path p starts p * issue_ns after the
 * first, a relay relay_ns later still, and every path moves `rate` bytes/ns;
 * lens[p] makes them all finish together (water-filling). Paths whose share
 * would be under min_chunk are left out (the last ones: they start latest),
 * no share exceeds cap unless the direct path must take the rest, relays'
 * shares are whole 4 KiB pages and the direct path takes the remainder, so
 * the lens sum to total exactly. Returns how many paths got a share (lens of
 * the others are 0). */
int mmad_sched_plan_split(uint64_t total, int npaths, double issue_ns, double relay_ns, double rate,
                          uint64_t min_chunk, uint64_t cap, uint64_t *lens);
/* The same with a weight per path (NULL: all 1): path p moves rate x
 * weight[p]. Relays left out are those whose share would be under
 * min_chunk (with weights not always the last ones): their lens are 0, and
 * the return value is one past the last path with a share. */
int mmad_sched_plan_split_w(uint64_t total, int npaths, double issue_ns, double relay_ns, double rate,
                            const double *weight, uint64_t min_chunk, uint64_t cap, uint64_t *lens);

/* The same from each path's start t[p] (ns after the first chunk's issue)
 * and rate r[p] (bytes/ns), relays' shares at most cap and the direct
 * path's at most direct_cap; the direct path (0) always takes part. */
int mmad_sched_plan_split_tr(uint64_t total, int npaths, const double *t, const double *r, uint64_t min_chunk,
                             uint64_t cap, uint64_t direct_cap, uint64_t *lens);



/* The fit's start (ns) and rate (bytes/ns) for a path whose model is
 * (t0, r0). */
void mmad_path_fit_get(const mmad_path_fit_t *f, double t0, double r0, double *t, double *r);
/* One planned copy: `bytes` ended `ns` after the copy's first issue. */
void mmad_path_fit_add(mmad_path_fit_t *f, double bytes, double ns);

/* The reference rate of a direction at `now` (bytes/ns): the best smoothed
 * path rate seen, halving every ~10 s (real-box time), at least --link-gbps. */
double mmad_sched_ref_rate(mmad_sched_t *s, int dir, uint64_t now);

#endif
