"""Text features for `linear-head`: what an example says in words, read beside what the frozen model's states say.

A small model's states, mean-pooled over a 400-token abstract, blur the few words that decide a PubMedQA answer
("no significant difference", "p = 0.41"). Each feature set here reads the example's input text directly and gets
its own logistic regression; `linear-head` adds their class log-probabilities to its hidden-state head's (late
fusion, so one set cannot drown another by its width). Every set is fitted on the training split only: the TF-IDF
vocabulary and idf weights, the standardisation, the regression.

`research/pubmedqa_lexical_levers.py` measured each set, alone and fused, under PubMedQA's 10-fold cross-validation;
docs/results.md has the table. Each set's L2 strength (`c`) is the one chosen there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import Example
from peftlab.prompts.weights import class_weights

# Phrases that report a result, counted per text (`result_counts`). In PubMedQA's 500 trainval questions a
# "no" abstract reports a p-value at or above 0.05, or "no significant" difference, about twice as often as a "yes"
# one. The patterns were written from how abstracts report results, not fitted.
RESULT_PATTERNS = {
    "p below 0.05": r"\b[pP]\s*(?:<|≤|&lt;)\s*0?\.0|\b[pP]\s*=\s*0?\.0[0-4]",
    "p at or above 0.05": r"\b[pP]\s*(?:>|≥|&gt;)\s*0?\.|\b[pP]\s*=\s*0?\.(?:0[5-9]|[1-9])",
    "not significant": r"\b(?:no|not|non)[- ]?(?:statistically )?significant|\bn\.s\.|\bNS\b",
    "significant": r"(?<!no )(?<!not )(?<!non-)\bsignificant(?:ly)?\b",
    "no difference": r"\b(?:did not|does not|do not|was not|were not|no (?:difference|association|effect|change))",
    "similar": r"\b(?:similar|comparable|equivalent)\b",
    "increase or decrease": r"\b(?:increased|decreased|higher|lower|improved|reduced)\b",
}


def result_counts(texts: Sequence[str]) -> np.ndarray:
    """log(1 + count) of each `RESULT_PATTERNS` phrase in each text."""
    patterns = [re.compile(p) for p in RESULT_PATTERNS.values()]
    return np.log1p(np.array([[len(p.findall(t)) for p in patterns] for t in texts], dtype=np.float64))


def reported_statistics():
    """`result_counts`, standardised on the texts it is fitted on (a scikit-learn pipeline)."""
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    return make_pipeline(FunctionTransformer(result_counts), StandardScaler())


def _counts_state(pipeline) -> dict:
    scaler = pipeline[-1]
    return {"patterns": RESULT_PATTERNS, "mean": scaler.mean_.tolist(), "scale": scaler.scale_.tolist()}


def _tfidf(ngrams: tuple[int, int]) -> Callable:
    def make():
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(min_df=2, sublinear_tf=True, ngram_range=ngrams)
    return make


def _tfidf_state(vectorizer) -> dict:
    return {"vocabulary": {k: int(v) for k, v in vectorizer.vocabulary_.items()}, "idf": vectorizer.idf_.tolist(),
            "ngram_range": list(vectorizer.ngram_range)}


def _tfidf_restore(state: dict):
    """A fitted TF-IDF vectorizer from `_tfidf_state`: the same vocabulary and idf weights, so the same vectors."""
    vectorizer = _tfidf(tuple(state["ngram_range"]))()
    vectorizer.vocabulary_ = dict(state["vocabulary"])
    vectorizer.idf_ = np.array(state["idf"])
    return vectorizer


def _counts_restore(state: dict):
    """The fitted counts pipeline from `_counts_state`; refuses patterns that changed since the run was saved."""
    if state["patterns"] != RESULT_PATTERNS:
        raise PeftlabError("reported-statistics: the saved head counted other phrases than this version does")
    pipeline = reported_statistics()
    scaler = pipeline[-1]
    scaler.mean_, scaler.scale_ = np.array(state["mean"]), np.array(state["scale"])
    scaler.var_, scaler.n_features_in_ = scaler.scale_**2, len(state["mean"])
    pipeline[0].fit([])  # a FunctionTransformer holds no state; fitting it only marks it fitted
    return pipeline


@dataclass(frozen=True)
class FeatureSet:
    """A registered text feature set: how to build its (unfitted) featurizer and its regression's L2 strength."""

    name: str
    make: Callable  # () -> an object with fit_transform(texts) and transform(texts)
    c: float  # inverse L2 strength of its logistic regression (research/pubmedqa_lexical_levers.py)
    state: Callable  # fitted featurizer -> what `save` writes (JSON-able)
    restore: Callable  # that state -> the fitted featurizer again
    help: str


