/*
 * A stand-in for the CUDA driver library (libcuda.so.1), for tests of scripts/gpu-check without a GPU.
 *
 * It knows the devices of the NVML stand-in's behaviour file ($MEMGUARD_NVML_STANDIN, see
 * libnvidia-ml.c), honours CUDA_VISIBLE_DEVICES (NVML indexes or GPU-/MIG- UUIDs), and
 * records each cuMemAlloc as a line "proc <dev> compute <pid> <bytes> live" appended to that
 * file, so the NVML stand-in then lists the allocating process with its memory for as long
 * as the process lives, exactly as NVIDIA's driver would.
 *
 * Only what gpu-check's filler calls exists: cuInit, cuDriverGetVersion, cuDeviceGetCount,
 * cuDeviceGet, cuDeviceGetName, cuDeviceGetUuid(_v2), cuDeviceTotalMem_v2, cuCtxCreate_v2,
 * cuDevicePrimaryCtxRetain, cuCtxSetCurrent, cuMemAlloc_v2, cuMemsetD8_v2, cuMemFree_v2,
 * cuMemGetInfo_v2, cuGetErrorName, cuGetErrorString.
 */

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int CUresult;
typedef int CUdevice;
typedef void *CUcontext;
typedef unsigned long long CUdeviceptr;
typedef struct { char bytes[16]; } CUuuid;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_CONTEXT = 201,
};

#define MAX_DEVS 16

typedef struct {
    char dev[16];   /* NVML's name for it: "0" or "0:1" */
    char uuid[96];
    char name[96];
    unsigned long long total, free;
} cudev_t;

static cudev_t all[MAX_DEVS];
static int nall;
static cudev_t visible[MAX_DEVS];
static int nvisible;
static int initialised;
static int current = -1;
static unsigned long long allocated[MAX_DEVS];
static CUdeviceptr next_ptr = 0x7f0000000000ULL;

static void load_devices(void) {
    nall = 0;
    const char *path = getenv("MEMGUARD_NVML_STANDIN");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f)
        return;
    char line[1024];
    while (fgets(line, sizeof line, f) && nall < MAX_DEVS) {
        cudev_t d;
        int i, slot, n = 0;
        unsigned long long reserved;
        memset(&d, 0, sizeof d);
        if (sscanf(line, "gpu %d %95s %llu %llu %llu %n", &i, d.uuid, &d.total, &d.free, &reserved, &n) >= 5) {
            snprintf(d.dev, sizeof d.dev, "%d", i);
        } else if (sscanf(line, "migdev %d %d %95s %llu %llu %llu %n", &i, &slot, d.uuid, &d.total, &d.free,
                          &reserved, &n) >= 6) {
            snprintf(d.dev, sizeof d.dev, "%d:%d", i, slot);
        } else {
            continue;
        }
        snprintf(d.name, sizeof d.name, "%s", line + n);
        d.name[strcspn(d.name, "\r\n")] = 0;
        all[nall++] = d;
    }
    fclose(f);
}

/* CUDA_VISIBLE_DEVICES: a comma-separated list of NVML indexes or UUIDs; unset shows every GPU. */
static void select_visible(void) {
    nvisible = 0;
    const char *env = getenv("CUDA_VISIBLE_DEVICES");
    if (!env) {
        for (int i = 0; i < nall; i++)
            if (!strchr(all[i].dev, ':'))
                visible[nvisible++] = all[i];
        return;
    }
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", env);
    for (char *tok = strtok(buf, ","); tok && nvisible < MAX_DEVS; tok = strtok(NULL, ",")) {
        int found = -1;
        for (int i = 0; i < nall && found < 0; i++)
            if (strcmp(all[i].uuid, tok) == 0 || (!strchr(all[i].dev, ':') && strcmp(all[i].dev, tok) == 0))
                found = i;
        if (found < 0)
            break;  /* CUDA stops at the first entry it cannot resolve */
        visible[nvisible++] = all[found];
    }
}

CUresult cuInit(unsigned int flags) {
    (void)flags;
    load_devices();
    select_visible();
    initialised = 1;
    return nvisible ? CUDA_SUCCESS : CUDA_ERROR_NO_DEVICE;
}

CUresult cuDriverGetVersion(int *version) {
    *version = 12020;
    return CUDA_SUCCESS;
}

#define NEED_INIT() do { if (!initialised) return CUDA_ERROR_NOT_INITIALIZED; } while (0)
#define NEED_DEV(d) do { NEED_INIT(); if ((d) < 0 || (d) >= nvisible) return CUDA_ERROR_INVALID_DEVICE; } while (0)

