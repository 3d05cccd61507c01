/* Each client's registry of memory regions, and their lifetimes.
 * A region is referenced by its client's registry and by every job that
 * copies to or from it; the last reference unmaps/unpins it, so a client that
 * dies mid-copy has its memory released only after the copy's chunks land. */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/magic.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backend.h"
#include "log.h"
#include "mma.h"
#include "mmad.h"

void mmad_region_ref(mmad_region_t *r)
{
    atomic_fetch_add_explicit(&r->refs, 1, memory_order_relaxed);
}

void mmad_region_unref(mmad_region_t *r)
{
    if (atomic_fetch_sub_explicit(&r->refs, 1, memory_order_acq_rel) != 1)
        return;
    if (r->be && r->be->ops->region_close)
        r->be->ops->region_close(r->be, r);
    if (r->map)
        munmap(r->map, r->map_len);
    free(r);
}

int mmad_memfd_sealed(int fd)
{
    int seals = fcntl(fd, F_GET_SEALS);
    struct statfs fs;
    return seals >= 0 && (seals & F_SEAL_SHRINK) && fstatfs(fd, &fs) == 0 && fs.f_type == TMPFS_MAGIC;
}

int mmad_region_new_mapped(mmad_backend_t *be, mmad_region_kind_t kind, int gpu, int fd, uint64_t size,
                           mmad_region_t **out)
{
    int rc = MMA_OK;
    struct stat st;
    if (size == 0 || size > (uint64_t)SIZE_MAX / 2) {
        rc = MMA_ERR_INVAL;
        goto close_fd;
    }
    /* Sealed first, then sized: once sealed it can only grow. An unsealed
     * memfd could be cut short under the mapping later, and mmad's next
     * touch of a page past the end (a chunk's copy) would die of SIGBUS. */
    if (!mmad_memfd_sealed(fd)) {
        MMA_WARN("region fd refused: " MMAD_MEMFD_UNSEALED);
        rc = MMA_ERR_INVAL;
        goto close_fd;
    }
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size < size) {
        MMA_WARN("region fd is not a memfd of at least %llu bytes", (unsigned long long)size);
        rc = MMA_ERR_INVAL;
        goto close_fd;
    }
    void *map = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) {
        MMA_WARN("mmap of a %llu-byte region: %s", (unsigned long long)size, strerror(errno));
        rc = errno == ENOMEM ? MMA_ERR_NOMEM : MMA_ERR_SYSTEM;
        goto close_fd;
    }
    close(fd);
    mmad_region_t *r = calloc(1, sizeof *r);
    if (!r) {
        munmap(map, (size_t)size);
        return MMA_ERR_NOMEM;
    }
    atomic_init(&r->refs, 1);
    r->kind = kind;
    r->gpu = gpu;
    r->size = size;
    r->map = map;
    r->map_len = (size_t)size;
    r->base = map;
    if (be->ops->region_open) {
        rc = be->ops->region_open(be, r, NULL, 0, 0);
        if (rc != MMA_OK) {
            munmap(map, (size_t)size);
            free(r);
            return rc;
        }
    }
    r->be = be;
    *out = r;
    return MMA_OK;
close_fd:
    close(fd);
    return rc;
}

int mmad_region_new_ipc(mmad_backend_t *be, int gpu, const uint8_t *handle, size_t handle_len, uint64_t offset,
                        uint64_t size, mmad_region_t **out)
{
    if (be->simulated)
        return MMA_ERR_UNSUPPORTED; /* the simulated box takes memfds only */
    mmad_region_t *r = calloc(1, sizeof *r);
    if (!r)
        return MMA_ERR_NOMEM;
    atomic_init(&r->refs, 1);
    r->kind = MMAD_REGION_DEVICE;
    r->gpu = gpu;
    r->size = size;
    int rc = be->ops->region_open(be, r, handle, handle_len, offset);
    if (rc != MMA_OK) {
        free(r);
        return rc;
    }
    r->be = be;
    *out = r;
    return MMA_OK;
}

void mmad_registry_add(mmad_conn_t *c, mmad_region_t *r)
{
    r->id = ++c->next_region_id;
    r->next = c->regions;
    c->regions = r;
}

mmad_region_t *mmad_registry_find(mmad_conn_t *c, uint32_t id)
{
    for (mmad_region_t *r = c->regions; r; r = r->next)
        if (r->id == id)
            return r;
    return NULL;
}

int mmad_registry_remove(mmad_conn_t *c, uint32_t id)
{
    for (mmad_region_t **p = &c->regions; *p; p = &(*p)->next) {
        if ((*p)->id == id) {
            mmad_region_t *r = *p;
            *p = r->next;
            mmad_region_unref(r);
            return MMA_OK;
        }
    }
    return MMA_ERR_NOT_REGISTERED;
}

void mmad_registry_clear(mmad_conn_t *c)
{
    while (c->regions) {
        mmad_region_t *r = c->regions;
        c->regions = r->next;
        mmad_region_unref(r);
    }
}

void mmad_conn_ref(mmad_conn_t *c)
{
    atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
}

void mmad_conn_unref(mmad_conn_t *c)
{
    if (atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) != 1)
        return;
    mmad_registry_clear(c);
    if (c->flags)
        munmap(c->flags, c->flags_len);
    free(c);
}
