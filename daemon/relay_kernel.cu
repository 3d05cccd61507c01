#include "relay_kernel.h"

/* Blocks b of nb's share of a grid-stride copy of n16 16-byte words, four
 * loads in flight per thread (a PCIe read takes ~1-2 us, so one link needs
 * many outstanding), then the last tail (< 16) bytes by block 0's first
 * thread. */
__device__ static void relay_copy(uint4 *__restrict__ dst, const uint4 *__restrict__ src, uint64_t n16,
                                  unsigned tail, uint64_t b, uint64_t nb)
{
    uint64_t stride = nb * blockDim.x;
    uint64_t i = b * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 w = src[i], x = src[i + stride], y = src[i + 2 * stride], z = src[i + 3 * stride];
        dst[i] = w;
        dst[i + stride] = x;
        dst[i + 2 * stride] = y;
        dst[i + 3 * stride] = z;
    }
    for (; i < n16; i += stride)
        dst[i] = src[i];
    if (tail && b == 0 && threadIdx.x == 0) {
        unsigned char *d8 = (unsigned char *)(dst + n16);
        const unsigned char *s8 = (const unsigned char *)(src + n16);
        for (unsigned k = 0; k < tail; k++)
            d8[k] = s8[k];
    }
}

__global__ void mmad_relay_copy(uint4 *__restrict__ dst, const uint4 *__restrict__ src, uint64_t n16,
                                unsigned tail)
{
    relay_copy(dst, src, n16, tail, blockIdx.x, gridDim.x);
}

extern "C" cudaError_t mmad_relay_kernel_launch(void *dst, const void *src, uint64_t len, int blocks,
                                                cudaStream_t st)
{
    if ((((uintptr_t)dst | (uintptr_t)src) & 15) || blocks < 1)
        return cudaErrorInvalidValue;
    uint64_t n16 = len / 16;
    uint64_t need = (n16 + MMAD_RELAY_THREADS - 1) / MMAD_RELAY_THREADS;
    if (need < (uint64_t)blocks)
        blocks = need ? (int)need : 1;
    mmad_relay_copy<<<blocks, MMAD_RELAY_THREADS, 0, st>>>((uint4 *)dst, (const uint4 *)src, n16, (unsigned)(len % 16));
    return cudaGetLastError();
}

/* ---- the resident relay kernel ---- */

