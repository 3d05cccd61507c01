/* Every mmad option in one declarative table: name, type, default, bounds,
 * help. `mmad --help` prints it; the README's option list is made from it. */
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mmad.h"
#include "util.h"

typedef enum { OPT_STR, OPT_INT, OPT_SIZE, OPT_DOUBLE } opt_type_t;

typedef struct opt {
    const char *name;
    opt_type_t type;
    size_t offset;
    size_t len; /* for strings */
    const char *def;
    double min, max;
    const char *help;
} opt_t;

#define O(f) offsetof(mmad_config_t, f)
#define S(f) sizeof(((mmad_config_t *)0)->f)

static const opt_t options[] = {
    {"socket", OPT_STR, O(socket_path), S(socket_path), "", 0, 0,
     "Unix socket to serve (default $MMA_SOCKET, else /run/mma/mmad.sock)"},
    {"backend", OPT_STR, O(backend), S(backend), "auto", 0, 0,
     "auto | cuda | sim (auto: cuda when a GPU is visible, else the simulated box)"},
    {"sim-preset", OPT_STR, O(sim_preset), S(sim_preset), "4gpu", 0, 0,
     "simulated box: 4gpu (like HARDWARE.md) | 8gpu-2socket (two sockets, cross-socket link)"},
    {"sim-gpus", OPT_INT, O(sim_gpus), 0, "0", 0, MMAD_MAX_GPUS, "simulated GPU count (0: the preset's)"},
    {"sim-scale", OPT_DOUBLE, O(sim_scale), 0, "0.01", 1e-4, 1.0,
     "simulated link rates are the real ones times this (0.01: 55.5 GB/s -> 555 MB/s)"},
    {"chunk-size", OPT_SIZE, O(chunk_size), 0, "8M", 4096, 1u << 30,
     "largest micro-transfer (and staging buffer size); a multiple of 4096"},
    {"min-chunk", OPT_SIZE, O(min_chunk), 0, "512K", 4096, 1u << 30,
     "smallest piece a large copy is split into"},
    {"staging-slots", OPT_INT, O(staging_slots), 0, "4", 1, 64,
     "staging buffers per GPU (each chunk-size bytes of device memory)"},
    {"path-depth", OPT_INT, O(path_depth), 0, "2", 1, 64,
     "chunks in flight per path (one moving, one queued keeps a link busy)"},
    {"chunk-rounds", OPT_INT, O(chunk_rounds), 0, "1", 1, 64,
     "cut a copy so each path pulls about this many times its depth (balances unequal paths; "
     "on 4x H200, 1 beat 4 and 8: every chunk costs engine time)"},
    {"tail-split", OPT_INT, O(tail_split), 0, "0", 0, 1,
     "1: a chunk is at most what is left of its copy over paths x depth, so paths finish together"},
    {"relay-per-slot", OPT_INT, O(relay_per_slot), 0, "0", 0, 1,
     "cuda: 1 puts both hops of a relay on its staging slot's own stream (3 CUDA calls, not 5)"},
    {"hop-side", OPT_STR, O(hop_side), S(hop_side), "target", 0, 0,
     "cuda: whose stream runs a relay's NVLink hop: target (the target pulls H2D, pushes D2H; on 4x H200 H2D "
     "4-32 MiB 6-15% faster than via; --submit-threads=1 turns it off) | via (the staging GPU pushes H2D, pulls D2H)"},
    {"copy-api", OPT_STR, O(copy_api), S(copy_api), "runtime", 0, 0,
     "cuda: runtime (cudaMemcpyAsync) | driver (cuMemcpy*Async) for the chunk copies"},
    {"relay-kernel", OPT_SIZE, O(relay_kernel), 0, "128M", 0, 1099511627776.0,
     "cuda: copies smaller than this relay in one hop: a copy kernel on the via GPU reads host memory over "
     "its PCIe link and writes the target over NVLink (no staging, no second copy); it takes "
     "--relay-kernel-blocks of the via GPU's SMs while it runs; 0: relays always stage"},
    {"relay-kernel-busy-sm", OPT_INT, O(relay_kernel_busy_sm), 0, "50", 0, 100,
     "cuda: one-hop relays stage through a GPU where NVML shows another process keeping at least this % of its "
     "SMs busy (its kernels would take turns with theirs), and go in one hop again after a second below it; "
     "0: never judge"},
    {"relay-linger-us", OPT_INT, O(relay_linger_us), 0, "200", 0, 1000000,
     "cuda: one-hop relays through a GPU go to a resident copy kernel there, which takes each chunk from a ring in "
     "host memory (no launch, no completion call) and ends after this long without one; 0: a kernel launch per chunk"},
    {"relay-kernel-blocks", OPT_INT, O(relay_kernel_blocks), 0, "16", 1, 1024,
     "cuda: blocks of 512 threads per relay kernel (on 4x H200 4 already filled one link)"},
    {"submit-threads", OPT_INT, O(submit_threads), 0, "0", 0, 1,
     "cuda: 1 issues each GPU's relay chunks from a thread of its own (needs completion flags); on 4x H200 "
     "the driver serialized them (8.7 us per copy call, not 5.7) and mmad passed one core; 0: the engine thread issues every chunk"},
    {"completion", OPT_STR, O(completion), S(completion), "auto", 0, 0,
     "cuda: how mmad learns a chunk ended: flags (the stream writes a host word; free to poll) | "
     "events (cudaEventQuery per chunk) | auto (flags where the GPUs support stream memory operations)"},
    {"fewest-chunks", OPT_INT, O(fewest_chunks), 0, "0", 0, 1,
     "1: no more chunks per path than chunk-size requires (up to depth x rounds): fewer submissions for mid-size copies"},
    {"yield-to-direct", OPT_INT, O(yield_to_direct), 0, "1", 0, 1,
     "1: a relay through GPU v takes no new chunks while mmad has a copy of its own into (H2D) or out of (D2H) v, "
     "until that copy lands: v's link carries its direct chunks, and a relayed byte would only take their place; "
     "0: relays go through every link (clients copying into every GPU at once then share each link)"},
    {"yield-frac", OPT_DOUBLE, O(yield_frac), 0, "0", 0, 1,
     "a relay whose achieved rate falls below this x the best recent rate in its direction yields its "
     "link to other traffic (only probes go), e.g. 0.6; 0 (default): relays never yield (on 4x H200 the "
     "contention is the shared host side and yielding did not protect native neighbours)"},
    {"trace", OPT_STR, O(trace_path), S(trace_path), "", 0, 0,
     "diagnosis: keep one record per chunk (copy, path, bytes; queued, runnable, issue, submitted, done times in ns) "
     "and write them as CSV to this file when mmad stops (at most 1M chunks)"},
    {"trace-gpu", OPT_INT, O(trace_gpu), 0, "0", 0, 1,
     "diagnosis, with --trace (cuda): 1 also times each chunk's copies on the GPUs (CUDA events around each copy, "
     "a few us of engine time a chunk; not where --submit-threads=1): four more columns, when they ran there"},
    {"busy-gbps", OPT_DOUBLE, O(busy_gbps), 0, "10", 0, 10000,
     "relays through a GPU stop while its PCIe link carries more than this (GB/s, per direction) of "
     "traffic that is not mmad's, e.g. its own process loading it (cuda: NVML's PCIe counters); "
     "they resume below half of it; 0: never"},
    {"yield-probe-ms", OPT_DOUBLE, O(yield_probe_ms), 0, "20", 0.01, 60000,
     "a yielding relay lets one chunk through this often and resumes if that chunk ran fast enough"},
    {"link-gbps", OPT_DOUBLE, O(link_gbps), 0, "45", 0.001, 10000,
     "per-link rate assumed until one is measured (planned splits) and the lowest reference for yielding"},
    {"plan-split", OPT_INT, O(plan_split), 0, "3", 0, 4,
     "1: a copy of at most one chunk per path gets one chunk per path, sized so all paths finish together; "
     "2: also a copy of at most path-depth chunks per path (each share cut in equal pieces); 3: also any copy "
     "whose relays go in one hop (below --relay-kernel), however many chunks; 4: every copy; 0: equal chunks"},
    {"plan-learn", OPT_INT, O(plan_learn), 0, "3", 0, 3,
     "1: planned splits weight each path by the rate it showed in earlier planned copies (from when their "
     "chunks ended), so paths that run slower (a relay, a link the host side serves less) get less; 2: learn "
     "each path's start and rate instead (a line through its copies' sizes and end times); 3: weights per size "
     "class (powers of 2 in MiB), moved after each copy so that its paths end together (a copy with a late "
     "start, as after a pause, teaches nothing; on 4x H200 it evened 4-16 MiB copies' ends and made 8 MiB "
     "3-6% faster than 1); 0: the model alone"},
    {"relay-edge", OPT_SIZE, O(relay_edge), 0, "2M", 0, 1u << 30,
     "planned relays of at least 3x this end (H2D) or start (D2H) with a piece this small, so the NVLink hops "
     "that no PCIe transfer hides are short (they queue at the target's NVLink ports); 0: equal pieces"},
    {"edge-one-hop", OPT_INT, O(edge_one_hop), 0, "0", 0, 1,
     "cuda, 1: a staged copy's relays (from --relay-kernel up) start and end with a --relay-edge piece that goes "
     "in one hop (a resident copy kernel on the via GPU): they start as soon as they are posted, and no NVLink "
     "hop ends (H2D) or starts (D2H) the copy; the rest still stages, where copy engines read host memory "
     "faster than kernels"},
    {"relay-first", OPT_INT, O(relay_first), 0, "1", 0, 1,
     "cuda: 1 issues a copy's one-hop relays before its direct chunk where resident kernels take them "
     "(posting one costs the engine well under a microsecond, a direct chunk ~4 us), and plans all paths "
     "to start together; 0: the direct chunk first"},
    {"issue-cost-us", OPT_DOUBLE, O(issue_cost_us), 0, "-1", -1, 1000,
     "engine time to issue one chunk, for planned splits (-1: 5 on cuda, --sim-chunk-cost-us simulated)"},
    {"relay-overhead-us", OPT_DOUBLE, O(relay_overhead_us), 0, "-1", -1, 10000,
     "fixed extra latency of a relay chunk over a direct one, for planned splits (-1: on cuda 15 staged, 5 for a "
     "one-hop relay launched per chunk, 1 for one posted to a resident kernel; --sim-relay-latency-us simulated); "
     "given, it is used for one-hop relays too"},
    {"bypass-threshold", OPT_SIZE, O(bypass_threshold), 0, "-1", -1, 1u << 30,
     "copies below this go native in libmma (-1: the backend's measured default)"},
    {"max-paths", OPT_INT, O(max_paths), 0, "0", 0, MMAD_MAX_GPUS, "paths per copy (0: all)"},
    {"max-clients", OPT_INT, O(max_clients), 0, "256", 1, 65536, "connections served at once"},
    {"engine-spin-us", OPT_DOUBLE, O(engine_spin_us), 0, "20", 0, 1000000,
     "while chunks are in flight the engine thread polls this long after its last progress, then sleeps in "
     "growing steps (up to a quarter of a chunk's time on one link) between polls; more: completions are seen "
     "sooner at the cost of a busy core"},
    {"engine-spin-queued", OPT_INT, O(engine_spin_queued), 0, "0", 0, 1,
     "0: while no copy is in its tail and every path with a chunk in flight has its next one queued behind it, "
     "the engine skips --engine-spin-us and sleeps at once (from a quarter of the step cap): a chunk's end seen "
     "late then idles no link, since the queued chunk runs meanwhile; 1: it spins there too"},
    {"cold-bypass", OPT_SIZE, O(cold_bypass), 0, "32M", 0, 1099511627776.0,
     "cuda: a copy below this goes native in libmma while mmad's socket thread sleeps (it then wakes mmad, so "
     "that the copies after it find it awake): waking mmad's two threads and relaunching its relay kernels "
     "costs such a copy 100-250 us on these VMs, more than it gains (2 MiB after a 1 ms pause: 0.44x native "
     "through mmad on 2x H200; 16 MiB after 10 ms: 0.91x on 4x H100, 0.80-0.89x on 2x H200); 0: off"},
    {"cold-small", OPT_SIZE, O(cold_small), 0, "8M", 0, 1099511627776.0,
     "cuda: a copy below this also goes native in libmma once the client has had no copy through mmad for "
     "--relay-linger-us (mmad's resident relay kernels have ended), unless it follows such a native copy within "
     "that time (then it relaunches them for the rest of its burst): relaunching them costs such a copy more "
     "than it gains (2x H200 after a 1 ms pause, through mmad: 2 MiB 0.54-0.83x native, 4 MiB 0.90-0.91x); "
     "0: off"},
    {"wake-spin-us", OPT_DOUBLE, O(wake_spin_us), 0, "2000", 0, 1000000,
     "after a client's KICK that brings no copy (one libmma ran natively for --cold-bypass, mma_prewarm) both "
     "of mmad's threads stay awake this long, so that the copies after it find them awake; "
     "the cores are busy meanwhile"},
    {"idle-spin-us", OPT_DOUBLE, O(idle_spin_us), 0, "50", 0, 1000000,
     "after its last work the engine thread stays awake this long before it sleeps, so that a copy coming "
     "sooner skips a thread wake-up (tens to hundreds of microseconds on a virtual machine); the core is busy "
     "meanwhile"},
    {"loop-spin-us", OPT_DOUBLE, O(loop_spin_us), 0, "100", 0, 100000,
     "after a copy request, the socket thread polls for the next one this long instead of sleeping (0: off)"},
    {"tail-spin", OPT_INT, O(tail_spin), 0, "1", 0, 1,
     "1: with --loop-spin-us, the socket thread also polls while a copy is on its last chunks, and that long after"},
    {"submit-ring", OPT_INT, O(submit_ring), 0, "1", 0, 1,
     "1: clients post one-segment copies to a ring in their flag page, which the socket thread reads while it "
     "polls (--loop-spin-us), with no system call on either side; 0: every copy is a socket message"},
    {"sim-chunk-cost-us", OPT_DOUBLE, O(sim_chunk_cost_us), 0, "0", 0, 1000,
     "simulated engine time to issue one chunk, in real-box microseconds (4x H200 measured 8), scaled like the rates"},
    {"sim-relay-latency-us", OPT_DOUBLE, O(sim_relay_latency_us), 0, "0", 0, 10000,
     "simulated fixed extra latency of a relay chunk, in real-box microseconds (4x H200: ~15), scaled like the rates"},
    {"sim-busy-gpus", OPT_STR, O(sim_busy_gpus), S(sim_busy_gpus), "", 0, 0,
     "comma list of simulated GPUs whose links carry a native load of their own (mmad gets --sim-busy-share)"},
    {"sim-busy-share", OPT_DOUBLE, O(sim_busy_share), 0, "0.4", 0.01, 1,
     "the share of a busy simulated link that mmad's chunks get"},
    {"sim-busy-file", OPT_STR, O(sim_busy_file), S(sim_busy_file), "", 0, 0,
     "when set, the --sim-busy-gpus load is on only while this file exists (switch it at run time)"},
    {"sim-fail-via", OPT_INT, O(sim_fail_via), 0, "-1", -1, MMAD_MAX_GPUS,
     "fault injection for tests: relay chunks through this simulated GPU fail"},
    {"log", OPT_STR, O(log_level), S(log_level), "info", 0, 0, "error | warn | info | debug"},
};

