#include "log.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

static const char *log_prog = "mma";
static int log_level = -1;
static int log_default = MMA_LOG_WARN;

static const char *const level_names[] = {"error", "warn", "info", "debug"};

static int parse_level(const char *s)
{
    for (int i = 0; i < 4; i++)
        if (strcasecmp(s, level_names[i]) == 0)
            return i;
    return -1;
}

void mma_log_init(const char *prog, int default_level)
{
    log_prog = prog;
    log_default = default_level;
    log_level = -1;
    (void)mma_log_enabled(MMA_LOG_ERROR); /* read $MMA_LOG now, and say if it is no level */
}

void mma_log_set(const char *prog, int level)
{
    log_prog = prog;
    log_level = level;
}

int mma_log_enabled(int level)
{
    if (log_level < 0) {
        const char *env = getenv("MMA_LOG");
        int l = env && *env ? parse_level(env) : -1;
        log_level = l >= 0 ? l : log_default;
        if (env && *env && l < 0) /* a misspelt level would otherwise be ignored, silently */
            fprintf(stderr, "%s: MMA_LOG=%s is not a level (error, warn, info, debug); logging at %s\n",
                    log_prog, env, level_names[log_level]);
    }
    return level <= log_level;
}

void mma_log(int level, const char *fmt, ...)
{
    if (!mma_log_enabled(level))
        return;
    char line[1024];
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%02d:%02d:%02d.%03ld %s[%d] %s: ", tm.tm_hour, tm.tm_min,
                     tm.tm_sec, ts.tv_nsec / 1000000, log_prog, (int)getpid(), level_names[level]);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    /* One write per line so lines from several processes do not interleave. */
    size_t len = strnlen(line, sizeof line - 2);
    line[len++] = '\n';
    ssize_t w = write(STDERR_FILENO, line, len);
    (void)w;
}
