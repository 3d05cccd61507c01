/* The socket side of mmad: a libuv loop serving SOCK_SEQPACKET clients,
 * one protobuf message per datagram, file descriptors as SCM_RIGHTS. */
#ifndef MMAD_SERVER_H
#define MMAD_SERVER_H

#include "backend.h"
#include "engine.h"

typedef struct mmad_server mmad_server_t;

/* Bind and listen on cfg->socket_path. A stale socket file is replaced; a
 * live daemon on it is an error. */
int mmad_server_create(const mmad_config_t *cfg, mmad_backend_t *be, mmad_engine_t *engine, mmad_server_t **out);
/* Run until SIGINT/SIGTERM (or mmad_server_shutdown); closes every client. */
int mmad_server_run(mmad_server_t *s);
void mmad_server_destroy(mmad_server_t *s);

#endif
