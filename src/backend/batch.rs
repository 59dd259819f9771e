//! Packed batches: sequences concatenated with no padding, delimited by `cu_seqlens`.
//! This is the one seam between the front end (tokenizer, CLI, server) and a backend.

use std::ops::Range;

use crate::error::{Error, Result};

/// S sequences, T tokens in all. `cu_seqlens` has S+1 entries: sequence s is
/// `ids[cu_seqlens[s]..cu_seqlens[s+1]]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PackedBatch {
    pub ids: Vec<u32>,
    pub cu_seqlens: Vec<usize>,
}

impl PackedBatch {
    pub fn new() -> Self {
        PackedBatch {
            ids: Vec::new(),
            cu_seqlens: vec![0],
        }
    }

    pub fn from_seqs<S: AsRef<[u32]>>(seqs: &[S]) -> Self {
        let mut b = Self::new();
        for s in seqs {
            b.push(s.as_ref());
        }
        b
    }

    pub fn push(&mut self, ids: &[u32]) {
        self.ids.extend_from_slice(ids);
        self.cu_seqlens.push(self.ids.len());
    }

    /// S
    pub fn num_seqs(&self) -> usize {
        self.cu_seqlens.len() - 1
    }

    /// T
    pub fn num_tokens(&self) -> usize {
        self.ids.len()
    }

    pub fn seq(&self, s: usize) -> Range<usize> {
        self.cu_seqlens[s]..self.cu_seqlens[s + 1]
    }

    pub fn max_len(&self) -> usize {
        (0..self.num_seqs())
            .map(|s| self.seq(s).len())
            .max()
            .unwrap_or(0)
    }

    /// Every sequence non-empty, offsets consistent, every id below `vocab`.
    pub fn validate(&self, vocab: usize) -> Result<()> {
        if self.cu_seqlens.first() != Some(&0) || self.cu_seqlens.last() != Some(&self.ids.len()) {
            return Err(Error::Input(
                "cu_seqlens must start at 0 and end at the token count".into(),
            ));
        }
        if self.cu_seqlens.windows(2).any(|w| w[1] <= w[0]) {
            return Err(Error::Input(
                "every sequence in a batch needs at least one token".into(),
            ));
        }
        if let Some((i, &id)) = self
            .ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id as usize >= vocab)
        {
            return Err(Error::Input(format!(
                "token id {id} at position {i} is outside the embedding matrix ({vocab} rows)"
            )));
        }
        Ok(())
    }
}

/// The packing rule, written once (for `plan_batches` and the server's batcher): a batch of
/// `seqs` sequences and `tokens` tokens takes a sequence of `len` tokens if it is empty or the
/// sequence still fits `max_tokens`, so a sequence longer than the budget gets a batch alone.
pub fn takes(seqs: usize, tokens: usize, len: usize, max_tokens: usize) -> bool {
    seqs == 0 || tokens + len <= max_tokens
}

/// Splits sequences (given by their lengths, in input order) into consecutive batches of at most
/// `max_tokens` tokens; a sequence longer than the budget gets a batch of its own. Input order
/// is kept so results can be streamed out as they come.
pub fn plan_batches(lengths: &[usize], max_tokens: usize) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let (mut start, mut tokens) = (0, 0);
    for (i, &n) in lengths.iter().enumerate() {
        if !takes(i - start, tokens, n, max_tokens) {
            out.push(start..i);
            start = i;
            tokens = 0;
        }
        tokens += n;
    }
    if start < lengths.len() {
        out.push(start..lengths.len());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_budget_and_order() {
        let lens = [5, 5, 5, 20, 1, 1];
        let b = plan_batches(&lens, 10);
        assert_eq!(b, vec![0..2, 2..3, 3..4, 4..6]);
        assert!(plan_batches(&[], 10).is_empty());
        let covered: Vec<usize> = b.into_iter().flatten().collect();
        assert_eq!(covered, (0..6).collect::<Vec<_>>());
    }

    #[test]
    fn validate_catches_bad_batches() {
        let b = PackedBatch::from_seqs(&[vec![1, 2], vec![3]]);
        assert_eq!(b.num_seqs(), 2);
        assert_eq!(b.seq(1), 2..3);
        b.validate(4).unwrap();
        assert!(b.validate(3).is_err());
        let empty_seq = PackedBatch {
            ids: vec![1],
            cu_seqlens: vec![0, 0, 1],
        };
        assert!(empty_seq.validate(4).is_err());
    }
}
