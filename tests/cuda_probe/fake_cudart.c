/* A stand-in CUDA device for ONNX Runtime's CUDA provider on a machine without a GPU.
 *
 * Why: onnxruntime-gpu's graph partitioner (which node gets a CUDA kernel, which shape nodes ORT
 * keeps on the CPU) is the same code with or without a GPU, but the provider's constructor asks
 * the CUDA runtime for a device first. Preloaded (LD_PRELOAD), these definitions answer those
 * questions for one device, so a session gets as far as ORT's "Node placements" log and its
 * "fallback to CPU EP has been explicitly disabled" refusal: exactly what a GPU session would do
 * up to there. Nothing runs: the first real allocation or kernel launch fails, after placement.
 * Used by tests/cuda_probe/placement.py; built by `make setup-cudaprobe`. */
#include <string.h>
int cudaSetDevice(int d) { return 0; }
int cudaGetDevice(int *d) { *d = 0; return 0; }
int cudaGetDeviceCount(int *n) { *n = 1; return 0; }
/* only the head of cudaDeviceProp is cleared: the caller's struct is larger, never smaller */
int cudaGetDeviceProperties_v2(void *p, int d) { memset(p, 0, 256); return 0; }
int cudaGetDeviceProperties(void *p, int d) { memset(p, 0, 256); return 0; }
int cudaDeviceGetAttribute(int *v, int a, int d) { *v = 0; return 0; }
int cudaGetLastError(void) { return 0; }
int cudaRuntimeGetVersion(int *v) { *v = 13000; return 0; }
int cudaDriverGetVersion(int *v) { *v = 13000; return 0; }
int cudaDeviceSynchronize(void) { return 0; }
int cudaSetDeviceFlags(unsigned f) { return 0; }
int cudaDeviceSetLimit(int l, unsigned long v) { return 0; }
int cudaDeviceGetLimit(unsigned long *v, int l) { *v = 0; return 0; }
int cudaMemGetInfo(unsigned long *f, unsigned long *t) { *f = 1ul << 34; *t = 1ul << 34; return 0; }
int cudaStreamCreate(void **s) { *s = (void *)0x1; return 0; }
int cudaStreamCreateWithFlags(void **s, unsigned f) { *s = (void *)0x1; return 0; }
int cudaStreamCreateWithPriority(void **s, unsigned f, int p) { *s = (void *)0x1; return 0; }
int cudaStreamDestroy(void *s) { return 0; }
int cudaStreamSynchronize(void *s) { return 0; }
int cudaEventCreate(void **e) { *e = (void *)0x1; return 0; }
int cudaEventCreateWithFlags(void **e, unsigned f) { *e = (void *)0x1; return 0; }
int cudaEventDestroy(void *e) { return 0; }
int cudaFuncGetAttributes(void *a, const void *f) { return 0; }
int cudaPointerGetAttributes(void *a, const void *p) { return 0; }
static char arena[1 << 20];
int cudaMalloc(void **p, unsigned long n) { *p = arena; return 0; }
int cudaFree(void *p) { return 0; }
int cudaMallocHost(void **p, unsigned long n) { *p = arena; return 0; }
int cudaHostAlloc(void **p, unsigned long n, unsigned f) { *p = arena; return 0; }
int cudaFreeHost(void *p) { return 0; }
int cublasCreate_v2(void **h) { *h = (void *)0x1; return 0; }
int cublasLtCreate(void **h) { *h = (void *)0x1; return 0; }
int cublasSetStream_v2(void *h, void *s) { return 0; }
int cublasSetMathMode(void *h, int m) { return 0; }
int cublasDestroy_v2(void *h) { return 0; }
int cublasLtDestroy(void *h) { return 0; }
int cudnnCreate(void **h) { *h = (void *)0x1; return 0; }
int cudnnSetStream(void *h, void *s) { return 0; }
int cudnnDestroy(void *h) { return 0; }
