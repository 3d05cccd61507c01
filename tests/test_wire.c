/* The wire layer (common/wire.c) over a real SOCK_SEQPACKET socketpair, and
 * the protobuf messages of proto/mma.proto packed and unpacked field by field.
 * Every message mmad, libmma and mmactl exchange goes through these. */
#define _GNU_SOURCE
#include <check.h>
#include <dirent.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include "flagpage.h"
#include "mma.h"
#include "util.h"
#include "wire.h"

#define RXCAP 65536

static int sv[2];
static uint8_t *rx;

static void setup(void)
{
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv), 0);
    rx = malloc(RXCAP);
    ck_assert_ptr_nonnull(rx);
}

static void teardown(void)
{
    if (sv[0] >= 0)
        close(sv[0]);
    if (sv[1] >= 0)
        close(sv[1]);
    free(rx);
}

/* Open descriptors of this process: lets a test prove that fds the wire
 * layer says it closed really are closed. */
static int count_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    ck_assert_ptr_nonnull(d);
    int n = 0;
    for (struct dirent *e; (e = readdir(d));)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1; /* the DIR's own fd */
}

static int make_memfd(const char *content)
{
    int fd = memfd_create("wire-test", MFD_CLOEXEC);
    ck_assert_int_ge(fd, 0);
    size_t n = strlen(content);
    ck_assert_int_eq(pwrite(fd, content, n, 0), (ssize_t)n);
    return fd;
}

/* Send req on sv[0], receive on sv[1], unpack. */
static Mma__Request *roundtrip(Mma__Request *req)
{
    ck_assert_int_eq(mma_wire_send(sv[0], &req->base, NULL, 0), MMA_OK);
    size_t len = 0;
    int fds[MMA_WIRE_MAX_FDS], nfds = -1;
    ck_assert_int_eq(mma_wire_recv(sv[1], rx, RXCAP, &len, fds, &nfds), MMA_OK);
    ck_assert_int_eq(nfds, 0);
    ck_assert_uint_eq(len, mma__request__get_packed_size(req));
    Mma__Request *out = mma__request__unpack(NULL, len, rx);
    ck_assert_ptr_nonnull(out);
    ck_assert_int_eq(out->type, req->type);
    ck_assert_int_eq(out->has_id, 1);
    ck_assert_uint_eq(out->id, req->id);
    return out;
}

/* ---- framing ---- */

START_TEST(request_roundtrip_each_submessage)
{
    Mma__Hello h = MMA__HELLO__INIT;
    h.api_version = MMA_API_VERSION;
    h.has_features = 1;
    h.features = 0x5;
    h.has_flag_slots = 1;
    h.flag_slots = 1024;
    h.name = "wire test";
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__HELLO;
    req.has_id = 1;
    req.id = 1;
    req.hello = &h;
    Mma__Request *r = roundtrip(&req);
    ck_assert_ptr_nonnull(r->hello);
    ck_assert_uint_eq(r->hello->api_version, MMA_API_VERSION);
    ck_assert(r->hello->has_features && r->hello->features == 0x5);
    ck_assert(r->hello->has_flag_slots && r->hello->flag_slots == 1024);
    ck_assert_str_eq(r->hello->name, "wire test");
    ck_assert_ptr_null(r->copy);
    mma__request__free_unpacked(r, NULL);

    Mma__RegisterHost rh = MMA__REGISTER_HOST__INIT;
    rh.size = (1ull << 40) + 3;
    req = (Mma__Request)MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__REGISTER_HOST;
    req.has_id = 1;
    req.id = 2;
    req.register_host = &rh;
    r = roundtrip(&req);
    ck_assert_ptr_nonnull(r->register_host);
    ck_assert_uint_eq(r->register_host->size, (1ull << 40) + 3);
    mma__request__free_unpacked(r, NULL);

    uint8_t handle[64];
    for (int i = 0; i < 64; i++)
        handle[i] = (uint8_t)(i * 7 + 1);
    Mma__RegisterDevice rd = MMA__REGISTER_DEVICE__INIT;
    rd.gpu = 3;
    rd.size = 123456789;
    rd.has_ipc_handle = 1;
    rd.ipc_handle.data = handle;
    rd.ipc_handle.len = sizeof handle;
    rd.has_ipc_offset = 1;
    rd.ipc_offset = 4096;
    req = (Mma__Request)MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__REGISTER_DEVICE;
    req.has_id = 1;
    req.id = 3;
    req.register_device = &rd;
    r = roundtrip(&req);
    ck_assert_ptr_nonnull(r->register_device);
    ck_assert_uint_eq(r->register_device->gpu, 3);
    ck_assert_uint_eq(r->register_device->size, 123456789);
    ck_assert(r->register_device->has_ipc_handle);
    ck_assert_uint_eq(r->register_device->ipc_handle.len, 64);
    ck_assert_mem_eq(r->register_device->ipc_handle.data, handle, 64);
    ck_assert(r->register_device->has_ipc_offset && r->register_device->ipc_offset == 4096);
    mma__request__free_unpacked(r, NULL);

    Mma__Unregister u = MMA__UNREGISTER__INIT;
    u.region_id = 77;
    req = (Mma__Request)MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__UNREGISTER;
    req.has_id = 1;
    req.id = 4;
    req.unregister = &u;
    r = roundtrip(&req);
    ck_assert_ptr_nonnull(r->unregister);
    ck_assert_uint_eq(r->unregister->region_id, 77);
    mma__request__free_unpacked(r, NULL);

    /* A scatter-gather copy with many segments (a few KiB on the wire). */
    enum { NSEG = 300 };
    Mma__Segment seg[NSEG], *segp[NSEG];
    for (int i = 0; i < NSEG; i++) {
        mma__segment__init(&seg[i]);
        seg[i].dst_region = (uint32_t)i + 1;
        seg[i].dst_offset = (uint64_t)i * 4097;
        seg[i].src_region = (uint32_t)i + 1000;
        seg[i].src_offset = UINT64_MAX - (uint64_t)i;
        seg[i].length = (uint64_t)i + 1;
        segp[i] = &seg[i];
    }
    Mma__Copy cp = MMA__COPY__INIT;
    cp.slot = 1023;
    cp.seq = (1ull << 48) - 1;
    cp.n_segments = NSEG;
    cp.segments = segp;
    cp.has_priority = 1;
    cp.priority = 1;
    cp.has_max_paths = 1;
    cp.max_paths = 2;
    req = (Mma__Request)MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__COPY;
    req.has_id = 1;
    req.id = 5;
    req.copy = &cp;
    r = roundtrip(&req);
    ck_assert_ptr_nonnull(r->copy);
    ck_assert_uint_eq(r->copy->slot, 1023);
    ck_assert_uint_eq(r->copy->seq, (1ull << 48) - 1);
    ck_assert(r->copy->has_priority && r->copy->priority == 1);
    ck_assert(r->copy->has_max_paths && r->copy->max_paths == 2);
    ck_assert_uint_eq(r->copy->n_segments, NSEG);
    for (int i = 0; i < NSEG; i++) {
        const Mma__Segment *s = r->copy->segments[i];
        ck_assert_uint_eq(s->dst_region, (uint32_t)i + 1);
        ck_assert_uint_eq(s->dst_offset, (uint64_t)i * 4097);
        ck_assert_uint_eq(s->src_region, (uint32_t)i + 1000);
        ck_assert_uint_eq(s->src_offset, UINT64_MAX - (uint64_t)i);
        ck_assert_uint_eq(s->length, (uint64_t)i + 1);
    }
    mma__request__free_unpacked(r, NULL);
}
END_TEST

