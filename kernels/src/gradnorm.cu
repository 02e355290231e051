// The global L2 norm of the flat gradient buffer and clipping by it, the CUDA twin of
// gradnorm.rs (torch.nn.utils.clip_grad_norm_: coef = max_norm / (norm + 1e-6), applied when
// below 1).
//
// The sum of squares is taken in f64, deterministically: sumsq_partials_f64 gives each block of
// GN_BLOCK elements to one thread block, which squares and sums in a fixed tree order in shared
// memory; sumsq_reduce_f64 (one block) adds the partials in block order. The norm is then
// sqrt(total) rounded to f32 on the host, which also computes coef and launches scale_f32 when
// clipping applies.

#define GN_BLOCK 16384
#define GN_THREADS 256

extern "C" __global__ void sumsq_partials_f64(double* partials, const float* grads, long long n) {
    __shared__ double acc[GN_THREADS];
    long long start = (long long)blockIdx.x * GN_BLOCK;
    long long end = min(n, start + GN_BLOCK);
    double s = 0.0;
    for (long long i = start + threadIdx.x; i < end; i += GN_THREADS) {
        double g = (double)grads[i];
        s += g * g;
    }
    acc[threadIdx.x] = s;
    __syncthreads();
    for (int stride = GN_THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) acc[threadIdx.x] += acc[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) partials[blockIdx.x] = acc[0];
}

// out[0] = partials[0] + partials[1] + ... in order (launch with one thread).
extern "C" __global__ void sumsq_reduce_f64(double* out, const double* partials, int blocks) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double s = 0.0;
    for (int b = 0; b < blocks; ++b) s += partials[b];
    out[0] = s;
}

// x[i] *= coef
extern "C" __global__ void scale_f32(float* x, float coef, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] *= coef;
    }
}
