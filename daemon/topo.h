/* Where the GPUs sit on the host (topo.c, from hwloc). */
#ifndef MMAD_TOPO_H
#define MMAD_TOPO_H

#include "backend.h"

/* Fill in each GPU's NUMA node and package (socket), and set aside relays
 * that cannot add bandwidth because the relay GPU shares the target's
 * upstream PCIe link. Call once be->gpus[].pci_bus_id and be->relay_ok
 * (peer access) are known. Never fails: where hwloc is missing or gives no
 * answer it logs a warning and leaves be as it was (without hwloc support
 * compiled in, every GPU gets numa_node -1 and socket 0). */
void mmad_topo_fill(mmad_backend_t *be);

#endif