START_TEST(fds_arrive_usable)
{
    int base = count_fds();
    int fds[MMA_WIRE_MAX_FDS];
    char text[32];
    for (int i = 0; i < MMA_WIRE_MAX_FDS; i++) {
        snprintf(text, sizeof text, "memfd number %d", i);
        fds[i] = make_memfd(text);
        ck_assert_int_eq(ftruncate(fds[i], 4096), 0);
    }
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__REGISTER_HOST;
    ck_assert_int_eq(mma_wire_send(sv[0], &req.base, fds, MMA_WIRE_MAX_FDS), MMA_OK);
    size_t len;
    int got[MMA_WIRE_MAX_FDS], ngot = 0;
    ck_assert_int_eq(mma_wire_recv(sv[1], rx, RXCAP, &len, got, &ngot), MMA_OK);
    ck_assert_int_eq(ngot, MMA_WIRE_MAX_FDS);
    for (int i = 0; i < ngot; i++) {
        /* A fresh descriptor for the same file: what one side wrote, the
         * other reads, through read() and through a shared mapping. */
        ck_assert_int_ne(got[i], fds[i]);
        char buf[32] = {0};
        snprintf(text, sizeof text, "memfd number %d", i);
        ck_assert_int_eq(pread(got[i], buf, strlen(text), 0), (ssize_t)strlen(text));
        ck_assert_str_eq(buf, text);
        ck_assert_int_ne(fcntl(got[i], F_GETFD) & FD_CLOEXEC, 0); /* MSG_CMSG_CLOEXEC */
        char *m = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, got[i], 0);
        ck_assert_ptr_ne(m, MAP_FAILED);
        m[100] = (char)('A' + i);
        char c = 0;
        ck_assert_int_eq(pread(fds[i], &c, 1, 100), 1);
        ck_assert_int_eq(c, 'A' + i);
        munmap(m, 4096);
        close(got[i]);
        close(fds[i]);
    }
    ck_assert_int_eq(count_fds(), base);
}
END_TEST

START_TEST(too_many_fds_refused_by_sender)
{
    int fds[MMA_WIRE_MAX_FDS + 1];
    for (int i = 0; i <= MMA_WIRE_MAX_FDS; i++)
        fds[i] = 0;
    Mma__Request req = MMA__REQUEST__INIT;
    ck_assert_int_eq(mma_wire_send(sv[0], &req.base, fds, MMA_WIRE_MAX_FDS + 1), MMA_ERR_INVAL);
    ck_assert_int_eq(mma_wire_send(sv[0], &req.base, fds, -1), MMA_ERR_INVAL);
}
END_TEST

