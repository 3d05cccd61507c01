/* One-hop relays: a copy kernel on the via GPU moves a relay chunk itself.
 * Its loads and stores reach host memory over the via GPU's PCIe link and
 * the target's memory over NVLink, so the bytes cross each link once, with
 * no staging buffer and no second copy (bench/kcopy.cu measured it).
 *
 * Two ways to run it: a launch per chunk (mmad_relay_kernel_launch), or a
 * resident kernel (mmad_relay_resident_launch) that stays on the via GPU
 * while relays keep coming and takes each chunk as a descriptor from a ring
 * in host memory: posting one costs the engine a few stores instead of a
 * launch (~5-8 us) and a completion mark. */
#ifndef MMAD_RELAY_KERNEL_H
#define MMAD_RELAY_KERNEL_H
#include <stdint.h>

#include <cuda_runtime_api.h>

/* Threads per block of the relay kernel. */
#define MMAD_RELAY_THREADS 512

/* Descriptors in one resident kernel's ring: more than the relays that can
 * be in flight through one GPU (--staging-slots is at most 64), so a slot
 * is free again before it is needed. */
#define MMAD_RELAY_RING 128
/* A descriptor's len that tells the kernel's blocks to end. */
#define MMAD_RELAY_EXIT UINT64_MAX

/* One chunk for a resident kernel. The host writes every field, then seq
 * (the descriptor's sequence number) last; the kernel takes slot
 * seq % MMAD_RELAY_RING once it holds seq. dst and src are 16-byte aligned
 * addresses the via GPU can use; when every byte is copied the kernel writes
 * flag_value into the 64-bit word at flag. */
typedef struct mmad_relay_desc {
    uint64_t dst, src, len, flag, flag_value;
    volatile uint64_t seq;
    uint64_t pad[2];
} mmad_relay_desc_t;

/* The resident kernel's own state, in the via GPU's memory, zeroed once. */
typedef struct mmad_relay_state {
    mmad_relay_desc_t bcast[MMAD_RELAY_RING];
    unsigned long long bcast_tag[MMAD_RELAY_RING];
    unsigned int done[MMAD_RELAY_RING];
} mmad_relay_state_t;

#ifdef __cplusplus
extern "C" {
#endif

/* dst and src must be 16-byte aligned (cudaErrorInvalidValue otherwise);
 * len may be any size. Launched on st with up to `blocks` blocks (fewer
 * when len is small); returns the launch's error. */
cudaError_t mmad_relay_kernel_launch(void *dst, const void *src, uint64_t len, int blocks, cudaStream_t st);

/* A resident kernel's exit word: generation << 32 | the low 32 bits of the
 * first sequence number it did not take, and this bit where it ended for
 * its life (not for want of chunks). Generations stay below 2^31. */
#define MMAD_RELAY_EXIT_LIFE (1ull << 63)
/* Past its life a resident kernel ends at the first chunk not yet posted;
 * one fed without a pause ends after this anyway. */
#define MMAD_RELAY_HARD_LIFE(life_ns) ((life_ns) + (life_ns) / 2)

/* Start a resident kernel of `blocks` blocks on st that takes the ring's
 * descriptors from sequence number seq on, and ends once none came for
 * linger_ns, or, after life_ns, once the next is not posted yet (at the
 * latest after MMAD_RELAY_HARD_LIFE), writing its exit word into
 * *exit_word. gen must be below 2^31. ring and exit_word are host-mapped
 * memory; state is on st's GPU. Every block must be resident at once
 * (blocks wait for block 0). */
cudaError_t mmad_relay_resident_launch(const mmad_relay_desc_t *ring, unsigned long long *exit_word,
                                       mmad_relay_state_t *state, uint64_t seq, uint32_t gen,
                                       uint64_t linger_ns, uint64_t life_ns, int blocks, cudaStream_t st);

/* How many blocks of the resident kernel the current device holds at once
 * (the occupancy calculator's blocks per SM times its SMs), in *blocks: a
 * launch of more never has them all resident, and its blocks wait for one
 * another. */
cudaError_t mmad_relay_resident_fit(int *blocks);

/* Whether the current device has code for both relay kernels: cudaSuccess,
 * or the error asking for their attributes gave (a GPU the build has no
 * image for: cudaErrorNoKernelImageForDevice or the like). */
cudaError_t mmad_relay_kernel_loadable(void);

#ifdef __cplusplus
}
#endif
#endif
