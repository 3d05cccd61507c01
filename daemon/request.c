#include "request.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "mma.h"
#include "util.h"

#define FAIL(code, ...)                           \
    do {                                          \
        snprintf(err, errlen, __VA_ARGS__);       \
        rc = (code);                              \
        goto fail;                                \
    } while (0)

int mmad_request_build_job(mmad_conn_t *conn, const Mma__Copy *cp, int gpu_count, mmad_job_t **out, char *err,
                           size_t errlen)
{
    int rc = MMA_OK;
    mmad_job_t *job = NULL;
    if (cp->slot >= conn->nslots) {
        snprintf(err, errlen, "slot %u is outside the flag page (%u slots)", cp->slot, conn->nslots);
        return MMA_ERR_INVAL;
    }
    if (cp->n_segments == 0)
        FAIL(MMA_ERR_INVAL, "a copy needs at least one segment");
    if (cp->n_segments > MMAD_MAX_SEGMENTS)
        FAIL(MMA_ERR_LIMIT, "%zu segments; at most %d per copy", cp->n_segments, MMAD_MAX_SEGMENTS);
    job = calloc(1, sizeof *job);
    if (!job)
        FAIL(MMA_ERR_NOMEM, "out of memory");
    job->segs = calloc(cp->n_segments, sizeof *job->segs);
    job->refs = calloc(cp->n_segments * 2, sizeof *job->refs);
    if (!job->segs || !job->refs)
        FAIL(MMA_ERR_NOMEM, "out of memory");
    job->dir = -1;
    job->target = -1;
    for (size_t i = 0; i < cp->n_segments; i++) {
        const Mma__Segment *sg = cp->segments[i];
        mmad_region_t *dst = mmad_registry_find(conn, sg->dst_region);
        mmad_region_t *src = mmad_registry_find(conn, sg->src_region);
        if (!dst || !src)
            FAIL(MMA_ERR_NOT_REGISTERED, "segment %zu: region %u is not registered by this client", i,
                 dst ? sg->src_region : sg->dst_region);
        if (dst->kind == src->kind)
            FAIL(MMA_ERR_DIRECTION, "segment %zu: both ends are %s memory", i,
                 dst->kind == MMAD_REGION_HOST ? "host" : "device");
        if (sg->length == 0)
            FAIL(MMA_ERR_INVAL, "segment %zu: length is 0", i);
        uint64_t end;
        if (mma_add_overflows(sg->dst_offset, sg->length, &end) || end > dst->size)
            FAIL(MMA_ERR_RANGE,
                 "segment %zu: destination offset %" PRIu64 " + length %" PRIu64 " exceeds region %u (%" PRIu64
                 " bytes)",
                 i, sg->dst_offset, sg->length, dst->id, dst->size);
        if (mma_add_overflows(sg->src_offset, sg->length, &end) || end > src->size)
            FAIL(MMA_ERR_RANGE,
                 "segment %zu: source offset %" PRIu64 " + length %" PRIu64 " exceeds region %u (%" PRIu64
                 " bytes)",
                 i, sg->src_offset, sg->length, src->id, src->size);
        int dir = dst->kind == MMAD_REGION_DEVICE ? MMA_DIR_H2D : MMA_DIR_D2H;
        const mmad_region_t *dev = dir == MMA_DIR_H2D ? dst : src;
        if (dev->gpu < 0 || dev->gpu >= gpu_count)
            FAIL(MMA_ERR_NO_GPU, "segment %zu: gpu %d does not exist", i, dev->gpu);
        if (job->dir >= 0 && (dir != job->dir || dev->gpu != job->target))
            FAIL(MMA_ERR_INVAL, "segment %zu: all segments must go one direction to one GPU", i);
        job->dir = dir;
        job->target = dev->gpu;
        if (mma_add_overflows(job->total, sg->length, &job->total))
            FAIL(MMA_ERR_RANGE, "total length overflows");
        mmad_seg_t *s = &job->segs[i];
        s->len = sg->length;
        s->dev_region = dev;
        if (dir == MMA_DIR_H2D) {
            s->dev = dst->base + sg->dst_offset;
            s->host = src->base + sg->src_offset;
        } else {
            s->host = dst->base + sg->dst_offset;
            s->dev = src->base + sg->src_offset;
        }
        mmad_region_ref(dst);
        job->refs[job->nrefs++] = dst;
        mmad_region_ref(src);
        job->refs[job->nrefs++] = src;
    }
    job->nsegs = cp->n_segments;
    job->slot = cp->slot;
    job->seq = cp->seq;
    job->priority = cp->has_priority && cp->priority > 0 ? 1 : 0;
    job->max_paths = cp->has_max_paths ? (int)cp->max_paths : 0;
    job->status = MMA_OK;
    job->t_queued = mma_now_ns();
    /* The client's send time, where it is this host's clock (the same
     * CLOCK_MONOTONIC) and not in the future: for --trace. */
    job->t_sent = cp->has_sent_ns && cp->sent_ns <= job->t_queued ? cp->sent_ns : 0;
    mmad_conn_ref(conn);
    job->conn = conn;
    *out = job;
    return MMA_OK;
fail:
    if (job)
        mmad_job_free(job);
    return rc;
}
