/* Finding libmma's socket in this process, for the integration and GPU
 * tests that act on it behind libmma's back. */
#ifndef MMA_TESTS_SOCKET_FD_H
#define MMA_TESTS_SOCKET_FD_H

#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

/* This process's one connection to the socket at `path` (libmma keeps its
 * descriptor to itself), found by the address it is connected to; -1
 * unless exactly one is open. */
static inline int client_socket_fd(const char *path)
{
    int found = -1, n = 0;
    for (int fd = 0; fd < 1024; fd++) {
        struct sockaddr_un a;
        socklen_t len = sizeof a;
        memset(&a, 0, sizeof a);
        if (getpeername(fd, (struct sockaddr *)&a, &len) == 0 && a.sun_family == AF_UNIX &&
            strncmp(a.sun_path, path, sizeof a.sun_path) == 0) {
            found = fd;
            n++;
        }
    }
    return n == 1 ? found : -1;
}

#endif
