/*
 * A stand-in for NVIDIA's libnvidia-ml.so.1, for tests on machines without a GPU.
 *
 * The real `pynvml` module of nvidia-ml-py loads it with dlopen("libnvidia-ml.so.1")
 * when it is first on the library search path (LD_LIBRARY_PATH), and calls it through
 * ctypes exactly as it calls NVIDIA's library: same symbols, same C signatures, same
 * structs, same return codes. So the binding's own code runs for real: its symbol
 * look-ups (a missing symbol is NVMLError_FunctionNotFound, or NVMLLibraryMismatchError
 * behind an unversioned wrapper), its two-call process-list protocol, its struct
 * layouts and its error classes.
 *
 * Driver generations are chosen when this file is compiled; each leaves out the
 * symbols that generation of NVIDIA's driver does not export:
 *
 *   -DHAVE_V2        nvmlDevice{Compute,Graphics}RunningProcesses_v2   (R450 and later)
 *   -DHAVE_MPS       nvmlDeviceGetMPSComputeRunningProcesses           (R460 and later)
 *   -DHAVE_MPS_V2    nvmlDeviceGetMPSComputeRunningProcesses_v2        (R495 and later)
 *   -DHAVE_V3        the three _v3 process lists                       (R510 and later)
 *   -DHAVE_MEMORY_V2 nvmlDeviceGetMemoryInfo_v2                        (R510 and later)
 *
 * Behaviour is read from the file named by $MEMGUARD_NVML_STANDIN at every call, so
 * a test can change it between two reads. One directive per line, '#' starts a
 * comment; <dev> is a GPU index ("0") or a MIG device ("0:1"), '*' any device:
 *
 *   init <code>                         nvmlInit returns <code>
 *   driver <version>                    nvmlSystemGetDriverVersion (default 535.183.01)
 *   gpu <i> <uuid> <total> <free> <reserved> <name...>
 *   mig <i> <slots>                     GPU <i> is in MIG mode with <slots> slots
 *   migdev <i> <slot> <uuid> <total> <free> <reserved> <name...>
 *   nomig <i>                           nvmlDeviceGetMigMode is Not Supported on GPU <i>
 *   proc <dev> compute|graphics|mps <pid> <bytes>|na [live]
 *                                       a process on <dev>; entries of one pid add up;
 *                                       "na" is NVML_VALUE_NOT_AVAILABLE; "live" lists
 *                                       it only while /proc/<pid> exists, and takes its
 *                                       bytes from the device's free memory
 *   fail <function> <dev>|* <code> [<from call>]
 *                                       <function> returns <code> for <dev>
 *   hang <function> <dev>|* <nth call> <fifo>
 *                                       the nth call blocks until a writer opens <fifo>
 *                                       and closes it
 *
 * Every call is appended as "<function> <dev>" to $MEMGUARD_NVML_STANDIN_LOG when set.
 */

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int nvmlReturn_t;

enum {
    NVML_SUCCESS = 0,
    NVML_ERROR_UNINITIALIZED = 1,
    NVML_ERROR_INVALID_ARGUMENT = 2,
    NVML_ERROR_NOT_SUPPORTED = 3,
    NVML_ERROR_NOT_FOUND = 6,
    NVML_ERROR_INSUFFICIENT_SIZE = 7,
    NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25,
    NVML_ERROR_UNKNOWN = 999,
};

#define MAX_GPUS 8
#define MAX_SLOTS 8
#define MAX_PROCS 64
#define MAX_RULES 32
#define NA_BYTES 0xFFFFFFFFFFFFFFFFULL

typedef struct { unsigned int pid; unsigned long long usedGpuMemory; } nvmlProcessInfo_v1_t;
typedef struct {
    unsigned int pid;
    unsigned long long usedGpuMemory;
    unsigned int gpuInstanceId;
    unsigned int computeInstanceId;
} nvmlProcessInfo_v2_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef struct { unsigned int version; unsigned long long total, reserved, free, used; } nvmlMemory_v2_t;
#define nvmlMemory_v2 ((unsigned int)(sizeof(nvmlMemory_v2_t) | (2 << 24)))

/* What a handle points at: a GPU (slot -1) or one MIG slot of it. */
typedef struct { int gpu; int slot; } handle_t;
typedef handle_t *nvmlDevice_t;

typedef struct {
    int present;
    char uuid[96];
    char name[96];
    unsigned long long total, free, reserved;
} device_t;

