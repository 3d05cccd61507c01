/* mmad_request_build_job (daemon/request.c): the one gate between what a
 * client sends and what the copy engines touch. Every region id, offset and
 * length must be checked against that client's own registry, the sentence
 * sent back must name the offending value, and a refused request must leave
 * no reference behind (regions of a refused copy would otherwise never be
 * unmapped). */
#define _GNU_SOURCE
#include <check.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "backend.h"
#include "mma.h"
#include "mmad.h"
#include "request.h"

#define NGPU 4
#define HOST_SIZE 65536u
#define DEV_SIZE 32768u

static mmad_conn_t *conn;
static mmad_region_t *host, *host2, *dev0, *dev0b, *dev1, *dev_bad_gpu;
static char hostmem[HOST_SIZE], host2mem[HOST_SIZE], dev0mem[DEV_SIZE], dev0bmem[DEV_SIZE], dev1mem[DEV_SIZE];
static char err[256];

/* A region built by hand (no backend, no mapping): what the registry and
 * the validator see is all these tests need. */
static mmad_region_t *region(mmad_region_kind_t kind, int gpu, char *base, uint64_t size)
{
    mmad_region_t *r = calloc(1, sizeof *r);
    ck_assert_ptr_nonnull(r);
    atomic_init(&r->refs, 1);
    r->kind = kind;
    r->gpu = gpu;
    r->base = base;
    r->size = size;
    mmad_registry_add(conn, r);
    return r;
}

static void setup(void)
{
    conn = calloc(1, sizeof *conn);
    ck_assert_ptr_nonnull(conn);
    atomic_init(&conn->refs, 1);
    conn->id = 1;
    conn->nslots = 8;
    host = region(MMAD_REGION_HOST, -1, hostmem, HOST_SIZE);
    host2 = region(MMAD_REGION_HOST, -1, host2mem, HOST_SIZE);
    dev0 = region(MMAD_REGION_DEVICE, 0, dev0mem, DEV_SIZE);
    dev0b = region(MMAD_REGION_DEVICE, 0, dev0bmem, DEV_SIZE);
    dev1 = region(MMAD_REGION_DEVICE, 1, dev1mem, DEV_SIZE);
    dev_bad_gpu = region(MMAD_REGION_DEVICE, 7, dev1mem, DEV_SIZE); /* gpu 7 on a 4-GPU box */
    err[0] = 0;
}

static void assert_no_refs_held(void)
{
    for (mmad_region_t *r = conn->regions; r; r = r->next)
        ck_assert_msg(atomic_load(&r->refs) == 1, "region %u holds %d refs", r->id, atomic_load(&r->refs));
    ck_assert_int_eq(atomic_load(&conn->refs), 1);
}

static void teardown(void)
{
    assert_no_refs_held();
    mmad_conn_unref(conn); /* clears the registry: frees every region */
}

/* A Copy with up to 8 segments, built on the stack of the caller. */
typedef struct {
    Mma__Copy cp;
    Mma__Segment seg[8];
    Mma__Segment *segp[8];
} copy_t;

static void copy_init(copy_t *c, uint32_t slot, uint64_t seq)
{
    memset(c, 0, sizeof *c);
    mma__copy__init(&c->cp);
    c->cp.slot = slot;
    c->cp.seq = seq;
    c->cp.segments = c->segp;
}

static void seg_add(copy_t *c, const mmad_region_t *dst, uint64_t doff, const mmad_region_t *src, uint64_t soff,
                    uint64_t len)
{
    size_t i = c->cp.n_segments++;
    mma__segment__init(&c->seg[i]);
    c->seg[i].dst_region = dst ? dst->id : 999;
    c->seg[i].dst_offset = doff;
    c->seg[i].src_region = src ? src->id : 998;
    c->seg[i].src_offset = soff;
    c->seg[i].length = len;
    c->segp[i] = &c->seg[i];
}

/* Expect a refusal with `status`, a sentence containing `needle`, no job. */
static void expect_refused(copy_t *c, int status, const char *needle)
{
    mmad_job_t *job = (mmad_job_t *)0x1;
    err[0] = 0;
    int rc = mmad_request_build_job(conn, &c->cp, NGPU, &job, err, sizeof err);
    ck_assert_msg(rc == status, "got %s (%s), wanted %s", mma_status_name(rc), err, mma_status_name(status));
    ck_assert_ptr_eq(job, (mmad_job_t *)0x1); /* outputs only on success */
    ck_assert_msg(strstr(err, needle), "error '%s' does not mention '%s'", err, needle);
    assert_no_refs_held();
}

