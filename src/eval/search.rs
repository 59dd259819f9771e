//! Exact cosine top-k: every query against every document, as blocked matrix products, keeping
//! a bounded min-heap of the k best documents per query. The full [queries × documents] score
//! matrix never exists: one [query block × document block] tile at a time does.
//!
//! Dimension letters: `Q` queries, `D` documents, `H` hidden, `k` kept per query,
//! `Qb`/`Db` the rows of one query/document block.
//!
//! Order (the contract every [`Scorer`] keeps): higher score first; equal scores are ordered by
//! document id **descending** (byte order), which is trec_eval's tie-break, so the ranks written
//! to a run file are the ranks trec_eval evaluates. A document whose id equals the query's id is
//! never returned for that query (BEIR's default `ignore_identical_ids`).
//!
//! [`BlockedScorer`] does the blocking and the heaps; its tiles come from a [`TileProduct`]:
//! [`CpuProduct`] (multi-threaded `gemm`) or, with a GPU, cuBLASLt in f32 (`search_gpu`).

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use rayon::prelude::*;

use crate::backend::cpu::gemm::{matmul, Parallelism};
use crate::error::{Error, Result};

/// One retrieved document.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    /// Index in the corpus.
    pub doc: u32,
    /// Cosine similarity (dot product of unit vectors, f32).
    pub score: f32,
}

/// What a search needs besides the vectors.
#[derive(Debug, Clone)]
pub struct SearchPlan {
    /// Documents kept per query.
    pub k: usize,
    /// Per document: its position when all document ids are sorted by bytes ([`tie_ranks`]).
    pub tie_rank: Vec<u32>,
    /// Per query: the document with the same id, left out of that query's ranking.
    pub exclude: Vec<Option<u32>>,
}

/// A streaming exact search. Documents arrive in corpus order, in blocks of any size
/// (cache shards); `finish` returns every query's k best, best first.
pub trait Scorer {
    /// Scores documents `first .. first + rows` (`docs` is [rows, H], unit rows) against every
    /// query. `first` must continue where the previous call ended.
    fn add_documents(&mut self, first: usize, docs: &[f32]) -> Result<()>;
    /// Every query's top k, best first.
    fn finish(self: Box<Self>) -> Result<Vec<Vec<Hit>>>;
    /// e.g. "cpu exact (gemm, 2 threads)".
    fn describe(&self) -> String;
}

/// Position of each id in byte order: `rank[i] < rank[j]` iff `ids[i] < ids[j]`.
pub fn tie_ranks(ids: &[String]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..ids.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| ids[a as usize].cmp(&ids[b as usize]));
    let mut rank = vec![0u32; ids.len()];
    for (pos, &i) in order.iter().enumerate() {
        rank[i as usize] = pos as u32;
    }
    rank
}

/// A candidate: better is a higher score, then a later id (higher tie rank).
#[derive(Debug, Clone, Copy)]
struct Entry {
    score: f32,
    tie: u32,
    doc: u32,
}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then(self.tie.cmp(&other.tie))
    }
}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Entry {}

/// The k best entries seen so far; the root is the worst of them.
#[derive(Debug, Clone)]
struct TopK {
    k: usize,
    heap: BinaryHeap<Reverse<Entry>>,
}

impl TopK {
    fn new(k: usize) -> Self {
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k + 1),
        }
    }

    /// Offers the scores of documents `first ..` (one row of a score tile).
    fn offer_row(&mut self, first: usize, row: &[f32], tie_rank: &[u32], exclude: Option<u32>) {
        for (j, &s) in row.iter().enumerate() {
            let doc = (first + j) as u32;
            if Some(doc) == exclude {
                continue;
            }
            // -0.0 → +0.0: trec_eval compares scores as numbers, where the two are equal.
            let score = s + 0.0;
            if self.heap.len() == self.k {
                // Fast reject; equal scores go on to the tie-break.
                if let Some(Reverse(worst)) = self.heap.peek() {
                    if score < worst.score {
                        continue;
                    }
                }
            }
            let e = Entry {
                score,
                tie: tie_rank[doc as usize],
                doc,
            };
            if self.heap.len() < self.k {
                self.heap.push(Reverse(e));
            } else if let Some(mut worst) = self.heap.peek_mut() {
                if e > worst.0 {
                    *worst = Reverse(e);
                }
            }
        }
    }

    fn into_sorted(self) -> Vec<Hit> {
        // Ascending order of Reverse = descending order of Entry: best first.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|Reverse(e)| Hit {
                doc: e.doc,
                score: e.score,
            })
            .collect()
    }
}

