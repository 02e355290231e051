// Fused softmax cross-entropy with ignore_index = -100, the CUDA twin of crossentropy.rs.
// losses [N], logits / dlogits [N, V], targets [N] (int64, as torch and the CPU twin take them).
// Forward: losses[r] = logsumexp(z) - z[target] (0 for ignored rows; the host counts the rows).
// Backward: dlogits[r, :] = dloss_scale * (softmax(z) - onehot(target)) for counted rows, 0 for ignored ones.
//
// One block per row: the row max and the sum of exponentials are block reductions (warp
// shuffles, then one value per warp through shared memory), in a fixed order, so a row's result
// is the same on every run. V is 2..8 for a classifier and 30522 for BERT's masked-LM head.

#define CE_IGNORE (-100LL)
#define CE_NEG_INF __int_as_float(0xff800000)  // -inf (NVRTC has no <math.h> macros)

__device__ float block_reduce(float v, bool is_max) {
    __shared__ float warp_vals[32];
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float other = __shfl_xor_sync(0xffffffffu, v, o);
        v = is_max ? fmaxf(v, other) : v + other;
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = (blockDim.x + 31) / 32;
    __syncthreads();  // warp_vals may still be read by a previous reduction
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    float r = is_max ? CE_NEG_INF : 0.0f;
    for (int w = 0; w < warps; ++w) r = is_max ? fmaxf(r, warp_vals[w]) : r + warp_vals[w];
    return r;
}

// max and log(sum(exp(z - max))) of one row, in every thread of the block.
__device__ void row_max_lse(const float* z, int v, float* max_out, float* lse_out) {
    float m = CE_NEG_INF;
    for (int j = threadIdx.x; j < v; j += blockDim.x) m = fmaxf(m, z[j]);
    m = block_reduce(m, true);
    float s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) s += expf(z[j] - m);
    s = block_reduce(s, false);
    *max_out = m;
    *lse_out = logf(s);
}

extern "C" __global__ void crossentropy_forward_f32(float* losses, const float* logits, const long long* targets, int n, int v) {
    int row = blockIdx.x;
    if (row >= n) return;
    long long t = targets[row];
    if (t == CE_IGNORE) { if (threadIdx.x == 0) losses[row] = 0.0f; return; }
    const float* z = logits + (long long)row * v;
    float m, lse;
    row_max_lse(z, v, &m, &lse);
    if (threadIdx.x == 0) losses[row] = lse - (z[t] - m);
}

extern "C" __global__ void crossentropy_backward_f32(
    float* dlogits, const float* logits, const long long* targets, float dloss_scale, int n, int v)
{
    int row = blockIdx.x;
    if (row >= n) return;
    long long t = targets[row];
    float* d = dlogits + (long long)row * v;
    if (t == CE_IGNORE) {
        for (int j = threadIdx.x; j < v; j += blockDim.x) d[j] = 0.0f;
        return;
    }
    const float* z = logits + (long long)row * v;
    float m, lse;
    row_max_lse(z, v, &m, &lse);
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float p = expf(z[j] - m - lse);
        float y = (j == t) ? 1.0f : 0.0f;
        d[j] = dloss_scale * (p - y);
    }
}
