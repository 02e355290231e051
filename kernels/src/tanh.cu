// Tanh, the pooler's activation, the CUDA twin of tanh.rs: out = tanh(inp); backward from the
// saved output: dinp += (1 - out^2) * dout. One thread per element, grid-stride.

extern "C" __global__ void tanh_forward_f32(float* out, const float* inp, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = tanhf(inp[i]);
    }
}

extern "C" __global__ void tanh_backward_f32(float* dinp, const float* out, const float* dout, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float y = out[i];
        dinp[i] += (1.0f - y * y) * dout[i];
    }
}
