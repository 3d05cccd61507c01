/* mmad's option table (daemon/config.c): defaults, both spellings of an
 * option, size suffixes, and every kind of bad input, which must be refused
 * (a daemon that starts with a half-understood command line is worse than
 * one that does not start). */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "mmad.h"

#define ARGV(...) ((char *[]){"mmad", __VA_ARGS__, NULL})
#define ARGC(...) ((int)(sizeof((char *[]){"mmad", __VA_ARGS__}) / sizeof(char *)))
#define PARSE(...) mmad_config_parse(&cfg, ARGC(__VA_ARGS__), ARGV(__VA_ARGS__))

static mmad_config_t cfg;

static void setup(void)
{
    mmad_config_defaults(&cfg);
}

/* The parser reports errors on stderr; keep the test log readable by
 * silencing it around calls that are expected to fail. */
static int parse_quiet(int argc, char **argv)
{
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    FILE *null = fopen("/dev/null", "w");
    dup2(fileno(null), STDERR_FILENO);
    int rc = mmad_config_parse(&cfg, argc, argv);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    fclose(null);
    return rc;
}
#define PARSE_BAD(...) parse_quiet(ARGC(__VA_ARGS__), ARGV(__VA_ARGS__))

/* Parse one argument that must be refused; returns what the parser wrote
 * on stderr (static buffer). */
static const char *refusal_of(const char *arg)
{
    static char buf[512];
    fflush(stderr);
    int saved = dup(STDERR_FILENO);
    FILE *tmp = tmpfile();
    ck_assert_ptr_nonnull(tmp);
    dup2(fileno(tmp), STDERR_FILENO);
    char *argv[] = {"mmad", (char *)arg, NULL};
    int rc = mmad_config_parse(&cfg, 2, argv);
    fflush(stderr);
    dup2(saved, STDERR_FILENO);
    close(saved);
    rewind(tmp);
    size_t n = fread(buf, 1, sizeof buf - 1, tmp);
    buf[n] = 0;
    fclose(tmp);
    ck_assert_msg(rc < 0, "%s was accepted", arg);
    return buf;
}

