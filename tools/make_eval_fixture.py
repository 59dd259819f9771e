#!/usr/bin/env python3
"""Build the small synthetic BEIR-format dataset that `sgpt eval` is tested on.

Run from the repository root (standard library only, deterministic, nothing downloaded):

    python3 tools/make_eval_fixture.py

Writes tests/fixtures/beir-synthetic/{corpus.jsonl, queries.jsonl, qrels/test.tsv}:

- 200 documents on 30 made-up topics plus filler, so that with the shipped random model
  (models/sgpt-tiny) the rankings are better than chance and every metric is away from 0 and 1;
  titles present, empty and absent; one integer `_id`; accented and CJK text; three documents
  long enough to be truncated (> 297 tokens); three pairs of documents with identical text
  (their scores tie exactly, so the tie-break order is exercised);
- 36 queries, 31 of them judged;
- graded judgments 0/1/2 including 0-label lines, one query whose judgments are all 0 (no
  relevant document), one query whose own `_id` is also a document id with the same text
  (BEIR leaves such a document out of the ranking; arguana and quora depend on it), and one
  judgment naming a document that is not in the corpus (kept, as BEIR does).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "beir-synthetic"
SEED = 6

TOPICS = [
    "volcano lava eruption magma ash crater",
    "vaccine immune virus antibody infection dose",
    "river flood rain dam water valley",
    "galaxy star telescope orbit planet light",
    "bread flour yeast oven dough bake",
    "chess king queen pawn board move",
    "guitar string chord music song note",
    "glacier ice snow cold mountain melt",
    "bee honey flower pollen hive wax",
    "train rail station ticket track engine",
    "coffee bean roast cup milk sugar",
    "whale ocean sea fish deep swim",
    "paper print book page ink letter",
    "bridge steel cable river span load",
    "solar panel energy sun power battery",
    "forest tree leaf wood green bird",
    "market price trade stock money bank",
    "brain neuron memory sleep signal nerve",
    "desert sand heat dry camel dune",
    "robot motor sensor arm code control",
    "cheese milk cow farm salt aged",
    "storm wind cloud thunder rain lightning",
    "language word grammar verb speak text",
    "island boat coast harbor wave sail",
    "garden soil seed plant water grow",
    "castle wall king tower stone gate",
    "moon night tide orbit light dark",
    "computer chip memory data network speed",
    "tea leaf cup hot green water",
    "horse ride saddle field run farm",
]
FILLER = (
    "the of and a to in is was for on with as by at from that this it be are or an which "
    "time year people way day man thing woman life child world school state family group "
    "country problem hand part place case week company system program question work number"
).split()


def sentence(rng: random.Random, keywords: list[str], n_key: int, length: int) -> str:
    words = rng.sample(keywords, n_key) + [rng.choice(FILLER) for _ in range(length - n_key)]
    rng.shuffle(words)
    return " ".join(words).capitalize() + "."


def main() -> None:
    rng = random.Random(SEED)
    docs: list[dict] = []
    qrels: list[tuple[str, str, int]] = []
    queries: list[dict] = []

    def add_doc(doc_id, text, title=None, no_title=False):
        d = {"_id": doc_id}
        if not no_title:
            d["title"] = title if title is not None else ""
        d["text"] = text
        d["metadata"] = {}
        docs.append(d)

    # Per topic: 2 strongly relevant (label 2), 2 weakly relevant (label 1), 1 judged 0.
    for t, topic in enumerate(TOPICS):
        kw = topic.split()
        qid = f"q{t:02d}"
        queries.append({"_id": qid, "text": " ".join(rng.sample(kw, 3)) + "?", "metadata": {}})
        for j in range(5):
            doc_id = f"t{t:02d}-{j}"
            n_key = [5, 4, 2, 2, 1][j]
            text = " ".join(sentence(rng, kw, min(n_key, 3), 12) for _ in range(2))
            title = kw[0].capitalize() + " notes" if j % 3 == 0 else ("" if j % 3 == 1 else None)
            add_doc(doc_id, text, title=title, no_title=(j % 3 == 2))
            label = [2, 2, 1, 1, 0][j]
            if t == 7:  # a query whose judgments are all 0: no relevant document
                label = 0
            qrels.append((qid, doc_id, label))
    # A judgment for a document that is not in the corpus.
    qrels.append(("q03", "not-in-corpus", 1))

    # arguana-style: the query's own id is a document with the same text; it must be left out.
    own = "arg-1"
    own_text = "Solar power battery energy for the panel at night"
    queries.append({"_id": own, "text": own_text, "metadata": {}})
    add_doc(own, own_text, title="")
    qrels += [(own, "t14-0", 2), (own, "t14-2", 1), (own, "t14-4", 0)]

    # Identical texts under different ids: exact score ties.
    for a, b in [("dup-a", "dup-b"), ("dup-d", "dup-c"), ("7", "70")]:
        text = sentence(rng, TOPICS[rng.randrange(len(TOPICS))].split(), 2, 10)
        add_doc(a, text, title="Same")
        add_doc(b, text, title="Same")
    qrels.append(("q05", "dup-c", 1))

    # Long documents (cut to 297 tokens), an integer id, non-ASCII text.
    for i in range(3):
        kw = TOPICS[i * 5].split()
        add_doc(f"long-{i}", " ".join(sentence(rng, kw, 3, 15) for _ in range(40)), title="Long")
    docs.append({"_id": 4242, "title": "Crème brûlée", "text": "Café, œuvre, naïve façade; 東京の火山と溶岩。"})
    qrels.append(("q00", "4242", 0))

    # Filler documents up to 200.
    n = 0
    while len(docs) < 200:
        kw = TOPICS[rng.randrange(len(TOPICS))].split()
        add_doc(f"f{n:03d}", sentence(rng, kw, 1, 14), no_title=(n % 2 == 0))
        n += 1

    # Unjudged queries: read but not evaluated.
    for i in range(5):
        queries.append({"_id": f"u{i}", "text": sentence(rng, FILLER, 0, 5), "metadata": {}})

    rng.shuffle(docs)
    OUT.joinpath("qrels").mkdir(parents=True, exist_ok=True)
    with open(OUT / "corpus.jsonl", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    with open(OUT / "queries.jsonl", "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps(q, ensure_ascii=False) + "\n")
    with open(OUT / "qrels" / "test.tsv", "w", encoding="utf-8") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q, d, s in qrels:
            f.write(f"{q}\t{d}\t{s}\n")
    judged = len({q for q, _, _ in qrels})
    print(f"{OUT}: {len(docs)} documents, {len(queries)} queries ({judged} judged), {len(qrels)} judgments")


if __name__ == "__main__":
    main()
