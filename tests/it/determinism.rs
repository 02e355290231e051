//! Training steps are bit-reproducible: the same steps give the same parameters whatever the
//! number of threads, and dropout masks depend on the example, not on its batch.

use crate::support::fixtures;
use kernels::gradnorm;
use worker::checkpoint;
use worker::layout::Head;
use worker::model::{Batch, Bert, DropoutCtx};
use worker::optim::AdamW;

fn batch(ids: &[u32], t: usize) -> Batch {
    let b = ids.len();
    let mut input_ids = vec![0u32; b * t];
    let mut attention_mask = vec![0u8; b * t];
    for (i, &ex) in ids.iter().enumerate() {
        let len = (3 + (ex as usize * 5) % 15).min(t);
        for j in 0..len {
            input_ids[i * t + j] = 5 + ((ex as usize * 31 + j * 7) % 240) as u32;
            attention_mask[i * t + j] = 1;
        }
    }
    Batch {
        b,
        t,
        input_ids,
        token_type_ids: vec![0; b * t],
        attention_mask,
        position_ids: Vec::new(),
        segment_ids: Vec::new(),
        example_ids: ids.to_vec(),
        labels: ids.iter().map(|&x| i64::from(x % 3)).collect(),
    }
}

fn dropout_model() -> Bert {
    let (mut m, _) = checkpoint::load(&fixtures().join("tiny-cls"), Head::Classification { num_labels: 3 }, 0).unwrap();
    m.cfg.hidden_dropout_prob = 0.1;
    m.cfg.attention_probs_dropout_prob = 0.1;
    m
}

fn train(threads: usize) -> (Vec<f32>, Vec<f64>) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut m = dropout_model();
        let mut opt = AdamW::new(m.layout.total, 0.9, 0.999, 1e-8, 0.01);
        let mut losses = Vec::new();
        for step in 0..4u32 {
            let ids: Vec<u32> = (0..16).map(|i| (i * 7 + step * 3) % 50).collect();
            let b = batch(&ids, 20);
            m.zero_grads().unwrap();
            let out = m.forward(&b, Some(DropoutCtx { seed: 11, step })).unwrap();
            m.backward(&b, 1.0 / out.count as f32).unwrap();
            let norm = gradnorm::global_norm(&m.grads);
            gradnorm::clip_grad_norm(&mut m.grads, norm, 1.0);
            opt.step(&m.layout, &mut m.params, &m.grads, 1e-3);
            losses.push(out.loss_sum / out.count as f64);
        }
        (m.params, losses)
    })
}

#[test]
fn training_is_bit_identical_across_thread_counts() {
    let (p1, l1) = train(1);
    let (p2, l2) = train(2);
    let (p3, l3) = train(3);
    assert_eq!(l1, l2);
    assert_eq!(l1, l3);
    assert!(p1 == p2 && p1 == p3, "parameters differ with the thread count");
    assert!(l1.iter().all(|l| l.is_finite()));
}

#[test]
fn an_examples_outputs_do_not_depend_on_its_batch() {
    // Example 7 alone (padded to its own length) and inside a longer-padded batch: with dropout
    // on, its logits agree to rounding, since its masks are keyed by its index, not its place.
    let mut m = dropout_model();
    let ctx = Some(DropoutCtx { seed: 3, step: 5 });
    let alone = batch(&[7], 20);
    m.forward(&alone, ctx).unwrap();
    let a = m.acts.logits.clone();
    let mixed = batch(&[2, 7, 9, 4], 24);
    m.forward(&mixed, ctx).unwrap();
    let b = m.acts.logits[3..6].to_vec();
    for (x, y) in a.iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
    // A different step draws different masks.
    m.forward(&alone, Some(DropoutCtx { seed: 3, step: 6 })).unwrap();
    assert_ne!(m.acts.logits, a);
}

#[test]
fn accumulating_micro_batches_equals_one_batch() {
    // 3 steps of a 16-example batch at once, and as 4 micro-batches of 4 whose gradients add up,
    // dropout on: the parameters agree to 1e-5 relative (only the order of the float sums in the
    // weight gradients differs: over rows in one product, or per micro-batch and then added).
    let run = |micro: usize| {
        let mut m = dropout_model();
        let mut opt = AdamW::new(m.layout.total, 0.9, 0.999, 1e-8, 0.01);
        for step in 0..3u32 {
            let ids: Vec<u32> = (0..16).map(|i| (i * 5 + step * 11) % 60).collect();
            m.zero_grads().unwrap();
            for chunk in ids.chunks(micro) {
                let b = batch(chunk, 20);
                m.forward(&b, Some(DropoutCtx { seed: 4, step })).unwrap();
                m.backward(&b, 1.0 / ids.len() as f32).unwrap();
            }
            let norm = gradnorm::global_norm(&m.grads);
            gradnorm::clip_grad_norm(&mut m.grads, norm, 1.0);
            opt.step(&m.layout, &mut m.params, &m.grads, 1e-3);
        }
        m.params
    };
    let (whole, micro) = (run(16), run(4));
    // Relative difference of the whole parameter vector, ||a - b|| / ||a||. (Elementwise, a few
    // entries differ by ~1% of one AdamW step: where a gradient is nearly zero, or exactly zero
    // like the attention key bias's, Adam's g / sqrt(v) magnifies the rounding of the sums.)
    let rel = kernels::tolerance::norm_diff(&whole, &micro);
    let max_abs = whole.iter().zip(&micro).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    println!("accumulation: relative difference {rel:.2e}, largest elementwise {max_abs:.2e}");
    assert!(rel < 1e-5, "relative difference {rel}");
    assert!(max_abs < 0.1 * 1e-3, "an element moved by more than a tenth of a step: {max_abs}");
}

