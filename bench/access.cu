/* mma-access: which memory of mmad's can a kernel on a peer GPU reach? A
 * check for the one-hop relay design (daemon/relay_kernel.cu), not part of
 * the product. Each case runs in a process of its own (an illegal access
 * ends a CUDA context), as mmad sees memory:
 *   host-ptr     a memfd mapping registered Portable|Mapped, used by a kernel
 *                on gpu1 through its host pointer
 *   host-devptr  the same through cudaHostGetDevicePointer
 *   ipc-owner    another process's cudaMalloc on gpu0, opened with the owner
 *                (gpu0) current, written by a kernel on gpu1
 *   ipc-via      the same opened with gpu1 current
 * Peer access gpu1 -> gpu0 is enabled first in every case. Prints one line a
 * case: ok, or the error. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <cuda_runtime_api.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#define N (4u << 20)

#define TRY(x)                                                                        \
    do {                                                                              \
        cudaError_t e_ = (x);                                                         \
        if (e_ != cudaSuccess) {                                                      \
            printf("%-12s FAIL at %s: %s\n", name, #x, cudaGetErrorString(e_));       \
            fflush(stdout);                                                           \
            _exit(1);                                                                 \
        }                                                                             \
    } while (0)

__global__ void fill(unsigned *dst, const unsigned *src, unsigned n, unsigned salt)
{
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        dst[i] = (src ? src[i] : i) ^ salt;
}

static void peer(const char *name)
{
    TRY(cudaSetDevice(1));
    TRY(cudaDeviceEnablePeerAccess(0, 0));
}

static void host_case(const char *name, int devptr)
{
    int fd = memfd_create("mma-access", 0);
    if (fd < 0 || ftruncate(fd, N) != 0)
        _exit(2);
    unsigned *h = (unsigned *)mmap(NULL, N, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    for (unsigned i = 0; i < N / 4; i++)
        h[i] = i * 7u;
    peer(name);
    TRY(cudaHostRegister(h, N, cudaHostRegisterPortable | cudaHostRegisterMapped));
    unsigned *src = h, *d;
    if (devptr)
        TRY(cudaHostGetDevicePointer((void **)&src, h, 0));
    TRY(cudaMalloc((void **)&d, N));
    fill<<<16, 512>>>(d, src, N / 4, 5);
    TRY(cudaGetLastError());
    TRY(cudaDeviceSynchronize());
    unsigned *back = (unsigned *)malloc(N);
    TRY(cudaMemcpy(back, d, N, cudaMemcpyDeviceToHost));
    for (unsigned i = 0; i < N / 4; i++)
        if (back[i] != ((i * 7u) ^ 5)) {
            printf("%-12s FAIL: wrong data at %u\n", name, i);
            _exit(1);
        }
    printf("%-12s ok (src %s host pointer)\n", name, src == h ? "==" : "!=");
    _exit(0);
}

static void ipc_case(const char *name, int open_on)
{
    int to_parent[2], to_child[2];
    if (pipe(to_parent) || pipe(to_child))
        _exit(2);
    pid_t owner = fork();
    if (owner == 0) { /* the client: allocates on gpu0, exports, waits, checks */
        close(to_parent[0]);
        close(to_child[1]);
        TRY(cudaSetDevice(0));
        unsigned *d;
        TRY(cudaMalloc((void **)&d, N));
        TRY(cudaMemset(d, 0, N));
        cudaIpcMemHandle_t hd;
        TRY(cudaIpcGetMemHandle(&hd, d));
        if (write(to_parent[1], &hd, sizeof hd) != sizeof hd)
            _exit(2);
        char c;
        if (read(to_child[0], &c, 1) != 1)
            _exit(2);
        unsigned *back = (unsigned *)malloc(N);
        TRY(cudaMemcpy(back, d, N, cudaMemcpyDeviceToHost));
        for (unsigned i = 0; i < N / 4; i++)
            if (back[i] != (i ^ 9)) {
                printf("%-12s FAIL: wrong data at %u (%s)\n", name, i, c == 'y' ? "kernel ran" : "kernel failed");
                _exit(1);
            }
        printf("%-12s ok\n", name);
        _exit(0);
    }
    close(to_parent[1]);
    close(to_child[0]);
    cudaIpcMemHandle_t hd;
    if (read(to_parent[0], &hd, sizeof hd) != sizeof hd)
        _exit(2);
    peer(name);
    TRY(cudaSetDevice(open_on));
    unsigned *p;
    TRY(cudaIpcOpenMemHandle((void **)&p, hd, cudaIpcMemLazyEnablePeerAccess));
    TRY(cudaSetDevice(1));
    fill<<<16, 512>>>(p, NULL, N / 4, 9);
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess)
        e = cudaDeviceSynchronize();
    if (e != cudaSuccess)
        printf("%-12s kernel on gpu1: %s\n", name, cudaGetErrorString(e));
    fflush(stdout);
    char c = e == cudaSuccess ? 'y' : 'n';
    if (write(to_child[1], &c, 1) != 1)
        _exit(2);
    int st;
    waitpid(owner, &st, 0);
    _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 3);
}

int main(void)
{
    const char *names[] = {"host-ptr", "host-devptr", "ipc-owner", "ipc-via"};
    int fails = 0;
    for (int k = 0; k < 4; k++) {
        fflush(stdout);
        pid_t p = fork();
        if (p == 0) {
            if (k < 2)
                host_case(names[k], k);
            ipc_case(names[k], k == 2 ? 0 : 1);
        }
        int st;
        waitpid(p, &st, 0);
        fails += !WIFEXITED(st) || WEXITSTATUS(st) != 0;
    }
    return fails ? 1 : 0;
}
