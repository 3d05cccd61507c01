#include "mmad_sched.h"

#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "mma.h"
#include "util.h"

int mmad_sched_init(mmad_sched_t *s, mmad_backend_t *be, const mmad_config_t *cfg)
{
    memset(s, 0, sizeof *s);
    s->be = be;
    s->ngpu = be->gpu_count;
    s->chunk_size = be->chunk_size ? be->chunk_size : cfg->chunk_size;
    s->min_chunk = cfg->min_chunk < s->chunk_size ? cfg->min_chunk : s->chunk_size;
    s->staging_slots = be->staging_slots ? be->staging_slots : cfg->staging_slots;
    s->path_depth = be->path_depth ? be->path_depth : cfg->path_depth;
    s->chunk_rounds = cfg->chunk_rounds > 0 ? cfg->chunk_rounds : 1;
    s->tail_split = cfg->tail_split;
    s->fewest_chunks = cfg->fewest_chunks;
    s->max_paths = cfg->max_paths;
    pthread_mutex_init(&s->stats_lock, NULL);
    for (int t = 0; t < s->ngpu; t++)
        for (int v = 0; v < s->ngpu; v++)
            for (int d = 0; d < 2; d++) {
                mmad_path_stat_t *p = &s->paths[t][v][d];
                p->enabled = t == v || be->relay_ok[t][v];
                if (!p->enabled)
                    snprintf(p->note, sizeof p->note, "%s", be->relay_note[t][v]);
            }
    return MMA_OK;
}

void mmad_sched_destroy(mmad_sched_t *s)
{
    while (s->free_chunks) {
        mmad_chunk_t *c = s->free_chunks;
        s->free_chunks = c->next;
        free(c);
    }
    pthread_mutex_destroy(&s->stats_lock);
}

int mmad_sched_paths_for(const mmad_sched_t *s, int target, int max_paths, int *vias)
{
    int limit = s->ngpu;
    if (s->max_paths > 0 && s->max_paths < limit)
        limit = s->max_paths;
    if (max_paths > 0 && max_paths < limit)
        limit = max_paths;
    int n = 0;
    vias[n++] = target;
    /* Relays in ring order after the target, so jobs to different targets
     * start on different peers. */
    for (int i = 1; i < s->ngpu && n < limit; i++) {
        int v = (target + i) % s->ngpu;
        if (s->paths[target][v][0].enabled || s->paths[target][v][1].enabled)
            vias[n++] = v;
    }
    return n;
}

uint64_t mmad_sched_chunk_len(const mmad_sched_t *s, uint64_t total, int npaths)
{
    uint64_t per_path = (uint64_t)s->path_depth * (uint64_t)s->chunk_rounds;
    if (s->fewest_chunks) {
        /* Every chunk costs the engine several microseconds to issue: a
         * mid-size copy gets only as many per path as chunk_size requires. */
        uint64_t need = (total + (uint64_t)npaths * s->chunk_size - 1) / ((uint64_t)npaths * s->chunk_size);
        if (need < per_path)
            per_path = need ? need : 1;
    }
    uint64_t pieces = (uint64_t)npaths * per_path;
    uint64_t per = (total + pieces - 1) / pieces;
    per = (per + 4095) & ~(uint64_t)4095;
    if (per < s->min_chunk)
        per = s->min_chunk;
    if (per > s->chunk_size)
        per = s->chunk_size;
    return per;
}

void mmad_sched_add(mmad_sched_t *s, mmad_job_t *job)
{
    int vias[MMAD_MAX_GPUS];
    int n = mmad_sched_paths_for(s, job->target, job->max_paths, vias);
    job->chunk_len = mmad_sched_chunk_len(s, job->total, n);
    job->next = NULL;
    /* Latency jobs go after the last latency job; bulk jobs at the end. */
    mmad_job_t **p = &s->jobs;
    if (job->priority > 0)
        while (*p && (*p)->priority > 0)
            p = &(*p)->next;
    else
        while (*p)
            p = &(*p)->next;
    job->next = *p;
    *p = job;
}

