// Layer normalisation over the last dimension, the CUDA twin of layernorm.rs:
// out = (x - mean) * rstd * weight + bias, rstd = 1 / sqrt(var + eps), biased variance, as
// torch.nn.LayerNorm. Forward saves mean and rstd per row.
//
// Shapes: out, inp, dinp, dout [N, C]; mean, rstd [N]; weight, bias, dweight, dbias [C].
//
// Forward and the input gradient: one warp per row (C is 384..1024 for BERT: each lane takes
// every 32nd element, the row sums are warp shuffles). Backward of the input, with
// n = (x - mean) * rstd and g = weight * dout: dx += rstd * (g - mean(g) - n * mean(g * n)).
//
// The parameter gradients (dweight += sum_rows dout * n, dbias += sum_rows dout) are sums over
// all rows, made deterministic the way the CPU makes them: layernorm_param_partials_f32 sums each
// block of 64 rows in row order (one thread per column) into scratch [ceil(N / 64), 2C], and
// layernorm_param_reduce_f32 adds the blocks in block order. Same products, same order: the
// parameter gradients equal the CPU's bit for bit given the same mean and rstd.

#define LN_PARAM_BLOCK 64

__device__ __forceinline__ float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void layernorm_forward_f32(
    float* out, float* mean, float* rstd,
    const float* inp, const float* weight, const float* bias,
    int n, int c, float eps)
{
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;
    const float* x = inp + (long long)row * c;
    float s = 0.0f;
    for (int i = lane; i < c; i += 32) s += x[i];
    float mu = warp_sum(s) / (float)c;
    float v = 0.0f;
    for (int i = lane; i < c; i += 32) { float d = x[i] - mu; v += d * d; }
    float rs = 1.0f / sqrtf(warp_sum(v) / (float)c + eps);
    float* o = out + (long long)row * c;
    for (int i = lane; i < c; i += 32) o[i] = (x[i] - mu) * rs * weight[i] + bias[i];
    if (lane == 0) { mean[row] = mu; rstd[row] = rs; }
}

extern "C" __global__ void layernorm_backward_f32(
    float* dinp, const float* dout, const float* inp, const float* weight,
    const float* mean, const float* rstd, int n, int c)
{
    int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (row >= n) return;
    const float* x = inp + (long long)row * c;
    const float* g = dout + (long long)row * c;
    float mu = mean[row], rs = rstd[row];
    float g_sum = 0.0f, gn_sum = 0.0f;
    for (int i = lane; i < c; i += 32) {
        float norm = (x[i] - mu) * rs;
        float wg = weight[i] * g[i];
        g_sum += wg;
        gn_sum += wg * norm;
    }
    float g_mean = warp_sum(g_sum) / (float)c;
    float gn_mean = warp_sum(gn_sum) / (float)c;
    float* dx = dinp + (long long)row * c;
    for (int i = lane; i < c; i += 32) {
        float norm = (x[i] - mu) * rs;
        dx[i] = rs * (weight[i] * g[i] - g_mean - norm * gn_mean);
    }
}

// scratch[blk][i] = sum over the block's rows of dout * (x - mean) * rstd; scratch[blk][C + i]
// = sum of dout. Grid: (ceil(C / blockDim.x), ceil(N / 64)).
extern "C" __global__ void layernorm_param_partials_f32(
    float* scratch, const float* dout, const float* inp,
    const float* mean, const float* rstd, int n, int c)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int blk = blockIdx.y;
    if (i >= c) return;
    float dw = 0.0f, db = 0.0f;
    int end = min(n, (blk + 1) * LN_PARAM_BLOCK);
    for (int row = blk * LN_PARAM_BLOCK; row < end; ++row) {
        long long at = (long long)row * c + i;
        float g = dout[at];
        dw += g * (inp[at] - mean[row]) * rstd[row];
        db += g;
    }
    scratch[(long long)blk * 2 * c + i] = dw;
    scratch[(long long)blk * 2 * c + c + i] = db;
}

// dweight[i] += the blocks' partials in block order; likewise dbias.
extern "C" __global__ void layernorm_param_reduce_f32(
    float* dweight, float* dbias, const float* scratch, int blocks, int c)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c) return;
    float dw = dweight[i], db = dbias[i];
    for (int b = 0; b < blocks; ++b) {
        dw += scratch[(long long)b * 2 * c + i];
        db += scratch[(long long)b * 2 * c + c + i];
    }
    dweight[i] = dw;
    dbias[i] = db;
}
