/* The flag page: a small memfd shared by a client and mmad. Each slot
 * carries one copy's handshake: the client (or its CUDA stream) writes
 * `reached = seq` when the copy may start; mmad writes `status` and then
 * `done = seq` when its last byte has landed. A CUDA stream waits with
 * cuStreamWaitValue64(done >= seq), so both words are 64-bit and 8-aligned. */
#ifndef MMA_FLAGPAGE_H
#define MMA_FLAGPAGE_H

#include <limits.h>
#include <linux/futex.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef struct mma_flag_slot {
    _Atomic uint64_t reached;
    _Atomic uint64_t done;
    _Atomic int64_t status;
    _Atomic uint32_t waiters; /* host threads sleeping on `done` (futex): mmad wakes them where nonzero */
    uint32_t pad0;
    uint64_t pad[4]; /* one slot per cache line: no false sharing */
} mma_flag_slot_t;

_Static_assert(sizeof(mma_flag_slot_t) == 64, "flag slot is one cache line");

/* The submission ring: copy requests of one segment that a client writes
 * into the flag page, right after its slots, instead of sending them over
 * the socket. While mmad's socket thread polls (after a copy request, and
 * through a copy's tail: --loop-spin-us, --tail-spin) it reads the ring
 * each turn and sets `polling`, so such a copy costs the client a few
 * stores and mmad no system call. A client that posts while `polling` is 0
 * sends a KICK message, unless one it sent is still unread; mmad reads a
 * client's ring before acting on any message from it, so a copy never
 * overtakes, nor is overtaken by, what the client sent before or after it
 * (UNREGISTER). Protocol:
 *   client: fill e = &e[tail % MMA_SQ_ENTRIES], e->pos = tail + 1 (release),
 *           then tail + 1 (seq_cst), then read polling (seq_cst); if 0, read
 *           kicks_read (seq_cst), and only where it equals the KICKs sent so
 *           far, send one more. It posts only while tail - head < MMA_SQ_ENTRIES.
 *   mmad:   polling = 0 (seq_cst), then reads tail (seq_cst) once more
 *           before it sleeps; either it sees the entry or the client sees 0.
 *           On a KICK, kicks_read + 1 (seq_cst) before it reads tail. A
 *           KICK that brings no entry (libmma ran a copy natively while mmad
 *           slept, --cold-bypass, or mma_prewarm) keeps both of mmad's
 *           threads awake for --wake-spin-us.
 *           For each entry from head to tail, with pos == head + 1: copy it
 *           out, head + 1 (release), then validate and queue it as a COPY. */
#define MMA_SQ_ENTRIES 256u
#define MMA_SQ_LATENCY 1u /* mma_sq_entry_t.flags: latency class */

typedef struct mma_sq_entry {
    _Atomic uint64_t pos; /* ring position + 1 once the entry is written */
    uint64_t seq;         /* the copy's sequence number (its slot's done value) */
    uint64_t dst_offset, src_offset, length;
    uint64_t sent_ns;     /* the client's CLOCK_MONOTONIC at posting (mmad --trace) */
    uint32_t slot, dst_region, src_region;
    uint16_t flags, max_paths;
} mma_sq_entry_t;

_Static_assert(sizeof(mma_sq_entry_t) == 64, "ring entry is one cache line");

typedef struct mma_sq {
    _Atomic uint64_t tail;    /* client: entries posted */
    uint64_t pad0[7];
    _Atomic uint64_t head;    /* mmad: entries taken */
    uint64_t pad1[7];
    _Atomic uint32_t polling; /* mmad: 1 while its socket thread reads the ring without a KICK */
    uint32_t pad2;
    _Atomic uint64_t kicks_read; /* mmad: KICK messages it began to act on */
    uint64_t pad3[6];
    mma_sq_entry_t e[MMA_SQ_ENTRIES];
} mma_sq_t;

#define MMA_FLAG_SLOTS_DEFAULT 1024u
#define MMA_FLAG_SLOTS_MAX 65536u

static inline uint64_t mma_flag_read(_Atomic uint64_t *w)
{
    return atomic_load_explicit(w, memory_order_acquire);
}

/* The futex word is the low half of `done` (x86-64 is little-endian); the
 * flag page is a shared memfd, so a process-shared futex works across the
 * client and mmad. */
static inline uint32_t *mma_flag_futex(mma_flag_slot_t *s)
{
    return (uint32_t *)(void *)&s->done;
}

/* Finish a copy: its status, then `done` (release: every byte and the status
 * are visible first), then wake a host thread if one sleeps on the slot.
 * seq_cst on `done` and `waiters` pairs with mma_flag_sleep: either the
 * waiter sees `done`, or this sees the waiter. */
static inline void mma_flag_complete(mma_flag_slot_t *s, uint64_t seq, int status)
{
    atomic_store_explicit(&s->status, status, memory_order_relaxed);
    atomic_store_explicit(&s->done, seq, memory_order_seq_cst);
    if (atomic_load_explicit(&s->waiters, memory_order_seq_cst))
        syscall(SYS_futex, mma_flag_futex(s), FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* Sleep until `done` >= seq or timeout_ns passes. Returns 1 when done.
 * Several threads may sleep on one slot (one copy waited for from two
 * threads, or a waiter that timed out beside one that did not), so
 * `waiters` counts them: a flag cleared by the first to leave would let
 * mma_flag_complete skip the wake-up the others still sleep in. */
static inline int mma_flag_sleep(mma_flag_slot_t *s, uint64_t seq, uint64_t timeout_ns)
{
    atomic_fetch_add_explicit(&s->waiters, 1, memory_order_seq_cst);
    uint64_t d = atomic_load_explicit(&s->done, memory_order_seq_cst);
    if (d < seq) {
        struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000ull),
                              .tv_nsec = (long)(timeout_ns % 1000000000ull)};
        syscall(SYS_futex, mma_flag_futex(s), FUTEX_WAIT, (uint32_t)d, &ts, NULL, 0);
        d = atomic_load_explicit(&s->done, memory_order_acquire);
    }
    atomic_fetch_sub_explicit(&s->waiters, 1, memory_order_relaxed);
    return d >= seq;
}

#endif