/* A peer that is not libmma may attach more fds than the protocol allows:
 * the receiver keeps MMA_WIRE_MAX_FDS and closes the rest (no fd leak in
 * the daemon). */
START_TEST(extra_fds_closed_by_receiver)
{
    enum { N = MMA_WIRE_MAX_FDS + 2 };
    int base = count_fds();
    int fds[N];
    for (int i = 0; i < N; i++)
        fds[i] = make_memfd("x");
    char payload = 0x08; /* field 1 varint: type = 0 */
    struct iovec iov = {.iov_base = &payload, .iov_len = 1};
    union {
        char raw[CMSG_SPACE(sizeof(int) * N)];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl.raw, .msg_controllen = sizeof ctl.raw};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * N);
    memcpy(CMSG_DATA(cm), fds, sizeof fds);
    ck_assert_int_eq(sendmsg(sv[0], &mh, 0), 1);
    for (int i = 0; i < N; i++)
        close(fds[i]);
    size_t len;
    int got[MMA_WIRE_MAX_FDS], ngot = 0;
    int rc = mma_wire_recv(sv[1], rx, RXCAP, &len, got, &ngot);
    /* The control buffer holds MMA_WIRE_MAX_FDS: the kernel truncates the
     * rest (MSG_CTRUNC) and the datagram is refused, or they arrive and the
     * receiver closes the surplus. Either way nothing may leak. */
    if (rc == MMA_OK) {
        ck_assert_int_le(ngot, MMA_WIRE_MAX_FDS);
        ck_assert_uint_eq(len, 1);
    } else {
        ck_assert_int_eq(rc, MMA_ERR_PROTO);
        ck_assert_int_eq(ngot, 0);
    }
    for (int i = 0; i < ngot; i++)
        close(got[i]);
    ck_assert_int_eq(count_fds(), base);
}
END_TEST

START_TEST(oversized_datagram_is_proto_error)
{
    int base = count_fds();
    /* 8 KiB datagram, 1 KiB receive buffer, with an fd riding along. */
    Mma__Hello h = MMA__HELLO__INIT;
    char *name = malloc(8192);
    memset(name, 'n', 8191);
    name[8191] = 0;
    h.name = name;
    Mma__Request big = MMA__REQUEST__INIT;
    big.type = MMA__REQ_TYPE__HELLO;
    big.hello = &h;
    int fd = make_memfd("riding along");
    ck_assert_int_eq(mma_wire_send(sv[0], &big.base, &fd, 1), MMA_OK);
    close(fd);
    /* Then a small one: it must still arrive intact after the refusal. */
    Mma__Request small = MMA__REQUEST__INIT;
    small.type = MMA__REQ_TYPE__STATUS;
    small.has_id = 1;
    small.id = 99;
    ck_assert_int_eq(mma_wire_send(sv[0], &small.base, NULL, 0), MMA_OK);

    size_t len = 12345;
    int got[MMA_WIRE_MAX_FDS], ngot = 7;
    ck_assert_int_eq(mma_wire_recv(sv[1], rx, 1024, &len, got, &ngot), MMA_ERR_PROTO);
    ck_assert_int_eq(ngot, 0);            /* its fds were closed ... */
    ck_assert_int_eq(count_fds(), base);  /* ... really closed */
    ck_assert_int_eq(mma_wire_recv(sv[1], rx, 1024, &len, got, &ngot), MMA_OK);
    Mma__Request *r = mma__request__unpack(NULL, len, rx);
    ck_assert_ptr_nonnull(r);
    ck_assert_int_eq(r->type, MMA__REQ_TYPE__STATUS);
    ck_assert_uint_eq(r->id, 99);
    mma__request__free_unpacked(r, NULL);
    free(name);
}
END_TEST

/* mma_wire_send of a HELLO whose name is n bytes long on sv[0]. */
static int send_hello_named(size_t n)
{
    char *name = malloc(n + 1);
    ck_assert_ptr_nonnull(name);
    memset(name, 'x', n);
    name[n] = 0;
    Mma__Hello h = MMA__HELLO__INIT;
    h.name = name;
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__HELLO;
    req.hello = &h;
    int rc = mma_wire_send(sv[0], &req.base, NULL, 0);
    free(name);
    return rc;
}

START_TEST(message_over_limit_refused_by_sender)
{
    ck_assert_int_eq(send_hello_named(MMA_WIRE_MAX_MSG + 16), MMA_ERR_LIMIT);
}
END_TEST

START_TEST(message_over_sndbuf_is_limit)
{
    /* Below MMA_WIRE_MAX_MSG but above what the socket's send buffer takes
     * (8 KiB, the least Linux allows): the kernel says EMSGSIZE, which is
     * this message's limit, not a lost connection. */
    int small = 4096;
    ck_assert_int_eq(setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
    int got = 0;
    socklen_t gl = sizeof got;
    ck_assert_int_eq(getsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &got, &gl), 0);
    size_t n = (size_t)got + 1024;
    ck_assert_uint_lt(n, MMA_WIRE_MAX_MSG);
    ck_assert_int_eq(send_hello_named(n), MMA_ERR_LIMIT);
    /* The socket still carries what fits. */
    Mma__Request ok = MMA__REQUEST__INIT;
    ok.type = MMA__REQ_TYPE__STATUS;
    ok.has_id = 1;
    ok.id = 5;
    Mma__Request *r = roundtrip(&ok);
    mma__request__free_unpacked(r, NULL);
}
END_TEST

