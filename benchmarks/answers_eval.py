"""`medserve bench answers`: citation correctness of POST /v1/answers on the bilingual set.

Ingests the evaluation passages (benchmarks/data/retrieval_eval.json) as one document each
into a running server's knowledge base, asks every question, and counts, per (question
language -> passage language):

* answered: not refused (every question has a supporting passage in the base);
* cited: the supporting passage is among the answer's citations;
* offsets: every citation's ``text[start:end]`` equals its passage (read back with GET);
* precision: the share of citations that are a supporting passage;

and, for the set's unrelated questions (nothing in the base answers them), the share refused.

Run it against a server whose knowledge base is empty (e.g. MEDSERVE_KNOWLEDGE_DATA_DIR set to
a new folder), so other documents do not compete.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from typing import Any

import httpx
from medserve.benchmarks.machine import cpu_info
from medserve.benchmarks.retrieval_eval import DATA


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medserve bench answers", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--top-k", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)
    data = json.loads(DATA.read_text(encoding="utf-8"))
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=600) as client:
        stored = client.get("/v1/documents")
        stored.raise_for_status()
        if stored.json()["data"]:
            print(
                "medserve bench answers: the knowledge base is not empty; start the server with "
                "MEDSERVE_KNOWLEDGE_DATA_DIR set to a new folder",
                file=sys.stderr,
            )
            return 2
        doc_of = ingest(client, data["passages"])
        texts = {doc: client.get(f"/v1/documents/{doc}").json()["text"] for doc in doc_of}
        rows = [ask(client, q, doc_of, texts, args) for q in data["questions"]]
        refused = [refuses(client, q, args) for q in data["unrelated_questions"]]
    report = summarise(rows)
    report["unrelated"] = {"questions": len(refused), "refused": sum(refused) / len(refused)}
    report["cpu"] = cpu_info()["cpu_model"]
    print(json.dumps(report, indent=2, ensure_ascii=False))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as out:
            json.dump(report, out, indent=2, ensure_ascii=False)
    return 0


def ingest(client: httpx.Client, passages: list[dict[str, str]]) -> dict[str, str]:
    """Document id -> passage id, one document per passage (the id travels as ``source``)."""
    documents = [
        {"title": p["title"], "text": p["text"], "source": p["id"], "language": p["lang"]}
        for p in passages
    ]
    response = client.post("/v1/documents", json={"documents": documents})
    response.raise_for_status()
    return {d["id"]: d["source"] for d in response.json()["data"]}


def ask(
    client: httpx.Client,
    question: dict[str, Any],
    doc_of: dict[str, str],
    texts: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    body = {"question": question["text"], "top_k": args.top_k, "max_tokens": args.max_tokens}
    answer = client.post("/v1/answers", json=body).json()
    support = set(question["support"])
    cited = [doc_of.get(c["document_id"]) for c in answer.get("citations", [])]
    passages = {(p["document_id"], p["start"], p["end"]): p["text"] for p in answer["passages"]}
    offsets_ok = all(
        texts[c["document_id"]][c["start"] : c["end"]]
        == passages.get((c["document_id"], c["start"], c["end"]))
        for c in answer.get("citations", [])
    )
    passage_lang = {s.split("-")[0] for s in support}
    return {
        "split": f"{question['lang']}->{'/'.join(sorted(passage_lang))}",
        "answered": not answer["refused"],
        "cited": bool(support & set(cited)),
        "offsets": offsets_ok,
        "precision": (sum(c in support for c in cited) / len(cited)) if cited else 0.0,
    }


def refuses(client: httpx.Client, question: dict[str, Any], args: argparse.Namespace) -> bool:
    body = {"question": question["text"], "top_k": args.top_k, "max_tokens": args.max_tokens}
    return bool(client.post("/v1/answers", json=body).json()["refused"])


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["split"]].append(row)
        groups["all"].append(row)
    return {
        name: {
            "questions": len(group),
            "answered": sum(r["answered"] for r in group) / len(group),
            "cited": sum(r["cited"] for r in group) / len(group),
            "offsets_exact": sum(r["offsets"] for r in group) / len(group),
            "citation_precision": sum(r["precision"] for r in group) / len(group),
        }
        for name, group in sorted(groups.items())
    }


if __name__ == "__main__":
    sys.exit(main())
