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
/* Copies are coming (a client's KICK): an idle engine wakes now and stays
 * awake until until_ns (mma_now_ns), and --idle-spin-us after its last
 * work, so the first of them does not wait for it. */
void mmad_engine_wake(mmad_engine_t *e, uint64_t until_ns);
/* The client is gone: drop its queued chunks; the engine takes over the
 * caller's reference to conn and drops it when its last chunk has landed. */
void mmad_engine_conn_closed(mmad_engine_t *e, mmad_conn_t *conn);
/* `hook(arg, 1)` from the engine thread when a copy is on its last chunks
 * (all issued, at most one per path still in flight), `hook(arg, 0)` when
 * none is: a client that waits for a copy sends its next request right
 * after it ends. The hook runs under the engine's lock; NULL unhooks, and
 * once this returns the old hook is not called again. */
void mmad_engine_set_tail_hook(mmad_engine_t *e, void (*hook)(void *arg, int tail), void *arg);
/* Statistics, for mmactl (read under s->stats_lock). */
mmad_sched_t *mmad_engine_sched(mmad_engine_t *e);

/* Finish a job without running it (validation passed but the client left,
 * or shutdown): writes its flag slot and releases it. Exposed for tests. */
void mmad_job_complete(mmad_job_t *job, int status);

#endif
