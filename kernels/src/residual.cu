// Residual connections, the CUDA twin of residual.rs: out = a + b; backward adds dout into both
// inputs' gradients (add_inplace twice). Memory-bound: one thread per element, grid-stride.

extern "C" __global__ void residual_forward_f32(float* out, const float* a, const float* b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = a[i] + b[i];
    }
}

// acc[i] += x[i]
extern "C" __global__ void add_inplace_f32(float* acc, const float* x, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        acc[i] += x[i];
    }
}
