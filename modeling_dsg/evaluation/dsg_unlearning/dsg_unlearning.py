"""DSG unlearning: multiple-choice scores of a (possibly unlearned) language model, as an `evaluate` metric.

This module is a thin `evaluate.Metric` over `modeling_dsg.evaluation.metrics.compute_choice_metrics`, the
function `dsg eval` itself calls where this module is not installed, so the numbers are the same whichever
way they are computed. It therefore needs the `modeling_dsg` package installed (`pip install modeling_dsg`);
`evaluate.load` names it as a missing dependency otherwise. Load it from a local path, which works offline:

    import evaluate
    metric = evaluate.load("modeling_dsg/evaluation/dsg_unlearning")
    metric.compute(predictions=[[-1.2, -0.3, -2.0, -2.2]], references=[1])
"""

import datasets
import evaluate

from modeling_dsg.evaluation.metrics import compute_choice_metrics

_CITATION = """\
@article{muhamed2025dsg,
  title={SAEs Can Improve Unlearning: Dynamic Sparse Autoencoder Guardrails for Precision Unlearning in LLMs},
  author={Muhamed, Aashiq and Bonato, Jacopo and Diab, Mona and Smith, Virginia},
  journal={arXiv preprint arXiv:2504.08192},
  year={2025}
}
"""

_DESCRIPTION = """\
Scores multiple-choice answers from per-choice model scores: letter accuracy (the argmax), the
probability given to the correct choice (softmax over the choices), and the raw score and probability of
the correct choice. Run it once on the forget set (e.g. WMDP-bio; lower is better after unlearning) and
once on the retain set (e.g. MMLU; should stay at the base model's level). With `lengths`, it also gives
the length-normalised accuracy and per-length log-likelihood (cloze scoring); with `groups` (e.g. MMLU
subjects) every metric per group as well.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`): one score per choice and question, larger = more likely:
        log P(" A" | prompt) .. log P(" D" | prompt) for letter scoring, or each choice text's summed
        log-likelihood for cloze scoring.
    references (`list` of `int`): the index of the correct choice.
    groups (`list` of `str`, optional): a group (subject) per question; adds `by_group`.
    lengths (`list` of `list` of `float`, optional): a length per choice (e.g. its token count); adds
        `accuracy_norm` and `correct_logprob_per_length`.
Returns:
    accuracy: mean [argmax(scores) == reference] (ties go to the lowest index; a row whose choices all
        tie gave no answer and counts as wrong).
    choice_prob: mean softmax(scores)[reference].
    correct_logprob: mean scores[reference].
    correct_prob: mean exp(scores[reference]) (meaningful when the scores are log-probabilities).
    n: the number of questions.
    accuracy_norm, correct_logprob_per_length: with `lengths`.
    by_group: {group: the metrics above}, with `groups`.
Examples:
    >>> metric = evaluate.load("modeling_dsg/evaluation/dsg_unlearning")
    >>> metric.compute(predictions=[[0.0, -1.0, -2.0, -3.0], [-2.0, -1.0, -3.0, -0.5]], references=[0, 1])["accuracy"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class DsgUnlearning(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float64")),
                    "references": datasets.Value("int64"),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2504.08192", "https://github.com/EleutherAI/lm-evaluation-harness"],
        )

    def _compute(self, predictions, references, groups=None, lengths=None):
        return compute_choice_metrics(predictions, references, groups=groups, lengths=lengths)