START_TEST(unknown_region)
{
    copy_t c;
    copy_init(&c, 0, 1);
    seg_add(&c, NULL, 0, host, 0, 16); /* dst 999 */
    expect_refused(&c, MMA_ERR_NOT_REGISTERED, "region 999");
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, NULL, 0, 16); /* src 998 */
    expect_refused(&c, MMA_ERR_NOT_REGISTERED, "region 998");
    /* Another client's region id is unknown here: ids are per client. */
    mmad_conn_t other = {.nslots = 1};
    atomic_init(&other.refs, 1);
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, 0, 16);
    mmad_job_t *job = NULL;
    ck_assert_int_eq(mmad_request_build_job(&other, &c.cp, NGPU, &job, err, sizeof err), MMA_ERR_NOT_REGISTERED);
    /* A refusal in a later segment releases the references the earlier
     * segments took. */
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, 0, 16);
    seg_add(&c, dev0, 16, host, 16, 16);
    seg_add(&c, NULL, 32, host, 32, 16);
    expect_refused(&c, MMA_ERR_NOT_REGISTERED, "segment 2");
}
END_TEST

START_TEST(same_kind_both_ends)
{
    copy_t c;
    copy_init(&c, 0, 1);
    seg_add(&c, host, 0, host2, 0, 100);
    expect_refused(&c, MMA_ERR_DIRECTION, "host");
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, dev1, 0, 100);
    expect_refused(&c, MMA_ERR_DIRECTION, "device");
    /* A region copied onto itself is host->host too. */
    copy_init(&c, 0, 1);
    seg_add(&c, host, 0, host, 4096, 100);
    expect_refused(&c, MMA_ERR_DIRECTION, "host");
}
END_TEST

START_TEST(range_past_end)
{
    char off[32];
    copy_t c;
    /* destination: offset + length one byte past the end */
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, DEV_SIZE - 100, host, 0, 101);
    snprintf(off, sizeof off, "%u", DEV_SIZE - 100);
    expect_refused(&c, MMA_ERR_RANGE, off);
    ck_assert_ptr_nonnull(strstr(err, "destination"));
    /* source */
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, HOST_SIZE - 7, 8);
    snprintf(off, sizeof off, "%u", HOST_SIZE - 7);
    expect_refused(&c, MMA_ERR_RANGE, off);
    ck_assert_ptr_nonnull(strstr(err, "source"));
    /* offset at the very end, or beyond it */
    copy_init(&c, 0, 1);
    seg_add(&c, host, HOST_SIZE, dev1, 0, 1);
    expect_refused(&c, MMA_ERR_RANGE, "65536");
    copy_init(&c, 0, 1);
    seg_add(&c, host, 1ull << 40, dev1, 0, 1);
    expect_refused(&c, MMA_ERR_RANGE, "1099511627776");
    /* a length larger than the region */
    copy_init(&c, 0, 1);
    seg_add(&c, dev1, 0, host, 0, DEV_SIZE + 1ull);
    expect_refused(&c, MMA_ERR_RANGE, "32769");
}
END_TEST

START_TEST(range_overflow)
{
    /* offset + length wraps around 2^64 to a small number: must not pass
     * as "inside the region". */
    copy_t c;
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, UINT64_MAX - 10, host, 0, 100);
    expect_refused(&c, MMA_ERR_RANGE, "18446744073709551605");
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, UINT64_MAX, 2);
    expect_refused(&c, MMA_ERR_RANGE, "18446744073709551615");
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 16, host, 16, UINT64_MAX);
    expect_refused(&c, MMA_ERR_RANGE, "18446744073709551615");
}
END_TEST

START_TEST(zero_length_and_no_segments)
{
    copy_t c;
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, 0, 0);
    expect_refused(&c, MMA_ERR_INVAL, "length is 0");
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, 0, 10);
    seg_add(&c, dev0, 10, host, 10, 0);
    expect_refused(&c, MMA_ERR_INVAL, "segment 1");
    copy_init(&c, 0, 1);
    expect_refused(&c, MMA_ERR_INVAL, "at least one segment");
}
END_TEST

