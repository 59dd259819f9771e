//! Retrieval metrics with trec_eval's definitions (usnistgov/trec_eval, as bundled by
//! pytrec_eval, which BEIR calls), for one query at a time. Inputs:
//!
//! - `ranked`: the relevance label (from the qrels) of each retrieved document, best first;
//!   0 for a document the qrels do not judge. The ranking must already be in trec_eval's order
//!   (score descending, ties by document id descending), which [`super::search`] produces.
//! - `judged`: the labels of every judgment of the query in the qrels, retrieved or not, in
//!   the corpus or not (trec_eval counts them all).
//!
//! A document is *relevant* when its label is ≥ 1 (trec_eval's default `relevance_level`); a
//! negative label counts as not relevant and has no gain. Every metric is 0 for a query with no
//! relevant document (trec_eval reports 0, and BEIR averages those zeros in).

/// The four numbers the model card's table and BEIR report, for one query or averaged.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize)]
pub struct Metrics {
    #[serde(rename = "ndcg@10")]
    pub ndcg_10: f64,
    #[serde(rename = "recall@100")]
    pub recall_100: f64,
    #[serde(rename = "map@100")]
    pub map_100: f64,
    #[serde(rename = "mrr@10")]
    pub mrr_10: f64,
}

impl Metrics {
    /// All four metrics of one query.
    pub fn of_query(ranked: &[i64], judged: &[i64]) -> Self {
        let num_rel = num_relevant(judged);
        Metrics {
            ndcg_10: ndcg_at(ranked, judged, 10),
            recall_100: recall_at(ranked, num_rel, 100),
            map_100: map_at(ranked, num_rel, 100),
            mrr_10: recip_rank_at(ranked, 10),
        }
    }

    /// Arithmetic mean over queries, summed in the given order (as BEIR does); all zeros for none.
    pub fn mean<'a>(all: impl IntoIterator<Item = &'a Metrics>) -> Metrics {
        let mut sum = Metrics::default();
        let mut n = 0usize;
        for m in all {
            sum.ndcg_10 += m.ndcg_10;
            sum.recall_100 += m.recall_100;
            sum.map_100 += m.map_100;
            sum.mrr_10 += m.mrr_10;
            n += 1;
        }
        if n == 0 {
            return sum;
        }
        let n = n as f64;
        Metrics {
            ndcg_10: sum.ndcg_10 / n,
            recall_100: sum.recall_100 / n,
            map_100: sum.map_100 / n,
            mrr_10: sum.mrr_10 / n,
        }
    }
}

/// Judgments with label ≥ 1.
pub fn num_relevant(judged: &[i64]) -> usize {
    judged.iter().filter(|&&r| r >= 1).count()
}

/// trec_eval `ndcg_cut.k`: DCG@k = Σ_{r=1..k} gain_r / log2(r + 1) with gain = the label when
/// positive (graded, not 2^label − 1), divided by the DCG@k of the ideal ranking: all positive
/// labels of the qrels sorted descending. 0 when the query has no positive label.
pub fn ndcg_at(ranked: &[i64], judged: &[i64], k: usize) -> f64 {
    let dcg = |gains: &mut dyn Iterator<Item = i64>| -> f64 {
        let mut sum = 0.0;
        for (i, g) in gains.take(k).enumerate() {
            if g > 0 {
                sum += g as f64 / ((i + 2) as f64).log2();
            }
        }
        sum
    };
    let mut ideal: Vec<i64> = judged.iter().copied().filter(|&g| g > 0).collect();
    ideal.sort_unstable_by(|a, b| b.cmp(a));
    let idcg = dcg(&mut ideal.into_iter());
    if idcg > 0.0 {
        dcg(&mut ranked.iter().copied()) / idcg
    } else {
        0.0
    }
}

/// trec_eval `recall.k`: relevant documents in the top k / relevant documents in the qrels.
pub fn recall_at(ranked: &[i64], num_rel: usize, k: usize) -> f64 {
    if num_rel == 0 {
        return 0.0;
    }
    let found = ranked.iter().take(k).filter(|&&r| r >= 1).count();
    found as f64 / num_rel as f64
}

