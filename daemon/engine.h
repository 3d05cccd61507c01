/* The engine thread: takes validated jobs from the loop thread, starts each
 * once its slot's `reached` shows, drives the scheduler and the backend, and
 * writes `status` then `done` into the client's flag slot when the last byte
 * has landed. It polls with backoff while work is pending and sleeps on a
 * condition variable when there is none, so an idle daemon uses no CPU. */
#ifndef MMAD_ENGINE_H
#define MMAD_ENGINE_H

#include "backend.h"
#include "mmad_sched.h"

typedef struct mmad_engine mmad_engine_t;

int mmad_engine_start(mmad_backend_t *be, const mmad_config_t *cfg, mmad_engine_t **out);
/* Cancel what is queued, wait for chunks on the GPUs, join the thread. */
void mmad_engine_stop(mmad_engine_t *e);
/* Hand over a job (the engine owns it from here). */
void mmad_engine_submit(mmad_engine_t *e, mmad_job_t *job);
/* The client is gone: drop its queued chunks; the engine takes over the
 * caller's reference to conn and drops it when its last chunk has landed. */
void mmad_engine_conn_closed(mmad_engine_t *e, mmad_conn_t *conn);
/* Statistics, for mmactl (read under s->stats_lock). */
mmad_sched_t *mmad_engine_sched(mmad_engine_t *e);

/* Finish a job without running it (validation passed but the client left,
 * or shutdown): writes its flag slot and releases it. Exposed for tests. */
void mmad_job_complete(mmad_job_t *job, int status);

#endif