START_TEST(defaults)
{
    ck_assert_str_eq(cfg.socket_path, "");
    ck_assert_str_eq(cfg.backend, "auto");
    ck_assert_str_eq(cfg.sim_preset, "4gpu");
    ck_assert_int_eq(cfg.sim_gpus, 0);
    ck_assert_double_eq_tol(cfg.sim_scale, 0.01, 1e-12);
    ck_assert_uint_eq(cfg.chunk_size, 8u << 20);
    ck_assert_uint_eq(cfg.min_chunk, 512u << 10);
    ck_assert_int_eq(cfg.staging_slots, 4);
    ck_assert_int_eq(cfg.path_depth, 2);
    ck_assert_int_eq(cfg.bypass_threshold, -1);
    ck_assert_int_eq(cfg.max_paths, 0);
    ck_assert_int_eq(cfg.max_clients, 256);
    ck_assert_int_eq(cfg.sim_fail_via, -1);
    ck_assert_str_eq(cfg.log_level, "info");
    /* Yielding and planned splits on; their costs the backend's. */
    ck_assert_double_eq_tol(cfg.yield_frac, 0, 1e-12); /* off: no help on 4x H200 */
    ck_assert_double_eq_tol(cfg.busy_gbps, 10, 1e-12);
    ck_assert_double_eq_tol(cfg.yield_probe_ms, 20, 1e-12);
    ck_assert_double_eq_tol(cfg.link_gbps, 45, 1e-12);
    ck_assert_int_eq(cfg.plan_split, 3);
    ck_assert_int_eq(cfg.plan_learn, 3);
    ck_assert_uint_eq(cfg.relay_edge, 2u << 20);
    /* One-hop relays below 128 MiB (64 MiB copies ran faster with them on
     * 4x H200), 16 blocks, kept off GPUs whose SMs another process keeps
     * half busy. */
    ck_assert_uint_eq(cfg.relay_kernel, 128u << 20);
    ck_assert_int_eq(cfg.relay_kernel_blocks, 16);
    ck_assert_int_eq(cfg.relay_kernel_busy_sm, 50);
    ck_assert_int_eq(cfg.relay_linger_us, 200);
    ck_assert_int_eq(cfg.relay_first, 1);
    ck_assert_int_eq(cfg.edge_one_hop, 0); /* no clear gain on 4x H200 (bench/results/...-edge-one-hop/) */
    ck_assert_str_eq(cfg.hop_side, "target"); /* H2D 4-32 MiB 6-15% faster on 4x H200 */
    ck_assert_double_lt(cfg.issue_cost_us, 0);
    ck_assert_double_lt(cfg.relay_overhead_us, 0);
    ck_assert_str_eq(cfg.sim_busy_gpus, "");
    ck_assert_double_eq_tol(cfg.sim_busy_share, 0.4, 1e-12);
    ck_assert_str_eq(cfg.sim_busy_file, "");
    ck_assert_double_eq_tol(cfg.sim_relay_latency_us, 0, 1e-12);
    /* The socket thread polls 100 us after a copy request and through
     * copies' tails (4x H200: the request's way in from 22-68 us to 8-25). */
    ck_assert_double_eq_tol(cfg.loop_spin_us, 100, 1e-12);
    ck_assert_int_eq(cfg.tail_spin, 1);
    /* No arguments: the defaults stand. */
    char *argv[] = {"mmad", NULL};
    ck_assert_int_eq(mmad_config_parse(&cfg, 1, argv), 0);
    ck_assert_uint_eq(cfg.chunk_size, 8u << 20);
}
END_TEST

START_TEST(equals_and_space_spellings)
{
    ck_assert_int_eq(PARSE("--chunk-size=4M"), 0);
    ck_assert_uint_eq(cfg.chunk_size, 4u << 20);
    mmad_config_defaults(&cfg);
    ck_assert_int_eq(PARSE("--chunk-size", "4M"), 0);
    ck_assert_uint_eq(cfg.chunk_size, 4u << 20);
    ck_assert_int_eq(PARSE("--socket", "/tmp/a b.sock", "--path-depth=3", "--staging-slots", "8"), 0);
    ck_assert_str_eq(cfg.socket_path, "/tmp/a b.sock");
    ck_assert_int_eq(cfg.path_depth, 3);
    ck_assert_int_eq(cfg.staging_slots, 8);
}
END_TEST

START_TEST(size_suffixes)
{
    ck_assert_int_eq(PARSE("--chunk-size=64k"), 0);
    ck_assert_uint_eq(cfg.chunk_size, 64u << 10);
    ck_assert_int_eq(PARSE("--chunk-size=2MiB"), 0);
    ck_assert_uint_eq(cfg.chunk_size, 2u << 20);
    ck_assert_int_eq(PARSE("--chunk-size=1G"), 0);
    ck_assert_uint_eq(cfg.chunk_size, 1u << 30);
    ck_assert_int_eq(PARSE("--chunk-size=1.5M"), 0);
    ck_assert_uint_eq(cfg.chunk_size, 3u << 19);
    ck_assert_int_eq(PARSE("--chunk-size=12288"), 0);
    ck_assert_uint_eq(cfg.chunk_size, 12288);
    ck_assert_int_eq(PARSE("--bypass-threshold=256K"), 0);
    ck_assert_int_eq(cfg.bypass_threshold, 256 << 10);
    ck_assert_int_eq(PARSE("--bypass-threshold=-1"), 0);
    ck_assert_int_eq(cfg.bypass_threshold, -1);
    ck_assert_int_eq(PARSE("--sim-scale=0.5"), 0);
    ck_assert_double_eq_tol(cfg.sim_scale, 0.5, 1e-12);
    ck_assert_int_eq(PARSE("--sim-fail-via=2"), 0);
    ck_assert_int_eq(cfg.sim_fail_via, 2);
}
END_TEST

