/* mmactl: ask mmad how it is doing.
 *   mmactl [--socket PATH] [--json] status|paths|clients
 * Plain output is INFO-style (`# Section`, then `key:value` lines): easy to
 * read, grep and diff. --json prints one JSON object. */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "mma.h"
#include "util.h"
#include "wire.h"

static void usage(FILE *f)
{
    fprintf(f, "usage: mmactl [--socket PATH] [--json] status|paths|clients\n"
               "  status   daemon version, backend, GPUs, totals, CPU used\n"
               "  paths    per path (target GPU, via GPU, direction): bytes, chunks, GB/s, queue depth,\n"
               "           state (on, off, yield), the smoothed rate of its recent chunks and how many\n"
               "           relay chunks a copy kernel on the via GPU moved in one hop (one_hop)\n"
               "  clients  connected processes: pid, uid, regions, copies in flight, copies taken from the submission ring\n"
               "  --socket PATH  default $MMA_SOCKET, else /run/mma/mmad.sock\n");
}

static int connect_to(const char *path)
{
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof a.sun_path)
        return -1;
    strcpy(a.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
        close(fd);
        fd = -1;
    }
    return fd;
}

static Mma__Response *call(int fd, Mma__Request *req, uint8_t *buf)
{
    static uint64_t id;
    req->has_id = 1;
    req->id = ++id;
    if (mma_wire_send(fd, &req->base, NULL, 0) != MMA_OK)
        return NULL;
    size_t len;
    int fds[MMA_WIRE_MAX_FDS], nfds;
    if (mma_wire_recv(fd, buf, MMA_WIRE_MAX_MSG, &len, fds, &nfds) != MMA_OK)
        return NULL;
    for (int i = 0; i < nfds; i++)
        close(fds[i]);
    return mma__response__unpack(NULL, len, buf);
}

static const char *dir_name(uint32_t d)
{
    return d == 0 ? "h2d" : "d2h";
}

static double gbps(uint64_t bytes, uint64_t ns)
{
    return ns ? (double)bytes / (double)ns : 0.0;
}

static void print_status(const Mma__StatusReply *s, int json)
{
    unsigned v = s->daemon_version;
    double cpu_s = (double)(s->cpu_user_us + s->cpu_sys_us) / 1e6;
    if (json) {
        printf("{\"version\":\"%u.%u.%u\",\"pid\":%u,\"backend\":\"%s\",\"simulated\":%s,\"topology\":\"%s\","
               "\"uptime_ms\":%llu,\"clients\":%u,\"copies_done\":%llu,\"bytes_done\":%llu,"
               "\"chunk_size\":%llu,\"staging_slots\":%u,\"bypass_threshold\":%llu,\"sim_scale\":%g,"
               "\"cpu_user_us\":%llu,\"cpu_sys_us\":%llu,\"chunks_submitted\":%llu,\"submit_ns\":%llu,"
               "\"polls\":%llu,\"poll_ns\":%llu,\"relay_kernel_launches\":%llu,\"gpus\":[",
               v / 10000, v / 100 % 100, v % 100, s->pid, s->backend, s->simulated ? "true" : "false",
               s->topology ? s->topology : "", (unsigned long long)s->uptime_ms, s->clients,
               (unsigned long long)s->jobs_done, (unsigned long long)s->bytes_done,
               (unsigned long long)s->chunk_size, s->staging_slots, (unsigned long long)s->bypass_threshold,
               s->has_sim_scale ? s->sim_scale : 1.0, (unsigned long long)s->cpu_user_us,
               (unsigned long long)s->cpu_sys_us, (unsigned long long)s->submit_calls,
               (unsigned long long)s->submit_ns, (unsigned long long)s->poll_calls, (unsigned long long)s->poll_ns,
               (unsigned long long)s->relay_kernel_launches);
        for (size_t i = 0; i < s->n_gpus; i++)
            printf("%s{\"index\":%u,\"name\":\"%s\",\"pci_bus_id\":\"%s\",\"numa_node\":%d,\"memory\":%llu,"
                   "\"one_hop\":%s}",
                   i ? "," : "", s->gpus[i]->index, s->gpus[i]->name ? s->gpus[i]->name : "",
                   s->gpus[i]->pci_bus_id ? s->gpus[i]->pci_bus_id : "", s->gpus[i]->numa_node,
                   (unsigned long long)s->gpus[i]->memory, s->gpus[i]->one_hop ? "true" : "false");
        printf("]}\n");
        return;
    }
    printf("# Server\nversion:%u.%u.%u\npid:%u\nuptime_ms:%llu\nbackend:%s\nsimulated:%s\n", v / 10000,
           v / 100 % 100, v % 100, s->pid, (unsigned long long)s->uptime_ms, s->backend,
           s->simulated ? "yes" : "no");
    if (s->simulated)
        printf("sim_scale:%g\n", s->sim_scale);
    printf("topology:%s\n", s->topology ? s->topology : "");
    printf("\n# Config\nchunk_size:%llu\nstaging_slots:%u\n", (unsigned long long)s->chunk_size, s->staging_slots);
    if (s->bypass_threshold == UINT64_MAX)
        printf("bypass_threshold:all (no copy can relay: libmma runs every copy natively)\n");
    else
        printf("bypass_threshold:%llu\n", (unsigned long long)s->bypass_threshold);
    printf("\n# Stats\nclients:%u\ncopies_done:%llu\nbytes_done:%llu\ncpu_seconds:%.3f\n", s->clients,
           (unsigned long long)s->jobs_done, (unsigned long long)s->bytes_done, cpu_s);
    printf("\n# Engine\nchunks_submitted:%llu\nsubmit_us_per_chunk:%.2f\npolls:%llu\npoll_us_per_call:%.2f\n"
           "relay_kernel_launches:%llu\n",
           (unsigned long long)s->submit_calls, s->submit_calls ? (double)s->submit_ns / 1e3 / (double)s->submit_calls : 0.0,
           (unsigned long long)s->poll_calls, s->poll_calls ? (double)s->poll_ns / 1e3 / (double)s->poll_calls : 0.0,
           (unsigned long long)s->relay_kernel_launches);
    printf("\n# GPUs\ngpus:%zu\n", s->n_gpus);
    for (size_t i = 0; i < s->n_gpus; i++)
        printf("gpu%u:name=%s,pci=%s,numa=%d,memory=%llu,one_hop=%s\n", s->gpus[i]->index,
               s->gpus[i]->name ? s->gpus[i]->name : "", s->gpus[i]->pci_bus_id ? s->gpus[i]->pci_bus_id : "",
               s->gpus[i]->numa_node, (unsigned long long)s->gpus[i]->memory, s->gpus[i]->one_hop ? "yes" : "no");
}