FEATURE_SETS = {
    s.name: s
    for s in (
        FeatureSet("words", _tfidf((1, 1)), 3.0, _tfidf_state, _tfidf_restore,
                   "TF-IDF over single words (min_df 2, sublinear tf)"),
        FeatureSet("word-pairs", _tfidf((1, 2)), 3.0, _tfidf_state, _tfidf_restore,
                   "TF-IDF over words and adjacent word pairs, which keep 'no significant' whole"),
        FeatureSet("reported-statistics", reported_statistics, 0.1, _counts_state, _counts_restore,
                   "counts of result phrases: p-values below and above 0.05, (not) significant, no difference, ..."),
    )
}


def feature_set(name: str) -> FeatureSet:
    if name not in FEATURE_SETS:
        raise PeftlabError(f"unknown text feature set {name!r}; choose from {', '.join(FEATURE_SETS)}")
    return FEATURE_SETS[name]


def example_text(example: Example) -> str:
    """The text the feature sets read: every input field (PubMedQA: question and context), never the target."""
    return " ".join(str(v) for v in example.inputs.values())


class TextHead:
    """One feature set's logistic regression over the task's classes; classes absent from training never win."""

    def __init__(self, features: FeatureSet, n_classes: int):
        self.features = features
        self.n_classes = n_classes
        self.featurizer = None
        self.model = None

    def fit(self, texts: Sequence[str], y: torch.Tensor, balance: float) -> TextHead:
        from sklearn.linear_model import LogisticRegression
        from threadpoolctl import threadpool_limits

        self.featurizer = self.features.make()
        x = self.featurizer.fit_transform(list(texts))
        self.model = LogisticRegression(C=self.features.c, class_weight=class_weights(y, self.n_classes, balance),
                                        max_iter=5000)
        with threadpool_limits(1):  # a small fit: one BLAS thread (see methods.head.fit_logistic)
            self.model.fit(x, y.numpy())
        return self

    def logprobs(self, texts: Sequence[str]) -> torch.Tensor:
        """Class log-probabilities, shape (len(texts), n_classes); -1e4 for a class the fit never saw."""
        proba = self.model.predict_proba(self.featurizer.transform(list(texts)))
        out = torch.full((len(texts), self.n_classes), -1e4)
        out[:, torch.from_numpy(self.model.classes_)] = torch.from_numpy(np.log(proba + 1e-12)).float()
        return out

    @property
    def n_params(self) -> int:
        """Fitted coefficients and intercepts: the set's share of the head's trainable parameters."""
        return self.model.coef_.size + self.model.intercept_.size

    def state(self) -> dict:
        """What `methods.head.save_head` writes for this set: the fitted featurizer and the regression's
        coefficients."""
        return {"name": self.features.name, "c": self.features.c, "classes": self.model.classes_.tolist(),
                "coef": self.model.coef_.tolist(), "intercept": self.model.intercept_.tolist(),
                "featurizer": self.features.state(self.featurizer)}

    @classmethod
    def from_state(cls, state: dict, n_classes: int) -> TextHead:
        """The fitted head `state()` wrote: featurizer and regression as they were, so the same log-probabilities."""
        from sklearn.linear_model import LogisticRegression

        features = feature_set(state["name"])
        head = cls(features, n_classes)
        head.featurizer = features.restore(state["featurizer"])
        head.model = LogisticRegression(C=state["c"])
        head.model.classes_ = np.array(state["classes"])
        head.model.coef_, head.model.intercept_ = np.array(state["coef"]), np.array(state["intercept"])
        return head
