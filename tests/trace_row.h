/* One row of mmad's --trace CSV, as the integration and GPU tests read it. */
#ifndef MMA_TESTS_TRACE_ROW_H
#define MMA_TESTS_TRACE_ROW_H

#include <stdio.h>

#define TRACE_HEADER                                                                                             \
    "job,job_bytes,priority,dir,target,via,len,status,t_queued,t_runnable,t_issue,t_submitted,t_done,t_sent," \
    "g_first_start,g_first_end,g_second_start,g_second_end\n"

typedef struct trace_row {
    unsigned long long job, job_bytes, len, t_queued, t_runnable, t_issue, t_submitted, t_done, t_sent;
    unsigned long long g[4]; /* --trace-gpu: the chunk's copies on the GPU, else 0 */
    int priority, target, via, status;
    char dir[8];
} trace_row_t;

/* 1 when the line holds every field. */
static inline int trace_row_parse(const char *line, trace_row_t *r)
{
    return sscanf(line, "%llu,%llu,%d,%3[a-z2],%d,%d,%llu,%d,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu", &r->job,
                  &r->job_bytes, &r->priority, r->dir, &r->target, &r->via, &r->len, &r->status, &r->t_queued,
                  &r->t_runnable, &r->t_issue, &r->t_submitted, &r->t_done, &r->t_sent, &r->g[0], &r->g[1], &r->g[2],
                  &r->g[3]) == 18;
}

#endif
