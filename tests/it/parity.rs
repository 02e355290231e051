//! Our CPU BERT against `transformers` on a tiny random model: logits, loss, every parameter
//! gradient, the clipped global gradient norm, and every parameter after two AdamW steps
//! (fixtures from scripts/make_fixtures.py). Tolerance: 1e-4 relative (see `scaled_error`).
//!
//! Each tensor also within 1e-5 as a whole (||ours - theirs|| / ||theirs||).
//!
//! With bf16 dense layers (`train.precision = "bf16"`, CPUs with AVX512_BF16) the same logits,
//! loss, gradients and gradient norm against the same f32 `transformers` values, to 1e-1
//! elementwise and 2e-2 per tensor (measured: 7e-2 and 7e-3): each product rounds its operands
//! to 8 significant bits (2^-9 relative each), and the errors grow through the layers of the
//! backward pass; a wrong operand or a lost term is off by O(1). Not the parameters after AdamW
//! steps: Adam divides each gradient by its own magnitude, so a gradient that is zero up to
//! rounding takes a step of up to `lr` either way in either precision.

use crate::support::{fixtures, scaled_error, Expected};
use job::config::Precision;
use kernels::gradnorm;
use worker::checkpoint;
use worker::layout::Head;
use worker::model::{Batch, Bert, DropoutCtx};
use worker::optim::AdamW;

const REL: f64 = 1e-4;
const NORM: f64 = 1e-5;
const REL_BF16: f64 = 1e-1;
const NORM_BF16: f64 = 2e-2;

fn batch(exp: &Expected, head: &Head) -> Batch {
    let shape = exp.shape("input_ids");
    let (b, t) = (shape[0], shape[1]);
    let labels = exp.i64("labels");
    assert_eq!(labels.len(), if matches!(head, Head::MaskedLm) { b * t } else { b });
    Batch {
        b,
        t,
        input_ids: exp.i64("input_ids").iter().map(|&x| x as u32).collect(),
        token_type_ids: exp.i64("token_type_ids").iter().map(|&x| x as u32).collect(),
        attention_mask: exp.i64("attention_mask").iter().map(|&x| x as u8).collect(),
        position_ids: Vec::new(),
        segment_ids: Vec::new(),
        example_ids: (0..b as u32).collect(),
        labels,
    }
}

/// Layout name of a `transformers` parameter name.
fn ours(hf: &str) -> &str {
    hf.strip_prefix("bert.").unwrap_or(hf)
}

fn step(model: &mut Bert, batch: &Batch, opt: &mut AdamW) -> f32 {
    model.zero_grads().unwrap();
    let out = model.forward(batch, Some(DropoutCtx { seed: 0, step: 0 })).unwrap();
    model.backward(batch, 1.0 / out.count as f32).unwrap();
    let norm = gradnorm::global_norm(&model.grads);
    gradnorm::clip_grad_norm(&mut model.grads, norm, 0.5);
    opt.step(&model.layout, &mut model.params, &model.grads, 1e-3);
    norm
}

fn check_against_transformers(name: &str, head: Head, precision: Precision) {
    let (tol, norm_tol) = if precision == Precision::Bf16 { (REL_BF16, NORM_BF16) } else { (REL, NORM) };
    let exp = Expected::open(&format!("{name}.expected.safetensors"));
    let (mut model, report) = checkpoint::load(&fixtures().join(name), head.clone(), 0).unwrap();
    assert!(report.initialized.is_empty(), "fixture checkpoint should be complete: {:?}", report.initialized);
    model.precision = precision;
    let batch = batch(&exp, &head);
    let mut worst: Vec<(String, f64, f64)> = Vec::new();
    let mut worst_norm = (String::new(), 0.0f64);
    let mut record = |what: &str, got: &[f32], want: &[f32]| {
        let (scaled, rel) = scaled_error(got, want, tol);
        worst.push((what.to_owned(), scaled, rel));
        // The key biases' gradients are zero exactly (ours) and rounding noise (theirs).
        let d = kernels::tolerance::norm_diff(want, got);
        if d > worst_norm.1 && !what.contains("key.bias") {
            worst_norm = (what.to_owned(), d);
        }
    };

    model.zero_grads().unwrap();
    let out = model.forward(&batch, Some(DropoutCtx { seed: 0, step: 0 })).unwrap();
    record("logits", &model.acts.logits, &exp.f32("logits"));
    record("loss", &[(out.loss_sum / out.count as f64) as f32], &exp.f32("loss"));
    model.backward(&batch, 1.0 / out.count as f32).unwrap();
    let mut grads_seen = 0;
    for key in exp.names().iter().filter_map(|n| n.strip_prefix("grad.")) {
        let entry = model.layout.get(ours(key)).unwrap_or_else(|| panic!("no layout entry for {key}"));
        record(&format!("grad {key}"), &model.grads[entry.range()], &exp.f32(&format!("grad.{key}")));
        grads_seen += 1;
    }
    assert_eq!(grads_seen, model.layout.entries.len(), "every parameter's gradient is checked");

    // Two AdamW steps with clipping, from the loaded weights again (their norms in bf16 too).
    let (mut model, _) = checkpoint::load(&fixtures().join(name), head, 0).unwrap();
    model.precision = precision;
    let mut opt = AdamW::new(model.layout.total, 0.9, 0.999, 1e-8, 0.01);
    let norms = [step(&mut model, &batch, &mut opt), step(&mut model, &batch, &mut opt)];
    record("grad norms", &norms, &exp.f32("grad_norms"));
    for key in exp.names().iter().filter_map(|n| n.strip_prefix("after2.")) {
        if precision == Precision::Bf16 {
            break;
        }
        let entry = model.layout.get(ours(key)).unwrap();
        record(&format!("after 2 steps {key}"), &model.params[entry.range()], &exp.f32(&format!("after2.{key}")));
    }

    println!("{name} ({precision:?}): largest whole-tensor difference {:.2e} ({})", worst_norm.1, worst_norm.0);
    worst.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "{name} ({precision:?}): {} tensors compared; largest errors (fraction of tolerance, relative error):",
        worst.len()
    );
    for (what, scaled, rel) in worst.iter().take(5) {
        println!("  {what}: {scaled:.3} of tolerance, relative {rel:.2e}");
    }
    let failing: Vec<_> = worst.iter().filter(|w| w.1 > 1.0).collect();
    assert!(failing.is_empty(), "{name} ({precision:?}): beyond {tol:e} relative: {failing:?}");
    assert!(
        worst_norm.1 <= norm_tol,
        "{name} ({precision:?}): {} differs by {:e} as a whole",
        worst_norm.0,
        worst_norm.1
    );
}

