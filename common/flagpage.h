/* The flag page: a small memfd shared by a client and mmad. Each slot
 * carries one copy's handshake: the client (or its CUDA stream) writes
 * `reached = seq` when the copy may start; mmad writes `status` and then
 * `done = seq` when its last byte has landed. A CUDA stream waits with
 * cuStreamWaitValue64(done >= seq), so both words are 64-bit and 8-aligned. */
#ifndef MMA_FLAGPAGE_H
#define MMA_FLAGPAGE_H

#include <stdatomic.h>
#include <stdint.h>

typedef struct mma_flag_slot {
    _Atomic uint64_t reached;
    _Atomic uint64_t done;
    _Atomic int64_t status;
    uint64_t pad[5]; /* one slot per cache line: no false sharing */
} mma_flag_slot_t;

_Static_assert(sizeof(mma_flag_slot_t) == 64, "flag slot is one cache line");

#define MMA_FLAG_SLOTS_DEFAULT 1024u
#define MMA_FLAG_SLOTS_MAX 65536u

static inline uint64_t mma_flag_read(_Atomic uint64_t *w)
{
    return atomic_load_explicit(w, memory_order_acquire);
}

#endif