START_TEST(yield_and_plan_options)
{
    ck_assert_int_eq(PARSE("--yield-frac=0", "--yield-probe-ms=5", "--link-gbps=25", "--plan-split=2",
                           "--plan-learn=1", "--issue-cost-us=4.7", "--relay-overhead-us", "12", "--sim-busy-gpus=1,3",
                           "--sim-busy-share=0.5", "--sim-busy-file=/tmp/busy", "--sim-relay-latency-us=15"),
                     0);
    ck_assert_double_eq_tol(cfg.yield_frac, 0, 1e-12);
    ck_assert_double_eq_tol(cfg.yield_probe_ms, 5, 1e-12);
    ck_assert_double_eq_tol(cfg.link_gbps, 25, 1e-12);
    ck_assert_int_eq(cfg.plan_split, 2);
    ck_assert_int_eq(cfg.plan_learn, 1);
    ck_assert_double_eq_tol(cfg.issue_cost_us, 4.7, 1e-12);
    ck_assert_double_eq_tol(cfg.relay_overhead_us, 12, 1e-12);
    ck_assert_str_eq(cfg.sim_busy_gpus, "1,3");
    ck_assert_double_eq_tol(cfg.sim_busy_share, 0.5, 1e-12);
    ck_assert_str_eq(cfg.sim_busy_file, "/tmp/busy");
    ck_assert_double_eq_tol(cfg.sim_relay_latency_us, 15, 1e-12);
    ck_assert_int_eq(PARSE("--loop-spin-us=0", "--tail-spin=0"), 0);
    ck_assert_double_eq_tol(cfg.loop_spin_us, 0, 1e-12);
    ck_assert_int_eq(cfg.tail_spin, 0);
    ck_assert_double_eq_tol(cfg.engine_spin_us, 20, 1e-12); /* the default */
    ck_assert_int_eq(cfg.engine_spin_queued, 0);            /* the default */
    ck_assert_double_eq_tol(cfg.idle_spin_us, 50, 1e-12);   /* the default */
    ck_assert_double_eq_tol(cfg.wake_spin_us, 2000, 1e-12); /* the default */
    ck_assert_uint_eq(cfg.cold_bypass, 32u << 20);          /* the default */
    ck_assert_int_eq(PARSE("--cold-bypass=8M"), 0);
    ck_assert_uint_eq(cfg.cold_bypass, 8u << 20);
    ck_assert_uint_eq(cfg.cold_small, 8u << 20);            /* the default */
    ck_assert_int_eq(PARSE("--idle-spin-us=2000", "--plan-learn=3"), 0);
    ck_assert_double_eq_tol(cfg.idle_spin_us, 2000, 1e-12);
    ck_assert_int_eq(cfg.plan_learn, 3);
    ck_assert_int_eq(PARSE("--engine-spin-us=100000", "--tail-spin=1", "--engine-spin-queued=1"), 0);
    ck_assert_int_eq(cfg.engine_spin_queued, 1);
    ck_assert_double_eq_tol(cfg.engine_spin_us, 100000, 1e-12);
    ck_assert_int_eq(cfg.trace_gpu, 0); /* the default */
    ck_assert_int_eq(PARSE("--trace=/tmp/t.csv", "--trace-gpu=1"), 0);
    ck_assert_int_eq(cfg.trace_gpu, 1);
    const char *bad[] = {"--trace-gpu=2", "--engine-spin-us=-1", "--engine-spin-queued=2", "--idle-spin-us=-1", "--wake-spin-us=-1", "--cold-bypass=-1", "--engine-spin-us=2000000", "--loop-spin-us=-1", "--loop-spin-us=200000", "--tail-spin=2", "--yield-frac=1.5", "--yield-frac=-0.1", "--yield-probe-ms=0", "--link-gbps=0",
                         "--plan-split=5",   "--plan-learn=4", "--issue-cost-us=-2", "--relay-overhead-us=-1.5",
                         "--sim-busy-share=0", "--sim-busy-share=1.1", "--busy-gbps=-1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mmad_config_defaults(&cfg);
        char *argv[] = {"mmad", (char *)bad[i], NULL};
        ck_assert_msg(parse_quiet(2, argv) < 0, "%s was accepted", bad[i]);
    }
}
END_TEST

