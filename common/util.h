#ifndef MMA_UTIL_H
#define MMA_UTIL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t mma_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The same clock in seconds and microseconds, for the bench tools' tables. */
static inline double mma_now_s(void)
{
    return (double)mma_now_ns() * 1e-9;
}

static inline double mma_now_us(void)
{
    return (double)mma_now_ns() * 1e-3;
}

/* qsort's order for doubles, ascending. */
static inline int mma_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static inline void mma_sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
    nanosleep(&ts, NULL);
}

/* One turn of a spin-wait: tell the core we are spinning (frees the
 * pipeline for a sibling hyperthread, saves power). __builtin_ia32_pause
 * exists on x86 only; an aarch64 build uses `yield`, anything else just
 * spins. */
static inline void mma_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ volatile("yield" ::: "memory");
#else
    __asm__ volatile("" ::: "memory");
#endif
}

/* A condition variable whose timed waits count on CLOCK_MONOTONIC (the
 * clock of mma_now_ns), and the deadline of such a wait `ns` from now. */
static inline void mma_cond_init_monotonic(pthread_cond_t *c)
{
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(c, &ca);
    pthread_condattr_destroy(&ca);
}

static inline struct timespec mma_deadline_ns(uint64_t ns)
{
    uint64_t t = mma_now_ns() + ns;
    struct timespec ts = {.tv_sec = (time_t)(t / 1000000000ull), .tv_nsec = (long)(t % 1000000000ull)};
    return ts;
}

/* Add a and b into *out; 1 on overflow. */
/* mma_wait's expected rate of one copy (bytes/ns = GB/s), per direction:
 * it sleeps until shortly before a copy should end, then spins, because a
 * sleeping thread's wake-up costs up to hundreds of µs on a VM. After a copy
 * of `bytes` that took `ns` from submission until its end was seen: seen
 * before the spin began (phase 0), the copy beat the estimate by an unknown
 * amount and it grows by a quarter; seen while spinning or after (phases 1,
 * 2), `ns` is its time and the estimate moves a quarter of the way there. */
#define MMA_EXPECT_MIN 5.0
#define MMA_EXPECT_MAX 1000.0
static inline double mma_expect_update(double rate, uint64_t bytes, uint64_t ns, int phase)
{
    double r = phase == 0 ? rate * 1.25 : ns ? 0.75 * rate + 0.25 * (double)bytes / (double)ns : rate;
    return r < MMA_EXPECT_MIN ? MMA_EXPECT_MIN : r > MMA_EXPECT_MAX ? MMA_EXPECT_MAX : r;
}

/* The estimate is kept per size class: copies under 16 MiB, under 32 MiB,
 * ... 4 GiB and more (a copy's fixed costs weigh more the smaller it is: on
 * 4x H200 8 MiB ran at ~80 GB/s and 1 GiB at ~165, so one rate for all sizes
 * had the waiter asleep when a large copy ended after small ones). */
#define MMA_EXPECT_CLASSES 10
static inline int mma_expect_class(uint64_t bytes)
{
    int k = 0;
    while (k < MMA_EXPECT_CLASSES - 1 && bytes >= (16ull << 20) << k)
        k++;
    return k;
}

/* The rate to expect in class k: its own once learned (non-zero), else the
 * fastest learned class's and at least `dflt`: a guess on the fast side
 * costs some spinning, one on the slow side a wake-up. */
static inline double mma_expect_pick(const double *rates, int k, double dflt)
{
    if (rates[k] > 0)
        return rates[k];
    double best = dflt;
    for (int i = 0; i < MMA_EXPECT_CLASSES; i++)
        if (rates[i] > best)
            best = rates[i];
    return best;
}

/* When mma_wait starts spinning for a copy of `bytes` submitted at `start`,
 * expected at `rate`: a tenth of its expected time early (at most 1 ms), so
 * that a copy a little faster than the estimate is still met spinning, and
 * 20 µs late for the request's fixed costs. */
static inline uint64_t mma_expect_due(uint64_t start, uint64_t bytes, double rate)
{
    double t = (double)bytes / (rate > 0 ? rate : MMA_EXPECT_MIN);
    double early = t / 10 < 1e6 ? t / 10 : 1e6;
    return start + (uint64_t)(t - early) + 20000;
}

static inline int mma_add_overflows(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_add_overflow(a, b, out);
}

#define MMA_VERSION_MAJOR 0
#define MMA_VERSION_MINOR 2
#define MMA_VERSION_PATCH 0
#define MMA_VERSION_NUM (MMA_VERSION_MAJOR * 10000 + MMA_VERSION_MINOR * 100 + MMA_VERSION_PATCH)
#define MMA_VERSION_STR "0.2.0"

/* user+sys CPU seconds in a /proc stat file: a thread's
 * (/proc/PID/task/TID/stat) or a whole process's (/proc/PID/stat, which
 * also holds threads that have ended), in clock ticks; its command name
 * into comm (when comm is not NULL); -1 where it cannot be read. */
static inline double mma_stat_cpu_s(const char *path, char *comm, size_t cap)
{
    char buf[1024];
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    /* pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
     * majflt cmajflt utime stime ...; comm may hold spaces */
    char *lp = strchr(buf, '('), *rp = strrchr(buf, ')');
    unsigned long ut, st;
    long hz = sysconf(_SC_CLK_TCK);
    if (!lp || !rp || rp < lp || hz <= 0 ||
        sscanf(rp + 1, " %*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &ut, &st) != 2)
        return -1;
    if (comm)
        snprintf(comm, cap, "%.*s", (int)(rp - lp - 1), lp + 1);
    return (double)(ut + st) / (double)hz;
}

#endif