START_TEST(slot_outside_flag_page)
{
    copy_t c;
    copy_init(&c, 8, 1); /* nslots = 8 */
    seg_add(&c, dev0, 0, host, 0, 10);
    expect_refused(&c, MMA_ERR_INVAL, "slot 8");
    copy_init(&c, UINT32_MAX, 1);
    seg_add(&c, dev0, 0, host, 0, 10);
    expect_refused(&c, MMA_ERR_INVAL, "4294967295");
    /* An admin connection (no flag page) cannot copy at all. */
    conn->nslots = 0;
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, 0, 10);
    expect_refused(&c, MMA_ERR_INVAL, "slot 0");
    conn->nslots = 8;
}
END_TEST

START_TEST(mixed_segments)
{
    copy_t c;
    /* H2D then D2H */
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, 0, 10);
    seg_add(&c, host, 0, dev0, 100, 10);
    expect_refused(&c, MMA_ERR_INVAL, "segment 1");
    /* two GPUs */
    copy_init(&c, 0, 1);
    seg_add(&c, dev0, 0, host, 0, 10);
    seg_add(&c, dev0b, 0, host, 10, 10); /* same GPU: fine so far */
    seg_add(&c, dev1, 0, host, 20, 10);
    expect_refused(&c, MMA_ERR_INVAL, "segment 2");
    /* a device region on a GPU the box does not have */
    copy_init(&c, 0, 1);
    seg_add(&c, dev_bad_gpu, 0, host, 0, 10);
    expect_refused(&c, MMA_ERR_NO_GPU, "gpu 7");
}
END_TEST

START_TEST(too_many_segments)
{
    enum { N = MMAD_MAX_SEGMENTS + 1 };
    Mma__Segment seg, **segp = malloc(N * sizeof *segp);
    mma__segment__init(&seg);
    seg.dst_region = dev0->id;
    seg.src_region = host->id;
    seg.length = 1;
    for (size_t i = 0; i < N; i++)
        segp[i] = &seg;
    Mma__Copy cp = MMA__COPY__INIT;
    cp.n_segments = N;
    cp.segments = segp;
    mmad_job_t *job = NULL;
    ck_assert_int_eq(mmad_request_build_job(conn, &cp, NGPU, &job, err, sizeof err), MMA_ERR_LIMIT);
    ck_assert_ptr_nonnull(strstr(err, "65537"));
    ck_assert_ptr_null(job);
    free(segp);
}
END_TEST

START_TEST(valid_scatter_gather_job)
{
    copy_t c;
    copy_init(&c, 5, 42);
    /* Three segments host -> gpu0, two device regions, odd lengths, one
     * ending exactly at its region's end. */
    seg_add(&c, dev0, 1, host, 3, 1000);
    seg_add(&c, dev0b, DEV_SIZE - 333, host, 5000, 333);
    seg_add(&c, dev0, 2000, host2, HOST_SIZE - 1, 1);
    c.cp.has_priority = 1;
    c.cp.priority = 7; /* anything > 0 is the latency class */
    c.cp.has_max_paths = 1;
    c.cp.max_paths = 2;
    mmad_job_t *job = NULL;
    int rc = mmad_request_build_job(conn, &c.cp, NGPU, &job, err, sizeof err);
    ck_assert_msg(rc == MMA_OK, "%s: %s", mma_status_name(rc), err);
    ck_assert_ptr_nonnull(job);
    ck_assert_uint_eq(job->total, 1334);
    ck_assert_int_eq(job->dir, MMA_DIR_H2D);
    ck_assert_int_eq(job->target, 0);
    ck_assert_uint_eq(job->slot, 5);
    ck_assert_uint_eq(job->seq, 42);
    ck_assert_int_eq(job->priority, 1);
    ck_assert_int_eq(job->max_paths, 2);
    ck_assert_int_eq(job->status, MMA_OK);
    ck_assert_ptr_eq(job->conn, conn);
    ck_assert_uint_eq(job->nsegs, 3);
    ck_assert_ptr_eq(job->segs[0].dev, dev0mem + 1);
    ck_assert_ptr_eq(job->segs[0].host, hostmem + 3);
    ck_assert_uint_eq(job->segs[0].len, 1000);
    ck_assert_ptr_eq(job->segs[1].dev, dev0bmem + DEV_SIZE - 333);
    ck_assert_ptr_eq(job->segs[1].host, hostmem + 5000);
    ck_assert_uint_eq(job->segs[1].len, 333);
    ck_assert_ptr_eq(job->segs[2].dev, dev0mem + 2000);
    ck_assert_ptr_eq(job->segs[2].host, host2mem + HOST_SIZE - 1);
    ck_assert_uint_eq(job->segs[2].len, 1);
    /* The job keeps its regions and its connection alive. */
    ck_assert_uint_eq(job->nrefs, 6);
    ck_assert_int_eq(atomic_load(&dev0->refs), 3);
    ck_assert_int_eq(atomic_load(&dev0b->refs), 2);
    ck_assert_int_eq(atomic_load(&host->refs), 3);
    ck_assert_int_eq(atomic_load(&host2->refs), 2);
    ck_assert_int_eq(atomic_load(&dev1->refs), 1);
    ck_assert_int_eq(atomic_load(&conn->refs), 2);
    /* Unregistering a region a job uses keeps it alive until the job ends. */
    uint32_t id = dev0b->id;
    ck_assert_int_eq(mmad_registry_remove(conn, id), MMA_OK);
    ck_assert_ptr_null(mmad_registry_find(conn, id));
    ck_assert_int_eq(atomic_load(&dev0b->refs), 1);
    ck_assert_int_eq(mmad_registry_remove(conn, id), MMA_ERR_NOT_REGISTERED);
    mmad_job_free(job); /* drops the last reference of dev0b: freed */
    dev0b = NULL;
}
END_TEST

