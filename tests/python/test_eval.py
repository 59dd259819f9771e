"""`sgpt eval`'s metrics must be trec_eval's: pytrec_eval (the pytrec-eval-terrier wheel, which
bundles trec_eval and is what BEIR calls) is run on sgpt's own run file and the fixture's qrels,
and the averages are taken the way BEIR's EvaluateRetrieval does (mean over the judged queries).

Run from the repository root after `cargo test` (or `cargo build`) has built target/debug/sgpt;
SGPT_BIN overrides the binary:  python3 -m pytest tests/python -q
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path

import pytest
import pytrec_eval

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "fixtures" / "beir-synthetic"
MODEL = ROOT / "models" / "sgpt-tiny"
BIN = Path(os.environ.get("SGPT_BIN", ROOT / "target" / "debug" / "sgpt"))

# Both sides compute in f64 from the same labels and ranks; only summation order may differ.
TOL = 1e-12


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    """As BEIR's GenericDataLoader: tab-separated, header skipped, last duplicate wins."""
    qrels: dict[str, dict[str, int]] = {}
    with open(path, encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        next(reader)
        for row in reader:
            qrels.setdefault(row[0], {})[row[1]] = int(row[2])
    return qrels


def read_run(path: Path) -> list[tuple[str, str, int, float]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        qid, q0, doc, rank, score, tag = line.split(" ")
        assert (q0, tag) == ("Q0", "sgpt"), line
        out.append((qid, doc, int(rank), float(score)))
    return out


def trec_order(docs: dict[str, float]) -> list[str]:
    """trec_eval's ranking: score descending, ties by document id descending (strcmp)."""
    by_id = sorted(docs, key=lambda d: d.encode(), reverse=True)
    return sorted(by_id, key=lambda d: -docs[d])  # stable: keeps the id order within ties


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    if not BIN.is_file():
        pytest.fail(f"{BIN} not found: run `cargo test` or `cargo build` first, or set SGPT_BIN")
    d = tmp_path_factory.mktemp("eval")
    cmd = [
        str(BIN), "eval", "--model", str(MODEL), "--data", str(DATA),
        "--cache-dir", str(d / "cache"), "--run", str(d / "run.trec"),
        "--json", str(d / "metrics.json"), "--quiet",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    lines = read_run(d / "run.trec")
    run: dict[str, dict[str, float]] = {}
    for qid, doc, _, score in lines:
        assert doc not in run.setdefault(qid, {}), f"{qid}: {doc} twice"
        run[qid][doc] = score
    metrics = json.loads((d / "metrics.json").read_text())
    return read_qrels(DATA / "qrels" / "test.tsv"), run, lines, metrics


def test_metrics_equal_trec_eval(evaluated):
    qrels, run, _, metrics = evaluated
    per_query = pytrec_eval.RelevanceEvaluator(
        qrels, {"ndcg_cut.10", "recall.100", "map_cut.100"}
    ).evaluate(run)
    # MRR@10: trec_eval's recip_rank on each query's top 10 in trec_eval's own order.
    top10 = {q: {d: docs[d] for d in trec_order(docs)[:10]} for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10)

    assert set(per_query) == set(qrels), "every judged query must be in the run"
    n = len(per_query)
    want = {
        "ndcg@10": sum(v["ndcg_cut_10"] for v in per_query.values()) / n,
        "recall@100": sum(v["recall_100"] for v in per_query.values()) / n,
        "map@100": sum(v["map_cut_100"] for v in per_query.values()) / n,
        "mrr@10": sum(v["recip_rank"] for v in rr.values()) / n,
    }
    for key, value in want.items():
        assert metrics[key] == pytest.approx(value, abs=TOL), key
        # The comparison means something only away from the trivial values.
        assert 0.02 < value < 0.98, (key, value)
    for q, v in per_query.items():
        got = metrics["per_query"][q]
        assert got["ndcg@10"] == pytest.approx(v["ndcg_cut_10"], abs=TOL), q
        assert got["recall@100"] == pytest.approx(v["recall_100"], abs=TOL), q
        assert got["map@100"] == pytest.approx(v["map_cut_100"], abs=TOL), q
        assert got["mrr@10"] == pytest.approx(rr[q]["recip_rank"], abs=TOL), q
    # The query whose judgments are all 0 is evaluated and scores 0 everywhere, as in BEIR.
    zero = [q for q, j in qrels.items() if all(s <= 0 for s in j.values())]
    assert zero and all(v == 0 for q in zero for v in metrics["per_query"][q].values())


def test_run_ranks_are_trec_eval_ranks(evaluated):
    qrels, run, lines, _ = evaluated
    ranks: dict[str, list[str]] = {}
    for qid, doc, rank, _ in lines:
        ranks.setdefault(qid, []).append(doc)
        assert rank == len(ranks[qid]), (qid, doc, rank)
    ties = 0
    for q, docs in run.items():
        assert len(docs) == 100, q
        assert ranks[q] == trec_order(docs), q
        ties += len(docs) - len(set(docs.values()))
        assert q not in docs, f"{q} retrieved its own id"
    assert ties > 0, "the fixture's identical documents should tie somewhere"
    assert list(ranks) == list(qrels), "queries in the order of their first judgment"
