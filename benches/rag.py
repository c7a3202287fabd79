"""Retrieval against the tools people use, in one run, on the same vectors
and threads: `modelc index` against sentence-transformers for embedding
throughput, and `modelc search` against faiss (IndexHNSWFlat) and hnswlib
for search latency and recall@10 (the same M and ef).

    pip install torch sentence-transformers faiss-cpu hnswlib safetensors
    cargo build --release && python3 benches/rag.py [--passages 10000] [--threads 2] [--rounds 3] [--dtype bf16]

The corpus is real text on every Debian machine with this Python: the
licences in /usr/share/common-licenses, then the Python standard library's
modules, until it makes `--passages` passages of 128 tokens. The queries
are 1,000 paragraphs of the packages' copyright files (not in the corpus),
embedded with sentence-transformers. The truth is exact search (numpy).
"""

import argparse
import hashlib
import json
import pathlib
import statistics
import subprocess
import sys
import sysconfig
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from minilm_fixtures import model_folder  # noqa: E402

MODELC = ROOT / "target/release/modelc"
WORK = ROOT / "target/rag-bench"
M, EF_CONSTRUCTION, K = 16, 200, 10


def corpus(passages: int) -> list[str]:
    """Text files enough for about `passages` passages (~500 characters each)."""
    files = sorted(pathlib.Path("/usr/share/common-licenses").iterdir())
    files += sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen, chars = [], 0
    for f in files:
        if not f.is_file():
            continue
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        chosen.append(str(f))
        chars += len(text)
        if chars / 500 >= passages * 1.05:
            break
    return chosen


def queries(n: int) -> list[str]:
    seen, out = set(), []
    for f in sorted(pathlib.Path("/usr/share/doc").glob("*/copyright")):
        try:
            text = f.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for para in text.split("\n\n"):
            para = " ".join(para.split())
            digest = hashlib.sha1(para.encode()).digest()
            if len(para) >= 100 and digest not in seen:
                seen.add(digest)
                out.append(para[:1000])
                if len(out) == n:
                    return out
    return out


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth)]))