START_TEST(eof_is_disconnected)
{
    close(sv[0]);
    sv[0] = -1;
    size_t len;
    int got[MMA_WIRE_MAX_FDS], ngot;
    ck_assert_int_eq(mma_wire_recv(sv[1], rx, RXCAP, &len, got, &ngot), MMA_ERR_DISCONNECTED);
    /* And sending to a peer that is gone says so too (no SIGPIPE). */
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__STATUS;
    ck_assert_int_eq(mma_wire_send(sv[1], &req.base, NULL, 0), MMA_ERR_DISCONNECTED);
}
END_TEST

START_TEST(nonblocking_empty_is_pending)
{
    int fl = fcntl(sv[1], F_GETFL);
    ck_assert_int_eq(fcntl(sv[1], F_SETFL, fl | O_NONBLOCK), 0);
    size_t len;
    int got[MMA_WIRE_MAX_FDS], ngot = 3;
    ck_assert_int_eq(mma_wire_recv(sv[1], rx, RXCAP, &len, got, &ngot), MMA_PENDING);
    ck_assert_int_eq(ngot, 0);
    /* Once something is there, the same socket delivers it. */
    Mma__Request req = MMA__REQUEST__INIT;
    req.type = MMA__REQ_TYPE__PATHS;
    ck_assert_int_eq(mma_wire_send(sv[0], &req.base, NULL, 0), MMA_OK);
    ck_assert_int_eq(mma_wire_recv(sv[1], rx, RXCAP, &len, got, &ngot), MMA_OK);
    ck_assert_uint_eq(len, mma__request__get_packed_size(&req));
}
END_TEST

START_TEST(default_socket_follows_env)
{
    unsetenv("MMA_SOCKET");
    ck_assert_str_eq(mma_default_socket(), "/run/mma/mmad.sock");
    setenv("MMA_SOCKET", "", 1);
    ck_assert_str_eq(mma_default_socket(), "/run/mma/mmad.sock");
    setenv("MMA_SOCKET", "/tmp/elsewhere.sock", 1);
    ck_assert_str_eq(mma_default_socket(), "/tmp/elsewhere.sock");
    unsetenv("MMA_SOCKET");
}
END_TEST

/* ---- protobuf: every message type packs and unpacks to the same fields ---- */

/* Pack msg, unpack it with its own descriptor. */
static ProtobufCMessage *pb_roundtrip(const ProtobufCMessage *msg)
{
    size_t n = protobuf_c_message_get_packed_size(msg);
    uint8_t *buf = malloc(n ? n : 1);
    ck_assert_uint_eq(protobuf_c_message_pack(msg, buf), n);
    ProtobufCMessage *out = protobuf_c_message_unpack(msg->descriptor, NULL, n, buf);
    free(buf);
    ck_assert_ptr_nonnull(out);
    ck_assert_ptr_eq(out->descriptor, msg->descriptor);
    return out;
}

static void fill_gpu(Mma__GpuInfo *g, uint32_t i)
{
    mma__gpu_info__init(g);
    g->index = i;
    g->name = "NVIDIA H100 80GB HBM3";
    g->pci_bus_id = "0000:1b:00.0";
    g->has_numa_node = 1;
    g->numa_node = -1; /* "unknown" must survive (int32, not uint) */
    g->has_memory = 1;
    g->memory = 85520809984ull + i;
}

static void check_gpu(const Mma__GpuInfo *g, uint32_t i)
{
    ck_assert_uint_eq(g->index, i);
    ck_assert_str_eq(g->name, "NVIDIA H100 80GB HBM3");
    ck_assert_str_eq(g->pci_bus_id, "0000:1b:00.0");
    ck_assert(g->has_numa_node);
    ck_assert_int_eq(g->numa_node, -1);
    ck_assert(g->has_memory);
    ck_assert_uint_eq(g->memory, 85520809984ull + i);
}

