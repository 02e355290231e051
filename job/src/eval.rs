//! Evaluation as exact counts: each worker counts its shard of the split (a confusion matrix and
//! the sum of the per-example losses), the coordinator adds the counts in rank order, and the
//! metrics come from the total. No example is counted twice (evaluation shards are unpadded) and
//! no average of averages is taken.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalCounts {
    pub classes: usize,
    /// `confusion[actual * classes + predicted]`.
    pub confusion: Vec<u64>,
    pub loss_sum: f64,
}

/// A split's metrics, from the counts of every worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    /// Examples counted; for a masked-LM, masked tokens.
    pub examples: u64,
    /// Mean cross-entropy per example (per masked token).
    pub loss: f64,
    pub accuracy: f64,
    /// Classification: the mean of the per-class F1 over the classes that occur as a label or as
    /// a prediction (scikit-learn's `f1_score(average="macro")`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub macro_f1: Option<f64>,
    /// Masked-LM: `exp(loss)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
}

impl EvalMetrics {
    /// Each metric the evaluation has, by name (`accuracy`, `macro_f1`, `loss`, `perplexity`):
    /// what `<split>/<name>` means in manifests, logs and dashboards.
    pub fn named(&self) -> Vec<(&'static str, f64)> {
        let mut out = vec![("accuracy", self.accuracy)];
        out.extend(self.macro_f1.map(|v| ("macro_f1", v)));
        out.push(("loss", self.loss));
        out.extend(self.perplexity.map(|v| ("perplexity", v)));
        out
    }

    /// `accuracy 0.8125  macro-F1 0.7990  loss 0.4321` (a log line's part).
    pub fn summary(&self) -> String {
        let mut s = format!("accuracy {:.4}", self.accuracy);
        if let Some(f) = self.macro_f1 {
            s += &format!("  macro-F1 {f:.4}");
        }
        s += &format!("  loss {:.4}", self.loss);
        if let Some(p) = self.perplexity {
            s += &format!("  perplexity {p:.3}");
        }
        s
    }
}

impl EvalCounts {
    pub fn new(classes: usize) -> Self {
        EvalCounts { classes, confusion: vec![0; classes * classes], loss_sum: 0.0 }
    }

    pub fn add(&mut self, actual: usize, predicted: usize, loss: f64) {
        assert!(actual < self.classes && predicted < self.classes, "class outside 0..{}", self.classes);
        self.confusion[actual * self.classes + predicted] += 1;
        self.loss_sum += loss;
    }

    /// Adds another worker's counts.
    pub fn merge(&mut self, other: &EvalCounts) -> Result<(), String> {
        if other.classes != self.classes || other.confusion.len() != self.confusion.len() {
            return Err(format!("counts for {} classes cannot be added to counts for {}", other.classes, self.classes));
        }
        for (a, b) in self.confusion.iter_mut().zip(&other.confusion) {
            *a += b;
        }
        self.loss_sum += other.loss_sum;
        Ok(())
    }

    pub fn examples(&self) -> u64 {
        self.confusion.iter().sum()
    }

    pub fn metrics(&self) -> EvalMetrics {
        let k = self.classes;
        let n = self.examples();
        let correct: u64 = (0..k).map(|c| self.confusion[c * k + c]).sum();
        let (mut f1_sum, mut present) = (0.0, 0usize);
        for c in 0..k {
            let actual: u64 = self.confusion[c * k..(c + 1) * k].iter().sum();
            let predicted: u64 = (0..k).map(|a| self.confusion[a * k + c]).sum();
            if actual + predicted > 0 {
                f1_sum += 2.0 * self.confusion[c * k + c] as f64 / (actual + predicted) as f64;
                present += 1;
            }
        }
        let per = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
        EvalMetrics {
            examples: n,
            loss: per(self.loss_sum),
            accuracy: per(correct as f64),
            macro_f1: Some(if present == 0 { 0.0 } else { f1_sum / present as f64 }),
            perplexity: None,
        }
    }
}

/// Masked-LM evaluation as exact counts (not a vocabulary-sized confusion matrix): the masked
/// tokens, those predicted right, and the sum of their losses, added over the workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MlmCounts {
    pub tokens: u64,
    pub correct: u64,
    pub loss_sum: f64,
}

impl MlmCounts {
    pub fn add(&mut self, correct: bool, loss: f64) {
        self.tokens += 1;
        self.correct += u64::from(correct);
        self.loss_sum += loss;
    }

    /// Adds another worker's counts.
    pub fn merge(&mut self, other: &MlmCounts) {
        self.tokens += other.tokens;
        self.correct += other.correct;
        self.loss_sum += other.loss_sum;
    }

