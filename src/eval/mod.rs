//! `sgpt eval`: retrieval quality on a dataset in BEIR layout, so the model card's BEIR table
//! can be reproduced with this engine.

pub mod beir;
pub mod cache;
pub mod metrics;
pub mod search;