static int path_has_room(const mmad_sched_t *s, int target, int via, int dir)
{
    const mmad_path_stat_t *p = &s->paths[target][via][dir];
    if (!p->enabled || p->inflight >= s->path_depth)
        return 0;
    /* A relay also needs one of its via GPU's staging buffers, which all
     * targets and both directions share. */
    return via == target || s->staging_inflight[via] < s->staging_slots;
}

static mmad_chunk_t *chunk_get(mmad_sched_t *s)
{
    mmad_chunk_t *c = s->free_chunks;
    if (c) {
        s->free_chunks = c->next;
        memset(c, 0, sizeof *c);
        return c;
    }
    return calloc(1, sizeof *c);
}

static void chunk_put(mmad_sched_t *s, mmad_chunk_t *c)
{
    c->next = s->free_chunks;
    s->free_chunks = c;
}

static int job_has_bytes(const mmad_job_t *j)
{
    return j->runnable && j->status == MMA_OK && j->issued < j->total;
}

/* Carve the job's next chunk onto (target, via); npaths is how many paths
 * the job has. 1 if issued. */
static int issue_one(mmad_sched_t *s, mmad_job_t *j, int via, int npaths)
{
    while (j->cur_seg < j->nsegs && j->cur_off >= j->segs[j->cur_seg].len) {
        j->cur_seg++;
        j->cur_off = 0;
    }
    if (j->cur_seg >= j->nsegs)
        return 0;
    const mmad_seg_t *seg = &j->segs[j->cur_seg];
    uint64_t len = seg->len - j->cur_off;
    uint64_t cap = j->chunk_len;
    if (s->tail_split) {
        /* Guided self-scheduling: near its end a copy's chunks shrink, so
         * every path finishes at about the same time. */
        uint64_t left = mmad_sched_chunk_len(s, j->total - j->issued, npaths);
        if (left < cap)
            cap = left;
    }
    if (len > cap)
        len = cap;
    mmad_chunk_t *c = chunk_get(s);
    if (!c)
        return 0;
    c->job = j;
    c->target = j->target;
    c->via = via;
    c->dir = j->dir;
    c->host = seg->host + j->cur_off;
    c->dev = seg->dev + j->cur_off;
    c->len = len;
    c->t_issue = mma_now_ns();
    int rc = s->be->ops->submit(s->be, c);
    uint64_t t_end = mma_now_ns();
    pthread_mutex_lock(&s->stats_lock);
    s->submit_calls++;
    s->submit_ns += t_end - c->t_issue;
    pthread_mutex_unlock(&s->stats_lock);
    if (rc != MMA_OK) {
        chunk_put(s, c);
        if (via != j->target) {
            mmad_sched_disable_path(s, j->target, via, j->dir, "submit failed");
            return 0;
        }
        j->status = rc;
        return 0;
    }
    j->cur_off += len;
    j->issued += len;
    j->inflight++;
    s->chunks_inflight++;
    s->bytes_inflight += len;
    if (via != j->target)
        s->staging_inflight[via]++;
    pthread_mutex_lock(&s->stats_lock);
    mmad_path_stat_t *p = &s->paths[j->target][via][j->dir];
    if (p->inflight++ == 0)
        p->active_since = c->t_issue;
    pthread_mutex_unlock(&s->stats_lock);
    return 1;
}

/* One chunk for job j on its best path with room. */
static int issue_for_job(mmad_sched_t *s, mmad_job_t *j)
{
    int vias[MMAD_MAX_GPUS];
    int n = mmad_sched_paths_for(s, j->target, j->max_paths, vias);
    for (int i = 0; i < n; i++)
        if (path_has_room(s, j->target, vias[i], j->dir))
            return issue_one(s, j, vias[i], n);
    return 0;
}

