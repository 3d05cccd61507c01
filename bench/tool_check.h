/* The client-side tools (mma-bench, mma-demo, mma-ab): a libmma call that
 * fails ends the run, naming the tool (TOOL_NAME, defined before this is
 * included), the call and the error. */
#ifndef MMA_BENCH_TOOL_CHECK_H
#define MMA_BENCH_TOOL_CHECK_H

#include <stdio.h>
#include <stdlib.h>

#include "mma.h"

#ifndef TOOL_NAME
#error "define TOOL_NAME (the tool's name in its error messages) before including tool_check.h"
#endif

#define MK(call)                                                                      \
    do {                                                                              \
        int r_ = (call);                                                              \
        if (r_ != MMA_OK) {                                                           \
            fprintf(stderr, TOOL_NAME ": %s: %s\n", #call, mma_strerror(r_));         \
            exit(1);                                                                  \
        }                                                                             \
    } while (0)

#endif