typedef struct { char dev[16]; int kind; unsigned int pid; unsigned long long bytes; int live; } proc_t;
typedef struct { char fn[96]; char dev[16]; int code; int from; } fail_t;
typedef struct { char fn[96]; char dev[16]; int nth; char fifo[512]; } hang_t;

typedef struct {
    int init_code;
    char driver[64];
    int ngpus;
    device_t gpus[MAX_GPUS];
    int mig_slots[MAX_GPUS];      /* 0: MIG off */
    int no_mig[MAX_GPUS];
    device_t mig[MAX_GPUS][MAX_SLOTS];
    int nprocs;
    proc_t procs[MAX_PROCS];
    int nfails;
    fail_t fails[MAX_RULES];
    int nhangs;
    hang_t hangs[MAX_RULES];
} config_t;

enum { COMPUTE = 0, GRAPHICS = 1, MPS = 2 };

static config_t cfg;
static handle_t handles[MAX_GPUS];
static handle_t mig_handles[MAX_GPUS][MAX_SLOTS];
static int initialised;

/* Calls counted per (function, device), for "from call" and "nth call". */
#define MAX_COUNTERS 256
static struct { char key[112]; int n; } counters[MAX_COUNTERS];
static int ncounters;

static int bump(const char *fn, const char *dev) {
    char key[112];
    snprintf(key, sizeof key, "%s %s", fn, dev);
    for (int i = 0; i < ncounters; i++)
        if (strcmp(counters[i].key, key) == 0)
            return ++counters[i].n;
    if (ncounters == MAX_COUNTERS)
        return 1;
    snprintf(counters[ncounters].key, sizeof counters[ncounters].key, "%s", key);
    counters[ncounters].n = 1;
    return counters[ncounters++].n;
}

static void rest_of_line(char *dst, size_t size, const char *src) {
    while (*src == ' ' || *src == '\t')
        src++;
    snprintf(dst, size, "%s", src);
    size_t n = strlen(dst);
    while (n && (dst[n - 1] == '\n' || dst[n - 1] == '\r' || dst[n - 1] == ' '))
        dst[--n] = 0;
}

static void load(void) {
    memset(&cfg, 0, sizeof cfg);
    snprintf(cfg.driver, sizeof cfg.driver, "535.183.01");
    const char *path = getenv("MEMGUARD_NVML_STANDIN");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f)
        return;
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char word[32] = "";
        int used = 0;
        if (line[0] == '#' || sscanf(line, "%31s%n", word, &used) != 1)
            continue;
        const char *p = line + used;
        if (strcmp(word, "init") == 0) {
            sscanf(p, "%d", &cfg.init_code);
        } else if (strcmp(word, "driver") == 0) {
            sscanf(p, "%63s", cfg.driver);
        } else if (strcmp(word, "gpu") == 0 || strcmp(word, "migdev") == 0) {
            int i = -1, slot = -1, n = 0;
            device_t d;
            memset(&d, 0, sizeof d);
            d.present = 1;
            if (word[0] == 'g') {
                if (sscanf(p, "%d %95s %llu %llu %llu %n", &i, d.uuid, &d.total, &d.free, &d.reserved, &n) < 5)
                    continue;
            } else if (sscanf(p, "%d %d %95s %llu %llu %llu %n", &i, &slot, d.uuid, &d.total, &d.free,
                              &d.reserved, &n) < 6) {
                continue;
            }
            rest_of_line(d.name, sizeof d.name, p + n);
            if (i < 0 || i >= MAX_GPUS)
                continue;
            if (slot < 0) {
                cfg.gpus[i] = d;
                if (i + 1 > cfg.ngpus)
                    cfg.ngpus = i + 1;
            } else if (slot < MAX_SLOTS) {
                cfg.mig[i][slot] = d;
            }
        } else if (strcmp(word, "mig") == 0) {
            int i, slots;
            if (sscanf(p, "%d %d", &i, &slots) == 2 && i >= 0 && i < MAX_GPUS)
                cfg.mig_slots[i] = slots > MAX_SLOTS ? MAX_SLOTS : slots;
        } else if (strcmp(word, "nomig") == 0) {
            int i;
            if (sscanf(p, "%d", &i) == 1 && i >= 0 && i < MAX_GPUS)
                cfg.no_mig[i] = 1;
        } else if (strcmp(word, "proc") == 0 && cfg.nprocs < MAX_PROCS) {
            proc_t *q = &cfg.procs[cfg.nprocs];
            char kind[16], bytes[32], live[8] = "";
            if (sscanf(p, "%15s %15s %u %31s %7s", q->dev, kind, &q->pid, bytes, live) < 4)
                continue;
            q->kind = strcmp(kind, "graphics") == 0 ? GRAPHICS : strcmp(kind, "mps") == 0 ? MPS : COMPUTE;
            q->bytes = strcmp(bytes, "na") == 0 ? NA_BYTES : strtoull(bytes, NULL, 10);
            q->live = strcmp(live, "live") == 0;
            cfg.nprocs++;
        } else if (strcmp(word, "fail") == 0 && cfg.nfails < MAX_RULES) {
            fail_t *r = &cfg.fails[cfg.nfails];
            r->from = 1;
            if (sscanf(p, "%95s %15s %d %d", r->fn, r->dev, &r->code, &r->from) >= 3)
                cfg.nfails++;
        } else if (strcmp(word, "hang") == 0 && cfg.nhangs < MAX_RULES) {
            hang_t *r = &cfg.hangs[cfg.nhangs];
            if (sscanf(p, "%95s %15s %d %511s", r->fn, r->dev, &r->nth, r->fifo) == 4)
                cfg.nhangs++;
        }
    }
    fclose(f);
}

