// Casts between f32 and bf16 for mixed precision: the master weights, gradients and optimizer
// state stay f32; the GEMM inputs are bf16 copies. f32 -> bf16 rounds to nearest even
// (__float2bfloat16_rn), as torch's .to(torch.bfloat16); bf16 -> f32 is exact.

#include <cuda_bf16.h>

extern "C" __global__ void cast_f32_to_bf16(__nv_bfloat16* dst, const float* src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] = __float2bfloat16_rn(src[i]);
    }
}

// dst[i] += float(src[i]): a bf16 GEMM's output added into an f32 result or gradient.
extern "C" __global__ void add_bf16_to_f32(float* dst, const __nv_bfloat16* src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] += __bfloat162float(src[i]);
    }
}

extern "C" __global__ void cast_bf16_to_f32(float* dst, const __nv_bfloat16* src, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dst[i] = __bfloat162float(src[i]);
    }
}
