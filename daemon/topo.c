/* Where the GPUs sit on the host, from hwloc.
 *
 * Two facts matter to mmad. Each GPU's NUMA node and package, reported to
 * operators (a relay staged on a GPU of the far socket crosses the socket
 * link). And which GPUs share one upstream PCIe link to the host: that is
 * the case for GPUs behind one PCIe switch, whose single uplink carries all
 * their host traffic. A relay through a GPU on the target's own uplink moves
 * its bytes over the same link as the direct path, so it adds no bandwidth
 * and only costs a staging buffer and an NVLink hop: such relays are set
 * aside here. */
#include "topo.h"

#include <stdio.h>
#include <string.h>

#include "log.h"

#ifndef MMA_HAVE_HWLOC

void mmad_topo_fill(mmad_backend_t *be)
{
    /* Built without hwloc: locality unknown, every relay kept. */
    for (int g = 0; g < be->gpu_count; g++) {
        be->gpus[g].numa_node = -1;
        be->gpus[g].socket = 0;
    }
}

#else

#include <hwloc.h>

/* "00000000:18:00.0" or "0000:18:00.0": domain:bus:device.function in hex. */
static int parse_bus_id(const char *s, unsigned *dom, unsigned *bus, unsigned *dev, unsigned *fn)
{
    char extra;
    return sscanf(s, "%x:%x:%x.%x%c", dom, bus, dev, fn, &extra) == 4;
}

/* The link that carries a PCI device's traffic to the host: the topmost PCI
 * bridge above the device, right below its host bridge (the root port). Two
 * GPUs that share it share one uplink: behind a PCIe switch each GPU has its
 * own downstream-port bridge, but all of them hang below the switch's one
 * upstream port and its root port, so comparing the immediate parents alone
 * would miss them (it would only catch GPUs on one bus, which PCIe proper
 * never has). NULL when the device sits on the host bridge itself: the host
 * bridge is a grouping, not one link (a VM often puts every passed-through
 * GPU there), so it is never counted as shared. */
static hwloc_obj_t upstream_link(hwloc_obj_t pcidev)
{
    hwloc_obj_t link = NULL;
    for (hwloc_obj_t o = pcidev->parent; o && o->type == HWLOC_OBJ_BRIDGE; o = o->parent) {
        if (o->attr->bridge.upstream_type == HWLOC_OBJ_BRIDGE_HOST)
            break;
        link = o;
    }
    return link;
}

/* The NUMA node and package of the nearest normal (non-I/O) object above
 * the device: the part of the machine the device is attached to. */
static void locality(hwloc_topology_t topo, hwloc_obj_t pcidev, int *numa, int *socket)
{
    *numa = -1;
    *socket = 0;
    hwloc_obj_t anc = hwloc_get_non_io_ancestor_obj(topo, pcidev);
    if (!anc)
        return;
    if (anc->nodeset && !hwloc_bitmap_iszero(anc->nodeset))
        *numa = hwloc_bitmap_first(anc->nodeset); /* OS index, as numactl names nodes */
    hwloc_obj_t pkg = anc->type == HWLOC_OBJ_PACKAGE ? anc : hwloc_get_ancestor_obj_by_type(topo, HWLOC_OBJ_PACKAGE, anc);
    if (pkg)
        *socket = (int)pkg->logical_index;
}

void mmad_topo_fill(mmad_backend_t *be)
{
    int n = be->gpu_count;
    /* A library of another major version lays its objects out differently;
     * reading them would give nonsense, so do without. */
    if ((hwloc_get_api_version() >> 16) != (HWLOC_API_VERSION >> 16)) {
        MMA_WARN("topo: hwloc library version %x does not match the headers (%x); GPU locality unknown",
                 hwloc_get_api_version(), (unsigned)HWLOC_API_VERSION);
        return;
    }
    hwloc_topology_t topo;
    if (hwloc_topology_init(&topo) < 0) {
        MMA_WARN("topo: hwloc_topology_init failed; GPU locality unknown");
        return;
    }
    /* PCI devices and bridges are left out of a topology by default; keep
     * those on the way to devices that matter, GPUs among them. */
    if (hwloc_topology_set_io_types_filter(topo, HWLOC_TYPE_FILTER_KEEP_IMPORTANT) < 0 ||
        hwloc_topology_load(topo) < 0) {
        MMA_WARN("topo: hwloc could not load the machine's topology with its PCI devices; GPU locality unknown");
        hwloc_topology_destroy(topo);
        return;
    }

    /* Work on copies and commit at the end, so a GPU hwloc cannot place
     * keeps the values it had. */
    hwloc_obj_t link[MMAD_MAX_GPUS] = {0};
    int found[MMAD_MAX_GPUS] = {0}, numa[MMAD_MAX_GPUS], socket[MMAD_MAX_GPUS];
    for (int g = 0; g < n; g++) {
        unsigned dom, bus, dev, fn;
        hwloc_obj_t obj = NULL;
        if (parse_bus_id(be->gpus[g].pci_bus_id, &dom, &bus, &dev, &fn))
            obj = hwloc_get_pcidev_by_busid(topo, dom, bus, dev, fn);
        if (!obj) {
            MMA_WARN("topo: hwloc has no PCI device %s (gpu%d); its locality is unknown", be->gpus[g].pci_bus_id,
                     g);
            continue;
        }
        found[g] = 1;
        locality(topo, obj, &numa[g], &socket[g]);
        link[g] = upstream_link(obj);
    }

    int shared = 0;
    for (int g = 0; g < n; g++)
        if (found[g]) {
            be->gpus[g].numa_node = numa[g];
            be->gpus[g].socket = socket[g];
        }
    for (int t = 0; t < n; t++)
        for (int v = 0; v < n; v++) {
            if (v == t || !be->relay_ok[t][v] || !link[t] || link[t] != link[v])
                continue;
            be->relay_ok[t][v] = 0;
            snprintf(be->relay_note[t][v], sizeof be->relay_note[t][v], "shares gpu%d's upstream PCIe link", t);
            shared++;
            if (t < v) /* one line per pair */
                MMA_INFO("topo: gpu%d and gpu%d share one upstream PCIe link (root port %04x:%02x:%02x.%x); no "
                         "relays between them",
                         t, v, (unsigned)link[t]->attr->bridge.upstream.pci.domain,
                         (unsigned)link[t]->attr->bridge.upstream.pci.bus,
                         (unsigned)link[t]->attr->bridge.upstream.pci.dev,
                         (unsigned)link[t]->attr->bridge.upstream.pci.func);
        }
    hwloc_topology_destroy(topo);

    /* " ; NUMA node per GPU: 0 0 1 1" and the relays set aside, if the
     * description has room for all of it. */
    char sum[sizeof be->topology];
    int len = snprintf(sum, sizeof sum, " ; NUMA node per GPU:");
    for (int g = 0; g < n && len < (int)sizeof sum; g++)
        len += snprintf(sum + len, sizeof sum - (size_t)len, " %d", be->gpus[g].numa_node);
    if (shared && len < (int)sizeof sum)
        len += snprintf(sum + len, sizeof sum - (size_t)len, " ; %d relays share an uplink", shared);
    size_t used = strlen(be->topology);
    if (len < (int)sizeof sum && used + (size_t)len < sizeof be->topology)
        memcpy(be->topology + used, sum, (size_t)len + 1);
}

#endif
