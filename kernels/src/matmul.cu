// The non-GEMM parts of a dense layer, the CUDA twins of matmul.rs. The products themselves are
// cuBLAS calls (kernels/src/device.rs: out = inp @ W^T, dinp += dout @ W, dW += dout^T @ inp,
// weights stored [OC, C] as torch stores them, transposes expressed through cuBLAS's op flags).
//
//   bias_rows_f32             out[i, j] = bias[j]          (out [N, OC]); the forward GEMM then
//                                                           accumulates into it (beta = 1)
//   column_sum_accumulate_f32 acc[j] += sum_i x[i, j]      (x [N, OC]): the bias gradient
//
// column_sum_accumulate_f32 gives each column to one thread, which adds the rows in order: the
// CPU twin's order of additions, so the bias gradient is bit-identical to it. Columns of
// neighbouring threads are neighbours in memory, so each row's loads coalesce.

extern "C" __global__ void bias_rows_f32(float* out, const float* bias, long long n, int oc) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n * oc;
         i += (long long)gridDim.x * blockDim.x) {
        out[i] = bias[i % oc];
    }
}

extern "C" __global__ void column_sum_accumulate_f32(float* acc, const float* x, long long n, int oc) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= oc) return;
    float a = acc[j];
    for (long long i = 0; i < n; ++i) a += x[i * oc + j];
    acc[j] = a;
}
