/* Small helpers the client-side bench tools share (mma-bench, mma-ab,
 * mma-pairs). */
#ifndef MMA_BENCH_UTIL_H
#define MMA_BENCH_UTIL_H

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#include "util.h"

/* A size option of a tool: "64M", "4K", "1G", "0.5M" or plain bytes, from
 * lo to hi, into *out; otherwise a line on stderr that says what is wrong
 * (returns -1). */
static inline int bench_size_arg(const char *tool, const char *name, const char *s, size_t lo, size_t hi,
                                 size_t *out)
{
    char *e;
    double v = strtod(s, &e);
    double m = 1;
    if (*e == 'K' || *e == 'k')
        m = 1024.0, e++;
    else if (*e == 'M' || *e == 'm')
        m = 1024.0 * 1024, e++;
    else if (*e == 'G' || *e == 'g')
        m = 1024.0 * 1024 * 1024, e++;
    double b = v * m;
    if (e == s || *e || !(b >= (double)lo && b <= (double)hi)) {
        fprintf(stderr, "%s: %s %s: a size from %zu to %zu bytes (K, M, G allowed)\n", tool, name, s, lo, hi);
        return -1;
    }
    *out = (size_t)b;
    return 0;
}

/* A whole-number option of a tool, from lo to hi, into *out; otherwise a
 * line on stderr (returns -1). */
static inline int bench_int_arg(const char *tool, const char *name, const char *s, long lo, long hi, int *out)
{
    char *e;
    long v = strtol(s, &e, 10);
    if (e == s || *e || v < lo || v > hi) {
        fprintf(stderr, "%s: %s %s: a whole number from %ld to %ld\n", tool, name, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* A number option of a tool, from lo to hi, into *out; otherwise a line on
 * stderr (returns -1). */
static inline int bench_double_arg(const char *tool, const char *name, const char *s, double lo, double hi,
                                   double *out)
{
    char *e;
    double v = strtod(s, &e);
    if (e == s || *e || !(v >= lo && v <= hi)) {
        fprintf(stderr, "%s: %s %s: %g-%g\n", tool, name, s, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

/* The median of v[0..n) (the upper one of an even n), v sorted in place. */
static inline double bench_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, mma_cmp_double);
    return n ? v[n / 2] : 0;
}

/* mmad's pid, from the socket's peer credentials (SO_PEERCRED: the
 * includer defines _GNU_SOURCE), for its CPU use; -1 where it cannot tell. */
static inline pid_t bench_daemon_pid(const char *sock)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    snprintf(a.sun_path, sizeof a.sun_path, "%s", sock);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET, 0);
    pid_t pid = -1;
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) == 0) {
        struct ucred cr;
        socklen_t l = sizeof cr;
        if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cr, &l) == 0)
            pid = cr.pid;
    }
    if (fd >= 0)
        close(fd);
    return pid;
}

/* Nanoseconds on a CPU so far of all of process pid's threads (the first
 * field of each /proc/PID/task/TID/schedstat: no clock-tick rounding, so
 * a few milliseconds of copies can be measured); -1 where it cannot be read. */
static inline double bench_cpu_ns(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", (int)pid);
    DIR *d = pid > 0 ? opendir(path) : NULL;
    if (!d)
        return -1;
    double sum = 0;
    int any = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        if (e->d_name[0] == '.')
            continue;
        char p2[300];
        snprintf(p2, sizeof p2, "/proc/%d/task/%s/schedstat", (int)pid, e->d_name);
        FILE *f = fopen(p2, "r");
        unsigned long long run = 0;
        if (f && fscanf(f, "%llu", &run) == 1) {
            sum += (double)run;
            any = 1;
        }
        if (f)
            fclose(f);
    }
    closedir(d);
    return any ? sum : -1;
}

/* Seconds of user+sys CPU time so far of process pid, all threads, ended
 * ones too (/proc/PID/stat, in clock ticks: what issue 4's CPU target
 * names; right over a second or more, too coarse for a few milliseconds,
 * where bench_cpu_ns serves); -1 where it cannot be read. */
static inline double bench_cpu_user_sys_s(pid_t pid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    return pid > 0 ? mma_stat_cpu_s(path, NULL, 0) : -1;
}

#endif
