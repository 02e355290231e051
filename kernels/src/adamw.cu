// AdamW, the CUDA twin of adamw.rs: torch.optim.AdamW's arithmetic element by element. The
// scalar factors are formed on the host in f64 (as Python floats are in torch), rounded to f32,
// and passed in, so that the device does exactly the CPU's f32 operations:
//
//   p = p * decay                     (decay = 1 - lr * weight_decay; skipped when apply_decay = 0)
//   m = m + one_minus_b1 * (g - m)
//   v = v * b2 + one_minus_b2 * g * g
//   p = p + -step_size * (m / (sqrt(v) / bias_c2_sqrt + eps))
//
// One thread per parameter, grid-stride; params, grads, m, v are flat buffers of n floats.

extern "C" __global__ void adamw_update_f32(
    float* params, const float* grads, float* m, float* v,
    float decay, int apply_decay, float one_minus_b1, float b2, float one_minus_b2,
    float step_size, float bias_c2_sqrt, float eps, long long n)
{
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float g = grads[i];
        float p = params[i];
        if (apply_decay) p *= decay;
        float mi = m[i] + one_minus_b1 * (g - m[i]);
        float vi = v[i] * b2 + one_minus_b2 * g * g;
        float denom = sqrtf(vi) / bias_c2_sqrt + eps;
        p += -step_size * (mi / denom);
        m[i] = mi;
        v[i] = vi;
        params[i] = p;
    }
}
