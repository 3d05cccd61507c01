/* The README's example: connect, allocate, copy both ways, check, clean up.
 * Build: cc copy.c -Iclient/include -Lbuild -lmma   (or link mma_static) */
#include <stdio.h>
#include <string.h>

#include "mma.h"

int main(void)
{
    mma_client_t *c;
    int rc = mma_connect(NULL, &c); /* $MMA_SOCKET, else /run/mma/mmad.sock */
    if (rc != MMA_OK) {
        fprintf(stderr, "connect: %s\n", mma_strerror(rc));
        return 1;
    }
    size_t n = 32u << 20;
    char *host, *back, *dev;
    if ((rc = mma_host_alloc(c, n, (void **)&host)) != MMA_OK ||
        (rc = mma_host_alloc(c, n, (void **)&back)) != MMA_OK ||
        (rc = mma_device_alloc(c, 0, n, (void **)&dev)) != MMA_OK) {
        fprintf(stderr, "alloc: %s\n", mma_strerror(rc));
        return 1;
    }
    for (size_t i = 0; i < n; i++)
        host[i] = (char)(i * 7);

    mma_copy_t t;
    rc = mma_prewarm(c); /* copies are coming: mmad wakes now, not on the first one */
    if (rc == MMA_OK)
        rc = mma_memcpy_async(c, dev, host, n, NULL, &t); /* host -> GPU 0, over every path */
    if (rc == MMA_OK)
        rc = mma_wait(c, t);
    if (rc == MMA_OK)
        rc = mma_memcpy(c, back, dev, n); /* GPU 0 -> host, synchronous */
    if (rc != MMA_OK) {
        fprintf(stderr, "copy: %s\n", mma_strerror(rc));
        return 1;
    }
    /* A copy past the end of a region is refused before anything moves. */
    int bad = mma_memcpy(c, dev + n - 16, host, 32);
    int same = memcmp(host, back, n) == 0;
    printf("round trip %s; out-of-range copy: %s (%s)\n", same ? "ok" : "MISMATCH", mma_status_name(bad),
           mma_strerror(bad));

    mma_free(c, dev);
    mma_free(c, back);
    mma_free(c, host);
    mma_disconnect(c);
    return same && bad == MMA_ERR_RANGE ? 0 : 1;
}
