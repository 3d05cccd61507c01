#include "mmad_sched.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "mma.h"
#include "util.h"

/* Engine time to issue one chunk on GPUs: 4.7 us per relay chunk through the
 * driver API on 4x H200 (bench/results/2026-11-27-4xH200-callcost). */
#define CUDA_ISSUE_COST_US 5.0
/* What a relay chunk's second DMA hop and the event between its hops add to
 * its latency over a direct chunk on 4x H200. */
#define CUDA_RELAY_OVERHEAD_US 15.0
/* The reference rate halves this often (real-box time): it follows the box
 * when its load changes for good, but outlives a pause between copies. */
#define REF_HALF_LIFE_S 10.0
/* --trace keeps at most this many chunks (56 bytes each). */
#define TRACE_MAX (1u << 20)
/* A path's rate is judged over at least this many chunks, and sets the
 * reference only over twice as many: a rate is measured between the moments
 * the engine sees chunks end, which it sees late by a varying amount (a
 * poll's back-off, a thread's wake-up), and the reference, the best of all
 * rates, would otherwise keep one measured high. */
#define RATE_MIN_SAMPLES 4
#define RATE_REF_SAMPLES (2 * RATE_MIN_SAMPLES)
/* A probe starts on an idle path, so besides the relay's fixed latency (taken
 * off) its time holds the relay's second hop (~10% of a chunk's time on
 * 4x H200: NVLink is 7x PCIe) and the engine's late look at its end, which a
 * chunk queued behind another does not carry: it passes at this much of the
 * limit. */
#define PROBE_ALLOWANCE 0.85

struct mmad_plan {
    mmad_job_t *job;
    uint64_t left[MMAD_MAX_GPUS];  /* bytes each relay (by via) is still to carry */
    uint64_t piece[MMAD_MAX_GPUS]; /* each path's chunks: its share in equal pieces */
    uint64_t edge[MMAD_MAX_GPUS];  /* a relay's small piece (--relay-edge), else 0 */
    int edges_one_hop[MMAD_MAX_GPUS]; /* --edge-one-hop: a piece of `edge` both first and last, in one hop */
    /* for --plan-learn: what the plan assumed, and what happened */
    uint64_t share[MMAD_MAX_GPUS]; /* bytes planned per via */
    double start_ns[MMAD_MAX_GPUS]; /* modelled start per via, from the first issue */
    double rate;                   /* the plan's reference rate, bytes/ns */
    uint64_t t_first;              /* the job's first chunk issued */
    uint64_t end[MMAD_MAX_GPUS];   /* the last chunk done per via */
    uint64_t started[MMAD_MAX_GPUS]; /* the path's first chunk submitted (--plan-learn=3) */
    uint64_t carried[MMAD_MAX_GPUS]; /* bytes issued per via */
    struct mmad_plan *next;
};

/* --plan-learn: a path's weight moves this far toward what a finished copy
 * showed, and only shares of at least PLAN_LEARN_MIN bytes teach it (below
 * that the fixed latencies drown the rate). --plan-learn=2 learns those
 * latencies too, so smaller shares teach it (PLAN_FIT_MIN). */
#define PLAN_LEARN_GAIN 0.3
#define PLAN_LEARN_MIN (2u << 20)
#define PLAN_FIT_MIN (256u << 10)
/* --plan-learn=3: each copy moves a path's weight by the square root of
 * (the paths' mean time / its own time), at most this far either way, so
 * one odd copy moves it little ... */
#define PLAN_EVEN_GAIN 0.5
#define PLAN_EVEN_STEP 1.15
/* ... and a copy in which a path started this much later than planned
 * (or 2% of the copy's time, if more) teaches nothing: its time went to a
 * wake-up or a kernel launch (the first copy after a pause), not to the
 * path's rate. */
#define PLAN_EVEN_LATE_NS 25000.0
#define PLAN_W_MIN 0.25
#define PLAN_W_MAX 2.0

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
    /* Options are real-box times and rates; the simulated box runs at
     * sim_scale of the real speed, so its times stretch by 1/sim_scale. */
    double scale = be->simulated && be->sim_scale > 0 ? be->sim_scale : 1.0;
    s->now = mma_now_ns;
    s->yield_frac = cfg->yield_frac;
    s->yield_to_direct = cfg->yield_to_direct;
    s->yield_probe_ns = (uint64_t)(cfg->yield_probe_ms * 1e6 / scale);
    /* A chunk carries a fixed ~10-20 us of latency on GPUs: from 1 MiB up
     * its rate is mostly the link's. */
    s->rate_min_len = s->chunk_size < (1u << 20) ? s->chunk_size : (1u << 20);
    s->rate_window = 8.0 * (double)s->chunk_size;
    s->ref_floor = cfg->link_gbps * scale;
    s->ref_half_life_ns = REF_HALF_LIFE_S * 1e9 / scale;
    s->plan_split = cfg->plan_split;
    s->plan_learn = cfg->plan_learn;
    s->relay_first = cfg->relay_first;
    s->edge_one_hop = cfg->edge_one_hop;
    s->plan_learn_min = s->plan_learn == 2 ? PLAN_FIT_MIN : PLAN_LEARN_MIN;
    /* The edge is whole pages, and a piece never more than a chunk (a
     * staging buffer): an edge that rounds up past one is no edge. */
    uint64_t edge = (cfg->relay_edge + 4095) & ~(uint64_t)4095;
    s->relay_edge = cfg->relay_edge < s->chunk_size && edge <= s->chunk_size ? edge : 0;
    for (int t = 0; t < MMAD_MAX_GPUS; t++)
        for (int v = 0; v < MMAD_MAX_GPUS; v++)
            for (int d = 0; d < 2; d++) {
                s->plan_w[t][v][d] = 1.0;
                for (int k = 0; k < MMAD_PLAN_CLASSES; k++)
                    s->plan_e[t][v][d][k] = 1.0;
            }
    s->busy_mbps = cfg->busy_gbps * 1000.0;
    double issue_us = cfg->issue_cost_us, relay_us = cfg->relay_overhead_us;
    if (issue_us < 0)
        issue_us = be->simulated ? cfg->sim_chunk_cost_us : CUDA_ISSUE_COST_US;
    if (relay_us < 0)
        relay_us = be->simulated ? cfg->sim_relay_latency_us : CUDA_RELAY_OVERHEAD_US;
    s->issue_cost_ns = issue_us * 1e3 / scale;
    s->relay_overhead_ns = relay_us * 1e3 / scale;
    s->one_hop_overhead_ns = cfg->relay_overhead_us >= 0 ? s->relay_overhead_ns : -1.0;
    if (cfg->trace_path[0]) {
        s->trace_cap = TRACE_MAX;
        s->trace = malloc(s->trace_cap * sizeof *s->trace);
        if (!s->trace) {
            MMA_ERROR("--trace: no memory for %zu records", s->trace_cap);
            return MMA_ERR_NOMEM;
        }
        snprintf(s->trace_path, sizeof s->trace_path, "%s", cfg->trace_path);
    }
    if (cfg->trace_gpu && !cfg->trace_path[0])
        MMA_WARN("--trace-gpu without --trace: no trace is kept, nothing is timed");
    else if (cfg->trace_gpu && be->simulated)
        MMA_WARN("--trace-gpu: the simulated box has no GPU times; those columns stay 0");
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

