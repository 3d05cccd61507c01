/* Everything libmma asks of CUDA, in one place. Only called when the daemon
 * runs real GPUs; on the simulated box libmma never touches CUDA, so the
 * same library runs on machines with no driver. */
#ifndef MMA_CUDA_GLUE_H
#define MMA_CUDA_GLUE_H

#include <stddef.h>
#include <stdint.h>

#include "mma.h"

/* Load driver entry points; 0 when CUDA is usable. Idempotent. */
int mma_cuda_init(void);
/* How many CUDA devices this process sees (0 on error), and device gpu's
 * PCI bus id ("0000:18:00.0") into buf. */
int mma_cuda_device_count(void);
int mma_cuda_pci_bus_id(int gpu, char *buf, int len);
/* 1 when stream memory operations (write/wait 64-bit) work on `gpu`. */
int mma_cuda_memops_supported(int gpu);

int mma_cuda_host_register(void *ptr, size_t size, int mapped);
void mma_cuda_host_unregister(void *ptr);
int mma_cuda_device_ptr(void *host, void **dev);
int mma_cuda_malloc(int gpu, size_t size, void **out);
void mma_cuda_free(int gpu, void *ptr);
/* IPC handle of the allocation holding ptr, and ptr's offset inside it. */
int mma_cuda_ipc_handle(int gpu, void *ptr, uint8_t handle[64], uint64_t *offset);
/* The GPU a device pointer belongs to (-1 for host memory). */
int mma_cuda_pointer_gpu(const void *ptr);

/* The dummy task on `stream`: write reached = seq, then wait for done >= seq.
 * `reached`/`done` are host addresses inside the registered flag page. */
int mma_cuda_stream_mark(mma_stream_t stream, int gpu, uint64_t *reached, uint64_t *done, uint64_t seq);
/* Native copy (the bypass, and the fallback when mmad is gone). A NULL
 * stream means synchronous. */
int mma_cuda_memcpy(void *dst, const void *src, size_t n, mma_stream_t stream);
/* A non-blocking stream on `gpu`, its synchronisation and destruction. */
int mma_cuda_stream_create(int gpu, mma_stream_t *out);
int mma_cuda_stream_sync(mma_stream_t s);
void mma_cuda_stream_destroy(mma_stream_t s);
/* A one-thread kernel fallback for the dummy task (stream_wait.cu). */
int mma_cuda_launch_wait_kernel(mma_stream_t stream, volatile uint64_t *reached_dev,
                                volatile uint64_t *done_dev, uint64_t seq);

#endif
