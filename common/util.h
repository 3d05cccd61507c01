#ifndef MMA_UTIL_H
#define MMA_UTIL_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

static inline uint64_t mma_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void mma_sleep_ns(uint64_t ns)
{
    struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000ull), .tv_nsec = (long)(ns % 1000000000ull)};
    nanosleep(&ts, NULL);
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
static inline int mma_add_overflows(uint64_t a, uint64_t b, uint64_t *out)
{
    return __builtin_add_overflow(a, b, out);
}

#define MMA_VERSION_MAJOR 0
#define MMA_VERSION_MINOR 1
#define MMA_VERSION_PATCH 0
#define MMA_VERSION_NUM (MMA_VERSION_MAJOR * 10000 + MMA_VERSION_MINOR * 100 + MMA_VERSION_PATCH)
#define MMA_VERSION_STR "0.1.0"

#endif