#define NOPTS (sizeof options / sizeof options[0])

/* "8M" -> 8388608; "-1" allowed for signed sizes. */
static int parse_size(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || errno)
        return -1;
    double mult = 1;
    switch (*end) {
    case 'k': case 'K': mult = 1024.0; end++; break;
    case 'm': case 'M': mult = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mult = 1024.0 * 1024 * 1024; end++; break;
    default: break;
    }
    if (*end == 'i' || *end == 'B')
        end++;
    if (*end == 'B')
        end++;
    if (*end)
        return -1;
    /* Converting a double outside int64's range (or NaN) is undefined. */
    double r = v * mult;
    if (!(r >= -9.0e18 && r <= 9.0e18))
        return -1;
    *out = (int64_t)r;
    return 0;
}

static int set_opt(mmad_config_t *cfg, const opt_t *o, const char *val)
{
    char *base = (char *)cfg + o->offset;
    switch (o->type) {
    case OPT_STR:
        if (strlen(val) >= o->len) {
            fprintf(stderr, "mmad: --%s: value too long (at most %zu characters)\n", o->name, o->len - 1);
            return -1;
        }
        strcpy(base, val);
        return 0;
    case OPT_INT:
    case OPT_SIZE: {
        int64_t v;
        if (parse_size(val, &v) != 0) {
            fprintf(stderr, "mmad: --%s: '%s' is not a number\n", o->name, val);
            return -1;
        }
        if ((double)v < o->min || (double)v > o->max) {
            fprintf(stderr, "mmad: --%s: %s is outside [%.0f, %.0f]\n", o->name, val, o->min, o->max);
            return -1;
        }
        if (o->type == OPT_INT)
            *(int *)base = (int)v;
        else if (o->offset == O(bypass_threshold))
            *(int64_t *)base = v;
        else
            *(uint64_t *)base = (uint64_t)v;
        return 0;
    }
    case OPT_DOUBLE: {
        char *end;
        double v = strtod(val, &end);
        /* strtod takes "nan" and "inf"; NaN passes every < and > test, and
         * a NaN rate or time stalls every copy (--sim-scale=nan hung mmad). */
        if (end == val || *end || !isfinite(v) || v < o->min || v > o->max) {
            fprintf(stderr, "mmad: --%s: '%s' must be a number in [%g, %g]\n", o->name, val, o->min, o->max);
            return -1;
        }
        *(double *)base = v;
        return 0;
    }
    }
    return -1;
}

