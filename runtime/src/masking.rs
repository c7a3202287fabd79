//! Masked-language-model batches, as BERT was pretrained and as
//! transformers' `DataCollatorForLanguageModeling` makes them: each token
//! that is not a special token is chosen with `probability` (15%); of the
//! chosen, 80% become the mask token, 10% a random token, 10% stay as they
//! are. `labels` hold the chosen tokens' ids and -100 (ignored by
//! `cross_entropy`) everywhere else. The choice depends only on the seed
//! given, so a resumed run masks as an uninterrupted one.

use crate::weights::Rng;

/// What `cross_entropy` skips.
pub const IGNORED: f32 = -100.0;

#[derive(Clone, Debug)]
pub struct Masking {
    /// The share of (non-special) tokens chosen.
    pub probability: f64,
    /// The id that hides a chosen token.
    pub mask: usize,
    /// Random replacements come from `0..vocab`.
    pub vocab: usize,
    /// Ids never chosen ([CLS], [SEP], [PAD], ...).
    pub special: Vec<usize>,
}

impl Masking {
    /// The model's inputs and labels for the token ids `ids`.
    pub fn apply(&self, ids: &[f32], rng: &mut Rng) -> (Vec<f32>, Vec<f32>) {
        let mut inputs = ids.to_vec();
        let mut labels = vec![IGNORED; ids.len()];
        for (i, &id) in ids.iter().enumerate() {
            if self.special.contains(&(id as usize)) || rng.uniform() >= self.probability {
                continue;
            }
            labels[i] = id;
            let how = rng.uniform();
            if how < 0.8 {
                inputs[i] = self.mask as f32;
            } else if how < 0.9 {
                inputs[i] = rng.below(self.vocab) as f32;
            }
        }
        (inputs, labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On 100k tokens the shares are BERT's within a few standard
    /// deviations, special tokens are never chosen, and a seed repeats it.
    #[test]
    fn masks_as_bert_did() {
        let masking = Masking { probability: 0.15, mask: 4, vocab: 1000, special: vec![0, 1, 2] };
        let ids: Vec<f32> = (0..100_000).map(|i| ((i * 7919) % 1000) as f32).collect();
        let (inputs, labels) = masking.apply(&ids, &mut Rng::new(7));
        let eligible = ids.iter().filter(|&&id| id >= 3.0).count() as f64;
        let chosen: Vec<usize> = (0..ids.len()).filter(|&i| labels[i] != IGNORED).collect();
        let share = chosen.len() as f64 / eligible;
        // Binomial standard deviations: sqrt(p (1 - p) / n).
        assert!((share - 0.15).abs() < 4.0 * (0.15f64 * 0.85 / eligible).sqrt(), "{share}");
        assert!(chosen.iter().all(|&i| ids[i] >= 3.0), "a special token was chosen");
        assert!(chosen.iter().all(|&i| labels[i] == ids[i]));
        assert!((0..ids.len()).filter(|&i| labels[i] == IGNORED).all(|i| inputs[i] == ids[i]));
        let n = chosen.len() as f64;
        let masked = chosen.iter().filter(|&&i| inputs[i] == 4.0 && ids[i] != 4.0).count() as f64 / n;
        let kept = chosen.iter().filter(|&&i| inputs[i] == ids[i]).count() as f64 / n;
        let sd = |p: f64| 4.0 * (p * (1.0 - p) / n).sqrt();
        assert!((masked - 0.8).abs() < sd(0.8), "{masked}");
        // A random replacement is the token itself once in 1000 draws.
        assert!((kept - 0.1).abs() < sd(0.1) + 0.001, "{kept}");
        assert_eq!(masking.apply(&ids, &mut Rng::new(7)), (inputs, labels));
    }
}