START_TEST(min_chunk_never_above_chunk_size)
{
    ck_assert_int_eq(PARSE("--chunk-size=256K"), 0);
    ck_assert_uint_eq(cfg.chunk_size, 256u << 10);
    ck_assert_uint_eq(cfg.min_chunk, 256u << 10);
    mmad_config_defaults(&cfg);
    ck_assert_int_eq(PARSE("--min-chunk=64K", "--chunk-size=1M"), 0);
    ck_assert_uint_eq(cfg.min_chunk, 64u << 10);
}
END_TEST

START_TEST(bad_numbers_refused)
{
    const char *bad[] = {"--chunk-size=abc", "--chunk-size=", "--chunk-size=4X", "--chunk-size=4MM",
                         "--path-depth=two", "--sim-scale=fast", "--sim-scale=", "--max-paths=1.2.3"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mmad_config_defaults(&cfg);
        char *argv[] = {"mmad", (char *)bad[i], NULL};
        ck_assert_msg(parse_quiet(2, argv) < 0, "%s was accepted", bad[i]);
        /* A refused value does not half-apply. */
        ck_assert_uint_eq(cfg.chunk_size, 8u << 20);
        ck_assert_int_eq(cfg.path_depth, 2);
    }
}
END_TEST

START_TEST(out_of_range_refused)
{
    const char *bad[] = {"--chunk-size=1K",   "--chunk-size=2G",    "--path-depth=0",     "--path-depth=65",
                         "--staging-slots=0", "--sim-scale=0",      "--sim-scale=1.5",    "--sim-gpus=17",
                         "--max-clients=0",   "--sim-fail-via=-2",  "--bypass-threshold=-2", "--max-paths=-1",
                         "--chunk-size=1e30", "--chunk-size=-4K",     "--chunk-size=nan",   "--chunk-size=inf",
                         "--path-depth=-1e300", "--hop-side=peer", "--copy-api=fast", "--completion=poll",
                         "--backend=gpu", "--relay-kernel=-1", "--relay-kernel-blocks=0",
                         "--relay-kernel-blocks=1025", "--relay-kernel-busy-sm=101", "--relay-kernel-busy-sm=-1",
                         "--relay-linger-us=-1", "--relay-linger-us=1000001", "--relay-first=2",
                         "--edge-one-hop=2", "--edge-one-hop=-1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mmad_config_defaults(&cfg);
        char *argv[] = {"mmad", (char *)bad[i], NULL};
        ck_assert_msg(parse_quiet(2, argv) < 0, "%s was accepted", bad[i]);
    }
    /* The bounds themselves are fine. */
    mmad_config_defaults(&cfg);
    ck_assert_int_eq(PARSE("--path-depth=1", "--staging-slots=64", "--sim-scale=1.0", "--chunk-size=4K"), 0);
    /* And every word of the word options. */
    ck_assert_int_eq(PARSE("--hop-side=target", "--copy-api=driver", "--completion=events", "--backend=cuda"), 0);
    ck_assert_str_eq(cfg.hop_side, "target");
    ck_assert_int_eq(PARSE("--hop-side=via", "--copy-api=runtime", "--completion=flags", "--backend=sim"), 0);
}
END_TEST

