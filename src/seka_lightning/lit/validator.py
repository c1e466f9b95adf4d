"""BankValidator: ``seka validate`` shows whether a bank highlights, before it is used.

On held-out synthetic QA probes (two contexts, a question, the answering context highlighted) it measures, without
and with a bank-steering method (:class:`~seka_lightning.methods.KeySteeringMethod`: SEKA, the random-projection
and key-scaling ablations): the attention from the last prompt token onto the highlighted context, per layer, and the
teacher-forced log-likelihood of the answer. Steering that works moves attention onto the highlight and makes the
answer likelier.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torchmetrics import Metric
from transformers import PreTrainedTokenizerBase

from seka_lightning.bank import ProjectionBank
from seka_lightning.data.synthetic_qa import HighlightedQuestion
from seka_lightning.diagnostics import answer_log_likelihood, attention_mass
from seka_lightning.families import resolve_layout
from seka_lightning.files import VALIDATION_REPORT, atomic_path, check_output, write_json
from seka_lightning.highlight import apply_chat_template, encode_spans
from seka_lightning.lit.frozen import FrozenModelModule
from seka_lightning.methods import KeySteeringMethod, position_ids_for

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CONDITIONS = ("unsteered", "steered")


class ExampleMean(Metric):
    """Mean over examples of a per-example vector; sum states, so the DDP mean is ``sum / count`` over all ranks."""

    full_state_update = False
    is_differentiable = False

    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int, **kwargs: Any) -> None:
        """``size``: length of each example's vector; ``kwargs`` go to ``torchmetrics.Metric``."""
        super().__init__(**kwargs)
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.add_state("total", default=torch.zeros(size, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor) -> None:
        """Add examples: ``values`` is ``[B, size]``."""
        if values.ndim != 2 or values.shape[1] != self.total.shape[0]:
            raise ValueError(f"values must be [B, {self.total.shape[0]}], got {tuple(values.shape)}")
        self.total += values.to(self.total).sum(0)
        self.count += values.shape[0]

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no examples were measured; check that the validation data is not empty")
        return self.total / self.count


def encode_questions(
    tokenizer: PreTrainedTokenizerBase, questions: Sequence[HighlightedQuestion], *, chat: bool = False
) -> tuple[dict[str, torch.Tensor], int]:
    """Prompt + answer for teacher forcing, with the prompts' last tokens aligned.

    Prompts are left-padded and answers (``" " + answer``, or the bare answer after a chat template's assistant
    header) right-padded, so the last prompt token sits at ``prompt_length - 1`` in every row. Answers are tokenized
    on their own, so prompt tokens are exactly those a generation would see. Returns ``input_ids``,
    ``attention_mask``, ``highlight_mask`` (the highlighted context; False over the answer, so steering edits the
    same prompt tokens) and ``labels`` (answer ids, ``-100`` elsewhere), all ``[B, T]``, and the prompt length.
    """
    prompts, spans = [], []
    for i, question in enumerate(questions):
        text, (start, end) = question.prompt, question.span
        if chat:
            wrapped = apply_chat_template(tokenizer, text)
            shift = wrapped.find(text)
            if shift < 0:
                raise ValueError(
                    f"question {i}: the chat template does not contain the prompt verbatim, so the highlight cannot "
                    "be placed; use chat=False"
                )
            text, start, end = wrapped, start + shift, end + shift
        prompts.append(text)
        spans.append([(start, end)])
    enc = encode_spans(tokenizer, prompts, spans)
    separator = "" if chat else " "
    answers = tokenizer([separator + q.answer for q in questions], add_special_tokens=False)["input_ids"]
    batch, prompt_length = enc["input_ids"].shape
    width = max(len(ids) for ids in answers)
    answer_ids = torch.full((batch, width), tokenizer.pad_token_id, dtype=torch.long)
    answer_mask = torch.zeros((batch, width), dtype=torch.long)
    for row, ids in enumerate(answers):
        answer_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        answer_mask[row, : len(ids)] = 1
    labels = torch.cat(
        [torch.full_like(enc["input_ids"], IGNORE_INDEX), answer_ids.masked_fill(answer_mask == 0, IGNORE_INDEX)], 1
    )
    encoded = {
        "input_ids": torch.cat([enc["input_ids"], answer_ids], 1),
        "attention_mask": torch.cat([enc["attention_mask"], answer_mask], 1),
        "highlight_mask": torch.cat([enc["highlight_mask"], torch.zeros((batch, width), dtype=torch.bool)], 1),
        "labels": labels,
    }
    return encoded, prompt_length


class BankValidator(FrozenModelModule):
    """Attention on the highlight and answer log-likelihood, without and with steering, on held-out QA probes.

    Logs ``{unsteered,steered,delta}/{attn_mass,attn_mass_steered_layers,answer_logprob,answer_logprob_per_token}``
    (means over examples; ``delta = steered - unsteered``; ``attn_mass`` averages all layers,
    ``attn_mass_steered_layers`` the layers the bank edits) and writes the per-layer curves to a JSON file.
    """

    def __init__(
        self,
        pretrained: str,
        method: KeySteeringMethod,
        *,
        dtype: str = "float32",
        chat: bool = False,
        output: str | None = None,
        overwrite: bool = False,
    ) -> None:
        """
        Args:
            pretrained: hub id, local path, or ``embedded:smollm2-135m`` / ``embedded:gemma3-270m``.
            method: the bank-steering method to measure: ``SekaMethod``, ``RandomProjectionMethod`` or
                ``KeyScalingMethod`` (``--model.method SekaMethod --model.method.bank B --model.method.gain_pos 2``).
            dtype: model dtype (float32, bfloat16, float16); the model runs with eager attention, which is what
                returns attention weights.
            chat: wrap each prompt as a user message with the tokenizer's chat template (the answer then follows
                the assistant header directly, instead of after a space).
            output: JSON file for the per-layer curves; None = ``outputs/validate/<bank file stem>.json``.
            overwrite: replace an existing report at ``output`` (checked before the model loads).
        """
        super().__init__()
        if not isinstance(method, KeySteeringMethod):
            raise ValueError(
                f"BankValidator measures a method that steers keys with a projection bank (SekaMethod, "
                f"RandomProjectionMethod, KeyScalingMethod), got {type(method).__name__}; pass one of those as "
                "--model.method"
            )
        if dtype == "float64":
            # eager attention softmaxes in float32, where float64's mask value becomes -inf: rows that are all
            # left padding turn into NaN and spread through the values
            raise ValueError(
                "dtype='float64' is not supported: eager attention turns fully padded rows into NaN in float64; "
                "use float32"
            )
        stem = Path(method.bank_path).stem if method.bank_path else method.name
        self.output = Path(output) if output is not None else Path("outputs/validate") / f"{stem}.json"
        check_output(
            self.output,
            kind=VALIDATION_REPORT,
            inputs={f"--model.method.{name}": path for name, path in method.source_files().items()},
            overwrite=overwrite,
            flag="--model.overwrite true",
        )
        self.save_hyperparameters(ignore=["method"])
        self.load_frozen_model(pretrained, dtype=dtype, attn_implementation="eager")
        self.method = method
        self.method.setup(self.model, self.tokenizer)
        layout = resolve_layout(self.model)
        self.method.bank.check_compatible(
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            model_id=pretrained,
        )
        self.steered_layers = edited_layers(
            self.method.bank, self.method.layer_mapping_for(layout.num_layers), neg=method.gain_neg is not None
        )
        self.num_layers = layout.num_layers
        # per condition: [attention mass per layer..., answer log-prob sum, answer log-prob per token]
        self.means = torch.nn.ModuleDict({c: ExampleMean(layout.num_layers + 2) for c in CONDITIONS})

    @torch.no_grad()
    def measure(self, enc: dict[str, torch.Tensor], prompt_length: int) -> torch.Tensor:
        """One eager forward pass: ``[B, L + 2]`` = attention mass per layer, answer log-prob sum and per-token mean."""
        answer_width = enc["input_ids"].shape[1] - prompt_length
        out = self.model(
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            position_ids=position_ids_for(enc["attention_mask"]),
            output_attentions=True,
            use_cache=False,
            logits_to_keep=answer_width + 1,  # the last prompt token and the answer tokens predict the answer
        )
        mass = attention_mass(out.attentions, enc["highlight_mask"], query_index=prompt_length - 1)
        total, count = answer_log_likelihood(out.logits, enc["labels"][:, -(answer_width + 1) :])
        return torch.cat([mass, total[:, None], (total / count)[:, None]], 1)

    def validation_step(self, batch: list[HighlightedQuestion], batch_idx: int) -> None:
        if not batch:  # this rank's share ran out (ranks stay in step)
            return
        enc, prompt_length = encode_questions(self.tokenizer, batch, chat=self.hparams.chat)
        enc = {k: v.to(self.device) for k, v in enc.items()}
        self.means["unsteered"].update(self.measure(enc, prompt_length))
        with self.method.active(self.model, enc):
            self.means["steered"].update(self.measure(enc, prompt_length))

    @property
    def figure_path(self) -> Path:
        """The before/after attention figure, beside the JSON report."""
        return self.output.with_suffix(".png")

    def on_validation_epoch_end(self) -> None:
        n = self.num_layers
        means = {c: self.means[c].compute() for c in CONDITIONS}  # summed over ranks
        means["delta"] = means["steered"] - means["unsteered"]
        with self.means["unsteered"].sync_context():
            examples = int(self.means["unsteered"].count)
        summary: dict[str, dict[str, float]] = {}
        for condition, values in means.items():
            summary[condition] = {
                "attn_mass": values[:n].mean().item(),
                "attn_mass_steered_layers": values[self.steered_layers].mean().item(),
                "answer_logprob": values[n].item(),
                "answer_logprob_per_token": values[n + 1].item(),
            }
            for name, value in summary[condition].items():
                self.log(f"{condition}/{name}", value, sync_dist=False)  # already global
        curves = {condition: values[:n].tolist() for condition, values in means.items()}
        self._write_report(summary, curves, examples)
        for metric in self.means.values():
            metric.reset()

    @rank_zero_only
    def _write_report(
        self, summary: dict[str, dict[str, float]], curves: dict[str, list[float]], examples: int
    ) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        report = {
            "settings": {**dict(self.hparams), **self.method.describe()},
            "data": getattr(datamodule, "val_path", None),
            "examples": examples,
            "steered_layers": self.steered_layers,
            "summary": summary,
            "attention_mass_per_layer": curves,
        }
        write_json(self.output, report)
        plot_attention_curves(
            curves,
            self.steered_layers,
            self.figure_path,
            title=f"{Path(self.method.bank_path or self.method.name).name} on {self.hparams.pretrained}",
        )
        log.info(
            "attention on the highlight %.4f -> %.4f (steered layers %.4f -> %.4f), answer log-prob %.3f -> %.3f "
            "over %d probes; curves in %s, figure in %s",
            summary["unsteered"]["attn_mass"],
            summary["steered"]["attn_mass"],
            summary["unsteered"]["attn_mass_steered_layers"],
            summary["steered"]["attn_mass_steered_layers"],
            summary["unsteered"]["answer_logprob"],
            summary["steered"]["answer_logprob"],
            examples,
            self.output,
            self.figure_path,
        )


def edited_layers(bank: ProjectionBank, mapping: dict[int, int], *, neg: bool) -> list[int]:
    """The selected model layers whose bank matrices are not all zero (a layer whose heads were all skipped by the
    ``min_diff`` filter is never edited); raises if there are none."""
    layers = sorted(
        layer
        for layer, index in mapping.items()
        if bank.pos[index].any() or (neg and bank.neg is not None and bank.neg[index].any())
    )
    if not layers:
        raise ValueError(
            f"the bank's projectors are zero on every selected layer {sorted(mapping)}, so steering would change "
            "nothing; select other layers or rebuild the bank with a lower min_diff"
        )
    return layers


def attention_figure(curves: dict[str, list[float]], steered_layers: list[int], *, title: str) -> Figure:
    """Attention mass on the highlight per layer, unsteered vs steered, on an Agg canvas (no display needed).

    The layers the bank edits are shaded, so a reader sees where the change should come from.
    """
    figure = Figure(figsize=(7.0, 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for layer in steered_layers:
        axes.axvspan(layer - 0.5, layer + 0.5, color="0.92", linewidth=0)
    for condition, style in (("unsteered", "o-"), ("steered", "s-")):
        axes.plot(range(len(curves[condition])), curves[condition], style, markersize=3, label=condition)
    axes.set_xlabel("layer (shaded: edited by the bank)")
    axes.set_ylabel("attention mass on the highlight")
    axes.set_title(title, fontsize=10)
    axes.legend()
    return figure


def plot_attention_curves(curves: dict[str, list[float]], steered_layers: list[int], path: Path, *, title: str) -> Path:
    """Write :func:`attention_figure` as a PNG, atomically."""
    with atomic_path(path) as tmp:
        attention_figure(curves, steered_layers, title=title).savefig(tmp, format="png", dpi=120)
    return path