START_TEST(valid_d2h_job_defaults)
{
    copy_t c;
    copy_init(&c, 7, 1);
    seg_add(&c, host, HOST_SIZE - DEV_SIZE, dev1, 0, DEV_SIZE); /* whole region, to the last byte */
    mmad_job_t *job = NULL;
    ck_assert_int_eq(mmad_request_build_job(conn, &c.cp, NGPU, &job, err, sizeof err), MMA_OK);
    ck_assert_int_eq(job->dir, MMA_DIR_D2H);
    ck_assert_int_eq(job->target, 1);
    ck_assert_uint_eq(job->total, DEV_SIZE);
    ck_assert_ptr_eq(job->segs[0].host, hostmem + HOST_SIZE - DEV_SIZE);
    ck_assert_ptr_eq(job->segs[0].dev, dev1mem);
    ck_assert_int_eq(job->priority, 0); /* bulk unless asked */
    ck_assert_int_eq(job->max_paths, 0);
    mmad_job_free(job);
}
END_TEST

/* The daemon's real region constructor: a memfd mapped through a backend
 * whose region_open is consulted. */
static int fake_open_calls;
static int fake_region_open(mmad_backend_t *be, mmad_region_t *r, const uint8_t *ipc, size_t ipc_len, uint64_t off)
{
    (void)ipc;
    (void)ipc_len;
    (void)off;
    fake_open_calls++;
    return r->kind == MMAD_REGION_DEVICE && r->gpu >= be->gpu_count ? MMA_ERR_NO_GPU : MMA_OK;
}
static int fake_close_calls;
static void fake_region_close(mmad_backend_t *be, mmad_region_t *r)
{
    (void)be;
    (void)r;
    fake_close_calls++;
}

/* A memfd of `size` bytes, sealed against shrinking as libmma makes them
 * (or not, for the refusal). */
static int memfd_of(uint64_t size, int sealed)
{
    int fd = memfd_create("req-test", MFD_CLOEXEC | MFD_ALLOW_SEALING);
    ck_assert_int_ge(fd, 0);
    if (size)
        ck_assert_int_eq(ftruncate(fd, (off_t)size), 0);
    if (sealed)
        ck_assert_int_eq(fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK), 0);
    return fd;
}

