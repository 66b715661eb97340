"""Text feature sets for the linear head: the result-phrase counts, the per-set regressions, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from peftlab.core.errors import PeftlabError
from peftlab.data.tasks import Example
from peftlab.methods.text_features import (
    RESULT_PATTERNS,
    TextHead,
    example_text,
    feature_set,
    reported_statistics,
    result_counts,
)


def test_reported_statistics_count_each_kind_of_result_phrase():
    text = ("Mortality was lower (p < 0.01) and stays improved (P=0.003); length of stay did not differ "
            "(p = 0.41), no significant difference in cost (p>0.2). Rates were similar.")
    counts = dict(zip(RESULT_PATTERNS, np.expm1(result_counts([text])[0]).round(), strict=True))
    assert counts == {"p below 0.05": 2, "p at or above 0.05": 2, "not significant": 1, "significant": 0,
                      "no difference": 1, "similar": 1, "increase or decrease": 2}


def test_reported_statistics_standardise_on_the_texts_they_were_fitted_on():
    stats = reported_statistics()
    train = stats.fit_transform(["p < 0.01", "p = 0.3 and p = 0.5", "no numbers"])
    assert np.allclose(train.mean(0), 0, atol=1e-9)
    # A new text is scaled by the training texts' mean and spread, not its own.
    assert np.allclose(stats.transform(["no numbers"]), train[2])


def test_text_head_learns_separable_words_and_never_picks_an_absent_class():
    texts = ["no significant difference was found"] * 10 + ["a significant improvement p < 0.01"] * 10
    y = torch.tensor([1] * 10 + [0] * 10)  # class 2 never appears
    for name in ("words", "word-pairs", "reported-statistics"):
        head = TextHead(feature_set(name), n_classes=3).fit(texts, y, balance=1.0)
        logp = head.logprobs(["no significant difference in mortality", "significant improvement p < 0.001"])
        assert logp.shape == (2, 3)
        assert logp.argmax(-1).tolist() == [1, 0], name
        assert (logp[:, 2] <= -1e3).all()
        assert torch.allclose(logp[:, :2].exp().sum(-1), torch.ones(2), atol=1e-6)
        assert set(head.state()) == {"name", "c", "classes", "coef", "intercept", "featurizer"}


def test_feature_sets_read_the_inputs_not_the_target():
    ex = Example("1", {"question": "Does it work?", "context": "It did not (p = 0.4)."}, "no", ("no",))
    assert example_text(ex) == "Does it work? It did not (p = 0.4)."
    with pytest.raises(PeftlabError, match="word-pairs"):
        feature_set("bigrams")
