"""Evaluation scorers: torchmetrics ``Metric``s with sum states (exact under DDP) and per-example helpers."""

from seka_lightning.metrics.exact_match import SubspanExactMatch, best_subspan_em, normalize_answer
from seka_lightning.metrics.fluency import NGramEntropy, is_degenerate, n_gram_entropy, word_tokenize
from seka_lightning.metrics.mean import MeanScore
from seka_lightning.metrics.preference import TargetPreference
from seka_lightning.metrics.pronouns import (
    PronounChange,
    PronounChangeScore,
    has_subject_pronoun,
    pronoun_change,
    strip_echo,
)
from seka_lightning.metrics.ranking import TopKAccuracy, gold_rank
from seka_lightning.metrics.targets import (
    candidate_logprobs,
    first_token_logprob,
    target_casings,
    target_first_token_ids,
)
from seka_lightning.metrics.tfidf import TfidfConsistency, TfidfVectorizer, cosine_similarity

__all__ = [
    "MeanScore",
    "NGramEntropy",
    "PronounChange",
    "PronounChangeScore",
    "SubspanExactMatch",
    "TargetPreference",
    "TfidfConsistency",
    "TfidfVectorizer",
    "TopKAccuracy",
    "best_subspan_em",
    "candidate_logprobs",
    "cosine_similarity",
    "first_token_logprob",
    "gold_rank",
    "has_subject_pronoun",
    "is_degenerate",
    "n_gram_entropy",
    "normalize_answer",
    "pronoun_change",
    "strip_echo",
    "target_casings",
    "target_first_token_ids",
    "word_tokenize",
]
