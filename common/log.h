/* One-line logging shared by mmad, libmma and the tools. The function that
 * first detects an error logs it; callers just return the status. */
#ifndef MMA_LOG_H
#define MMA_LOG_H

enum { MMA_LOG_ERROR = 0, MMA_LOG_WARN = 1, MMA_LOG_INFO = 2, MMA_LOG_DEBUG = 3 };

/* Level from $MMA_LOG (error|warn|info|debug), default given by the program;
 * a $MMA_LOG that is no level is said so on stderr, here. */
void mma_log_init(const char *prog, int default_level);
/* A fixed level; $MMA_LOG is not read (mmad: its --log alone). */
void mma_log_set(const char *prog, int level);
int mma_log_enabled(int level);
void mma_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define MMA_ERROR(...) mma_log(MMA_LOG_ERROR, __VA_ARGS__)
#define MMA_WARN(...) mma_log(MMA_LOG_WARN, __VA_ARGS__)
#define MMA_INFO(...) mma_log(MMA_LOG_INFO, __VA_ARGS__)
#define MMA_DEBUG(...)                          \
    do {                                        \
        if (mma_log_enabled(MMA_LOG_DEBUG))     \
            mma_log(MMA_LOG_DEBUG, __VA_ARGS__); \
    } while (0)

#endif