#[test]
fn tiny_classifier_matches_transformers() {
    check_against_transformers("tiny-cls", Head::Classification { num_labels: 3 }, Precision::Fp32);
}

#[test]
fn tiny_masked_lm_matches_transformers() {
    check_against_transformers("tiny-mlm", Head::MaskedLm, Precision::Fp32);
}

#[test]
fn tiny_models_in_bf16_match_transformers_to_bf16_rounding() {
    if !kernels::bf16::supported() {
        println!("tiny_models_in_bf16_match_transformers_to_bf16_rounding: skipped: this CPU has no AVX512_BF16");
        return;
    }
    check_against_transformers("tiny-cls", Head::Classification { num_labels: 3 }, Precision::Bf16);
    check_against_transformers("tiny-mlm", Head::MaskedLm, Precision::Bf16);
}

#[test]
fn save_then_load_round_trips_every_tensor() {
    for (name, head) in [("tiny-cls", Head::Classification { num_labels: 3 }), ("tiny-mlm", Head::MaskedLm)] {
        let (model, _) = checkpoint::load(&fixtures().join(name), head.clone(), 0).unwrap();
        let out = std::env::temp_dir().join(format!("tandem-roundtrip-{name}-{}", std::process::id()));
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        checkpoint::save(&model, &out, Some(&labels), None).unwrap();
        let (again, report) = checkpoint::load(&out, head, 99).unwrap();
        assert!(report.initialized.is_empty(), "{name}: {:?}", report.initialized);
        assert_eq!(model.params, again.params, "{name}: parameters changed in a save/load round trip");
        // The keys are the ones transformers' BertFor* classes expect.
        let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let names = st.names();
        assert!(names.contains(&"bert.embeddings.word_embeddings.weight"));
        assert!(names.iter().all(|n| n.starts_with("bert.") || n.starts_with("classifier.") || n.starts_with("cls.")));
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        let arch = if name == "tiny-cls" { "BertForSequenceClassification" } else { "BertForMaskedLM" };
        assert_eq!(cfg["architectures"][0], arch);
        std::fs::remove_dir_all(&out).unwrap();
    }
}

/// The all-reduce overlapped with backward sends each segment of the gradient buffer as soon as
/// backward reports it done: so a reported segment must never change afterwards, and the
/// segments must cover the whole buffer, once, for both heads, with dropout on.
#[test]
fn backward_reports_each_gradient_segment_once_and_final() {
    for (name, head) in [("tiny-cls", Head::Classification { num_labels: 3 }), ("tiny-mlm", Head::MaskedLm)] {
        let exp = Expected::open(&format!("{name}.expected.safetensors"));
        let (mut model, _) = checkpoint::load(&fixtures().join(name), head.clone(), 0).unwrap();
        let batch = batch(&exp, &head);
        model.zero_grads().unwrap();
        let out = model.forward(&batch, Some(DropoutCtx { seed: 3, step: 1 })).unwrap();
        let mut seen: Vec<(std::ops::Range<usize>, Vec<f32>)> = Vec::new();
        model
            .backward_with(&batch, 1.0 / out.count as f32, &mut |r, g| {
                seen.push((r.clone(), g[r].to_vec()));
                Ok(())
            })
            .unwrap();
        let mut covered = vec![0u8; model.layout.total];
        for (r, g) in &seen {
            assert_eq!(&model.grads[r.clone()], &g[..], "{name}: segment {r:?} changed after it was reported");
            covered[r.clone()].iter_mut().for_each(|c| *c += 1);
        }
        assert!(covered.iter().all(|&c| c == 1), "{name}: the segments do not tile the buffer");
        assert_eq!(seen.len(), model.cfg.num_hidden_layers + 2, "{name}: head, each layer, embeddings");
    }
}
