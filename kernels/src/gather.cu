// Row gathers and ordered scatter-adds, the CUDA twins of gather.rs and of embedding.rs's
// backward.
//
// gather_rows_forward_f32: out[r, :] = inp[rows[r], :]   (out [R, C], inp [N, C], rows [R])
//
// scatter_add_rows_f32 is every "add rows of dout into rows of a table" of the model
// (gather_rows_backward, and the word, position and token-type tables of embedding_backward),
// done deterministically: the host groups the source rows by destination row, in source order
// (CSR: keys[k] is a destination row, rows[offsets[k] .. offsets[k + 1]] its source rows in
// increasing order), and one thread per (key, column) adds them in that order into the existing
// value. That is the CPU twin's order of additions, so the result is bit-identical to it, and
// there are no atomics. Grid: (ceil(C / blockDim.x), n_keys).

extern "C" __global__ void gather_rows_forward_f32(float* out, const float* inp, const long long* rows, int r, int c) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int k = blockIdx.y;
    if (i >= c || k >= r) return;
    out[(long long)k * c + i] = inp[rows[k] * c + i];
}

extern "C" __global__ void scatter_add_rows_f32(
    float* dtable, const float* dout,
    const long long* keys, const int* offsets, const int* rows, int n_keys, int c)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    int k = blockIdx.y;
    if (i >= c || k >= n_keys) return;
    float* d = dtable + keys[k] * c + i;
    float acc = *d;
    for (int j = offsets[k]; j < offsets[k + 1]; ++j) acc += dout[(long long)rows[j] * c + i];
    *d = acc;
}