/// trec_eval `map_cut.k`: Σ over relevant documents at rank r ≤ k of precision@r, divided by
/// the number of relevant documents in the qrels (not by those retrieved).
pub fn map_at(ranked: &[i64], num_rel: usize, k: usize) -> f64 {
    if num_rel == 0 {
        return 0.0;
    }
    let mut found = 0usize;
    let mut sum = 0.0;
    for (i, &r) in ranked.iter().take(k).enumerate() {
        if r >= 1 {
            found += 1;
            sum += found as f64 / (i + 1) as f64;
        }
    }
    sum / num_rel as f64
}

/// trec_eval `recip_rank` on the top k only: 1 / rank of the first relevant document, 0 if none
/// is in the top k.
pub fn recip_rank_at(ranked: &[i64], k: usize) -> f64 {
    ranked
        .iter()
        .take(k)
        .position(|&r| r >= 1)
        .map_or(0.0, |i| 1.0 / (i + 1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// |got − want| ≤ 1e-12: every case below is computed by hand in closed form, so only the
    /// last bits of the f64 sums may differ.
    fn close(got: f64, want: f64) {
        assert!((got - want).abs() <= 1e-12, "got {got}, want {want}");
    }

    #[test]
    fn ndcg_uses_graded_gains_and_the_qrels_ideal() {
        // Ranked labels 0, 2, 1 (the third retrieved document has label 1); the qrels also hold
        // an unretrieved label-1 document and a 0. DCG = 2/log2(3) + 1/log2(4) = 2/log2(3) + 0.5;
        // ideal 2, 1, 1: 2 + 1/log2(3) + 0.5.
        let got = ndcg_at(&[0, 2, 1], &[2, 1, 1, 0], 10);
        let l3 = 3f64.log2();
        close(got, (2.0 / l3 + 0.5) / (2.0 + 1.0 / l3 + 0.5));
        // The cut: at k = 2 the third document no longer counts, the ideal keeps two entries.
        close(
            ndcg_at(&[0, 2, 1], &[2, 1, 1, 0], 2),
            (2.0 / l3) / (2.0 + 1.0 / l3),
        );
        // Perfect ranking → 1; nothing relevant in the qrels → 0; negative labels have no gain.
        close(ndcg_at(&[2, 1, 1], &[1, 2, 1], 10), 1.0);
        close(ndcg_at(&[0, 0], &[0, 0], 10), 0.0);
        close(ndcg_at(&[-1, 1], &[-1, 1], 10), 1.0 / l3);
        close(ndcg_at(&[], &[1], 10), 0.0);
    }

    #[test]
    fn recall_and_map_divide_by_all_relevant_judgments() {
        // 3 relevant in the qrels (labels 2, 1, 1), 2 retrieved at ranks 2 and 4.
        let ranked = [0, 2, 0, 1];
        let judged = [2, 1, 1, 0];
        let n = num_relevant(&judged);
        assert_eq!(n, 3);
        close(recall_at(&ranked, n, 100), 2.0 / 3.0);
        close(recall_at(&ranked, n, 2), 1.0 / 3.0);
        close(map_at(&ranked, n, 100), (1.0 / 2.0 + 2.0 / 4.0) / 3.0);
        close(map_at(&ranked, n, 3), (1.0 / 2.0) / 3.0);
        close(recall_at(&ranked, 0, 100), 0.0);
        close(map_at(&ranked, 0, 100), 0.0);
    }

    #[test]
    fn reciprocal_rank_is_cut_and_needs_label_one() {
        close(recip_rank_at(&[0, -1, 0, 2], 10), 0.25);
        close(recip_rank_at(&[0, 0, 0, 2], 3), 0.0);
        close(recip_rank_at(&[1], 10), 1.0);
        close(recip_rank_at(&[], 10), 0.0);
    }

    #[test]
    fn mean_averages_every_query_including_zeros() {
        let a = Metrics::of_query(&[1], &[1]);
        let b = Metrics::of_query(&[0], &[0]); // no relevant document: all zero, still averaged
        assert_eq!(b, Metrics::default());
        let m = Metrics::mean(&[a, b]);
        close(m.ndcg_10, 0.5);
        close(m.recall_100, 0.5);
        close(m.map_100, 0.5);
        close(m.mrr_10, 0.5);
        assert_eq!(Metrics::mean(&[]), Metrics::default());
    }
}
