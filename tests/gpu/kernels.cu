// Kernels the GPU tests put on a stream around an mma copy, to check that
// stream order holds: one writes the copy's source before it, one reads its
// destination after it.
#include <cuda_runtime.h>
#include <stdint.h>

__global__ void k_fill(uint8_t *p, size_t n, uint32_t seed)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        p[i] = (uint8_t)((i * 2654435761u) ^ seed);
}

__global__ void k_sum(const uint8_t *p, size_t n, unsigned long long *out)
{
    unsigned long long s = 0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        s += (unsigned long long)p[i] * (unsigned long long)((i % 251) + 1);
    atomicAdd(out, s);
}

// A slow kernel: makes the stream busy so a copy queued after it must wait.
__global__ void k_spin(long long ns)
{
    long long t0 = clock64();
    while (clock64() - t0 < ns)
        ;
}

extern "C" int gt_fill(void *p, size_t n, uint32_t seed, cudaStream_t s)
{
    k_fill<<<256, 256, 0, s>>>((uint8_t *)p, n, seed);
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
}

extern "C" int gt_sum(const void *p, size_t n, unsigned long long *out_dev, cudaStream_t s)
{
    k_sum<<<256, 256, 0, s>>>((const uint8_t *)p, n, out_dev);
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
}

extern "C" int gt_spin(long long cycles, cudaStream_t s)
{
    k_spin<<<1, 1, 0, s>>>(cycles);
    return cudaGetLastError() == cudaSuccess ? 0 : -1;
}
