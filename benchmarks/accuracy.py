"""Accuracy metrics for the real-network benchmark.

* classifiers without labelled data (EfficientNet-Lite0 on photographs): top-1
  agreement with FP32 and the mean KL divergence KL(p_fp32 || p_int8) of the
  softmax outputs;
* how ambiguous the inputs are: FP32's top-1 minus top-2 softmax probability
  (``top1_margin``), its quantiles (``margin_summary``) and agreement restricted
  to clear-cut inputs (``agreement_by_margin``);
* sentence embeddings (MiniLM): the gensim evaluations, each a correlation
  between cosine similarities of embeddings and human judgements:
  Lee (50 documents, Pearson over the 1,225 upper-triangle pairs),
  WordSim353 (Spearman), SimLex-999 (Spearman).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

from hago.evaluate import log_softmax, mean_kl  # noqa: F401  (one KL for benchmarks and search)


def top1_agreement(logits: np.ndarray, ref: np.ndarray) -> float:
    return float((np.argmax(logits, -1) == np.argmax(ref, -1)).mean())


def top5_overlap(logits: np.ndarray, ref: np.ndarray) -> float:
    """Mean fraction of FP32's top-5 classes also in the candidate's top 5."""
    a = np.argsort(-logits, -1)[:, :5]
    b = np.argsort(-ref, -1)[:, :5]
    return float(np.mean([len(set(x) & set(y)) / 5 for x, y in zip(a, b)]))


def classifier_metrics(logits: np.ndarray, ref: np.ndarray) -> dict:
    return {"top1_agreement": top1_agreement(logits, ref), "mean_kl": mean_kl(logits, ref),
            "top5_overlap": top5_overlap(logits, ref)}


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(1)


def lee_pearson(embed: Callable[[list[str]], np.ndarray]) -> float:
    from models import lee_corpus

    docs, human = lee_corpus()
    e = embed(docs)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    sim = e @ e.T
    iu = np.triu_indices(len(docs), k=1)
    return float(stats.pearsonr(sim[iu], human[iu])[0])


def word_spearman(embed: Callable[[list[str]], np.ndarray], name: str) -> float:
    from models import word_pairs

    a, b, human = word_pairs(name)
    vocab = sorted(set(a) | set(b))
    e = dict(zip(vocab, embed(vocab)))
    cos = _cos_rows(np.stack([e[w] for w in a]), np.stack([e[w] for w in b]))
    return float(stats.spearmanr(cos, human)[0])


def sentence_metrics(embed: Callable[[list[str]], np.ndarray]) -> dict:
    """``embed(texts) -> [len(texts), dim]``; returns the three gensim correlations."""
    return {"lee_pearson": lee_pearson(embed),
            "wordsim353_spearman": word_spearman(embed, "wordsim353.tsv"),
            "simlex999_spearman": word_spearman(embed, "simlex999.txt")}


def embedding_agreement(emb: np.ndarray, ref: np.ndarray) -> float:
    """Mean cosine similarity between candidate and FP32 embeddings of the same texts."""
    return float(_cos_rows(emb, ref).mean())


# ---- ambiguous inputs: how much of the disagreement is on near-ties of FP32 ------------------
MARGINS = (0.05, 0.1, 0.2, 0.3)


def top1_margin(ref: np.ndarray) -> np.ndarray:
    """FP32's softmax probability of its top-1 class minus that of its top-2, per sample."""
    p = np.exp(log_softmax(ref))
    top2 = np.sort(p, -1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def margin_summary(ref: np.ndarray) -> dict:
    """Quantiles of the FP32 top-1/top-2 margin and the fraction of samples below each of MARGINS."""
    m = top1_margin(ref)
    out = {f"margin_q{q}": float(np.quantile(m, q / 100)) for q in (10, 25, 50, 75)}
    out.update({f"frac_margin_lt_{t}": float((m < t).mean()) for t in MARGINS})
    return out


def agreement_by_margin(logits: np.ndarray, ref: np.ndarray) -> dict:
    """Top-1 agreement restricted to samples whose FP32 margin is at least each of MARGINS,
    and the share of all disagreements that fall on samples below 0.1."""
    m = top1_margin(ref)
    agree = np.argmax(logits, -1) == np.argmax(ref, -1)
    out = {f"agree_margin_ge_{t}": float(agree[m >= t].mean()) if (m >= t).any() else None for t in MARGINS}
    out["n_disagree"] = int((~agree).sum())
    out["disagree_share_margin_lt_0.1"] = float((~agree & (m < 0.1)).sum() / max(1, (~agree).sum()))
    return out