START_TEST(mapped_regions_through_memfd)
{
    static const mmad_backend_ops_t ops = {.name = "fake", .region_open = fake_region_open,
                                           .region_close = fake_region_close};
    mmad_backend_t be = {.ops = &ops, .gpu_count = NGPU, .simulated = 1};
    int fd = memfd_of(8192, 1);
    ck_assert_int_eq(pwrite(fd, "abc", 3, 4096), 3);
    mmad_region_t *r = NULL;
    ck_assert_int_eq(mmad_region_new_mapped(&be, MMAD_REGION_DEVICE, 2, fd, 8000, &r), MMA_OK);
    ck_assert_int_eq(fake_open_calls, 1);
    ck_assert_uint_eq(r->size, 8000);
    ck_assert_mem_eq(r->base + 4096, "abc", 3); /* the mapping shows the file */
    mmad_registry_add(conn, r);
    copy_t c;
    copy_init(&c, 0, 1);
    seg_add(&c, host, 0, r, 7999, 1);
    mmad_job_t *job = NULL;
    ck_assert_int_eq(mmad_request_build_job(conn, &c.cp, NGPU, &job, err, sizeof err), MMA_OK);
    ck_assert_int_eq(job->target, 2);
    ck_assert_ptr_eq(job->segs[0].dev, r->base + 7999);
    mmad_job_free(job);
    copy_init(&c, 0, 1);
    seg_add(&c, host, 0, r, 7999, 2);
    expect_refused(&c, MMA_ERR_RANGE, "7999");
    ck_assert_int_eq(mmad_registry_remove(conn, r->id), MMA_OK);
    ck_assert_int_eq(fake_close_calls, 1);

    /* A memfd smaller than the claimed size, size 0, a GPU the backend
     * refuses: all refused, and the fd is consumed either way. */
    fd = memfd_of(4096, 1);
    ck_assert_int_eq(mmad_region_new_mapped(&be, MMAD_REGION_HOST, -1, fd, 4097, &r), MMA_ERR_INVAL);
    ck_assert_int_eq(fcntl(fd, F_GETFD), -1);
    fd = memfd_of(0, 1);
    ck_assert_int_eq(mmad_region_new_mapped(&be, MMAD_REGION_HOST, -1, fd, 0, &r), MMA_ERR_INVAL);
    fd = memfd_of(4096, 1);
    ck_assert_int_eq(mmad_region_new_mapped(&be, MMAD_REGION_DEVICE, NGPU, fd, 4096, &r), MMA_ERR_NO_GPU);
    /* A memfd that is not sealed against shrinking could be cut short
     * under the mapping later (SIGBUS in mmad at its next touch): refused
     * whatever its size, host or device, and consumed; so is one created
     * without MFD_ALLOW_SEALING (sealed against sealing, not shrinking). */
    int opens = fake_open_calls;
    fd = memfd_of(8192, 0);
    ck_assert_int_eq(mmad_memfd_sealed(fd), 0);
    ck_assert_int_eq(mmad_region_new_mapped(&be, MMAD_REGION_HOST, -1, fd, 4096, &r), MMA_ERR_INVAL);
    ck_assert_int_eq(fcntl(fd, F_GETFD), -1);
    fd = memfd_of(8192, 0);
    ck_assert_int_eq(mmad_region_new_mapped(&be, MMAD_REGION_DEVICE, 1, fd, 8192, &r), MMA_ERR_INVAL);
    fd = memfd_create("req-test", MFD_CLOEXEC);
    ck_assert_int_eq(ftruncate(fd, 4096), 0);
    ck_assert_int_eq(mmad_memfd_sealed(fd), 0);
    ck_assert_int_eq(mmad_region_new_mapped(&be, MMAD_REGION_HOST, -1, fd, 4096, &r), MMA_ERR_INVAL);
    ck_assert_int_eq(fake_open_calls, opens); /* none reached the backend */
    /* Sealed: it cannot shrink, so its size stands. */
    fd = memfd_of(8192, 1);
    ck_assert_int_eq(mmad_memfd_sealed(fd), 1);
    ck_assert_int_ne(ftruncate(fd, 4096), 0);
    close(fd);
    /* A pipe is not a memfd. */
    int p[2];
    ck_assert_int_eq(pipe(p), 0);
    close(p[1]);
    ck_assert_int_eq(mmad_region_new_mapped(&be, MMAD_REGION_HOST, -1, p[0], 4096, &r), MMA_ERR_INVAL);
}
END_TEST

int main(void)
{
    Suite *s = suite_create("request");
    TCase *tc = tcase_create("build_job");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 10);
    tcase_add_test(tc, unknown_region);
    tcase_add_test(tc, same_kind_both_ends);
    tcase_add_test(tc, range_past_end);
    tcase_add_test(tc, range_overflow);
    tcase_add_test(tc, zero_length_and_no_segments);
    tcase_add_test(tc, slot_outside_flag_page);
    tcase_add_test(tc, mixed_segments);
    tcase_add_test(tc, too_many_segments);
    tcase_add_test(tc, valid_scatter_gather_job);
    tcase_add_test(tc, valid_d2h_job_defaults);
    tcase_add_test(tc, mapped_regions_through_memfd);
    suite_add_tcase(s, tc);
    SRunner *sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
