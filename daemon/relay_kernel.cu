#include "relay_kernel.h"

/* Grid-stride copy of n16 16-byte words, four loads in flight per thread
 * (a PCIe read takes ~1-2 us, so one link needs many outstanding), then the
 * last tail (< 16) bytes by one thread. */
__global__ void mmad_relay_copy(uint4 *__restrict__ dst, const uint4 *__restrict__ src, uint64_t n16,
                                unsigned tail)
{
    uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < n16; i += 4 * stride) {
        uint4 a = src[i], b = src[i + stride], c = src[i + 2 * stride], d = src[i + 3 * stride];
        dst[i] = a;
        dst[i + stride] = b;
        dst[i + 2 * stride] = c;
        dst[i + 3 * stride] = d;
    }
    for (; i < n16; i += stride)
        dst[i] = src[i];
    if (tail && blockIdx.x == 0 && threadIdx.x == 0) {
        unsigned char *d8 = (unsigned char *)(dst + n16);
        const unsigned char *s8 = (const unsigned char *)(src + n16);
        for (unsigned k = 0; k < tail; k++)
            d8[k] = s8[k];
    }
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
