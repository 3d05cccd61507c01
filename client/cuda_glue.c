#include "cuda_glue.h"

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <pthread.h>
#include <string.h>

#include "log.h"

typedef CUresult (*write64_fn)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
typedef CUresult (*wait64_fn)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
typedef CUresult (*addr_range_fn)(CUdeviceptr *, size_t *, CUdeviceptr);
typedef CUresult (*get_attr_fn)(int *, CUdevice_attribute, CUdevice);

static pthread_once_t once = PTHREAD_ONCE_INIT;
static int init_rc = MMA_ERR_CUDA;
static write64_fn p_write64;
static wait64_fn p_wait64;
static addr_range_fn p_addr_range;
static get_attr_fn p_get_attr;

/* Every CUDA call goes through here: a failure becomes a status and one log
 * line naming the call. */
#define CK(call)                                                                      \
    do {                                                                              \
        cudaError_t e_ = (call);                                                      \
        if (e_ != cudaSuccess) {                                                      \
            MMA_ERROR("%s failed: %s (%d)", #call, cudaGetErrorString(e_), (int)e_); \
            return MMA_ERR_CUDA;                                                      \
        }                                                                             \
    } while (0)

static void *entry(const char *sym)
{
    void *fn = NULL;
    enum cudaDriverEntryPointQueryResult q;
    if (cudaGetDriverEntryPointByVersion(sym, &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess)
        return NULL;
    return fn;
}

static void do_init(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0) {
        MMA_DEBUG("CUDA unusable here: %s", cudaGetErrorString(e));
        return;
    }
    p_write64 = (write64_fn)entry("cuStreamWriteValue64");
    p_wait64 = (wait64_fn)entry("cuStreamWaitValue64");
    p_addr_range = (addr_range_fn)entry("cuMemGetAddressRange");
    p_get_attr = (get_attr_fn)entry("cuDeviceGetAttribute");
    init_rc = p_addr_range ? MMA_OK : MMA_ERR_CUDA;
}

int mma_cuda_init(void)
{
    pthread_once(&once, do_init);
    return init_rc;
}

int mma_cuda_device_count(void)
{
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

int mma_cuda_pci_bus_id(int gpu, char *buf, int len)
{
    cudaError_t e = cudaDeviceGetPCIBusId(buf, len, gpu);
    if (e != cudaSuccess) {
        MMA_ERROR("cudaDeviceGetPCIBusId(gpu %d): %s", gpu, cudaGetErrorString(e));
        return MMA_ERR_CUDA;
    }
    return MMA_OK;
}

int mma_cuda_memops_supported(int gpu)
{
    if (!p_write64 || !p_wait64 || !p_get_attr)
        return 0;
    int v = 0;
    if (p_get_attr(&v, CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS, (CUdevice)gpu) != CUDA_SUCCESS)
        return 0;
    return v != 0;
}

int mma_cuda_host_register(void *ptr, size_t size, int mapped)
{
    CK(cudaHostRegister(ptr, size, cudaHostRegisterPortable | (mapped ? cudaHostRegisterMapped : 0)));
    return MMA_OK;
}

void mma_cuda_host_unregister(void *ptr)
{
    cudaError_t e = cudaHostUnregister(ptr);
    if (e != cudaSuccess)
        MMA_WARN("cudaHostUnregister: %s", cudaGetErrorString(e));
}

int mma_cuda_device_ptr(void *host, void **dev)
{
    CK(cudaHostGetDevicePointer(dev, host, 0));
    return MMA_OK;
}

int mma_cuda_malloc(int gpu, size_t size, void **out)
{
    int prev;
    CK(cudaGetDevice(&prev));
    CK(cudaSetDevice(gpu));
    cudaError_t e = cudaMalloc(out, size);
    cudaSetDevice(prev);
    if (e != cudaSuccess) {
        MMA_ERROR("cudaMalloc(%zu) on gpu %d: %s", size, gpu, cudaGetErrorString(e));
        return e == cudaErrorMemoryAllocation ? MMA_ERR_NOMEM : MMA_ERR_CUDA;
    }
    return MMA_OK;
}

void mma_cuda_free(int gpu, void *ptr)
{
    (void)gpu;
    cudaError_t e = cudaFree(ptr);
    if (e != cudaSuccess)
        MMA_WARN("cudaFree: %s", cudaGetErrorString(e));
}

int mma_cuda_ipc_handle(int gpu, void *ptr, uint8_t handle[64], uint64_t *offset)
{
    CUdeviceptr base = 0;
    size_t size = 0;
    /* cuMemGetAddressRange looks the pointer up in the current context, so
     * the owning GPU's context must be current. */
    int prev;
    CK(cudaGetDevice(&prev));
    CK(cudaSetDevice(gpu));
    CUresult r = p_addr_range((CUdeviceptr *)&base, &size, (CUdeviceptr)(uintptr_t)ptr);
    CK(cudaSetDevice(prev));
    if (r != CUDA_SUCCESS) {
        MMA_ERROR("cuMemGetAddressRange: %p is not memory of gpu %d (CUresult %d)", ptr, gpu, (int)r);
        return MMA_ERR_NOT_REGISTERED;
    }
    cudaIpcMemHandle_t h;
    CK(cudaIpcGetMemHandle(&h, (void *)(uintptr_t)base));
    _Static_assert(sizeof h == 64, "cudaIpcMemHandle_t is 64 bytes");
    memcpy(handle, &h, 64);
    *offset = (uint64_t)((uintptr_t)ptr - (uintptr_t)base);
    return MMA_OK;
}

int mma_cuda_pointer_gpu(const void *ptr)
{
    struct cudaPointerAttributes a;
    if (cudaPointerGetAttributes(&a, ptr) != cudaSuccess) {
        cudaGetLastError();
        return -1;
    }
    return a.type == cudaMemoryTypeDevice ? a.device : -1;
}

int mma_cuda_stream_mark(mma_stream_t stream, int gpu, uint64_t *reached, uint64_t *done, uint64_t seq)
{
    void *dr, *dd;
    CK(cudaHostGetDevicePointer(&dr, reached, 0));
    CK(cudaHostGetDevicePointer(&dd, done, 0));
    if (mma_cuda_memops_supported(gpu)) {
        CUresult r = p_write64((CUstream)stream, (CUdeviceptr)(uintptr_t)dr, seq, CU_STREAM_WRITE_VALUE_DEFAULT);
        if (r == CUDA_SUCCESS)
            r = p_wait64((CUstream)stream, (CUdeviceptr)(uintptr_t)dd, seq, CU_STREAM_WAIT_VALUE_GEQ);
        if (r != CUDA_SUCCESS) {
            MMA_ERROR("cuStreamWrite/WaitValue64 failed: %d", (int)r);
            return MMA_ERR_CUDA;
        }
        return MMA_OK;
    }
    return mma_cuda_launch_wait_kernel(stream, dr, dd, seq);
}

int mma_cuda_memcpy(void *dst, const void *src, size_t n, mma_stream_t stream)
{
    if (!stream) {
        CK(cudaMemcpy(dst, src, n, cudaMemcpyDefault));
        return MMA_OK;
    }
    CK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDefault, (cudaStream_t)stream));
    return MMA_OK;
}

int mma_cuda_stream_create(int gpu, mma_stream_t *out)
{
    int prev;
    cudaStream_t st;
    CK(cudaGetDevice(&prev));
    CK(cudaSetDevice(gpu));
    cudaError_t e = cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    CK(cudaSetDevice(prev));
    if (e != cudaSuccess) {
        MMA_ERROR("cudaStreamCreateWithFlags on gpu %d: %s", gpu, cudaGetErrorString(e));
        return MMA_ERR_CUDA;
    }
    *out = (mma_stream_t)st;
    return MMA_OK;
}

int mma_cuda_stream_sync(mma_stream_t s)
{
    CK(cudaStreamSynchronize((cudaStream_t)s));
    return MMA_OK;
}

void mma_cuda_stream_destroy(mma_stream_t s)
{
    cudaError_t e = cudaStreamDestroy((cudaStream_t)s);
    if (e != cudaSuccess)
        MMA_WARN("cudaStreamDestroy: %s", cudaGetErrorString(e));
}
