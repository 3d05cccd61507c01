#define _GNU_SOURCE
#include "harness.h"

#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "flagpage.h"
#include "mma.h"
#include "wire.h"

static char scratch[64];

void scratch_init(void)
{
    snprintf(scratch, sizeof scratch, "/tmp/mma-tests.XXXXXX");
    if (!mkdtemp(scratch)) {
        perror("mkdtemp");
        exit(1);
    }
}

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    remove(path); /* best effort: keep going */
    return 0;
}

void scratch_cleanup(void)
{
    if (scratch[0])
        nftw(scratch, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
}

const char *scratch_mkdtemp(const char *prefix)
{
    static char dir[96];
    snprintf(dir, sizeof dir, "%s/%s.XXXXXX", scratch[0] ? scratch : "/tmp", prefix);
    ck_assert_ptr_nonnull(mkdtemp(dir));
    return dir;
}

double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void sleep_s(double s)
{
    struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

int wait_until(int (*cond)(void *), void *arg, double timeout_s)
{
    double deadline = now_s() + timeout_s, step = 0.001;
    int v;
    while (!(v = cond(arg)) && now_s() < deadline) {
        sleep_s(step);
        if (step < 0.05)
            step *= 2;
    }
    return v;
}

int raw_connect(const char *sock)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(sock) >= sizeof a.sun_path)
        return -1;
    strcpy(a.sun_path, sock);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* ---- the daemon ---- */

typedef struct {
    mmad_proc_t *d;
    int exited;
    int status;
} start_wait_t;

/* The condition mmad_start waits for: the socket accepts a connection (or
 * the daemon died trying). */
static int daemon_ready(void *arg)
{
    start_wait_t *w = arg;
    if (waitpid(w->d->pid, &w->status, WNOHANG) == w->d->pid) {
        w->exited = 1;
        return 1;
    }
    int fd = raw_connect(w->d->sock);
    if (fd < 0)
        return 0;
    close(fd);
    return 1;
}

static const char *start_log; /* mmad_start_log's file for the next start */

void mmad_start(mmad_proc_t *d, const char *const *extra)
{
    mmad_start_at(d, NULL, extra);
}

void mmad_start_log(mmad_proc_t *d, const char *const *extra, const char *log)
{
    start_log = log;
    mmad_start_at(d, NULL, extra);
    start_log = NULL;
}

void mmad_start_at(mmad_proc_t *d, const char *sock, const char *const *extra)
{
    memset(d, 0, sizeof *d);
    if (sock) {
        snprintf(d->sock, sizeof d->sock, "%s", sock);
        snprintf(d->dir, sizeof d->dir, "%s", sock);
        char *slash = strrchr(d->dir, '/');
        ck_assert_ptr_nonnull(slash);
        *slash = 0;
    } else {
        const char *dir = scratch_mkdtemp("mmad");
        if (strlen(dir) >= sizeof d->dir)
            ck_abort_msg("scratch folder path too long: %s", dir);
        memcpy(d->dir, dir, strlen(dir) + 1);
        snprintf(d->sock, sizeof d->sock, "%s/s.sock", d->dir);
    }
    char sockarg[160];
    snprintf(sockarg, sizeof sockarg, "--socket=%s", d->sock);
    const char *argv[32] = {MMAD_PATH, "--sim", sockarg, "--log=warn"};
    int n = 4;
    for (int i = 0; extra && extra[i] && n < 31; i++)
        argv[n++] = extra[i];
    argv[n] = NULL;
    pid_t parent = getpid();
    fflush(stdout);
    fflush(stderr);
    d->pid = fork();
    ck_assert_int_ge(d->pid, 0);
    if (d->pid == 0) {
        /* Die with the test process, even when a failed assertion ends it
         * before its teardown could stop us. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        if (start_log) {
            int lf = open(start_log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
            if (lf < 0 || dup2(lf, STDERR_FILENO) < 0)
                _exit(127);
            close(lf);
        }
        execv(MMAD_PATH, (char *const *)argv);
        fprintf(stderr, "exec %s: %s\n", MMAD_PATH, strerror(errno));
        _exit(127);
    }
    start_wait_t w = {.d = d};
    int ready = wait_until(daemon_ready, &w, 20.0);
    if (w.exited)
        d->pid = 0;
    ck_assert_msg(!w.exited, "mmad exited during start-up (status 0x%x)", w.status);
    ck_assert_msg(ready, "mmad did not accept connections on %s within 20 s", d->sock);
}

typedef struct {
    pid_t pid;
    int status;
} reap_t;

static int reaped(void *arg)
{
    reap_t *r = arg;
    return waitpid(r->pid, &r->status, WNOHANG) == r->pid;
}

int mmad_wait_exit(mmad_proc_t *d, double timeout_s)
{
    if (d->pid <= 0)
        return -1;
    reap_t r = {.pid = d->pid};
    int ok = wait_until(reaped, &r, timeout_s);
    if (!ok) {
        kill(d->pid, SIGKILL);
        waitpid(d->pid, NULL, 0);
    }
    d->pid = 0;
    return ok ? r.status : -1;
}

int mmad_stop(mmad_proc_t *d)
{
    if (d->pid <= 0)
        return -1;
    kill(d->pid, SIGTERM);
    return mmad_wait_exit(d, 20.0);
}

/* A daemon's end as mmad_stop_clean wants it, from its wait status. */
static void check_clean_exit(mmad_proc_t *d, int st)
{
    struct stat sb;
    int sock_left = stat(d->sock, &sb) == 0;
    unlink(d->sock);
    rmdir(d->dir);
    ck_assert_msg(st != -1, "mmad did not exit within 20 s of SIGTERM");
    ck_assert_msg(WIFEXITED(st), "mmad was killed by signal %d", WIFSIGNALED(st) ? WTERMSIG(st) : 0);
    ck_assert_msg(WEXITSTATUS(st) == 0, "mmad exited with status %d", WEXITSTATUS(st));
    ck_assert_msg(!sock_left, "mmad left its socket file behind");
}

void mmad_stop_clean(mmad_proc_t *d)
{
    check_clean_exit(d, mmad_stop(d));
}

void mmad_exit_clean(mmad_proc_t *d)
{
    check_clean_exit(d, mmad_wait_exit(d, 20.0));
}

/* ---- tools ---- */

int tool_run(const char *const *argv, char **out, char **err)
{
    int po[2], pe[2];
    ck_assert_int_eq(pipe2(po, O_CLOEXEC), 0);
    ck_assert_int_eq(pipe2(pe, O_CLOEXEC), 0);
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        dup2(po[1], STDOUT_FILENO);
        dup2(pe[1], STDERR_FILENO);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    close(po[1]);
    close(pe[1]);
    /* Read both pipes until EOF, so neither can fill up and block the tool. */
    size_t cap[2] = {4096, 4096}, len[2] = {0, 0};
    char *buf[2] = {malloc(cap[0]), malloc(cap[1])};
    struct pollfd pf[2] = {{.fd = po[0], .events = POLLIN}, {.fd = pe[0], .events = POLLIN}};
    int open_fds = 2;
    while (open_fds > 0) {
        if (poll(pf, 2, 30000) <= 0) {
            kill(pid, SIGKILL); /* a tool silent for 30 s is hung */
            break;
        }
        for (int i = 0; i < 2; i++) {
            if (pf[i].fd < 0 || !(pf[i].revents & (POLLIN | POLLHUP | POLLERR)))
                continue;
            if (len[i] + 1024 > cap[i])
                buf[i] = realloc(buf[i], cap[i] *= 2);
            ssize_t n = read(pf[i].fd, buf[i] + len[i], cap[i] - len[i] - 1);
            if (n <= 0) {
                close(pf[i].fd);
                pf[i].fd = -1;
                open_fds--;
            } else {
                len[i] += (size_t)n;
            }
        }
    }
    for (int i = 0; i < 2; i++)
        if (pf[i].fd >= 0)
            close(pf[i].fd);
    buf[0][len[0]] = 0;
    buf[1][len[1]] = 0;
    int st;
    waitpid(pid, &st, 0);
    if (out)
        *out = buf[0];
    else
        free(buf[0]);
    if (err)
        *err = buf[1];
    else
        free(buf[1]);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

/* ---- raw protocol ---- */

int raw_send_bytes(int fd, const void *buf, size_t len)
{
    return send(fd, buf, len, MSG_NOSIGNAL) == (ssize_t)len ? 0 : -1;
}

Mma__Response *raw_recv(int fd, double timeout_s, int *eof)
{
    if (eof)
        *eof = 0;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    if (poll(&p, 1, (int)(timeout_s * 1000)) <= 0)
        return NULL;
    uint8_t *buf = malloc(MMA_WIRE_MAX_MSG);
    size_t len = 0;
    int fds[MMA_WIRE_MAX_FDS], nfds = 0;
    int rc = mma_wire_recv(fd, buf, MMA_WIRE_MAX_MSG, &len, fds, &nfds);
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    Mma__Response *r = NULL;
    if (rc == MMA_OK)
        r = mma__response__unpack(NULL, len, buf);
    else if (rc == MMA_ERR_DISCONNECTED && eof)
        *eof = 1;
    free(buf);
    return r;
}

Mma__Response *raw_call(int fd, Mma__Request *req, const int *fds, int nfds, int *eof)
{
    static uint64_t id = 1000;
    if (!req->has_id) {
        req->has_id = 1;
        req->id = ++id;
    }
    if (mma_wire_send(fd, &req->base, fds, nfds) != MMA_OK) {
        if (eof)
            *eof = 1;
        return NULL;
    }
    return raw_recv(fd, 10.0, eof);
}

static void *memfd_map_sealed(size_t size, int *fd, int sealed)
{
    *fd = memfd_create("mma-test", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    ck_assert_int_ge(*fd, 0);
    ck_assert_int_eq(ftruncate(*fd, (off_t)size), 0);
    if (sealed) /* as libmma does: mmad maps only memfds that cannot shrink */
        ck_assert_int_eq(fcntl(*fd, F_ADD_SEALS, F_SEAL_SHRINK), 0);
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, *fd, 0);
    ck_assert_ptr_ne(p, MAP_FAILED);
    return p;
}

void *memfd_map(size_t size, int *fd)
{
    return memfd_map_sealed(size, fd, 1);
}

void *memfd_map_unsealed(size_t size, int *fd)
{
    return memfd_map_sealed(size, fd, 0);
}

/* Hello with a flag page of nslots (0: none) and, with sq_entries, a
 * submission ring after the slots. */
static Mma__Response *hello_page(int fd, uint32_t api_version, uint32_t nslots, uint32_t sq_entries, void **flags)
{
    Mma__Hello h = MMA__HELLO__INIT;
    h.api_version = api_version;
    h.name = sq_entries ? "raw ring client" : "raw test client";
    int mfd = -1;
    if (nslots) {
        h.has_flag_slots = 1;
        h.flag_slots = nslots;
        h.has_sq_entries = sq_entries > 0;
        h.sq_entries = sq_entries;
        *flags = memfd_map(sq_entries ? raw_ring_page_len(nslots) : (size_t)nslots * sizeof(mma_flag_slot_t), &mfd);
    }
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__HELLO;
    req.hello = &h;
    Mma__Response *r = raw_call(fd, &req, &mfd, nslots ? 1 : 0, NULL);
    if (mfd >= 0)
        close(mfd);
    return r;
}

Mma__Response *raw_hello(int fd, uint32_t api_version, uint32_t nslots, void **flags)
{
    return hello_page(fd, api_version, nslots, 0, flags);
}

size_t raw_ring_page_len(uint32_t nslots)
{
    return (size_t)nslots * sizeof(mma_flag_slot_t) + sizeof(mma_sq_t);
}

Mma__Response *raw_hello_ring(int fd, uint32_t nslots, uint32_t sq_entries, void **flags)
{
    return hello_page(fd, MMA_API_VERSION, nslots, sq_entries, flags);
}

int count_maps(pid_t pid, const char *needle)
{
    char path[64], line[512];
    snprintf(path, sizeof path, "/proc/%d/maps", (int)pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    int n = 0;
    while (fgets(line, sizeof line, f))
        if (strstr(line, needle))
            n++;
    fclose(f);
    return n;
}

void fill_random(void *p, size_t n, uint64_t seed)
{
    uint64_t s = seed | 1;
    uint8_t *b = p;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint64_t v = rnd_next(&s);
        memcpy(b + i, &v, 8);
    }
    uint64_t v = rnd_next(&s);
    for (; i < n; i++, v >>= 8)
        b[i] = (uint8_t)v;
}

uint64_t test_seed(const char *what)
{
    const char *env = getenv("MMA_TEST_SEED");
    uint64_t seed = env ? strtoull(env, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    fprintf(stderr, "%s: seed %llu (replay with MMA_TEST_SEED=%llu)\n", what, (unsigned long long)seed,
            (unsigned long long)seed);
    return seed;
}
