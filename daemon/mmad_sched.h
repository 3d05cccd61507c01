/* The scheduler: jobs become micro-transfers (chunks) routed over paths.
 * A path is (target GPU, via GPU, direction); via == target is the direct
 * path over the target's own link, any other via is a relay through that
 * GPU's staging buffers. Each path has a bounded depth: a path with room
 * pulls the next chunk (backpressure), the direct path first, and jobs take
 * turns chunk by chunk so several clients share the box fairly. Latency-class
 * jobs are served before bulk ones. Engine thread only, except the stats,
 * which mmactl reads under stats_lock. */
#ifndef MMAD_SCHED_H
#define MMAD_SCHED_H

#include <pthread.h>

#include "backend.h"
#include "mmad.h"

typedef struct mmad_path_stat {
    uint64_t bytes;
    uint64_t chunks;
    uint64_t active_ns;
    uint64_t active_since;
    int inflight;
    int enabled;
    char note[48];
} mmad_path_stat_t;

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
    mmad_job_t *jobs;        /* queued and running, latency class first */
    mmad_job_t *rr;          /* whose turn it is among bulk jobs */
    int staging_inflight[MMAD_MAX_GPUS];
    int chunks_inflight;
    uint64_t bytes_inflight;
    mmad_chunk_t *free_chunks;
    pthread_mutex_t stats_lock;
    mmad_path_stat_t paths[MMAD_MAX_GPUS][MMAD_MAX_GPUS][2];
    uint64_t jobs_done;
    uint64_t bytes_done;
    /* engine time in the backend, for mmactl status (the cost of a chunk) */
    uint64_t submit_calls, submit_ns;
    uint64_t poll_calls, poll_ns;
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

/* A client went away: its jobs stop being carved; the ones with nothing in
 * flight are returned as a list (linked by ->next) for the caller to finish. */
mmad_job_t *mmad_sched_cancel_conn(mmad_sched_t *s, mmad_conn_t *conn);

/* The paths a job to `target` in `dir` may use, direct first. */
int mmad_sched_paths_for(const mmad_sched_t *s, int target, int max_paths, int *vias);

/* Set a relay path aside (e.g. after a copy failed on it). */
void mmad_sched_disable_path(mmad_sched_t *s, int target, int via, int dir, const char *why);

/* How many bytes a job's chunks will be: its total spread evenly over its
 * paths, depth x rounds chunks each, kept between min_chunk and chunk_size.
 * More than `depth` chunks per path lets fast paths pull more of the copy
 * than slow ones, so the copy does not wait for its slowest path. */
uint64_t mmad_sched_chunk_len(const mmad_sched_t *s, uint64_t total, int npaths);

#endif
