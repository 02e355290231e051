use kernels::tolerance;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A fixture file's tensors, converted to f32 / i64 on request.
pub struct Expected {
    bytes: Vec<u8>,
    pub path: PathBuf,
}

impl Expected {
    pub fn open(name: &str) -> Self {
        let path = fixtures().join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Expected { bytes, path }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("fixture parses")
    }

    pub fn names(&self) -> Vec<String> {
        self.st().names().into_iter().map(str::to_owned).collect()
    }

    pub fn shape(&self, name: &str) -> Vec<usize> {
        self.st().tensor(name).unwrap_or_else(|_| panic!("fixture lacks {name}")).shape().to_vec()
    }

    pub fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.st();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("{}: no tensor {name}", self.path.display()));
        assert_eq!(v.dtype(), Dtype::F32, "{name} is not f32");
        v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let st = self.st();
        let v = st.tensor(name).unwrap_or_else(|_| panic!("{}: no tensor {name}", self.path.display()));
        assert_eq!(v.dtype(), Dtype::I64, "{name} is not i64");
        v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    }
}

/// Largest error of `got` against `want`, in units of the tolerance
/// `rel * (|want_i| + rms(want)) + ATOL`: the elementwise relative error, floored at the tensor's
/// scale so that entries that are zero up to rounding do not divide by ~0 (`kernels::tolerance`).
/// Passing means <= 1; a NaN never passes.
///
/// `ATOL = 1e-9` is for tensors whose exact value is zero: the gradient of the attention key
/// bias vanishes identically (adding `q . b_k` to every score of a row leaves the softmax
/// unchanged), so both sides hold only rounding noise there (~1e-11 in the fixtures), while the
/// smallest real gradients in the fixtures are ~1e-4.
pub const ATOL: f64 = 1e-9;

/// And the plain elementwise relative error beside it.
pub fn scaled_error(got: &[f32], want: &[f32], rel: f64) -> (f64, f64) {
    (tolerance::scaled_error(got, want, rel, ATOL), tolerance::rel_error(got, want))
}