static void print_paths(const Mma__PathsReply *p, int json)
{
    if (json)
        printf("{\"paths\":[");
    else
        printf("# Paths\n");
    for (size_t i = 0; i < p->n_paths; i++) {
        const Mma__PathStat *s = p->paths[i];
        const char *kind = s->target == s->via ? "direct" : "relay";
        if (json) {
            printf("%s{\"target\":%u,\"via\":%u,\"kind\":\"%s\",\"dir\":\"%s\",\"bytes\":%llu,\"chunks\":%llu,"
                   "\"one_hop_chunks\":%llu,\"active_ns\":%llu,\"gbps\":%.3f,\"inflight\":%u,\"depth\":%u,"
                   "\"enabled\":%s,\"yielding\":%s,"
                   "\"rate_gbps\":%.3f,\"note\":\"%s\"}",
                   i ? "," : "", s->target, s->via, kind, dir_name(s->dir), (unsigned long long)s->bytes,
                   (unsigned long long)s->chunks, (unsigned long long)s->one_hop_chunks,
                   (unsigned long long)s->active_ns, gbps(s->bytes, s->active_ns), s->inflight, s->depth,
                   s->enabled ? "true" : "false", s->yielding ? "true" : "false", s->rate_gbps, s->note ? s->note : "");
            continue;
        }
        if (s->target == s->via)
            printf("gpu%u.%s.direct:", s->target, dir_name(s->dir));
        else
            printf("gpu%u.%s.via_gpu%u:", s->target, dir_name(s->dir), s->via);
        /* state: on, off (set aside; the note says why) or yield (a relay
         * on a busy link: only probes go until one runs fast again) */
        printf("bytes=%llu,chunks=%llu,gbps=%.3f,inflight=%u,depth=%u,state=%s,rate=%.3f",
               (unsigned long long)s->bytes, (unsigned long long)s->chunks, gbps(s->bytes, s->active_ns), s->inflight,
               s->depth, !s->enabled ? "off" : s->yielding ? "yield" : "on", s->rate_gbps);
        if (s->one_hop_chunks)
            printf(",one_hop=%llu", (unsigned long long)s->one_hop_chunks);
        if (s->note && *s->note)
            printf(",note=%s", s->note);
        printf("\n");
    }
    if (json)
        printf("]}\n");
}