    pub fn metrics(&self) -> EvalMetrics {
        let n = self.tokens.max(1) as f64;
        let loss = self.loss_sum / n;
        EvalMetrics {
            examples: self.tokens,
            loss,
            accuracy: self.correct as f64 / n,
            macro_f1: None,
            perplexity: Some(loss.exp()),
        }
    }
}

/// One worker's evaluation counts, of either head.
#[derive(Clone, Debug, PartialEq)]
pub enum Counts {
    Classes(EvalCounts),
    Tokens(MlmCounts),
}

impl Counts {
    /// Adds another worker's counts (of the same kind).
    pub fn merge(&mut self, other: &Counts) -> Result<(), String> {
        match (self, other) {
            (Counts::Classes(a), Counts::Classes(b)) => a.merge(b),
            (Counts::Tokens(a), Counts::Tokens(b)) => {
                a.merge(b);
                Ok(())
            }
            _ => Err("classification counts and masked-LM counts cannot be added".into()),
        }
    }

    pub fn metrics(&self) -> EvalMetrics {
        match self {
            Counts::Classes(c) => c.metrics(),
            Counts::Tokens(c) => c.metrics(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_lm_counts_merge_exactly_and_give_perplexity() {
        let (mut a, mut b) = (MlmCounts::default(), MlmCounts::default());
        for k in 0..10 {
            a.add(k % 2 == 0, 1.0);
        }
        for k in 0..30 {
            b.add(k % 3 == 0, 3.0);
        }
        let mut whole = a;
        whole.merge(&b);
        let m = whole.metrics();
        assert_eq!((m.examples, whole.correct), (40, 15));
        // The mean over tokens, not the mean of the workers' means (2.0).
        assert!((m.loss - 100.0 / 40.0).abs() < 1e-12);
        assert!((m.perplexity.unwrap() - 2.5f64.exp()).abs() < 1e-9);
        assert_eq!(m.macro_f1, None);
        assert!((m.accuracy - 15.0 / 40.0).abs() < 1e-12);
        assert_eq!(MlmCounts::default().metrics().examples, 0);
        let mut c = Counts::Tokens(a);
        assert!(c.merge(&Counts::Classes(EvalCounts::new(2))).is_err());
        c.merge(&Counts::Tokens(b)).unwrap();
        assert_eq!(c.metrics(), m);
    }

    #[test]
    fn metrics_from_counts() {
        // actual: 0 0 0 1 1 2 ; predicted: 0 0 1 1 0 2
        let mut c = EvalCounts::new(3);
        for (a, p) in [(0, 0), (0, 0), (0, 1), (1, 1), (1, 0), (2, 2)] {
            c.add(a, p, 0.5);
        }
        let m = c.metrics();
        assert_eq!(m.examples, 6);
        assert!((m.accuracy - 4.0 / 6.0).abs() < 1e-12);
        assert!((m.loss - 0.5).abs() < 1e-12);
        // F1: class 0 = 2*2/(3+3) = 2/3, class 1 = 2*1/(2+2) = 1/2, class 2 = 1.
        assert!((m.macro_f1.unwrap() - (2.0 / 3.0 + 0.5 + 1.0) / 3.0).abs() < 1e-12);
    }

    #[test]
    fn merged_shards_equal_the_whole() {
        let pairs: Vec<(usize, usize)> = (0..101).map(|i| (i % 4, (i * 7) % 4)).collect();
        let mut whole = EvalCounts::new(4);
        pairs.iter().for_each(|&(a, p)| whole.add(a, p, 1.0));
        let mut merged = EvalCounts::new(4);
        for rank in 0..3 {
            let mut part = EvalCounts::new(4);
            pairs.iter().skip(rank).step_by(3).for_each(|&(a, p)| part.add(a, p, 1.0));
            merged.merge(&part).unwrap();
        }
        assert_eq!(merged, whole);
        assert!(merged.merge(&EvalCounts::new(2)).is_err());
    }

    #[test]
    fn absent_classes_do_not_count_in_macro_f1() {
        let mut c = EvalCounts::new(5);
        c.add(0, 0, 0.0);
        c.add(1, 1, 0.0);
        assert_eq!(c.metrics().macro_f1, Some(1.0));
        assert_eq!(EvalCounts::new(2).metrics().accuracy, 0.0);
    }
}

/// A split that is evaluated during and after training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EvalSplit {
    Dev,
    Test,
}

impl EvalSplit {
    /// `dev` or `test`, as metrics are named (`dev/accuracy`).
    pub fn name(self) -> &'static str {
        match self {
            EvalSplit::Dev => "dev",
            EvalSplit::Test => "test",
        }
    }
}
