// Philox4x32-10 (Salmon et al., SC'11), the counter-based generator of philox.rs, for device
// code: the output is a pure function of a 128-bit counter and a 64-bit key, so a thread draws
// its element's random bits without any state, and the GPU draws the same bits as the CPU.
// Included (textually prepended) by the sources that need it, such as dropout.cu.

struct Philox4 { unsigned int x, y, z, w; };

__device__ __forceinline__ Philox4 philox4x32_10(Philox4 c, unsigned int k0, unsigned int k1) {
    const unsigned int M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    #pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) { k0 += W0; k1 += W1; }
        unsigned int hi0 = __umulhi(M0, c.x), lo0 = M0 * c.x;
        unsigned int hi1 = __umulhi(M1, c.z), lo1 = M1 * c.z;
        Philox4 n = { hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0 };
        c = n;
    }
    return c;
}

// 32 random bits -> uniform in [0, 1) with 24 bits of precision (exact in f32), as the CPU does.
__device__ __forceinline__ float u32_to_unit_f32(unsigned int x) {
    return (float)(x >> 8) * (1.0f / 16777216.0f);
}