START_TEST(pb_setup_messages)
{
    Mma__Hello h = MMA__HELLO__INIT;
    h.api_version = 999;
    h.has_features = 1;
    h.features = UINT64_MAX;
    h.has_flag_slots = 1;
    h.flag_slots = 65536;
    h.name = "héllo";
    Mma__Hello *h2 = (Mma__Hello *)pb_roundtrip(&h.base);
    ck_assert_uint_eq(h2->api_version, 999);
    ck_assert(h2->has_features && h2->features == UINT64_MAX);
    ck_assert(h2->has_flag_slots && h2->flag_slots == 65536);
    ck_assert_str_eq(h2->name, "héllo");
    mma__hello__free_unpacked(h2, NULL);

    /* Optional fields left out stay absent. */
    Mma__Hello bare = MMA__HELLO__INIT;
    bare.api_version = 1;
    h2 = (Mma__Hello *)pb_roundtrip(&bare.base);
    ck_assert(!h2->has_features && !h2->has_flag_slots);
    ck_assert_ptr_null(h2->name);
    mma__hello__free_unpacked(h2, NULL);

    Mma__HelloReply hr = MMA__HELLO_REPLY__INIT;
    hr.daemon_version = 10203;
    hr.api_version = 1;
    hr.has_features = 1;
    hr.features = 7;
    hr.backend = "sim";
    hr.has_gpu_count = 1;
    hr.gpu_count = 8;
    hr.has_simulated = 1;
    hr.simulated = 1;
    hr.has_bypass_threshold = 1;
    hr.bypass_threshold = 1 << 20;
    Mma__HelloReply *hr2 = (Mma__HelloReply *)pb_roundtrip(&hr.base);
    ck_assert_uint_eq(hr2->daemon_version, 10203);
    ck_assert_uint_eq(hr2->api_version, 1);
    ck_assert(hr2->has_features && hr2->features == 7);
    ck_assert_str_eq(hr2->backend, "sim");
    ck_assert(hr2->has_gpu_count && hr2->gpu_count == 8);
    ck_assert(hr2->has_simulated && hr2->simulated);
    ck_assert(hr2->has_bypass_threshold && hr2->bypass_threshold == 1 << 20);
    mma__hello_reply__free_unpacked(hr2, NULL);

    Mma__RegisterHost rh = MMA__REGISTER_HOST__INIT;
    rh.size = UINT64_MAX;
    Mma__RegisterHost *rh2 = (Mma__RegisterHost *)pb_roundtrip(&rh.base);
    ck_assert_uint_eq(rh2->size, UINT64_MAX);
    mma__register_host__free_unpacked(rh2, NULL);

    Mma__RegisterDevice rd = MMA__REGISTER_DEVICE__INIT;
    rd.gpu = 15;
    rd.size = 1;
    Mma__RegisterDevice *rd2 = (Mma__RegisterDevice *)pb_roundtrip(&rd.base);
    ck_assert_uint_eq(rd2->gpu, 15);
    ck_assert_uint_eq(rd2->size, 1);
    ck_assert(!rd2->has_ipc_handle && !rd2->has_ipc_offset);
    mma__register_device__free_unpacked(rd2, NULL);

    Mma__RegisterReply rr = MMA__REGISTER_REPLY__INIT;
    rr.region_id = UINT32_MAX;
    Mma__RegisterReply *rr2 = (Mma__RegisterReply *)pb_roundtrip(&rr.base);
    ck_assert_uint_eq(rr2->region_id, UINT32_MAX);
    mma__register_reply__free_unpacked(rr2, NULL);

    Mma__Unregister u = MMA__UNREGISTER__INIT;
    u.region_id = 5;
    Mma__Unregister *u2 = (Mma__Unregister *)pb_roundtrip(&u.base);
    ck_assert_uint_eq(u2->region_id, 5);
    mma__unregister__free_unpacked(u2, NULL);

    Mma__Segment sg = MMA__SEGMENT__INIT;
    sg.dst_region = 1;
    sg.dst_offset = 2;
    sg.src_region = 3;
    sg.src_offset = 4;
    sg.length = 5;
    Mma__Segment *sg2 = (Mma__Segment *)pb_roundtrip(&sg.base);
    ck_assert(sg2->dst_region == 1 && sg2->dst_offset == 2 && sg2->src_region == 3 && sg2->src_offset == 4 &&
              sg2->length == 5);
    mma__segment__free_unpacked(sg2, NULL);

    Mma__Segment *sp = &sg;
    Mma__Copy cp = MMA__COPY__INIT;
    cp.slot = 7;
    cp.seq = 8;
    cp.n_segments = 1;
    cp.segments = &sp;
    Mma__Copy *cp2 = (Mma__Copy *)pb_roundtrip(&cp.base);
    ck_assert_uint_eq(cp2->slot, 7);
    ck_assert_uint_eq(cp2->seq, 8);
    ck_assert_uint_eq(cp2->n_segments, 1);
    ck_assert_uint_eq(cp2->segments[0]->length, 5);
    ck_assert(!cp2->has_priority && !cp2->has_max_paths);
    mma__copy__free_unpacked(cp2, NULL);
}
END_TEST

