// GELU, exact (erf) form, the CUDA twin of gelu.rs: y = 0.5 x (1 + erf(x / sqrt 2)),
// dy/dx = Phi(x) + x phi(x). The same branch-free erf (Abramowitz & Stegun 7.1.26) and exp
// (2^k e^r, degree-6 Taylor) as the CPU, operation for operation, so the two backends agree to
// a few ulps rather than to the 6e-7 the approximation itself allows. (Compiled with
// --fmad=false: no contraction into FMAs that the CPU code does not do either.)

__device__ __forceinline__ float exp_fast(float x) {
    const float LOG2E = 1.44269504088896341f, LN2_HI = 0.6933594f, LN2_LO = -2.1219444e-4f;
    const float ROUND = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
    x = fminf(fmaxf(x, -87.0f), 88.0f);
    float k = (x * LOG2E + ROUND) - ROUND;
    float r = (x - k * LN2_HI) - k * LN2_LO;
    float p = 1.0f + r * (1.0f + r * (0.5f + r * (1.0f / 6.0f + r * (1.0f / 24.0f + r * (1.0f / 120.0f + r * (1.0f / 720.0f))))));
    return p * __int_as_float(((int)k + 127) << 23);
}

// erf(z) given e = exp(-z^2).
__device__ __forceinline__ float erf_with_exp(float z, float e) {
    float a = fabsf(z);
    float t = 1.0f / (1.0f + 0.3275911f * a);  // the CPU twin's literals, digit for digit
    float poly = t * (0.2548296f + t * (-0.28449674f + t * (1.4214138f + t * (-1.453152f + t * 1.0614054f))));
    float y = 1.0f - poly * e;
    return copysignf(y, z);
}

// out[i] = gelu(x[i]); x[i] becomes gelu'(x[i]) = Phi(x) + x phi(x), what backward needs (erf
// needs exp(-z^2) at z = x / sqrt 2: the same exp(-x^2 / 2) as phi).
extern "C" __global__ void gelu_forward_f32(float* out, float* x, long long n) {
    const float INV_SQRT2 = 0.70710678118654752f, INV_SQRT_2PI = 0.3989423f;  // as gelu.rs
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        float z = v * INV_SQRT2;
        float e = exp_fast(-z * z);
        float erf = erf_with_exp(z, e);
        out[i] = 0.5f * v * (1.0f + erf);
        x[i] = 0.5f * (1.0f + erf) + v * (INV_SQRT_2PI * e);
    }
}

// dinp[i] = deriv[i] * dout[i], with deriv the gelu'(x) that the forward left
extern "C" __global__ void gelu_backward_f32(float* dinp, const float* deriv, const float* dout, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        dinp[i] = deriv[i] * dout[i];
    }
}
