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

/* Block 0's first thread reads the host ring (over PCIe) and hands each
 * descriptor to every block through st->bcast, tagged with the launch's
 * generation and the sequence number, so that a later launch never takes
 * an earlier one's hand-over for its own. Each block copies its share;
 * the block that finishes a descriptor last writes its completion word
 * (host memory) after a system-wide fence, so that every byte of every
 * block is visible before the word is. After linger_ns without a new
 * descriptor, or once it has run for life_ns, block 0 hands over an exit
 * instead and writes gen:seq into *exit_word (the host then knows that
 * descriptors from seq on need a new launch). The life bound keeps a busy
 * kernel from holding off for long what waits for the whole GPU to be
 * idle (cudaFree, cudaHostUnregister). */
__global__ void mmad_relay_resident(const mmad_relay_desc_t *ring, unsigned long long *exit_word,
                                    mmad_relay_state_t *st, uint64_t seq, uint32_t gen, uint64_t linger_ns,
                                    uint64_t life_ns)
{
    __shared__ mmad_relay_desc_t d;
    uint64_t born = now_ns();
    for (;; seq++) {
        unsigned slot = (unsigned)(seq % MMAD_RELAY_RING);
        unsigned long long tag = ((unsigned long long)gen << 32) | (uint32_t)seq;
        if (threadIdx.x == 0) {
            if (blockIdx.x == 0) {
                const volatile mmad_relay_desc_t *h = ring + slot;
                uint64_t t0 = now_ns();
                int leave = t0 - born > life_ns;
                while (!leave && h->seq != seq)
                    if (now_ns() - t0 > linger_ns) {
                        leave = 1;
                        break;
                    }
                __threadfence_system();
                volatile mmad_relay_desc_t *b = &st->bcast[slot];
                b->len = leave ? MMAD_RELAY_EXIT : h->len;
                if (!leave) {
                    b->dst = h->dst;
                    b->src = h->src;
                    b->flag = h->flag;
                    b->flag_value = h->flag_value;
                }
                __threadfence();
                atomicExch(&st->bcast_tag[slot], tag);
                if (leave) {
                    __threadfence_system();
                    *(volatile unsigned long long *)exit_word = tag;
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
