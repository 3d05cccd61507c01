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
/* Shutdown, first step, from the socket thread once it takes no more
 * copies: the copies under way finish, and so do those queued whose slot
 * showed `reached` before the drain began or when the engine took them
 * (host-ordered ones are reached at submit), their chunks issued for at
 * most issue_ns; then every copy left (not reached, or cut off) is
 * dropped without its `done` written, so that a stream waiting on it does
 * not go on with data never copied: libmma's watchdog finishes it natively
 * once mmad is gone (close the clients after this). Returns 1 when that is
 * done with no chunk in flight, 0 when wait_ns passed first (call it again
 * to wait on: the issuing deadline stays the first call's). */
int mmad_engine_drain(mmad_engine_t *e, uint64_t issue_ns, uint64_t wait_ns);
/* Stop issuing, wait for the chunks on the GPUs, drop what is left as
 * mmad_engine_drain does (a copy not run keeps `done` unwritten), join the
 * thread, free the engine. */
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

/* Finish a job without running it (validation passed but the client
 * left): writes its flag slot and releases it. Exposed for tests. */
void mmad_job_complete(mmad_job_t *job, int status);

#endif