START_TEST(pb_admin_messages)
{
    Mma__GpuInfo g[3], *gp[3];
    for (uint32_t i = 0; i < 3; i++) {
        fill_gpu(&g[i], i);
        gp[i] = &g[i];
    }
    Mma__GpuInfo *g2 = (Mma__GpuInfo *)pb_roundtrip(&g[1].base);
    check_gpu(g2, 1);
    mma__gpu_info__free_unpacked(g2, NULL);

    Mma__StatusReply st = MMA__STATUS_REPLY__INIT;
    st.daemon_version = 100;
    st.backend = "cuda";
    st.has_simulated = 1;
    st.simulated = 0;
    st.topology = "4x H100, NV18 all-to-all";
    st.n_gpus = 3;
    st.gpus = gp;
    st.has_uptime_ms = st.has_clients = st.has_jobs_done = st.has_bytes_done = 1;
    st.uptime_ms = 1;
    st.clients = 2;
    st.jobs_done = 3;
    st.bytes_done = 4;
    st.has_chunk_size = st.has_staging_slots = st.has_bypass_threshold = st.has_sim_scale = 1;
    st.chunk_size = 5;
    st.staging_slots = 6;
    st.bypass_threshold = 7;
    st.sim_scale = 0.125;
    st.has_cpu_user_us = st.has_cpu_sys_us = st.has_pid = 1;
    st.cpu_user_us = 8;
    st.cpu_sys_us = 9;
    st.pid = 10;
    Mma__StatusReply *st2 = (Mma__StatusReply *)pb_roundtrip(&st.base);
    ck_assert_uint_eq(st2->daemon_version, 100);
    ck_assert_str_eq(st2->backend, "cuda");
    ck_assert(st2->has_simulated && !st2->simulated);
    ck_assert_str_eq(st2->topology, "4x H100, NV18 all-to-all");
    ck_assert_uint_eq(st2->n_gpus, 3);
    for (uint32_t i = 0; i < 3; i++)
        check_gpu(st2->gpus[i], i);
    ck_assert(st2->uptime_ms == 1 && st2->clients == 2 && st2->jobs_done == 3 && st2->bytes_done == 4);
    ck_assert(st2->chunk_size == 5 && st2->staging_slots == 6 && st2->bypass_threshold == 7);
    ck_assert(st2->has_sim_scale);
    ck_assert_double_eq(st2->sim_scale, 0.125);
    ck_assert(st2->cpu_user_us == 8 && st2->cpu_sys_us == 9 && st2->pid == 10);
    mma__status_reply__free_unpacked(st2, NULL);

    Mma__PathStat ps[2], *pp[2];
    for (uint32_t i = 0; i < 2; i++) {
        mma__path_stat__init(&ps[i]);
        ps[i].target = 0;
        ps[i].via = i;
        ps[i].dir = i;
        ps[i].has_bytes = ps[i].has_chunks = ps[i].has_active_ns = ps[i].has_inflight = 1;
        ps[i].has_depth = ps[i].has_enabled = 1;
        ps[i].bytes = 1000 + i;
        ps[i].chunks = 10 + i;
        ps[i].active_ns = 5000 + i;
        ps[i].inflight = i;
        ps[i].depth = 2;
        ps[i].enabled = i == 0;
        ps[i].note = i ? "copy failed" : NULL;
        pp[i] = &ps[i];
    }
    Mma__PathsReply pr = MMA__PATHS_REPLY__INIT;
    pr.n_paths = 2;
    pr.paths = pp;
    Mma__PathsReply *pr2 = (Mma__PathsReply *)pb_roundtrip(&pr.base);
    ck_assert_uint_eq(pr2->n_paths, 2);
    for (uint32_t i = 0; i < 2; i++) {
        const Mma__PathStat *p = pr2->paths[i];
        ck_assert(p->target == 0 && p->via == i && p->dir == i);
        ck_assert(p->bytes == 1000 + i && p->chunks == 10 + i && p->active_ns == 5000 + i);
        ck_assert(p->inflight == i && p->depth == 2);
        ck_assert(p->has_enabled && p->enabled == (i == 0));
    }
    ck_assert_ptr_null(pr2->paths[0]->note);
    ck_assert_str_eq(pr2->paths[1]->note, "copy failed");
    mma__paths_reply__free_unpacked(pr2, NULL);

    Mma__ClientInfo ci = MMA__CLIENT_INFO__INIT, *cip = &ci;
    ci.id = 3;
    ci.has_pid = ci.has_uid = ci.has_regions = ci.has_region_bytes = 1;
    ci.has_inflight = ci.has_copies = ci.has_bytes = 1;
    ci.pid = 4242;
    ci.uid = 1000;
    ci.name = "pid 4242";
    ci.regions = 2;
    ci.region_bytes = 3ull << 32;
    ci.inflight = 1;
    ci.copies = 17;
    ci.bytes = 1ull << 33;
    Mma__ClientsReply cr = MMA__CLIENTS_REPLY__INIT;
    cr.n_clients = 1;
    cr.clients = &cip;
    Mma__ClientsReply *cr2 = (Mma__ClientsReply *)pb_roundtrip(&cr.base);
    ck_assert_uint_eq(cr2->n_clients, 1);
    const Mma__ClientInfo *c2 = cr2->clients[0];
    ck_assert(c2->id == 3 && c2->pid == 4242 && c2->uid == 1000 && c2->regions == 2);
    ck_assert_str_eq(c2->name, "pid 4242");
    ck_assert(c2->region_bytes == 3ull << 32 && c2->inflight == 1 && c2->copies == 17 && c2->bytes == 1ull << 33);
    mma__clients_reply__free_unpacked(cr2, NULL);
}
END_TEST