static void print_clients(const Mma__ClientsReply *c, int json)
{
    if (json)
        printf("{\"clients\":[");
    else
        printf("# Clients\nclients:%zu\n", c->n_clients);
    for (size_t i = 0; i < c->n_clients; i++) {
        const Mma__ClientInfo *k = c->clients[i];
        if (json)
            printf("%s{\"id\":%u,\"pid\":%d,\"uid\":%u,\"name\":\"%s\",\"regions\":%u,\"region_bytes\":%llu,"
                   "\"inflight\":%u,\"copies\":%llu,\"bytes\":%llu,\"ring_copies\":%llu}",
                   i ? "," : "", k->id, k->pid, k->uid, k->name ? k->name : "", k->regions,
                   (unsigned long long)k->region_bytes, k->inflight, (unsigned long long)k->copies,
                   (unsigned long long)k->bytes, (unsigned long long)k->ring_copies);
        else
            printf("client%u:pid=%d,uid=%u,regions=%u,region_bytes=%llu,inflight=%u,copies=%llu,bytes=%llu,"
                   "ring_copies=%llu\n",
                   k->id, k->pid, k->uid, k->regions, (unsigned long long)k->region_bytes, k->inflight,
                   (unsigned long long)k->copies, (unsigned long long)k->bytes, (unsigned long long)k->ring_copies);
    }
    if (json)
        printf("]}\n");
}

int main(int argc, char **argv)
{
    const char *sock = NULL;
    int json = 0;
    static const struct option lo[] = {
        {"socket", required_argument, 0, 's'}, {"json", no_argument, 0, 'j'}, {"help", no_argument, 0, 'h'}, {0}};
    int o;
    while ((o = getopt_long(argc, argv, "s:jh", lo, NULL)) != -1) {
        switch (o) {
        case 's': sock = optarg; break;
        case 'j': json = 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind != argc - 1) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[optind];
    Mma__ReqType type;
    if (!strcmp(cmd, "status"))
        type = MMA__REQ_TYPE__STATUS;
    else if (!strcmp(cmd, "paths"))
        type = MMA__REQ_TYPE__PATHS;
    else if (!strcmp(cmd, "clients"))
        type = MMA__REQ_TYPE__CLIENTS;
    else {
        fprintf(stderr, "mmactl: unknown command '%s'\n", cmd);
        usage(stderr);
        return 2;
    }
    if (!sock)
        sock = mma_default_socket();
    int fd = connect_to(sock);
    if (fd < 0) {
        fprintf(stderr, "mmactl: cannot connect to %s: is mmad running? (%s)\n", sock,
                mma_strerror(MMA_ERR_CONNECT));
        return 1;
    }
    uint8_t *buf = malloc(MMA_WIRE_MAX_MSG);
    int rc = 1;
    Mma__Hello h = MMA__HELLO__INIT;
    h.api_version = MMA_API_VERSION;
    h.name = "mmactl";
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__HELLO;
    req.hello = &h;
    Mma__Response *resp = buf ? call(fd, &req, buf) : NULL;
    if (!resp || resp->status != MMA_OK) {
        fprintf(stderr, "mmactl: handshake failed: %s\n",
                resp && resp->error ? resp->error : mma_strerror(resp ? resp->status : MMA_ERR_IO));
        goto out;
    }
    mma__response__free_unpacked(resp, NULL);
    Mma__Request q = MMA__REQUEST__INIT;
    q.type = type;
    resp = call(fd, &q, buf);
    if (!resp || resp->status != MMA_OK) {
        fprintf(stderr, "mmactl: %s failed: %s\n", cmd,
                resp && resp->error ? resp->error : mma_strerror(resp ? resp->status : MMA_ERR_IO));
        goto out;
    }
    if (type == MMA__REQ_TYPE__STATUS && resp->status_reply)
        print_status(resp->status_reply, json);
    else if (type == MMA__REQ_TYPE__PATHS && resp->paths)
        print_paths(resp->paths, json);
    else if (type == MMA__REQ_TYPE__CLIENTS && resp->clients)
        print_clients(resp->clients, json);
    else
        goto out;
    rc = 0;
out:
    if (resp)
        mma__response__free_unpacked(resp, NULL);
    free(buf);
    close(fd);
    return rc;
}