void mmad_config_defaults(mmad_config_t *cfg)
{
    memset(cfg, 0, sizeof *cfg);
    for (size_t i = 0; i < NOPTS; i++)
        (void)set_opt(cfg, &options[i], options[i].def);
}

void mmad_config_usage(FILE *out)
{
    fprintf(out,
            "usage: mmad [options]\n"
            "Multipath Memory Access daemon: splits host<->GPU copies across every PCIe link.\n\n"
            "  --sim                 shorthand for --backend=sim\n"
            "  --help, --version\n");
    for (size_t i = 0; i < NOPTS; i++) {
        char left[64];
        snprintf(left, sizeof left, "--%s=VALUE", options[i].name);
        fprintf(out, "  %-26s %s [default %s]\n", left, options[i].help,
                *options[i].def ? options[i].def : "none");
    }
}

int mmad_config_parse(mmad_config_t *cfg, int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            mmad_config_usage(stdout);
            return 1;
        }
        if (strcmp(a, "--version") == 0) {
            printf("mmad %s (API %d)\n", MMA_VERSION_STR, 1);
            return 1;
        }
        if (strcmp(a, "--sim") == 0) {
            strcpy(cfg->backend, "sim");
            continue;
        }
        if (strncmp(a, "--", 2) != 0) {
            fprintf(stderr, "mmad: unexpected argument '%s' (see --help)\n", a);
            return -1;
        }
        const char *name = a + 2;
        const char *eq = strchr(name, '=');
        size_t nlen = eq ? (size_t)(eq - name) : strlen(name);
        const opt_t *o = NULL;
        for (size_t k = 0; k < NOPTS; k++)
            if (strlen(options[k].name) == nlen && strncmp(options[k].name, name, nlen) == 0)
                o = &options[k];
        if (!o) {
            fprintf(stderr, "mmad: unknown option '%s' (see --help)\n", a);
            return -1;
        }
        const char *val = eq ? eq + 1 : NULL;
        if (!val) {
            if (i + 1 >= argc) {
                fprintf(stderr, "mmad: --%s needs a value\n", o->name);
                return -1;
            }
            val = argv[++i];
        }
        if (set_opt(cfg, o, val) != 0)
            return -1;
    }
    /* Options that take one of a few words. */
    const struct {
        const char *name, *val, *w[4]; /* the accepted words, NULL after the last */
    } words[] = {
        {"backend", cfg->backend, {"auto", "cuda", "sim"}},
        {"completion", cfg->completion, {"auto", "flags", "events"}},
        {"copy-api", cfg->copy_api, {"runtime", "driver"}},
        {"hop-side", cfg->hop_side, {"via", "target"}},
        /* a misspelt level would otherwise log at info, silently */
        {"log", cfg->log_level, {"error", "warn", "info", "debug"}},
    };
    for (size_t k = 0; k < sizeof words / sizeof words[0]; k++) {
        const char *v = words[k].val;
        int n = 0, ok = 0;
        for (; n < 4 && words[k].w[n]; n++)
            ok |= !strcmp(v, words[k].w[n]);
        if (!ok) {
            char list[96] = "";
            size_t len = 0;
            for (int i = 0; i < n; i++)
                len += (size_t)snprintf(list + len, sizeof list - len, "%s%s", i == 0 ? "" : i == n - 1 ? " or " : ", ",
                                        words[k].w[i]);
            fprintf(stderr, "mmad: --%s must be %s, not '%s'\n", words[k].name, list, v);
            return -1;
        }
    }
    /* Chunks, staging buffers and a relay's pieces are cut in whole pages;
     * a chunk size between pages let a page-rounded piece outgrow its
     * staging buffer. */
    if (cfg->chunk_size % 4096) {
        fprintf(stderr, "mmad: --chunk-size must be a multiple of 4096 (whole pages), not %llu\n",
                (unsigned long long)cfg->chunk_size);
        return -1;
    }
    if (cfg->min_chunk > cfg->chunk_size)
        cfg->min_chunk = cfg->chunk_size;
    return 0;
}
