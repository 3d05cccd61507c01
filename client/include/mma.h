/*
 * mma.h — the public API of libmma, the client library of mmad
 * (Multipath Memory Access).
 *
 * A serving process connects to the per-node daemon, registers the memory it
 * copies between (pinned host memory that libmma allocates and shares with the
 * daemon, and GPU memory), then submits copies. The daemon splits each copy
 * across every PCIe link of the box: straight over the target GPU's own link,
 * and through staging buffers on peer GPUs that forward over NVLink.
 *
 * This header needs neither libuv nor protobuf-c nor the CUDA headers.
 * Every call returns MMA_OK (0) or a negative mma status; mma_strerror()
 * turns any status into a sentence. Outputs are written only on success.
 */
#ifndef MMA_H
#define MMA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped on any incompatible change of the client<->daemon contract. */
#define MMA_API_VERSION 1

/* Status codes: name, value, sentence. Negative values are errors. */
#define MMA_STATUS_MAP(X)                                                        \
    X(OK, 0, "success")                                                          \
    X(PENDING, 1, "copy still in flight")                                        \
    X(ERR_INVAL, -1, "invalid argument")                                         \
    X(ERR_NOMEM, -2, "out of memory")                                            \
    X(ERR_CONNECT, -3, "cannot connect to mmad (is it running? see MMA_SOCKET)") \
    X(ERR_VERSION, -4, "client and daemon API versions are incompatible")        \
    X(ERR_PROTO, -5, "malformed or unexpected protocol message")                 \
    X(ERR_IO, -6, "socket I/O error")                                            \
    X(ERR_DISCONNECTED, -7, "connection to mmad lost")                           \
    X(ERR_NOT_REGISTERED, -8, "memory is not registered with mma")               \
    X(ERR_RANGE, -9, "offset or length lies outside the registered region")      \
    X(ERR_BUSY, -10, "all completion slots are in use")                          \
    X(ERR_CUDA, -11, "a CUDA call failed")                                       \
    X(ERR_BACKEND, -12, "the daemon's copy engine failed")                       \
    X(ERR_UNSUPPORTED, -13, "not supported by this daemon or backend")           \
    X(ERR_TIMEOUT, -14, "timed out")                                             \
    X(ERR_LIMIT, -15, "a daemon limit was reached")                              \
    X(ERR_CANCELLED, -16, "copy cancelled")                                      \
    X(ERR_DIRECTION, -17, "a copy must go between host and device memory")       \
    X(ERR_NO_GPU, -18, "no such GPU")                                            \
    X(ERR_SYSTEM, -19, "a system call failed")

typedef enum mma_status {
#define MMA_STATUS_ENUM(name, value, text) MMA_##name = value,
    MMA_STATUS_MAP(MMA_STATUS_ENUM)
#undef MMA_STATUS_ENUM
} mma_status_t;

/* The sentence for a status; never NULL ("unknown mma status" otherwise). */
const char *mma_strerror(int status);
/* The symbolic name of a status ("MMA_ERR_RANGE"); never NULL. */
const char *mma_status_name(int status);

/* Opaque connection to mmad. Safe to use from several threads at once. */
typedef struct mma_client mma_client_t;

/* A copy in flight: returned by the *_async calls, passed to mma_wait/query. */
typedef uint64_t mma_copy_t;

/* A CUDA stream, spelled without the CUDA headers: a cudaStream_t converts to
 * it. NULL means "host-ordered": the copy starts at once and completes when
 * mma_wait() says so. Use MMA_STREAM_LEGACY for CUDA's legacy default stream. */
typedef struct CUstream_st *mma_stream_t;
#define MMA_STREAM_LEGACY ((mma_stream_t)0x1)

typedef struct mma_info {
    uint32_t daemon_version;   /* MMA_VERSION of the daemon, as major*10000+minor*100+patch */
    uint32_t api_version;      /* the daemon's MMA_API_VERSION */
    uint64_t features;         /* MMA_FEATURE_* bits */
    char backend[16];          /* "cuda" or "sim" */
    int gpu_count;             /* GPUs mmad serves (a caller names them by its own CUDA device numbers) */
    int simulated;             /* 1 on the simulated box */
    size_t bypass_threshold;   /* copies below this many bytes go native; MMA_BYPASS_ALL: every copy */
    double sim_scale;          /* simulated box: its rates are the real ones x this; 1.0 on GPUs */
    size_t cold_bypass;        /* copies below this go native while mmad sleeps (mmad --cold-bypass; 0: never) */
    size_t cold_small;         /* and below this once mmad's relay kernels have ended (--cold-small) ... */
    uint32_t relays_warm_us;   /* ... this long after the client's last copy through mmad (0: never) */
} mma_info_t;

/* mma_info_t.bypass_threshold where mmad has no relay path (one GPU, or none
 * can reach another's memory): mmad could add only its own hops, so libmma
 * runs every copy natively unless mmad was given --bypass-threshold. */
#define MMA_BYPASS_ALL SIZE_MAX

#define MMA_FEATURE_SCATTER_GATHER (1u << 0)
#define MMA_FEATURE_STREAM_ORDER   (1u << 1)
#define MMA_FEATURE_PRIORITY       (1u << 2)

/* Connect to mmad. socket_path NULL means $MMA_SOCKET, else
 * /run/mma/mmad.sock. Checks the API version (MMA_ERR_VERSION on mismatch). */
int mma_connect(const char *socket_path, mma_client_t **out);

