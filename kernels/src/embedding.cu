// BERT's input embeddings, the CUDA twin of embedding.rs (forward; the backward is
// scatter_add_rows_f32 in gather.cu, called once per table with the rows grouped by id):
// out[b, t, :] = (wte[input_ids[b, t]] + wtt[token_type_ids[b, t]]) + wpe[position_ids[b, t]], in that order, as
// transformers sums them. Shapes: out [B*T, C], ids [B*T], wte [V, C], wpe [P, C], wtt [TT, C].
// The host checks the ids against the table sizes. Grid: (ceil(C / blockDim.x), B*T).

extern "C" __global__ void embedding_forward_f32(
    float* out, const unsigned int* input_ids, const unsigned int* token_type_ids,
    const unsigned int* position_ids, const float* wte, const float* wpe, const float* wtt, int b, int t, int c)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    long long row = blockIdx.y;
    if (i >= c || row >= (long long)b * t) return;
    long long id = input_ids[row], tt = token_type_ids[row], pos = position_ids[row];
    out[row * c + i] = (wte[id * c + i] + wtt[tt * c + i]) + wpe[pos * c + i];
}