__device__ static uint64_t now_ns(void)
{
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

/* Block 0's first thread hands descriptor seq to every block through
 * st->bcast[slot], tagged with the launch's generation and the sequence
 * number (so that a later launch never takes an earlier one's hand-over for
 * its own); h is the ring's descriptor, or NULL to hand over an exit. */
__device__ static void hand_over(mmad_relay_state_t *st, unsigned slot, unsigned long long tag,
                                 const volatile mmad_relay_desc_t *h)
{
    volatile mmad_relay_desc_t *b = &st->bcast[slot];
    b->len = h ? h->len : MMAD_RELAY_EXIT;
    if (h) {
        b->dst = h->dst;
        b->src = h->src;
        b->flag = h->flag;
        b->flag_value = h->flag_value;
    }
    __threadfence();
    atomicExch(&st->bcast_tag[slot], tag);
}

/* Descriptors block 0 hands over ahead of its own copy: when the engine
 * posted a copy's chunks at once, the other blocks go on to the next as
 * soon as they are done with one, instead of waiting for block 0 to finish
 * its share and read the ring (a PCIe round trip) first. */
#define RELAY_LOOKAHEAD 2

/* Block 0's first thread reads the host ring (over PCIe) and hands each
 * descriptor over (hand_over), up to RELAY_LOOKAHEAD past the one the
 * blocks copy now when the ring already holds them. Each block copies its
 * share; the block that finishes a descriptor last writes its completion
 * word (host memory) after a system-wide fence, so that every byte of every
 * block is visible before the word is. After linger_ns without a new
 * descriptor block 0 hands over an exit instead and writes gen:seq into
 * *exit_word (the host then knows that descriptors from seq on need a new
 * launch). Once it has run for life_ns it ends at the first descriptor the
 * ring does not hold yet, without lingering: between copies, not in the
 * middle of one whose next chunk waits (a relay path that stops there ends
 * its copy late by a relaunch). A kernel fed without a pause ends anyway
 * after MMAD_RELAY_HARD_LIFE(life_ns), where it stops handing over ahead so
 * that it gets to that point. An exit for its life sets MMAD_RELAY_EXIT_LIFE
 * in *exit_word: the host starts the next kernel at once, for the next copy.
 * The life bound keeps a busy kernel from holding off for long what waits
 * for the whole GPU to be idle (cudaFree, cudaHostUnregister). */
__global__ void mmad_relay_resident(const mmad_relay_desc_t *ring, unsigned long long *exit_word,
                                    mmad_relay_state_t *st, uint64_t seq, uint32_t gen, uint64_t linger_ns,
                                    uint64_t life_ns)
{
    __shared__ mmad_relay_desc_t d;
    uint64_t born = now_ns();
    uint64_t hard_ns = MMAD_RELAY_HARD_LIFE(life_ns);
    uint64_t next = seq; /* block 0's thread 0: the first descriptor not handed over */
    for (;; seq++) {
        unsigned slot = (unsigned)(seq % MMAD_RELAY_RING);
        unsigned long long tag = ((unsigned long long)gen << 32) | (uint32_t)seq;
        if (threadIdx.x == 0) {
            if (blockIdx.x == 0) {
                int leave = 0;
                if (next == seq) {
                    const volatile mmad_relay_desc_t *h = ring + slot;
                    uint64_t t0 = now_ns();
                    /* life: past its life, end here unless the chunk is
                     * already posted; past the hard bound, end anyway */
                    int life = t0 - born > life_ns;
                    leave = t0 - born > hard_ns || (life && h->seq != seq);
                    while (!leave && h->seq != seq)
                        if (now_ns() - t0 > linger_ns) {
                            leave = 1;
                            break;
                        }
                    __threadfence_system();
                    hand_over(st, slot, tag, leave ? NULL : h);
                    next = seq + 1;
                    if (leave) {
                        __threadfence_system();
                        *(volatile unsigned long long *)exit_word = tag | (life ? MMAD_RELAY_EXIT_LIFE : 0ull);
                    }
                }
                /* Not past the hard bound: a kernel always fed ahead would
                 * never reach the check above, where it ends. */
                while (!leave && next <= seq + RELAY_LOOKAHEAD && now_ns() - born <= hard_ns) {
                    unsigned ns = (unsigned)(next % MMAD_RELAY_RING);
                    const volatile mmad_relay_desc_t *h = ring + ns;
                    if (h->seq != next)
                        break;
                    __threadfence_system();
                    hand_over(st, ns, ((unsigned long long)gen << 32) | (uint32_t)next, h);
                    next++;
                }
            }
            while (*(volatile unsigned long long *)&st->bcast_tag[slot] != tag)
                __nanosleep(100);
            __threadfence();
            const volatile mmad_relay_desc_t *b = &st->bcast[slot];
            d.len = b->len;
            d.dst = b->dst;
            d.src = b->src;
            d.flag = b->flag;
            d.flag_value = b->flag_value;
        }
        __syncthreads();
        if (d.len == MMAD_RELAY_EXIT)
            return;
        relay_copy((uint4 *)d.dst, (const uint4 *)d.src, d.len / 16, (unsigned)(d.len % 16), blockIdx.x, gridDim.x);
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence_system();
            if (atomicAdd(&st->done[slot], 1u) == gridDim.x - 1) {
                st->done[slot] = 0;
                __threadfence_system();
                *(volatile unsigned long long *)d.flag = d.flag_value;
            }
        }
    }
}

extern "C" cudaError_t mmad_relay_resident_launch(const mmad_relay_desc_t *ring, unsigned long long *exit_word,
                                                  mmad_relay_state_t *state, uint64_t seq, uint32_t gen,
                                                  uint64_t linger_ns, uint64_t life_ns, int blocks,
                                                  cudaStream_t st)
{
    if (blocks < 1 || !ring || !exit_word || !state)
        return cudaErrorInvalidValue;
    mmad_relay_resident<<<blocks, MMAD_RELAY_THREADS, 0, st>>>(ring, exit_word, state, seq, gen, linger_ns,
                                                               life_ns);
    return cudaGetLastError();
}

extern "C" cudaError_t mmad_relay_resident_fit(int *blocks)
{
    int dev = 0, sms = 0, per_sm = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess)
        err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (err == cudaSuccess)
        err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, mmad_relay_resident, MMAD_RELAY_THREADS, 0);
    if (err == cudaSuccess)
        *blocks = per_sm * sms;
    return err;
}

extern "C" cudaError_t mmad_relay_kernel_loadable(void)
{
    struct cudaFuncAttributes a;
    cudaError_t err = cudaFuncGetAttributes(&a, mmad_relay_copy);
    if (err == cudaSuccess)
        err = cudaFuncGetAttributes(&a, mmad_relay_resident);
    return err;
}