CUresult cuDeviceGetCount(int *count) {
    NEED_INIT();
    *count = nvisible;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    NEED_DEV(ordinal);
    *device = ordinal;
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetName(char *name, int len, CUdevice dev) {
    NEED_DEV(dev);
    snprintf(name, (size_t)len, "%s", visible[dev].name);
    return CUDA_SUCCESS;
}

static int hex(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* The 16 bytes of "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (or MIG-...). */
CUresult cuDeviceGetUuid(CUuuid *uuid, CUdevice dev) {
    NEED_DEV(dev);
    const char *p = strchr(visible[dev].uuid, '-');
    int n = 0;
    memset(uuid, 0, sizeof *uuid);
    for (p = p ? p + 1 : visible[dev].uuid; *p && n < 32; p++) {
        int v = hex(*p);
        if (v < 0)
            continue;
        uuid->bytes[n / 2] = (char)(n % 2 ? (uuid->bytes[n / 2] | v) : (v << 4));
        n++;
    }
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetUuid_v2(CUuuid *uuid, CUdevice dev) { return cuDeviceGetUuid(uuid, dev); }

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice dev) {
    NEED_DEV(dev);
    *bytes = (size_t)visible[dev].total;
    return CUDA_SUCCESS;
}

CUresult cuCtxCreate_v2(CUcontext *ctx, unsigned int flags, CUdevice dev) {
    (void)flags;
    NEED_DEV(dev);
    current = dev;
    *ctx = &visible[dev];
    return CUDA_SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(CUcontext *ctx, CUdevice dev) {
    NEED_DEV(dev);
    *ctx = &visible[dev];
    return CUDA_SUCCESS;
}

CUresult cuCtxSetCurrent(CUcontext ctx) {
    NEED_INIT();
    for (int i = 0; i < nvisible; i++)
        if (ctx == &visible[i]) {
            current = i;
            return CUDA_SUCCESS;
        }
    return CUDA_ERROR_INVALID_CONTEXT;
}

CUresult cuMemGetInfo_v2(size_t *free_bytes, size_t *total) {
    NEED_INIT();
    if (current < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    unsigned long long used = allocated[current];
    *total = (size_t)visible[current].total;
    *free_bytes = (size_t)(visible[current].free > used ? visible[current].free - used : 0);
    return CUDA_SUCCESS;
}

CUresult cuMemAlloc_v2(CUdeviceptr *ptr, size_t bytes) {
    NEED_INIT();
    if (current < 0)
        return CUDA_ERROR_INVALID_CONTEXT;
    if (allocated[current] + bytes > visible[current].free)
        return CUDA_ERROR_OUT_OF_MEMORY;
    const char *path = getenv("MEMGUARD_NVML_STANDIN");
    if (path) {
        int fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
        if (fd >= 0) {
            char line[160];
            int n = snprintf(line, sizeof line, "proc %s compute %d %zu live\n", visible[current].dev,
                             (int)getpid(), bytes);
            if (write(fd, line, (size_t)n) < 0) { /* best effort */ }
            close(fd);
        }
    }
    allocated[current] += bytes;
    *ptr = next_ptr;
    next_ptr += (bytes + 0xfffff) & ~0xfffffULL;
    return CUDA_SUCCESS;
}

CUresult cuMemsetD8_v2(CUdeviceptr ptr, unsigned char value, size_t n) {
    (void)ptr; (void)value; (void)n;
    NEED_INIT();
    return current < 0 ? CUDA_ERROR_INVALID_CONTEXT : CUDA_SUCCESS;
}

CUresult cuMemFree_v2(CUdeviceptr ptr) {
    (void)ptr;
    NEED_INIT();
    return CUDA_SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    switch (error) {
    case CUDA_SUCCESS: *name = "CUDA_SUCCESS"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
    case CUDA_ERROR_NO_DEVICE: *name = "CUDA_ERROR_NO_DEVICE"; break;
    default: *name = "CUDA_ERROR_UNKNOWN"; break;
    }
    return CUDA_SUCCESS;
}

CUresult cuGetErrorString(CUresult error, const char **text) {
    switch (error) {
    case CUDA_SUCCESS: *text = "no error"; break;
    case CUDA_ERROR_OUT_OF_MEMORY: *text = "out of memory"; break;
    case CUDA_ERROR_NO_DEVICE: *text = "no CUDA-capable device is detected"; break;
    default: *text = "unknown error"; break;
    }
    return CUDA_SUCCESS;
}
