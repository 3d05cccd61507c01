#include "wire.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "mma.h"

int mma_wire_send(int sock, const ProtobufCMessage *msg, const int *fds, int nfds)
{
    if (nfds < 0 || nfds > MMA_WIRE_MAX_FDS)
        return MMA_ERR_INVAL;
    size_t len = protobuf_c_message_get_packed_size(msg);
    if (len > MMA_WIRE_MAX_MSG)
        return MMA_ERR_LIMIT;
    uint8_t stackbuf[4096];
    uint8_t *buf = len <= sizeof stackbuf ? stackbuf : malloc(len);
    if (!buf)
        return MMA_ERR_NOMEM;
    protobuf_c_message_pack(msg, buf);

    struct iovec iov = {.iov_base = buf, .iov_len = len};
    union {
        char raw[CMSG_SPACE(sizeof(int) * MMA_WIRE_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1};
    if (nfds > 0) {
        memset(&ctl, 0, sizeof ctl);
        mh.msg_control = ctl.raw;
        mh.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(cm), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t n;
    do
        n = sendmsg(sock, &mh, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    int saved = errno;
    if (buf != stackbuf)
        free(buf);
    if (n < 0) {
        if (saved == EPIPE || saved == ECONNRESET || saved == ENOTCONN)
            return MMA_ERR_DISCONNECTED;
        /* A datagram larger than the socket's send buffer allows (a Unix
         * socket refuses more than sk_sndbuf - 32 bytes): a limit of this
         * message, not a broken connection. */
        if (saved == EMSGSIZE)
            return MMA_ERR_LIMIT;
        MMA_DEBUG("sendmsg: %s", strerror(saved));
        return MMA_ERR_IO;
    }
    return (size_t)n == len ? MMA_OK : MMA_ERR_IO;
}

int mma_wire_recv(int sock, uint8_t *buf, size_t cap, size_t *len, int *fds, int *nfds)
{
    struct iovec iov = {.iov_base = buf, .iov_len = cap};
    union {
        char raw[CMSG_SPACE(sizeof(int) * MMA_WIRE_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.raw,
                        .msg_controllen = sizeof ctl.raw};
    *nfds = 0;
    ssize_t n;
    do
        n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            return MMA_PENDING;
        if (errno == ECONNRESET)
            return MMA_ERR_DISCONNECTED;
        return MMA_ERR_IO;
    }
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int cnt = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *in = (int *)CMSG_DATA(cm);
        for (int i = 0; i < cnt; i++) {
            if (*nfds < MMA_WIRE_MAX_FDS)
                fds[(*nfds)++] = in[i];
            else
                close(in[i]);
        }
    }
    if (n == 0 && *nfds == 0)
        return MMA_ERR_DISCONNECTED;
    if ((mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) {
        for (int i = 0; i < *nfds; i++)
            close(fds[i]);
        *nfds = 0;
        return MMA_ERR_PROTO;
    }
    *len = (size_t)n;
    return MMA_OK;
}

const char *mma_default_socket(void)
{
    const char *env = getenv("MMA_SOCKET");
    return env && *env ? env : "/run/mma/mmad.sock";
}
