// Dropout whose mask is a pure function of (seed, step, example, element): the CUDA twin of
// dropout.rs, drawing the same Philox bits, so the GPU keeps exactly the elements the CPU keeps.
//
// x is [B, H, T, W]: B examples, each an [H, T, W] block (hidden states: H = 1, W = C; attention
// probabilities: H = heads, W = T). Element (b, h, t, w) has the logical index
// idx = (h * t_max + t) * w_max + w, with fixed extents t_max / w_max, and draws word idx % 4 of
// Philox(counter = (idx / 4, example_ids[b], step, site), key = seed). Kept when u >= p, scaled
// by 1 / (1 - p). Backward applies the same mask to the gradient (regenerated, never stored), so
// it is the same kernel; like the CPU twin it scales in place rather than accumulating.
//
// One thread per element; a grid-stride loop covers any size.

// x[i] *= mask(i) over all n elements: forward on activations, backward on their gradients.
__device__ __forceinline__ void dropout_apply(
    float* x, const unsigned int* example_ids,
    int h, int t, int w, int t_max, int w_max,
    float p, unsigned int seed_lo, unsigned int seed_hi, unsigned int step, unsigned int site,
    long long n)
{
    const float scale = 1.0f / (1.0f - p);
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        long long row = i / w;
        int wi = (int)(i % w);
        int ti = (int)(row % t);
        int hi = (int)((row / t) % h);
        long long bi = row / ((long long)h * t);
        unsigned long long idx = ((unsigned long long)hi * t_max + ti) * (unsigned long long)w_max + wi;
        Philox4 c = { (unsigned int)(idx >> 2), example_ids[bi], step, site };
        Philox4 r = philox4x32_10(c, seed_lo, seed_hi);
        unsigned int word = (idx & 3) == 0 ? r.x : (idx & 3) == 1 ? r.y : (idx & 3) == 2 ? r.z : r.w;
        float u = u32_to_unit_f32(word);
        x[i] = x[i] * (u >= p ? scale : 0.0f);
    }
}

extern "C" __global__ void dropout_forward_f32(
    float* x, const unsigned int* example_ids,
    int h, int t, int w, int t_max, int w_max,
    float p, unsigned int seed_lo, unsigned int seed_hi, unsigned int step, unsigned int site,
    long long n)
{
    dropout_apply(x, example_ids, h, t, w, t_max, w_max, p, seed_lo, seed_hi, step, site, n);
}

extern "C" __global__ void dropout_backward_f32(
    float* dx, const unsigned int* example_ids,
    int h, int t, int w, int t_max, int w_max,
    float p, unsigned int seed_lo, unsigned int seed_hi, unsigned int step, unsigned int site,
    long long n)
{
    dropout_apply(dx, example_ids, h, t, w, t_max, w_max, p, seed_lo, seed_hi, step, site, n);
}
