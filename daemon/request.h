/* Turning a Copy request into a job: every region id, offset and length is
 * checked against the client's own registry before anything is queued. */
#ifndef MMAD_REQUEST_H
#define MMAD_REQUEST_H

#include "mma.pb-c.h"
#include "mmad.h"

/* Build a job from `cp`. On failure returns an mma status and writes a
 * sentence for the client into err. The job holds references to conn and to
 * every region it names. */
int mmad_request_build_job(mmad_conn_t *conn, const Mma__Copy *cp, int gpu_count, mmad_job_t **out, char *err,
                           size_t errlen);

#endif
