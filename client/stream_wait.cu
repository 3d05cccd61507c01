// The dummy task's fallback where stream memory operations are missing: one
// thread announces that the stream reached the copy, then spins until mmad
// writes "done". It occupies one SM slot while it waits.
#include <cuda_runtime.h>
#include <stdint.h>

extern "C" {
#include "cuda_glue.h"
#include "log.h"
}

__global__ void mma_wait_kernel(volatile uint64_t *reached, volatile uint64_t *done, uint64_t seq)
{
    *reached = seq;
    __threadfence_system();
    while (*done < seq)
        __nanosleep(1000);
    __threadfence_system();
}

extern "C" int mma_cuda_launch_wait_kernel(mma_stream_t stream, volatile uint64_t *reached_dev,
                                           volatile uint64_t *done_dev, uint64_t seq)
{
    mma_wait_kernel<<<1, 1, 0, (cudaStream_t)stream>>>(reached_dev, done_dev, seq);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        MMA_ERROR("mma_wait_kernel launch failed: %s", cudaGetErrorString(e));
        return MMA_ERR_CUDA;
    }
    return MMA_OK;
}