#[test]
fn a_packed_row_computes_each_document_as_its_own_row() {
    // Two documents as two padded rows, and packed into one row (positions restarting, one
    // segment each, as masked-LM pretraining packs them): each token's final hidden state is the
    // same either way, because each document attends only to itself.
    let (mut m, _) = checkpoint::load(&fixtures().join("tiny-cls"), Head::Classification { num_labels: 3 }, 0).unwrap();
    let docs: [Vec<u32>; 2] = [(0..5).map(|j| 7 + j * 11).collect(), (0..4).map(|j| 9 + j * 13).collect()];
    let t = 9;
    let mut separate = Batch {
        b: 2,
        t,
        input_ids: vec![0; 2 * t],
        token_type_ids: vec![0; 2 * t],
        attention_mask: vec![0; 2 * t],
        position_ids: Vec::new(),
        segment_ids: Vec::new(),
        example_ids: vec![0, 1],
        labels: vec![0, 1],
    };
    for (i, d) in docs.iter().enumerate() {
        separate.input_ids[i * t..i * t + d.len()].copy_from_slice(d);
        separate.attention_mask[i * t..i * t + d.len()].fill(1);
    }
    let packed = Batch {
        b: 1,
        t,
        input_ids: docs.concat(),
        token_type_ids: vec![0; t],
        attention_mask: vec![1; t],
        position_ids: (0..5).chain(0..4).collect(),
        segment_ids: [vec![0; 5], vec![1; 4]].concat(),
        example_ids: vec![0],
        labels: vec![0],
    };
    let c = m.cfg.hidden_size;
    m.forward(&separate, None).unwrap();
    let sep = m.last_hidden().to_vec();
    let want: Vec<f32> = [&sep[..5 * c], &sep[t * c..(t + 4) * c]].concat();
    m.forward(&packed, None).unwrap();
    let rel = kernels::tolerance::rel_error(&m.last_hidden(), &want);
    assert!(rel < 1e-5, "packed documents differ from separate rows: relative error {rel}");
    // Without the segments (or the positions) the documents see each other: the test can tell.
    let mut unsegmented = packed.clone();
    unsegmented.segment_ids.clear();
    m.forward(&unsegmented, None).unwrap();
    assert!(kernels::tolerance::rel_error(&m.last_hidden(), &want) > 1e-3);
    let mut unpositioned = packed;
    unpositioned.position_ids.clear();
    m.forward(&unpositioned, None).unwrap();
    assert!(kernels::tolerance::rel_error(&m.last_hidden(), &want) > 1e-3);
}

/// Masked-LM pretraining's rows as the packer builds them: document A's tokens give the same
/// hidden states and the same masked-LM loss whether A has a row to itself or shares one with
/// document B (the same tokens of A masked the same way in both).
#[test]
fn a_packed_document_trains_as_it_would_alone() {
    use job::mlm::{mask_row, MaskSpec, Masked, IGNORE};
    use job::pack::{pack, Row};
    use worker::tokenize::collate_rows;
    let (mut m, _) = checkpoint::load(&fixtures().join("tiny-cls"), Head::MaskedLm, 3).unwrap();
    let (a, b): (Vec<u32>, Vec<u32>) = ((0..9).map(|j| 7 + j * 11).collect(), (0..6).map(|j| 9 + j * 13).collect());
    let pack = |docs: &[&Vec<u32>]| -> Row {
        let words = [true; 32];
        let refs: Vec<(&[u32], &[bool])> = docs.iter().map(|d| (&d[..], &words[..d.len()])).collect();
        let mut rows = pack(32, false, &refs, 2, 3);
        assert_eq!(rows.len(), 1);
        rows.remove(0)
    };
    let (alone, shared) = (pack(&[&a]), pack(&[&b, &a]));
    let offset = shared.len() - alone.len(); // A's segment is last in the shared row
    assert_eq!(shared.segments[offset], 2);
    let spec = MaskSpec { prob: 0.3, mask_id: 4, vocab: m.cfg.vocab_size as u32, whole_word: false, seed: 9 };
    let ma = mask_row(&spec, 0, 0, &alone.ids, &alone.special, &alone.word_start);
    assert!(ma.count() > 0);
    // The same masking of A in the shared row; B unmasked.
    let mut ms = Masked { inputs: shared.ids.clone(), labels: vec![IGNORE; shared.len()] };
    ms.inputs[offset..].copy_from_slice(&ma.inputs);
    ms.labels[offset..].copy_from_slice(&ma.labels);
    let c = m.cfg.hidden_size;
    let out = m.forward(&collate_rows(std::slice::from_ref(&alone), &[ma], &[0], 0), None).unwrap();
    let want = m.last_hidden().to_vec();
    let (want_loss, want_count) = (out.loss_sum, out.count);
    let out = m.forward(&collate_rows(&[shared], &[ms], &[0], 0), None).unwrap();
    let got = &m.last_hidden()[offset * c..];
    let rel = kernels::tolerance::rel_error(got, &want);
    assert!(rel < 1e-5, "A's hidden states changed beside B: relative error {rel}");
    assert_eq!(out.count, want_count);
    assert!((out.loss_sum - want_loss).abs() <= 1e-5 * want_loss.abs(), "loss {} against {}", out.loss_sum, want_loss);
}