/// Query rows per tile.
pub const QUERY_BLOCK: usize = 512;
/// Document rows per tile: a 512 × 4096 f32 tile is 8 MiB.
pub const DOC_BLOCK: usize = 4096;

/// One score tile: `out[qn, n] = queries[qn, H] · docs[n, H]ᵀ`, all row-major f32. The CPU does
/// it with the `gemm` crate; the GPU with cuBLASLt (`crate::eval::search_gpu`).
pub trait TileProduct: Send {
    fn product(
        &mut self,
        queries: &[f32],
        docs: &[f32],
        hidden: usize,
        out: &mut [f32],
    ) -> Result<()>;
    /// e.g. "cpu exact (gemm, 2 threads)".
    fn describe(&self) -> String;
}

/// Tiles on the CPU through the `gemm` crate (packed SIMD kernels, rayon threads).
pub struct CpuProduct;

impl TileProduct for CpuProduct {
    fn product(&mut self, lhs: &[f32], docs: &[f32], h: usize, out: &mut [f32]) -> Result<()> {
        let (qn, n) = (lhs.len() / h, docs.len() / h);
        assert!(out.len() == qn * n && lhs.len() == qn * h && docs.len() == n * h);
        // SAFETY: dst is the [qn, n] tile (row stride n, column stride 1), exactly
        // qn·n long; lhs the [qn, H] query rows (row stride H); rhs = docsᵀ, [H, n], read from
        // docs [n, H] with row stride 1 and column stride H: element (c, j) = docs[j·H + c],
        // j < n, c < H, inside docs.len() = n·H. dst is a fresh &mut, disjoint from both.
        unsafe {
            matmul(
                (qn, n, h),
                out.as_mut_ptr(),
                n,
                lhs.as_ptr(),
                (h, 1),
                docs.as_ptr(),
                (1, h),
                false,
                Parallelism::Rayon(rayon::current_num_threads()),
            );
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("cpu exact (gemm, {} threads)", rayon::current_num_threads())
    }
}

/// Exact search on the CPU; see [`BlockedScorer`].
pub type CpuScorer = BlockedScorer<CpuProduct>;

/// Exact search by tiles: each [query block × document block] tile from a [`TileProduct`],
/// then each query's row of the tile into its heap, queries in parallel. Documents are
/// re-blocked at fixed offsets (multiples of the document block), so every score is computed
/// the same way whatever the shard sizes were: a resumed run ranks exactly like a fresh one.
/// (The same dot product computed inside tiles of other shapes can differ in the last bit;
/// the unit tests saw it with 5×7 vs 512×4096 tiles.)
pub struct BlockedScorer<P: TileProduct> {
    product: P,
    /// [Q, H], unit rows.
    queries: Vec<f32>,
    hidden: usize,
    plan: SearchPlan,
    heaps: Vec<TopK>,
    query_block: usize,
    doc_block: usize,
    /// Documents received but not yet scored: rows `pending_first ..`, [rows, H].
    pending: Vec<f32>,
    pending_first: usize,
    /// [Qb, Db] tile.
    tile: Vec<f32>,
}

impl CpuScorer {
    /// `queries` is [Q, H] with unit rows.
    pub fn new(queries: Vec<f32>, hidden: usize, plan: SearchPlan) -> Result<Self> {
        Self::with_blocks(queries, hidden, plan, QUERY_BLOCK, DOC_BLOCK)
    }

    /// As [`CpuScorer::new`] with explicit tile sizes (tests use odd ones to hit every edge).
    pub fn with_blocks(
        queries: Vec<f32>,
        hidden: usize,
        plan: SearchPlan,
        query_block: usize,
        doc_block: usize,
    ) -> Result<Self> {
        BlockedScorer::with_product(CpuProduct, queries, hidden, plan, query_block, doc_block)
    }
}

impl<P: TileProduct> BlockedScorer<P> {
    /// A scorer whose tiles come from `product`; `queries` is [Q, H] with unit rows.
    pub fn with_product(
        product: P,
        queries: Vec<f32>,
        hidden: usize,
        plan: SearchPlan,
        query_block: usize,
        doc_block: usize,
    ) -> Result<Self> {
        if hidden == 0 || !queries.len().is_multiple_of(hidden) {
            return Err(Error::Input(format!(
                "search: {} query values are not a whole number of {hidden}-wide rows",
                queries.len()
            )));
        }
        if plan.k == 0 || query_block == 0 || doc_block == 0 {
            return Err(Error::Input(
                "search: k and block sizes must be positive".into(),
            ));
        }
        let q = queries.len() / hidden;
        if plan.exclude.len() != q {
            return Err(Error::Input(format!(
                "search: {} exclusions for {q} queries",
                plan.exclude.len()
            )));
        }
        let heaps = vec![TopK::new(plan.k); q];
        Ok(BlockedScorer {
            product,
            queries,
            hidden,
            heaps,
            plan,
            query_block,
            doc_block,
            pending: Vec::new(),
            pending_first: 0,
            tile: Vec::new(),
        })
    }

