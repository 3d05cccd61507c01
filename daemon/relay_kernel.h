/* One-hop relays: a copy kernel on the via GPU moves a relay chunk itself.
 * Its loads and stores reach host memory over the via GPU's PCIe link and
 * the target's memory over NVLink, so the bytes cross each link once, with
 * no staging buffer and no second copy (bench/kcopy.cu measured it). */
#ifndef MMAD_RELAY_KERNEL_H
#define MMAD_RELAY_KERNEL_H
#include <stdint.h>

#include <cuda_runtime_api.h>

/* Threads per block of the relay kernel. */
#define MMAD_RELAY_THREADS 512

#ifdef __cplusplus
extern "C" {
#endif

/* dst and src must be 16-byte aligned (cudaErrorInvalidValue otherwise);
 * len may be any size. Launched on st with up to `blocks` blocks (fewer
 * when len is small); returns the launch's error. */
cudaError_t mmad_relay_kernel_launch(void *dst, const void *src, uint64_t len, int blocks, cudaStream_t st);

#ifdef __cplusplus
}
#endif
#endif