START_TEST(pb_response_and_required_fields)
{
    Mma__RegisterReply rr = MMA__REGISTER_REPLY__INIT;
    rr.region_id = 9;
    Mma__Response resp = MMA__RESPONSE__INIT;
    resp.type = MMA__REQ_TYPE__REGISTER_DEVICE;
    resp.has_id = 1;
    resp.id = 77;
    resp.status = MMA_ERR_RANGE; /* sint32: negative codes stay small */
    resp.error = "segment 0: destination offset 65436 + length 200 exceeds region 2 (65536 bytes)";
    resp.register_ = &rr;
    Mma__Response *r2 = (Mma__Response *)pb_roundtrip(&resp.base);
    ck_assert_int_eq(r2->type, MMA__REQ_TYPE__REGISTER_DEVICE);
    ck_assert(r2->has_id && r2->id == 77);
    ck_assert_int_eq(r2->status, MMA_ERR_RANGE);
    ck_assert_str_eq(r2->error, resp.error);
    ck_assert_ptr_nonnull(r2->register_);
    ck_assert_uint_eq(r2->register_->region_id, 9);
    ck_assert_ptr_null(r2->hello);
    ck_assert_ptr_null(r2->status_reply);
    mma__response__free_unpacked(r2, NULL);
    ck_assert_uint_le(mma__response__get_packed_size(&resp), 120);

    /* Required fields are enforced on unpack: an empty buffer is not a
     * Request (type missing) nor a Response (type, status missing). */
    uint8_t empty[1] = {0};
    ck_assert_ptr_null(mma__request__unpack(NULL, 0, empty));
    ck_assert_ptr_null(mma__response__unpack(NULL, 0, empty));
    /* A Copy whose segment lacks `length` is refused as a whole. */
    const uint8_t partial[] = {0x08, 0x01, 0x10, 0x02, 0x1a, 0x08, 0x08, 0x01, 0x10, 0x00, 0x18, 0x02, 0x20, 0x00};
    ck_assert_ptr_null(mma__copy__unpack(NULL, sizeof partial, partial));
    /* Garbage is refused, not misread. */
    const uint8_t junk[] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    ck_assert_ptr_null(mma__request__unpack(NULL, sizeof junk, junk));
}
END_TEST

/* ---- mma_wait's expected rate (common/util.h) ---- */

START_TEST(expect_rate_learns_a_faster_box)
{
    /* mmad gives one copy 165 GB/s; the estimate starts at 120. Copies seen
     * before the spin began raise it a quarter at a time; then spinning sees
     * their true time and it settles there. */
    double rate = 120.0;
    const uint64_t bytes = 256u << 20;
    const double truth = 165.0;
    int early = 0;
    for (int k = 0; k < 40; k++) {
        uint64_t took = (uint64_t)((double)bytes / truth) + 15000; /* plus fixed costs */
        uint64_t due = mma_expect_due(0, bytes, rate);
        /* mma_wait spins from 150 us before due: ended before that? */
        int phase = took + 150000 < due ? 0 : 1;
        early += phase == 0;
        rate = mma_expect_update(rate, bytes, took, phase);
    }
    ck_assert_int_ge(early, 1);
    ck_assert_double_eq_tol(rate, (double)bytes / ((double)bytes / truth + 15000), 2.0);
    /* Then a copy at that rate starts being spun for before it ends, and
     * not more than ~10% of its time (+150 us) before. */
    uint64_t took = (uint64_t)((double)bytes / truth) + 15000;
    uint64_t due = mma_expect_due(0, bytes, rate);
    ck_assert_uint_le(due, took + 150000);
    ck_assert_uint_ge(due + 150000 + took / 10 + 50000, took);
}
END_TEST

START_TEST(expect_rate_bounds)
{
    ck_assert_double_eq_tol(mma_expect_update(900.0, 1, 1, 0), MMA_EXPECT_MAX, 1e-9);
    ck_assert_double_eq_tol(mma_expect_update(6.0, 1, 1000000000, 1), MMA_EXPECT_MIN, 1e-9);
    ck_assert_double_eq_tol(mma_expect_update(50.0, 1u << 20, 0, 1), 50.0, 1e-9);
    /* A copy slower than expected (seen after the spin) lowers it. */
    ck_assert_double_lt(mma_expect_update(120.0, 1u << 30, 20000000, 2), 120.0);
    /* The spin starts at most 1 ms early, and 20 us late for tiny copies. */
    ck_assert_uint_eq(mma_expect_due(1000, 0, 100.0), 21000);
    uint64_t big = 10ull << 30; /* 10 GiB at 100 GB/s: 107 ms */
    ck_assert_uint_eq(mma_expect_due(0, big, 100.0), (uint64_t)((double)big / 100.0) - 1000000 + 20000);
}
END_TEST

