/* Helpers for the integration tests: a private mmad child process, running
 * a tool and capturing its output, and a raw protocol client that speaks
 * proto/mma.proto directly (to send what libmma never would). */
#ifndef MMA_TEST_HARNESS_H
#define MMA_TEST_HARNESS_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "mma.pb-c.h"

/* One scratch directory per test run, holding every private daemon's
 * socket directory: made before the tests fork, removed with everything in
 * it after they ran, so even a test that failed half-way leaves nothing. */
void scratch_init(void);
void scratch_cleanup(void);
/* A fresh directory inside the scratch directory (static buffer). */
const char *scratch_mkdtemp(const char *prefix);

typedef struct mmad_proc {
    pid_t pid;
    char dir[64];   /* private directory holding the socket */
    char sock[108];
} mmad_proc_t;

/* Start `mmad --sim --socket=<tmpdir>/s.sock <extra...>` (extra is NULL
 * terminated, may be NULL) and wait until the socket accepts connections.
 * The child dies with its parent (PR_SET_PDEATHSIG), so a failed test never
 * leaves a daemon behind. Fails the test on error. */
void mmad_start(mmad_proc_t *d, const char *const *extra);
/* The same on a given socket path (its directory is the caller's). */
void mmad_start_at(mmad_proc_t *d, const char *sock, const char *const *extra);
/* mmad_start with mmad's stderr (its log) written to the file at `log`. */
void mmad_start_log(mmad_proc_t *d, const char *const *extra, const char *log);
/* SIGTERM, wait (bounded); returns the raw wait status, or -1 on timeout
 * (the daemon is then killed). Removes the private directory. */
int mmad_stop(mmad_proc_t *d);
/* mmad_stop + assert a clean exit (status 0) and the socket file removed. */
void mmad_stop_clean(mmad_proc_t *d);
/* Wait (bounded) for a daemon that was already sent SIGTERM, as mmad_stop
 * does, without signalling it again (a second SIGTERM while it shuts down
 * ends it at once); mmad_exit_clean asserts as mmad_stop_clean does. */
int mmad_wait_exit(mmad_proc_t *d, double timeout_s);
void mmad_exit_clean(mmad_proc_t *d);

/* Run argv[0] with args, capture stdout and stderr (NUL terminated, caller
 * frees). Returns the exit code, or 128+signal. */
int tool_run(const char *const *argv, char **out, char **err);

/* Seconds since an arbitrary start (CLOCK_MONOTONIC). */
double now_s(void);

/* Poll `cond(arg)` until it returns nonzero or `timeout_s` passes, with a
 * backoff from 1 ms to 50 ms. Returns the last value of cond. */
int wait_until(int (*cond)(void *), void *arg, double timeout_s);

/* ---- raw protocol client ---- */

/* A SOCK_SEQPACKET connection to mmad, or -1. */
int raw_connect(const char *sock);
/* Send one datagram of raw bytes. */
int raw_send_bytes(int fd, const void *buf, size_t len);
/* Send req (fds ride along) and receive one Response within timeout_s.
 * NULL on EOF/timeout/undecodable (then *eof says whether it was EOF). */
Mma__Response *raw_call(int fd, Mma__Request *req, const int *fds, int nfds, int *eof);
/* Receive one Response (after raw_send_bytes). */
Mma__Response *raw_recv(int fd, double timeout_s, int *eof);
/* Hello with a fresh memfd flag page of nslots (0: admin, no page).
 * *flags gets the mapping (munmap with nslots*64 bytes). Returns the
 * Response (caller frees). */
Mma__Response *raw_hello(int fd, uint32_t api_version, uint32_t nslots, void **flags);

/* raw_hello offering a submission ring of sq_entries (flagpage.h) after the
 * slots: *flags gets the mapping (munmap with raw_ring_page_len(nslots)). */
Mma__Response *raw_hello_ring(int fd, uint32_t nslots, uint32_t sq_entries, void **flags);
size_t raw_ring_page_len(uint32_t nslots);

/* A memfd of `size` bytes mapped here, sealed against shrinking as mmad
 * requires; *fd keeps the descriptor. */
void *memfd_map(size_t size, int *fd);
/* The same without the seal (mmad must refuse it). */
void *memfd_map_unsealed(size_t size, int *fd);

/* Count lines of /proc/<pid>/maps containing `needle`. */
int count_maps(pid_t pid, const char *needle);

/* xorshift64* */
static inline uint64_t rnd_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545F4914F6CDD1Dull;
}

void fill_random(void *p, size_t n, uint64_t seed);

/* Seed for randomised tests: $MMA_TEST_SEED, else from the clock; printed
 * so a failure can be replayed. */
uint64_t test_seed(const char *what);

#endif