static void trace_write(mmad_sched_t *s)
{
    FILE *f = fopen(s->trace_path, "w");
    if (!f) {
        MMA_ERROR("--trace: cannot write %s: %s", s->trace_path, strerror(errno));
        return;
    }
    fprintf(f, "job,job_bytes,priority,dir,target,via,len,status,t_queued,t_runnable,t_issue,t_submitted,t_done,t_sent,"
               "g_first_start,g_first_end,g_second_start,g_second_end\n"); /* g_*: --trace-gpu, else 0 */
    for (size_t i = 0; i < s->trace_n; i++) {
        const mmad_trace_rec_t *r = &s->trace[i];
        fprintf(f, "%llu,%llu,%d,%s,%d,%d,%llu,%d,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu,%llu\n",
                (unsigned long long)r->job,
                (unsigned long long)r->job_bytes, r->priority, r->dir == MMA_DIR_H2D ? "h2d" : "d2h", r->target,
                r->via, (unsigned long long)r->len, r->status, (unsigned long long)r->t_queued,
                (unsigned long long)r->t_runnable, (unsigned long long)r->t_issue,
                (unsigned long long)r->t_submitted, (unsigned long long)r->t_done, (unsigned long long)r->t_sent,
                (unsigned long long)r->g_times[0], (unsigned long long)r->g_times[1],
                (unsigned long long)r->g_times[2], (unsigned long long)r->g_times[3]);
    }
    if (fclose(f) != 0)
        MMA_ERROR("--trace: writing %s: %s", s->trace_path, strerror(errno));
    else
        MMA_INFO("--trace: %zu chunks written to %s%s", s->trace_n, s->trace_path,
                 s->trace_n == s->trace_cap ? " (full: later chunks were not kept)" : "");
}

void mmad_sched_destroy(mmad_sched_t *s)
{
    if (s->trace) {
        trace_write(s);
        free(s->trace);
        s->trace = NULL;
    }
    while (s->plans) {
        mmad_plan_t *pl = s->plans;
        s->plans = pl->next;
        free(pl);
    }
    while (s->free_chunks) {
        mmad_chunk_t *c = s->free_chunks;
        s->free_chunks = c->next;
        free(c);
    }
    pthread_mutex_destroy(&s->stats_lock);
}

