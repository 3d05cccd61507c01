/* mmad: arguments, backend choice, and the order things start and stop. */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "backend.h"
#include "engine.h"
#include "log.h"
#include "mma.h"
#include "server.h"
#include "util.h"
#include "wire.h"

static int level_of(const char *s)
{
    if (!strcmp(s, "error")) return MMA_LOG_ERROR;
    if (!strcmp(s, "warn")) return MMA_LOG_WARN;
    if (!strcmp(s, "debug")) return MMA_LOG_DEBUG;
    return MMA_LOG_INFO;
}

/* At the end, each thread's CPU time (user+sys, /proc/self/task) in one
 * log line, so that one sees what mmad's threads cost: mmad (the socket
 * thread), mmad-engine, mmad-links and mmad-link<N> (the link monitor),
 * mmad-lane<N> (--submit-threads) and the CUDA driver's own. Threads under
 * 5 ms are left out of the list, not out of the total; then the process's
 * own count, which also holds threads that have ended (the two should
 * agree within a few ticks). */
static void log_thread_cpu(void)
{
    DIR *dir = opendir("/proc/self/task");
    if (!dir)
        return;
    char list[768] = "", comm[64];
    size_t len = 0;
    double total = 0;
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (e->d_name[0] == '.')
            continue;
        char path[320];
        snprintf(path, sizeof path, "/proc/self/task/%s/stat", e->d_name);
        double sec = mma_stat_cpu_s(path, comm, sizeof comm);
        if (sec < 0)
            continue;
        total += sec;
        if (sec >= 0.005 && len < sizeof list - 64)
            len += (size_t)snprintf(list + len, sizeof list - len, "%s%.32s %.2f s", len ? ", " : "", comm, sec);
    }
    closedir(dir);
    MMA_INFO("cpu by thread (user+sys): %s; all threads %.2f s; the process, ended threads too, %.2f s",
             len ? list : "none over 5 ms", total, mma_stat_cpu_s("/proc/self/stat", comm, sizeof comm));
}

int main(int argc, char **argv)
{
    mmad_config_t cfg;
    mmad_config_defaults(&cfg);
    int prc = mmad_config_parse(&cfg, argc, argv);
    if (prc != 0)
        return prc > 0 ? 0 : 2;
    if (!cfg.socket_path[0])
        snprintf(cfg.socket_path, sizeof cfg.socket_path, "%s", mma_default_socket());
    mma_log_set("mmad", level_of(cfg.log_level)); /* --log, not $MMA_LOG (libmma's and the tools') */
    signal(SIGPIPE, SIG_IGN);

    mmad_backend_t *be = NULL;
    int rc;
    if (!strcmp(cfg.backend, "sim")) {
        rc = mmad_backend_sim_create(&cfg, &be);
    } else {
        int n = mmad_cuda_device_count();
        if (n > 0) {
            rc = mmad_backend_cuda_create(&cfg, &be);
        } else if (!strcmp(cfg.backend, "cuda")) {
            MMA_ERROR("--backend=cuda but no CUDA GPU is visible");
            return 1;
        } else {
            MMA_WARN("no CUDA GPU visible: running the SIMULATED box (preset %s, rates x%g); "
                     "data is really copied, speeds are scaled",
                     cfg.sim_preset, cfg.sim_scale);
            rc = mmad_backend_sim_create(&cfg, &be);
        }
    }
    if (rc != MMA_OK) {
        MMA_ERROR("backend failed to start: %s", mma_strerror(rc));
        return 1;
    }
    MMA_INFO("backend %s: %s", be->ops->name, be->topology);

    mmad_engine_t *engine = NULL;
    rc = mmad_engine_start(be, &cfg, &engine);
    if (rc != MMA_OK) {
        be->ops->destroy(be);
        return 1;
    }
    mmad_server_t *srv = NULL;
    rc = mmad_server_create(&cfg, be, engine, &srv);
    if (rc != MMA_OK) {
        mmad_engine_stop(engine);
        be->ops->destroy(be);
        return 1;
    }
    mmad_server_run(srv);
    log_thread_cpu();
    mmad_server_destroy(srv);
    mmad_engine_stop(engine);
    be->ops->destroy(be);
    MMA_INFO("stopped");
    return 0;
}