int mmad_sched_fill(mmad_sched_t *s)
{
    int issued = 0;
    /* Latency class first: each such job takes every path it can use. */
    mmad_job_t *j = s->jobs;
    for (; j && j->priority > 0; j = j->next)
        while (job_has_bytes(j) && issue_for_job(s, j))
            issued++;
    mmad_job_t *bulk = j;
    if (!bulk)
        return issued;
    /* Bulk: round-robin, one chunk per job per turn, until no path has room
     * for anyone. The turn carries over between calls. */
    int progress = 1;
    while (progress) {
        progress = 0;
        mmad_job_t *start = s->rr;
        int found = 0;
        for (mmad_job_t *k = bulk; k; k = k->next)
            if (k == start)
                found = 1;
        if (!found)
            start = bulk;
        mmad_job_t *k = start;
        do {
            if (job_has_bytes(k) && issue_for_job(s, k)) {
                issued++;
                /* The turn passes to the job after the last one served; a
                 * pass that serves nobody must not move it. */
                s->rr = k->next ? k->next : bulk;
                progress = 1;
            }
            k = k->next ? k->next : bulk;
        } while (k != start);
    }
    return issued;
}

static void unlink_job(mmad_sched_t *s, mmad_job_t *job)
{
    for (mmad_job_t **p = &s->jobs; *p; p = &(*p)->next)
        if (*p == job) {
            *p = job->next;
            break;
        }
    if (s->rr == job)
        s->rr = job->next;
    job->next = NULL;
}

static int job_finished(const mmad_job_t *j)
{
    return j->inflight == 0 && (j->landed == j->total || j->status != MMA_OK);
}

mmad_job_t *mmad_sched_chunk_done(mmad_sched_t *s, mmad_chunk_t *c)
{
    mmad_job_t *j = c->job;
    uint64_t now = mma_now_ns();
    j->inflight--;
    s->chunks_inflight--;
    s->bytes_inflight -= c->len;
    if (c->via != c->target)
        s->staging_inflight[c->via]--;
    pthread_mutex_lock(&s->stats_lock);
    mmad_path_stat_t *p = &s->paths[c->target][c->via][c->dir];
    if (--p->inflight == 0)
        p->active_ns += now - p->active_since;
    if (c->status == MMA_OK) {
        p->bytes += c->len;
        p->chunks++;
    }
    pthread_mutex_unlock(&s->stats_lock);
    if (c->status == MMA_OK) {
        j->landed += c->len;
    } else if (c->via != c->target && j->status == MMA_OK) {
        /* A relay failed: set it aside and send the bytes again over the
         * target's own link by rewinding the cursor to cover them. */
        MMA_WARN("relay gpu%d->gpu%d failed (%s); setting it aside", c->via, c->target,
                 mma_strerror(c->status));
        mmad_sched_disable_path(s, c->target, c->via, c->dir, "copy failed");
        /* Re-queue: append a retry segment for exactly this chunk. */
        mmad_seg_t *ns = realloc(j->segs, (j->nsegs + 1) * sizeof *ns);
        if (ns) {
            j->segs = ns;
            j->segs[j->nsegs++] = (mmad_seg_t){.host = c->host, .dev = c->dev, .len = c->len};
            j->issued -= c->len;
        } else {
            j->status = MMA_ERR_NOMEM;
        }
    } else if (j->status == MMA_OK) {
        j->status = c->status;
    }
    chunk_put(s, c);
    if (!job_finished(j))
        return NULL;
    unlink_job(s, j);
    s->jobs_done++;
    if (j->status == MMA_OK)
        s->bytes_done += j->total;
    return j;
}

mmad_job_t *mmad_sched_cancel_conn(mmad_sched_t *s, mmad_conn_t *conn)
{
    mmad_job_t *done = NULL;
    mmad_job_t *j = s->jobs;
    while (j) {
        mmad_job_t *next = j->next;
        if (j->conn == conn) {
            if (j->status == MMA_OK)
                j->status = MMA_ERR_CANCELLED;
            if (j->inflight == 0) {
                unlink_job(s, j);
                j->next = done;
                done = j;
            }
        }
        j = next;
    }
    return done;
}

void mmad_sched_disable_path(mmad_sched_t *s, int target, int via, int dir, const char *why)
{
    if (via == target)
        return; /* the direct path is the last resort; never set aside */
    pthread_mutex_lock(&s->stats_lock);
    mmad_path_stat_t *p = &s->paths[target][via][dir];
    p->enabled = 0;
    snprintf(p->note, sizeof p->note, "%s", why);
    pthread_mutex_unlock(&s->stats_lock);
}