static void dev_name(const handle_t *h, char *out, size_t size) {
    if (!h)
        snprintf(out, size, "-");
    else if (h->slot < 0)
        snprintf(out, size, "%d", h->gpu);
    else
        snprintf(out, size, "%d:%d", h->gpu, h->slot);
}

static int dev_matches(const char *pattern, const char *dev) {
    return strcmp(pattern, "*") == 0 || strcmp(pattern, dev) == 0;
}

static void wait_for_release(const char *fifo) {
    int fd;
    do
        fd = open(fifo, O_RDONLY);
    while (fd < 0 && errno == EINTR);
    if (fd < 0)
        return;
    char buf[64];
    while (read(fd, buf, sizeof buf) > 0)
        ;
    close(fd);
}

/* Every entry point starts here: reload the behaviour, log, count, hang, fail. */
static nvmlReturn_t enter(const char *fn, const handle_t *h) {
    char dev[16];
    load();
    dev_name(h, dev, sizeof dev);
    const char *log = getenv("MEMGUARD_NVML_STANDIN_LOG");
    if (log) {
        int fd = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (fd >= 0) {
            char line[160];
            int n = snprintf(line, sizeof line, "%s %s\n", fn, dev);
            if (write(fd, line, (size_t)n) < 0) { /* best effort */ }
            close(fd);
        }
    }
    int n = bump(fn, dev);
    for (int i = 0; i < cfg.nhangs; i++)
        if (strcmp(cfg.hangs[i].fn, fn) == 0 && dev_matches(cfg.hangs[i].dev, dev) && cfg.hangs[i].nth == n)
            wait_for_release(cfg.hangs[i].fifo);
    for (int i = 0; i < cfg.nfails; i++)
        if ((strcmp(cfg.fails[i].fn, fn) == 0 || strcmp(cfg.fails[i].fn, "*") == 0)
                && dev_matches(cfg.fails[i].dev, dev) && n >= cfg.fails[i].from)
            return cfg.fails[i].code;
    return NVML_SUCCESS;
}

static const device_t *device_of(const handle_t *h) {
    if (!h || h->gpu < 0 || h->gpu >= cfg.ngpus || !cfg.gpus[h->gpu].present)
        return NULL;
    if (h->slot < 0)
        return &cfg.gpus[h->gpu];
    if (h->slot >= cfg.mig_slots[h->gpu] || !cfg.mig[h->gpu][h->slot].present)
        return NULL;
    return &cfg.mig[h->gpu][h->slot];
}

static int alive(unsigned int pid) {
    char path[32];
    snprintf(path, sizeof path, "/proc/%u", pid);
    return access(path, F_OK) == 0;
}

/* Memory held by "live" processes (the libcuda stand-in's allocations) is no longer free. */
static unsigned long long free_of(const handle_t *h, const device_t *d) {
    char dev[16];
    unsigned long long held = 0;
    dev_name(h, dev, sizeof dev);
    for (int i = 0; i < cfg.nprocs; i++)
        if (cfg.procs[i].live && strcmp(cfg.procs[i].dev, dev) == 0 && cfg.procs[i].bytes != NA_BYTES
                && alive(cfg.procs[i].pid))
            held += cfg.procs[i].bytes;
    return d->free > held ? d->free - held : 0;
}