/* NaN passes every < and > bound, and strtod reads "nan" and "inf": a
 * --sim-scale=nan mmad started, then every copy stalled and SIGTERM never
 * finished. Every double option refuses them. */
START_TEST(non_finite_doubles_refused)
{
    const char *opts[] = {"sim-scale", "yield-frac", "busy-gbps", "yield-probe-ms", "link-gbps", "issue-cost-us",
                          "relay-overhead-us", "engine-spin-us", "wake-spin-us", "idle-spin-us", "loop-spin-us",
                          "sim-chunk-cost-us", "sim-relay-latency-us", "sim-busy-share"};
    const char *vals[] = {"nan", "NaN", "-nan", "inf", "-inf", "infinity"};
    for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++)
        for (size_t k = 0; k < sizeof vals / sizeof vals[0]; k++) {
            char arg[64];
            snprintf(arg, sizeof arg, "--%s=%s", opts[i], vals[k]);
            mmad_config_defaults(&cfg);
            const char *err = refusal_of(arg);
            ck_assert_msg(strstr(err, "must be a number"), "%s: %s", arg, err);
        }
    ck_assert_double_eq_tol(cfg.sim_scale, 0.01, 1e-12); /* not half-applied */
}
END_TEST

/* --log takes one of four words, like the other word options; anything
 * else (a typo) used to run at info without a word. */
START_TEST(log_level_words)
{
    const char *ok[] = {"error", "warn", "info", "debug"};
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        char arg[32];
        snprintf(arg, sizeof arg, "--log=%s", ok[i]);
        char *argv[] = {"mmad", arg, NULL};
        ck_assert_int_eq(mmad_config_parse(&cfg, 2, argv), 0);
        ck_assert_str_eq(cfg.log_level, ok[i]);
    }
    const char *bad[] = {"--log=warning", "--log=INFO", "--log=", "--log=trace", "--log=verbose"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mmad_config_defaults(&cfg);
        const char *err = refusal_of(bad[i]);
        ck_assert_msg(strstr(err, "--log must be error, warn, info or debug"), "%s: %s", bad[i], err);
    }
    /* The three-word and two-word options say theirs the same way. */
    mmad_config_defaults(&cfg);
    ck_assert_ptr_nonnull(strstr(refusal_of("--backend=gpu"), "--backend must be auto, cuda or sim, not 'gpu'"));
    mmad_config_defaults(&cfg);
    ck_assert_ptr_nonnull(strstr(refusal_of("--hop-side=peer"), "--hop-side must be via or target, not 'peer'"));
}
END_TEST

/* A chunk is a staging buffer and pieces are cut in whole pages: a chunk
 * size between pages let a relay's edge piece (--relay-edge, rounded up to
 * pages) outgrow its staging buffer. */
START_TEST(chunk_size_whole_pages)
{
    const char *bad[] = {"--chunk-size=6000", "--chunk-size=4097", "--chunk-size=1000000", "--chunk-size=1.1M"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        mmad_config_defaults(&cfg);
        const char *err = refusal_of(bad[i]);
        ck_assert_msg(strstr(err, "--chunk-size must be a multiple of 4096"), "%s: %s", bad[i], err);
    }
    const char *good[] = {"--chunk-size=4096", "--chunk-size=8192", "--chunk-size=1.5M", "--chunk-size=8M"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        mmad_config_defaults(&cfg);
        char *argv[] = {"mmad", (char *)good[i], NULL};
        ck_assert_msg(mmad_config_parse(&cfg, 2, argv) == 0, "%s was refused", good[i]);
    }
    /* The reviewer's case: refused before any copy could run. */
    mmad_config_defaults(&cfg);
    ck_assert_int_lt(PARSE_BAD("--chunk-size=6000", "--relay-edge=5000", "--path-depth=8"), 0);
}
END_TEST