/* Close the connection. The daemon releases everything the client
 * registered. Copies still in flight are waited for first. NULL is a no-op.
 * A stream-ordered copy whose stream has not got to it yet is waited for
 * up to 5 s more (with mmad gone, libmma runs it natively once the stream
 * gets there); past that the flag page such streams write and wait on is
 * left mapped, with a warning, rather than unmapped under them. If mmad is
 * gone as well, nothing finishes those copies now and their streams wait
 * for ever: then the memory of mma_host_alloc and mma_device_alloc is left
 * allocated, registered and mapped too (cudaFree and cudaHostUnregister
 * would wait for those streams), with a warning. Synchronize streams with
 * stream-ordered copies before disconnecting. */
void mma_disconnect(mma_client_t *client);

int mma_get_info(mma_client_t *client, mma_info_t *out);

/* Copies are coming: wake mmad now (its threads sleep after a pause, and
 * waking them costs the first copy 100-300 us on a virtual machine), so
 * that the next copies find it awake; e.g. when a request arrives, before
 * its KV-cache fetch. Cheap where mmad is awake already (no message then).
 * Whether it is, libmma sees in the submission ring; without one
 * (MMA_NO_RING=1, mmad --submit-ring=0) it cannot tell, and every call
 * sends a KICK (one small message), which keeps mmad awake for its
 * --wake-spin-us. A copy below mma_info_t.cold_bypass that finds mmad
 * asleep goes native and wakes it the same way. MMA_ERR_DISCONNECTED once
 * mmad is gone; MMA_ERR_IO where sending the KICK failed otherwise (a
 * socket error that is not a lost connection): the client stays up. */
int mma_prewarm(mma_client_t *client);

/* Host memory the daemon can reach: memfd-backed, shared with mmad, page
 * aligned, pinned by the daemon. Free with mma_free(). */
int mma_host_alloc(mma_client_t *client, size_t size, void **out);

/* Device memory on `gpu`, the caller's CUDA device number (libmma maps it
 * to mmad's by PCI bus id, so CUDA_VISIBLE_DEVICES may reorder or hide
 * GPUs; MMA_ERR_NO_GPU for one mmad does not serve, or whose PCI bus id
 * CUDA could not tell at mma_connect). On real GPUs this is cudaMalloc +
 * registration; on the simulated box it is shared memory this process can
 * read and write directly (that is what lets tests verify bytes without a
 * GPU). */
int mma_device_alloc(mma_client_t *client, int gpu, size_t size, void **out);

/* Register GPU memory the caller allocated itself (cudaMalloc). Real GPUs
 * only; the whole [ptr, ptr+size) must lie in one allocation. */
int mma_device_register(mma_client_t *client, int gpu, void *ptr, size_t size);

/* Unregister `ptr` (the start of a registered range) and free it if mma
 * allocated it. Waits for this client's copies in flight first. mmad
 * unregisters it first: where it refuses, or the request cannot be sent
 * (MMA_ERR_IO) while the connection stays up, that error is returned,
 * nothing is freed and the memory stays registered; free it again.
 * MMA_ERR_BUSY (nothing freed): mmad is gone, and a stream-ordered copy
 * waits for its stream to get to it (libmma then runs it natively), and
 * either that copy reads or writes this memory, or the memory is libmma's
 * (mma_host_alloc, mma_device_alloc) and freeing it (cudaHostUnregister,
 * cudaFree) would wait for that stream, which waits for libmma;
 * synchronize such streams and free again. */
int mma_free(mma_client_t *client, void *ptr);

typedef struct mma_segment {
    void *dst;
    const void *src;
    size_t len;
} mma_segment_t;

#define MMA_COPY_LATENCY (1u << 0) /* latency class: overtakes queued bulk chunks */
#define MMA_COPY_NO_BYPASS (1u << 1) /* route through mmad even below the threshold */

typedef struct mma_copy_opts {
    unsigned flags;  /* MMA_COPY_* */
    int max_paths;   /* 0: all paths; 1: the target's own link only; n: at most n */
} mma_copy_opts_t;

/* Copy n bytes between registered host memory and registered device memory
 * (either direction; the direction follows from the pointers). Returns once
 * the copy is queued. With a stream, work queued on the stream before this
 * call finishes before the copy starts and work queued after it sees the data;
 * `out` may then be NULL. Without a stream, wait with mma_wait(). */
int mma_memcpy_async(mma_client_t *client, void *dst, const void *src, size_t n,
                     mma_stream_t stream, mma_copy_t *out);

/* mmad takes at most this many segments per copy. */
#define MMA_MAX_SEGMENTS 65536u

/* Many (dst, src, len) segments as one copy, e.g. KV-cache blocks. All
 * segments go the same direction and touch one GPU. opts may be NULL.
 * A copy through mmad goes as one socket message: one of more than
 * MMA_MAX_SEGMENTS segments, or whose message exceeds what this client's
 * socket carries (up to 1 MiB, less where net.core.wmem_max is small; see
 * README), returns MMA_ERR_LIMIT before anything is queued, and the client
 * goes on working: split such a copy. */
int mma_memcpy_sg_async(mma_client_t *client, const mma_segment_t *segs, size_t nsegs,
                        mma_stream_t stream, const mma_copy_opts_t *opts, mma_copy_t *out);

/* Block until the copy completes; returns its status. On real GPUs it
 * sleeps until shortly before the copy should end (at the rate this
 * client's earlier copies of that direction and size class showed), then spins: a
 * sleeping thread's wake-up can cost hundreds of microseconds on a VM. */
int mma_wait(mma_client_t *client, mma_copy_t copy);

/* MMA_PENDING while in flight, else the copy's final status. */
int mma_query(mma_client_t *client, mma_copy_t copy);

/* mma_memcpy_async + mma_wait. */
int mma_memcpy(mma_client_t *client, void *dst, const void *src, size_t n);

#ifdef __cplusplus
}
#endif
#endif /* MMA_H */