#define ENTER(fn, h)                                    \
    do {                                                \
        nvmlReturn_t r_ = enter(fn, h);                 \
        if (r_ != NVML_SUCCESS)                         \
            return r_;                                  \
        if (!initialised)                               \
            return NVML_ERROR_UNINITIALIZED;            \
    } while (0)

/* -- init ------------------------------------------------------------------ */

nvmlReturn_t nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    nvmlReturn_t r = enter("nvmlInit", NULL);
    if (r != NVML_SUCCESS)
        return r;
    if (cfg.init_code != NVML_SUCCESS)
        return cfg.init_code;
    initialised++;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

nvmlReturn_t nvmlShutdown(void) {
    ENTER("nvmlShutdown", NULL);
    initialised--;
    return NVML_SUCCESS;
}

const char *nvmlErrorString(nvmlReturn_t result) {
    switch (result) {
    case 0: return "Success";
    case 3: return "Not Supported";
    case 13: return "Function Not Found";
    case 15: return "GPU is lost";
    case 999: return "Unknown Error";
    default: return "Unknown Error";
    }
}

nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    ENTER("nvmlSystemGetDriverVersion", NULL);
    snprintf(version, length, "%s", cfg.driver);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length) {
    ENTER("nvmlSystemGetNVMLVersion", NULL);
    snprintf(version, length, "12.%s", cfg.driver);
    return NVML_SUCCESS;
}

/* -- devices --------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) {
    ENTER("nvmlDeviceGetCount", NULL);
    *count = (unsigned int)cfg.ngpus;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return nvmlDeviceGetCount_v2(count); }

nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    handle_t probe = {(int)index, -1};
    ENTER("nvmlDeviceGetHandleByIndex", &probe);
    if (index >= (unsigned int)cfg.ngpus || !cfg.gpus[index].present)
        return NVML_ERROR_INVALID_ARGUMENT;
    handles[index] = probe;
    *device = &handles[index];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, nvmlDevice_t *device) {
    return nvmlDeviceGetHandleByIndex_v2(index, device);
}

nvmlReturn_t nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    ENTER("nvmlDeviceGetUUID", device);
    const device_t *d = device_of(device);
    if (!d)
        return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(uuid, length, "%s", d->uuid);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    ENTER("nvmlDeviceGetName", device);
    const device_t *d = device_of(device);
    if (!d)
        return NVML_ERROR_INVALID_ARGUMENT;
    snprintf(name, length, "%s", d->name);
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    ENTER("nvmlDeviceGetMemoryInfo", device);
    const device_t *d = device_of(device);
    if (!d)
        return NVML_ERROR_INVALID_ARGUMENT;
    /* v1: used counts reserved memory in (R525 and later): used = total - free. */
    memory->total = d->total;
    memory->free = free_of(device, d);
    memory->used = d->total - memory->free;
    return NVML_SUCCESS;
}

#ifdef HAVE_MEMORY_V2
nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t device, nvmlMemory_v2_t *memory) {
    ENTER("nvmlDeviceGetMemoryInfo_v2", device);
    const device_t *d = device_of(device);
    if (!d)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (memory->version != nvmlMemory_v2)
        return NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    /* v2: reserved memory is accounted separately from used. */
    memory->total = d->total;
    memory->reserved = d->reserved;
    memory->free = free_of(device, d);
    memory->used = d->total - memory->free - d->reserved;
    return NVML_SUCCESS;
}
#endif

/* -- MIG ----------------------------------------------------------------- */

nvmlReturn_t nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    ENTER("nvmlDeviceGetMigMode", device);
    if (!device_of(device))
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->slot >= 0 || cfg.no_mig[device->gpu])
        return NVML_ERROR_NOT_SUPPORTED;
    *current = *pending = cfg.mig_slots[device->gpu] > 0;
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    ENTER("nvmlDeviceGetMaxMigDeviceCount", device);
    if (!device_of(device))
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->slot >= 0 || cfg.no_mig[device->gpu])
        return NVML_ERROR_NOT_SUPPORTED;
    *count = (unsigned int)cfg.mig_slots[device->gpu];
    return NVML_SUCCESS;
}

nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    ENTER("nvmlDeviceGetMigDeviceHandleByIndex", device);
    if (!device_of(device) || device->slot >= 0)
        return NVML_ERROR_INVALID_ARGUMENT;
    int g = device->gpu;
    if (cfg.mig_slots[g] == 0)
        return NVML_ERROR_NOT_SUPPORTED;
    if (index >= (unsigned int)cfg.mig_slots[g])
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!cfg.mig[g][index].present)
        return NVML_ERROR_NOT_FOUND;
    mig_handles[g][index].gpu = g;
    mig_handles[g][index].slot = (int)index;
    *mig = &mig_handles[g][index];
    return NVML_SUCCESS;
}

/* -- process lists --------------------------------------------------------- */

/* The processes of one kind on a device, one entry per pid (entries of one pid add up). */
static int collect(const handle_t *h, int kind, nvmlProcessInfo_v2_t *out) {
    char dev[16];
    int n = 0;
    dev_name(h, dev, sizeof dev);
    for (int i = 0; i < cfg.nprocs; i++) {
        const proc_t *q = &cfg.procs[i];
        if (q->kind != kind || strcmp(q->dev, dev) != 0 || (q->live && !alive(q->pid)))
            continue;
        int j = 0;
        while (j < n && out[j].pid != q->pid)
            j++;
        if (j == n) {
            out[n].pid = q->pid;
            out[n].usedGpuMemory = 0;
            /* Outside MIG NVML reports both ids as NVML_VALUE_NOT_AVAILABLE (0xFFFFFFFF). */
            out[n].gpuInstanceId = h->slot < 0 ? 0xFFFFFFFFu : (unsigned int)h->slot + 1;
            out[n].computeInstanceId = h->slot < 0 ? 0xFFFFFFFFu : 0;
            n++;
        }
        if (q->bytes == NA_BYTES || out[j].usedGpuMemory == NA_BYTES)
            out[j].usedGpuMemory = NA_BYTES;
        else
            out[j].usedGpuMemory += q->bytes;
    }
    return n;
}

/* NVML's protocol: *count is the room in infos; too little room is INSUFFICIENT_SIZE with the need. */
static nvmlReturn_t list(const char *fn, nvmlDevice_t device, int kind, int version, unsigned int *count,
                         void *infos) {
    ENTER(fn, device);
    if (!device_of(device))
        return NVML_ERROR_INVALID_ARGUMENT;
    if (device->slot < 0 && cfg.mig_slots[device->gpu] > 0)
        return NVML_ERROR_NOT_SUPPORTED;  /* a MIG parent has no process list of its own */
    nvmlProcessInfo_v2_t found[MAX_PROCS];
    int n = collect(device, kind, found);
    if (*count < (unsigned int)n) {
        *count = (unsigned int)n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    *count = (unsigned int)n;
    for (int i = 0; i < n; i++) {
        if (version == 1) {
            nvmlProcessInfo_v1_t *v1 = (nvmlProcessInfo_v1_t *)infos + i;
            v1->pid = found[i].pid;
            v1->usedGpuMemory = found[i].usedGpuMemory;
        } else {
            ((nvmlProcessInfo_v2_t *)infos)[i] = found[i];
        }
    }
    return NVML_SUCCESS;
}

#define LIST(symbol, kind, version) \
    nvmlReturn_t symbol(nvmlDevice_t device, unsigned int *count, void *infos) { \
        return list(#symbol, device, kind, version, count, infos); \
    }

LIST(nvmlDeviceGetComputeRunningProcesses, COMPUTE, 1)
LIST(nvmlDeviceGetGraphicsRunningProcesses, GRAPHICS, 1)
#ifdef HAVE_V2
LIST(nvmlDeviceGetComputeRunningProcesses_v2, COMPUTE, 2)
LIST(nvmlDeviceGetGraphicsRunningProcesses_v2, GRAPHICS, 2)
#endif
#ifdef HAVE_MPS
LIST(nvmlDeviceGetMPSComputeRunningProcesses, MPS, 1)
#endif
#ifdef HAVE_MPS_V2
LIST(nvmlDeviceGetMPSComputeRunningProcesses_v2, MPS, 2)
#endif
#ifdef HAVE_V3
LIST(nvmlDeviceGetComputeRunningProcesses_v3, COMPUTE, 3)
LIST(nvmlDeviceGetGraphicsRunningProcesses_v3, GRAPHICS, 3)
LIST(nvmlDeviceGetMPSComputeRunningProcesses_v3, MPS, 3)
#endif