int mmad_sched_paths_queued(const mmad_sched_t *s)
{
    if (s->chunks_inflight == 0)
        return 0;
    for (int t = 0; t < s->ngpu; t++)
        for (int v = 0; v < s->ngpu; v++)
            for (int d = 0; d < 2; d++)
                if (s->paths[t][v][d].inflight == 1)
                    return 0;
    return 1;
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

int mmad_sched_plan_split(uint64_t total, int npaths, double issue_ns, double relay_ns, double rate,
                          uint64_t min_chunk, uint64_t cap, uint64_t *lens)
{
    return mmad_sched_plan_split_w(total, npaths, issue_ns, relay_ns, rate, NULL, min_chunk, cap, lens);
}

/* The plan's model of each path: path p starts p * issue_ns after the
 * first, a relay relay_ns later still, and moves rate x weight[p] bytes/ns
 * (rate 0, nothing known: no costs, every path alike). */
static void plan_model(int npaths, double issue_ns, double relay_ns, double rate, const double *weight, double *t,
                       double *r)
{
    for (int p = 0; p < npaths; p++) {
        double w = weight && weight[p] > 0 ? weight[p] : 1.0;
        t[p] = rate > 0 ? (double)p * issue_ns + (p ? relay_ns : 0.0) : 0.0;
        r[p] = rate > 0 ? rate * w : 1.0;
    }
}

int mmad_sched_plan_split_w(uint64_t total, int npaths, double issue_ns, double relay_ns, double rate,
                            const double *weight, uint64_t min_chunk, uint64_t cap, uint64_t *lens)
{
    if (npaths > MMAD_MAX_GPUS)
        npaths = MMAD_MAX_GPUS;
    if (npaths < 1)
        npaths = 1;
    double t[MMAD_MAX_GPUS], r[MMAD_MAX_GPUS];
    plan_model(npaths, issue_ns, relay_ns, rate < 0 ? 0 : rate, weight, t, r);
    return mmad_sched_plan_split_tr(total, npaths, t, r, min_chunk, cap, cap, lens);
}

int mmad_sched_plan_split_tr(uint64_t total, int npaths, const double *t, const double *r, uint64_t min_chunk,
                             uint64_t cap, uint64_t direct_cap, uint64_t *lens)
{
    if (npaths > MMAD_MAX_GPUS)
        npaths = MMAD_MAX_GPUS;
    if (npaths < 1)
        npaths = 1;
    /* Path p starts at t[p] (ns) and moves r[p] bytes/ns; it finishes at
     * T when its share is r[p] (T - t[p]). */
    double share[MMAD_MAX_GPUS] = {0};
    int in[MMAD_MAX_GPUS];
    for (int p = 0; p < MMAD_MAX_GPUS; p++) {
        lens[p] = 0;
        in[p] = p < npaths && r[p] > 0;
    }
    in[0] = 1;
    for (;;) {
        /* The paths in the plan finish together at T; a share above cap is
         * fixed at cap and the rest levelled again. */
        int fixed[MMAD_MAX_GPUS] = {0};
        double rest = (double)total;
        for (;;) {
            double sum_r = 0, sum_rt = 0;
            for (int p = 0; p < npaths; p++)
                if (in[p] && !fixed[p]) {
                    sum_r += r[p];
                    sum_rt += r[p] * t[p];
                }
            if (sum_r <= 0)
                break;
            double T = (rest + sum_rt) / sum_r;
            int over = -1;
            double over_cap = 0;
            for (int p = 0; p < npaths; p++)
                if (in[p] && !fixed[p]) {
                    share[p] = r[p] * (T - t[p]);
                    double pcap = (double)(p ? cap : direct_cap);
                    if (share[p] > pcap && (over < 0 || share[p] - pcap > share[over] - over_cap)) {
                        over = p;
                        over_cap = pcap;
                    }
                }
            if (over < 0)
                break;
            fixed[over] = 1;
            share[over] = over_cap;
            rest -= over_cap;
        }
        /* The relay with the smallest share (with equal rates the one that
         * starts last) could not finish before the others below min_chunk:
         * it goes and the rest is levelled again. */
        int least = -1;
        for (int p = 1; p < npaths; p++)
            if (in[p] && (least < 0 || share[p] < share[least]))
                least = p;
        if (least > 0 && share[least] < (double)min_chunk)
            in[least] = 0;
        else
            break;
    }
    uint64_t relays = 0;
    int n = 1;
    for (int p = 1; p < npaths; p++) {
        if (!in[p])
            continue;
        lens[p] = (uint64_t)share[p] & ~(uint64_t)4095;
        if (lens[p] > cap)
            lens[p] = cap;
        if (lens[p] > total - relays)
            lens[p] = total - relays;
        relays += lens[p];
        n = p + 1;
    }
    lens[0] = total - relays;
    /* A direct share held at cap gets back what rounding the relays down
     * left over: relays below cap take it, so that no path needs another
     * chunk (when every path is at cap the direct one takes the rest). */
    for (int p = 1; p < npaths && lens[0] > direct_cap; p++) {
        if (!in[p] || lens[p] >= cap)
            continue;
        uint64_t more = lens[0] - direct_cap < cap - lens[p] ? lens[0] - direct_cap : cap - lens[p];
        lens[p] += more;
        lens[0] -= more;
    }
    return n;
}

/* Whether GPU via's link may carry relays in direction dir: it carries
 * neither other traffic nor (--yield-to-direct) a copy of mmad's own into /
 * out of that GPU. */
static int relay_link_free(const mmad_sched_t *s, int via, int dir)
{
    return !s->link_busy[via][dir] && !(s->yield_to_direct && s->own_jobs[via][dir] > 0);
}

/* A path that takes a share of new work: the direct one, or a relay that is
 * on, not yielding, and whose via GPU's link is free for relays. */
static int path_usable(const mmad_sched_t *s, int target, int via, int dir)
{
    const mmad_path_stat_t *p = &s->paths[target][via][dir];
    return via == target || (p->enabled && !p->yielding && relay_link_free(s, via, dir));
}

/* --yield-to-direct: count the runnable jobs per target and direction
 * that are not done yet, once per pass. A job holds its link until its
 * last chunk lands: with two chunks in flight on each path, a copy has
 * issued everything long before its direct path is done (half of a 128 MiB
 * copy's time on 4 GPUs), and a relay let in then would share that link
 * for the rest of it. */
static void own_update(mmad_sched_t *s)
{
    if (!s->yield_to_direct)
        return;
    memset(s->own_jobs, 0, sizeof s->own_jobs);
    for (const mmad_job_t *j = s->jobs; j; j = j->next)
        if (j->runnable && j->status == MMA_OK && (j->issued < j->total || j->inflight > 0))
            s->own_jobs[j->target][j->dir]++;
}

/* Follow the backend's view of traffic that is not mmad's. A link carrying
 * more than --busy-gbps of it, two measurements in a row, is busy: every
 * relay through that GPU in that direction stops taking chunks, since on a
 * box whose host side is shared each relayed byte comes out of that
 * traffic's share. It is free again below half the limit. */
static void links_update(mmad_sched_t *s)
{
    mmad_backend_t *be = s->be;
    if (s->busy_mbps <= 0 || !be->foreign_known)
        return;
    uint64_t seq = atomic_load_explicit(&be->foreign_seq, memory_order_acquire);
    if (seq == s->foreign_seen)
        return;
    s->foreign_seen = seq;
    for (int g = 0; g < s->ngpu; g++)
        for (int d = 0; d < 2; d++) {
            double mbps = (double)atomic_load_explicit(&be->foreign_mbps[g][d], memory_order_relaxed);
            int was = s->link_busy[g][d];
            s->link_over[g][d] = mbps > s->busy_mbps ? s->link_over[g][d] + 1 : 0;
            if (!was && s->link_over[g][d] >= 2)
                s->link_busy[g][d] = 1;
            else if (was && mbps < s->busy_mbps / 2)
                s->link_busy[g][d] = 0;
            if (was == s->link_busy[g][d])
                continue;
            MMA_INFO("gpu%d's link carries %.1f GB/s %s that is not mmad's: relays through it %s", g, mbps / 1000.0,
                     d == MMA_DIR_H2D ? "H2D" : "D2H", s->link_busy[g][d] ? "stop" : "resume");
            pthread_mutex_lock(&s->stats_lock);
            for (int t = 0; t < s->ngpu; t++)
                if (t != g)
                    s->paths[t][g][d].busy = s->link_busy[g][d];
            pthread_mutex_unlock(&s->stats_lock);
        }
}

/* The job's usable paths, in issue order (direct first). */
static int usable_paths(const mmad_sched_t *s, const mmad_job_t *j, int *vias)
{
    int all[MMAD_MAX_GPUS];
    int n = mmad_sched_paths_for(s, j->target, j->max_paths, all);
    int k = 0;
    for (int i = 0; i < n; i++)
        if (path_usable(s, j->target, all[i], j->dir))
            vias[k++] = all[i];
    return k;
}

double mmad_sched_ref_rate(mmad_sched_t *s, int dir, uint64_t now)
{
    if (now > s->ref_at[dir]) {
        if (s->ref[dir] > 0 && s->ref_half_life_ns > 0)
            s->ref[dir] *= exp2(-(double)(now - s->ref_at[dir]) / s->ref_half_life_ns);
        s->ref_at[dir] = now;
    }
    return s->ref[dir] > s->ref_floor ? s->ref[dir] : s->ref_floor;
}

static mmad_plan_t *plan_of(const mmad_sched_t *s, const mmad_job_t *j)
{
    for (mmad_plan_t *pl = s->plans; pl; pl = pl->next)
        if (pl->job == j)
            return pl;
    return NULL;
}

/* --plan-learn=2. Each finished planned copy adds (bytes, ns) with weight
 * 1 after the older ones are decayed by FIT_DECAY. Start and rate are the
 * least-squares line through them, its slope held toward the plan's own
 * model (t0 + bytes / r0) as if by a spread of 1 MiB of weight FIT_PRIOR
 * (ridge): with copies of one size only, the line keeps the model's slope
 * and moves its start, exactly what that size needs; copies of several
 * sizes set the slope. The rate stays within [0.25, 2] of r0, the start
 * within [0, FIT_T_MAX]. */
#define FIT_DECAY 0.8
#define FIT_PRIOR 0.05
#define FIT_T_MAX 500000.0

void mmad_path_fit_add(mmad_path_fit_t *f, double bytes, double ns)
{
    f->s1 = f->s1 * FIT_DECAY + 1;
    f->sx = f->sx * FIT_DECAY + bytes;
    f->sy = f->sy * FIT_DECAY + ns;
    f->sxx = f->sxx * FIT_DECAY + bytes * bytes;
    f->sxy = f->sxy * FIT_DECAY + bytes * ns;
}

void mmad_path_fit_get(const mmad_path_fit_t *f, double t0, double r0, double *t, double *r)
{
    if (f->s1 < 1e-9 || r0 <= 0) {
        *t = t0;
        *r = r0;
        return;
    }
    const double spread = 1048576.0;
    double var = f->sxx - f->sx * f->sx / f->s1, cov = f->sxy - f->sx * f->sy / f->s1;
    double lambda = FIT_PRIOR * spread * spread;
    double slope = (cov + lambda / r0) / (var + lambda);
    double lo = 1.0 / (2.0 * r0), hi = 1.0 / (0.25 * r0);
    slope = slope < lo ? lo : slope > hi ? hi : slope;
    double start = (f->sy - slope * f->sx) / f->s1;
    *t = start < 0 ? 0 : start > FIT_T_MAX ? FIT_T_MAX : start;
    *r = 1.0 / slope;
}

/* Whether a staged job's relays start and end with an edge piece in one
 * hop (--edge-one-hop; the backend must take one-hop relays at all). */
static int edges_one_hop(const mmad_sched_t *s, const mmad_job_t *j)
{
    return s->edge_one_hop && s->relay_edge && s->be->relay_kernel_below &&
           j->total >= s->be->relay_kernel_below;
}

/* Whether the job's relays start with a one-hop piece posted to a resident
 * kernel, which costs the engine no issue time of its own: all its relays
 * go in one hop, or their first piece does (--edge-one-hop). */
static int relays_posted(const mmad_sched_t *s, const mmad_job_t *j)
{
    return (j->total < s->be->relay_kernel_below || edges_one_hop(s, j)) && s->be->relay_kernel_resident;
}

/* Plan the job's split over its usable paths (the direct one is vias[0]):
 * each share at most `per_path` chunks, cut into equal pieces. Without
 * memory for the plan it keeps equal chunks. */
static void plan_job(mmad_sched_t *s, mmad_job_t *j, const int *vias, int n, int per_path)
{
    uint64_t lens[MMAD_MAX_GPUS];
    double w[MMAD_MAX_GPUS];
    for (int i = 0; i < n; i++)
        w[i] = s->plan_learn == 1   ? s->plan_w[j->target][vias[i]][j->dir]
               : s->plan_learn == 3 ? s->plan_e[j->target][vias[i]][j->dir][mmad_plan_class(j->total)]
                                    : 1.0;
    double rate = mmad_sched_ref_rate(s, j->dir, s->now());
    /* A relay's share is at most per_path chunks (each takes a staging
     * buffer); the direct path's is not capped: its pieces queue on its own
     * link, and at the top of the planned range the relays' later start
     * leaves it more than its per_path chunks to carry. */
    uint64_t cap = (uint64_t)per_path * s->chunk_size;
    /* Relays of a copy below the backend's one-hop size are one kernel on
     * the via GPU: a shorter fixed latency, and no NVLink hop to shorten. */
    int one_hop = j->total < s->be->relay_kernel_below;
    /* A staged relay that starts with a one-hop piece starts like one. */
    int starts_one_hop = one_hop || edges_one_hop(s, j);
    double relay_ns = !starts_one_hop               ? s->relay_overhead_ns
                      : s->one_hop_overhead_ns >= 0 ? s->one_hop_overhead_ns
                                                    : s->be->relay_kernel_overhead_us * 1e3;
    /* Relays posted to resident kernels cost the engine no issue time, so
     * they start together, relay_ns in: after the direct chunk's issue
     * too when it goes first, while with --relay-first it is the direct
     * chunk that starts an issue later. */
    int posted = relays_posted(s, j);
    double issue_ns = posted ? 0.0 : s->issue_cost_ns;
    if (posted && !s->relay_first)
        relay_ns += s->issue_cost_ns;
    double t[MMAD_MAX_GPUS], r[MMAD_MAX_GPUS], start[MMAD_MAX_GPUS];
    plan_model(n, issue_ns, relay_ns, rate, w, t, r);
    if (posted && s->relay_first && rate > 0)
        t[0] = s->issue_cost_ns;
    memcpy(start, t, sizeof start);
    if (s->plan_learn == 2 && rate > 0)
        for (int i = 0; i < n; i++)
            mmad_path_fit_get(&s->plan_fit[j->target][vias[i]][j->dir], t[i], rate, &t[i], &r[i]);
    mmad_sched_plan_split_tr(j->total, n, t, r, s->min_chunk, cap, j->total, lens);
    mmad_plan_t *pl = calloc(1, sizeof *pl);
    if (!pl)
        return;
    pl->job = j;
    pl->rate = rate;
    uint64_t largest = 0;
    for (int i = 0; i < n; i++) {
        int v = vias[i];
        pl->left[v] = lens[i];
        pl->share[v] = lens[i];
        pl->start_ns[v] = start[i];
        if (!lens[i])
            continue;
        /* The hops of relays that end together queue at the target's NVLink
         * ports (H2D; D2H: they start together at its ports): a relay share
         * of at least 3 edges ends (starts) with a piece of one edge, so
         * that hop is short. */
        uint64_t body = lens[i];
        if (i > 0 && edges_one_hop(s, j) && lens[i] >= 4 * s->relay_edge) {
            /* --edge-one-hop: an edge first and last, both in one hop; the
             * relay starts when posted and no hop ends (starts) the copy */
            pl->edge[v] = s->relay_edge;
            pl->edges_one_hop[v] = 1;
            body -= 2 * s->relay_edge;
        } else if (i > 0 && s->relay_edge && !one_hop && lens[i] >= 3 * s->relay_edge) {
            pl->edge[v] = s->relay_edge;
            body -= s->relay_edge;
        }
        uint64_t k = (body + s->chunk_size - 1) / s->chunk_size;
        uint64_t piece = ((body + k - 1) / k + 4095) & ~(uint64_t)4095;
        pl->piece[v] = piece < s->chunk_size ? piece : s->chunk_size;
        if (pl->piece[v] > largest)
            largest = pl->piece[v];
    }
    j->chunk_len = largest < s->chunk_size ? largest : s->chunk_size;
    pl->next = s->plans;
    s->plans = pl;
}

int mmad_plan_class(uint64_t total)
{
    int k = 0;
    for (uint64_t mib = total >> 20; mib > 1 && k < MMAD_PLAN_CLASSES - 1; mib >>= 1)
        k++;
    return k;
}

/* --plan-learn=3: a planned job finished. Paths that ended before the
 * paths' mean time get more of the next copy of its size class, later ones
 * less; their weights keep their sum. Only a job that every path carried
 * as planned teaches (none yielded or failed) and none that started late
 * (PLAN_EVEN_LATE_NS). */
static void plan_learn_even(mmad_sched_t *s, const mmad_plan_t *pl, const mmad_job_t *j)
{
    double took[MMAD_MAX_GPUS] = {0}, mean = 0;
    int m = 0;
    for (int v = 0; v < s->ngpu; v++) {
        if (!pl->share[v])
            continue;
        if (pl->carried[v] != pl->share[v] || pl->end[v] <= pl->t_first || !pl->started[v])
            return;
        took[v] = (double)(pl->end[v] - pl->t_first);
        mean += took[v];
        m++;
    }
    if (m < 2)
        return;
    mean /= m;
    double late_max = PLAN_EVEN_LATE_NS > 0.02 * mean ? PLAN_EVEN_LATE_NS : 0.02 * mean;
    for (int v = 0; v < s->ngpu; v++)
        if (pl->share[v] && (double)(pl->started[v] - pl->t_first) - pl->start_ns[v] > late_max)
            return;
    int k = mmad_plan_class(j->total);
    double before = 0, after = 0, nw[MMAD_MAX_GPUS];
    for (int v = 0; v < s->ngpu; v++) {
        if (!pl->share[v])
            continue;
        double *w = &s->plan_e[j->target][v][j->dir][k];
        double f = pow(mean / took[v], PLAN_EVEN_GAIN);
        f = f > PLAN_EVEN_STEP ? PLAN_EVEN_STEP : f < 1.0 / PLAN_EVEN_STEP ? 1.0 / PLAN_EVEN_STEP : f;
        nw[v] = *w * f;
        before += *w;
        after += nw[v];
    }
    for (int v = 0; v < s->ngpu; v++) {
        if (!pl->share[v])
            continue;
        double w = nw[v] * before / after;
        s->plan_e[j->target][v][j->dir][k] = w < PLAN_W_MIN ? PLAN_W_MIN : w > PLAN_W_MAX ? PLAN_W_MAX : w;
    }
}

/* A planned job finished: move each path's weight toward the rate it
 * showed against the plan's (its share over the time from its modelled
 * start to its last chunk's end). */
static void plan_learn(mmad_sched_t *s, const mmad_plan_t *pl, const mmad_job_t *j)
{
    if (!s->plan_learn || j->status != MMA_OK || !pl->t_first || pl->rate <= 0)
        return;
    if (s->plan_learn == 3) {
        plan_learn_even(s, pl, j);
        return;
    }
    for (int v = 0; v < s->ngpu; v++) {
        if (pl->share[v] < s->plan_learn_min || !pl->end[v] || pl->end[v] <= pl->t_first)
            continue;
        if (s->plan_learn == 2) {
            mmad_path_fit_add(&s->plan_fit[j->target][v][j->dir], (double)pl->share[v],
                              (double)(pl->end[v] - pl->t_first));
            continue;
        }
        double dur = (double)(pl->end[v] - pl->t_first) - pl->start_ns[v];
        if (dur <= 0)
            continue;
        double ratio = (double)pl->share[v] / dur / pl->rate;
        ratio = ratio < PLAN_W_MIN ? PLAN_W_MIN : ratio > PLAN_W_MAX ? PLAN_W_MAX : ratio;
        double *w = &s->plan_w[j->target][v][j->dir];
        *w += PLAN_LEARN_GAIN * (ratio - *w);
    }
}

/* How many bytes a planned job wants on `via` now: a relay its share, the
 * direct path everything not kept for a relay that can still take it (a
 * relay that yields, fails or is set aside leaves its share to it). */
static uint64_t plan_want(const mmad_sched_t *s, const mmad_plan_t *pl, const mmad_job_t *j, int via)
{
    uint64_t rest = j->total - j->issued;
    if (via != j->target) {
        if (!path_usable(s, j->target, via, j->dir))
            return 0;
        return pl->left[via] < rest ? pl->left[via] : rest;
    }
    uint64_t kept = 0;
    for (int v = 0; v < s->ngpu; v++)
        if (v != j->target && pl->left[v] && path_usable(s, j->target, v, j->dir))
            kept += pl->left[v];
    return rest > kept ? rest - kept : 0;
}

void mmad_sched_add(mmad_sched_t *s, mmad_job_t *job)
{
    int vias[MMAD_MAX_GPUS];
    own_update(s);
    int n = usable_paths(s, job, vias);
    job->chunk_len = mmad_sched_chunk_len(s, job->total, n);
    job->trace_id = ++s->jobs_added;
    /* A copy of at most one chunk per path: plan it, one chunk each; with
     * --plan-split=2 also one of at most path_depth chunks per path; with 3
     * also any copy whose relays go in one hop, however many chunks a path
     * gets: a one-hop relay takes no staging buffer, so its share need not
     * fit path_depth of them (on two GPUs a 64 MiB copy is 4 chunks a path,
     * and equal chunks end the slower relay a part of a chunk late); with
     * 4 every copy, its staged relays' shares cut into chunks that take
     * staging buffers in turn, path_depth at a time. */
    int per_path = s->plan_split >= 2 ? s->path_depth : 1;
    uint64_t most = (uint64_t)n * (uint64_t)per_path * s->chunk_size;
    if (job->total > most && (s->plan_split >= 4 || (s->plan_split == 3 && job->total < s->be->relay_kernel_below))) {
        per_path = (int)((job->total + s->chunk_size - 1) / s->chunk_size);
        most = job->total;
    }
    if (s->plan_split && job->total > 0 && job->total <= most)
        plan_job(s, job, vias, n, per_path);
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

static int path_has_room(const mmad_sched_t *s, int target, int via, int dir, uint64_t now)
{
    const mmad_path_stat_t *p = &s->paths[target][via][dir];
    if (!p->enabled || p->inflight >= s->path_depth)
        return 0;
    if (via != target && !relay_link_free(s, via, dir))
        return 0;
    /* A yielding relay takes one chunk at a time, when its probe is due. */
    if (p->yielding && (p->inflight > 0 || now < p->probe_at))
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

/* Carve the job's next chunk, at most `want` bytes, onto (target, via);
 * npaths is how many paths the job has, pl its plan if it has one. 1 if
 * issued. */
static int issue_one(mmad_sched_t *s, mmad_job_t *j, int via, int npaths, uint64_t want, mmad_plan_t *pl)
{
    while (j->cur_seg < j->nsegs && j->cur_off >= j->segs[j->cur_seg].len) {
        j->cur_seg++;
        j->cur_off = 0;
    }
    if (j->cur_seg >= j->nsegs)
        return 0;
    const mmad_seg_t *seg = &j->segs[j->cur_seg];
    uint64_t len = seg->len - j->cur_off;
    uint64_t cap = pl && pl->piece[via] ? pl->piece[via] : j->chunk_len;
    int edge_piece = 0;
    if (pl && pl->edge[via] && via != j->target && pl->edges_one_hop[via]) {
        /* --edge-one-hop: the relay's first and last pieces are edges */
        uint64_t left = pl->left[via];
        if (left == pl->share[via] || left <= pl->edge[via]) {
            cap = left < pl->edge[via] ? left : pl->edge[via];
            edge_piece = 1;
        } else if (cap > left - pl->edge[via]) {
            cap = left - pl->edge[via];
        }
    } else if (pl && pl->edge[via] && via != j->target) {
        /* The relay's small piece: its last for H2D, its first for D2H,
         * the one whose NVLink hop no PCIe transfer of its own hides. */
        uint64_t left = pl->left[via];
        if (j->dir == MMA_DIR_H2D)
            cap = left > pl->edge[via] ? (cap < left - pl->edge[via] ? cap : left - pl->edge[via]) : left;
        else if (left == pl->share[via])
            cap = pl->edge[via];
    }
    if (cap > want)
        cap = want;
    if (s->tail_split && !pl) {
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
    c->dev_region = seg->dev_region;
    c->len = len;
    c->one_hop_edge = edge_piece;
    c->t_issue = s->now();
    int rc = s->be->ops->submit(s->be, c);
    uint64_t t_end = s->now();
    c->t_submitted = t_end;
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
        /* Nothing more is carved from it, and a job with no chunk in flight
         * has none to finish it: mmad_sched_take_failed hands it over. */
        if (j->inflight == 0)
            s->failed_pending = 1;
        return 0;
    }
    j->cur_off += len;
    j->issued += len;
    j->inflight++;
    s->chunks_inflight++;
    s->bytes_inflight += len;
    if (via != j->target) {
        s->staging_inflight[via]++;
        if (pl)
            pl->left[via] -= len < pl->left[via] ? len : pl->left[via];
    }
    if (pl && !pl->t_first)
        pl->t_first = c->t_issue;
    if (pl) {
        if (!pl->started[via])
            pl->started[via] = t_end;
        pl->carried[via] += len;
    }
    pthread_mutex_lock(&s->stats_lock);
    mmad_path_stat_t *p = &s->paths[j->target][via][j->dir];
    if (p->inflight++ == 0)
        p->active_since = c->t_issue;
    if (p->yielding)
        p->probing = 1; /* a yielding path only gets its probe */
    pthread_mutex_unlock(&s->stats_lock);
    return 1;
}

/* One chunk for job j on its best path with room (and, for a planned job,
 * a share left). */
static int issue_for_job(mmad_sched_t *s, mmad_job_t *j, uint64_t now)
{
    int vias[MMAD_MAX_GPUS];
    int n = mmad_sched_paths_for(s, j->target, j->max_paths, vias);
    mmad_plan_t *pl = s->plans ? plan_of(s, j) : NULL;
    /* Breadth first: the path with the fewest chunks in flight, the direct
     * one first among equals. A copy's paths all start before any gets its
     * second chunk, so the last relay is not held back by the others' second
     * chunks (each staged relay chunk costs the engine ~11 us of CUDA
     * calls). Relays posted to resident kernels go first instead
     * (--relay-first): they cost the engine next to nothing, so the direct
     * chunk starts barely later and they start ~4 us sooner. */
    int relays_first = s->relay_first && relays_posted(s, j);
    int best = -1, best_inflight = 0;
    uint64_t best_want = 0;
    for (int k = 0; k < n; k++) {
        int i = relays_first ? (k + 1) % n : k; /* vias[0] is the direct path */
        if (!path_has_room(s, j->target, vias[i], j->dir, now))
            continue;
        uint64_t want = pl ? plan_want(s, pl, j, vias[i]) : UINT64_MAX;
        int inflight = s->paths[j->target][vias[i]][j->dir].inflight;
        if (want > 0 && (best < 0 || inflight < best_inflight)) {
            best = i;
            best_inflight = inflight;
            best_want = want;
        }
    }
    return best < 0 ? 0 : issue_one(s, j, vias[best], n, best_want, pl);
}

int mmad_sched_fill(mmad_sched_t *s)
{
    links_update(s);
    own_update(s);
    int issued = 0;
    uint64_t now = s->now();
    /* Latency class first: each such job takes every path it can use. */
    mmad_job_t *j = s->jobs;
    for (; j && j->priority > 0; j = j->next)
        while (job_has_bytes(j) && issue_for_job(s, j, now))
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
            if (job_has_bytes(k) && issue_for_job(s, k, now)) {
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
    for (mmad_plan_t **p = &s->plans; *p; p = &(*p)->next)
        if ((*p)->job == job) {
            mmad_plan_t *pl = *p;
            *p = pl->next;
            free(pl);
            break;
        }
}

static int job_finished(const mmad_job_t *j)
{
    return j->inflight == 0 && (j->landed == j->total || j->status != MMA_OK);
}

/* Chunk c ended on path p at `now`: count it in the path's rate and decide
 * whether a relay yields or, after its probe, resumes. Under stats_lock. */
static void path_rate_update(mmad_sched_t *s, mmad_path_stat_t *p, const mmad_chunk_t *c, uint64_t now)
{
    /* A path runs its chunks in order: this one's service began when it was
     * issued or when the one before it ended, whichever was later. */
    uint64_t start = c->t_issue > p->last_done ? c->t_issue : p->last_done;
    int cold = c->t_issue >= p->last_done; /* issued to an idle path */
    int probe = p->probing;
    int relay = c->via != c->target;
    p->last_done = now;
    p->probing = 0;
    if (c->status != MMA_OK || c->len < s->rate_min_len) {
        if (probe) /* it told nothing: probe again later */
            p->probe_at = now + s->yield_probe_ns;
        return;
    }
    double ns = now > start ? (double)(now - start) : 0.0;
    /* A relay chunk issued to an idle path also waited out the relay's
     * fixed latency, which is not its link's rate. */
    if (cold && relay)
        ns = ns - s->relay_overhead_ns > ns / 2 ? ns - s->relay_overhead_ns : ns / 2;
    double len = (double)c->len, sample = ns > 0 ? len / ns : 0.0;
    /* The reference: the best rate a path of this direction has shown
     * lately; a relay below yield_frac of it yields. */
    double ref = mmad_sched_ref_rate(s, c->dir, now);
    double limit = s->yield_frac * ref;
    /* For judging, one slow chunk (the machine stalled, the engine looked
     * late) counts as a little below the limit and no lower: alone it cannot
     * make a path yield, while a path whose chunks are mostly slow still
     * does. */
    double judged_ns = ns > 0 && limit > 0 && sample < 0.9 * limit ? len / (0.9 * limit) : ns;
    /* Sums, not an average of rates: the engine sees chunks end late by a
     * varying amount, and two reaped together give one a long service and
     * the next almost none; their sum is right. */
    double keep = s->rate_window / (s->rate_window + len);
    p->ew_bytes = p->ew_bytes * keep + len;
    p->ew_ns = p->ew_ns * keep + ns;
    p->ew_judged_ns = p->ew_judged_ns * keep + judged_ns;
    p->samples++;
    if (p->ew_ns <= 0)
        return; /* nothing timed yet */
    p->rate = p->ew_bytes / p->ew_ns;
    if (p->samples >= RATE_REF_SAMPLES && p->rate > ref)
        s->ref[c->dir] = p->rate;
    if (!relay || limit <= 0)
        return;
    if (probe) {
        if (sample >= PROBE_ALLOWANCE * limit) {
            /* Back: the estimate starts over from the probe. */
            p->yielding = 0;
            p->ew_bytes = len;
            p->ew_ns = p->ew_judged_ns = ns;
            p->samples = 1;
            p->rate = sample;
            MMA_DEBUG("relay gpu%d->gpu%d %s resumes: probe ran at %.3f GB/s (limit %.3f)", c->via, c->target,
                      c->dir == MMA_DIR_H2D ? "h2d" : "d2h", sample, limit);
        } else {
            p->probe_at = now + s->yield_probe_ns;
        }
    } else if (!p->yielding && p->samples >= RATE_MIN_SAMPLES && p->ew_bytes < limit * p->ew_judged_ns) {
        p->yielding = 1;
        p->probe_at = now + s->yield_probe_ns;
        MMA_DEBUG("relay gpu%d->gpu%d %s yields: %.3f GB/s (%.3f judged) < %.2f x %.3f", c->via, c->target,
                  c->dir == MMA_DIR_H2D ? "h2d" : "d2h", p->rate, p->ew_bytes / p->ew_judged_ns, s->yield_frac,
                  ref);
    }
}

mmad_job_t *mmad_sched_chunk_done(mmad_sched_t *s, mmad_chunk_t *c)
{
    mmad_job_t *j = c->job;
    uint64_t now = s->now();
    if (s->trace && s->trace_n < s->trace_cap)
        s->trace[s->trace_n++] = (mmad_trace_rec_t){
            .job = j->trace_id, .job_bytes = j->total, .t_queued = j->t_queued, .t_runnable = j->t_runnable,
            .t_sent = j->t_sent, .t_issue = c->t_issue, .t_submitted = c->t_submitted, .t_done = now, .len = c->len,
            .target = (uint8_t)c->target, .via = (uint8_t)c->via, .dir = (uint8_t)c->dir,
            .priority = (uint8_t)j->priority, .status = c->status,
            .g_times = {c->g_times[0], c->g_times[1], c->g_times[2], c->g_times[3]}};
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
        p->one_hop_chunks += c->kernel_dev != NULL;
    }
    path_rate_update(s, p, c, now);
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
    mmad_plan_t *pl = s->plans ? plan_of(s, j) : NULL;
    if (pl && now > pl->end[c->via])
        pl->end[c->via] = now;
    chunk_put(s, c);
    if (!job_finished(j))
        return NULL;
    if (pl)
        plan_learn(s, pl, j);
    unlink_job(s, j);
    s->jobs_done++;
    if (j->status == MMA_OK)
        s->bytes_done += j->total;
    return j;
}

mmad_job_t *mmad_sched_take_failed(mmad_sched_t *s)
{
    if (!s->failed_pending)
        return NULL;
    s->failed_pending = 0;
    /* Unlinked here rather than where the submit failed: mmad_sched_fill
     * walks the job list around that call. */
    mmad_job_t *done = NULL;
    mmad_job_t *j = s->jobs;
    while (j) {
        mmad_job_t *next = j->next;
        if (j->status != MMA_OK && j->inflight == 0) {
            unlink_job(s, j);
            s->jobs_done++;
            j->next = done;
            done = j;
        }
        j = next;
    }
    return done;
}

/* Unlink the jobs with nothing in flight, of conn's only when conn is given
 * (those marked cancelled first, in flight or not), as a list. */
static mmad_job_t *take_jobs(mmad_sched_t *s, const mmad_conn_t *conn)
{
    mmad_job_t *done = NULL;
    mmad_job_t *j = s->jobs;
    while (j) {
        mmad_job_t *next = j->next;
        if (!conn || j->conn == conn) {
            if (conn && j->status == MMA_OK)
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

mmad_job_t *mmad_sched_take_idle(mmad_sched_t *s)
{
    return take_jobs(s, NULL);
}

mmad_job_t *mmad_sched_cancel_conn(mmad_sched_t *s, mmad_conn_t *conn)
{
    return take_jobs(s, conn);
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
