// The non-GEMM parts of multi-head attention, the CUDA twins of attention.rs. The GEMMs
// (S = scale * Q K^T, O = P' V and their backward products) are cuBLAS strided-batched calls
// over the [B * NH] (example, head) blocks; dropout on the probabilities is dropout.cu with
// H = NH, W = T and t_max = w_max = max_position_embeddings. What is left:
//
//   split_heads / merge_heads    [B, T, NH*HD] <-> [B, NH, T, HD] (each the other's backward)
//   softmax_forward_f32          P = softmax(S + mask[b, None, :]) over keys, in place on S; with
//                                segments (else null), keys of another segment score f32::MIN
//   softmax_backward_f32         dS = P * (dP - rowsum(P * dP)), in place on dP
//
// S, P, dP are [B, NH, T, T]; mask is [B, T], additive (0, or a large negative for padding, so
// padded keys get exactly zero weight). One warp per row of T scores: BERT's T is <= 512, so a
// lane holds <= 16 values; the max and the sums are warp shuffles.

__device__ __forceinline__ float warp_max(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The [B, T, NH*HD] offset of element i of a [B, NH, T, HD] tensor.
__device__ __forceinline__ long long btc_of_bhtd(long long i, int nh, int t, int hd) {
    int d = (int)(i % hd);
    int ti = (int)((i / hd) % t);
    int h = (int)((i / ((long long)hd * t)) % nh);
    long long bi = i / ((long long)hd * t * nh);
    return (bi * t + ti) * (long long)(nh * hd) + h * hd + d;
}

// The [B, NH, T, HD] offset of element i of a [B, T, NH*HD] tensor.
__device__ __forceinline__ long long bhtd_of_btc(long long i, int nh, int t, int hd) {
    int col = (int)(i % (nh * hd));
    long long bt = i / (nh * hd);
    int h = col / hd, d = col % hd;
    long long bi = bt / t;
    int ti = (int)(bt % t);
    return ((bi * nh + h) * t + ti) * (long long)hd + d;
}

#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// dst[b, h, t, d] = src[b, t, h * HD + d]. One thread per element of dst, grid-stride.
extern "C" __global__ void split_heads_f32(float* dst, const float* src, int b, int nh, int t, int hd) {
    GRID_STRIDE(i, (long long)b * nh * t * hd) dst[i] = src[btc_of_bhtd(i, nh, t, hd)];
}

// dst[b, t, h * HD + d] = src[b, h, t, d]. One thread per element of dst.
extern "C" __global__ void merge_heads_f32(float* dst, const float* src, int b, int nh, int t, int hd) {
    GRID_STRIDE(i, (long long)b * nh * t * hd) dst[i] = src[bhtd_of_btc(i, nh, t, hd)];
}

// In place: each row s of S [B, NH, T, T] becomes softmax(s + mask[b, :]).
extern "C" __global__ void softmax_forward_f32(
    float* s, const float* mask, const unsigned int* segments, int b, int nh, int t)
{
    long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= (long long)b * nh * t) return;
    long long bi = row / ((long long)nh * t);
    int qi = (int)(row % t);
    float* x = s + row * t;
    const float* m = mask + bi * t;
    const unsigned int* sg = segments ? segments + bi * t : 0;
    float mx = __int_as_float(0xff800000);  // -inf
    for (int j = lane; j < t; j += 32) {
        float v = x[j] + m[j];
        if (sg && sg[j] != sg[qi]) v = -3.40282347e38f;  // f32::MIN
        x[j] = v;
        mx = fmaxf(mx, v);
    }
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < t; j += 32) { float e = expf(x[j] - mx); x[j] = e; sum += e; }
    float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < t; j += 32) x[j] *= inv;
}

// In place: each row dp of dP becomes dS = p * (dp - sum(p * dp)), p the same row of P.
extern "C" __global__ void softmax_backward_f32(float* dp, const float* p, int rows, int t) {
    long long row = blockIdx.x * (long long)(blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= rows) return;
    float* g = dp + row * t;
    const float* y = p + row * t;
    float dot = 0.0f;
    for (int j = lane; j < t; j += 32) dot += y[j] * g[j];
    dot = warp_sum(dot);
    for (int j = lane; j < t; j += 32) g[j] = y[j] * (g[j] - dot);
}
