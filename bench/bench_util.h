/* Small helpers the client-side bench tools share (mma-bench, mma-ab,
 * mma-pairs). */
#ifndef MMA_BENCH_UTIL_H
#define MMA_BENCH_UTIL_H

#include <stdlib.h>

#include "util.h"

/* "64M", "4K", "1G", "0.5M" or plain bytes. */
static inline size_t bench_parse_size(const char *s)
{
    char *e;
    double v = strtod(s, &e);
    size_t m = *e == 'K' || *e == 'k'   ? 1u << 10
               : *e == 'M' || *e == 'm' ? 1u << 20
               : *e == 'G' || *e == 'g' ? 1u << 30
                                        : 1;
    return (size_t)(v * (double)m);
}

/* The median of v[0..n) (the upper one of an even n), v sorted in place. */
static inline double bench_median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, mma_cmp_double);
    return n ? v[n / 2] : 0;
}

#endif
