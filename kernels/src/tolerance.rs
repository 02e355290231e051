//! How close two tensors are: the measures every comparison in Tandem uses (GPU against CPU,
//! ours against `transformers`, N workers against one), written once.

/// Largest error of `got` against `want`, in units of the tolerance
/// `rel * (|want_i| + rms(want)) + atol`: the elementwise relative error, floored at the tensor's
/// scale so that entries that are zero up to rounding do not divide by ~0. Passing means <= 1;
/// a NaN or an infinity on either side gives infinity.
pub fn scaled_error(got: &[f32], want: &[f32], rel: f64, atol: f64) -> f64 {
    assert_eq!(got.len(), want.len(), "tensors of {} and {} values", got.len(), want.len());
    let rms = (want.iter().map(|&w| f64::from(w).powi(2)).sum::<f64>() / want.len().max(1) as f64).sqrt();
    got.iter().zip(want).fold(0.0f64, |worst, (&g, &w)| {
        if !g.is_finite() || !w.is_finite() {
            return f64::INFINITY;
        }
        let (g, w) = (f64::from(g), f64::from(w));
        worst.max((g - w).abs() / (rel * (w.abs() + rms) + atol).max(f64::MIN_POSITIVE))
    })
}

/// The elementwise relative error, max |got_i - want_i| / (|want_i| + rms(want)) (see
/// [`scaled_error`]).
pub fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    scaled_error(got, want, 1.0, 0.0)
}

/// The relative difference of whole vectors, ||a - b|| / ||a||.
pub fn norm_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "vectors of {} and {} values", a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(x, y)| (f64::from(*x) - f64::from(*y)).powi(2)).sum::<f64>().sqrt();
    d / a.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_scale_aware_and_catch_non_finite_values() {
        assert_eq!(rel_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_error(&[f32::NAN], &[1.0]).is_infinite());
        assert!(rel_error(&[1.0], &[f32::INFINITY]).is_infinite());
        assert!(rel_error(&[1.001], &[1.0]) < 1e-3);
        // A value that is zero up to rounding is judged against the tensor's scale.
        assert!(rel_error(&[1.0, 1e-7], &[1.0, 0.0]) < 1e-6);
        assert_eq!(rel_error(&[0.0], &[0.0]), 0.0);
        assert!((scaled_error(&[1.01], &[1.0], 1e-2, 0.0) - 0.5).abs() < 1e-6);
        assert!((norm_diff(&[3.0, 4.0], &[3.0, 4.5]) - 0.1).abs() < 1e-12);
    }
}