START_TEST(unknown_and_malformed_arguments)
{
    ck_assert_int_lt(PARSE_BAD("--frobnicate"), 0);
    ck_assert_int_lt(PARSE_BAD("--frobnicate=1"), 0);
    ck_assert_int_lt(PARSE_BAD("--chunk"), 0);          /* a prefix is not a name */
    ck_assert_int_lt(PARSE_BAD("--chunk-sizes=4M"), 0);
    ck_assert_int_lt(PARSE_BAD("chunk-size=4M"), 0);    /* positional */
    ck_assert_int_lt(PARSE_BAD("-s"), 0);
    ck_assert_int_lt(PARSE_BAD("--chunk-size"), 0);     /* value missing at the end */
    ck_assert_int_lt(PARSE_BAD("--socket=/tmp/0123456789012345678901234567890123456789012345678901234567890123456789"
                               "01234567890123456789012345678901234567890.sock"),
                     0); /* longer than sun_path */
}
END_TEST

START_TEST(backend_choice)
{
    ck_assert_int_lt(PARSE_BAD("--backend", "bogus"), 0);
    ck_assert_int_lt(PARSE_BAD("--backend=SIM"), 0);
    mmad_config_defaults(&cfg);
    ck_assert_int_eq(PARSE("--sim"), 0);
    ck_assert_str_eq(cfg.backend, "sim");
    ck_assert_int_eq(PARSE("--backend=cuda"), 0);
    ck_assert_str_eq(cfg.backend, "cuda");
    ck_assert_int_eq(PARSE("--backend", "auto"), 0);
    ck_assert_str_eq(cfg.backend, "auto");
    /* Later arguments win. */
    ck_assert_int_eq(PARSE("--backend=cuda", "--sim"), 0);
    ck_assert_str_eq(cfg.backend, "sim");
}
END_TEST

START_TEST(help_and_version_return_1)
{
    fflush(stdout);
    int saved = dup(STDOUT_FILENO);
    FILE *tmp = tmpfile();
    ck_assert_ptr_nonnull(tmp);
    dup2(fileno(tmp), STDOUT_FILENO);
    int h = PARSE("--help");
    int v = PARSE("--version");
    fflush(stdout);
    dup2(saved, STDOUT_FILENO);
    close(saved);
    ck_assert_int_eq(h, 1);
    ck_assert_int_eq(v, 1);
    /* The usage lists every option from the table. */
    static char buf[65536]; /* the usage grows with the table */
    rewind(tmp);
    size_t n = fread(buf, 1, sizeof buf - 1, tmp);
    buf[n] = 0;
    fclose(tmp);
    const char *names[] = {"--socket", "--backend", "--sim-preset", "--sim-gpus", "--sim-scale", "--chunk-size",
                           "--min-chunk", "--staging-slots", "--path-depth", "--bypass-threshold", "--max-paths",
                           "--max-clients", "--sim-fail-via", "--engine-spin-us", "--trace-gpu", "--log", "mmad 0.2.0"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
        ck_assert_msg(strstr(buf, names[i]), "usage lacks %s", names[i]);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("config");
    TCase *tc = tcase_create("config");
    tcase_add_checked_fixture(tc, setup, NULL);
    tcase_set_timeout(tc, 10);
    tcase_add_test(tc, defaults);
    tcase_add_test(tc, equals_and_space_spellings);
    tcase_add_test(tc, size_suffixes);
    tcase_add_test(tc, yield_and_plan_options);
    tcase_add_test(tc, min_chunk_never_above_chunk_size);
    tcase_add_test(tc, bad_numbers_refused);
    tcase_add_test(tc, out_of_range_refused);
    tcase_add_test(tc, non_finite_doubles_refused);
    tcase_add_test(tc, log_level_words);
    tcase_add_test(tc, chunk_size_whole_pages);
    tcase_add_test(tc, unknown_and_malformed_arguments);
    tcase_add_test(tc, backend_choice);
    tcase_add_test(tc, help_and_version_return_1);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