def ours(index: pathlib.Path, qfile: pathlib.Path, ef: int) -> tuple[np.ndarray, float]:
    run = subprocess.run([str(MODELC), "search", str(ROOT / "specs/minilm.model"), "--index", str(index),
                          "--vectors", str(qfile), "-k", str(K), "--ef-search", str(ef)],
                         capture_output=True, text=True, check=True)
    ids = np.array([json.loads(line)["ids"] for line in run.stdout.splitlines()])
    mean_us = float(run.stderr.split("mean ")[1].split(" us")[0])
    return ids, mean_us


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--passages", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="f32", help="modelc index's weights and products: f32 or bf16")
    parser.add_argument("--search-only", action="store_true",
                        help="search the index the last run built (target/rag-bench) without indexing again")
    args = parser.parse_args()
    import faiss
    import hnswlib
    import torch
    from safetensors.numpy import save_file
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(1)
    folder = model_folder()
    WORK.mkdir(parents=True, exist_ok=True)
    index = WORK / "corpus.idx"
    docs = corpus(args.passages)

    # Indexing: tokenise, split, embed, link and commit, end to end.
    if not args.search_only:
        subprocess.run(["rm", "-rf", str(index)], check=True)
    start = time.perf_counter()
    if not args.search_only:
        subprocess.run([str(MODELC), "index", str(ROOT / "specs/minilm.model"), "--weights", str(folder),
                        "--threads", str(args.threads), "--dtype", args.dtype, "--docs", *docs, "--out", str(index)],
                       check=True)
    index_s = time.perf_counter() - start
    passages = [json.loads(line)["text"] for line in (index / "passages.jsonl").read_text().splitlines()]
    manifest = json.loads((index / "manifest.json").read_text())
    dim = manifest["dim"]
    vectors = np.fromfile(index / "vectors.f32", dtype="<f4").reshape(-1, dim)
    n = len(passages)

    # sentence-transformers embeds the same passages (embedding only).
    model = SentenceTransformer(str(folder), device="cpu")
    start = time.perf_counter()
    theirs = model.encode(passages[:1000] if args.search_only else passages, batch_size=32, normalize_embeddings=True)
    st_s = time.perf_counter() - start
    cosine = float(np.min(np.sum(theirs * vectors[:len(theirs)], axis=1)))
    if not args.search_only:
        print(f"indexing {n} passages from {len(docs)} files, {args.threads} threads: modelc index --dtype "
              f"{args.dtype} {index_s:.1f} s ({n / index_s:.1f} passages/s, graph included); sentence-transformers "
              f"encode {st_s:.1f} s ({n / st_s:.1f} passages/s); ratio {st_s / index_s:.2f}x; lowest cosine {cosine:.6f}")

    q = model.encode(queries(1000), batch_size=32, normalize_embeddings=True).astype(np.float32)
    # PyTorch sets OpenMP's thread count on every call: faiss's searches ran
    # on all threads after `encode`, though set to one above.
    faiss.omp_set_num_threads(1)
    qfile = WORK / "queries.safetensors"
    save_file({"queries": q}, str(qfile))
    truth = np.argsort(-(q @ vectors.T), axis=1, kind="stable")[:, :K]

    flat = faiss.IndexHNSWFlat(dim, M, faiss.METRIC_INNER_PRODUCT)
    flat.hnsw.efConstruction = EF_CONSTRUCTION
    start = time.perf_counter()
    flat.add(vectors)
    faiss_build = time.perf_counter() - start
    lib = hnswlib.Index(space="ip", dim=dim)
    lib.init_index(max_elements=n, ef_construction=EF_CONSTRUCTION, M=M)
    lib.set_num_threads(1)
    lib.add_items(vectors)
    print(f"{len(q)} queries, k={K}, M={M}, efConstruction={EF_CONSTRUCTION}, one thread each; "
          f"faiss builds its graph in {faiss_build:.1f} s")
    print(f"{'ef':>5} | {'modelc us':>9} {'recall':>7} | {'faiss us':>8} {'recall':>7} | "
          f"{'hnswlib us':>10} {'recall':>7} | faiss/modelc")
    rows = []
    for ef in (16, 32, 64, 128):
        times = {"modelc": [], "faiss": [], "hnswlib": []}
        for _ in range(args.rounds):
            ids, us = ours(index, qfile, ef)
            times["modelc"].append(us)
            flat.hnsw.efSearch = ef
            start = time.perf_counter()
            _, faiss_ids = flat.search(q, K)
            times["faiss"].append((time.perf_counter() - start) / len(q) * 1e6)
            lib.set_ef(ef)
            start = time.perf_counter()
            lib_ids, _ = lib.knn_query(q, k=K)
            times["hnswlib"].append((time.perf_counter() - start) / len(q) * 1e6)
        med = {k: statistics.median(v) for k, v in times.items()}
        r = (recall(ids, truth), recall(faiss_ids, truth), recall(lib_ids, truth))
        rows.append((ef, med, r))
        print(f"{ef:>5} | {med['modelc']:>9.1f} {r[0]:>7.4f} | {med['faiss']:>8.1f} {r[1]:>7.4f} | "
              f"{med['hnswlib']:>10.1f} {r[2]:>7.4f} | {med['faiss'] / med['modelc']:.2f}x")
    print("(faiss and hnswlib search all queries in one call on one thread, their best case; modelc is timed "
          "per query inside the process)")
    print(json.dumps({"passages": n, "index_s": index_s, "sentence_transformers_s": st_s,
                      "search": [{"ef": ef, **{f"{k}_us": v for k, v in med.items()},
                                  "recall": dict(zip(("modelc", "faiss", "hnswlib"), r))} for ef, med, r in rows]}))


if __name__ == "__main__":
    main()