START_TEST(expect_rate_per_size_class)
{
    /* Classes: under 16 MiB, under 32 MiB, ... 4 GiB and more. */
    ck_assert_int_eq(mma_expect_class(0), 0);
    ck_assert_int_eq(mma_expect_class(8u << 20), 0);
    ck_assert_int_eq(mma_expect_class((16u << 20) - 1), 0);
    ck_assert_int_eq(mma_expect_class(16u << 20), 1);
    ck_assert_int_eq(mma_expect_class(256u << 20), 5);
    ck_assert_int_eq(mma_expect_class(1u << 30), 7);
    ck_assert_int_eq(mma_expect_class(4ull << 30), MMA_EXPECT_CLASSES - 1);
    ck_assert_int_eq(mma_expect_class(1ull << 40), MMA_EXPECT_CLASSES - 1);
    /* Nothing learned: the default. */
    double r[MMA_EXPECT_CLASSES] = {0};
    ck_assert_double_eq(mma_expect_pick(r, 3, 120.0), 120.0);
    /* 8 MiB copies ran at 80 GB/s: their class expects 80; a class not
     * seen yet keeps the default, which is faster... */
    r[0] = 80.0;
    ck_assert_double_eq(mma_expect_pick(r, 0, 120.0), 80.0);
    ck_assert_double_eq(mma_expect_pick(r, 7, 120.0), 120.0);
    /* ... or the fastest class learned, when that is faster still. */
    r[5] = 165.0;
    ck_assert_double_eq(mma_expect_pick(r, 7, 120.0), 165.0);
    ck_assert_double_eq(mma_expect_pick(r, 0, 120.0), 80.0);
    /* So a 1 GiB copy after many of 8 MiB is not expected at 8 MiB's rate:
     * the waiter spins from before it ends instead of sleeping past it. */
    uint64_t took = (uint64_t)((double)(1u << 30) / 165.0);
    ck_assert_uint_le(mma_expect_due(0, 1u << 30, mma_expect_pick(r, 7, 120.0)), took + 150000);
    ck_assert_uint_gt(mma_expect_due(0, 1u << 30, 80.0), took + 150000);
}
END_TEST

/* ---- the flag page's futex ---- */

typedef struct {
    mma_flag_slot_t *slot;
    int done;
    uint64_t woke_ns;
} sleeper_t;

static void *sleeper_main(void *arg)
{
    sleeper_t *w = arg;
    w->done = mma_flag_sleep(w->slot, 1, 5000000000ull);
    w->woke_ns = mma_now_ns();
    return NULL;
}

START_TEST(flag_wakes_every_sleeper)
{
    /* Two threads sleep on one slot; one gives up (a short timeout) while
     * the other still sleeps. Completing the slot must wake the one left at
     * once, not at its own timeout (5 s): `waiters` counts sleepers. */
    static mma_flag_slot_t slot;
    memset(&slot, 0, sizeof slot);
    sleeper_t w = {.slot = &slot};
    pthread_t th;
    ck_assert_int_eq(pthread_create(&th, NULL, sleeper_main, &w), 0);
    while (atomic_load(&slot.waiters) == 0)
        mma_sleep_ns(1000000);
    mma_sleep_ns(50000000); /* let it get into FUTEX_WAIT */
    ck_assert_int_eq(mma_flag_sleep(&slot, 1, 1000000), 0); /* this one times out and leaves */
    uint32_t counted = atomic_load(&slot.waiters);
    uint64_t t0 = mma_now_ns();
    mma_flag_complete(&slot, 1, MMA_OK);
    ck_assert_int_eq(pthread_join(th, NULL), 0);
    ck_assert_int_eq(w.done, 1);
    ck_assert_msg(w.woke_ns - t0 < 2000000000ull, "the sleeper left woke %.2f s after the slot completed",
                  (double)(w.woke_ns - t0) / 1e9);
    ck_assert_uint_eq(counted, 1); /* still sleeping: counted */
    uint32_t after = atomic_load(&slot.waiters);
    ck_assert_uint_eq(after, 0);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("wire");
    TCase *tc = tcase_create("framing");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 10);
    tcase_add_test(tc, request_roundtrip_each_submessage);
    tcase_add_test(tc, fds_arrive_usable);
    tcase_add_test(tc, too_many_fds_refused_by_sender);
    tcase_add_test(tc, extra_fds_closed_by_receiver);
    tcase_add_test(tc, oversized_datagram_is_proto_error);
    tcase_add_test(tc, message_over_limit_refused_by_sender);
    tcase_add_test(tc, message_over_sndbuf_is_limit);
    tcase_add_test(tc, eof_is_disconnected);
    tcase_add_test(tc, nonblocking_empty_is_pending);
    tcase_add_test(tc, default_socket_follows_env);
    suite_add_tcase(s, tc);
    TCase *pb = tcase_create("protobuf");
    tcase_set_timeout(pb, 10);
    tcase_add_test(pb, pb_setup_messages);
    tcase_add_test(pb, pb_admin_messages);
    tcase_add_test(pb, pb_response_and_required_fields);
    suite_add_tcase(s, pb);
    TCase *ex = tcase_create("expect");
    tcase_add_test(ex, expect_rate_learns_a_faster_box);
    tcase_add_test(ex, expect_rate_bounds);
    tcase_add_test(ex, expect_rate_per_size_class);
    suite_add_tcase(s, ex);
    TCase *fp = tcase_create("flagpage");
    tcase_set_timeout(fp, 20);
    tcase_add_test(fp, flag_wakes_every_sleeper);
    suite_add_tcase(s, fp);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