    /// Scores `docs` ([n, H], rows `first ..`) against every query.
    fn score_block(&mut self, first: usize, docs: &[f32]) -> Result<()> {
        let h = self.hidden;
        let n = docs.len() / h;
        let q = self.heaps.len();
        for qs in (0..q).step_by(self.query_block) {
            let qn = self.query_block.min(q - qs);
            self.tile.resize(qn * n, 0.0);
            let lhs = &self.queries[qs * h..(qs + qn) * h];
            self.product.product(lhs, docs, h, &mut self.tile)?;
            let (tie_rank, exclude) = (&self.plan.tie_rank, &self.plan.exclude[qs..qs + qn]);
            self.heaps[qs..qs + qn]
                .par_iter_mut()
                .zip(self.tile.par_chunks(n))
                .zip(exclude.par_iter())
                .for_each(|((heap, row), &ex)| heap.offer_row(first, row, tie_rank, ex));
        }
        Ok(())
    }

    /// Scores every complete document block in `pending` (all of it when `all`).
    fn drain(&mut self, all: bool) -> Result<()> {
        let h = self.hidden;
        let mut done = 0;
        let rows = self.pending.len() / h;
        while rows - done >= self.doc_block || (all && done < rows) {
            let n = self.doc_block.min(rows - done);
            let block = std::mem::take(&mut self.pending);
            let r = self.score_block(self.pending_first + done, &block[done * h..(done + n) * h]);
            self.pending = block;
            r?;
            done += n;
        }
        self.pending.drain(..done * h);
        self.pending_first += done;
        Ok(())
    }
}

impl<P: TileProduct> Scorer for BlockedScorer<P> {
    fn add_documents(&mut self, first: usize, docs: &[f32]) -> Result<()> {
        let expected = self.pending_first + self.pending.len() / self.hidden;
        if first != expected || !docs.len().is_multiple_of(self.hidden) {
            return Err(Error::Input(format!(
                "search: documents must arrive in order as whole rows: got rows from {first}, \
                 expected {expected}"
            )));
        }
        let end = first + docs.len() / self.hidden;
        if end > self.plan.tie_rank.len() {
            return Err(Error::Input(format!(
                "search: document {end} is past the corpus ({} documents)",
                self.plan.tie_rank.len()
            )));
        }
        self.pending.extend_from_slice(docs);
        self.drain(false)
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<Vec<Hit>>> {
        self.drain(true)?;
        Ok(self.heaps.into_iter().map(TopK::into_sorted).collect())
    }

    fn describe(&self) -> String {
        self.product.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::pooling::l2_normalize;

    /// Deterministic pseudo-random values in [-1, 1) (splitmix64).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = s;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                ((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// The obvious way: every score in f64, a full sort with the same order.
    fn brute_force(q: &[f32], d: &[f32], h: usize, plan: &SearchPlan) -> Vec<Vec<(u32, f64)>> {
        q.chunks(h)
            .enumerate()
            .map(|(qi, qv)| {
                let mut all: Vec<(u32, f64)> = d
                    .chunks(h)
                    .enumerate()
                    .filter(|(j, _)| plan.exclude[qi] != Some(*j as u32))
                    .map(|(j, dv)| {
                        let s = qv.iter().zip(dv).map(|(a, b)| *a as f64 * *b as f64).sum();
                        (j as u32, s)
                    })
                    .collect();
                all.sort_by(|a, b| {
                    b.1.total_cmp(&a.1)
                        .then(plan.tie_rank[b.0 as usize].cmp(&plan.tie_rank[a.0 as usize]))
                });
                all.truncate(plan.k);
                all
            })
            .collect()
    }

    #[test]
    fn tie_ranks_follow_byte_order() {
        let ids: Vec<String> = ["b", "a", "B", "ab", "10", "9"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // byte order: "10" < "9" < "B" < "a" < "ab" < "b"
        assert_eq!(tie_ranks(&ids), [5, 3, 2, 4, 0, 1]);
    }

    #[test]
    fn matches_brute_force_for_any_blocking_and_shards() {
        let h = 24;
        let (nq, nd) = (37, 301);
        let mut q = values(nq * h, 1);
        let mut d = values(nd * h, 2);
        l2_normalize(&mut q, h);
        l2_normalize(&mut d, h);
        let ids: Vec<String> = (0..nd).map(|i| format!("doc{}", (i * 7919) % nd)).collect();
        for k in [1, 10, 100, 400] {
            let plan = SearchPlan {
                k,
                tie_rank: tie_ranks(&ids),
                exclude: (0..nq)
                    .map(|i| (i % 3 == 0).then_some(i as u32 * 5))
                    .collect(),
            };
            let want = brute_force(&q, &d, h, &plan);
            for (qb, db) in [(512, 4096), (5, 7), (1, 1), (37, 300)] {
                let run = |shard: usize| {
                    let mut s = Box::new(
                        CpuScorer::with_blocks(q.clone(), h, plan.clone(), qb, db).unwrap(),
                    );
                    for start in (0..nd).step_by(shard) {
                        let end = (start + shard).min(nd);
                        s.add_documents(start, &d[start * h..end * h]).unwrap();
                    }
                    s.finish().unwrap()
                };
                let got = run(nd);
                for (qi, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert_eq!(g.len(), w.len().min(k), "query {qi} k {k}");
                    for (r, (gh, wh)) in g.iter().zip(w).enumerate() {
                        // f32 tiles vs the f64 reference: a 24-term f32 dot product of unit
                        // vectors is within 1e-6, and only documents that close may swap.
                        assert!((gh.score as f64 - wh.1).abs() < 1e-6, "query {qi} rank {r}");
                        if gh.doc != wh.0 {
                            let ws = w.iter().find(|x| x.0 == gh.doc).map(|x| x.1);
                            assert!(
                                ws.is_some_and(|s| (s - wh.1).abs() < 2e-6),
                                "query {qi} rank {r}: got doc {} want {} (k {k}, {qb}/{db})",
                                gh.doc,
                                wh.0
                            );
                        }
                    }
                    if let Some(ex) = plan.exclude[qi] {
                        assert!(g.iter().all(|x| x.doc != ex));
                    }
                }
                // Bit for bit the same result whatever the shards (a resumed run delivers
                // documents in other shards than a fresh one), and on one thread.
                for shard in [1, 13, 100] {
                    assert_eq!(run(shard), got, "k {k} blocks {qb}/{db} shard {shard}");
                }
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(1)
                    .build()
                    .unwrap();
                assert_eq!(
                    pool.install(|| run(nd)),
                    got,
                    "k {k} blocks {qb}/{db} one thread"
                );
            }
        }
    }

    #[test]
    fn ties_go_to_the_larger_id_as_in_trec_eval() {
        // Four identical documents: equal scores; order by id descending; -0.0 equals 0.0.
        let h = 2;
        let q = vec![1.0, 0.0];
        let d = vec![0.6, 0.8, 0.6, 0.8, 0.0, 1.0, 0.6, 0.8, -0.0, 1.0];
        let ids: Vec<String> = ["b", "d", "z", "a", "y"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let plan = SearchPlan {
            k: 5,
            tie_rank: tie_ranks(&ids),
            exclude: vec![None],
        };
        let mut s = Box::new(CpuScorer::with_blocks(q, h, plan, 1, 2).unwrap());
        s.add_documents(0, &d).unwrap();
        let got = s.finish().unwrap();
        let order: Vec<&str> = got[0]
            .iter()
            .map(|x| ids[x.doc as usize].as_str())
            .collect();
        assert_eq!(order, ["d", "b", "a", "z", "y"]);
    }

    #[test]
    fn refuses_out_of_order_documents() {
        let plan = SearchPlan {
            k: 1,
            tie_rank: vec![0, 1, 2],
            exclude: vec![None],
        };
        let mut s = CpuScorer::new(vec![1.0], 1, plan).unwrap();
        s.add_documents(0, &[1.0]).unwrap();
        assert!(s.add_documents(2, &[1.0]).is_err());
        assert!(s.add_documents(1, &[1.0, 1.0, 1.0]).is_err());
    }
}
