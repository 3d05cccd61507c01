/* One protobuf message per SOCK_SEQPACKET datagram, with up to
 * MMA_WIRE_MAX_FDS file descriptors as SCM_RIGHTS. Used by libmma, mmactl
 * and mmad alike. */
#ifndef MMA_WIRE_H
#define MMA_WIRE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "mma.pb-c.h"

#define MMA_WIRE_MAX_MSG (1u << 20) /* a datagram larger than this is refused */
#define MMA_WIRE_MAX_FDS 4

/* Send one message; fds (nfds of them) ride along. Returns an mma status:
 * MMA_ERR_LIMIT for a message larger than MMA_WIRE_MAX_MSG or than the
 * socket's send buffer takes (the connection is fine), MMA_ERR_DISCONNECTED
 * when the peer is gone. */
int mma_wire_send(int sock, const ProtobufCMessage *msg, const int *fds, int nfds);

/* Receive one datagram into buf (cap bytes). *len gets its size; received
 * fds are stored in fds (cap MMA_WIRE_MAX_FDS) and counted in *nfds; the
 * caller owns them. Returns MMA_OK, MMA_ERR_DISCONNECTED on orderly EOF,
 * MMA_PENDING when a non-blocking socket has nothing, or an error. A
 * truncated datagram is an error (MMA_ERR_PROTO) and its fds are closed. */
int mma_wire_recv(int sock, uint8_t *buf, size_t cap, size_t *len, int *fds, int *nfds);

/* Default socket path: $MMA_SOCKET, else /run/mma/mmad.sock. */
const char *mma_default_socket(void);

#endif
